"""vmdk against qemu-img 7.2: images qemu-img makes in every subformat and create option set (with data that
qemu-io writes at several offsets) through info (human and JSON, --backing-chain), map, compare and convert in
both directions, create parity, writes through instar (convert -n into an existing image), and the errors of
create and open.

The CID in a descriptor is random (qemu draws a new one at create and on the first write of each open), so
files are compared with the CID line of the descriptor masked; everything else must be byte-identical.
"""
import hashlib
import os
import re

import pytest

from conftest import INSTAR, assert_same, both, check_clean, convert_both, instar, qemu, qemu_io, qimg, run

DESC_WINDOW = 20 * 512

SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized"]

CREATE_OPTIONS = [
    "",
    "subformat=monolithicFlat",
    "subformat=twoGbMaxExtentSparse",
    "subformat=twoGbMaxExtentFlat",
    "subformat=streamOptimized",
    "zeroed_grain=on",
    "adapter_type=lsilogic",
    "adapter_type=buslogic,hwversion=7",
    "adapter_type=legacyESX,toolsversion=10240",
    "compat6=on",
    "subformat=twoGbMaxExtentSparse,zeroed_grain=on",
]

WRITES = [("0x11", "0", "64k"), ("0x22", "1M", "300k"), ("0x33", "2047M", "2M"), ("0x44", "3G", "4k")]


def _mask_cid(data):
    """The file with its descriptor's CID number replaced (in an embedded descriptor, only the text up to the
    first NUL of the descriptor window counts)."""
    data = bytearray(data)
    if data[:4] == b"KDMV":
        window = bytes(data[0x200:0x200 + DESC_WINDOW])
        text = window.split(b"\0")[0]
        text = re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=X\n", text)
        data[0x200:0x200 + DESC_WINDOW] = text + b"\0" * (DESC_WINDOW - len(text))
        return bytes(data)
    return re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=X\n", bytes(data))


HEAD = 0x200 + DESC_WINDOW


def _fingerprint(path):
    """The file's size, its first HEAD bytes with the CID masked, and a hash of the rest visiting only the
    1 MiB blocks that hold data (a flat extent of several GiB is almost all hole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        head = f.read(HEAD)
        if head[:4] == b"KDMV":
            head = _mask_cid(head)
        elif size < (1 << 20):
            # A descriptor file: its length follows the CID's digits, and qemu's CID rewrite keeps stale bytes
            # past the text's NUL; the text is what counts.
            return None, _mask_cid((head + f.read()).split(b"\0")[0]), ""
        pos, block = HEAD, 1 << 20
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            b = max(HEAD, pos - pos % block)
            while b < end:
                chunk = os.pread(fd, block - (b % block), b)
                if chunk.strip(b"\0"):
                    h.update(str(b).encode() + b":" + chunk)
                b += len(chunk) or block
            pos = max(end, b)
    return size, head, h.hexdigest()


def _files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".vmdk"))


def _same_files(qdir, idir):
    qf, jf = _files(qdir), _files(idir)
    assert qf == jf
    for f in qf:
        assert _fingerprint(os.path.join(qdir, f)) == _fingerprint(os.path.join(idir, f)), f


def _opts(o):
    return ["-o", o] if o else []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One image per create option set, 4 GiB, with data qemu-io wrote at several offsets."""
    root = str(tmp_path_factory.mktemp("vmdk"))
    out = {}
    for i, o in enumerate(CREATE_OPTIONS):
        d = os.path.join(root, f"c{i}")
        os.makedirs(d)
        img = os.path.join(d, "img.vmdk")
        qimg("create", "-q", "-f", "vmdk", *_opts(o), img, "4G")
        if "streamOptimized" not in o:
            cmds = []
            for pat, off, ln in WRITES:
                cmds += ["-c", f"write -P {pat} {off} {ln}"]
            qemu_io("-f", "vmdk", *cmds, img)
        out[o] = (d, img)
    return out


@pytest.mark.parametrize("opts", CREATE_OPTIONS)
def test_info(corpus, opts):
    d, img = corpus[opts]
    assert_same("info", "img.vmdk", cwd=d)
    assert_same("info", "--output=json", "img.vmdk", cwd=d)
    assert_same("info", img)


@pytest.mark.parametrize("opts", CREATE_OPTIONS)
def test_map(corpus, opts):
    d, img = corpus[opts]
    assert_same("map", "--output=json", img)
    assert_same("map", img)


@pytest.mark.parametrize("opts", CREATE_OPTIONS)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_from(corpus, opts, fmt, tmp):
    d, img = corpus[opts]
    q, qd, idst = convert_both(tmp, ["-O", fmt], [img], fmt=fmt)
    assert q.rc == 0
    assert _fingerprint(qd) == _fingerprint(idst)
    assert_same("compare", img, idst)


@pytest.mark.parametrize("opts", CREATE_OPTIONS)
def test_create_parity(opts, tmp):
    for who in ("q", "i"):
        os.makedirs(os.path.join(tmp, who))
    q = qemu("create", "-f", "vmdk", *_opts(opts), "x.vmdk", "5G", cwd=os.path.join(tmp, "q"))
    i = instar("create", "-f", "vmdk", *_opts(opts), "x.vmdk", "5G", cwd=os.path.join(tmp, "i"))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    _same_files(os.path.join(tmp, "q"), os.path.join(tmp, "i"))


@pytest.mark.parametrize("size", ["0", "512", "1000", "65536", "1M", "100M", "2G", "2049M"])
@pytest.mark.parametrize("sub", SUBFORMATS)
def test_create_sizes(size, sub, tmp):
    for who in ("q", "i"):
        os.makedirs(os.path.join(tmp, who))
    q = qemu("create", "-f", "vmdk", "-o", f"subformat={sub}", "x.vmdk", size, cwd=os.path.join(tmp, "q"))
    i = instar("create", "-f", "vmdk", "-o", f"subformat={sub}", "x.vmdk", size, cwd=os.path.join(tmp, "i"))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    _same_files(os.path.join(tmp, "q"), os.path.join(tmp, "i"))


def _source(tmp, size="300M", fmt="raw"):
    src = os.path.join(tmp, f"src.{fmt}")
    qimg("create", "-q", "-f", fmt, src, size)
    qemu_io("-f", fmt, "-c", "write -P 3 0 64k", "-c", "write -P 4 1M 3M", "-c", "write -P 5 200M 100k",
            "-c", "write -P 6 299M 1000", "-c", "write -z 250M 1M", src)
    return src


@pytest.mark.parametrize("opts", CREATE_OPTIONS)
@pytest.mark.parametrize("srcfmt", ["raw", "qcow2"])
def test_convert_to_vmdk(opts, srcfmt, tmp):
    src = _source(tmp, fmt=srcfmt)
    for who in ("q", "i"):
        os.makedirs(os.path.join(tmp, who))
    argv = ["convert", "-O", "vmdk", *_opts(opts), src, "x.vmdk"]
    q = qemu(*argv, cwd=os.path.join(tmp, "q"))
    i = instar(*argv, cwd=os.path.join(tmp, "i"))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    _same_files(os.path.join(tmp, "q"), os.path.join(tmp, "i"))
    out = os.path.join(tmp, "i", "x.vmdk")
    r = qemu("compare", src, out)
    assert r.rc == 0, r
    check_clean(out)


@pytest.mark.parametrize("size", ["1000", "65536", "100000", "3M"])
def test_convert_stream_optimized_short_last_grain(size, tmp):
    """The last grain of an image whose size is not a whole number of grains is compressed at its length."""
    src = os.path.join(tmp, "src.raw")
    qimg("create", "-q", "-f", "raw", src, size)
    qemu_io("-f", "raw", "-c", f"write -P 9 0 {size}", src)
    for who in ("q", "i"):
        os.makedirs(os.path.join(tmp, who))
    argv = ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, "x.vmdk"]
    q = qemu(*argv, cwd=os.path.join(tmp, "q"))
    i = instar(*argv, cwd=os.path.join(tmp, "i"))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    _same_files(os.path.join(tmp, "q"), os.path.join(tmp, "i"))
    assert_same("compare", src, os.path.join(tmp, "i", "x.vmdk"))


@pytest.mark.parametrize("opts", ["", "zeroed_grain=on", "subformat=monolithicFlat",
                                  "subformat=twoGbMaxExtentSparse"])
def test_write_into_existing(opts, tmp):
    """convert -n into an image qemu-img made: instar's grain allocation and CID update against qemu's."""
    src = _source(tmp, size="3G")
    qemu_io("-f", "raw", "-c", "write -P 7 2047M 2M", src)
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        os.makedirs(d)
        qimg("create", "-q", "-f", "vmdk", *_opts(opts), os.path.join(d, "x.vmdk"), "3G")
        qemu_io("-f", "vmdk", "-c", "write -P 1 1M 64k", "-c", "write -P 2 100M 4k", os.path.join(d, "x.vmdk"))
    argv = ["convert", "-n", "-O", "vmdk", src, "x.vmdk"]
    q = qemu(*argv, cwd=os.path.join(tmp, "q"))
    i = instar(*argv, cwd=os.path.join(tmp, "i"))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    _same_files(os.path.join(tmp, "q"), os.path.join(tmp, "i"))
    check_clean(os.path.join(tmp, "i", "x.vmdk"))


def test_backing_chain(tmp):
    """A vmdk overlay of a vmdk parent (parentFileNameHint, parentCID): info --backing-chain, map, convert."""
    qimg("create", "-q", "-f", "vmdk", os.path.join(tmp, "base.vmdk"), "64M")
    qemu_io("-f", "vmdk", "-c", "write -P 1 0 1M", "-c", "write -P 2 10M 1M", os.path.join(tmp, "base.vmdk"))
    qimg("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", os.path.join(tmp, "top.vmdk"))
    qemu_io("-f", "vmdk", "-c", "write -P 3 512k 1M", os.path.join(tmp, "top.vmdk"))
    assert_same("info", "top.vmdk", cwd=tmp)
    assert_same("info", "--backing-chain", "--output=json", "top.vmdk", cwd=tmp)
    assert_same("map", "--output=json", "top.vmdk", cwd=tmp)
    q, qd, idst = convert_both(tmp, ["-O", "raw"], ["top.vmdk"], fmt="raw")
    assert _fingerprint(qd) == _fingerprint(idst)
    assert_same("compare", "top.vmdk", "base.vmdk", cwd=tmp)


def test_create_with_backing(tmp):
    qimg("create", "-q", "-f", "vmdk", os.path.join(tmp, "base.vmdk"), "64M")
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        os.makedirs(d)
    argv = ["create", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk", "x.vmdk"]
    q = qemu(*argv, cwd=os.path.join(tmp, "q"))
    i = instar(*argv, cwd=os.path.join(tmp, "i"))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    _same_files(os.path.join(tmp, "q"), os.path.join(tmp, "i"))


@pytest.mark.parametrize("opts", [
    "compat6=on,hwversion=7",
    "subformat=monolithicFlat,zeroed_grain=on",
    "subformat=foo",
    "adapter_type=scsi",
    "backing_fmt=qcow2",
])
def test_create_errors(opts, tmp):
    q, i = both("create", "-f", "vmdk", "-o", opts, "x.vmdk", "1G", cwd=tmp)
    assert q.rc != 0
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)


def test_create_flat_with_backing(tmp):
    qimg("create", "-q", "-f", "vmdk", os.path.join(tmp, "base.vmdk"), "64M")
    q, i = both("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "-b", "base.vmdk", "-F", "vmdk",
                "x.vmdk", cwd=tmp)
    assert q.rc != 0
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)


def test_create_backing_not_vmdk(tmp):
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "base.qcow2"), "64M")
    q, i = both("create", "-f", "vmdk", "-b", "base.qcow2", "-F", "qcow2", "x.vmdk", cwd=tmp)
    assert q.rc != 0
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)


def _descriptor(tmp, text, extents=()):
    for name, size in extents:
        with open(os.path.join(tmp, name), "wb") as f:
            f.truncate(size)
    with open(os.path.join(tmp, "d.vmdk"), "w") as f:
        f.write(text)
    return "d.vmdk"


DESC_HEAD = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"


@pytest.mark.parametrize("text,extents", [
    (DESC_HEAD + 'createType="monolithicFlat"\nRW 2048 FLAT "e.raw" 0\n', [("e.raw", 1 << 20)]),
    (DESC_HEAD + 'createType="monolithicFlat"\nRW 2048 FLAT "e.raw" 0\nRW 100 FLAT "e.raw" 2048\n',
     [("e.raw", 1 << 20)]),
    (DESC_HEAD + 'createType="vmfs"\nRW 2048 VMFS "e.raw"\n', [("e.raw", 1 << 20)]),
    (DESC_HEAD + 'createType="monolithicFlat"\nRW 2048 FLAT "e.raw"\n', [("e.raw", 1 << 20)]),
    (DESC_HEAD + 'createType="vmfs"\nRW 2048 VMFS "e.raw" 5\n', [("e.raw", 1 << 20)]),
    (DESC_HEAD + 'createType="monolithicFlat"\nRW 2048 FLAT "missing.raw" 0\n', []),
    (DESC_HEAD + 'createType="monolithicSparse"\nRW 2048 FLAT "e.raw" 0\n', [("e.raw", 1 << 20)]),
    (DESC_HEAD + 'createType="streamOptimized"\n', []),
    (DESC_HEAD + 'createType="monolithicFlat\n', []),
    (DESC_HEAD, []),
    (DESC_HEAD + 'createType="twoGbMaxExtentSparse"\nRW 2048 SPARSE "e.raw"\n', [("e.raw", 1 << 20)]),
    (DESC_HEAD + 'createType="twoGbMaxExtentSparse"\nRW 2048 SPARSE "e.raw"\n', [("e.raw", 2)]),
    (DESC_HEAD + 'createType="monolithicFlat"\nRO 2048 FLAT "e.raw" 0\nRW 0 FLAT "e.raw" 0\n'
     'RW 8 FLAT "e.raw" 0\n', [("e.raw", 4096)]),
    ("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"e.raw\" 0\n",
     [("e.raw", 1 << 20)]),
    ("# Disk DescriptorFile\nversion=1\nCID=zz\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n", []),
    (DESC_HEAD + 'createType="monolithicFlat"\nRW 2048 FLAT "e.raw" 0\r\nRW 2048 FLAT "e.raw" 2048\r\n',
     [("e.raw", 2 << 20)]),
])
def test_handmade_descriptors(text, extents, tmp):
    name = _descriptor(tmp, text, extents)
    for args in (["info", name], ["info", "--output=json", name], ["map", "--output=json", name]):
        assert_same(*args, cwd=tmp)
    q = qemu("convert", "-O", "raw", name, "q.raw", cwd=tmp)
    i = instar("convert", "-O", "raw", name, "i.raw", cwd=tmp)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    if q.rc == 0:
        assert _fingerprint(os.path.join(tmp, "q.raw")) == _fingerprint(os.path.join(tmp, "i.raw"))


def test_descriptor_in_subdirectory(tmp):
    """Extent paths are relative to the descriptor's directory."""
    sub = os.path.join(tmp, "sub")
    os.makedirs(sub)
    qimg("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", os.path.join(sub, "x.vmdk"), "3G")
    qemu_io("-f", "vmdk", "-c", "write -P 5 2047M 2M", os.path.join(sub, "x.vmdk"))
    assert_same("info", "sub/x.vmdk", cwd=tmp)
    assert_same("info", "--output=json", "sub/x.vmdk", cwd=tmp)
    assert_same("map", "--output=json", "sub/x.vmdk", cwd=tmp)
    assert_same("compare", "sub/x.vmdk", "sub/x.vmdk", cwd=tmp)


def test_probe_and_help(tmp):
    r = instar("--help")
    assert " vmdk" in r.out
    qimg("create", "-q", "-f", "vmdk", os.path.join(tmp, "a.vmdk"), "1M")
    assert_same("info", "-f", "vmdk", "a.vmdk", cwd=tmp)


@pytest.mark.parametrize("opts", CREATE_OPTIONS)
def test_check(corpus, opts):
    d, img = corpus[opts]
    assert_same("check", img)
    assert_same("check", "--output=json", img)


@pytest.mark.parametrize("args", [
    ["check", "-r", "all"],
    ["check", "-r", "leaks"],
    ["resize", "@", "20M"],
    ["amend", "-o", "zeroed_grain=on"],
    ["measure", "-O", "vmdk"],
    ["snapshot", "-l"],
])
def test_unsupported_operations(args, tmp):
    img = os.path.join(tmp, "c.vmdk")
    qimg("create", "-q", "-f", "vmdk", img, "10M")
    qemu_io("-f", "vmdk", "-c", "write 0 1M", img)
    argv = [img if a == "@" else a for a in args]
    if "@" not in args:
        argv.append(img)
    assert_same(*argv)


def test_check_grain_past_eof(tmp):
    img = os.path.join(tmp, "c.vmdk")
    qimg("create", "-q", "-f", "vmdk", img, "10M")
    qemu_io("-f", "vmdk", "-c", "write 0 1M", img)
    with open(img, "r+b") as f:
        hdr = f.read(80)
        gd = int.from_bytes(hdr[56:64], "little")
        f.seek(gd * 512)
        gt = int.from_bytes(f.read(4), "little")
        f.seek(gt * 512 + 4)
        f.write((0x100000).to_bytes(4, "little"))
    assert_same("check", img)
    assert_same("check", "--output=json", img)


def test_parent_cid_mismatch(tmp):
    """A parent written after the overlay was made has a new CID: reads that reach it fail, as in qemu."""
    qimg("create", "-q", "-f", "vmdk", os.path.join(tmp, "base.vmdk"), "4M")
    qimg("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", os.path.join(tmp, "top.vmdk"))
    qemu_io("-f", "vmdk", "-c", "write -P 1 0 64k", os.path.join(tmp, "top.vmdk"))
    qemu_io("-f", "vmdk", "-c", "write -P 2 1M 64k", os.path.join(tmp, "base.vmdk"))
    assert_same("info", "--backing-chain", "top.vmdk", cwd=tmp)
    assert_same("map", "--output=json", "top.vmdk", cwd=tmp)
    q, qd, idst = convert_both(tmp, ["-O", "raw"], ["top.vmdk"], fmt="raw")
    assert q.rc != 0
