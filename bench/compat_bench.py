#!/usr/bin/env python3
"""Drop-in benchmark: `instar.compat.vdsm.info(path)` (a library call) per call, against what VDSM pays today for
the same answer: `qemu-img info --output json PATH` run as a subprocess and its output parsed with json.loads.
Also `instar.compat.nova.qemu_img_info(path)` against Nova's way (`qemu-img info PATH --force-share
--output=json` run as a subprocess, parsed into a QemuImgInfo) when oslo.utils is importable. Both sides answer
on the same image (a 64 MiB qcow2 with a little data and a backing file), and the answers are checked equal
before timing. Only prints: the microseconds per call of each side, wall and CPU (this process and its children),
and the ratios (> 1: instar is faster).

    python3 bench/compat_bench.py [--build build] [--calls 2000] [--subprocess-calls 100]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds():
    """CPU seconds (user + system) of this process and of its waited-for children so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def per_call(fn, calls, repeats=3):
    """Medians over `repeats` runs of the wall seconds and the CPU seconds (this process and its children) per
    call of fn(). On a loaded machine the wall time swings with the load; the CPU time much less."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(calls):
            fn()
        walls.append((time.perf_counter() - t0) / calls)
        cpus.append((cpu_seconds() - c0) / calls)
    return statistics.median(walls), statistics.median(cpus)


def vdsm_subprocess_info(path):
    """What vdsm.storage.qemuimg.info does: run qemu-img, parse its JSON."""
    p = subprocess.run(["qemu-img", "info", "--output", "json", path], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, check=True)
    return json.loads(p.stdout.decode("utf8"))


def report(name, ours, theirs):
    for what, k in (("wall", 0), ("cpu", 1)):
        print("%-40s %-4s instar %8.1f us/call   subprocess %9.1f us/call   ratio %7.1fx"
              % (name, what, ours[k] * 1e6, theirs[k] * 1e6, theirs[k] / ours[k]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--calls", type=int, default=2000, help="library calls per timed run")
    ap.add_argument("--subprocess-calls", type=int, default=100, help="qemu-img runs per timed run")
    args = ap.parse_args()
    os.environ.setdefault("INSTAR_LIBRARY", os.path.join(args.build, "lib", "libinstar.so"))
    sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
    from instar.compat import vdsm

    with tempfile.TemporaryDirectory(prefix="instar-compat-bench-") as d:
        base = os.path.join(d, "base.qcow2")
        path = os.path.join(d, "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path],
                       check=True)
        subprocess.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 32M 1M", path], check=True,
                       stdout=subprocess.DEVNULL)
        assert vdsm.info(path) == vdsm_subprocess_info(path), "the two answers differ"
        ours = per_call(lambda: vdsm.info(path), args.calls)
        theirs = per_call(lambda: vdsm_subprocess_info(path), args.subprocess_calls)
        report("vdsm.info (qcow2 with a backing file)", ours, theirs)

        deps = os.path.join(args.build, "compat-deps")  # where the drop-in tests install oslo, if they ran
        if os.path.isdir(deps):
            sys.path.append(deps)
        try:
            from oslo_utils import imageutils
        except ImportError:
            print("nova.qemu_img_info: skipped (oslo.utils is not importable)")
            return
        from instar.compat import nova

        def nova_subprocess_info():
            p = subprocess.run(["env", "LC_ALL=C", "LANG=C", "qemu-img", "info", path, "--force-share",
                                "--output=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
            return imageutils.QemuImgInfo(p.stdout.decode(), format="json")
        ours = per_call(lambda: nova.qemu_img_info(path), args.calls)
        theirs = per_call(nova_subprocess_info, args.subprocess_calls)
        report("nova.qemu_img_info (QemuImgInfo)", ours, theirs)


if __name__ == "__main__":
    main()
