#!/usr/bin/env python3
"""RBD convert benchmark (issue 15): instar vs qemu-img 7.2 on the same single-node Ceph cluster. Only prints.

  raw -> RBD     convert -O raw SRC.raw rbd:rbd/IMAGE   (the target is created by the convert)
  RBD -> qcow2   convert -f raw -O qcow2 rbd:rbd/IMAGE OUT.qcow2

The source is SIZE MiB (default 512) with half of it random data in 4 MiB runs (every other 4 MiB), so both
the data path and the sparse path (rbd_diff_iterate2 allocation, holes left unwritten) count. Median of RUNS.

Usage: bench/rbd_bench.py [--build build] [--size-mib 512] [--runs 3] [--conf CEPH_CONF]
Without --conf (or INSTAR_CEPH_CONF) it starts a cluster with scripts/ceph-single-node.sh and stops it after.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "ceph-single-node.sh")
MIB = 1 << 20


def sh(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def timed(argv):
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def make_source(path, size_mib):
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
        for off in range(0, size_mib, 8):
            f.seek(off * MIB)
            f.write(os.urandom(4 * MIB))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--conf", default=os.environ.get("INSTAR_CEPH_CONF"))
    a = ap.parse_args()
    instar = os.path.join(os.path.abspath(a.build), "bin", "instar")
    work = tempfile.mkdtemp(prefix="rbd-bench.")
    cluster = None
    conf = a.conf
    if not conf:
        cluster = os.path.join(work, "ceph")
        t0 = time.perf_counter()
        sh("bash", SCRIPT, "start", cluster)
        print(f"cluster start: {time.perf_counter() - t0:.1f} s")
        conf = os.path.join(cluster, "ceph.conf")
    try:
        src = os.path.join(work, "src.raw")
        make_source(src, a.size_mib)
        tools = {"qemu-img": "qemu-img", "instar": instar}
        results = {}
        for case in ("raw->rbd", "rbd->qcow2"):
            for label, tool in tools.items():
                times = []
                for _ in range(a.runs):
                    image = f"bench{uuid.uuid4().hex[:8]}"
                    rbdname = f"rbd:rbd/{image}:conf={conf}"
                    out = os.path.join(work, "out.qcow2")
                    if case == "raw->rbd":
                        sh("sync")
                        times.append(timed([tool, "convert", "-f", "raw", "-O", "raw", src, rbdname]))
                    else:
                        sh("qemu-img", "convert", "-f", "raw", "-O", "raw", src, rbdname)
                        sh("sync")
                        times.append(timed([tool, "convert", "-f", "raw", "-O", "qcow2", rbdname, out]))
                        os.unlink(out)
                    sh("rbd", "-c", conf, "rm", "--no-progress", f"rbd/{image}")
                results[(case, label)] = statistics.median(times)
        print(f"== convert, {a.size_mib} MiB (half data in 4 MiB runs), median of {a.runs} ==")
        for case in ("raw->rbd", "rbd->qcow2"):
            q, i = results[(case, "qemu-img")], results[(case, "instar")]
            print(f"{case:12s} qemu-img {q:6.2f} s   instar {i:6.2f} s   ratio qemu/instar {q / i:5.2f}x")
    finally:
        if cluster:
            subprocess.run(["bash", SCRIPT, "stop", cluster], check=False)
        subprocess.run(["rm", "-rf", work], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
