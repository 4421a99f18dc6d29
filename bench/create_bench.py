#!/usr/bin/env python3
"""`create` timed: qemu-img against instar (and, with --before, another instar build), the same command run
in turns N times per format into a fresh file on the folder given (the disk the flushes reach). Prints the
median wall time of each and the ratio qemu-img / instar. It only prints; nothing here asserts.

Usage: bench/create_bench.py [--build build] [--before /work/main/build] [--dir /tmp/instar-create-bench] [--runs 21]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import time

CASES = [
    ("raw", ["-f", "raw"], "16M"),
    ("qcow2", ["-f", "qcow2"], "16M"),
    ("qcow2 metadata", ["-f", "qcow2", "-o", "preallocation=metadata"], "1G"),
    ("vmdk split", ["-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"], "5G"),
    ("vhdx", ["-f", "vhdx"], "16M"),
]


def clear(folder):
    for n in os.listdir(folder):
        os.unlink(os.path.join(folder, n))


def once(argv, folder):
    clear(folder)
    t = time.perf_counter()
    subprocess.run(argv, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--before", help="another build folder to time as well (e.g. the main branch's)")
    ap.add_argument("--dir", default="/tmp/instar-create-bench")
    ap.add_argument("--runs", type=int, default=21)
    a = ap.parse_args()
    tools = [("qemu-img", "qemu-img")]
    if a.before:
        tools.append(("before", os.path.abspath(os.path.join(a.before, "bin", "instar"))))
    tools.append(("instar", os.path.abspath(os.path.join(a.build, "bin", "instar"))))
    os.makedirs(a.dir, exist_ok=True)
    print(f"{'case':16}" + "".join(f"{n:>12}" for n, _ in tools) + "   qemu/instar")
    for name, opts, size in CASES:
        times = {n: [] for n, _ in tools}
        for _ in range(a.runs):
            for n, prog in tools:  # in turns, so a slow moment of the machine hits every tool alike
                times[n].append(once([prog, "create", "-q", *opts, "t.img", size], a.dir))
        med = {n: statistics.median(v) for n, v in times.items()}
        ratio = med["qemu-img"] / med["instar"]
        extra = f"   (before: {med['qemu-img'] / med['before']:.2f}x)" if a.before else ""
        print(f"{name:16}" + "".join(f"{med[n] * 1000:10.1f}ms" for n, _ in tools) + f"   {ratio:.2f}x{extra}")
    clear(a.dir)
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
