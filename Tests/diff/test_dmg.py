"""dmg (Apple UDIF), read only: images built byte by byte (dmg_images.py; qemu-img cannot create dmg), each first
checked with qemu-img (info, and convert -O raw giving the bytes the test put in), then instar compared with
qemu-img: info (human, JSON), map, compare, convert -O raw/qcow2, check, measure, dd, and the refusals of every
writer (resize, amend, commit, snapshot, rebase, bitmap, check -r, create, convert -O dmg).

Two documented differences from Debian's qemu-img 7.2, which is built without its dmg-bz2 and dmg-lzfse modules:
  * Every qemu open of a dmg prints "qemu: module block-block-dmg-bz2 not found, do you want to install
    qemu-block-extra package?" and the same for lzfse: lines about Debian's packaging, not about the image.
    instar does not print them; the comparisons drop them from qemu's stderr (`qemu_dmg`).
  * bzip2 chunks: qemu warns "dmg-bzip2 module is missing ..." and fails their reads with EIO; instar reads
    them through libbz2 (issue 13 asks for it) and prints no warning. Those images are tested against the
    bytes the test put in. lzfse chunks fail exactly as in qemu (same warning, same read errors).
"""
import bz2
import json
import os
import struct
import subprocess
import zlib

import pytest

from conftest import INSTAR, Result, instar, normalize, qemu, run
import dmg_images as D

MB = 1 << 20
PATTERN = bytes(range(256)) * 4096  # 1 MiB that zlib compresses well but not to nothing
MODULE_LINE = "qemu: module block-block-dmg-"
BZ2_WARNING = ("instar: warning: dmg-bzip2 module is missing, accessing bzip2 compressed blocks will result in I/O "
               "errors\n")


def qemu_dmg(*args, cwd=None):
    """qemu-img with its Debian "module ... not found" lines dropped from stderr (see the module docstring)."""
    r = qemu(*args, cwd=cwd)
    err = "".join(line for line in r.err.splitlines(keepends=True) if not line.startswith(MODULE_LINE))
    return Result(r.rc, r.out, err)


def same(*args, cwd=None):
    q, i = qemu_dmg(*args, cwd=cwd), instar(*args, cwd=cwd)
    assert i == q, f"instar {' '.join(args)}\n qemu: {q}\n instar: {i}"
    return q


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


# Images without bzip2 chunks: qemu reads them wholly, so every command is compared.
SHAPES = {
    "raw-zero-zlib": lambda: D.Image([("raw", b"\x11" * 1024), ("zero", 4), ("zlib", b"\x22" * 4096 + PATTERN[:8192]),
                                      ("ignore", 2), ("raw", b"\x44" * 700)]),
    "partitions": lambda: D.Image([("zlib", PATTERN), ("raw", b"\x33" * 2048), ("zero", 100), ("zlib", b"\x77" * MB),
                                   ("raw", PATTERN[:4096]), ("zero", 1)], split=3),
    "big": lambda: D.Image([("zlib", PATTERN), ("zero", 8192), ("raw", PATTERN[:51200]), ("zlib", b"\x55" * MB),
                            ("raw", b"\x66" * 4096), ("zlib", PATTERN * 2), ("zero", 20000), ("raw", b"\x01" * 512)]),
    "data-fork-offset": lambda: D.Image([("raw", b"\x12" * 1536), ("zlib", b"\x34" * 3072)], lead=b"\xee" * 1000),
    "only-zero": lambda: D.Image([("zero", 2048)]),
}
FORMS = ["rsrc", "xml"]


@pytest.fixture(params=sorted(SHAPES))
def shape(request):
    return request.param


def make(tmp, name, image, form, **kw):
    path = os.path.join(tmp, f"{name}.dmg")
    write(path, image.layout(form, **kw))
    return path


def qemu_reads(tmp, path, expected):
    """qemu-img opens the image and converts it to exactly the bytes the test put in."""
    r = qemu_dmg("info", path)
    assert r.rc == 0 and "file format: dmg" in r.out, r
    out = os.path.join(tmp, "qemu-check.raw")
    r = qemu_dmg("convert", "-O", "raw", path, out)
    assert r.rc == 0, r
    assert open(out, "rb").read() == expected
    os.unlink(out)


@pytest.mark.parametrize("form", FORMS)
def test_read_commands_match_qemu(tmp, shape, form):
    image = SHAPES[shape]()
    path = make(tmp, "img", image, form)
    qemu_reads(tmp, path, image.expected())
    same("info", path, cwd=tmp)
    same("info", "--output=json", path, cwd=tmp)
    same("info", "img.dmg", cwd=tmp)
    same("map", path, cwd=tmp)
    same("map", "--output=json", path, cwd=tmp)
    same("check", path, cwd=tmp)
    same("check", "--output=json", path, cwd=tmp)
    for target in ("qcow2", "raw"):
        same("measure", "-O", target, path, cwd=tmp)
        same("measure", "--output=json", "-O", target, path, cwd=tmp)
    same("snapshot", "-l", path, cwd=tmp)
    # convert -O raw: same bytes; convert -O qcow2: same guest bytes, a clean image.
    outs = {}
    for tool, fn in (("q", qemu_dmg), ("i", instar)):
        raw = os.path.join(tmp, f"out_{tool}.raw")
        r = fn("convert", "-O", "raw", path, raw, cwd=tmp)
        outs[tool] = (r, open(raw, "rb").read())
    assert outs["i"] == outs["q"]
    assert outs["i"][1] == image.expected()
    for tool, fn in (("q", qemu_dmg), ("i", instar)):
        r = fn("convert", "-O", "qcow2", path, os.path.join(tmp, f"out_{tool}.qcow2"), cwd=tmp)
        assert r == Result(0, "", ""), r
    same("compare", "out_q.qcow2", "out_i.qcow2", cwd=tmp)
    assert qemu("check", "out_i.qcow2", cwd=tmp).rc == 0
    same("compare", path, "out_q.raw", cwd=tmp)
    same("compare", "-f", "dmg", "-F", "qcow2", path, "out_i.qcow2", cwd=tmp)
    same("dd", f"if={path}", "of=dd.raw", "bs=64k", cwd=tmp)
    assert open(os.path.join(tmp, "dd.raw"), "rb").read() == image.expected()


def test_both_forms_compare_identical(tmp):
    image = SHAPES["partitions"]()
    a, b = make(tmp, "a", image, "rsrc"), make(tmp, "b", image, "xml")
    assert same("compare", a, b).out == "Images are identical.\n"
    other = D.Image([("zlib", PATTERN), ("raw", b"\x33" * 2047 + b"\x34")])
    c = make(tmp, "c", other, "xml")
    q = same("compare", a, c)
    assert q.rc == 1, q


@pytest.mark.parametrize("form", FORMS)
def test_bzip2_chunks_read_by_instar(tmp, form):
    """Intended difference: Debian's qemu-img has no dmg-bz2 module, warns and fails reads of bzip2 chunks;
    instar decompresses them (libbz2) and prints no warning. Checked against the bytes put in; qemu-img still
    decides everything that does not read a bzip2 chunk."""
    image = D.Image([("raw", b"\x11" * 1024), ("bzip2", PATTERN), ("zero", 16), ("bzip2", b"\x5a" * 3000),
                     ("zlib", b"\x22" * 4096)])
    path = make(tmp, "bz", image, form)
    q = qemu_dmg("info", path)
    assert q.rc == 0 and q.err == BZ2_WARNING, q
    i = instar("info", path)
    assert (i.rc, i.out, i.err) == (0, q.out, ""), i
    qj, ij = qemu_dmg("info", "--output=json", path), instar("info", "--output=json", path)
    assert (ij.rc, ij.out) == (0, qj.out)
    qm, im = qemu_dmg("map", "--output=json", path), instar("map", "--output=json", path)
    assert (im.rc, im.out, im.err) == (0, qm.out, "")
    q = qemu_dmg("convert", "-O", "raw", path, os.path.join(tmp, "q.raw"))
    assert q.rc == 1 and "Input/output error" in q.err, q
    i = instar("convert", "-O", "raw", path, os.path.join(tmp, "i.raw"))
    assert i == Result(0, "", ""), i
    assert open(os.path.join(tmp, "i.raw"), "rb").read() == image.expected()
    i = instar("convert", "-O", "qcow2", path, os.path.join(tmp, "i.qcow2"))
    assert i == Result(0, "", ""), i
    # qemu-img confirms the result: the qcow2 holds the bytes the test put in.
    write(os.path.join(tmp, "expected.raw"), image.expected())
    assert qemu("compare", "-F", "qcow2", "-f", "raw", os.path.join(tmp, "expected.raw"),
                os.path.join(tmp, "i.qcow2")).rc == 0
    assert qemu("check", os.path.join(tmp, "i.qcow2")).rc == 0


def test_bzip2_chunk_that_does_not_fill_its_sectors_fails(tmp):
    """A bzip2 chunk whose stream ends short of its sectors, or would run past them, fails its read with EIO,
    as qemu's dmg-bz2 module fails it (bounded by the declared sector count)."""
    short = bz2.compress(b"\x42" * 1000)
    long = bz2.compress(b"\x42" * (64 * 512))
    for name, payload in (("short", short), ("long", long)):
        image = D.Image([("raw", b"\x11" * 512), ("type", D.UDBZ, 4, payload)])
        path = make(tmp, name, image, "rsrc")
        i = instar("convert", "-O", "raw", path, os.path.join(tmp, "i.raw"))
        assert i == Result(1, "", "instar: error while reading at byte 0: Input/output error\n"), i


@pytest.mark.parametrize("form", FORMS)
def test_lzfse_and_unknown_chunks_fail_as_in_qemu(tmp, form):
    """qemu 7.2 on Debian opens lzfse images without its lzfse module: a warning once per process at open, reads
    of those sectors fail with EIO. Unknown chunk types (ADC here) warn once too; comments and the terminator
    are skipped silently."""
    image = D.Image([("zlib", PATTERN), ("zero", 8192), ("raw", b"\x66" * 4096), ("lzfse", 64, b"\x01" * 300),
                     ("type", D.UDCM, 0, b""), ("type", D.UDCO, 8, b"\x02" * 100), ("type", 0x1234, 8, b""),
                     ("zlib", PATTERN * 2)])
    path = make(tmp, "lz", image, form)
    q = same("info", path)
    assert "dmg-lzfse module is missing" in q.err and "unknown type 80000004" in q.err, q
    same("info", "--output=json", path)
    same("map", "--output=json", path)
    same("map", path)
    same("convert", "-O", "raw", path, os.path.join(tmp, "o.raw"))
    same("convert", "-O", "qcow2", path, os.path.join(tmp, "o.qcow2"))
    same("compare", path, path)
    same("measure", "-O", "qcow2", path)
    same("dd", f"if={path}", f"of={os.path.join(tmp, 'dd.raw')}", "bs=1M")
    # The part before the lzfse chunk reads fine: qemu's map of sizes, convert of a prefix via dd count.
    same("dd", f"if={path}", f"of={os.path.join(tmp, 'dd.raw')}", "bs=1M", "count=5")


@pytest.mark.parametrize("form", FORMS)
def test_trailer_search_window(tmp, form):
    """qemu looks for "koly" only in the 515 bytes before the last 508 of the file rounded up to whole sectors:
    trailing data after the trailer is fine up to a point that depends on the file's length modulo 512."""
    for trailing in (0, 1, 3, 4, 100, 300, 500, 508, 511, 512, 600, 1024):
        image = D.Image([("raw", b"\x12" * 1536), ("zero", 3)], trailing=b"\xab" * trailing)
        path = make(tmp, f"t{trailing}", image, form)
        same("info", path)
        same("convert", "-O", "raw", path, os.path.join(tmp, "o.raw"))


def test_sectors_past_the_chunks_fail(tmp):
    """A trailer sector count larger than its chunks cover: the sectors past them fail to read (EIO). (Only the
    last of convert's 2 MiB requests fails here: qemu-img prints one line per failed request in flight, instar's
    convert stops at the first.)"""
    image = D.Image([("zlib", PATTERN), ("zlib", PATTERN), ("raw", b"\x11" * 4096)])
    path = make(tmp, "x", image, "rsrc", sectors=4096 + 8 + 1024)
    same("info", path)
    same("convert", "-O", "raw", path, os.path.join(tmp, "o.raw"))
    same("compare", path, path)
    same("dd", f"if={path}", f"of={os.path.join(tmp, 'dd.raw')}", "bs=512", "count=2056")


def test_probe_by_name(tmp):
    """qemu's dmg_probe looks at the name only (".dmg", scoring 2): other names are raw, -f dmg opens any name,
    a format with a magic (score 100) wins over the name."""
    image = SHAPES["raw-zero-zlib"]()
    data = image.layout("xml")
    for name in ("img.dmg", "img.DMG", "img.dmg.bak", "x.dmg"):
        p = write(os.path.join(tmp, name), data)
        same("info", p)
        same("info", "-f", "dmg", p)
        same("info", "--output=json", p)
    write(os.path.join(tmp, ".dmg"), data)
    q = same("info", ".dmg", cwd=tmp)
    assert "file format: raw" in q.out
    qc = os.path.join(tmp, "q.dmg")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qc, "1M"], check=True)
    assert "file format: qcow2" in same("info", qc).out
    same("info", "-f", "dmg", qc)
    assert "dmg" in instar("--help").out.split("Supported formats:")[1].split()


def test_writers_refuse(tmp):
    """dmg is read only: every writer fails as qemu-img fails, at the open ("Image is read-only")."""
    image = SHAPES["raw-zero-zlib"]()
    path = make(tmp, "w", image, "rsrc")
    before = open(path, "rb").read()
    for args in (["resize", path, "+1M"], ["resize", "-f", "dmg", path, "1M"], ["amend", "-o", "size=1M", path],
                 ["commit", path], ["snapshot", "-c", "s", path], ["snapshot", "-a", "s", path],
                 ["snapshot", "-d", "s", path], ["check", "-r", "all", path], ["check", "-r", "leaks", path],
                 ["rebase", "-u", "-b", "", path], ["rebase", "-b", "x.raw", "-F", "raw", path],
                 ["bitmap", "--add", path, "b"], ["create", "-f", "dmg", os.path.join(tmp, "n.dmg"), "1M"],
                 ["convert", "-O", "dmg", path, os.path.join(tmp, "o.dmg")],
                 ["convert", "-n", "-O", "dmg", path, path],
                 ["amend", "-f", "dmg", "-o", "foo=bar", path]):
        q = same(*args, cwd=tmp)
        assert q.rc != 0, (args, q)
    assert open(path, "rb").read() == before
    assert not os.path.exists(os.path.join(tmp, "n.dmg"))
