#!/usr/bin/env python3
"""instar.compat.oslo.QemuImgInfo.from_path(path) against oslo.utils' way, QemuImgInfo(text of a
`qemu-img info --output=json` subprocess), per call, on the same qcow2 image.

    INSTAR_LIBRARY=build/lib/libinstar.so PYTHONPATH=bindings/python python3 bench/oslo_bench.py [--seconds N]

With --force-share both sides skip the image locks (Nova's `qemu-img info --force-share`). Each side runs for
about N seconds (default 5) after a warm-up; the script prints calls per second, the time
per call and the ratio. The qemu-img side parses with oslo.utils' own QemuImgInfo when it can be imported
(e.g. from build/consumers/venv), else with ours from the same text (the subprocess dominates either way).
Both sides must agree on every property, which the script checks first.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

from instar.compat.oslo import QemuImgInfo as InstarQemuImgInfo

try:
    from oslo_utils.imageutils import QemuImgInfo as OsloQemuImgInfo  # type: ignore
    PARSER = "oslo_utils.imageutils.QemuImgInfo"
except ImportError:
    OsloQemuImgInfo = InstarQemuImgInfo
    PARSER = "instar.compat.oslo.QemuImgInfo (oslo.utils not importable)"

PROPS = ("image", "backing_file", "backing_file_format", "file_format", "virtual_size", "cluster_size",
         "disk_size", "snapshots", "encrypted", "format_specific")


FORCE_SHARE = False


def with_qemu_img(path):
    share = ["--force-share"] if FORCE_SHARE else []
    out = subprocess.run(["qemu-img", "info"] + share + ["--output=json", path], check=True,
                         capture_output=True).stdout
    return OsloQemuImgInfo(out, format="json")


def with_instar(path):
    return InstarQemuImgInfo.from_path(path, force_share=FORCE_SHARE)


def rate(fn, path, seconds):
    for _ in range(3):
        fn(path)
    n, start = 0, time.perf_counter()
    while True:
        fn(path)
        n += 1
        took = time.perf_counter() - start
        if took >= seconds:
            return n, took


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--force-share", action="store_true",
                    help="both sides read without taking the image locks (qemu-img -U, as Nova calls it)")
    ap.add_argument("image", nargs="?", help="an image to read (default: a fresh 1 GiB qcow2 with a backing file)")
    args = ap.parse_args()
    global FORCE_SHARE
    FORCE_SHARE = args.force_share
    with tempfile.TemporaryDirectory() as d:
        path = args.image
        if path is None:
            base = os.path.join(d, "base.qcow2")
            path = os.path.join(d, "top.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1G"], check=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path], check=True)
        a, b = with_qemu_img(path), with_instar(path)
        for p in PROPS:
            if getattr(a, p) != getattr(b, p):
                sys.exit("oslo_bench: %s differs: qemu-img %r, instar %r" % (p, getattr(a, p), getattr(b, p)))
        qn, qt = rate(with_qemu_img, path, args.seconds)
        inn, it = rate(with_instar, path, args.seconds)
        q_us, i_us = qt / qn * 1e6, it / inn * 1e6
        print("image: %s%s" % (path, " (--force-share)" if FORCE_SHARE else ""))
        print("QemuImgInfo(qemu-img info --output=json) [%s]: %d calls, %.1f us/call" % (PARSER, qn, q_us))
        print("instar.compat.oslo.QemuImgInfo.from_path:  %d calls, %.1f us/call" % (inn, i_us))
        print("ratio: %.0fx" % (q_us / i_us))


if __name__ == "__main__":
    main()
