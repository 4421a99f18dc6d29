"""`instar check` against `qemu-img check`: clean images of many layouts, images corrupted in each way qemu-img
reports (bytes patched here after parsing the header), and repairs (each tool repairs its own copy; the outputs
must match and `qemu-img check` must find instar's repaired copy clean)."""
import os
import shutil
import struct

import pytest

from conftest import assert_same, instar, qemu, qemu_io, qimg

MiB = 1 << 20


# ---- qcow2 layout helpers ----------------------------------------------------------------------------------

class Q:
    """Just enough of a qcow2 parser to find the tables to patch."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            h = f.read(112)
        (self.version,) = struct.unpack(">I", h[4:8])
        self.cluster_bits = struct.unpack(">I", h[20:24])[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size = struct.unpack(">I", h[36:40])[0]
        self.l1_offset = struct.unpack(">Q", h[40:48])[0]
        self.rt_offset = struct.unpack(">Q", h[48:56])[0]
        self.rt_clusters = struct.unpack(">I", h[56:60])[0]
        self.incompat = struct.unpack(">Q", h[72:80])[0] if self.version >= 3 else 0
        self.order = struct.unpack(">I", h[96:100])[0] if self.version >= 3 else 4
        self.extended = bool(self.incompat & 16)

    def u64(self, off):
        with open(self.path, "rb") as f:
            f.seek(off)
            return struct.unpack(">Q", f.read(8))[0]

    def put64(self, off, v):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(struct.pack(">Q", v))

    def l1(self, i):
        return self.u64(self.l1_offset + 8 * i)

    def set_l1(self, i, v):
        self.put64(self.l1_offset + 8 * i, v)

    def l2_offset(self, i=0):
        return self.l1(i) & 0x00FFFFFFFFFFFE00

    def l2_entry_addr(self, j, i=0):
        return self.l2_offset(i) + j * (16 if self.extended else 8)

    def l2(self, j, i=0):
        return self.u64(self.l2_entry_addr(j, i))

    def set_l2(self, j, v, i=0):
        self.put64(self.l2_entry_addr(j, i), v)

    def _refcount_slot(self, cluster):
        per_block = self.cs * 8 >> self.order
        block = self.u64(self.rt_offset + 8 * (cluster // per_block)) & ~0x1FF
        assert block, "no refblock covers that cluster"
        return block, cluster % per_block

    def set_refcount(self, cluster, value):
        block, idx = self._refcount_slot(cluster)
        width = 1 << self.order
        with open(self.path, "r+b") as f:
            if width < 8:
                per = 8 // width
                f.seek(block + idx // per)
                b = f.read(1)[0]
                shift = (idx % per) * width
                b = (b & ~(((1 << width) - 1) << shift)) | (value << shift)
                f.seek(block + idx // per)
                f.write(bytes([b & 0xFF]))
            else:
                n = width // 8
                f.seek(block + idx * n)
                f.write(value.to_bytes(n, "big"))


def make(tmp, name="img.qcow2", size="64M", opts=None, writes=("write -P 1 0 1M",), args=()):
    path = os.path.join(tmp, name)
    cmd = ["create", "-q", "-f", "qcow2"]
    if opts:
        cmd += ["-o", opts]
    qimg(*cmd, *args, path, size, cwd=tmp)
    if writes:
        cmdline = []
        for w in writes:
            cmdline += ["-c", w]
        qemu_io("-f", "qcow2", *cmdline, path)
    return path


def same_check(path, *extra):
    d, name = os.path.split(path)
    for output in ([], ["--output=json"]):
        assert_same("check", *extra, *output, name, cwd=d)


# ---- clean images ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    "cluster_size=512", "cluster_size=4096", "cluster_size=2M", "cluster_size=65536,compat=0.10",
    "refcount_bits=1", "refcount_bits=2", "refcount_bits=4", "refcount_bits=8", "refcount_bits=32",
    "refcount_bits=64", "extended_l2=on", "extended_l2=on,cluster_size=16384", "preallocation=metadata",
    "preallocation=falloc", "lazy_refcounts=on", "compression_type=zstd",
])
def test_clean_layouts(tmp, opts):
    path = make(tmp, opts=opts, writes=("write -P 1 0 1M", "write -P 2 5M 300k", "write -z 8M 1M",
                                        "discard 0 64k"))
    same_check(path)


def test_clean_empty_and_fragmented(tmp):
    same_check(make(tmp, writes=()))
    path = make(tmp, "frag.qcow2", writes=[f"write -P {i} {(9 - i) * 128}k 64k" for i in range(8)])
    same_check(path)


def test_compressed(tmp):
    path = make(tmp, writes=("write -c -P 7 0 1M", "write -c -P 8 4M 128k", "write -P 9 2M 64k"))
    same_check(path)


def test_snapshots(tmp):
    path = make(tmp, writes=("write -P 1 0 1M",))
    qimg("snapshot", "-c", "s1", path)
    qemu_io("-c", "write -P 2 512k 1M", path)
    qimg("snapshot", "-c", "s2", path)
    qemu_io("-c", "write -P 3 0 64k", path)
    same_check(path)


def test_bitmaps(tmp):
    path = make(tmp, writes=("write -P 1 0 1M",))
    qimg("bitmap", "--add", path, "b0")
    qimg("bitmap", "--add", "-g", "512k", path, "b1")
    qemu_io("-c", "write 4M 1M", path)
    same_check(path)


def test_data_file(tmp):
    path = make(tmp, opts=f"data_file={tmp}/img.data", writes=())
    qemu_io("-f", "qcow2", "-c", "write -P 3 0 1M", path)
    same_check(path)


def test_backing_overlay(tmp):
    base = make(tmp, "base.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("-c", "write -P 4 64k 64k", top)
    same_check(top)
    same_check(top, "-U")
    same_check(top, "-q")


def test_not_supported_and_errors(tmp):
    raw = os.path.join(tmp, "r.img")
    qimg("create", "-q", "-f", "raw", raw, "1M")
    assert_same("check", "-f", "raw", "r.img", cwd=tmp)
    assert_same("check", "r.img", cwd=tmp)
    assert_same("check", "nosuch.qcow2", cwd=tmp)
    assert_same("check", "-r", "bogus", "r.img", cwd=tmp)
    assert_same("check", "--output=xml", "r.img", cwd=tmp)
    assert_same("check", "-T", "bogus", "r.img", cwd=tmp)
    assert_same("check", cwd=tmp)
    assert_same("check", "a", "b", cwd=tmp)
    make(tmp)
    assert_same("check", "-r", "leaks", "-U", "img.qcow2", cwd=tmp)
    assert_same("check", "-T", "none", "img.qcow2", cwd=tmp)
    assert_same("check", "--image-opts", "driver=qcow2,file.filename=img.qcow2", cwd=tmp)
    assert_same("check", "json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"img.qcow2\"}}",
                cwd=tmp)


# ---- corruptions -------------------------------------------------------------------------------------------

def grow_and_leak(q, n=3):
    size = os.path.getsize(q.path)
    first = (size + q.cs - 1) // q.cs
    os.truncate(q.path, (first + n) * q.cs)
    for c in range(first, first + n):
        q.set_refcount(c, 1)


def corrupt_leak(q):
    grow_and_leak(q)


def corrupt_refcount_zero(q):
    q.set_refcount((q.l2(0) & 0x00FFFFFFFFFFFE00) // q.cs, 0)


def corrupt_refcount_high(q):
    q.set_refcount((q.l2(1) & 0x00FFFFFFFFFFFE00) // q.cs, 2)


def corrupt_l2_copied_clear(q):
    q.set_l2(2, q.l2(2) & ~(1 << 63))


def corrupt_l1_copied_clear(q):
    q.set_l1(0, q.l1(0) & ~(1 << 63))


def corrupt_l1_unaligned(q):
    q.set_l1(0, q.l1(0) | 0x200)


def corrupt_l1_past_eof(q):
    q.set_l1(0, (1 << 63) | (1 << 40))


def corrupt_l1_reserved(q):
    q.set_l1(0, q.l1(0) | (1 << 57))


def corrupt_l2_unaligned(q):
    q.set_l2(3, q.l2(3) | 0x200)


def corrupt_l2_past_eof(q):
    q.set_l2(4, (1 << 63) | (1 << 40))


def corrupt_l2_reserved(q):
    q.set_l2(5, q.l2(5) | (1 << 60))


def corrupt_l2_duplicate(q):
    q.set_l2(6, q.l2(7))


def corrupt_refblock_unaligned(q):
    q.put64(q.rt_offset, q.u64(q.rt_offset) | 0x400)


def corrupt_refblock_outside(q):
    q.put64(q.rt_offset + 8, 1 << 40)


def corrupt_dirty(q):
    q.put64(72, q.incompat | 1)


def corrupt_corrupt_bit_and_leak(q):
    q.put64(72, q.incompat | 2)
    grow_and_leak(q, 1)


CORRUPTIONS = [corrupt_leak, corrupt_refcount_zero, corrupt_refcount_high, corrupt_l2_copied_clear,
               corrupt_l1_copied_clear, corrupt_l1_unaligned, corrupt_l1_past_eof, corrupt_l1_reserved,
               corrupt_l2_unaligned, corrupt_l2_past_eof, corrupt_l2_reserved, corrupt_l2_duplicate,
               corrupt_refblock_unaligned, corrupt_refblock_outside, corrupt_dirty, corrupt_corrupt_bit_and_leak]


def corrupted(tmp, fn, opts=None):
    path = make(tmp, opts=opts, writes=("write -P 1 0 1M",))
    fn(Q(path))
    return path


@pytest.mark.parametrize("fn", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corruption_reports(tmp, fn):
    same_check(corrupted(tmp, fn))


@pytest.mark.parametrize("opts", ["refcount_bits=1", "refcount_bits=4", "refcount_bits=64,cluster_size=4096",
                                  "extended_l2=on", "cluster_size=512"])
@pytest.mark.parametrize("fn", [corrupt_leak, corrupt_refcount_zero, corrupt_refcount_high,
                                corrupt_l2_copied_clear], ids=lambda f: f.__name__)
def test_corruption_layouts(tmp, fn, opts):
    same_check(corrupted(tmp, fn, opts))


def test_overlapping_l2(tmp):
    path = make(tmp, size="2G", writes=("write -P 1 0 1M", "write -P 2 1G 1M"))
    q = Q(path)
    q.set_l1(2, q.l1(0))
    same_check(path)


# ---- repairs -----------------------------------------------------------------------------------------------

def repair_both(tmp, path, mode, output=()):
    """Repairs a copy with each tool; their outputs must match and qemu-img must find instar's copy clean."""
    results = {}
    for who in ("qemu", "instar"):
        d = os.path.join(tmp, who)
        os.makedirs(d, exist_ok=True)
        shutil.copy(path, os.path.join(d, "img.qcow2"))
        run = qemu if who == "qemu" else instar
        results[who] = run("check", "-r", mode, *output, "img.qcow2", cwd=d)
    assert results["instar"] == results["qemu"]
    q_after = qemu("check", "img.qcow2", cwd=os.path.join(tmp, "qemu"))
    i_after = qemu("check", "img.qcow2", cwd=os.path.join(tmp, "instar"))
    assert i_after == q_after
    return results["qemu"]


REPAIRABLE = [corrupt_leak, corrupt_refcount_zero, corrupt_refcount_high, corrupt_l2_copied_clear,
              corrupt_l1_copied_clear, corrupt_l2_duplicate, corrupt_refblock_unaligned, corrupt_refblock_outside,
              corrupt_dirty, corrupt_corrupt_bit_and_leak, corrupt_l2_unaligned]


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("fn", REPAIRABLE, ids=lambda f: f.__name__)
def test_repair(tmp, fn, mode):
    path = corrupted(tmp, fn)
    repair_both(tmp, path, mode)


@pytest.mark.parametrize("opts", ["refcount_bits=1", "refcount_bits=64,cluster_size=4096", "extended_l2=on",
                                  "cluster_size=512"])
@pytest.mark.parametrize("fn", [corrupt_leak, corrupt_refcount_zero], ids=lambda f: f.__name__)
def test_repair_layouts(tmp, fn, opts):
    path = corrupted(tmp, fn, opts)
    repair_both(tmp, path, "all")
    json_dir = os.path.join(tmp, "json")
    os.makedirs(json_dir)
    repair_both(json_dir, path, "all", output=("--output=json",))


def test_repair_overlapping_l2(tmp):
    path = make(tmp, size="2G", writes=("write -P 1 0 1M", "write -P 2 1G 1M"))
    q = Q(path)
    q.set_l1(2, q.l1(0))
    repair_both(tmp, path, "all")


@pytest.mark.parametrize("opts", [None, "extended_l2=on"])
def test_repair_preallocated_unaligned(tmp, opts):
    """A zero cluster that keeps its allocation (write -z over data) with an unaligned offset: check reports it,
    and -r all turns the entry into a plain zero cluster in place (fix_l2_entry_by_zero) and frees the cluster.
    Outputs match, the repaired images are byte-identical."""
    path = make(tmp, opts=opts, writes=("write -P 1 0 1M", "write -z 0 64k"))
    q = Q(path)
    q.set_l2(0, q.l2(0) | 0x200)
    same_check(path)
    out = repair_both(tmp, path, "all")
    assert "Repairing offset=" in out.err and "Preallocated cluster is not properly aligned" in out.err, out
    with open(os.path.join(tmp, "qemu", "img.qcow2"), "rb") as a, open(os.path.join(tmp, "instar", "img.qcow2"),
                                                                        "rb") as b:
        assert a.read() == b.read()


# ---- library and Python binding ----------------------------------------------------------------------------

def test_python_check_matches_qemu_json(tmp):
    import json
    import instar
    clean = make(tmp)
    q = qemu("check", "--output=json", "img.qcow2", cwd=tmp)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert instar.check("img.qcow2") == json.loads(q.out)
        assert instar.check_json("img.qcow2") == q.out
    finally:
        os.chdir(cwd)
    os.makedirs(os.path.join(tmp, "leaky"))
    leaky = corrupted(os.path.join(tmp, "leaky"), corrupt_refcount_high)
    d = os.path.dirname(leaky)
    os.makedirs(os.path.join(d, "q"))
    shutil.copy(leaky, os.path.join(d, "q", "img.qcow2"))
    q = qemu("check", "-r", "leaks", "--output=json", "img.qcow2", cwd=os.path.join(d, "q"))
    os.chdir(d)
    try:
        assert instar.check("img.qcow2", repair="leaks") == json.loads(q.out)
        assert instar.check("img.qcow2") == json.loads(qemu("check", "--output=json", "img.qcow2").out)
    finally:
        os.chdir(cwd)
    raw = os.path.join(tmp, "r.img")
    qimg("create", "-q", "-f", "raw", raw, "1M")
    with pytest.raises(instar.InstarError) as e:
        instar.check(raw)
    assert e.value.message == "This image format does not support checks"
    assert clean
