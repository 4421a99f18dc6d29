"""vmdk's vmfsSparse (COWD extents) and seSparse (ESXi SESPARSE extents) against qemu-img 7.2.

qemu-img cannot create either, so each image is built byte by byte (vmdk_sparse_imgs.py): a descriptor file and
its extent files. Every image is first checked with qemu-img itself (info opens it, convert -O raw reads the
bytes the builder meant), then instar is compared with qemu-img: info (human and JSON, with the extents block;
--backing-chain where there is a parent), map (human and JSON), compare, check, convert -O raw and -O qcow2.

Writes: qemu opens seSparse read-only only, so every command that opens an image for writing is refused with
qemu's message; COWD extents are written as qemu writes them (convert -n into them, commit of a vmfsSparse
overlay into its parent), the files compared with qemu's byte for byte (the descriptor's random CID masked).
"""
import hashlib
import os
import re
import shutil

import pytest

from conftest import assert_same, both, convert_both, instar, qemu, qemu_io, qimg
from vmdk_sparse_imgs import (Cowd, SeSparse, cowd_image, expected_raw, pattern, se_image, write_descriptor,
                              write_file)

MiB = 1 << 20


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cowd_grains(granularity, count, tables):
    """Grains spread over `tables` grain tables, one shorter than a grain (the rest reads as zeroes)."""
    gb = granularity * 512
    out = {}
    for t in range(tables):
        base = t * 4096
        for k in range(count):
            idx = base + (k * 37 + t * 5) % 4096
            out[idx] = pattern(t * 16 + k, gb if k != 1 else max(1, gb // 3))
    return out


def _se_grains(count, tables):
    out = {}
    for t in range(tables):
        for k in range(count):
            out[t * 4096 + (k * 53 + t) % 4096] = pattern(t * 8 + k + 1, 4096 if k != 2 else 1000)
    return out


def _cowd(d, granularity, sectors, tables, count=5, **kw):
    grains = _cowd_grains(granularity, count, tables)
    img = cowd_image(d, Cowd(sectors, granularity, grains, **kw))
    return img, expected_raw(sectors, grains, granularity * 512)


def _se(d, sectors, tables, count=6, zero=(), unmapped=(), **kw):
    grains = _se_grains(count, tables)
    for z in list(zero) + list(unmapped):
        grains.pop(z, None)
    img = se_image(d, SeSparse(sectors, grains, zero=zero, unmapped=unmapped, **kw))
    return img, expected_raw(sectors, grains, 4096)


def _multi(d):
    """A vmfsSparse descriptor with two COWD extents of different granularity and a FLAT one between them."""
    g1 = _cowd_grains(1, 4, 1)
    g2 = _cowd_grains(16, 4, 2)
    write_file(d, "a-delta.vmdk", Cowd(8192, 1, g1).build())
    flat = pattern(0x77, 1 * MiB)
    write_file(d, "b-flat.vmdk", flat)
    write_file(d, "c-delta.vmdk", Cowd(131072, 16, g2).build())
    img = write_descriptor(d, "img.vmdk", "vmfsSparse", [("RW", 8192, "VMFSSPARSE", "a-delta.vmdk"),
                                                          ("RW", 2048, "FLAT", "b-flat.vmdk 0"),
                                                          ("RW", 131072, "VMFSSPARSE", "c-delta.vmdk")])
    # The FLAT line needs its offset outside the quotes.
    with open(img) as f:
        text = f.read().replace('"b-flat.vmdk 0"', '"b-flat.vmdk" 0')
    with open(img, "w") as f:
        f.write(text)
    return img, expected_raw(8192, g1, 512) + flat + expected_raw(131072, g2, 16 * 512)


def _se_multi(d):
    """Two seSparse extents and a COWD one in a seSparse descriptor."""
    s1 = _se_grains(4, 1)
    s2 = _se_grains(3, 2)
    c = _cowd_grains(8, 3, 1)
    write_file(d, "a-sesparse.vmdk", SeSparse(32768, s1, zero=[4095]).build())
    write_file(d, "b-sesparse.vmdk", SeSparse(65536 + 8, s2, unmapped=[1]).build())
    write_file(d, "c-delta.vmdk", Cowd(32768, 8, c).build())
    img = write_descriptor(d, "img.vmdk", "seSparse", [("RW", 32768, "SESPARSE", "a-sesparse.vmdk"),
                                                        ("RW", 65536 + 8, "SESPARSE", "b-sesparse.vmdk"),
                                                        ("RW", 32768, "VMFSSPARSE", "c-delta.vmdk")])
    return img, expected_raw(32768, s1, 4096) + expected_raw(65536 + 8, s2, 4096) + expected_raw(32768, c, 4096)


CASES = {
    "cowd-g1": lambda d: _cowd(d, 1, 131072, 3),
    "cowd-g8": lambda d: _cowd(d, 8, 131072, 4),
    "cowd-g128-all-tables": lambda d: _cowd(d, 128, 524288 + 5, 1, all_tables=True),
    "cowd-g3-odd": lambda d: _cowd(d, 3, 40000, 2),
    "cowd-multi": _multi,
    "se-basic": lambda d: _se(d, 131072, 2, zero=[1, 4096 + 9], unmapped=[7]),
    "se-odd-capacity": lambda d: _se(d, 98304 + 11, 3, zero=[8192 + 2]),
    "se-in-order": lambda d: _se(d, 65536, 2, shuffle=False),
    "se-big-directory": lambda d: _se(d, 262144, 1, gd_sectors=4),
    "se-empty": lambda d: _se(d, 65536, 0),
    "se-multi": _se_multi,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every case built and checked with qemu-img first: it opens, and reads the bytes the builder meant."""
    root = str(tmp_path_factory.mktemp("vmdk-sparse-types"))
    out = {}
    for name, make in CASES.items():
        d = os.path.join(root, name)
        os.makedirs(d)
        img, want = make(d)
        qimg("info", img)
        raw = os.path.join(d, "expect.raw")
        qimg("convert", "-O", "raw", img, raw)
        with open(raw, "rb") as f:
            assert f.read() == want, f"{name}: qemu-img does not read the intended bytes"
        out[name] = (d, img)
    return out


NAMES = sorted(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_info(corpus, name):
    d, img = corpus[name]
    assert_same("info", "img.vmdk", cwd=d)
    assert_same("info", "--output=json", "img.vmdk", cwd=d)
    assert_same("info", "--output=json", img)


@pytest.mark.parametrize("name", NAMES)
def test_map(corpus, name):
    d, img = corpus[name]
    assert_same("map", "img.vmdk", cwd=d)
    assert_same("map", "--output=json", img)


@pytest.mark.parametrize("name", NAMES)
def test_compare_and_check(corpus, name):
    d, img = corpus[name]
    assert_same("compare", img, img)
    assert_same("compare", "-f", "vmdk", "-F", "raw", img, os.path.join(d, "expect.raw"))
    assert_same("check", img)
    assert_same("check", "--output=json", img)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert(corpus, name, fmt, tmp):
    d, img = corpus[name]
    q, qd, idst = convert_both(tmp, ["-O", fmt], [img], fmt=fmt)
    assert q.rc == 0
    assert _sha(qd) == _sha(idst)
    if fmt == "raw":
        assert _sha(idst) == _sha(os.path.join(d, "expect.raw"))
    assert_same("compare", img, idst)


# Every qemu-img command that opens its image for writing.
WRITE_COMMANDS = [
    ["commit", "@"],
    ["rebase", "-u", "-b", "", "@"],
    ["amend", "-o", "zeroed_grain=on", "@"],
    ["resize", "@", "100M"],
    ["snapshot", "-c", "s1", "@"],
    ["snapshot", "-d", "s1", "@"],
    ["check", "-r", "all", "@"],
    ["check", "-r", "leaks", "@"],
    ["bitmap", "--add", "@", "b0"],
    ["convert", "-n", "-O", "vmdk", "SRC", "@"],
]


@pytest.mark.parametrize("args", WRITE_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_sesparse_refuses_writes(corpus, args, tmp):
    """seSparse is read-only in qemu: a writable open fails before any header is read, nothing is written."""
    src_d, _ = corpus["se-basic"]
    d = os.path.join(tmp, "img")
    shutil.copytree(src_d, d)
    src = os.path.join(tmp, "src.raw")
    qimg("create", "-q", "-f", "raw", src, "64M")
    before = {f: _sha(os.path.join(d, f)) for f in os.listdir(d)}
    argv = [("img.vmdk" if a == "@" else src if a == "SRC" else a) for a in args]
    q, i = both(*argv, cwd=d)
    assert q.rc != 0
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    assert {f: _sha(os.path.join(d, f)) for f in os.listdir(d)} == before


def test_sesparse_write_refused_before_headers(tmp):
    """A damaged seSparse extent opened for writing gets the read-only refusal, as in qemu (the check comes
    first); opened for reading, the header's error."""
    img = se_image(tmp, SeSparse(65536, {}, const={"magic": 0x1234}))
    for args in (["resize", img, "1G"], ["info", img], ["amend", "-o", "zeroed_grain=on", img]):
        q, i = both(*args)
        assert q.rc != 0
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)


def _mask_cid(text):
    return re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=X\n", text)


def _mask_embedded(data):
    """A sparse file with its embedded descriptor's CID masked; only the text up to the first NUL of the descriptor
    window counts (qemu's CID rewrite leaves stale bytes past it when the number gets shorter)."""
    window = data[0x200:0x200 + 10240]
    text = _mask_cid(window.split(b"\0")[0])
    return data[:0x200] + text + b"\0" * (10240 - len(text)) + data[0x200 + 10240:]


def _same_dirs(qd, idir):
    assert sorted(os.listdir(qd)) == sorted(os.listdir(idir))
    for f in sorted(os.listdir(qd)):
        a, b = os.path.join(qd, f), os.path.join(idir, f)
        with open(a, "rb") as fa, open(b, "rb") as fb:
            da, db = fa.read(), fb.read()
        if f.endswith(".vmdk") and da[:4] not in (b"COWD", b"KDMV"):
            # A descriptor: qemu rewrites the CID in place (a shorter number leaves stale bytes past the NUL).
            da, db = _mask_cid(da.split(b"\0")[0]), _mask_cid(db.split(b"\0")[0])
        elif da[:4] == b"KDMV":
            da, db = _mask_embedded(da), _mask_embedded(db)
        assert da == db, f


def _write_source(tmp, size):
    src = os.path.join(tmp, "src.raw")
    qimg("create", "-q", "-f", "raw", src, str(size))
    qemu_io("-f", "raw", "-c", "write -P 0x31 0 100k", "-c", "write -P 0x32 3000000 70000",
            "-c", f"write -P 0x33 {size - 4096} 4096", src)
    return src


@pytest.mark.parametrize("granularity", [1, 8, 128])
def test_cowd_convert_into(granularity, tmp):
    """convert -n into a vmfsSparse image whose grain tables all exist: grains allocated at the end of the extent
    file, the data, the table entry, a new CID; the same files as qemu's."""
    sectors = 16384
    src = _write_source(tmp, sectors * 512)
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        os.makedirs(d)
        cowd_image(d, Cowd(sectors, granularity, {0: pattern(9, 512), 4096 // granularity: pattern(8, 700)},
                           all_tables=True))
    q = qemu("convert", "-n", "-O", "vmdk", src, "img.vmdk", cwd=os.path.join(tmp, "q"))
    i = instar("convert", "-n", "-O", "vmdk", src, "img.vmdk", cwd=os.path.join(tmp, "i"))
    assert q.rc == 0
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    _same_dirs(os.path.join(tmp, "q"), os.path.join(tmp, "i"))
    assert_same("compare", src, os.path.join(tmp, "i", "img.vmdk"))
    assert_same("check", os.path.join(tmp, "i", "img.vmdk"))


def _base(d, size="64M"):
    """A monolithicSparse parent qemu-img made, with data; returns its CID."""
    base = os.path.join(d, "base.vmdk")
    qimg("create", "-q", "-f", "vmdk", base, size)
    qemu_io("-f", "vmdk", "-c", "write -P 0x61 0 8M", "-c", "write -P 0x62 20M 1M", base)
    with open(base, "rb") as f:
        f.seek(0x200)
        desc = f.read(10240).split(b"\0")[0]
    return int(re.search(rb"\nCID=([0-9a-f]+)", desc).group(1), 16)


def _overlay(d, kind, cid):
    if kind == "cowd":
        return cowd_image(d, Cowd(131072, 1, _cowd_grains(1, 4, 2)), parent_cid=cid, parent_hint="base.vmdk")
    grains = _se_grains(4, 2)
    return se_image(d, SeSparse(131072, grains, zero=[2, 5000], unmapped=[7]), parent_cid=cid,
                    parent_hint="base.vmdk")


@pytest.mark.parametrize("kind", ["cowd", "se"])
def test_parent(kind, tmp):
    """parentFileNameHint names the parent, which qemu follows for both types: unallocated grains read from it."""
    img = _overlay(tmp, kind, _base(tmp))
    assert_same("info", "--backing-chain", "img.vmdk", cwd=tmp)
    assert_same("info", "--backing-chain", "--output=json", "img.vmdk", cwd=tmp)
    assert_same("map", "img.vmdk", cwd=tmp)
    assert_same("map", "--output=json", "img.vmdk", cwd=tmp)
    assert_same("compare", "img.vmdk", "base.vmdk", cwd=tmp)
    for fmt in ("raw", "qcow2"):
        q, qd, idst = convert_both(tmp, ["-O", fmt], [img], fmt=fmt)
        assert q.rc == 0
        assert _sha(qd) == _sha(idst)
    q, qd, idst = convert_both(tmp, ["-O", "qcow2", "-B", "base.vmdk", "-F", "vmdk"], [img], fmt="qcow2")
    assert q.rc == 0
    assert _sha(qd) == _sha(idst)


@pytest.mark.parametrize("kind", ["cowd", "se"])
def test_parent_cid_mismatch(kind, tmp):
    """A parentCID that is not the parent's CID: reads that reach the parent fail, as in qemu."""
    img = _overlay(tmp, kind, _base(tmp) ^ 1)
    assert_same("info", "--backing-chain", "img.vmdk", cwd=tmp)
    assert_same("map", "--output=json", "img.vmdk", cwd=tmp)
    # One copy coroutine: qemu's default eight report a second failing chunk of their own (a grain of 512
    # bytes is a chunk there), which instar, reading runs of grains, does not have.
    q, qd, idst = convert_both(tmp, ["-m", "1", "-O", "raw"], [img], fmt="raw")
    assert q.rc != 0


def test_cowd_commit(tmp):
    """commit of a vmfsSparse overlay into its monolithicSparse parent: the parent's files as qemu leaves them."""
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        os.makedirs(d)
    cid = _base(os.path.join(tmp, "q"))
    shutil.copy(os.path.join(tmp, "q", "base.vmdk"), os.path.join(tmp, "i", "base.vmdk"))
    for who in ("q", "i"):
        _overlay(os.path.join(tmp, who), "cowd", cid)
    q = qemu("commit", "img.vmdk", cwd=os.path.join(tmp, "q"))
    i = instar("commit", "img.vmdk", cwd=os.path.join(tmp, "i"))
    assert q.rc == 0
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    _same_dirs(os.path.join(tmp, "q"), os.path.join(tmp, "i"))


def test_cowd_write_without_grain_table(tmp):
    """A write into a range whose grain table does not exist: qemu writes the data over the extent's header
    (get_cluster_offset gives it no offset; the image is lost), instar refuses (EIO) and writes nothing. The
    qemu side is shown corrupt, and instar's files unchanged."""
    src = _write_source(tmp, 16384 * 512)
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        os.makedirs(d)
        cowd_image(d, Cowd(16384, 1, {}))
    q = qemu("convert", "-n", "-O", "vmdk", src, "img.vmdk", cwd=os.path.join(tmp, "q"))
    r = qemu("info", "img.vmdk", cwd=os.path.join(tmp, "q"))
    assert r.rc != 0 and "Image not in VMDK format" in r.err, (q, r)
    before = {f: _sha(os.path.join(tmp, "i", f)) for f in os.listdir(os.path.join(tmp, "i"))}
    i = instar("convert", "-n", "-O", "vmdk", src, "img.vmdk", cwd=os.path.join(tmp, "i"))
    assert i.rc == 1 and i.err.startswith("instar: error while writing"), i
    extent = "img-delta.vmdk"
    assert _sha(os.path.join(tmp, "i", extent)) == before[extent]
    assert_same("info", "img.vmdk", cwd=os.path.join(tmp, "i"))


def test_monolithic_cowd(tmp):
    """A COWD extent as the image file itself (qemu reads a descriptor at 0x200 and has no create type)."""
    ext = Cowd(8192, 1, {0: pattern(1, 512), 3: pattern(2, 512)}).build()
    text = b"# Disk DescriptorFile\nversion=1\nCID=0000abcd\nparentCID=ffffffff\n"
    data = bytearray(ext)
    # The grain directory lives at sector 4; the descriptor fits in sectors 1-3.
    data[0x200:0x200 + len(text)] = text
    p = write_file(tmp, "img.vmdk", bytes(data))
    for args in (["info", p], ["info", "--output=json", p], ["map", "--output=json", p]):
        assert_same(*args)
    q, qd, idst = convert_both(tmp, ["-O", "raw"], [p], fmt="raw")
    assert q.rc == 0
    assert _sha(qd) == _sha(idst)


# Header values qemu refuses, each with its own message (the same for every command that opens the image).
REFUSED = [
    ("cowd", {"header": {"granularity": 0x200001}}),
    ("cowd", {"header": {"l1dir_size": 0x2000001}}),
    ("se", {"const": {"magic": 0xCAFECAFE}}),
    ("se", {"const": {"version": 0x0000000100000001}}),
    ("se", {"const": {"grain_size": 16}}),
    ("se", {"const": {"grain_table_size": 32}}),
    ("se", {"const": {"flags": 0x8000000000000000}}),
    ("se", {"const": {"reserved1": 1, "reserved4": 0xFF}}),
    ("se", {"const_pad": (300, b"\x07")}),
    ("se", {"const": {"volatile_header_offset": 0}}),
    ("se", {"const": {"volatile_header_offset": 1 << 54}}),
    ("se", {"volatile": {"magic": 0xCAFEBABE}}),
    ("se", {"volatile": {"replay_journal": 7}}),
    ("se", {"volatile_pad": (479, b"\x01")}),
    ("se", {"const": {"grain_dir_size": (1 << 19) + 1}}),
    ("se", {"const": {"grain_dir_offset": 1 << 54}}),
    ("se", {"const": {"capacity": 0xFFFFFFFFFFFFFFFF}}),
]


@pytest.mark.parametrize("kind,kw", REFUSED, ids=[f"{k}-{i}" for i, (k, _) in enumerate(REFUSED)])
def test_refused_headers(kind, kw, tmp):
    if kind == "cowd":
        cowd_image(tmp, Cowd(131072, 1, {0: pattern(1, 512)}, **kw))
    else:
        se_image(tmp, SeSparse(65536, {0: pattern(1, 4096)}, **kw))
    for args in (["info", "img.vmdk"], ["info", "--output=json", "img.vmdk"], ["map", "img.vmdk"],
                 ["convert", "-O", "raw", "img.vmdk", "out.raw"], ["check", "img.vmdk"]):
        q, i = both(*args, cwd=tmp)
        assert q.rc != 0, (args, q)
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), args


def test_commit_into_sesparse_base(corpus, tmp):
    """A qcow2 overlay over a seSparse image: qemu opens the base read-only and reopens it read/write for commit,
    so the open passes and the first write fails ("Block job failed: Operation not supported"); the base's
    files stay as they were. Rebasing onto it and converting through it only read it."""
    src_d, _ = corpus["se-basic"]
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        shutil.copytree(src_d, d)
        qimg("create", "-q", "-f", "qcow2", "-b", "img.vmdk", "-F", "vmdk", os.path.join(d, "top.qcow2"))
        qemu_io("-f", "qcow2", "-c", "write -P 5 0 64k", "-c", "write -z 1M 64k", os.path.join(d, "top.qcow2"))
    before = {f: _sha(os.path.join(src_d, f)) for f in os.listdir(src_d)}
    q = qemu("commit", "top.qcow2", cwd=os.path.join(tmp, "q"))
    i = instar("commit", "top.qcow2", cwd=os.path.join(tmp, "i"))
    assert q.rc != 0
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        assert {f: _sha(os.path.join(d, f)) for f in before} == before
    d = os.path.join(tmp, "i")
    assert_same("info", "--backing-chain", "top.qcow2", cwd=d)
    assert_same("map", "--output=json", "top.qcow2", cwd=d)
    q, qd, idst = convert_both(d, ["-O", "raw"], ["top.qcow2"], fmt="raw")
    assert q.rc == 0
    assert _sha(qd) == _sha(idst)
