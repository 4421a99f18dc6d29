#!/usr/bin/env python3
"""Copy-offload benchmark: qemu-img vs instar, convert raw->qcow2, qcow2->raw and raw->raw of 1 GiB of data
(the convert_bench sources: a 2 GiB image holding 1 GiB of random data), plain and with -C, and `dd bs=1M` raw->raw
(Proxmox's EFI-disk copy; instar copies raw to raw in the kernel unasked), one run each.
Prints wall seconds and CPU seconds (user + system of the child) and the ratios qemu/instar (> 1: instar is
faster or cheaper).

    python3 bench/offload_bench.py [--instar build/bin/instar] [--only NAME]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_bench import CACHE, ROOT, make_sources, measure, settle  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instar", default=os.path.join(ROOT, "build", "bin", "instar"))
    ap.add_argument("--only")
    a = ap.parse_args()
    raw, q = make_sources()
    out = os.path.join(CACHE, "offload-out")
    cases = [
        ("raw->qcow2", ["-O", "qcow2", raw]),
        ("qcow2->raw", ["-O", "raw", q]),
        ("raw->raw", ["-O", "raw", raw]),
    ]
    print(f"{'case':<18} {'qemu wall':>9} {'instar':>8} {'ratio':>6}   {'qemu cpu':>8} {'instar':>8} {'ratio':>6}")
    for name, args in cases:
        for flags in ([], ["-C"]):
            label = name + (" -C" if flags else "")
            if a.only and a.only not in label:
                continue
            qw, qc = measure(["qemu-img", "convert", *flags, *args, out], out)
            iw, ic = measure([a.instar, "convert", *flags, *args, out], out)
            print(f"{label:<18} {qw:9.2f} {iw:8.2f} {qw / iw:6.2f}   {qc:8.2f} {ic:8.2f} {qc / max(ic, 1e-3):6.2f}",
                  flush=True)
    if not a.only or a.only in "dd raw->raw":
        argv = ["dd", "-f", "raw", "-O", "raw", "bs=1M", "if=" + raw, "of=" + out]
        qw, qc = measure(["qemu-img", *argv], out)
        iw, ic = measure([a.instar, *argv], out)
        print(f"{'dd raw->raw':<18} {qw:9.2f} {iw:8.2f} {qw / iw:6.2f}   {qc:8.2f} {ic:8.2f} {qc / max(ic, 1e-3):6.2f}",
              flush=True)
    settle(out)


if __name__ == "__main__":
    main()
