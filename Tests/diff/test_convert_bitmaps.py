"""convert --bitmaps / --skip-broken-bitmaps against qemu-img 7.2.

Sources get their bitmaps from qemu itself: `qemu-img bitmap --add`, then qemu-io writes (an enabled bitmap
opened read/write records them and qemu stores it on close), `--merge`, `--disable`. In-use and all-ones
table entries are patched in by hand as qcow2.txt describes them. Targets written by both programs must be
byte-identical, `qemu-img check` clean, and hold the same bitmap bits (parsed here from the bitmap tables).
"""
import json
import os
import struct

import pytest

from conftest import info_json, instar, qemu, qemu_io, qimg, run

BITMAPS_EXT = 0x23852875


def header(path):
    with open(path, "rb") as f:
        h = f.read(112)
    cluster_bits = struct.unpack(">I", h[20:24])[0]
    size = struct.unpack(">Q", h[24:32])[0]
    hdr_len = struct.unpack(">I", h[100:104])[0]
    return 1 << cluster_bits, size, hdr_len


def directory(path):
    """The bitmap directory: [(entry offset in file, name, flags, granularity bits, table offset, table size)]."""
    cs, _, hdr_len = header(path)
    with open(path, "rb") as f:
        area = f.read(cs)
        pos, ext = hdr_len, None
        while pos + 8 <= len(area):
            t, ln = struct.unpack(">II", area[pos:pos + 8])
            if t == 0:
                break
            if t == BITMAPS_EXT:
                ext = struct.unpack(">IIQQ", area[pos + 8:pos + 32])
            pos += 8 + ((ln + 7) & ~7)
        if ext is None:
            return []
        n, _, dsize, doff = ext
        f.seek(doff)
        d = f.read(dsize)
    out, p = [], 0
    for _ in range(n):
        toff, tsize, flags, _typ, gbits, nlen, extra = struct.unpack(">QIIBBHI", d[p:p + 24])
        name = d[p + 24 + extra:p + 24 + extra + nlen].decode()
        out.append((doff + p, name, flags, gbits, toff, tsize))
        p += (24 + extra + nlen + 7) & ~7
    return out


def bitmap_bits(path):
    """{name: (flags, granularity, set bit indexes)} read as qemu's load_bitmap_data does."""
    cs, size, _ = header(path)
    out = {}
    with open(path, "rb") as f:
        for _, name, flags, gbits, toff, tsize in directory(path):
            f.seek(toff)
            table = struct.unpack(">%dQ" % tsize, f.read(8 * tsize))
            nbits = (size + (1 << gbits) - 1) >> gbits
            per = cs * 8
            bits = []
            for k, e in enumerate(table):
                off = e & 0x00fffffffffffe00
                count = max(0, min(per, nbits - k * per))
                if off:
                    f.seek(off)
                    data = f.read(cs)
                    bits += [k * per + b for b in range(count) if data[b // 8] >> (b % 8) & 1]
                elif e & 1:
                    bits += list(range(k * per, k * per + count))
            out[name] = (flags, 1 << gbits, bits)
    return out


def set_in_use(path, name):
    for off, n, flags, *_ in directory(path):
        if n == name:
            with open(path, "r+b") as f:
                f.seek(off + 12)
                f.write(struct.pack(">I", flags | 1))
            return
    raise AssertionError(name)


def make_all_ones(path, name, index):
    """Turns bitmap table entry `index` into the "all ones" form (its data cluster becomes a leak)."""
    for _, n, _, _, toff, _ in directory(path):
        if n == name:
            with open(path, "r+b") as f:
                f.seek(toff + 8 * index)
                f.write(struct.pack(">Q", 1))
            return
    raise AssertionError(name)


def check_json(path):
    r = run(["qemu-img", "check", "--output=json", path])
    d = json.loads(r.out)
    d.pop("filename", None)
    return r.rc, d


def convert_pair(tmp, src, *opts, precreate=None):
    """Runs both converts of `src` into q.qcow2 / i.qcow2 with the same options and compares everything."""
    q_out, i_out = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    for p in (q_out, i_out):
        if os.path.exists(p):
            os.unlink(p)
        if precreate:
            qimg("create", "-f", "qcow2", *precreate[:-1], p, precreate[-1])
    q = qemu("convert", "--bitmaps", "-O", "qcow2", *opts, src, q_out)
    i = instar("convert", "--bitmaps", "-O", "qcow2", *opts, src, i_out)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    assert os.path.exists(i_out) == os.path.exists(q_out)
    if q.rc != 0 or not os.path.exists(q_out):
        if os.path.exists(q_out):
            assert info_json(i_out) == info_json(q_out)
        return q
    assert info_json(i_out) == info_json(q_out)
    rc, chk = check_json(i_out)
    assert rc == 0 and chk.get("leaks", 0) == 0 and chk.get("corruptions", 0) == 0, chk
    assert check_json(i_out) == check_json(q_out)
    assert bitmap_bits(i_out) == bitmap_bits(q_out)
    assert same_bytes(q_out, i_out)
    return q


def same_bytes(a, b):
    with open(a, "rb") as x, open(b, "rb") as y:
        return x.read() == y.read()


def base_image(tmp, name="src.qcow2", size="10M", opts=()):
    p = os.path.join(tmp, name)
    qimg("create", "-f", "qcow2", *opts, p, size)
    return p


def test_enabled_and_disabled(tmp):
    src = base_image(tmp)
    qimg("bitmap", "--add", src, "b1")
    qimg("bitmap", "--add", "-g", "128k", "--disable", src, "b2")
    qemu_io("-c", "write -P 1 0 64k", "-c", "write -P 2 3M 1M", src)
    bits = bitmap_bits(src)
    assert bits["b1"][2] and not bits["b2"][2]
    convert_pair(tmp, src)


def test_merged_disabled_and_cleared(tmp):
    src = base_image(tmp, size="64M")
    qimg("bitmap", "--add", "-g", "512", src, "fine")
    qimg("bitmap", "--add", src, "gone")
    qemu_io("-c", "write 1M 4k", "-c", "write 40M 3M", "-c", "write 63M 1M", src)
    qimg("bitmap", "--add", "--disable", "-g", "1M", src, "merged")
    qimg("bitmap", "--merge", "fine", src, "merged")
    qimg("bitmap", "--clear", src, "gone")
    qimg("bitmap", "--disable", src, "fine")
    assert bitmap_bits(src)["merged"][2]
    convert_pair(tmp, src)


def test_bitmap_from_another_image(tmp):
    other = base_image(tmp, "other.qcow2")
    qimg("bitmap", "--add", other, "x")
    qemu_io("-c", "write 2M 256k", other)
    src = base_image(tmp)
    qemu_io("-c", "write -P 7 0 1M", src)
    qimg("bitmap", "--add", src, "copy")
    qimg("bitmap", "--merge", "x", "-b", other, "-F", "qcow2", src, "copy")
    assert bitmap_bits(src)["copy"][2]
    convert_pair(tmp, src)


@pytest.mark.parametrize("src_cluster,target_opts", [
    ("512", ()),
    ("65536", ("-o", "cluster_size=512")),
    ("65536", ("-o", "cluster_size=4096")),
    ("4096", ("-o", "cluster_size=2M")),
    ("65536", ("-o", "lazy_refcounts=on")),
    ("65536", ("-o", "refcount_bits=1")),
    ("65536", ("-c",)),
    ("65536", ("-t", "none")),
    ("512", ("-t", "writethrough", "-p")),
])
def test_cluster_sizes_and_options(tmp, src_cluster, target_opts):
    # 512-byte granularity over 20 MiB: 5 KiB of bits, several bitmap clusters with small clusters.
    src = base_image(tmp, size="20M", opts=("-o", "cluster_size=" + src_cluster))
    qimg("bitmap", "--add", "-g", "512", src, "a")
    qimg("bitmap", "--add", "-g", "64k", src, "b")
    qemu_io("-c", "write -P 3 0 8k", "-c", "write -P 4 9M 1536", "-c", "write -P 5 19M 1M", src)
    convert_pair(tmp, src, *target_opts)


def test_all_ones_entry(tmp):
    src = base_image(tmp, size="8M", opts=("-o", "cluster_size=512"))
    qimg("bitmap", "--add", "-g", "512", src, "ones")
    qemu_io("-c", "write 0 2M", src)
    # 512-byte clusters hold 4096 bits, i.e. 2 MiB at 512-byte granularity: entry 0 is fully dirty.
    make_all_ones(src, "ones", 0)
    assert bitmap_bits(src)["ones"][2] == list(range(4096))
    convert_pair(tmp, src)


def test_many_bitmaps_odd_size_and_names(tmp):
    src = base_image(tmp, size=str(10 * 1024 * 1024 + 512))
    names = ["bm%d" % i for i in range(12)] + ["ünïcode name", "x" * 1023]
    for i, n in enumerate(names):
        qimg("bitmap", "--add", "-g", str(512 << (i % 8)), src, n)
    qemu_io("-c", "write 0 4k", "-c", "write %d 512" % (10 * 1024 * 1024), src)
    convert_pair(tmp, src)


def test_no_bitmaps_and_backing(tmp):
    src = base_image(tmp)
    qemu_io("-c", "write 0 1M", src)
    convert_pair(tmp, src)
    base = base_image(tmp, "base.qcow2")
    qimg("bitmap", "--add", base, "inbase")
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qimg("bitmap", "--add", top, "intop")
    qemu_io("-c", "write 1M 64k", top)
    convert_pair(tmp, top)


def test_existing_target(tmp):
    src = base_image(tmp)
    qimg("bitmap", "--add", src, "b")
    qemu_io("-c", "write 0 64k", src)
    convert_pair(tmp, src, "-n", precreate=("-o", "cluster_size=4096", "10M"))
    # A larger target: the bitmap sizes differ, so the merge fails after the copy.
    convert_pair(tmp, src, "-n", precreate=("20M",))


def test_in_use_refused(tmp):
    src = base_image(tmp)
    for n in ("b1", "b2", "b3"):
        qimg("bitmap", "--add", src, n)
    qemu_io("-c", "write 0 64k", src)
    set_in_use(src, "b1")
    set_in_use(src, "b2")
    q = convert_pair(tmp, src)
    assert q.rc == 1 and "inconsistent bitmap 'b2'" in q.err
    q = convert_pair(tmp, src, "--skip-broken-bitmaps")
    assert q.rc == 0 and "Skipping" in q.err


def test_all_in_use_skipped(tmp):
    src = base_image(tmp)
    qimg("bitmap", "--add", src, "only")
    set_in_use(src, "only")
    convert_pair(tmp, src, "--skip-broken-bitmaps")
    assert directory(os.path.join(tmp, "i.qcow2")) == []


@pytest.mark.parametrize("case", ["v2_target", "raw_target", "v2_source", "raw_source", "two_sources",
                                  "skip_without_bitmaps"])
def test_errors(tmp, case):
    src = base_image(tmp)
    qimg("bitmap", "--add", src, "b")
    qemu_io("-c", "write 0 64k", src)
    args = ["--bitmaps", "-O", "qcow2"]
    target = "out.img"
    srcs = [src]
    if case == "v2_target":
        args += ["-o", "compat=0.10"]
    elif case == "raw_target":
        args = ["--bitmaps", "-O", "raw"]
    elif case == "v2_source":
        srcs = [base_image(tmp, "v2.qcow2", opts=("-o", "compat=0.10"))]
    elif case == "raw_source":
        raw = os.path.join(tmp, "s.raw")
        qimg("create", "-f", "raw", raw, "1M")
        srcs = ["-f", "raw", raw]
    elif case == "two_sources":
        srcs = [src, src]
    elif case == "skip_without_bitmaps":
        args = ["--skip-broken-bitmaps", "-O", "qcow2"]
    out = os.path.join(tmp, target)
    q = qemu("convert", *args, *srcs, target, cwd=tmp)
    q_left = os.path.exists(out)
    if q_left:
        os.unlink(out)
    i = instar("convert", *args, *srcs, target, cwd=tmp)
    assert q.rc == 1 and (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    assert os.path.exists(out) == q_left


@pytest.mark.parametrize("patch", ["reserved_bits", "unaligned", "ones_with_offset", "table_size"])
def test_hostile_bitmap_table(tmp, patch):
    """Broken tables fail cleanly. qemu reports them when it opens the source (it loads bitmaps at open);
    instar when it reads the bitmap, after creating the target, with the same reason."""
    src = base_image(tmp)
    qimg("bitmap", "--add", src, "b1")
    qemu_io("-c", "write 0 64k", src)
    ((doff, _, _, _, toff, tsize),) = directory(src)
    with open(src, "r+b") as f:
        f.seek(toff)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(toff)
        if patch == "reserved_bits":
            f.write(struct.pack(">Q", entry | 2))
        elif patch == "unaligned":
            f.write(struct.pack(">Q", entry + 512))
        elif patch == "ones_with_offset":
            f.write(struct.pack(">Q", entry | 1))
        else:
            f.seek(doff + 8)
            f.write(struct.pack(">I", tsize + 1000))
    q = qemu("convert", "--bitmaps", "-O", "qcow2", src, os.path.join(tmp, "q.qcow2"))
    i = instar("convert", "--bitmaps", "-O", "qcow2", src, os.path.join(tmp, "i.qcow2"))
    assert q.rc == 1 and i.rc == 1, (q, i)
    reason = i.err.split("instar: ", 1)[1].strip()
    if patch != "table_size":
        assert q.err.strip().endswith(reason), (q, i)
