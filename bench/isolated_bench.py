#!/usr/bin/env python3
"""Isolated mode's overhead (docs/isolated.md). It only prints; nothing here asserts.

For `info --output=json` of a small qcow2 (with a backing file), the median wall time per call of:
  (1) instar_info_json as a plain library call (Python ctypes, in process),
  (2) the same call with INSTAR_OPEN_ISOLATED (a confined helper spawned per call),
  (3) `prlimit --cpu=30 --as=1GiB qemu-img info --output=json` as a subprocess (what VDSM, Nova and Cinder run),
  (4) `instar info --isolated --output=json` as a subprocess,
and the ratios. The target is (2) < (3): isolated instar still faster than qemu-img under prlimit.

Usage: bench/isolated_bench.py [--build build] [--calls 200]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_time(fn, calls):
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    build = os.path.abspath(a.build)
    os.environ.setdefault("INSTAR_LIBRARY", os.path.join(build, "lib", "libinstar.so"))
    sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
    import instar

    with tempfile.TemporaryDirectory() as d:
        base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "top.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1G"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 1 0 4M", base], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top], check=True)
        assert instar.info_json(top, isolated=True) == instar.info_json(top)

        cli = os.path.join(build, "bin", "instar")
        prlimit = ["prlimit", "--cpu=30", "--as=%d" % (1 << 30), "--"]
        rows = [
            ("library call", lambda: instar.info_json(top)),
            ("library call, isolated", lambda: instar.info_json(top, isolated=True)),
            ("prlimit qemu-img info", lambda: subprocess.run(
                [*prlimit, "qemu-img", "info", "--output=json", top], check=True, stdout=subprocess.DEVNULL)),
            ("instar info --isolated (CLI)", lambda: subprocess.run(
                [cli, "info", "--isolated", "--output=json", top], check=True, stdout=subprocess.DEVNULL)),
            ("prlimit instar info (CLI)", lambda: subprocess.run(
                [*prlimit, cli, "info", "--output=json", top], check=True, stdout=subprocess.DEVNULL)),
        ]
        res = {}
        for name, fn in rows:
            fn()  # warm caches
            res[name] = median_time(fn, a.calls)
            print(f"{name:32s} {res[name] * 1e3:9.3f} ms", flush=True)
        plain, iso, q = res["library call"], res["library call, isolated"], res["prlimit qemu-img info"]
        print(f"isolated / plain library call:      {iso / plain:7.1f}x")
        print(f"prlimit qemu-img / isolated call:   {q / iso:7.1f}x  (target > 1)")
        print(f"prlimit qemu-img / isolated CLI:    {q / res['instar info --isolated (CLI)']:7.1f}x")


if __name__ == "__main__":
    main()
