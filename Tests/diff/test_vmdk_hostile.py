"""Hostile vmdk images: damaged variants of images qemu-img made (header numbers, grain directory and table
entries, compressed grain markers, footers, descriptors of hostile size, line count, extent count and values,
parent links; vmfsSparse COWD and seSparse extents built byte by byte with hostile header numbers, directory and
table entries and sizes), each run through instar's info, info --output=json, map --output=json, convert -O raw and compare
under a 1 GiB address-space limit and a CPU limit, next to the real qemu-img on the same file (the same rules
as test_hostile.py: never a crash or hang; where qemu-img rejects, instar rejects with its exit code and a
short "instar: " error; where both accept, the same output and converted bytes).
"""
import os
import re
import signal
import struct
import subprocess

import pytest

from conftest import INSTAR, normalize, qemu_io, qimg
from test_hostile import AS_LIMIT, CPU_LIMIT, TIMEOUT, Run, _run
from vmdk_sparse_imgs import Cowd, SeSparse, cowd_image, pattern, se_image

COMMANDS = {
    "info": lambda x, out: ["info", x],
    "info-json": lambda x, out: ["info", "--output=json", x],
    "map-json": lambda x, out: ["map", "--output=json", x],
    "convert": lambda x, out: ["convert", "-O", "raw", x, out],
    "compare": lambda x, out: ["compare", x, x],
}

VARIANTS = {}


def variant(name):
    def deco(fn):
        VARIANTS[name] = fn
        return fn
    return deco


def _sparse(d, sub="monolithicSparse", size="8M", data=True):
    img = os.path.join(d, "img.vmdk")
    if sub == "streamOptimized":
        raw = os.path.join(d, "src.raw")
        qimg("create", "-q", "-f", "raw", raw, size)
        qemu_io("-f", "raw", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", raw)
        qimg("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
        os.unlink(raw)
    else:
        qimg("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", img, size)
        if data:
            qemu_io("-f", "vmdk", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", img)
    return img


def _patch(img, offset, fmt, value):
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


# VMDK4 header offsets (after the 4-byte magic at 0).
FIELDS = {"version": (4, "<I"), "flags": (8, "<I"), "capacity": (12, "<Q"), "granularity": (20, "<Q"),
          "desc_offset": (28, "<Q"), "num_gtes": (44, "<I"), "rgd": (48, "<Q"), "gd": (56, "<Q"),
          "grain": (64, "<Q"), "compress": (77, "<H")}

HEADER_CASES = [
    ("version", 4), ("version", 0xFFFFFFFF), ("version", 3), ("flags", 0xFFFFFFFF), ("flags", 0),
    ("capacity", 0), ("capacity", 1 << 62), ("capacity", 0xFFFFFFFFFFFFFFFF), ("capacity", 1 << 40),
    ("granularity", 0), ("granularity", 1), ("granularity", 3), ("granularity", 0x200001),
    ("granularity", 1 << 33), ("granularity", 0xFFFFFFFFFFFFFFFF), ("num_gtes", 0), ("num_gtes", 513),
    ("num_gtes", 1), ("rgd", 0xFFFFFFFFFFFFFF), ("rgd", 1 << 40), ("gd", 1 << 40), ("gd", 0xFFFFFFFFFFFFFFFE),
    ("gd", 0xFFFFFFFFFFFFFFFF), ("gd", 0), ("grain", 1 << 40), ("grain", 0xFFFFFFFFFFFFFFFF), ("compress", 1),
    ("compress", 2), ("desc_offset", 0xFFFFFFFFFFFF),
]

for field, value in HEADER_CASES:
    def _mk(d, field=field, value=value):
        img = _sparse(d)
        off, fmt = FIELDS[field]
        _patch(img, off, fmt, value)
        return img
    VARIANTS[f"hdr-{field}-{value:x}"] = _mk


def _gd_entry(value, backup=False):
    def mk(d):
        img = _sparse(d)
        with open(img, "rb") as f:
            hdr = f.read(80)
        (sector,) = struct.unpack_from("<Q", hdr, 48 if backup else 56)
        _patch(img, sector * 512, "<I", value)
        return img
    return mk


for v in (0xFFFFFFFF, 0x7FFFFFFF, 1, 0x1000000):
    VARIANTS[f"gd-entry-{v:x}"] = _gd_entry(v)
    VARIANTS[f"rgd-entry-{v:x}"] = _gd_entry(v, backup=True)


def _gt_entry(value, index=0):
    def mk(d):
        img = _sparse(d)
        with open(img, "rb") as f:
            hdr = f.read(80)
            (gd,) = struct.unpack_from("<Q", hdr, 56)
            f.seek(gd * 512)
            (gt,) = struct.unpack("<I", f.read(4))
        _patch(img, gt * 512 + index * 4, "<I", value)
        return img
    return mk


for v in (0xFFFFFFFF, 0x800000, 1, 2, 0x7FFFFF):
    VARIANTS[f"gt-entry-{v:x}"] = _gt_entry(v)


def _stream(mutate):
    def mk(d):
        img = _sparse(d, "streamOptimized")
        with open(img, "rb") as f:
            data = bytearray(f.read())
        mutate(data)
        with open(img, "wb") as f:
            f.write(data)
        return img
    return mk


def _grain_at(data):
    (gd,) = struct.unpack_from("<Q", data, 56)
    (gt,) = struct.unpack_from("<I", data, gd * 512)
    (grain,) = struct.unpack_from("<I", data, gt * 512)
    return grain * 512


VARIANTS["stream-marker-size-0"] = _stream(lambda b: struct.pack_into("<I", b, _grain_at(b) + 8, 0))
VARIANTS["stream-marker-size-huge"] = _stream(lambda b: struct.pack_into("<I", b, _grain_at(b) + 8, 0xFFFFFFFF))
VARIANTS["stream-marker-size-2cl"] = _stream(lambda b: struct.pack_into("<I", b, _grain_at(b) + 8, 131072))
VARIANTS["stream-garbage-zlib"] = _stream(lambda b: b.__setitem__(slice(_grain_at(b) + 12, _grain_at(b) + 40),
                                                                  b"\xAB" * 28))
VARIANTS["stream-no-marker-flag"] = _stream(lambda b: struct.pack_into("<I", b, 8, 3 | (1 << 16)))
# Grains of 384 MiB (qemu allows up to 1 GiB): qemu's read of a compressed grain takes three grain-sized buffers
# (1.2 GB here); instar streams it, so it stays inside the address-space limit (the differential fuzzer's
# vmdk-stream-132 was this: instar died allocating the output buffer).
VARIANTS["stream-granularity-c0080"] = _stream(lambda b: struct.pack_into("<Q", b, 20, 0xC0080))
VARIANTS["stream-granularity-c0080-gtes-1"] = _stream(lambda b: (struct.pack_into("<Q", b, 20, 0xC0080),
                                                                 struct.pack_into("<I", b, 44, 1)))
VARIANTS["stream-gd-at-end-no-footer"] = _stream(lambda b: struct.pack_into("<Q", b, 56, 0xFFFFFFFFFFFFFFFF))
VARIANTS["cowd-magic"] = lambda d: (_patch(_sparse(d), 0, ">I", 0x434F5744), os.path.join(d, "img.vmdk"))[1]


@variant("truncated-3-bytes")
def _(d):
    img = _sparse(d)
    os.truncate(img, 3)
    return img


@variant("truncated-header")
def _(d):
    img = _sparse(d)
    os.truncate(img, 40)
    return img


@variant("truncated-before-grains")
def _(d):
    img = _sparse(d)
    os.truncate(img, 4096)
    return img


@variant("desc-no-cid")
def _(d):
    img = _sparse(d)
    with open(img, "r+b") as f:
        f.seek(0x200)
        t = f.read(20 * 512)
        f.seek(0x200)
        f.write(t.replace(b"CID", b"XYZ"))
    return img


@variant("desc-parent-hint-unterminated")
def _(d):
    img = _sparse(d)
    _patch(img, 0x200, "30s", b'parentFileNameHint="abc' + b"x" * 7)
    return img


@variant("desc-parent-hint-self")
def _(d):
    img = _sparse(d)
    with open(img, "r+b") as f:
        f.seek(0x200)
        t = f.read(20 * 512).split(b"\0")[0]
        t = t.replace(b'createType="monolithicSparse"\n', b'createType="monolithicSparse"\nparentFileNameHint="img.vmdk"\n')
        f.seek(0x200)
        f.write(t)
    return img


HEAD = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"


def _desc(text, extents=()):
    def mk(d):
        for name, size in extents:
            with open(os.path.join(d, name), "wb") as f:
                f.truncate(size)
        p = os.path.join(d, "img.vmdk")
        with open(p, "w") as f:
            f.write(text if isinstance(text, str) else text())
        return p
    return mk


VARIANTS["desc-2mib"] = _desc(lambda: HEAD + 'createType="monolithicFlat"\n' + "# pad\n" * (2 << 18))
VARIANTS["desc-many-extents"] = _desc(lambda: HEAD + 'createType="monolithicFlat"\n'
                                      + 'RW 1 FLAT "e.raw" 0\n' * 20000, [("e.raw", 4096)])
VARIANTS["desc-huge-sectors"] = _desc(HEAD + 'createType="monolithicFlat"\nRW 9223372036854775807 FLAT "e.raw" 0\n',
                                      [("e.raw", 4096)])
VARIANTS["desc-sectors-overflow"] = _desc(HEAD + 'createType="monolithicFlat"\nRW 99999999999999999999 FLAT "e.raw" 0\n',
                                          [("e.raw", 4096)])
VARIANTS["desc-two-huge-extents"] = _desc(HEAD + 'createType="monolithicFlat"\nRW 9223372036854775000 FLAT "e.raw" 0\n'
                                          'RW 9223372036854775000 FLAT "e.raw" 0\n', [("e.raw", 4096)])
VARIANTS["desc-flat-offset-huge"] = _desc(HEAD + 'createType="monolithicFlat"\nRW 8 FLAT "e.raw" 9223372036854775807\n',
                                          [("e.raw", 4096)])
VARIANTS["desc-flat-offset-negative"] = _desc(HEAD + 'createType="monolithicFlat"\nRW 8 FLAT "e.raw" -1\n',
                                              [("e.raw", 4096)])
VARIANTS["desc-self-sparse"] = _desc(HEAD + 'createType="twoGbMaxExtentSparse"\nRW 8 SPARSE "img.vmdk"\n')
VARIANTS["desc-dir-extent"] = _desc(HEAD + 'createType="monolithicFlat"\nRW 8 FLAT "." 0\n')
VARIANTS["desc-long-createtype"] = _desc(HEAD + 'createType="' + "a" * 300 + '"\n')
VARIANTS["desc-long-filename"] = _desc(HEAD + 'createType="monolithicFlat"\nRW 8 FLAT "' + "n" * 600 + '" 0\n')
VARIANTS["desc-sesparse-empty"] = _desc(HEAD + 'createType="seSparse"\nRW 8 SESPARSE "e.raw"\n', [("e.raw", 4096)])
VARIANTS["desc-nul-inside"] = _desc(HEAD + 'createType="monolithicFlat"\n\0RW 8 FLAT "e.raw" 0\n', [("e.raw", 4096)])


@variant("desc-sparse-extent-is-descriptor")
def _(d):
    inner = os.path.join(d, "inner.vmdk")
    qimg("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", inner, "1M")
    p = os.path.join(d, "img.vmdk")
    with open(p, "w") as f:
        f.write(HEAD + 'createType="twoGbMaxExtentSparse"\nRW 2048 SPARSE "inner.vmdk"\n')
    return p


@variant("desc-split-extent-header-damaged")
def _(d):
    img = os.path.join(d, "img.vmdk")
    qimg("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img, "3G")
    ext = os.path.join(d, "img-s002.vmdk")
    _patch(ext, 44, "<I", 100000)
    return img


# vmfsSparse (COWD) and seSparse extents qemu-img cannot create, built byte by byte (vmdk_sparse_imgs.py) with
# one header number, table entry or size at a hostile value.
COWD_GRAINS = {0: pattern(1, 512), 5: pattern(2, 512), 4096: pattern(3, 512), 9000: pattern(4, 300)}
SE_GRAINS = {0: pattern(1, 4096), 3: pattern(2, 4096), 4096: pattern(3, 4096), 4100: pattern(4, 1000)}


def _cowd(sectors=131072, granularity=1, desc_sectors=None, **kw):
    return lambda d: cowd_image(d, Cowd(sectors, granularity, COWD_GRAINS, **kw), desc_sectors=desc_sectors)


def _se(sectors=65536, desc_sectors=None, **kw):
    return lambda d: se_image(d, SeSparse(sectors, SE_GRAINS, zero=[1], unmapped=[2], **kw),
                              desc_sectors=desc_sectors)


VARIANTS["cowd-granularity-3"] = _cowd(granularity=3)
for g in (0, 2, 0x200000, 0x200001, 0xFFFFFFFF):
    VARIANTS[f"cowd-granularity-field-{g:x}"] = _cowd(header={"granularity": g})
for n in (0, 1, 0x2000000, 0x2000001, 0xFFFFFFFF):
    VARIANTS[f"cowd-l1size-{n:x}"] = _cowd(header={"l1dir_size": n})
for n in (0, 1, 0xFFFFFFFF):
    VARIANTS[f"cowd-l1offset-{n:x}"] = _cowd(header={"l1dir_offset": n})
for n in (0, 1, 0xFFFFFFFF):
    VARIANTS[f"cowd-sectors-{n:x}"] = _cowd(header={"disk_sectors": n})
for v in (0xFFFFFFFF, 1, 0x7FFFFF):
    VARIANTS[f"cowd-gd-entry-{v:x}"] = _cowd(gd_entries={0: v})
    VARIANTS[f"cowd-gt-entry-{v:x}"] = _cowd(gt_entries={5: v})
VARIANTS["cowd-truncated-header"] = _cowd(truncate_to=20)
VARIANTS["cowd-truncated-tables"] = _cowd(truncate_to=2600)
VARIANTS["cowd-desc-sectors-differ"] = _cowd(desc_sectors=8)
VARIANTS["cowd-empty-extent"] = _desc(HEAD + 'createType="vmfsSparse"\nRW 8 VMFSSPARSE "e.raw"\n', [("e.raw", 0)])

for field, v in [("magic", 0), ("magic", 0xCAFECAFE), ("version", 0x0000000200000002), ("version", 0),
                 ("grain_size", 16), ("grain_size", 0), ("grain_table_size", 128), ("grain_table_size", 0),
                 ("flags", 1), ("reserved3", 5), ("volatile_header_offset", 1 << 30),
                 ("volatile_header_offset", 1 << 54), ("volatile_header_offset", 1 << 55),
                 ("volatile_header_offset", 0xFFFFFFFFFFFFFFFF), ("volatile_header_offset", 0),
                 ("grain_dir_size", 0), ("grain_dir_size", (1 << 19) + 1), ("grain_dir_size", 1 << 19),
                 ("grain_dir_size", 1 << 55), ("grain_dir_size", 0xFFFFFFFFFFFFFFFF),
                 ("grain_dir_offset", 1 << 30), ("grain_dir_offset", 1 << 54), ("grain_dir_offset", 0xFFFFFFFFFFFFFFFF),
                 ("grain_dir_offset", 0), ("capacity", 0), ("capacity", 1 << 40), ("capacity", 1 << 63),
                 ("capacity", 0xFFFFFFFFFFFFFFFF), ("grain_tables_offset", 0xFFFFFFFF00000000),
                 ("grain_tables_offset", 0xFFFFFFFFFFFFFFC0), ("grain_tables_offset", 0xFFFFFFC0),
                 ("grain_tables_offset", 0), ("grains_offset", 1 << 61), ("grains_offset", 0xFFFFFFFFFFFFFFF8),
                 ("grains_offset", 1 << 40), ("grains_offset", 0)]:
    VARIANTS[f"se-{field}-{v:x}"] = _se(const={field: v})
for field, v in [("magic", 0), ("replay_journal", 1), ("free_gt_number", 0xFFFFFFFFFFFFFFFF)]:
    VARIANTS[f"se-volatile-{field}-{v:x}"] = _se(volatile={field: v})
VARIANTS["se-const-padding"] = _se(const_pad=(511, b"\x01"))
VARIANTS["se-volatile-padding"] = _se(volatile_pad=(100, b"\x01"))
for v in (0x2000000000000000, 0x1000000000000000 | 0xFFFFFFFF, 0x1000000100000000, 0x1000000000001000, 1):
    VARIANTS[f"se-gd-entry-{v:x}"] = _se(gd_entries={0: v})
for v in (1, 0x4000000000000000, 0xF000000000000000, 0x3FFFFFFFFFFFFFFF, 0x3000000000100000,
          0x1FFFFFFFFFFFFFFF, 0x3000000000000000):
    VARIANTS[f"se-gt-entry-{v:x}"] = _se(gt_entries={3: v})
VARIANTS["se-truncated-volatile"] = _se(truncate_to=700)
VARIANTS["se-truncated-tables"] = _se(truncate_to=40 * 512)
VARIANTS["se-desc-sectors-differ"] = _se(desc_sectors=8)
VARIANTS["se-empty-extent"] = _desc(HEAD + 'createType="seSparse"\nRW 8 SESPARSE "e.raw"\n', [("e.raw", 0)])
VARIANTS["se-missing-extent"] = _desc(HEAD + 'createType="seSparse"\nRW 8 SESPARSE "nothere.vmdk"\n')


NAMES = sorted(VARIANTS)

# Deliberate differences, for which only the no-crash rule is checked:
# - a capacity of 2^62 sectors: qemu-img compare opens it and then fails to get its size (exit 4); instar refuses
#   it at open as qemu's info does (exit 2 in compare);
# - a flat extent offset of 2^63-1 sectors: qemu's map prints the wrapped host offset as a negative number;
# - a seSparse capacity of 2^63 sectors: qemu takes it as a negative sector count, so info fails (as instar's
#   does) but compare opens it and fails later to get its size (exit 4); instar refuses it at open (exit 2).
DELIBERATE = {"hdr-capacity-4000000000000000", "desc-flat-offset-huge", "se-capacity-8000000000000000"}


def _one(root, name):
    d = os.path.join(root, name)
    os.makedirs(d)
    try:
        image = VARIANTS[name](d)
    except Exception as e:
        return {"setup-error": repr(e)}
    res = {}
    out = os.path.join(d, "out.raw")
    for cmd, args in COMMANDS.items():
        q = _run(["prlimit", "--nofile=1024", f"--cpu={CPU_LIMIT}", "--", "qemu-img", *args(image, out)], d, out)
        q.out, q.err = normalize(q.out), normalize(q.err)
        i = _run(["prlimit", f"--as={AS_LIMIT}", f"--cpu={CPU_LIMIT}", "--", INSTAR, *args(image, out)], d, out)
        res[cmd] = (q, i)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vmdk-hostile"))
    return {name: _one(root, name) for name in NAMES}


def _get(results, name):
    r = results[name]
    assert "setup-error" not in r, f"could not build variant {name}: {r['setup-error']}"
    return r


@pytest.mark.parametrize("name", NAMES)
def test_never_crashes(results, name):
    for cmd, (q, i) in _get(results, name).items():
        assert not i.timed_out, f"{name}: instar {cmd} timed out: {i}"
        assert i.rc is not None and 0 <= i.rc < 128, f"{name}: instar {cmd} died: {i}"
        for marker in ("Fatal error", "Swift runtime failure", "Stack dump", "Illegal instruction", "Segmentation"):
            assert marker not in i.err, f"{name}: instar {cmd} trapped: {i}"


@pytest.mark.parametrize("name", NAMES)
def test_rejects_where_qemu_rejects(results, name):
    if name in DELIBERATE:
        pytest.skip("deliberate difference (see DELIBERATE)")
    for cmd, (q, i) in _get(results, name).items():
        if q.timed_out or q.rc is None or q.rc < 0 or q.rc == 0 or (cmd == "compare" and q.rc == 1):
            continue
        assert i.rc == q.rc, f"{name}: {cmd}: qemu-img rc {q.rc}, instar rc {i.rc}\n qemu: {q}\n instar: {i}"
        lines = i.err.strip("\n").split("\n")
        assert i.err.strip() and any(line.startswith("instar: ") for line in lines), f"{name}: {cmd}: {i}"


@pytest.mark.parametrize("name", NAMES)
def test_same_result_where_qemu_accepts(results, name):
    if name in DELIBERATE:
        pytest.skip("deliberate difference (see DELIBERATE)")
    for cmd, (q, i) in _get(results, name).items():
        if q.timed_out or q.rc is None or q.rc != 0:
            continue
        assert i.rc == 0, f"{name}: {cmd}: qemu-img accepts, instar fails\n qemu: {q}\n instar: {i}"
        assert i.out == q.out, f"{name}: {cmd}\n qemu: {q}\n instar: {i}"
        if cmd == "convert":
            assert i.digest == q.digest, f"{name}: converted bytes differ"


def test_write_into_huge_grains(tmp):
    """convert -n into a monolithicSparse vmdk whose header gives 128 MiB grains: each new grain is filled around
    the request (get_whole_cluster) a step at a time, so instar stays inside a 128 MiB address-space limit (it
    used to allocate the whole grain and died). The result is qemu-img's, but for the descriptor's random CID."""
    src = os.path.join(tmp, "src.raw")
    with open(src, "wb") as f:
        for i in range(8):
            f.write(bytes([i + 1]) * (1 << 20))
    files = {}
    for who in ("qemu", "instar"):
        os.makedirs(os.path.join(tmp, who))
        img = os.path.join(tmp, who, "img.vmdk")
        qimg("create", "-q", "-f", "vmdk", img, "8M")
        _patch(img, FIELDS["granularity"][0], "<Q", 0x40000)
        argv = ["convert", "-n", "-f", "raw", "-O", "vmdk", src, img]
        if who == "qemu":
            r = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, timeout=TIMEOUT)
        else:
            r = subprocess.run(["prlimit", "--as=134217728", "--", INSTAR, *argv], capture_output=True, text=True,
                               timeout=TIMEOUT)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (who, r)
        assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, img],
                              capture_output=True).returncode == 0, who
        with open(img, "rb") as f:
            files[who] = f.read()
    q, i = files["qemu"], files["instar"]
    assert len(q) == len(i)
    # Both tools write the new CID as "%x" (1 to 8 digits), so the descriptor's text is compared up to its NUL
    # with the number taken out, and every byte outside the descriptor's sectors as it is.
    start, count = (x * 512 for x in struct.unpack_from("<QQ", q, 28))
    assert struct.unpack_from("<QQ", i, 28) == (start // 512, count // 512)

    def text(b):
        t = b[start:start + count].split(b"\0", 1)[0]
        return re.sub(rb"\nCID=[0-9a-f]{1,8}\n", b"\nCID=\n", t, count=1)

    assert b"\nCID=\n" in text(q) and text(q) == text(i)
    assert q[:start] == i[:start] and q[start + count:] == i[start + count:]
