"""qcow2 writing: the same deterministic sequence of writes, zero writes and discards goes through instar (Python
binding) on one copy of an image and through qemu-io on another. Then qemu-img check must find instar's image
clean (no errors, no leaks), qemu-img compare must call both identical, and their raw conversions must match.
"""
import os
import random
import shutil
import zlib

import pytest

from conftest import qimg, run
from imgs import apply_ops, make_ops, qemu_io_script

import instar

MiB = 1 << 20




def apply_instar(path, ops, fmt="qcow2"):
    with instar.Image(path, format=fmt, flags=instar.OPEN_READ_WRITE) as img:
        apply_ops(img, ops, flush_every=50)


def apply_qemu(path, ops, tmp):
    r = run(["qemu-io", "-f", "qcow2", "-d", "unmap", path], input=qemu_io_script(ops))
    assert r.rc == 0, r
    assert "error" not in r.out.lower() and "failed" not in r.out.lower(), r.out[-2000:]


def verify(tmp, mine, theirs, cluster):
    c = run(["qemu-img", "check", mine])
    assert c.rc == 0, c
    assert "No errors were found" in c.out and "leaked" not in c.out, c.out
    cmp = run(["qemu-img", "compare", mine, theirs])
    assert cmp.rc == 0, cmp
    a, b = os.path.join(tmp, "mine.raw"), os.path.join(tmp, "theirs.raw")
    qimg("convert", "-O", "raw", mine, a)
    qimg("convert", "-O", "raw", theirs, b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    # Allocation close to qemu's: the image may not end more than a few clusters after qemu's.
    assert os.path.getsize(mine) <= os.path.getsize(theirs) + 8 * cluster + 2 * MiB // 16


LAYOUTS = [
    # id, create options, size, cluster
    ("v2-64k", "compat=0.10", 32 * MiB, 65536),
    ("v3-512", "cluster_size=512", 4 * MiB, 512),
    ("v3-4k", "cluster_size=4096", 16 * MiB, 4096),
    ("v3-64k", "", 32 * MiB, 65536),
    ("v3-2M", "cluster_size=2M", 64 * MiB, 2 * MiB),
    ("ext-l2-64k", "extended_l2=on", 32 * MiB, 65536),
    ("ext-l2-16k", "extended_l2=on,cluster_size=16k", 16 * MiB, 16384),
    ("refbits-1", "refcount_bits=1,cluster_size=4096", 16 * MiB, 4096),
    ("refbits-64", "refcount_bits=64,cluster_size=4096", 16 * MiB, 4096),
    ("lazy", "lazy_refcounts=on", 32 * MiB, 65536),
    ("prealloc-meta", "preallocation=metadata", 32 * MiB, 65536),
    ("zstd", "compression_type=zstd,cluster_size=4096", 16 * MiB, 4096),
]


def seed_data(path, size, cluster, tmp):
    """Some existing data so that writes hit allocated, zero and unallocated clusters."""
    lines = []
    r = random.Random(size ^ cluster)
    for _ in range(20):
        n = r.randrange(1, 4 * cluster)
        off = r.randrange(0, size - n)
        lines.append(f"write -P {r.randrange(1, 256)} {off} {n}")
    lines.append(f"write -z 0 {min(size, 4 * cluster)}")
    r = run(["qemu-io", "-f", "qcow2", path], input="\n".join(lines) + "\n")
    assert r.rc == 0, r


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_random_ops(tmp, layout):
    name, opts, size, cluster = layout
    mine = os.path.join(tmp, "mine.qcow2")
    theirs = os.path.join(tmp, "theirs.qcow2")
    args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [mine, str(size)]
    qimg(*args)
    if "compat=0.10" not in opts:
        seed_data(mine, size, cluster, tmp)
    shutil.copy(mine, theirs)
    ops = make_ops(zlib.crc32(name.encode()), size, cluster, big=cluster >= 65536)
    apply_instar(mine, ops)
    apply_qemu(theirs, ops, tmp)
    verify(tmp, mine, theirs, cluster)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("ext", [False, True])
def test_backing_file(tmp, compat, ext):
    if compat == "0.10" and ext:
        pytest.skip("extended L2 needs compat 1.1")
    size, cluster = 16 * MiB, 65536 if not ext else 32768
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, str(size))
    lines = [f"write -P {i + 1} {i * 700000 + 13} {300000}" for i in range(20)]
    assert run(["qemu-io", "-f", "qcow2", base], input="\n".join(lines) + "\n").rc == 0
    mine = os.path.join(tmp, "mine.qcow2")
    theirs = os.path.join(tmp, "theirs.qcow2")
    opts = f"compat={compat},cluster_size={cluster}" + (",extended_l2=on" if ext else "")
    qimg("create", "-q", "-f", "qcow2", "-o", opts, "-b", base, "-F", "qcow2", mine, str(size))
    shutil.copy(mine, theirs)
    ops = make_ops(7 + ext + len(compat), size, cluster)
    apply_instar(mine, ops)
    apply_qemu(theirs, ops, tmp)
    verify(tmp, mine, theirs, cluster)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_source(tmp, ctype):
    """Writes, zero writes and discards over compressed clusters (which share host clusters)."""
    size, cluster = 8 * MiB, 65536
    raw = os.path.join(tmp, "src.raw")
    with open(raw, "wb") as f:
        r = random.Random(3)
        for i in range(size // 4096):
            f.write(bytes([r.randrange(4)]) * 2048 + bytes(r.randrange(256) for _ in range(16)) * 128)
    mine = os.path.join(tmp, "mine.qcow2")
    theirs = os.path.join(tmp, "theirs.qcow2")
    qimg("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", raw, mine)
    shutil.copy(mine, theirs)
    ops = make_ops(11, size, cluster, count=80)
    apply_instar(mine, ops)
    apply_qemu(theirs, ops, tmp)
    verify(tmp, mine, theirs, cluster)


def test_l1_growth_after_resize(tmp):
    """A tiny image resized by qemu-img (its L1 table grows and moves) and then written all over."""
    mine = os.path.join(tmp, "mine.qcow2")
    theirs = os.path.join(tmp, "theirs.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", mine, "64k")
    assert run(["qemu-io", "-f", "qcow2", mine], input="write -P 9 100 5000\n").rc == 0
    qimg("resize", "-q", mine, "24M")
    shutil.copy(mine, theirs)
    ops = make_ops(21, 24 * MiB, 512, count=150)
    apply_instar(mine, ops)
    apply_qemu(theirs, ops, tmp)
    verify(tmp, mine, theirs, 512)


@pytest.mark.parametrize("bits", [16, 64])
def test_refcount_table_growth(tmp, bits):
    """512-byte clusters: one refcount table cluster covers little, so sequential filling makes it grow."""
    size = 12 * MiB
    mine = os.path.join(tmp, "mine.qcow2")
    theirs = os.path.join(tmp, "theirs.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size=512,refcount_bits={bits}", mine, str(size))
    shutil.copy(mine, theirs)
    ops = [("write", i * 256 * 1024 + 7, 200 * 1024, i % 250 + 1) for i in range(size // (256 * 1024))]
    ops += make_ops(5, size, 512, count=60)
    apply_instar(mine, ops)
    apply_qemu(theirs, ops, tmp)
    verify(tmp, mine, theirs, 512)
    info = run(["qemu-img", "info", "--output=json", mine])
    assert info.rc == 0


def test_write_refusals(tmp):
    """Read-only handles and requests past the end of the image are refused."""
    path = os.path.join(tmp, "ro.qcow2")
    qimg("create", "-q", "-f", "qcow2", path, "1M")
    with instar.Image(path) as img:
        with pytest.raises(instar.InstarError):
            img.write(0, b"x")
    with instar.Image(path, flags=instar.OPEN_READ_WRITE) as img:
        with pytest.raises(instar.InstarError):
            img.write(1 << 20, b"x")


def test_sequential_large_writes(tmp):
    """convert-like 2 MiB sequential writes stay contiguous and match qemu-io's image."""
    size = 64 * MiB
    mine = os.path.join(tmp, "mine.qcow2")
    theirs = os.path.join(tmp, "theirs.qcow2")
    qimg("create", "-q", "-f", "qcow2", mine, str(size))
    shutil.copy(mine, theirs)
    ops = [("write", i * 2 * MiB, 2 * MiB, i + 1) for i in range(size // (2 * MiB))]
    apply_instar(mine, ops)
    apply_qemu(theirs, ops, tmp)
    verify(tmp, mine, theirs, 65536)
    assert os.path.getsize(mine) == os.path.getsize(theirs)


def test_internal_snapshot(tmp):
    """Shared L2 tables and data clusters (refcount 2) are copied, never written in place; the snapshot keeps
    its contents."""
    size = 16 * MiB
    mine = os.path.join(tmp, "mine.qcow2")
    theirs = os.path.join(tmp, "theirs.qcow2")
    qimg("create", "-q", "-f", "qcow2", mine, str(size))
    seed_data(mine, size, 65536, tmp)
    qimg("snapshot", "-c", "s1", mine)
    shutil.copy(mine, theirs)
    ops = make_ops(31, size, 65536, count=80)
    apply_instar(mine, ops)
    apply_qemu(theirs, ops, tmp)
    verify(tmp, mine, theirs, 65536)
    qimg("snapshot", "-a", "s1", mine)
    qimg("snapshot", "-a", "s1", theirs)
    verify(tmp, mine, theirs, 65536)


DISCARD_OPS = [("discard", 0, MiB, None), ("zero", 2 * MiB, MiB, True), ("zero", 4 * MiB, MiB, False),
               ("discard", 6 * MiB + 3 * 512, 20 * 512 + 100, None), ("discard", 7 * MiB + 5, 1000, None),
               ("zero", 5 * MiB, MiB // 2, True), ("discard", 3 * MiB - 4096, 8192, None)]


@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=4k", "cluster_size=64k", "extended_l2=on",
                                  "compat=0.10"])
def test_discard_punches_host_file(tmp, opts):
    """Discards and unmapping zero writes free clusters; like `qemu-io -d unmap`, instar punches them out of the
    file: actual-size, the host file's data/hole map and the bytes all match."""
    paths = []
    for name in ("mine.qcow2", "theirs.qcow2"):
        p = os.path.join(tmp, name)
        qimg("create", "-q", "-f", "qcow2", "-o", opts, p, str(8 * MiB))
        assert run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {8 * MiB}", p]).rc == 0
        paths.append(p)
    mine, theirs = paths
    apply_instar(mine, DISCARD_OPS)
    apply_qemu(theirs, DISCARD_OPS, tmp)
    verify(tmp, mine, theirs, 65536)

    def host(p):
        info = run(["qemu-img", "info", "--output=json", p])
        actual = [line for line in info.out.splitlines() if '"actual-size"' in line]
        return actual, run(["qemu-img", "map", "-f", "raw", "--output=json", p]).out.replace(p, "X")
    assert host(mine) == host(theirs)
    with open(mine, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
