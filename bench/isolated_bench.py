#!/usr/bin/env python3
"""Isolated mode's overhead (docs/isolated.md). It only prints; nothing here asserts.

For `info --output=json` of a small qcow2 (with a backing file), the median wall time per call of:
  (1) instar_info_json as a plain library call (Python ctypes, in process),
  (2) the same call with INSTAR_OPEN_ISOLATED (a confined helper spawned per call),
  (3) `prlimit --cpu=30 --as=1GiB qemu-img info --output=json` as a subprocess (what VDSM, Nova and Cinder run),
  (4) `instar info --isolated --output=json` as a subprocess,
and the ratios. The target is (2) < (3): isolated instar still faster than qemu-img under prlimit.

Then convert of a 1 GiB qcow2 (every cluster written) to raw, the median wall time and CPU time (this process
and its children: the helper, the subprocesses) of:
  (a) instar_convert as a plain library call,
  (b) instar_convert with INSTAR_OPEN_ISOLATED (the source parsed in the helper and streamed back),
  (c) `prlimit --cpu=30 --as=1GiB qemu-img convert -O raw`,
  (d) `instar convert --isolated -O raw` and (e) `instar convert -O raw` as subprocesses.
The images live in --dir (default /dev/shm, so the disk does not dominate); --convert-runs 0 skips this part.

Usage: bench/isolated_bench.py [--build build] [--calls 200] [--convert-runs 5] [--dir /dev/shm] [--skip-info]
"""
import argparse
import os
import resource
import shutil
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


def cpu_seconds():
    """User + system CPU of this process and of its reaped children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def convert_bench(instar, build, runs, where):
    with tempfile.TemporaryDirectory(dir=where) as d:
        src = os.path.join(d, "src.qcow2")
        dst = os.path.join(d, "dst.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, "1G"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1G", src], check=True, stdout=subprocess.DEVNULL)
        cli = os.path.join(build, "bin", "instar")
        prlimit = ["prlimit", "--cpu=30", "--as=%d" % (1 << 30), "--"]
        rows = [
            ("library convert", lambda: instar.convert(src, dst)),
            ("library convert, isolated", lambda: instar.convert(src, dst, isolated=True)),
            ("prlimit qemu-img convert", lambda: subprocess.run(
                [*prlimit, "qemu-img", "convert", "-O", "raw", src, dst], check=True)),
            ("instar convert --isolated (CLI)", lambda: subprocess.run(
                [cli, "convert", "--isolated", "-O", "raw", src, dst], check=True)),
            ("instar convert (CLI)", lambda: subprocess.run([cli, "convert", "-O", "raw", src, dst], check=True)),
        ]
        res = {}
        for _ in range(runs):
            for name, fn in rows:  # interleaved, so a change in the machine's load hits every row alike
                if os.path.exists(dst):
                    os.unlink(dst)
                c0, t0 = cpu_seconds(), time.perf_counter()
                fn()
                wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                res.setdefault(name, []).append((wall, cpu))
        med = {n: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for n, v in res.items()}
        print(f"convert 1 GiB qcow2 -> raw in {where}, median of {runs}:")
        for name, (wall, cpu) in med.items():
            print(f"{name:32s} {wall * 1e3:9.1f} ms wall {cpu * 1e3:9.1f} ms CPU", flush=True)
        (pw, pc), (iw, ic), (qw, qc) = (med["library convert"], med["library convert, isolated"],
                                         med["prlimit qemu-img convert"])
        print(f"isolated / plain library convert:   {iw / pw:7.2f}x wall {ic / pc:7.2f}x CPU")
        print(f"prlimit qemu-img / isolated call:   {qw / iw:7.2f}x wall {qc / ic:7.2f}x CPU  (target > 1)")
        cw, cc = med["instar convert --isolated (CLI)"]
        print(f"prlimit qemu-img / isolated CLI:    {qw / cw:7.2f}x wall {qc / cc:7.2f}x CPU")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--convert-runs", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--skip-info", action="store_true")
    a = ap.parse_args()
    build = os.path.abspath(a.build)
    os.environ.setdefault("INSTAR_LIBRARY", os.path.join(build, "lib", "libinstar.so"))
    sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
    import instar

    if not a.skip_info:
        info_bench(instar, build, a.calls)
    if a.convert_runs > 0:
        where = a.dir if a.dir and shutil.disk_usage(a.dir).free > (3 << 30) else None
        convert_bench(instar, build, a.convert_runs, where)


def info_bench(instar, build, calls):
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
            res[name] = median_time(fn, calls)
            print(f"{name:32s} {res[name] * 1e3:9.3f} ms", flush=True)
        plain, iso, q = res["library call"], res["library call, isolated"], res["prlimit qemu-img info"]
        print(f"isolated / plain library call:      {iso / plain:7.1f}x")
        print(f"prlimit qemu-img / isolated call:   {q / iso:7.1f}x  (target > 1)")
        print(f"prlimit qemu-img / isolated CLI:    {q / res['instar info --isolated (CLI)']:7.1f}x")


if __name__ == "__main__":
    main()
