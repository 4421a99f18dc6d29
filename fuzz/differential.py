#!/usr/bin/env python3
"""Differential fuzzing: mutated images through qemu-img 7.2 and instar side by side.

For each format, small seed images are made with qemu-img/qemu-io, then mutated deterministically (byte flips,
interesting 2/4/8-byte values written over fields, truncation). Each mutant goes through `info --output=json`,
`map --output=json` and `convert -O raw` in both tools, each under `prlimit --as=1GiB --cpu=N` as VDSM runs
qemu-img on untrusted images. A finding is a mutant where

  - crash:   instar died of a signal (a trap: never acceptable),
  - rc:      one tool succeeded and the other failed,
  - output:  both succeeded and printed different JSON,
  - data:    both converted it and the raw bytes differ,
  - message: both failed with different error text (counted apart: wording, not behaviour).

Mutants both tools read alike are counted as accepted (every operation succeeded with equal results) or
rejected (both refused it with the same message).

Findings are copied to OUT/findings/<kind>/ with the commands' outputs, and the counts are printed at the end
(also as JSON with --json). Usage:

    python3 fuzz/differential.py [--count N] [--seed S] [--formats qcow2,vmdk,...] [--out DIR] [--json]
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTAR = os.path.join(os.environ.get("INSTAR_BUILD", os.path.join(ROOT, "build")), "bin", "instar")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
AS_LIMIT = 1 << 30

# format -> list of (name, virtual size, create options, qemu-io commands)
SEEDS = {
    "qcow2": [("data", "1M", "cluster_size=512", ["write -P 0xaa 0 4k", "write -z 8k 4k", "write -P 0x55 600k 1k"]),
              ("ext", "1M", "extended_l2=on,cluster_size=16k", ["write -P 0x11 0 2k", "write -z 16k 4k"]),
              ("v2", "1M", "compat=0.10,cluster_size=512", ["write -P 0xaa 0 4k"])],
    "qcow": [("data", "1M", "", ["write -P 0xaa 0 4k", "write -P 0x55 600k 1k"])],
    "qed": [("data", "1M", "cluster_size=4k", ["write -P 0xaa 0 4k", "write -P 0x55 600k 1k"])],
    "vdi": [("data", "256k", "", ["write -P 0xaa 0 4k"]), ("static", "64k", "static=on", ["write -P 0x55 0 1k"])],
    "vmdk": [("data", "1M", "", ["write -P 0xaa 0 4k"]),
             ("stream", "1M", "subformat=streamOptimized", ["write -P 0xaa 0 4k"])],
    "vpc": [("data", "1M", "", ["write -P 0xaa 0 4k"]), ("fixed", "64k", "subformat=fixed", ["write -P 0x55 0 1k"])],
    "vhdx": [("data", "1M", "block_size=1M,log_size=1M", ["write -P 0xaa 0 4k"])],
    "parallels": [("data", "1M", "cluster_size=4k", ["write -P 0xaa 0 4k", "write -z 8k 4k"])],
}

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 0x100000000, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF]


def make_seed(work, fmt, name, size, opts, cmds):
    path = os.path.join(work, f"seed-{fmt}-{name}.{fmt}")
    args = [QEMU_IMG, "create", "-q", "-f", fmt]
    if opts:
        args += ["-o", opts]
    subprocess.run(args + [path, size], check=True)
    if cmds and "subformat=streamOptimized" in opts:
        # streamOptimized images are written once: build it from a raw image by convert.
        raw = path + ".src"
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "raw", raw, size], check=True)
        for c in cmds:
            subprocess.run(["qemu-io", "-f", "raw", "-c", c, raw], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", fmt, "-o", opts, raw, path], check=True)
        os.unlink(raw)
        return path
    for c in cmds:
        subprocess.run(["qemu-io", "-f", fmt, "-c", c, path], check=True, stdout=subprocess.DEVNULL)
    return path


def mutate(data, rng):
    """One deterministic mutation of `data`, biased to the start of the file where the metadata lives."""
    b = bytearray(data)
    kind = rng.randrange(5)
    # Headers sit in the first sectors, tables in the first 64 KiB: most mutations land there.
    span = min(len(b), rng.choice([512, 4096, 4096, 65536, 65536, len(b)]))
    if not b:
        return bytes(b)
    if kind == 0:        # a few flipped bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(span)
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:      # random bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(span)] = rng.randrange(256)
    elif kind in (2, 3):  # an interesting value over an aligned field, either endianness
        width = rng.choice([2, 4, 8])
        i = rng.randrange(0, max(1, span - width + 1))
        i -= i % width
        v = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
        fmt = {2: "H", 4: "I", 8: "Q"}[width]
        struct.pack_into((">" if kind == 2 else "<") + fmt, b, i, v)
    else:                # truncation
        cut = rng.randrange(len(b))
        del b[cut:]
    return bytes(b)


def run(cmd, cpu, timeout):
    pre = ["prlimit", f"--as={AS_LIMIT}", f"--cpu={cpu}"]
    try:
        p = subprocess.run(pre + cmd, capture_output=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return "timeout", e.stdout or b"", e.stderr or b""


def normalise(text, path):
    """Messages with the image path and the program name (each tool prints its own, hints that name the tool
    included: "... with qemu-img check -r all") taken out."""
    text = text.replace(path.encode(), b"IMAGE").replace(b"instar check -r", b"qemu-img check -r")
    return b"\n".join(l.split(b": ", 1)[1] if l.startswith((b"qemu-img: ", b"instar: ")) else l
                      for l in text.split(b"\n"))


def compare(fmt, path, work, cpu, timeout):
    """The first difference between the tools on `path` as (kind, detail), or None."""
    for op in ("info", "map"):
        q = run([QEMU_IMG, op, "--output=json", "-f", fmt, path], cpu, timeout)
        i = run([INSTAR, op, "--output=json", "-f", fmt, path], cpu, timeout)
        if isinstance(i[0], int) and i[0] < 0:
            return "crash", f"{op}: instar died of signal {-i[0]}", q, i
        if i[0] == "timeout" and q[0] != "timeout":
            return "rc", f"{op}: instar timed out, qemu-img rc {q[0]}", q, i
        if (q[0] == 0) != (i[0] == 0):
            return "rc", f"{op}: qemu-img rc {q[0]}, instar rc {i[0]}", q, i
        if q[0] != 0:
            if normalise(q[2], path) != normalise(i[2], path):
                return "message", f"{op}: both failed, different messages", q, i
            return "rejected"
        if op == "info":
            # actual-size depends on how each tool's file was written: both read the same file here, so keep it.
            qs, is_ = json.loads(q[1]), json.loads(i[1])
            if qs != is_:
                return "output", f"{op}: JSON differs", q, i
        elif q[1] != i[1]:
            return "output", f"{op}: JSON differs", q, i
    qo, io_ = os.path.join(work, "q.raw"), os.path.join(work, "i.raw")
    for f in (qo, io_):
        if os.path.exists(f):
            os.unlink(f)
    q = run([QEMU_IMG, "convert", "-f", fmt, "-O", "raw", path, qo], cpu, timeout)
    i = run([INSTAR, "convert", "-f", fmt, "-O", "raw", path, io_], cpu, timeout)
    if isinstance(i[0], int) and i[0] < 0:
        return "crash", f"convert: instar died of signal {-i[0]}", q, i
    if (q[0] == 0) != (i[0] == 0):
        return "rc", f"convert: qemu-img rc {q[0]}, instar rc {i[0]}", q, i
    if q[0] == 0 and digest(qo) != digest(io_):
        return "data", "convert -O raw: bytes differ", q, i
    return "rejected" if q[0] != 0 else "accepted"


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200, help="mutants per seed (default 200)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--formats", default=",".join(SEEDS))
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "difffuzz"))
    ap.add_argument("--cpu", type=int, default=10, help="prlimit --cpu for each command (default 10)")
    ap.add_argument("--timeout", type=float, default=30.0, help="wall seconds per command (default 30)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not os.access(INSTAR, os.X_OK):
        sys.exit(f"differential: {INSTAR} is missing; run make first")
    rng = random.Random(args.seed)
    shutil.rmtree(os.path.join(args.out, "findings"), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    counts = {}
    total = 0
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        for fmt in args.formats.split(","):
            per = counts.setdefault(fmt, {"mutants": 0, "crash": 0, "rc": 0, "output": 0, "data": 0, "message": 0,
                                        "accepted": 0, "rejected": 0})
            for name, size, opts, cmds in SEEDS[fmt]:
                seed = open(make_seed(work, fmt, name, size, opts, cmds), "rb").read()
                for n in range(args.count):
                    path = os.path.join(work, f"m.{fmt}")
                    with open(path, "wb") as f:
                        f.write(mutate(seed, rng))
                    per["mutants"] += 1
                    total += 1
                    r = compare(fmt, path, work, args.cpu, args.timeout)
                    if isinstance(r, str):
                        per[r] += 1  # the same verdict from both: both read it alike, or both refused it
                        continue
                    kind, detail, q, i = r
                    per[kind] += 1
                    dest = os.path.join(args.out, "findings", kind, f"{fmt}-{name}-{n}")
                    os.makedirs(dest, exist_ok=True)
                    shutil.copy(path, os.path.join(dest, f"image.{fmt}"))
                    with open(os.path.join(dest, "report.txt"), "w") as f:
                        f.write(f"{detail}\n\n--- qemu-img rc {q[0]}\n{q[1].decode(errors='replace')}"
                                f"{q[2].decode(errors='replace')}\n--- instar rc {i[0]}\n"
                                f"{i[1].decode(errors='replace')}{i[2].decode(errors='replace')}")
                    if not args.json:
                        print(f"{kind:8} {fmt}-{name}-{n}: {detail}", flush=True)
    if args.json:
        print(json.dumps({"mutants": total, "formats": counts}, indent=2))
    else:
        print(f"\n{'format':10} {'mutants':>8} {'accepted':>9} {'rejected':>9} {'crash':>6} {'rc':>5} {'output':>7} "
              f"{'data':>5} {'message':>8}")
        for fmt, c in counts.items():
            print(f"{fmt:10} {c['mutants']:8} {c['accepted']:9} {c['rejected']:9} {c['crash']:6} {c['rc']:5} "
                  f"{c['output']:7} {c['data']:5} {c['message']:8}")
    return 1 if any(c["crash"] for c in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
