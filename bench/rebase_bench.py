#!/usr/bin/env python3
"""Safe rebase benchmark, qemu-img vs instar in one run (bench/run.py style: it only prints).

An empty qcow2 overlay over a 2 GiB qcow2 holding 1 GiB of random data (16 x 64 MiB extents, the image of
bench/run.py's convert case) is rebased onto an empty 2 GiB qcow2: every byte of the 1 GiB differs between the
old and the new backing file, so both tools read it from both, compare it and write it into the overlay.
Each run starts from a fresh overlay after `sync`, the tools taking turns; the median wall time and the CPU seconds (user + system of
the child) are printed with the instar/qemu-img ratios.

A second case rebases an empty overlay of an 8 GiB sparse raw file, where nothing differs.

Usage: bench/rebase_bench.py [--build build] [--cache /tmp/instar-bench] [--runs 3]
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, big_image, sh  # noqa: E402


def timed(argv, cwd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def bench_rebase(build, cache, runs):
    base = big_image(cache)
    work = os.path.join(cache, "rebase")
    os.makedirs(work, exist_ok=True)
    new = os.path.join(work, "new.qcow2")
    top = os.path.join(work, "top.qcow2")
    if not os.path.exists(new):
        sh("qemu-img", "create", "-q", "-f", "qcow2", new, "2G")
    tools = {"qemu-img": ["qemu-img"], "instar": [os.path.join(build, "bin", "instar")]}
    print(f"== rebase (safe) of an empty overlay from a 2 GiB qcow2 with 1 GiB random data onto an empty qcow2, "
          f"median of {runs} ==")
    # The tools take turns run by run, so that a change in the machine's load touches both alike.
    walls = {name: [] for name in tools}
    cpus = {name: [] for name in tools}
    for _ in range(runs):
        for name, argv in tools.items():
            if os.path.exists(top):
                os.unlink(top)
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "2G")
            sh("sync")
            w, c = timed([*argv, "rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"], work)
            walls[name].append(w)
            cpus[name].append(c)
    med = {}
    for name in tools:
        med[name] = (statistics.median(walls[name]), statistics.median(cpus[name]))
        print(f"  {name:10s} median {med[name][0]:.3f} s wall, {med[name][1]:.3f} s CPU  runs: "
              + " ".join(f"{w:.3f}/{c:.3f}" for w, c in zip(walls[name], cpus[name])))
    if os.path.exists(top):
        os.unlink(top)
    print(f"  instar/qemu-img wall ratio: {med['instar'][0] / med['qemu-img'][0]:.2f}, "
          f"CPU ratio: {med['instar'][1] / med['qemu-img'][1]:.2f}")


def bench_sparse(build, cache, runs):
    """An empty overlay of an 8 GiB sparse raw file rebased onto an empty 8 GiB qcow2: nothing differs, which
    qemu-img finds by reading and comparing 8 GiB of zeroes and instar from block status."""
    work = os.path.join(cache, "rebase-sparse")
    os.makedirs(work, exist_ok=True)
    base, new, top = (os.path.join(work, n) for n in ("base.raw", "new.qcow2", "top.qcow2"))
    if not os.path.exists(base):
        with open(base, "wb") as f:
            f.truncate(8 << 30)
    if not os.path.exists(new):
        sh("qemu-img", "create", "-q", "-f", "qcow2", new, "8G")
    tools = {"qemu-img": ["qemu-img"], "instar": [os.path.join(build, "bin", "instar")]}
    print(f"== rebase (safe) of an empty overlay of an 8 GiB sparse raw file onto an empty qcow2, median of {runs} ==")
    walls = {name: [] for name in tools}
    for _ in range(runs):
        for name, argv in tools.items():
            if os.path.exists(top):
                os.unlink(top)
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "8G")
            walls[name].append(timed([*argv, "rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"], work)[0])
    med = {name: statistics.median(w) for name, w in walls.items()}
    for name in tools:
        print(f"  {name:10s} median {med[name]:.3f} s wall")
    print(f"  instar/qemu-img wall ratio: {med['instar'] / med['qemu-img']:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--cache", default="/tmp/instar-bench")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    bench_rebase(os.path.abspath(a.build), a.cache, a.runs)
    bench_sparse(os.path.abspath(a.build), a.cache, a.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
