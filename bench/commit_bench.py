#!/usr/bin/env python3
"""commit benchmark: qemu-img vs instar committing an overlay that holds 1 GiB of data (16 extents of 64 MiB
of random bytes, every other 64 MiB of a 2 GiB disk) into its base, median of N runs, the tools taking turns. Before each run the
pristine base and overlay are copied into place and the page cache is written back; the copy is not timed.
Bases: an empty 2 GiB qcow2 (every cluster allocated by the commit) and a 2 GiB raw file.
Prints wall seconds, CPU seconds (user + system of the child) and the ratio qemu/instar (> 1: instar is faster).

    python3 bench/commit_bench.py [--instar build/bin/instar] [--runs 3] [--only qcow2|raw] [--cache DIR]
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

MiB = 1 << 20
CACHE = "/tmp/instar-bench"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(argv, **kw):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)


def make_sources(base_fmt):
    """Pristine base.FMT and top-FMT.qcow2 (with 1 GiB of data) in the cache folder, made once."""
    os.makedirs(CACHE, exist_ok=True)
    base = os.path.join(CACHE, f"commit-base.{base_fmt}")
    top = os.path.join(CACHE, f"commit-top-{base_fmt}.qcow2")
    if os.path.exists(base) and os.path.exists(top):
        return base, top
    chunk = os.path.join(CACHE, "commit-chunk.bin")
    if not os.path.exists(chunk):
        with open(chunk + ".part", "wb") as f:
            f.write(os.urandom(64 * MiB))
        os.rename(chunk + ".part", chunk)
    sh(["qemu-img", "create", "-q", "-f", base_fmt, base, "2G"])
    part = top + ".part"
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", base_fmt, part],
       cwd=CACHE)
    cmds = []
    for k in range(16):
        cmds += ["-c", f"write -s {chunk} {k * 128}M 64M"]
    sh(["qemu-io", *cmds, part])
    # The overlay names its base by a relative name: the work copies live in the same folder.
    os.rename(part, top)
    return base, top


def timed_commit(argv, base, top, work_base, work_top):
    for src, dst in ((base, work_base), (top, work_top)):
        if os.path.exists(dst):
            os.unlink(dst)
        subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    sh([*argv, "commit", work_top], cwd=CACHE)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def bench(base_fmt, instar, runs):
    base, top = make_sources(base_fmt)
    # The work overlay must name the work base: rewrite its backing link (metadata only).
    work_base = os.path.join(CACHE, f"commit-work-base.{base_fmt}")
    work_top_src = os.path.join(CACHE, f"commit-work-top-{base_fmt}.qcow2")
    if not os.path.exists(work_top_src):
        shutil.copyfile(top, work_top_src + ".part")
        sh(["qemu-img", "rebase", "-u", "-b", os.path.basename(work_base), "-F", base_fmt, work_top_src + ".part"])
        os.rename(work_top_src + ".part", work_top_src)
    work_top = os.path.join(CACHE, f"commit-run-top-{base_fmt}.qcow2")
    tools = {"qemu-img": ["qemu-img"], "instar": [instar]}
    print(f"== commit of an overlay with 1 GiB of data into a 2 GiB {base_fmt} base, median of {runs} ==")
    med = {}
    # The tools take turns (the order alternating from run to run), so a change in the machine's load hits both.
    got = {name: ([], []) for name in tools}
    for k in range(runs):
        order = list(tools.items())
        for name, argv in (order if k % 2 == 0 else order[::-1]):
            w, c = timed_commit(argv, base, work_top_src, work_base, work_top)
            got[name][0].append(w)
            got[name][1].append(c)
    for name, (walls, cpus) in got.items():
        med[name] = (statistics.median(walls), statistics.median(cpus))
        print(f"  {name:10s} wall {med[name][0]:.3f} s  cpu {med[name][1]:.3f} s  runs: "
              + " ".join(f"{w:.3f}/{c:.3f}" for w, c in zip(walls, cpus)))
    ratios = [q / i for q, i in zip(got["qemu-img"][0], got["instar"][0])]
    print("  qemu-img/instar wall per run (same turn): " + " ".join(f"{r:.2f}" for r in ratios))
    for f in (work_base, work_top):
        if os.path.exists(f):
            os.unlink(f)
    print(f"  qemu-img/instar: wall {med['qemu-img'][0] / med['instar'][0]:.2f}x, "
          f"cpu {med['qemu-img'][1] / med['instar'][1]:.2f}x")


def main():
    global CACHE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instar", default=os.path.join(ROOT, "build", "bin", "instar"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["qcow2", "raw"])
    ap.add_argument("--cache", default="/tmp/instar-bench", help="folder of the images (default %(default)s)")
    a = ap.parse_args()
    CACHE = a.cache
    for fmt in ("qcow2", "raw"):
        if a.only and a.only != fmt:
            continue
        bench(fmt, os.path.abspath(a.instar), a.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
