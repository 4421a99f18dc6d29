"""The C API's additions for callers that stand in for qemu-img's command line, through the Python binding,
against what qemu-img prints: instar_create's formatting_line (create's `formatting=`) and size_text (a str
`size`), instar_compare_result's exit_status and error_message (instar.compare_status), and the warning
callbacks of rebase and bitmap (`warning=`)."""
import os

import pytest

import instar
from conftest import qemu_io, qimg, run


def qemu_img(*args):
    return run(["qemu-img", *args])


@pytest.mark.parametrize("fmt,size,opts,cli_opts", [
    ("raw", 1 << 20, {}, []),
    ("raw", "1.5M", {"preallocation": "falloc"}, ["-o", "preallocation=falloc"]),
    ("qcow2", "0x100000", {}, []),
    ("qcow2", 1 << 30, {"cluster_size": 4096, "lazy_refcounts": True},
     ["-o", "cluster_size=4096,lazy_refcounts=on"]),
])
def test_create_formatting_line(tmp, fmt, size, opts, cli_opts):
    path = os.path.join(tmp, "img." + fmt)
    got = []
    instar.create(path, fmt, size, formatting=got.append, **opts)
    os.rename(path, path + ".instar")
    q = qemu_img("create", "-f", fmt, *cli_opts, path, str(size))
    assert q.rc == 0, q
    assert [line + "\n" for line in got] == [q.out]
    with open(path, "rb") as a, open(path + ".instar", "rb") as b:
        assert a.read() == b.read()


def test_create_formatting_line_with_backing_and_late_failure(tmp):
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-f", "qcow2", base, "2M")
    top = os.path.join(tmp, "top.qcow2")
    got = []
    instar.create(top, "qcow2", backing_file=base, backing_format="qcow2", formatting=got.append)
    os.unlink(top)
    q = qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    assert [line + "\n" for line in got] == [q.out]
    # qemu-img prints the line, then fails creating the file: the line is handed back before the error.
    missing = os.path.join(tmp, "no", "such.qcow2")
    got = []
    with pytest.raises(instar.InstarError) as e:
        instar.create(missing, "qcow2", 1 << 20, formatting=got.append)
    q = qemu_img("create", "-f", "qcow2", missing, str(1 << 20))
    assert q.rc == 1 and [line + "\n" for line in got] == [q.out]
    assert "qemu-img: " + e.value.message + "\n" == q.err
    # a request refused before the line is printed gives none
    got = []
    with pytest.raises(instar.Invalid):
        instar.create(top, "nope", 1024, formatting=got.append)
    assert got == [] and qemu_img("create", "-f", "nope", top, "1024").out == ""


@pytest.mark.parametrize("size", ["abc", "1Q", "99999999999999999999", "9E", "1.5"])
def test_create_size_text_errors(tmp, size):
    path = os.path.join(tmp, "img.raw")
    q = qemu_img("create", "-f", "raw", path, size)
    if q.rc == 0:
        os.rename(path, path + ".qemu")
        instar.create(path, "raw", size)
        assert os.path.getsize(path) == os.path.getsize(path + ".qemu")
        return
    with pytest.raises(instar.InstarError) as e:
        instar.create(path, "raw", size)
    assert "".join("qemu-img: %s\n" % line for line in e.value.message.split("\n")) == q.err
    assert not os.path.exists(path)


def test_compare_status(tmp):
    a, b = os.path.join(tmp, "a.qcow2"), os.path.join(tmp, "b.raw")
    qimg("create", "-f", "qcow2", a, "1M")
    qimg("create", "-f", "raw", b, "1M")
    cases = [((a, b), {}), ((a, b), {"strict": True})]
    for args, kw in cases:
        r, err = instar.compare_status(*args, **kw)
        q = qemu_img("compare", *(["-s"] if kw else []), *args)
        assert (r.exit_status, r.message, err) == (q.rc, q.out, None)
    qemu_io("-f", "raw", "-c", "write -P 7 4k 1", b)
    r, err = instar.compare_status(a, b)
    q = qemu_img("compare", a, b)
    assert (r.exit_status, r.message, r.identical, err) == (q.rc, q.out, False, None) and q.rc == 1
    # open failures: exit status 2 and qemu-img's stderr line
    for args, kw, cli in [((a, os.path.join(tmp, "missing")), {}, []),
                          ((b, a), {"format1": "qcow2"}, ["-f", "qcow2"]),
                          ((a, b), {"format2": "nope"}, ["-F", "nope"])]:
        r, err = instar.compare_status(*args, **kw)
        q = qemu_img("compare", *cli, *args)
        assert q.rc == 2 and r.exit_status == 2 and isinstance(err, instar.InstarError)
        assert "qemu-img: %s\n" % r.error_message == q.err
        with pytest.raises(instar.InstarError):
            instar.compare_result(*args, **kw)


def test_compare_status_read_error(tmp):
    """A compressed cluster that does not inflate: qemu-img compare exits 4 naming the offset and image."""
    raw = os.path.join(tmp, "s.raw")
    qimg("create", "-f", "raw", raw, "1M")
    qemu_io("-f", "raw", "-c", "write -P 0x33 0 64k", raw)
    c = os.path.join(tmp, "c.qcow2")
    qimg("convert", "-c", "-O", "qcow2", raw, c)
    with open(c, "r+b") as f:
        f.seek(40)
        f.seek(int.from_bytes(f.read(8), "big"))
        f.seek(int.from_bytes(f.read(8), "big") & 0x00fffffffffffe00)
        entry = int.from_bytes(f.read(8), "big")
        assert entry & (1 << 62)
        f.seek(entry & ((1 << 54) - 1))
        f.write(b"\xff" * 64)
    for args in [(raw, c), (c, raw)]:
        r, err = instar.compare_status(*args)
        q = qemu_img("compare", *args)
        assert q.rc == 4 and r.exit_status == 4 and err is not None
        assert "qemu-img: %s\n" % r.error_message == q.err


def test_rebase_and_bitmap_warnings(tmp):
    """Writes that open a raw image whose format was probed warn as qemu-img does, before their error."""
    raw = os.path.join(tmp, "r.raw")
    qimg("create", "-f", "raw", raw, "1M")
    got = []
    with pytest.raises(instar.InstarError) as e:
        instar.rebase(raw, "base.qcow2", "qcow2", unsafe=True, warning=got.append)
    q = qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", raw)
    assert q.rc == 1 and "".join(w + "\n" for w in got) + "qemu-img: " + e.value.message + "\n" == q.err
    got = []
    with pytest.raises(instar.InstarError):
        instar.bitmap(raw, "b0", "add", warning=got.append)
    q = qemu_img("bitmap", "--add", raw, "b0")
    assert q.rc == 1 and len(got) == 1 and q.err.startswith(got[0] + "\n")
    # a format given, or a qcow2 image: no warning
    got = []
    with pytest.raises(instar.InstarError):
        instar.bitmap(raw, "b0", "add", fmt="raw", warning=got.append)
    assert got == []
    q2 = os.path.join(tmp, "q.qcow2")
    qimg("create", "-f", "qcow2", q2, "1M")
    instar.bitmap(q2, "b0", "add", warning=got.append)
    instar.rebase(q2, raw, "raw", unsafe=True, warning=got.append)
    assert got == []


@pytest.mark.parametrize("create_opts,setup", [
    ("compat=0.10", None),
    ("compat=1.1", None),
    ("lazy_refcounts=on,refcount_bits=1", None),
    ("refcount_bits=64,compression_type=zstd", None),
    ("extended_l2=on,cluster_size=128k", None),
    ("data_file=DATA,data_file_raw=on", None),
    ("data_file=DATA", None),
    ("compat=1.1", "bitmaps"),
    ("compat=1.1", "in-use"),
    ("compat=1.1", "corrupt"),
    ("encrypt.format=luks,encrypt.key-secret=sec0", None),
])
def test_info_format_specific_typed(tmp, create_opts, setup):
    """qcow2's format-specific member, built from instar_info_t's typed fields (the library's JSON text only
    where they cannot hold it: encryption), equals what qemu-img info prints and what the library's text says."""
    import ctypes
    import importlib
    import json
    from instar._lib import Error
    info_module = importlib.import_module("instar.info")
    path = os.path.join(tmp, "i.qcow2")
    opts = create_opts.replace("DATA", os.path.join(tmp, "d.raw"))
    secret = []
    if "encrypt" in opts:
        secret = ["--object", "secret,id=sec0,data=pw"]
    qimg("create", *secret, "-f", "qcow2", "-o", opts, path, "4M")
    if setup in ("bitmaps", "in-use"):
        qimg("bitmap", "--add", path, "b0")
        qimg("bitmap", "--add", "-g", "128k", "--disable", path, "b1")
    if setup == "in-use":
        with open(path, "r+b") as f:  # the bitmap extension's directory entry flags: set "in use" on b0
            data = f.read()
            ext = data.find(b"\x23\x85\x28\x75", 104)  # the bitmaps extension: magic, length, then its data
            assert ext > 0
            directory = int.from_bytes(data[ext + 8 + 16:ext + 8 + 24], "big")
            flags_at = directory + 12  # table offset (8), table size (4), flags (4)
            f.seek(flags_at)
            f.write((int.from_bytes(data[flags_at:flags_at + 4], "big") | 1).to_bytes(4, "big"))
    if setup == "corrupt":
        with open(path, "r+b") as f:  # incompatible feature bit 1: corrupt
            f.seek(72)
            f.write((2).to_bytes(8, "big"))
    q = qemu_img("info", "--output=json", "-U", path)
    assert q.rc == 0, q
    expected = json.loads(q.out)["format-specific"]
    got = instar.info(path, force_share=True).format_specific
    assert got == expected
    if setup == "in-use":
        assert expected["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    if setup == "corrupt":
        assert expected["data"]["corrupt"] is True
    L = info_module._setup()
    opts_struct = info_module._options(None, True, False)
    out = ctypes.POINTER(info_module._Info)()
    assert L.instar_info(path.encode(), ctypes.byref(opts_struct), ctypes.byref(out), ctypes.byref(Error())) == 0
    try:
        text = json.loads(out.contents.format_specific_json)
        typed = info_module._qcow2_specific(out.contents)
    finally:
        L.instar_info_free(out)
    assert text == expected
    assert typed == (None if "encrypt" in opts else expected)
    if typed is not None:
        assert list(typed["data"]) == list(expected["data"])  # qemu-img's key order too
