#!/usr/bin/env python3
"""convert to an NBD target: instar vs `qemu-img convert` vs `nbdcopy`, one run each, printing times and ratios.
It only prints; nothing here asserts.

The source is a 1 GiB raw file full of data (a different 4 KiB pattern per MiB, so nothing reads as zeroes),
made once in the cache dir. The target is a fresh `nbdkit memory 1G` server on a Unix socket per run (so the
server, not a disk, is what the copy waits on); nbdkit advertises multi-conn, so every tool may use several
connections. `--target qemu-nbd` uses `qemu-nbd` over a sparse file instead (one connection); every run starts
after a sync, so the writeback of one run's file does not slow the next, and with the source read through
once, so every tool finds it in the page cache.

Usage: bench/nbd_bench.py [--build build] [--cache /tmp/instar-bench] [--target nbdkit|qemu-nbd]
"""
import argparse
import os
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
SIZE = 1 << 30


def source(cache):
    path = os.path.join(cache, "nbd-src-1g.raw")
    if os.path.exists(path) and os.path.getsize(path) == SIZE:
        return path
    with open(path + ".tmp", "wb") as f:
        for i in range(SIZE // MIB):
            block = (i.to_bytes(4, "little") + bytes(range(1, 253))) * 16
            f.write((block * (MIB // len(block) + 1))[:MIB])
    os.rename(path + ".tmp", path)
    return path


def warm(path):
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


def wait_socket(proc, path, deadline=60):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.args}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.01)
    raise SystemExit("server did not start")


def start_target(kind, cache):
    sock = os.path.join(cache, "nbd-bench.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    if kind == "nbdkit":
        argv = ["nbdkit", "-f", "-U", sock, "memory", str(SIZE)]
    else:
        disk = os.path.join(cache, "nbd-bench-target.raw")
        with open(disk, "wb") as f:
            f.truncate(SIZE)
        argv = ["qemu-nbd", "--persistent", "-f", "raw", "-k", sock, disk]
    p = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    wait_socket(p, sock)
    return p, sock


def stop(p):
    p.terminate()
    p.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--cache", default="/tmp/instar-bench")
    ap.add_argument("--target", choices=["nbdkit", "qemu-nbd"], default="nbdkit")
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    src = source(a.cache)
    instar = os.path.join(a.build, "bin", "instar")
    runs = {
        "instar convert": lambda url: [instar, "convert", "-n", "-f", "raw", "-O", "raw", src, url],
        "qemu-img convert": lambda url: ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, url],
        "nbdcopy": lambda url: ["nbdcopy", src, url],
    }
    times = {}
    print(f"== convert of a 1 GiB raw file full of data to an NBD target ({a.target}), one run each ==")
    for name, argv in runs.items():
        p, sock = start_target(a.target, a.cache)
        url = f"nbd+unix:///?socket={sock}"
        try:
            # The previous run's dirty pages (qemu-nbd's target file) must not throttle this one, and every tool
            # finds the source in the page cache (the first one would otherwise read it from the disk).
            os.sync()
            warm(src)
            t0 = time.perf_counter()
            subprocess.run(argv(url), check=True, stdout=subprocess.DEVNULL)
            times[name] = time.perf_counter() - t0
            same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, url],
                                  capture_output=True).returncode == 0
        finally:
            stop(p)
        print(f"{name:18s} {times[name]:7.2f} s  {SIZE / MIB / times[name]:7.0f} MiB/s  target identical: {same}")
    base = times["instar convert"]
    for other in ("qemu-img convert", "nbdcopy"):
        print(f"{other} / instar: {times[other] / base:.2f}x")


if __name__ == "__main__":
    main()
