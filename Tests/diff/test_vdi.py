"""vdi: differential tests against qemu-img 7.2 on images qemu-img/qemu-io make (dynamic and static; create,
read, writes through convert and commit, check, the refused resize/measure/check -r) and hostile headers and
block maps. vdi headers carry two random UUIDs (bytes 0x188..0x1a8): files are compared with them masked."""
import hashlib
import os
import shutil
import struct
import subprocess

import pytest

from conftest import INSTAR, assert_same, both, info_json, instar, normalize, qemu, qemu_io, qimg

MiB = 1 << 20
UUIDS = slice(0x188, 0x1A8)


def masked(path):
    """The file's contents with the UUIDs zeroed, as a digest of its data extents (holes read as zeroes; a
    hostile block map can make a writer put a block 100 GB into a sparse file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(str(size).encode())
        pos, done = 0, -1
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            # 1 MiB blocks on a fixed grid, so that where a writer left holes does not matter.
            b = pos - pos % MiB
            while b < end:
                if b > done:
                    chunk = bytearray(os.pread(fd, MiB, b))
                    if b == 0 and len(chunk) >= 0x1A8:
                        chunk[UUIDS] = bytes(0x20)
                    if chunk.strip(b"\0"):
                        h.update(str(b).encode() + b":" + bytes(chunk))
                    done = b
                b += MiB
            pos = max(end, b)
    return h.hexdigest()


def same_write(tmp, files, *args, guest_only=()):
    """Runs the same writing command on copies for both tools (cwd = the copy): messages, exit codes and every
    file (UUIDs masked) must match; files in `guest_only` must read the same guest data."""
    dirs = []
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
        for f in files:
            shutil.copyfile(os.path.join(tmp, f), os.path.join(d, f))
        dirs.append(d)
    dq, di = dirs
    q = qemu(*args, cwd=dq)
    i = instar(*args, cwd=di)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)
    for f in sorted(set(os.listdir(dq)) | set(os.listdir(di))):
        a, b = os.path.join(dq, f), os.path.join(di, f)
        if f in guest_only:
            r = qemu("compare", a, b)
            assert r.rc == 0, r
            assert info_json(a) == info_json(b)
            continue
        assert masked(a) == masked(b), f"{args}: {f} differs"
        assert os.path.getsize(a) == os.path.getsize(b)
    return q


def seeded(tmp, name="a.vdi", size="16M", static=False, ops=()):
    args = ["create", "-q", "-f", "vdi"]
    if static:
        args += ["-o", "static=on"]
    qimg(*args, os.path.join(tmp, name), size)
    for op in ops:
        qemu_io("-f", "vdi", "-c", op, os.path.join(tmp, name))
    return name


WRITES = ["write -P 0x11 0 100k", "write -P 0x22 3M 1M", "write -P 0x33 2100k 10k", "write -z 9M 2M",
          "write -P 0x44 15M 1M", "write -P 0x55 7M 3000"]


def reads_same(tmp, name, *fmt):
    for args in (["info", *fmt, name], ["info", "--output=json", *fmt, name], ["map", *fmt, name],
                 ["map", "--output=json", *fmt, name], ["check", *fmt, name],
                 ["check", "--output=json", *fmt, name], ["compare", *fmt, name, name]):
        assert_same(*args, cwd=tmp)
    for target in ("raw", "qcow2", "vdi"):
        outs = []
        for who in ("q", "i"):
            out = os.path.join(tmp, f"conv-{who}.{target}")
            r = (qemu if who == "q" else instar)("convert", *fmt, "-O", target, name, out, cwd=tmp)
            assert r.rc == 0, r
            outs.append(masked(out))
            os.unlink(out)
        assert outs[0] == outs[1], f"convert -O {target} differs"


CREATE_CASES = [["16M"], ["0"], ["1000"], ["1G"], ["-o", "static=on", "3M"], ["-o", "static=on", "0"],
                ["-o", "static=on", "1000"], ["-o", "cluster_size=2M", "3M"], ["-o", "static=on,size=5M"],
                ["-o", "preallocation=metadata", "3M"], ["3000T"], ["2047T"]]


@pytest.mark.parametrize("args", CREATE_CASES, ids=[" ".join(a) for a in CREATE_CASES])
def test_create(tmp, args):
    if args[-1].startswith("-o") or "=" in args[-1]:
        same_write(tmp, [], "create", "-f", "vdi", *args, "img.vdi")
    else:
        same_write(tmp, [], "create", "-f", "vdi", *args[:-1], "img.vdi", args[-1])


def test_create_help(tmp):
    assert_same("create", "-f", "vdi", "-o", "help", cwd=tmp)


@pytest.mark.parametrize("static", [False, True])
def test_read(tmp, static):
    name = seeded(tmp, static=static, ops=WRITES)
    reads_same(tmp, name)
    reads_same(tmp, name, "-f", "vdi")


def test_read_empty(tmp):
    reads_same(tmp, seeded(tmp, "e.vdi"))
    reads_same(tmp, seeded(tmp, "z.vdi", size="0"))
    reads_same(tmp, seeded(tmp, "s.vdi", size="3M", static=True))


def test_help_lists_vdi(tmp):
    assert " vdi" in instar("--help").out.split("Supported formats:")[1]


def qcow2_source(tmp):
    p = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "16M")
    for op in ["write -P 0x33 0 3M", "write -P 0x44 10M 64k", "write -z 5M 4M", "write -P 0x66 12M 5k"]:
        qemu_io("-f", "qcow2", "-c", op, p)
    return "src.qcow2"


@pytest.mark.parametrize("opts", [[], ["-o", "static=on"], ["-S", "0"], ["-o", "static=on", "-S", "0"]])
def test_convert_to_vdi(tmp, opts):
    src = qcow2_source(tmp)
    same_write(tmp, [src], "convert", *opts, "-O", "vdi", src, "out.vdi")


@pytest.mark.parametrize("static", [False, True])
def test_convert_into_existing(tmp, static):
    src = qcow2_source(tmp)
    seeded(tmp, "out.vdi", static=static, ops=["write -P 0x99 1M 2M"])
    same_write(tmp, [src, "out.vdi"], "convert", "-n", "-O", "vdi", src, "out.vdi")


def test_commit_into_vdi_base(tmp):
    seeded(tmp, "base.vdi", ops=["write -P 0x41 0 2M"])
    qimg("create", "-q", "-f", "qcow2", "-b", "base.vdi", "-F", "vdi", os.path.join(tmp, "top.qcow2"))
    for op in ["write -P 0x51 1M 3M", "write -P 0x52 12M 10k"]:
        qemu_io("-c", op, os.path.join(tmp, "top.qcow2"))
    same_write(tmp, ["base.vdi", "top.qcow2"], "commit", "top.qcow2", guest_only=("base.vdi",))
    reads_same(os.path.join(tmp, "i"), "base.vdi")


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("args", [["resize", "IMG", "32M"], ["check", "-r", "all", "IMG"],
                                  ["check", "-r", "leaks", "IMG"], ["amend", "-o", "static=on", "IMG"],
                                  ["snapshot", "-c", "s", "IMG"], ["rebase", "-u", "-b", "", "IMG"],
                                  ["measure", "-O", "vdi", "IMG"], ["commit", "IMG"]])
def test_refused(tmp, static, args):
    name = seeded(tmp, static=static, ops=["write -P 0x11 0 1M"])
    same_write(tmp, [name], *[name if a == "IMG" else a for a in args])


# --- check and hostile variants -----------------------------------------------------------------------------

def poke(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def variant(tmp, field, value):
    name = seeded(tmp, size="8M", ops=["write -P 0x11 0 1M", "write -P 0x22 3M 1M", "write -P 0x33 6M 10k"])
    p = os.path.join(tmp, name)
    fields = {"signature": (0x40, "<I"), "version": (0x44, "<I"), "type": (0x4C, "<I"),
              "bmap_offset": (0x154, "<I"), "data_offset": (0x158, "<I"), "sector_size": (0x168, "<I"),
              "disk_size": (0x170, "<Q"), "block_size": (0x178, "<I"), "blocks": (0x180, "<I"),
              "allocated": (0x184, "<I"), "link": (0x1A8, "<Q"), "parent": (0x1B8, "<Q"),
              "bmap0": (0x200, "<I"), "bmap3": (0x20C, "<I"), "bmap6": (0x218, "<I")}
    if field == "truncated":
        with open(p, "r+b") as f:
            f.truncate(value)
    else:
        off, fmt = fields[field]
        poke(p, off, fmt, value)
    return name


HOSTILE = [
    ("signature", 0), ("version", 0x00010000), ("version", 0x00020001), ("type", 0), ("type", 2), ("type", 99),
    ("bmap_offset", 0x201), ("bmap_offset", 0xFFFFFE00), ("data_offset", 0x333), ("data_offset", 0xFFFFFE00),
    ("sector_size", 4096), ("disk_size", 8 * MiB + 1), ("disk_size", 9 * MiB), ("disk_size", 1 << 63),
    ("disk_size", 0), ("block_size", 4096), ("block_size", 0), ("blocks", 0), ("blocks", 0xFFFFFFFF),
    ("blocks", 0x7FFFFFF0 // 4), ("blocks", 100000), ("allocated", 0), ("allocated", 0xFFFFFFFD),
    ("allocated", 0xFFFFFFFF), ("link", 1), ("parent", 1), ("bmap0", 1), ("bmap0", 7), ("bmap0", 8),
    ("bmap0", 0xFFFFFFFE), ("bmap0", 0xFFFFFFFD), ("bmap3", 0), ("bmap6", 100000), ("truncated", 10),
    ("truncated", 600), ("truncated", 0x200 + 1000), ("truncated", 3 * MiB),
]
READ_CMDS = [["info", "IMG"], ["info", "--output=json", "IMG"], ["map", "--output=json", "IMG"],
             ["convert", "-O", "raw", "IMG", "out.raw"], ["compare", "IMG", "IMG"], ["check", "IMG"],
             ["check", "--output=json", "IMG"], ["info", "-f", "vdi", "IMG"]]
WRITE_CMDS = [["convert", "-n", "-O", "vdi", "src.raw", "IMG"]]


def limited(args, cwd, tool):
    argv = ["prlimit", "--as=%d" % (1 << 30), "--cpu=20", "--", INSTAR] if tool == "i" else ["qemu-img"]
    p = subprocess.run(argv + args, cwd=cwd, capture_output=True, text=True, timeout=600, errors="replace")
    return p.returncode, normalize(p.stdout), normalize(p.stderr)


# instar refuses block maps over 32 Mi entries (128 MiB) that qemu reads (up to 2 GiB).
BIG_MAP = {("blocks", 0xFFFFFFFF), ("blocks", 0x7FFFFFF0 // 4)}


@pytest.mark.parametrize("field,value", HOSTILE, ids=[f"{f}={v:#x}" for f, v in HOSTILE])
def test_hostile(tmp, field, value):
    name = variant(tmp, field, value)
    for cmd in READ_CMDS:
        args = [name if a == "IMG" else a for a in cmd]
        q = limited(args, tmp, "q")
        i = limited(args, tmp, "i")
        assert 0 <= i[0] < 128 and "Fatal error" not in i[2], (args, i)
        if (field, value) in BIG_MAP and q[0] == 0:
            assert i[0] != 0 and i[2].startswith("instar: ")
            continue
        assert i == q, (args, q, i)
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "src.raw"), "8M")
    qemu_io("-f", "raw", "-c", "write -P 0x77 2M 3M", os.path.join(tmp, "src.raw"))
    for cmd in WRITE_CMDS:
        results = []
        for who in ("q", "i"):
            d = os.path.join(tmp, "w" + who)
            os.makedirs(d, exist_ok=True)
            for f in (name, "src.raw"):
                shutil.copyfile(os.path.join(tmp, f), os.path.join(d, f))
            args = [name if a == "IMG" else a for a in cmd]
            results.append(limited(args, d, who))
            results.append(masked(os.path.join(d, name)))
        qr, qb, ir, ib = results
        assert 0 <= ir[0] < 128 and "Fatal error" not in ir[2], (cmd, ir)
        if (field, value) in BIG_MAP and qr[0] == 0:
            continue
        if "probing guessed raw" in qr[2]:
            continue
        assert ir == qr, (cmd, qr, ir)
        assert ib == qb, (cmd, "image bytes differ")


CRASH_CHILD = r"""
import os, random, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bindings", "python"))
import instar
path, size, seed, stop_after = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
r = random.Random(seed)
img = instar.Image(path, flags=instar.OPEN_READ_WRITE)
for i in range(100000):
    if i == stop_after:
        os.kill(os.getpid(), signal.SIGKILL)
    off = r.randrange(size - 1)
    n = min(r.randrange(1, 3 << 20), size - off)
    img.write(off, bytes([r.randrange(1, 256)]) * n)
"""


@pytest.mark.parametrize("static", [False, True])
def test_sigkill_leaves_no_corruption(tmp, static):
    """A writer killed part way leaves an image whose block map agrees with its header (qemu-img check)."""
    import signal
    import sys
    from conftest import ROOT, run  # noqa: E402
    size = 64 << 20
    for n in (1, 3, 10, 30):
        path = seeded(tmp, f"n{n}.vdi", size=str(size), static=static)
        p = subprocess.run([sys.executable, "-c", CRASH_CHILD, ROOT, os.path.join(tmp, path), str(size), str(n),
                            str(n)], capture_output=True, cwd=tmp, timeout=300)
        assert p.returncode == -signal.SIGKILL, p
        c = run(["qemu-img", "check", os.path.join(tmp, path)])
        assert c.rc == 0, c


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("static", [False, True])
def test_library_writes_match_qemu_io(tmp, seed, static):
    """The same unaligned writes and zero writes through qemu-io and through instar's Python binding give the
    same vdi file (UUIDs masked)."""
    import random
    import instar as lib
    size = 24 << 20
    r = random.Random(seed)
    ops = []
    for _ in range(40):
        off = r.randrange(size - 1)
        n = min(r.choice([1, 100, 512, 5000, 1 << 20, 3 << 20]), size - off)
        ops.append(("w" if r.random() < 0.75 else "z", off, n, r.randrange(1, 256)))
    for name in ("q.vdi", "i.vdi"):
        seeded(tmp, name, size=str(size), static=static)
    script = []
    for kind, off, n, pat in ops:
        script += ["-c", f"write -P {pat} {off} {n}" if kind == "w" else f"write -z {off} {n}"]
    qemu_io(*script, os.path.join(tmp, "q.vdi"))
    img = lib.Image(os.path.join(tmp, "i.vdi"), flags=lib.OPEN_READ_WRITE)
    try:
        for kind, off, n, pat in ops:
            if kind == "w":
                img.write(off, bytes([pat]) * n)
            else:
                img.write_zeroes(off, n, may_unmap=False)
    finally:
        img.close()
    assert masked(os.path.join(tmp, "q.vdi")) == masked(os.path.join(tmp, "i.vdi"))
