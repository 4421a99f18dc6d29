"""qed: differential tests against qemu-img 7.2 on images qemu-img/qemu-io make (create, read, write through
convert/commit/rebase, the need-check flag, check -r, resize, backing chains) and hostile variants of the header
and tables. Where qemu's layout is deterministic (it always is for qed) the resulting files must be identical."""
import os
import re
import shutil
import signal
import struct
import sys
import subprocess

import pytest

from conftest import INSTAR, assert_same, both, info_json, instar, normalize, qemu, qemu_io, qimg, run

MiB = 1 << 20


def pair(tmp, files):
    """Copies `files` (names in tmp) into tmp/q and tmp/i; returns the two directories."""
    dirs = []
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        os.makedirs(d, exist_ok=True)
        for f in files:
            shutil.copyfile(os.path.join(tmp, f), os.path.join(d, f))
        dirs.append(d)
    return dirs


def same_write(tmp, files, *args, compare=(), guest_only=()):
    """Runs the same writing command in copies for both tools (cwd = the copy); messages, exit codes and the
    bytes of every file in `compare` (default: all) must match. Files in `guest_only` (written by qemu's
    mirror-based commit, whose parallel requests place clusters in no fixed order) must instead read the same
    guest data, check clean and show the same info."""
    dq, di = pair(tmp, files)
    q = qemu(*args, cwd=dq)
    i = instar(*args, cwd=di)
    # qemu names the node with two random digits (id_generate).
    q.err, i.err = (re.sub(r"#block\d+", "#blockNNN", r.err) for r in (q, i))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)
    for f in compare or sorted(set(os.listdir(dq)) | set(os.listdir(di))):
        a, b = os.path.join(dq, f), os.path.join(di, f)
        if f in guest_only:
            r = qemu("compare", a, b)
            assert r.rc == 0, r
            r = qemu("check", b)
            assert r.rc == 0, r
            assert info_json(a) == info_json(b)
            continue
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), f"{args}: {f} differs"
    return q


def reads_same(tmp, name, *fmt):
    for args in (["info", *fmt, name], ["info", "--output=json", *fmt, name], ["map", *fmt, name],
                 ["map", "--output=json", *fmt, name], ["check", *fmt, name],
                 ["check", "--output=json", *fmt, name], ["compare", *fmt, name, name]):
        assert_same(*args, cwd=tmp)
    for target in ("raw", "qcow2", "qed"):
        outs = []
        for who in ("q", "i"):
            out = os.path.join(tmp, f"conv-{who}.{target}")
            r = (qemu if who == "q" else instar)("convert", *fmt, "-O", target, name, out, cwd=tmp)
            assert r.rc == 0, r
            with open(out, "rb") as f:
                outs.append(f.read())
            os.unlink(out)
        assert outs[0] == outs[1], f"convert -O {target} differs"


def seeded(tmp, name="a.qed", size="64M", opts=None, ops=()):
    args = ["create", "-q", "-f", "qed"]
    if opts:
        args += ["-o", opts]
    qimg(*args, os.path.join(tmp, name), size)
    for op in ops:
        qemu_io("-f", "qed", "-c", op, os.path.join(tmp, name))
    return name


WRITES = ["write -P 0x11 0 1M", "write -P 0x22 5M 100k", "write -z 8M 1M", "write -P 0x33 8200k 7k",
          "write -z 20M 64k", "write -P 0x44 63M 1M", "write -P 0x55 30001k 3k"]


# --- create -------------------------------------------------------------------------------------------------

CREATE_CASES = [
    ["64M"],
    ["1G"],
    ["0"],
    ["1000"],
    ["-o", "cluster_size=4k", "10M"],
    ["-o", "cluster_size=1M,table_size=16", "100M"],
    ["-o", "table_size=2", "10M"],
    ["-o", "table_size=1", "10M"],
    ["-o", "cluster_size=3000", "10M"],
    ["-o", "cluster_size=2k", "10M"],
    ["-o", "cluster_size=128M", "10M"],
    ["-o", "table_size=3", "10M"],
    ["-o", "table_size=32", "10M"],
    ["-o", "cluster_size=4k,table_size=1", "1T"],
    ["-o", "cluster_size=4k,table_size=1", "2G"],
    ["-o", "help"],
    ["-o", "size=4M"],
]


@pytest.mark.parametrize("args", CREATE_CASES, ids=[" ".join(a) for a in CREATE_CASES])
def test_create(tmp, args):
    same_write(tmp, [], "create", "-f", "qed", *args[:-1], "img.qed", args[-1]) if args != ["-o", "help"] \
        else assert_same("create", "-f", "qed", "-o", "help", cwd=tmp)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "qed"])
def test_create_with_backing(tmp, fmt):
    qimg("create", "-q", "-f", fmt, os.path.join(tmp, f"base.{fmt}"), "32M")
    same_write(tmp, [f"base.{fmt}"], "create", "-f", "qed", "-b", f"base.{fmt}", "-F", fmt, "top.qed")
    same_write(tmp, [f"base.{fmt}"], "create", "-f", "qed", "-b", f"base.{fmt}", "-F", fmt, "top.qed", "64M")
    same_write(tmp, [f"base.{fmt}"], "create", "-f", "qed", "-b", f"base.{fmt}", "top.qed")


# --- reading ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [None, "cluster_size=4k", "cluster_size=4k,table_size=2",
                                  "cluster_size=1M,table_size=16"])
def test_read(tmp, opts):
    name = seeded(tmp, opts=opts, ops=WRITES)
    reads_same(tmp, name)
    reads_same(tmp, name, "-f", "qed")


def test_read_empty_and_zero_size(tmp):
    reads_same(tmp, seeded(tmp, "e.qed"))
    reads_same(tmp, seeded(tmp, "z.qed", size="0"))


def test_probe_and_help_list(tmp):
    r = instar("--help")
    assert " qed" in r.out.split("Supported formats:")[1]


# --- writing ------------------------------------------------------------------------------------------------

def qcow2_source(tmp):
    p = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "64M")
    for op in ["write -P 0x33 0 3M", "write -P 0x44 10M 64k", "write -z 20M 4M", "write -P 0x66 30M 5k",
               "write -P 0x77 63M 1M"]:
        qemu_io("-f", "qcow2", "-c", op, p)
    return "src.qcow2"


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=4k,table_size=1"],
                                  ["-o", "table_size=16"], ["-S", "0"], ["-c"]])
def test_convert_to_qed(tmp, opts):
    src = qcow2_source(tmp)
    same_write(tmp, [src], "convert", *opts, "-O", "qed", src, "out.qed")


def test_convert_into_existing(tmp):
    """convert -n: zero ranges are written as zero clusters (aligned) or zero buffers."""
    src = qcow2_source(tmp)
    seeded(tmp, "out.qed", ops=["write -P 0x99 0 64M"])
    seeded(tmp, "empty.qed", opts="cluster_size=4k")
    same_write(tmp, [src, "out.qed"], "convert", "-n", "-O", "qed", src, "out.qed")
    same_write(tmp, [src, "empty.qed"], "convert", "-n", "-O", "qed", src, "empty.qed")


def test_convert_with_backing_target(tmp):
    src = qcow2_source(tmp)
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "base.qcow2"), "64M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x12 0 2M", os.path.join(tmp, "base.qcow2"))
    same_write(tmp, [src, "base.qcow2"], "convert", "-O", "qed", "-B", "base.qcow2", "-F", "qcow2", src, "out.qed")


def chain(tmp, base_fmt="qcow2"):
    base = f"base.{base_fmt}"
    qimg("create", "-q", "-f", base_fmt, os.path.join(tmp, base), "32M")
    qemu_io("-f", base_fmt, "-c", "write -P 0x21 0 32M", os.path.join(tmp, base))
    qimg("create", "-q", "-f", "qed", "-b", base, "-F", base_fmt, os.path.join(tmp, "top.qed"))
    for op in ["write -P 0x31 100k 10k", "write -z 4M 64k", "write -P 0x32 7M 1M", "write -P 0x33 31M 3000"]:
        qemu_io("-c", op, os.path.join(tmp, "top.qed"))
    return base


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2", "qed"])
def test_chain_reads(tmp, base_fmt):
    chain(tmp, base_fmt)
    reads_same(tmp, "top.qed")
    assert_same("info", "--backing-chain", "top.qed", cwd=tmp)
    assert_same("info", "--backing-chain", "--output=json", "top.qed", cwd=tmp)


@pytest.mark.parametrize("base_fmt", ["qcow2", "qed"])
def test_commit_into_base(tmp, base_fmt):
    base = chain(tmp, base_fmt)
    same_write(tmp, [base, "top.qed"], "commit", "top.qed", guest_only=(base,))


def test_commit_qcow2_top_into_qed_base(tmp):
    seeded(tmp, "base.qed", ops=["write -P 0x41 0 2M"])
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qed", "-F", "qed", os.path.join(tmp, "top.qcow2"))
    for op in ["write -P 0x51 1M 3M", "write -z 10M 1M", "write -P 0x52 40M 10k"]:
        qemu_io("-c", op, os.path.join(tmp, "top.qcow2"))
    same_write(tmp, ["base.qed", "top.qcow2"], "commit", "top.qcow2", guest_only=("base.qed",))


def test_rebase(tmp):
    base = chain(tmp, "qcow2")
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "other.raw"), "32M")
    files = [base, "top.qed", "other.raw"]
    same_write(tmp, files, "rebase", "-u", "-b", "other.raw", "-F", "raw", "top.qed")
    same_write(tmp, files, "rebase", "-u", "-b", "", "top.qed")
    same_write(tmp, files, "rebase", "-b", "other.raw", "-F", "raw", "top.qed")
    same_write(tmp, files, "rebase", "-b", "", "top.qed")


# --- resize -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["+1M"], ["1G"], ["+1000"], ["--shrink", "1M"], ["--preallocation=full", "+1M"],
                                  ["64M"], ["100T"]])
def test_resize(tmp, args):
    seeded(tmp, ops=["write -P 0x11 0 1M"])
    same_write(tmp, ["a.qed"], "resize", "a.qed", *args)


def test_resize_over_longer_backing(tmp):
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "b.raw"), "8M")
    qimg("create", "-q", "-f", "qed", "-b", "b.raw", "-F", "raw", os.path.join(tmp, "t.qed"), "4M")
    same_write(tmp, ["b.raw", "t.qed"], "resize", "t.qed", "+1M")


# --- need-check flag and check ------------------------------------------------------------------------------

def header(path):
    with open(path, "rb") as f:
        return list(struct.unpack("<IIIIQQQQQII", f.read(64)))


def put_header(path, h):
    with open(path, "r+b") as f:
        f.write(struct.pack("<IIIIQQQQQII", *h))


def poke(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def l2_offset(path, index=0):
    h = header(path)
    with open(path, "rb") as f:
        f.seek(h[7] + 8 * index)
        return struct.unpack("<Q", f.read(8))[0]


def damaged(tmp, kind):
    """An image with the need-check flag set and one kind of damage."""
    name = seeded(tmp, opts="cluster_size=4k", ops=["write -P 0x11 0 40k", "write -P 0x22 9M 8k"])
    p = os.path.join(tmp, name)
    h = header(p)
    h[4] |= 2
    put_header(p, h)
    l2 = l2_offset(p)
    size = os.path.getsize(p)
    if kind == "leak":
        with open(p, "ab") as f:
            f.write(b"\x01" * 3 * 4096)
    elif kind == "l2-entry-past-eof":
        poke(p, l2 + 8 * 3, "<Q", size + 4096 * 10)
    elif kind == "l2-entry-misaligned":
        poke(p, l2 + 8 * 2, "<Q", 4096 * 3 + 100)
    elif kind == "l2-entry-duplicate":
        with open(p, "rb") as f:
            f.seek(l2)
            first = struct.unpack("<Q", f.read(8))[0]
        poke(p, l2 + 8 * 5, "<Q", first)
    elif kind == "l1-entry-past-eof":
        poke(p, h[7] + 8 * 1, "<Q", size * 4)
    elif kind == "l1-entry-points-at-l1":
        poke(p, h[7] + 8 * 1, "<Q", h[7])
    return name


KINDS = ["clean", "leak", "l2-entry-past-eof", "l2-entry-misaligned", "l2-entry-duplicate", "l1-entry-past-eof",
         "l1-entry-points-at-l1"]


@pytest.mark.parametrize("kind", KINDS)
def test_need_check_reads(tmp, kind):
    name = damaged(tmp, kind)
    for args in (["info", name], ["info", "--output=json", name], ["check", name],
                 ["check", "--output=json", name], ["map", "--output=json", name], ["compare", name, name],
                 ["convert", "-O", "raw", name, "out.raw"]):
        q, i = both(*args, cwd=tmp)
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("repair", ["all", "leaks", "errors"])
def test_check_repair(tmp, kind, repair):
    name = damaged(tmp, kind)
    same_write(tmp, [name], "check", "-r", repair, name)


@pytest.mark.parametrize("kind", KINDS)
def test_open_writable_runs_check(tmp, kind):
    """A writer opening an image with the need-check flag repairs it first (here: resize, and convert -n into it)."""
    name = damaged(tmp, kind)
    same_write(tmp, [name], "resize", name, "+1M")
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "src.raw"), "64M")
    same_write(tmp, [name, "src.raw"], "convert", "-n", "-O", "qed", "src.raw", name)


def test_autoclear_bits_cleared_by_writer(tmp):
    name = seeded(tmp, ops=["write -P 0x11 0 1M"])
    p = os.path.join(tmp, name)
    h = header(p)
    h[6] = 0xF0
    put_header(p, h)
    reads_same(tmp, name)
    same_write(tmp, [name], "resize", name, "+1M")


# --- hostile variants ---------------------------------------------------------------------------------------

def _hostile(tmp, field, value):
    name = seeded(tmp, opts="cluster_size=4k", ops=["write -P 0x11 0 40k", "write -P 0x22 9M 8k"])
    p = os.path.join(tmp, name)
    h = header(p)
    if field == "truncated":
        with open(p, "r+b") as f:
            f.truncate(value)
        return name
    if field == "l2":
        poke(p, l2_offset(p), "<Q", value)
        return name
    if field == "l1":
        poke(p, h[7], "<Q", value)
        return name
    idx = ["magic", "cluster", "table", "header_size", "features", "compat", "autoclear", "l1_offset",
           "image_size", "backing_offset", "backing_size"].index(field)
    h[idx] = value
    if field in ("backing_offset", "backing_size"):
        h[4] |= 1
    put_header(p, h)
    return name


HOSTILE = [
    ("magic", 0x12345678), ("cluster", 0), ("cluster", 3000), ("cluster", 1 << 31), ("cluster", 64 << 20),
    ("table", 0), ("table", 3), ("table", 1 << 31), ("header_size", 0), ("header_size", 0xFFFFFFFF),
    ("header_size", 1 << 20), ("features", 0x08), ("features", 0xFFFF), ("features", 0x02),
    ("l1_offset", 0), ("l1_offset", 100), ("l1_offset", 1 << 62), ("l1_offset", 0xFFFFFFFFFFFFF000),
    ("image_size", 1 << 62), ("image_size", 1001), ("image_size", 0), ("backing_offset", 0xFFFFFFFF),
    ("backing_size", 0xFFFFFFFF), ("backing_size", 5000), ("l2", 1 << 60), ("l2", 4097), ("l2", 0xFFFFFFFFFFFFF000),
    ("l1", 1 << 60), ("l1", 4096), ("l1", 4097), ("l1", 0xFFFFFFFFFFFFF000), ("truncated", 10),
    ("truncated", 64), ("truncated", 5000), ("truncated", 8192 + 100),
]
READ_CMDS = [["info", "IMG"], ["info", "--output=json", "IMG"], ["map", "--output=json", "IMG"],
             ["convert", "-O", "raw", "IMG", "out.raw"], ["compare", "IMG", "IMG"], ["check", "IMG"],
             ["info", "-f", "qed", "IMG"]]
WRITE_CMDS = [["check", "-r", "all", "IMG"], ["resize", "IMG", "+1M"], ["rebase", "-u", "-b", "", "IMG"],
              ["convert", "-n", "-O", "qed", "IMG", "IMG"]]


def limited(args, cwd, tool):
    argv = ["prlimit", "--as=%d" % (1 << 30), "--cpu=20", "--", INSTAR] if tool == "i" else ["qemu-img"]
    p = subprocess.run(argv + args, cwd=cwd, capture_output=True, text=True, timeout=600, errors="replace")
    return p.returncode, normalize(p.stdout), normalize(p.stderr)


@pytest.mark.parametrize("field,value", HOSTILE, ids=[f"{f}={v:#x}" for f, v in HOSTILE])
def test_hostile(tmp, field, value):
    name = _hostile(tmp, field, value)
    for cmd in READ_CMDS:
        args = [name if a == "IMG" else a for a in cmd]
        q = limited(args, tmp, "q")
        i = limited(args, tmp, "i")
        assert 0 <= i[0] < 128 and "Fatal error" not in i[2], (args, i)
        # Tables over 128 MiB (64 MiB clusters) are refused by instar where qemu reads them.
        if field == "cluster" and value == 64 << 20:
            assert i[0] != 0 and i[2].startswith("instar: ")
            continue
        assert i == q, (args, q, i)
    for cmd in WRITE_CMDS:
        results = []
        for who in ("q", "i"):
            d = os.path.join(tmp, "w" + who)
            os.makedirs(d, exist_ok=True)
            shutil.copyfile(os.path.join(tmp, name), os.path.join(d, name))
            args = [name if a == "IMG" else a for a in cmd]
            results.append(limited(args, d, who))
            with open(os.path.join(d, name), "rb") as f:
                results.append(f.read())
        qr, qb, ir, ib = results
        assert 0 <= ir[0] < 128 and "Fatal error" not in ir[2], (cmd, ir)
        if field == "cluster" and value == 64 << 20:
            continue
        if "probing guessed raw" in qr[2] and cmd[0] == "check":
            # instar's check (any format) does not print qemu's raw-probing warning: not a qed matter.
            continue
        assert ir == qr, (cmd, qr, ir)
        assert ib == qb, (cmd, "image bytes differ")


@pytest.mark.parametrize("args", [["amend", "-o", "cluster_size=4k", "IMG"], ["snapshot", "-c", "s", "IMG"],
                                  ["snapshot", "-l", "IMG"], ["measure", "-O", "qed", "IMG"],
                                  ["measure", "-O", "qed", "--size", "1G"], ["bitmap", "--add", "IMG", "b"],
                                  ["commit", "IMG"], ["resize", "--preallocation=metadata", "IMG", "+1M"]])
def test_refused(tmp, args):
    """Operations qemu-img 7.2 cannot do on qed answer with its message and exit code, the image untouched."""
    name = seeded(tmp, ops=["write -P 0x11 0 1M"])
    same_write(tmp, [name], *[name if a == "IMG" else a for a in args])


# --- crash consistency --------------------------------------------------------------------------------------

CRASH_CHILD = r"""
import os, random, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bindings", "python"))
import instar
path, size, cluster, seed, stop_after = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
r = random.Random(seed)
img = instar.Image(path, flags=instar.OPEN_READ_WRITE)
for i in range(100000):
    if i == stop_after:
        os.kill(os.getpid(), signal.SIGKILL)
    c = r.randrange(size // cluster)
    n = r.randrange(1, 4) * cluster
    off = min(c * cluster + r.randrange(cluster), size - 1)
    n = min(n, size - off)
    if r.random() < 0.8:
        img.write(off, bytes([r.randrange(1, 256)]) * n)
    else:
        img.write_zeroes(off, n, may_unmap=False)
"""


@pytest.mark.parametrize("backing", [False, True])
def test_sigkill_leaves_no_corruption(tmp, backing):
    """A writer killed part way leaves an image qemu-img check finds free of corruption (leaks allowed), and
    which qemu's own writable open (check -r) then accepts."""
    from conftest import ROOT  # noqa: E402
    size, cluster = 16 << 20, 4096
    if backing:
        qimg("create", "-q", "-f", "raw", os.path.join(tmp, "b.raw"), str(size))
        qemu_io("-f", "raw", "-c", f"write -P 0x5a 0 {size}", os.path.join(tmp, "b.raw"))
    for n in (1, 5, 20, 60, 150):
        path = os.path.join(tmp, f"n{n}.qed")
        extra = ["-b", "b.raw", "-F", "raw"] if backing else []
        qimg("create", "-q", "-f", "qed", "-o", "cluster_size=4k",
             *extra, path, str(size))
        p = subprocess.run([sys.executable, "-c", CRASH_CHILD, ROOT, path, str(size), str(cluster), str(n), str(n)],
                           capture_output=True, cwd=tmp, timeout=300)
        assert p.returncode == -signal.SIGKILL, p
        c = run(["qemu-img", "check", path])
        assert c.rc in (0, 3), c
        assert "ERROR" not in c.out and "corruption" not in c.out.lower(), c.out
        c = run(["qemu-img", "check", "-r", "all", path])
        assert c.rc in (0, 3), c


# --- guest writes through the library against qemu-io --------------------------------------------------------

def _ops(seed, size, count=60):
    import random
    r = random.Random(seed)
    ops = []
    for _ in range(count):
        off = r.randrange(size - 1)
        n = min(r.choice([1, 100, 511, 512, 4096, 5000, 65536, 70000, 1 << 20]), size - off)
        if r.random() < 0.75:
            ops.append(("w", off, n, r.randrange(1, 256)))
        else:
            a = off - off % 4096 if r.random() < 0.5 else off
            ops.append(("z", a, min(n, size - a), 0))
    return ops


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("backing", [False, True])
def test_library_writes_match_qemu_io(tmp, seed, backing):
    """The same unaligned writes and zero writes, through qemu-io and through instar's Python binding, give
    byte-identical qed files (qemu's block layer pads to sectors; instar writes bytes: the result is the same)."""
    size = 24 << 20
    extra = []
    if backing:
        qimg("create", "-q", "-f", "raw", os.path.join(tmp, "b.raw"), str(size))
        qemu_io("-f", "raw", "-c", f"write -P 0x5a 0 {size}", os.path.join(tmp, "b.raw"))
        extra = ["-b", "b.raw", "-F", "raw"]
    for name in ("q.qed", "i.qed"):
        qimg("create", "-q", "-f", "qed", "-o", "cluster_size=4k", *extra, os.path.join(tmp, name), str(size))
    ops = _ops(seed, size)
    script = []
    for kind, off, n, pat in ops:
        script += ["-c", f"write -P {pat} {off} {n}" if kind == "w" else f"write -z {off} {n}"]
    qemu_io(*script, os.path.join(tmp, "q.qed"))
    import instar as lib
    img = lib.Image(os.path.join(tmp, "i.qed"), flags=lib.OPEN_READ_WRITE)
    try:
        for kind, off, n, pat in ops:
            if kind == "w":
                img.write(off, bytes([pat]) * n)
            else:
                img.write_zeroes(off, n, may_unmap=False)
    finally:
        img.close()
    with open(os.path.join(tmp, "q.qed"), "rb") as a, open(os.path.join(tmp, "i.qed"), "rb") as b:
        assert a.read() == b.read()
