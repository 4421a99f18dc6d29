#!/usr/bin/env python3
"""`bench` IOPS of instar against qemu-img 7.2 at queue depths 1, 16 and 64 (reads and writes of 4 KiB on a
1 GiB raw image, and writes on a qcow2 image), median of N runs each. Only prints.

Usage: bench/bench_iops.py [--build build] [--cache /tmp/instar-bench] [--runs 3] [--count 100000]
"""
import argparse
import os
import re
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME = re.compile(r"Run completed in (\d+\.\d+) seconds")


def seconds(argv):
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return float(TIME.search(out).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--cache", default="/tmp/instar-bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=100000)
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    raw = os.path.join(a.cache, "bench-iops.raw")
    if not os.path.exists(raw):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", raw, "1G"], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 1G", raw], check=True, stdout=subprocess.DEVNULL)
    qcow = os.path.join(a.cache, "bench-iops.qcow2")
    instar = os.path.join(a.build, "bin", "instar")
    print(f"== bench, {a.count} requests of 4 KiB, median of {a.runs} ==")
    print(f"{'case':<24}{'qemu-img IOPS':>16}{'instar IOPS':>16}{'ratio':>8}")
    for kind, fmt, extra in (("read raw", "raw", []), ("write raw", "raw", ["-w"]), ("write qcow2", "qcow2", ["-w"])):
        for depth in (1, 16, 64):
            res = {}
            for tool in ("qemu-img", instar):
                runs = []
                for _ in range(a.runs):
                    img = raw
                    if fmt == "qcow2":
                        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "1G"], check=True)
                        img = qcow
                    runs.append(seconds([tool, "bench", "-f", fmt, "-c", str(a.count), "-d", str(depth), *extra,
                                         img]))
                res[tool] = a.count / statistics.median(runs)
            q, i = res["qemu-img"], res[instar]
            print(f"{kind + ' -d ' + str(depth):<24}{q:>16.0f}{i:>16.0f}{i / q:>8.2f}")


if __name__ == "__main__":
    main()
