"""The vpc (VHD) format against qemu-img 7.2: create (dynamic, fixed, force_size, qemu's CHS rounding), reading
images qemu-img and qemu-io made (info, map, compare, convert), writing (convert -O vpc, convert -n into an
existing image) with files byte-identical once the footer's timestamp, checksum and uuid are masked, qemu's
size rules per creator application, checksum handling, and the operations qemu refuses for vpc."""
import json
import os
import re
import shutil
import struct

import pytest
from conftest import INSTAR, assert_same, both, info_json, instar, qemu, qemu_io, qimg

FOOTER_TIMESTAMP = (24, 28)
FOOTER_CHECKSUM_UUID = (64, 84)


def masked(path):
    """The file's bytes with every footer copy's timestamp, checksum and uuid zeroed (qemu puts the time and a
    random uuid there)."""
    b = bytearray(open(path, "rb").read())
    for off in range(0, len(b), 512):
        if b[off:off + 8] == b"conectix":
            for lo, hi in (FOOTER_TIMESTAMP, FOOTER_CHECKSUM_UUID):
                b[off + lo:off + hi] = bytes(hi - lo)
    return bytes(b)


def assert_files_same(q, i):
    assert os.path.getsize(q) == os.path.getsize(i), (os.path.getsize(q), os.path.getsize(i))
    mq, mi = masked(q), masked(i)
    if mq != mi:
        first = next(n for n in range(len(mq)) if mq[n] != mi[n])
        raise AssertionError(f"{q} and {i} differ first at byte {first}")


def checksum(data):
    return ~sum(data) & 0xFFFFFFFF


def refresh_footer_checksum(b, off):
    b[off + 64:off + 68] = b"\0\0\0\0"
    b[off + 64:off + 68] = struct.pack(">I", checksum(b[off:off + 512]))


def info_both(path, *extra):
    """Compares `info` (human and JSON) of one image; returns qemu's JSON."""
    assert_same("info", *extra, path)
    q = assert_same("info", "--output=json", *extra, path)
    return json.loads(q.out) if q.rc == 0 else None


def map_both(path, *extra):
    assert_same("map", *extra, path)
    assert_same("map", "--output=json", *extra, path)


def raw_of(tmp, path, *extra):
    """Converts `path` to raw with both tools; the results must be equal. Returns qemu's raw file."""
    q, i = os.path.join(tmp, "q.raw"), os.path.join(tmp, "i.raw")
    for p in (q, i):
        if os.path.exists(p):
            os.unlink(p)
    qr = qemu("convert", *extra, "-O", "raw", path, q)
    ir = instar("convert", *extra, "-O", "raw", path, i)
    assert (ir.rc, ir.out, ir.err.replace(i, q)) == (qr.rc, qr.out, qr.err), (qr, ir)
    if qr.rc == 0:
        assert open(q, "rb").read() == open(i, "rb").read()
    return q


# ---- create ------------------------------------------------------------------------------------------------

CREATE_CASES = [
    ("0", ""), ("1000", ""), ("1M", ""), ("100M", ""), ("127M", ""), ("130000001", ""), ("10G", ""),
    ("2040G", ""), ("3T", ""), ("100M", "force_size=on"), ("130000001", "force_size=on"),
    ("2040G", "force_size=on"), ("2041G", "force_size=on"), ("1M", "subformat=dynamic"),
    ("1M", "subformat=fixed"), ("1000", "subformat=fixed"), ("100M", "subformat=fixed"),
    ("100M", "subformat=fixed,force_size=on"), ("130000001", "subformat=fixed,force_size=on"),
    ("3T", "subformat=fixed"), ("1M", "subformat=foo"), ("1M", "subformat="), ("1M", "force_size=maybe"),
    ("1M", "force_size=off"), ("1M", "preallocation=full"),
]


@pytest.mark.parametrize("size,opts", CREATE_CASES)
def test_create_matches(tmp, size, opts):
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    o = ["-o", opts] if opts else []
    qr = qemu("create", "-f", "vpc", *o, q, size)
    ir = instar("create", "-f", "vpc", *o, i, size)
    assert (ir.rc, ir.out.replace(i, q), ir.err.replace(i, q)) == (qr.rc, qr.out, qr.err), (qr, ir)
    assert os.path.exists(q) == os.path.exists(i)
    if not os.path.exists(q):
        return
    assert_files_same(q, i)
    if qr.rc == 0:
        fmt = ["-f", "vpc"] if "fixed" in opts else []
        assert info_json(i, *fmt) == info_json(q, *fmt)
        info_both(i, *fmt)


def test_create_help_matches():
    assert_same("create", "-f", "vpc", "-o", "help")


# ---- reading what qemu wrote -------------------------------------------------------------------------------

WRITES = ["write -P 0x11 0 64k", "write -P 0x22 5M 1M", "write -P 0x33 3000k 7k", "write -P 0 40M 4k",
          "write -P 0x44 2047k 2k", "write -P 0x55 63M 1M"]


@pytest.fixture(params=["dynamic", "fixed", "force"])
def written(request, tmp):
    """A 64 MiB image of each kind with data qemu-io wrote at several offsets (some crossing blocks)."""
    p = os.path.join(tmp, f"w-{request.param}.vhd")
    opts = {"dynamic": [], "fixed": ["-o", "subformat=fixed"], "force": ["-o", "force_size=on"]}[request.param]
    qimg("create", "-q", "-f", "vpc", *opts, p, "64M")
    args = []
    for w in WRITES:
        args += ["-c", w]
    qemu_io("-f", "vpc", *args, p)
    return p, ["-f", "vpc"]


def test_read_info_map(written):
    p, fmt = written
    info_both(p, *fmt)
    info_both(p)
    map_both(p, *fmt)


def test_read_convert_and_compare(tmp, written):
    p, fmt = written
    r = raw_of(tmp, p, *fmt)
    for a, b in ((p, r), (r, p)):
        fa = fmt if a == p else ["-f", "raw"]
        fb = ["-F", "vpc"] if b == p else ["-F", "raw"]
        assert_same("compare", *fa, *fb, a, b)
    qc, ic = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    qr, ir = qemu("convert", *fmt, "-O", "qcow2", p, qc), instar("convert", *fmt, "-O", "qcow2", p, ic)
    assert (qr.rc, ir.rc) == (0, 0), (qr, ir)
    assert qemu("compare", qc, ic).rc == 0
    assert open(qc, "rb").read() == open(ic, "rb").read()
    # compare of a changed copy: the first differing offset and exit code match.
    changed = os.path.join(tmp, "c.raw")
    shutil.copyfile(r, changed)
    with open(changed, "r+b") as f:
        f.seek(5 * 1024 * 1024 + 12345)
        f.write(b"x")
    assert_same("compare", *fmt, "-F", "raw", p, changed)


# ---- writing -----------------------------------------------------------------------------------------------

@pytest.fixture
def source(tmp):
    """A qcow2 source with data at several offsets, zero runs and unallocated space."""
    p = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "70M")
    args = []
    for w in WRITES + ["write -P 0x66 69M 512", "write -z 6M 64k"]:
        args += ["-c", w]
    qemu_io("-f", "qcow2", *args, p)
    return p


@pytest.mark.parametrize("opts", [[], ["-o", "subformat=fixed"], ["-o", "force_size=on"],
                                  ["-o", "subformat=fixed,force_size=on"]])
@pytest.mark.parametrize("src_fmt", ["qcow2", "raw"])
def test_convert_to_vpc_byte_identical(tmp, source, opts, src_fmt):
    src = source
    if src_fmt == "raw":
        src = os.path.join(tmp, "src.raw")
        qimg("convert", "-O", "raw", source, src)
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    qr = qemu("convert", "-O", "vpc", *opts, src, q)
    ir = instar("convert", "-O", "vpc", *opts, src, i)
    assert (ir.rc, ir.out, ir.err) == (qr.rc, qr.out, qr.err), (qr, ir)
    assert_files_same(q, i)
    fmt = ["-f", "vpc"] if "fixed" in " ".join(opts) else []
    assert qemu("compare", *fmt, "-F", src_fmt, i, src).rc == 0
    assert info_json(i, *fmt) == info_json(q, *fmt)


def test_convert_to_vpc_progress_and_sparse_flags(tmp, source):
    for extra in (["-S", "0"], ["-S", "64k"], ["-p"], ["-W"]):
        q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
        for p in (q, i):
            if os.path.exists(p):
                os.unlink(p)
        qr = qemu("convert", *extra, "-O", "vpc", source, q)
        ir = instar("convert", *extra, "-O", "vpc", source, i)
        assert (ir.rc, ir.err) == (qr.rc, qr.err), (extra, qr, ir)
        if "-W" not in extra:
            # Out-of-order writes (-W) allocate blocks in whatever order the requests finish.
            assert_files_same(q, i)
        assert qemu("compare", i, source).rc == 0, extra


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_convert_n_into_existing_image(tmp, source, kind):
    """convert -n writes every range, zeroes included (vpc has no zero-write, so zeroes allocate), into blocks
    qemu-io already allocated and into new ones."""
    base = os.path.join(tmp, "base.vhd")
    opts = ["-o", "subformat=fixed"] if kind == "fixed" else []
    qimg("create", "-q", "-f", "vpc", *opts, base, "70M")
    qemu_io("-f", "vpc", "-c", "write -P 0x77 1M 8k", "-c", "write -P 0x78 30M 4k", base)
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    shutil.copyfile(base, q)
    shutil.copyfile(base, i)
    qr = qemu("convert", "-n", "-O", "vpc", source, q)
    ir = instar("convert", "-n", "-O", "vpc", source, i)
    assert (ir.rc, ir.out, ir.err) == (qr.rc, qr.out, qr.err), (qr, ir)
    assert open(q, "rb").read() == open(i, "rb").read()
    assert qemu("compare", "-f", "vpc", i, source).rc == 0


def test_write_into_block_with_partial_bitmap(tmp, source):
    """A block whose sector bitmap another tool left partly clear gets its bitmap set in full on the next write,
    as qemu does."""
    base = os.path.join(tmp, "base.vhd")
    qimg("create", "-q", "-f", "vpc", base, "70M")
    qemu_io("-f", "vpc", "-c", "write -P 0x77 1M 8k", base)
    b = bytearray(open(base, "rb").read())
    bat0 = struct.unpack(">I", b[1536:1540])[0]
    b[bat0 * 512:bat0 * 512 + 64] = bytes(64)
    open(base, "wb").write(b)
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    shutil.copyfile(base, q)
    shutil.copyfile(base, i)
    qr = qemu("convert", "-n", "-O", "vpc", source, q)
    ir = instar("convert", "-n", "-O", "vpc", source, i)
    assert (ir.rc, ir.err) == (qr.rc, qr.err), (qr, ir)
    assert open(q, "rb").read() == open(i, "rb").read()


# ---- size rules per creator application, checksums ---------------------------------------------------------

def patched(tmp, name, *, app=None, current_size=None, chs=None, fixed=False, fix_checksum=True,
            header_checksum=None):
    """A qemu-made 64 MiB image (dynamic, or fixed) with footer fields changed (both copies)."""
    p = os.path.join(tmp, name)
    opts = ["-o", "subformat=fixed"] if fixed else []
    qimg("create", "-q", "-f", "vpc", *opts, p, "64M")
    qemu_io("-f", "vpc", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 60M 1M", p)
    size = os.path.getsize(p)
    # Patched in place: the file keeps its holes (and so its allocated size) as qemu left them.
    with open(p, "r+b") as f:
        for off in ([size - 512] if fixed else [0, size - 512]):
            f.seek(off)
            b = bytearray(f.read(512))
            assert b[:8] == b"conectix"
            if app is not None:
                b[28:32] = app
            if current_size is not None:
                b[48:56] = struct.pack(">Q", current_size)
            if chs is not None:
                b[56:60] = struct.pack(">HBB", *chs)
            if fix_checksum:
                refresh_footer_checksum(b, 0)
            else:
                b[64] ^= 0x01
            f.seek(off)
            f.write(b)
        if header_checksum is not None:
            f.seek(512 + 36)
            f.write(struct.pack(">I", header_checksum))
        f.flush()
        os.fsync(f.fileno())
    return p


APPS = [b"vpc ", b"qemu", b"qem2", b"win ", b"d2v ", b"CTXS", b"tap\0", b"tap ", b"xxxx"]


@pytest.mark.parametrize("app", APPS, ids=[a.decode().replace("\0", "0").strip() or "blank" for a in APPS])
@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_size_rule_per_creator_app(tmp, app, kind):
    """qemu takes the CHS geometry's size for Virtual PC and qemu's own images, current_size for Hyper-V, Disk2vhd,
    XenServer and XenConverter ones: current_size is set smaller than the geometry here, so the two differ."""
    fixed = kind == "fixed"
    p = patched(tmp, "a.vhd", app=app, current_size=32 * 1024 * 1024 + 4096, fixed=fixed)
    info_both(p, "-f", "vpc")
    map_both(p, "-f", "vpc")
    raw_of(tmp, p, "-f", "vpc")


@pytest.mark.parametrize("calc", ["chs", "current_size", "bogus"])
@pytest.mark.parametrize("app", [b"qemu", b"win "])
def test_force_size_calc_option(tmp, calc, app):
    p = patched(tmp, "a.vhd", app=app, current_size=32 * 1024 * 1024 + 4096)
    spec = "json:" + json.dumps({"driver": "vpc", "force_size_calc": calc,
                                 "file": {"driver": "file", "filename": p}})
    info_both(spec)
    assert_same("map", "--output=json", spec)


def test_max_geometry_uses_current_size(tmp):
    p = patched(tmp, "a.vhd", app=b"qemu", chs=(65535, 16, 255), current_size=96 * 1024 * 1024)
    # The table covers 64 MiB only: qemu refuses it ("Page table too small"), as instar must.
    info_both(p)
    p = patched(tmp, "b.vhd", app=b"vpc ", chs=(65535, 16, 255), current_size=48 * 1024 * 1024)
    info_both(p)
    raw_of(tmp, p)


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_bad_footer_checksum_refused(tmp, kind):
    p = patched(tmp, "a.vhd", fixed=kind == "fixed", fix_checksum=False)
    for args in (["info", "-f", "vpc", p], ["map", "-f", "vpc", p], ["convert", "-f", "vpc", "-O", "raw", p,
                                                                   os.path.join(tmp, "o.raw")]):
        q, i = both(*args)
        assert q.rc == 1 and "Incorrect header checksum" in q.err, q
        assert i == q, (q, i)


def test_bad_dynamic_header_checksum_accepted(tmp):
    """qemu 7.2 does not verify the dynamic header's checksum."""
    p = patched(tmp, "a.vhd", header_checksum=0x12345678)
    info_both(p)
    map_both(p)
    raw_of(tmp, p)


def test_fixed_image_probes_as_raw(tmp):
    """The footer of a fixed image is at its end only: qemu's probe (the first bytes) sees raw."""
    p = os.path.join(tmp, "f.vhd")
    qimg("create", "-q", "-f", "vpc", "-o", "subformat=fixed", p, "4M")
    info_both(p)
    map_both(p)


# ---- what qemu refuses for vpc -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["check"], ["check", "--output=json"], ["check", "-r", "all"], ["resize", "IMG", "+1M"],
    ["resize", "--shrink", "IMG", "32M"], ["amend", "-o", "size=128M"], ["snapshot", "-l"],
    ["snapshot", "-c", "s1"], ["commit"], ["bitmap", "--add", "IMG", "b0"], ["measure", "-O", "vpc"],
    ["measure", "-O", "qcow2"], ["rebase", "-u", "-b", "", "IMG"],
], ids=lambda a: "-".join(x.strip("-") for x in a if x != "IMG"))
def test_operations_match(tmp, args):
    p = os.path.join(tmp, "a.vhd")
    qimg("create", "-q", "-f", "vpc", p, "64M")
    qemu_io("-f", "vpc", "-c", "write -P 0x11 0 1M", p)
    argv = [p if a == "IMG" else a for a in args]
    if "IMG" not in args:
        argv.append(p)
    before = open(p, "rb").read()
    q, i = both(*argv)
    # qemu names the node "#block1NN" with two random digits.
    node = re.compile(r"#block1\d\d")
    assert (i.rc, i.out, node.sub("#block", i.err)) == (q.rc, q.out, node.sub("#block", q.err)), (q, i)
    assert open(p, "rb").read() == before


def test_measure_size_only_refused():
    assert_same("measure", "-O", "vpc", "--size", "1G")


def test_convert_compressed_refused(tmp, source):
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    qr, ir = qemu("convert", "-c", "-O", "vpc", source, q), instar("convert", "-c", "-O", "vpc", source, i)
    assert (ir.rc, ir.out, ir.err) == (qr.rc, qr.out, qr.err)


def test_backing_refused(tmp):
    b = os.path.join(tmp, "b.raw")
    qimg("create", "-q", "-f", "raw", b, "1M")
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    qr = qemu("create", "-f", "vpc", "-b", b, "-F", "raw", q)
    ir = instar("create", "-f", "vpc", "-b", b, "-F", "raw", i)
    assert (ir.rc, ir.out, ir.err.replace(i, q)) == (qr.rc, qr.out, qr.err)


def test_help_lists_vpc():
    r = instar("--help")
    line = next(x for x in r.out.splitlines() if x.startswith("Supported formats:"))
    assert "vpc" in line.split()[2:]


# ---- the C API (through the Python binding) ----------------------------------------------------------------

# (offset, length, byte or None for write-zeroes): unaligned, block-crossing, into allocated blocks and new ones.
API_WRITES = [(0, 4096, 0x11), (1000, 3000, 0x22), (2 * 1024 * 1024 - 700, 1400, 0x33), (10 << 20, 65536, None),
              (5 << 20, 512, 0x44), (5 << 20 | 4096, 1 << 20, 0x55), (63 << 20, 1 << 20, 0x66)]


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_capi_create_write_read_matches_qemu_io(tmp, kind):
    """Created and written through the C API, the image is the one qemu-img create and qemu-io make."""
    import instar as pyinstar
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    qimg("create", "-q", "-f", "vpc", "-o", f"subformat={kind}", q, "64M")
    pyinstar.create(i, "vpc", 64 << 20, subformat=kind)
    args = []
    for off, n, b in API_WRITES:
        args += ["-c", f"write -z {off} {n}" if b is None else f"write -P {b:#x} {off} {n}"]
    qemu_io("-f", "vpc", *args, q)
    with pyinstar.Image(i, format="vpc", flags=pyinstar.OPEN_READ_WRITE) as img:
        for off, n, b in API_WRITES:
            if b is None:
                img.write_zeroes(off, n)
            else:
                img.write(off, bytes([b]) * n)
        img.flush()
    assert_files_same(q, i)
    raw = raw_of(tmp, q, "-f", "vpc")
    data = open(raw, "rb").read()
    with pyinstar.Image(i, format="vpc") as img:
        assert img.size == len(data)
        for off, n, _ in API_WRITES + [(0, len(data), None)]:
            assert img.read(off, n) == data[off:off + n]


# ---- vpc under other operations ----------------------------------------------------------------------------

@pytest.fixture
def vpc_base(tmp):
    p = os.path.join(tmp, "base.vhd")
    qimg("create", "-q", "-f", "vpc", p, "64M")
    qemu_io("-f", "vpc", "-c", "write -P 1 0 1M", "-c", "write -P 2 9M 64k", p)
    return p


def test_commit_into_vpc_backing(tmp, vpc_base):
    """commit writes a qcow2 overlay's clusters (zero ones included) into its vpc backing file."""
    outs = {}
    for who in ("q", "i"):
        b, t = os.path.join(tmp, f"{who}b.vhd"), os.path.join(tmp, f"{who}t.qcow2")
        shutil.copyfile(vpc_base, b)
        qimg("create", "-q", "-f", "qcow2", "-b", b, "-F", "vpc", t)
        qemu_io("-c", "write -P 3 512k 1M", "-c", "write -z 9M 4k", "-c", "write -P 4 30M 64k", t)
        outs[who] = (qemu if who == "q" else instar)("commit", t), b
    (qr, qb), (ir, ib) = outs["q"], outs["i"]
    assert (ir.rc, ir.out, ir.err) == (qr.rc, qr.out, qr.err)
    assert open(qb, "rb").read() == open(ib, "rb").read()


def test_dd_to_vpc(tmp, vpc_base):
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    qr = qemu("dd", "-O", "vpc", f"if={vpc_base}", f"of={q}", "bs=1M")
    ir = instar("dd", "-O", "vpc", f"if={vpc_base}", f"of={i}", "bs=1M")
    assert (ir.rc, ir.out, ir.err) == (qr.rc, qr.out, qr.err)
    assert_files_same(q, i)


def test_vpc_as_backing_file(tmp, vpc_base):
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", vpc_base, "-F", "vpc", top)
    qemu_io("-c", "write -P 5 1M 64k", top)
    info_both(top, "--backing-chain")
    map_both(top)
    raw_of(tmp, top)


# ---- crash safety --------------------------------------------------------------------------------------------

CRASH_CHILD = r"""
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bindings", "python"))
import instar
img = instar.Image(sys.argv[2], format="vpc", flags=instar.OPEN_READ_WRITE)
img.write(0, b"\x5a" * 65536)
img.flush()
# Armed only now: the library reads the variable at each crash point (putenv reaches its getenv).
os.environ["INSTAR_CRASH_AT"] = sys.argv[3]
img.write(6 << 20, b"\xa5" * 65536)
img.close()
"""


@pytest.mark.parametrize("point", ["vpc-alloc:bitmap", "vpc-alloc:footer", "vpc-alloc:table"])
def test_sigkill_during_block_allocation(tmp, point):
    """Killed at each step of a block allocation (bitmap written, footer moved, table entry written), the image
    still opens in qemu-img with the earlier write intact and the new block unallocated or zero, and qemu can go
    on writing to it."""
    import subprocess
    import sys
    from conftest import ROOT
    p = os.path.join(tmp, "a.vhd")
    qimg("create", "-q", "-f", "vpc", p, "16M")
    c = subprocess.run([sys.executable, "-c", CRASH_CHILD, ROOT, p, point], capture_output=True, text=True)
    assert c.returncode == -9, c
    expected = os.path.join(tmp, "e.raw")
    qimg("create", "-q", "-f", "raw", expected, "16M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 64k", expected)
    assert qemu("compare", "-f", "vpc", "-F", "raw", p, expected).rc == 0
    info_both(p)
    map_both(p)
    qemu_io("-f", "vpc", "-c", "write -P 0x77 10M 64k", p)
    qemu_io("-f", "raw", "-c", "write -P 0x77 10M 64k", expected)
    assert qemu("compare", "-f", "vpc", "-F", "raw", p, expected).rc == 0


@pytest.mark.parametrize("opts", [[], ["-o", "subformat=fixed"], ["-o", "force_size=on"]])
@pytest.mark.parametrize("size", ["1000", "2041G"])
def test_convert_odd_and_oversized_sources(tmp, opts, size):
    """A source of 1000 bytes is rounded up; one over 2040 GiB is refused with the driver's own message (convert
    shows it, create replaces it)."""
    src = os.path.join(tmp, "s.qcow2")
    qimg("create", "-q", "-f", "qcow2", src, size)
    qemu_io("-c", "write -P 0x42 0 512", src)
    q, i = os.path.join(tmp, "q.vhd"), os.path.join(tmp, "i.vhd")
    qr = qemu("convert", "-O", "vpc", *opts, src, q)
    ir = instar("convert", "-O", "vpc", *opts, src, i)
    assert (ir.rc, ir.out, ir.err.replace(i, q)) == (qr.rc, qr.out, qr.err), (qr, ir)
    assert_files_same(q, i)
