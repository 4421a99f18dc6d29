"""parallels: differential tests against qemu-img 7.2 on images qemu-img/qemu-io make (create, read with both
signatures, writes through convert and the library against qemu-io, preallocation modes, the in-use flag, check
with and without -r, refused operations), format extensions built here with qemu's layout, and hostile variants of
the header and BAT. qemu's cluster placement is deterministic, so the resulting files must be identical."""
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from conftest import INSTAR, assert_same, both, info_json, instar, normalize, qemu, qemu_io, qimg, run

MiB = 1 << 20
HDR = "<16sIIIIIQIIIQ"  # magic version heads cylinders tracks bat_entries nb_sectors inuse data_off flags ext_off
FIELDS = ["magic", "version", "heads", "cylinders", "tracks", "bat", "nb", "inuse", "data_off", "flags", "ext"]
INUSE = 0x746F6E59


def pair(tmp, files):
    dirs = []
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        os.makedirs(d, exist_ok=True)
        for f in files:
            shutil.copyfile(os.path.join(tmp, f), os.path.join(d, f))
        dirs.append(d)
    return dirs


def same_write(tmp, files, *args, compare=()):
    """Runs the same writing command in copies for both tools (cwd = the copy): messages, exit codes and the bytes
    of every file must match."""
    dq, di = pair(tmp, files)
    q = qemu(*args, cwd=dq)
    i = instar(*args, cwd=di)
    q.err, i.err = (re.sub(r"#block\d+", "#blockNNN", r.err) for r in (q, i))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)
    for f in compare or sorted(set(os.listdir(dq)) | set(os.listdir(di))):
        a, b = os.path.join(dq, f), os.path.join(di, f)
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), f"{args}: {f} differs"
    return q


def reads_same(tmp, name, *fmt, targets=("raw", "qcow2", "parallels")):
    for args in (["info", *fmt, name], ["info", "--output=json", *fmt, name], ["map", *fmt, name],
                 ["map", "--output=json", *fmt, name], ["check", *fmt, name],
                 ["check", "--output=json", *fmt, name], ["compare", *fmt, name, name],
                 ["info", "--backing-chain", *fmt, name], ["info", "--backing-chain", "--output=json", *fmt, name]):
        assert_same(*args, cwd=tmp)
    for target in targets:
        outs = []
        for who in ("q", "i"):
            out = os.path.join(tmp, f"conv-{who}.{target}")
            r = (qemu if who == "q" else instar)("convert", *fmt, "-O", target, name, out, cwd=tmp)
            assert r.rc == 0, r
            with open(out, "rb") as f:
                outs.append(f.read())
            os.unlink(out)
        assert outs[0] == outs[1], f"convert -O {target} differs"


def seeded(tmp, name="a.prl", size="64M", opts=None, ops=()):
    args = ["create", "-q", "-f", "parallels"]
    if opts:
        args += ["-o", opts]
    qimg(*args, os.path.join(tmp, name), size)
    for op in ops:
        qemu_io("-f", "parallels", "-c", op, os.path.join(tmp, name))
    return name


def header(path):
    with open(path, "rb") as f:
        return list(struct.unpack(HDR, f.read(64)))


def put_header(path, h):
    with open(path, "r+b") as f:
        f.write(struct.pack(HDR, *h))


def set_field(path, field, value):
    h = header(path)
    h[FIELDS.index(field)] = value
    put_header(path, h)


def poke(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def bat(path, index):
    with open(path, "rb") as f:
        f.seek(64 + 4 * index)
        return struct.unpack("<I", f.read(4))[0]


WRITES = ["write -P 0x11 0 1M", "write -P 0x22 5M 100k", "write -z 8M 1M", "write -P 0x33 8200k 7k",
          "write -P 0x44 63M 1M", "write -P 0x55 30001k 3k"]


# --- create -------------------------------------------------------------------------------------------------

CREATE_CASES = [
    ["64M"], ["1G"], ["0"], ["1000"], ["-o", "cluster_size=4k", "10M"], ["-o", "cluster_size=1000", "1M"],
    ["-o", "cluster_size=0", "1M"], ["-o", "cluster_size=1T", "1M"], ["-o", "cluster_size=512", "4T"],
    ["-o", "cluster_size=512", "2T"], ["-o", "cluster_size=64k", "100G"], ["-o", "cluster_size=2G", "1M"],
    ["-o", "size=4M"], ["-o", "preallocation=full", "1M"], ["-o", "preallocation=falloc", "4M"],
    ["-o", "cluster_size=4k,size=3M"], ["-o", "help"], ["-o", "foo=1", "1M"], ["-b", "x.prl", "-F", "parallels", "1M"],
]


@pytest.mark.parametrize("args", CREATE_CASES, ids=[" ".join(a) for a in CREATE_CASES])
def test_create(tmp, args):
    if args == ["-o", "help"]:
        assert_same("create", "-f", "parallels", "-o", "help", cwd=tmp)
        return
    same_write(tmp, [], "create", "-f", "parallels", *args[:-1], "img.prl", args[-1])


def test_create_disk_size(tmp):
    """qemu writes the BAT area as zeroes (allocated): the created files occupy the same space."""
    for who, tool in (("q", qemu), ("i", instar)):
        r = tool("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", f"{who}.prl", "10G", cwd=tmp)
        assert r.rc == 0, r
    # The same space within 64 KiB: the filesystem may add a few blocks of its own.
    q, i = (os.stat(os.path.join(tmp, n)).st_blocks for n in ("q.prl", "i.prl"))
    assert abs(q - i) <= 128, (q, i)
    with open(os.path.join(tmp, "q.prl"), "rb") as a, open(os.path.join(tmp, "i.prl"), "rb") as b:
        assert a.read() == b.read()


# --- reading ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [None, "cluster_size=4k", "cluster_size=64k", "cluster_size=1000"])
def test_read(tmp, opts):
    name = seeded(tmp, opts=opts, ops=WRITES)
    reads_same(tmp, name)
    reads_same(tmp, name, "-f", "parallels", targets=("raw",))


def test_read_empty_and_zero_size(tmp):
    reads_same(tmp, seeded(tmp, "e.prl"))
    reads_same(tmp, seeded(tmp, "z.prl", size="0"))
    reads_same(tmp, seeded(tmp, "o.prl", size="1000"))


def to_old_signature(path):
    """The original "WithoutFreeSpace" layout: BAT entries count sectors, not clusters."""
    h = header(path)
    tracks = h[4]
    h[0] = b"WithoutFreeSpace"
    put_header(path, h)
    for i in range(h[5]):
        e = bat(path, i)
        if e:
            poke(path, 64 + 4 * i, "<I", e * tracks)


@pytest.mark.parametrize("opts", [None, "cluster_size=4k"])
def test_read_old_signature(tmp, opts):
    name = seeded(tmp, opts=opts, ops=WRITES)
    to_old_signature(os.path.join(tmp, name))
    reads_same(tmp, name)


def test_old_signature_size_is_32_bits(tmp):
    name = seeded(tmp, ops=WRITES)
    p = os.path.join(tmp, name)
    to_old_signature(p)
    set_field(p, "nb", (5 << 32) | (64 * 2048))
    reads_same(tmp, name, targets=("raw",))


def test_writes_to_old_signature(tmp):
    name = seeded(tmp, opts="cluster_size=4k", ops=WRITES)
    to_old_signature(os.path.join(tmp, name))
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "src.raw"), "64M")
    qemu_io("-f", "raw", "-c", "write -P 0x66 2M 3M", os.path.join(tmp, "src.raw"))
    same_write(tmp, [name, "src.raw"], "convert", "-n", "-O", "parallels", "src.raw", name)


def test_probe_and_help_list(tmp):
    r = instar("--help")
    assert " parallels" in r.out.split("Supported formats:")[1]
    name = seeded(tmp)
    assert info_json(os.path.join(tmp, name))["format"] == "parallels"


def test_ploop_descriptor_is_not_opened_as_parallels(tmp):
    """qemu 7.2 has no ploop DiskDescriptor.xml support: the descriptor probes as raw, -f parallels refuses it."""
    seeded(tmp, "root.hds", ops=["write -P 0x11 0 1M"])
    with open(os.path.join(tmp, "DiskDescriptor.xml"), "w") as f:
        f.write('<?xml version="1.0"?>\n<Parallels_disk_image Version="1.0">\n <Disk_Parameters>\n'
                '  <Disk_size>131072</Disk_size>\n </Disk_Parameters>\n <StorageData>\n  <Storage>\n'
                '   <Image><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><Type>Compressed</Type>'
                '<File>root.hds</File></Image>\n  </Storage>\n </StorageData>\n</Parallels_disk_image>\n')
    for args in (["info", "DiskDescriptor.xml"], ["info", "-f", "parallels", "DiskDescriptor.xml"]):
        assert_same(*args, cwd=tmp)


# --- writing ------------------------------------------------------------------------------------------------

def qcow2_source(tmp):
    p = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "64M")
    for op in ["write -P 0x33 0 3M", "write -P 0x44 10M 64k", "write -z 20M 4M", "write -P 0x66 30M 5k",
               "write -P 0x77 63M 1M"]:
        qemu_io("-f", "qcow2", "-c", op, p)
    return "src.qcow2"


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=64k"], ["-S", "0"], ["-c"],
                                  ["-o", "cluster_size=1000"], ["--bitmaps"]])
def test_convert_to_parallels(tmp, opts):
    src = qcow2_source(tmp)
    same_write(tmp, [src], "convert", *opts, "-O", "parallels", src, "out.prl")


def test_convert_into_existing(tmp):
    """convert -n: zero ranges are written as zero buffers, which allocate."""
    src = qcow2_source(tmp)
    seeded(tmp, "out.prl", ops=["write -P 0x99 0 64M"])
    seeded(tmp, "empty.prl", opts="cluster_size=4k")
    same_write(tmp, [src, "out.prl"], "convert", "-n", "-O", "parallels", src, "out.prl")
    same_write(tmp, [src, "empty.prl"], "convert", "-n", "-O", "parallels", src, "empty.prl")


def test_convert_into_file_with_junk_after_data(tmp):
    """Space after the data end is reused as it is (only growth past the file's end is zeroed)."""
    name = seeded(tmp, opts="cluster_size=4k", ops=["write -P 0x11 0 8k"])
    with open(os.path.join(tmp, name), "ab") as f:
        f.write(b"\xAA" * 6000)
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "src.raw"), "64M")
    qemu_io("-f", "raw", "-c", "write -P 0x66 1M 100k", os.path.join(tmp, "src.raw"))
    same_write(tmp, [name, "src.raw"], "convert", "-n", "-O", "parallels", "src.raw", name)


def test_commit_into_parallels_base_is_refused(tmp):
    """qemu's parallels driver cannot be reopened read/write, so commit refuses a parallels base."""
    seeded(tmp, "base.prl", ops=["write -P 0x41 0 2M"])
    qimg("create", "-q", "-f", "qcow2", "-b", "base.prl", "-F", "parallels", os.path.join(tmp, "top.qcow2"))
    for op in ["write -P 0x51 1M 3M", "write -z 10M 1M", "write -P 0x52 40M 10k"]:
        qemu_io("-c", op, os.path.join(tmp, "top.qcow2"))
    same_write(tmp, ["base.prl", "top.qcow2"], "commit", "top.qcow2")


def test_qcow2_over_parallels_chain_reads(tmp):
    seeded(tmp, "base.prl", ops=["write -P 0x41 0 2M", "write -P 0x42 9M 100k"])
    qimg("create", "-q", "-f", "qcow2", "-b", "base.prl", "-F", "parallels", os.path.join(tmp, "top.qcow2"))
    qemu_io("-c", "write -P 0x51 1M 64k", os.path.join(tmp, "top.qcow2"))
    for args in (["info", "--backing-chain", "top.qcow2"], ["info", "--backing-chain", "--output=json", "top.qcow2"],
                 ["map", "--output=json", "top.qcow2"], ["compare", "top.qcow2", "base.prl"]):
        assert_same(*args, cwd=tmp)
    same_write(tmp, ["base.prl", "top.qcow2"], "convert", "-O", "parallels", "top.qcow2", "flat.prl")
    same_write(tmp, ["base.prl", "top.qcow2"], "rebase", "-b", "", "top.qcow2")


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


def _json(path, **opts):
    d = {"driver": "parallels", "file": {"driver": "file", "filename": path}}
    d.update(opts)
    return "json:" + json.dumps(d)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("opts", [{}, {"prealloc-mode": "truncate"}, {"prealloc-size": "64k"},
                                  {"prealloc-mode": "truncate", "prealloc-size": "1M"}])
def test_library_writes_match_qemu_io(tmp, seed, opts):
    """The same unaligned writes and zero writes, through qemu-io and through instar's Python binding (with the
    same prealloc-mode/prealloc-size options), give byte-identical files that occupy the same space."""
    size = 24 << 20
    for name in ("q.prl", "i.prl"):
        qimg("create", "-q", "-f", "parallels", "-o", "cluster_size=4k", os.path.join(tmp, name), str(size))
    ops = _ops(seed, size)
    script = []
    for kind, off, n, pat in ops:
        script += ["-c", f"write -P {pat} {off} {n}" if kind == "w" else f"write -z {off} {n}"]
    qemu_io(*script, _json(os.path.join(tmp, "q.prl"), **opts))
    import instar as lib
    img = lib.Image(_json(os.path.join(tmp, "i.prl"), **opts), flags=lib.OPEN_READ_WRITE)
    try:
        for kind, off, n, pat in ops:
            if kind == "w":
                img.write(off, bytes([pat]) * n)
            else:
                img.write_zeroes(off, n, may_unmap=False)
    finally:
        img.close()
    with open(os.path.join(tmp, "q.prl"), "rb") as a, open(os.path.join(tmp, "i.prl"), "rb") as b:
        assert a.read() == b.read()
    if opts.get("prealloc-mode") != "truncate":
        # Growth is zeroed, allocated space (with truncate, qemu's sector-sized writes may allocate a block more).
        # The filesystem may place a block more or less for the same writes (seen: 4 KiB of 9.5 MiB on ext4), so
        # the space is compared within 32 KiB; a missing preallocation would differ by far more.
        q = os.stat(os.path.join(tmp, "q.prl")).st_blocks
        i = os.stat(os.path.join(tmp, "i.prl")).st_blocks
        assert abs(q - i) <= 64, (q, i)


@pytest.mark.parametrize("value", ["xx", ""])
def test_bad_prealloc_mode(tmp, value):
    name = seeded(tmp)
    assert_same("info", _json(name, **{"prealloc-mode": value}), cwd=tmp)


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_prealloc_size(tmp, value):
    name = seeded(tmp)
    assert_same("info", _json(name, **{"prealloc-size": value}), cwd=tmp)


def test_unknown_runtime_option(tmp):
    name = seeded(tmp)
    assert_same("info", _json(name, foo="1"), cwd=tmp)


# --- refused operations -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["resize", "IMG", "+1M"], ["resize", "--shrink", "IMG", "1M"],
                                  ["amend", "-o", "cluster_size=4k", "IMG"], ["amend", "-o", "size=128M", "IMG"],
                                  ["commit", "IMG"], ["rebase", "-u", "-b", "x.raw", "-F", "raw", "IMG"],
                                  ["rebase", "-b", "", "IMG"], ["measure", "-O", "parallels", "IMG"],
                                  ["measure", "-O", "parallels", "--size", "1G"], ["snapshot", "-l", "IMG"],
                                  ["snapshot", "-c", "s", "IMG"], ["bitmap", "--add", "IMG", "b"],
                                  ["convert", "--bitmaps", "-O", "qcow2", "IMG", "out.qcow2"],
                                  ["convert", "-c", "-O", "parallels", "IMG", "out.prl"]])
def test_refused(tmp, args):
    """Operations qemu-img 7.2 cannot do on parallels answer with its message and exit code, the image untouched."""
    name = seeded(tmp, ops=["write -P 0x11 0 1M"])
    same_write(tmp, [name], *[name if a == "IMG" else a for a in args])


# --- the in-use flag and check ------------------------------------------------------------------------------

def damaged(tmp, kind):
    name = seeded(tmp, opts="cluster_size=4k", ops=["write -P 0x11 0 40k", "write -P 0x22 9M 8k"])
    p = os.path.join(tmp, name)
    size = os.path.getsize(p)
    if kind in ("unclean", "unclean-leak"):
        set_field(p, "inuse", INUSE)
    if kind in ("leak", "unclean-leak"):
        with open(p, "ab") as f:
            f.write(b"\x01" * (3 * 4096 + 100))
    elif kind == "outside":
        poke(p, 64 + 4 * 3, "<I", size // 4096 + 10)
    elif kind == "outside-far":
        poke(p, 64 + 4 * 1, "<I", 0x80000)
    elif kind == "at-end":
        poke(p, 64 + 4 * 3, "<I", size // 4096)
    elif kind == "fragmented":
        poke(p, 64 + 4 * 2, "<I", bat(p, 5))
    elif kind == "empty":
        p2 = os.path.join(tmp, "e.prl")
        seeded(tmp, "e.prl", opts="cluster_size=4k", size="10M")
        shutil.move(p2, p)
    elif kind == "data-off-zero":
        set_field(p, "data_off", 0)
    return name


KINDS = ["clean", "unclean", "leak", "unclean-leak", "outside", "outside-far", "at-end", "fragmented", "empty",
         "data-off-zero"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_reads(tmp, kind):
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
    same_write(tmp, [name], "check", "-r", repair, "--output=json", name)


@pytest.mark.parametrize("kind", KINDS)
def test_writers(tmp, kind):
    """A writer refuses an image left in use; otherwise it marks it in use while open and cuts the file at the
    data end when it closes."""
    name = damaged(tmp, kind)
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "src.raw"), "10M")
    qemu_io("-f", "raw", "-c", "write -P 0x66 1M 100k", os.path.join(tmp, "src.raw"))
    same_write(tmp, [name, "src.raw"], "convert", "-n", "-O", "parallels", "src.raw", name)
    same_write(tmp, [name], "resize", name, "+1M")


# --- format extension ---------------------------------------------------------------------------------------

EXT_MAGIC = 0xAB234CEF23DCEA87
BITMAP_MAGIC = 0x20385FAE252CB34A


def with_extension(tmp, kind, name="x.prl"):
    """An image with a format extension cluster at the end of the file, built as qemu's parallels-ext.c reads
    it (a dirty bitmap feature by default)."""
    seeded(tmp, name, size="64M", opts="cluster_size=64k", ops=["write -P 0x11 0 1M"])
    p = os.path.join(tmp, name)
    cs = 65536
    size = os.path.getsize(p)
    ext_at = size
    data_at = size + cs
    nb = 64 * 2048
    gran = 65536
    bitmap_bytes = ((nb * 512 - 1) // gran // 64 + 1) * 8
    l1 = (bitmap_bytes + cs - 1) // cs
    entries = [data_at // 512] + [1] * (l1 - 1)
    uuid = bytes(range(16))
    feature_magic, flags = BITMAP_MAGIC, 0
    bf_size = nb
    if kind == "bad-size":
        bf_size = nb + 1
    if kind == "bad-l1":
        l1 += 1
        entries.append(0)
    if kind == "bad-granularity":
        gran = 1000 * 512
    if kind == "entry-far":
        entries[0] = (1 << 54) - 1
    if kind == "wrapped-entry":
        entries[0] = (1 << 55) + 1
    body = struct.pack("<Q16sII", bf_size, uuid, gran // 512, l1) + b"".join(struct.pack("<Q", e) for e in entries)
    if kind == "unknown-feature":
        feature_magic = 0x1234
    if kind == "flags":
        flags = 1
    data_size = len(body)
    if kind == "data-size":
        data_size = cs
    if kind == "small-feature":
        body, data_size = body[:20], 20
    feats = struct.pack("<QQII", feature_magic, flags, data_size, 0) + body
    feats += b"\0" * (-len(feats) % 8)
    if kind == "two-bitmaps":
        feats += feats
    if kind == "two-bitmaps-distinct":
        other = body[:8] + bytes(range(1, 17)) + body[24:]
        feats += struct.pack("<QQII", BITMAP_MAGIC, 0, len(other), 0) + other
    feats += struct.pack("<QQII", 0, 0, 0, 0)
    rest = feats + b"\0" * (cs - 24 - len(feats))
    digest = hashlib.md5(rest).digest()
    if kind == "bad-checksum":
        digest = b"\0" * 16
    magic = EXT_MAGIC if kind != "bad-magic" else 0x42
    cluster = struct.pack("<Q", magic) + digest + rest
    with open(p, "r+b") as f:
        f.seek(ext_at)
        f.write(cluster)
        f.write(b"\xff" * cs)
    set_field(p, "ext", ext_at // 512)
    if kind == "past-eof":
        set_field(p, "ext", (size + 100 * cs) // 512)
    if kind == "huge-offset":
        set_field(p, "ext", 1 << 53)
    if kind == "wrapped-offset":
        set_field(p, "ext", (1 << 55) + ext_at // 512)
    if kind == "aborting-offset":
        set_field(p, "ext", 1 << 55)
    return name


EXT_KINDS = ["ok", "wrapped-entry", "wrapped-offset", "aborting-offset", "bad-magic", "bad-checksum", "unknown-feature", "flags", "data-size", "small-feature", "bad-size",
             "bad-l1", "bad-granularity", "entry-far", "two-bitmaps", "two-bitmaps-distinct", "past-eof",
             "huge-offset"]


@pytest.mark.parametrize("kind", EXT_KINDS)
def test_format_extension(tmp, kind):
    """Read-only opens parse the extension (and fail as qemu does on a bad one); bitmaps stay hidden from info and
    from convert --bitmaps. A writer ignores the extension with qemu's warning."""
    name = with_extension(tmp, kind)
    for args in (["info", name], ["info", "--output=json", name], ["check", name], ["map", "--output=json", name],
                 ["convert", "--bitmaps", "-O", "qcow2", name, "out.qcow2"], ["convert", "-O", "raw", name, "o.raw"]):
        q, i = both(*args, cwd=tmp)
        if q.rc < 0:
            # qemu aborts (an assertion on the granularity): instar refuses the image cleanly.
            assert i.rc == 1 and i.err.startswith("instar: Could not open"), (args, i)
            continue
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)
    same_write(tmp, [name], "check", "-r", "all", name)


# --- hostile variants ---------------------------------------------------------------------------------------

def _hostile(tmp, field, value):
    name = seeded(tmp, opts="cluster_size=4k", size="10M", ops=["write -P 0x11 0 40k", "write -P 0x22 9M 8k"])
    p = os.path.join(tmp, name)
    if field == "truncated":
        with open(p, "r+b") as f:
            f.truncate(value)
    elif field.startswith("entry"):
        poke(p, 64 + 4 * int(field[5:]), "<I", value)
    else:
        set_field(p, field, value)
    return name


HOSTILE = [
    ("magic", b"WithoutFreeSpacX"), ("version", 3), ("version", 0), ("tracks", 0), ("tracks", 0x7FFFFFFF),
    ("tracks", 4186009), ("tracks", 4186010), ("tracks", 1), ("tracks", 3), ("bat", 0x20000000),
    ("bat", 0x1FFFFFFF), ("bat", 0x1FFFF000), ("bat", 0), ("bat", 0xFFFFFFFF), ("bat", 100000000),
    ("nb", 0), ("nb", 1 << 40), ("nb", 0xFFFFFFFFFFFFFFFF), ("nb", (1 << 54) - 1),
    ("data_off", 0), ("data_off", 0xFFFFFFFF), ("data_off", 1), ("inuse", INUSE), ("inuse", 1), ("flags", 0xFFFF),
    ("entry0", 0xFFFFFFFF), ("entry1", 0x80000000), ("entry0", 1), ("entry2", 0), ("entry3", 2),
    ("truncated", 10), ("truncated", 64), ("truncated", 100), ("truncated", 5000),
]
READ_CMDS = [["info", "IMG"], ["info", "--output=json", "IMG"], ["map", "--output=json", "IMG"],
             ["convert", "-O", "raw", "IMG", "out.raw"], ["compare", "IMG", "IMG"], ["check", "IMG"],
             ["info", "-f", "parallels", "IMG"]]
WRITE_CMDS = [["check", "-r", "all", "IMG"], ["check", "-r", "leaks", "IMG"],
              ["convert", "-n", "-O", "parallels", "src.raw", "IMG"]]


def digest(path):
    """Size and contents of a file that a close may have extended to a huge sparse length: the first 64 MiB and
    the last 64 KiB."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(64 << 20))
        if size > 64 << 20:
            f.seek(size - 65536)
            h.update(f.read())
    return h.hexdigest()


def limited(args, cwd, tool):
    argv = ["prlimit", "--as=%d" % (1 << 30), "--cpu=60", "--", INSTAR] if tool == "i" else ["qemu-img"]
    p = subprocess.run(argv + args, cwd=cwd, capture_output=True, text=True, timeout=600, errors="replace")
    return p.returncode, normalize(p.stdout), normalize(p.stderr)


@pytest.mark.parametrize("field,value", HOSTILE, ids=[f"{f}={v!r}" for f, v in HOSTILE])
def test_hostile(tmp, field, value):
    name = _hostile(tmp, field, value)
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "src.raw"), "10M")
    qemu_io("-f", "raw", "-c", "write -P 0x66 1M 100k", os.path.join(tmp, "src.raw"))
    for cmd in READ_CMDS:
        args = [name if a == "IMG" else a for a in cmd]
        q = limited(args, tmp, "q")
        i = limited(args, tmp, "i")
        assert 0 <= i[0] < 128 and "Fatal error" not in i[2], (args, i)
        if q[0] < 0:
            # qemu aborts (an assertion): instar answers, or fails cleanly.
            assert i[0] == 0 or i[2].startswith("instar: "), (args, i)
            continue
        assert i == q, (args, q, i)
    for cmd in WRITE_CMDS:
        results = []
        for who in ("q", "i"):
            d = os.path.join(tmp, "w" + who)
            os.makedirs(d, exist_ok=True)
            for f in (name, "src.raw"):
                shutil.copyfile(os.path.join(tmp, f), os.path.join(d, f))
            args = [name if a == "IMG" else a for a in cmd]
            results.append(limited(args, d, who))
            results.append(digest(os.path.join(d, name)))
        qr, qb, ir, ib = results
        assert 0 <= ir[0] < 128 and "Fatal error" not in ir[2], (cmd, ir)
        if qr[0] < 0:
            assert ir[0] != 0, (cmd, ir)
            continue
        if "probing guessed raw" in qr[2] and cmd[0] == "check":
            continue
        assert ir == qr, (cmd, qr, ir)
        assert ib == qb, (cmd, "image bytes differ")


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


def test_sigkill_leaves_no_corruption(tmp):
    """A writer killed part way leaves the in-use flag set (qemu's check reports that one error and nothing else:
    no BAT entry points past the file) and check -r all then repairs the image."""
    from conftest import ROOT  # noqa: E402
    size, cluster = 16 << 20, 4096
    for n in (1, 5, 20, 60, 150):
        path = os.path.join(tmp, f"n{n}.prl")
        qimg("create", "-q", "-f", "parallels", "-o", "cluster_size=4k", path, str(size))
        p = subprocess.run([sys.executable, "-c", CRASH_CHILD, ROOT, path, str(size), str(cluster), str(n), str(n)],
                           capture_output=True, cwd=tmp, timeout=300)
        assert p.returncode == -signal.SIGKILL, p
        c = run(["qemu-img", "check", path])
        assert c.rc == 2, c
        lines = c.err.splitlines()
        assert lines[0] == "ERROR image was not closed correctly", c.err
        assert all(x.startswith("ERROR space leaked at the end of the image") for x in lines[1:]), c.err
        assert "1 errors were found" in c.out, c.out
        c = run(["qemu-img", "check", "-r", "all", path])
        assert c.rc == 0, c
        c = run(["qemu-img", "check", path])
        assert c.rc == 0, c
