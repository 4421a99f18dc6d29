#!/usr/bin/env python3
"""convert benchmark: qemu-img vs instar on the same commands, median of N runs (output deleted and the page
cache written back between runs).

Source: a 2 GiB image holding 1 GiB of random data (16 extents of 64 MiB, every other 64 MiB), as raw and as
qcow2, cached in /tmp/instar-bench. Cases: raw->qcow2, qcow2->qcow2, -c zlib, -c zstd, and `check` of a
converted image. Prints seconds and the ratio qemu/instar (> 1: instar is faster).

    python3 bench/convert_bench.py [--instar build/bin/instar] [--runs 3] [--only NAME]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

MiB = 1 << 20
CACHE = "/tmp/instar-bench"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(argv, **kw):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)


def make_sources():
    os.makedirs(CACHE, exist_ok=True)
    raw = os.path.join(CACHE, "conv-src.raw")
    q = os.path.join(CACHE, "conv-src.qcow2")
    if not os.path.exists(raw):
        tmp = raw + ".part"
        with open(tmp, "wb") as f:
            f.truncate(2048 * MiB)
            for k in range(16):
                f.seek(k * 128 * MiB)
                for _ in range(4):
                    f.write(os.urandom(16 * MiB))
        os.rename(tmp, raw)
    if not os.path.exists(q):
        sh(["qemu-img", "convert", "-O", "qcow2", raw, q + ".part"])
        os.rename(q + ".part", q)
    return raw, q


def settle(path):
    if os.path.exists(path):
        os.unlink(path)
    os.sync()


def measure(argv, out):
    """Runs argv once with `out` removed first; wall seconds and the child's CPU seconds (user + system)."""
    settle(out)
    t = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return wall, ru.ru_utime + ru.ru_stime


def timed(argv, out):
    settle(out)
    t = time.monotonic()
    sh(argv)
    return time.monotonic() - t


def timed_check(tool, image):
    os.sync()
    t = time.monotonic()
    r = subprocess.run([tool, "check", image], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if "Command not found" in r.stderr:
        return None
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instar", default=os.path.join(ROOT, "build", "bin", "instar"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    raw, q = make_sources()
    out = os.path.join(CACHE, "conv-out.qcow2")
    cases = [
        ("raw->qcow2", ["convert", "-O", "qcow2", raw]),
        ("qcow2->qcow2", ["convert", "-O", "qcow2", q]),
        ("-c zlib", ["convert", "-c", "-O", "qcow2", q]),
        ("-c zstd", ["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", q]),
    ]
    tools = [("qemu-img", "qemu-img"), ("instar", args.instar)]
    print(f"{'case':<14}{'qemu-img s':>12}{'instar s':>12}{'qemu/instar':>13}")
    for name, cmd in cases:
        if args.only and args.only != name:
            continue
        med = {}
        for label, tool in tools:
            med[label] = statistics.median(timed([tool, *cmd, out], out) for _ in range(args.runs))
        print(f"{name:<14}{med['qemu-img']:>12.2f}{med['instar']:>12.2f}{med['qemu-img'] / med['instar']:>13.2f}",
              flush=True)
    if not args.only or args.only == "check":
        # Both tools check the same image, converted once by qemu-img.
        settle(out)
        sh(["qemu-img", "convert", "-O", "qcow2", q, out])
        med = {}
        for label, tool in tools:
            times = [timed_check(tool, out) for _ in range(args.runs)]
            med[label] = None if None in times else statistics.median(times)
        if med["instar"] is None:
            print(f"{'check':<14}{med['qemu-img']:>12.2f}{'n/a':>12}{'n/a':>13}  (instar has no check yet)")
        else:
            print(f"{'check':<14}{med['qemu-img']:>12.2f}{med['instar']:>12.2f}"
                  f"{med['qemu-img'] / med['instar']:>13.2f}")
    settle(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
