#!/usr/bin/env python3
"""convert to an NBD target: instar vs `qemu-img convert` vs `nbdcopy`, printing medians and ratios. It only
prints; nothing here asserts.

The source is a raw file full of data (a different 4 KiB pattern per MiB, so nothing reads as zeroes) of each
size asked for, made once in the cache dir. The target is a fresh server on a Unix socket per run:
`nbdkit memory SIZE` (the server, not a disk, is what the copy waits on; nbdkit advertises multi-conn, so every
tool may use several connections), and/or `qemu-nbd` over a sparse file (one connection: no -e, so no
multi-conn). qemu-nbd's file is on /dev/shm by default (--disk-dir): into a file on this machine's ext4, qemu-nbd's
own buffered writes now and then spend seconds in the kernel (contended inode lock, slow page-cache copies) for
whichever tool is running, and that, with the final fdatasync, swamps the clients' difference. Every run starts
after a sync, so the writeback of one run's file does not slow the next, and with
the source read through once, so every tool finds it in the page cache.

The machine may be loaded: the tools run interleaved (instar, qemu-img, nbdcopy, then the next round in a
rotated order) and the tables give the median of the rounds: wall seconds, MiB/s, the tool's own CPU seconds
(user + system, from wait4; the server's are not counted), and "other / instar" wall-time ratios (above 1: instar
is faster). The first round of each tool checks the target with `qemu-img compare`. Every tool makes the copy
durable: qemu-img and instar flush at the end by default, nbdcopy is run with --flush.

Usage: bench/nbd_bench.py [--build build] [--cache /tmp/instar-bench] [--target nbdkit|qemu-nbd|both]
                          [--sizes 256,1024] [--runs 5] [--disk-dir /dev/shm]
"""
import argparse
import os
import socket
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def source(cache, size):
    path = os.path.join(cache, f"nbd-src-{size // MIB}m.raw")
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    with open(path + ".tmp", "wb") as f:
        for i in range(size // MIB):
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


def start_target(kind, cache, size, disk_dir):
    sock = os.path.join(cache, f"nbd-bench-{os.getpid()}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    disk = None
    if kind == "nbdkit":
        argv = ["nbdkit", "-f", "-U", sock, "memory", str(size)]
    else:
        disk = os.path.join(disk_dir or cache, f"nbd-bench-target-{os.getpid()}.raw")
        with open(disk, "wb") as f:
            f.truncate(size)
        argv = ["qemu-nbd", "--persistent", "-f", "raw", "-k", sock, disk]
    p = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    wait_socket(p, sock)
    return p, sock, disk


def stop(p, disk):
    p.terminate()
    p.wait(timeout=60)
    if disk and os.path.exists(disk):
        os.unlink(disk)


def run_timed(argv):
    """Wall seconds and the child's CPU seconds (user + system)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {argv}")
    return wall, ru.ru_utime + ru.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--cache", default="/tmp/instar-bench")
    ap.add_argument("--disk-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where qemu-nbd's target file goes (default /dev/shm; use the cache dir for a disk)")
    ap.add_argument("--target", choices=["nbdkit", "qemu-nbd", "both"], default="both")
    ap.add_argument("--sizes", default="256,1024", help="source sizes in MiB, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    instar = os.path.join(os.path.abspath(a.build), "bin", "instar")
    tools = {
        "instar": lambda src, url: [instar, "convert", "-n", "-f", "raw", "-O", "raw", src, url],
        "qemu-img": lambda src, url: ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, url],
        # --flush: qemu-img and instar flush the target at the end (cache=writeback), nbdcopy only when told; into
        # qemu-nbd that flush is the fdatasync of the whole copy, so without it nbdcopy does less work.
        "nbdcopy": lambda src, url: ["nbdcopy", "--flush", src, url],
    }
    names = list(tools)
    targets = ["nbdkit", "qemu-nbd"] if a.target == "both" else [a.target]
    sizes = [int(s) * MIB for s in a.sizes.split(",")]
    summary = []
    for target in targets:
        for size in sizes:
            src = source(a.cache, size)
            walls = {n: [] for n in names}
            cpus = {n: [] for n in names}
            same = {}
            for rnd in range(a.runs):
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                for name in order:
                    p, sock, disk = start_target(target, a.cache, size, a.disk_dir)
                    url = f"nbd+unix:///?socket={sock}"
                    try:
                        # The previous run's dirty pages (qemu-nbd's target file) must not throttle this one,
                        # and every tool finds the source in the page cache.
                        os.sync()
                        warm(src)
                        wall, cpu = run_timed(tools[name](src, url))
                        walls[name].append(wall)
                        cpus[name].append(cpu)
                        if name not in same:
                            same[name] = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, url],
                                                        capture_output=True).returncode == 0
                    finally:
                        stop(p, disk)
            print(f"== convert of {size // MIB} MiB of raw data to {target}, median of {a.runs} interleaved runs ==")
            print(f"{'tool':10s} {'wall s':>8s} {'MiB/s':>7s} {'CPU s':>7s}  {'wall / instar':>13s}  identical")
            base = statistics.median(walls["instar"])
            for name in names:
                w = statistics.median(walls[name])
                c = statistics.median(cpus[name])
                print(f"{name:10s} {w:8.2f} {size / MIB / w:7.0f} {c:7.2f}  {w / base:12.2f}x  {same[name]}")
                if name != "instar":
                    summary.append(f"{target:8s} {size // MIB:5d} MiB  {name:8s} / instar: {w / base:5.2f}x "
                                   f"(runs: {' '.join(f'{x:.2f}' for x in walls[name])} vs "
                                   f"{' '.join(f'{x:.2f}' for x in walls['instar'])})")
            print(flush=True)
    print("== ratios (wall time of the other tool / instar's; above 1: instar ahead) ==")
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
