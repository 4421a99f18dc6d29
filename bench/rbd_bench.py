#!/usr/bin/env python3
"""RBD convert benchmark (issue 15): instar vs qemu-img 7.2 on the same single-node Ceph cluster. Only prints.

  raw -> RBD     convert -O raw SRC.raw rbd:rbd/IMAGE   (the target is created by the convert)
  RBD -> qcow2   convert -f raw -O qcow2 rbd:rbd/IMAGE OUT.qcow2

The source is SIZE MiB (each of --sizes, default 512 and 1024) with half of it random data in 4 MiB runs (every
other 4 MiB), so both the data path and the sparse path (rbd_diff_iterate2 allocation, holes left unwritten)
count. The tools run interleaved (qemu-img, instar, instar, qemu-img, ...) so a loaded machine slows both
alike; the table gives the median of RUNS of wall seconds and of the tool's own CPU seconds (user + system,
from wait4; the cluster's daemons are not counted), and the ratio qemu-img / instar (above 1: instar ahead).

Usage: bench/rbd_bench.py [--build build] [--sizes 512,1024] [--runs 3] [--conf CEPH_CONF]
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
    """Wall seconds and the child's CPU seconds (user + system)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {argv}")
    return wall, ru.ru_utime + ru.ru_stime


def make_source(path, size_mib):
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
        for off in range(0, size_mib, 8):
            f.seek(off * MIB)
            f.write(os.urandom(4 * MIB))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--sizes", default="512,1024", help="source sizes in MiB, comma-separated")
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
        tools = {"qemu-img": "qemu-img", "instar": instar}
        lines = []
        for size_mib in [int(x) for x in a.sizes.split(",")]:
            src = os.path.join(work, "src.raw")
            make_source(src, size_mib)
            results = {}
            for case in ("raw->rbd", "rbd->qcow2"):
                walls = {label: [] for label in tools}
                cpus = {label: [] for label in tools}
                for rnd in range(a.runs):
                    order = list(tools) if rnd % 2 == 0 else list(tools)[::-1]
                    for label in order:
                        tool = tools[label]
                        image = f"bench{uuid.uuid4().hex[:8]}"
                        rbdname = f"rbd:rbd/{image}:conf={conf}"
                        out = os.path.join(work, "out.qcow2")
                        if case == "raw->rbd":
                            sh("sync")
                            w, c = timed([tool, "convert", "-f", "raw", "-O", "raw", src, rbdname])
                        else:
                            sh("qemu-img", "convert", "-f", "raw", "-O", "raw", src, rbdname)
                            sh("sync")
                            w, c = timed([tool, "convert", "-f", "raw", "-O", "qcow2", rbdname, out])
                            os.unlink(out)
                        walls[label].append(w)
                        cpus[label].append(c)
                        sh("rbd", "-c", conf, "rm", "--no-progress", f"rbd/{image}")
                results[case] = {label: (statistics.median(walls[label]), statistics.median(cpus[label]))
                                 for label in tools}
            print(f"== convert, {size_mib} MiB (half data in 4 MiB runs), median of {a.runs} interleaved runs ==")
            for case in ("raw->rbd", "rbd->qcow2"):
                (q, qc), (i, ic) = results[case]["qemu-img"], results[case]["instar"]
                line = (f"{size_mib:5d} MiB {case:11s} qemu-img {q:6.2f} s ({qc:5.2f} CPU s)   "
                        f"instar {i:6.2f} s ({ic:5.2f} CPU s)   ratio qemu/instar {q / i:5.2f}x")
                print(line, flush=True)
                lines.append(line)
            os.unlink(src)
        print("== ratios (above 1: instar ahead) ==")
        for line in lines:
            print(line)
    finally:
        if cluster:
            subprocess.run(["bash", SCRIPT, "stop", cluster], check=False)
        subprocess.run(["rm", "-rf", work], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
