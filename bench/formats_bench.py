#!/usr/bin/env python3
"""Format benchmark (issue 10): qemu-img vs instar on the same conversions, in one run.

Source: convert_bench's 2 GiB image holding 1 GiB of random data, as raw, and made by qemu-img into a
streamOptimized vmdk and a vhdx (cached in /tmp/instar-bench). Cases: vmdk(streamOptimized)->raw,
raw->vmdk streamOptimized, vhdx->qcow2, parallels->raw, raw->parallels, raw->luks (aes-256-xts; iter-time=100 on both
sides, so the key slot's PBKDF2 does not dominate), raw->qcow and qcow->raw (qcow version 1, the source made by
qemu-img), and both directions for qed, vdi and vpc (issue 13's writable formats, and VHD). Prints wall seconds and CPU seconds (user + system of the child), median of --runs, and the ratios
qemu/instar (> 1: instar is faster or cheaper).

    python3 bench/formats_bench.py [--instar build/bin/instar] [--runs 1] [--only NAME]
"""
import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_bench import CACHE, ROOT, make_sources, measure, settle  # noqa: E402

SECRET = ["--object", "secret,id=sec0,data=instar-bench"]


def sources(raw):
    out = {}
    for name, args in (("stream.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
                       ("src.vhdx", ["-O", "vhdx"]), ("src.parallels", ["-O", "parallels"]),
                       ("src.qcow", ["-O", "qcow"]), ("src.qed", ["-O", "qed"]), ("src.vdi", ["-O", "vdi"]),
                       ("src.vpc", ["-O", "vpc"])):
        p = os.path.join(CACHE, name)
        if not os.path.exists(p):
            subprocess.run(["qemu-img", "convert", *args, raw, p + ".part"], check=True)
            os.rename(p + ".part", p)
        out[name] = p
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instar", default=os.path.join(ROOT, "build", "bin", "instar"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only")
    a = ap.parse_args()
    raw, _ = make_sources()
    src = sources(raw)
    out = os.path.join(CACHE, "formats-out")
    cases = [
        ("vmdk(stream)->raw", ["convert", "-f", "vmdk", "-O", "raw", src["stream.vmdk"], out]),
        ("raw->vmdk stream", ["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, out]),
        ("vhdx->qcow2", ["convert", "-f", "vhdx", "-O", "qcow2", src["src.vhdx"], out]),
        ("parallels->raw", ["convert", "-f", "parallels", "-O", "raw", src["src.parallels"], out]),
        ("raw->parallels", ["convert", "-f", "raw", "-O", "parallels", raw, out]),
        ("raw->luks", ["convert", *SECRET, "-f", "raw", "-O", "luks", "-o",
                       "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,iter-time=100", raw, out]),
        ("raw->qcow", ["convert", "-f", "raw", "-O", "qcow", raw, out]),
        ("qcow->raw", ["convert", "-f", "qcow", "-O", "raw", src["src.qcow"], out]),
    ]
    for fmt in ("qed", "vdi", "vpc"):
        cases.append((f"raw->{fmt}", ["convert", "-f", "raw", "-O", fmt, raw, out]))
        cases.append((f"{fmt}->raw", ["convert", "-f", fmt, "-O", "raw", src[f"src.{fmt}"], out]))
    print(f"{'case':<18} {'qemu wall':>9} {'instar':>8} {'ratio':>6}   {'qemu cpu':>8} {'instar':>8} {'ratio':>6}")
    for name, args in cases:
        if a.only and a.only not in name:
            continue
        q = [measure(["qemu-img", *args], out) for _ in range(a.runs)]
        i = [measure([a.instar, *args], out) for _ in range(a.runs)]
        qw, qc = statistics.median(x[0] for x in q), statistics.median(x[1] for x in q)
        iw, ic = statistics.median(x[0] for x in i), statistics.median(x[1] for x in i)
        print(f"{name:<18} {qw:9.2f} {iw:8.2f} {qw / iw:6.2f}   {qc:8.2f} {ic:8.2f} {qc / max(ic, 1e-3):6.2f}",
              flush=True)
    settle(out)


if __name__ == "__main__":
    main()
