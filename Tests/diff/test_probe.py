"""instar_probe (C API, Inspect/): each format's structures read from captured regions, against qemu-img.

The virtual size a probe reads from qemu-img-made images equals `qemu-img info`'s, following the probe's own
`need` from one structure to the next as a stream inspector does (vmdk header -> descriptor, vhdx region table ->
metadata table -> item); the safety findings match what the images carry; malformed structures fail with
INSTAR_E_CORRUPT and bad arguments with INSTAR_E_INVALID; only the declared part of the result struct is written.
"""
import ctypes
import os
import struct

import pytest

from conftest import info_json, qemu_io, qimg

from instar import Corrupt, Invalid
from instar import probe as P
from instar._lib import Error


def read(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def make(tmp, name, fmt, size, *opts):
    path = os.path.join(tmp, name)
    qimg("create", "-q", "-f", fmt, *opts, path, size)
    return path


def probed_size(path, fmt):
    """The virtual size the probes give, reading only the regions they ask for."""
    if fmt == "vhdx":
        r = P.probe("vhdx", "header", [(192 * 1024, read(path, 192 * 1024, 64 * 1024))])
        off, n = r.need
        r = P.probe("vhdx", "metadata", [(off, read(path, off, n))])
        off, n = r.need
        return P.probe("vhdx", "item", [(off, read(path, off, n))]).virtual_size
    if fmt == "iso":
        return P.probe("iso", "header", [(32768, read(path, 32768, 2048))]).virtual_size
    return P.probe(fmt, "header", [(0, read(path, 0, 512))]).virtual_size


@pytest.mark.parametrize("fmt,opts", [
    ("qcow2", ()), ("qcow2", ("-o", "compat=0.10")), ("vpc", ()), ("vhdx", ()), ("vdi", ()), ("vmdk", ()),
    ("vmdk", ("-o", "subformat=streamOptimized")),
])
def test_virtual_size_as_qemu_img(tmp, fmt, opts):
    for size in ("7M", "129M"):
        path = make(tmp, "a." + fmt, fmt, size, *opts)
        want = info_json(path)["virtual-size"]
        assert probed_size(path, "vhd" if fmt == "vpc" else fmt) == want
        os.unlink(path)


def test_vmdk_descriptor_and_extents(tmp):
    path = make(tmp, "a.vmdk", "vmdk", "8M")
    h = P.probe("vmdk", "header", [(0, read(path, 0, 512))])
    assert h.match and h.version == 1 and not h.footer and h.need[0] == 512
    d = P.probe("vmdk", "descriptor", [(h.need[0], read(path, *h.need))])
    assert (d.subformat, d.violations) == ("monolithicsparse", 0)
    flat = make(tmp, "f.vmdk", "vmdk", "8M", "-o", "subformat=monolithicFlat")
    d = P.probe("vmdk", "descriptor", [(0, read(flat, 0, 4096))])
    assert d.subformat == "monolithicflat" and d.violations & P.V_SUBFORMAT
    evil = read(path, 512, 1024).replace(b'"a.vmdk"', b'"/etc/shadow"')
    d = P.probe("vmdk", "descriptor", [(512, evil)])
    assert d.violations & P.V_EXTENT_PATH and d.message == "Invalid extent filenames found"
    with pytest.raises(Corrupt, match="Signature KDMV not found"):
        P.probe("vmdk", "header", [(0, b"\x01" * 512)])
    bad = bytearray(read(path, 0, 512))
    bad[28:36] = struct.pack("<Q", 3)
    with pytest.raises(Corrupt, match="Wrong descriptor location"):
        P.probe("vmdk", "header", [(0, bytes(bad))])


def test_qcow2_findings(tmp):
    base = make(tmp, "b.raw", "raw", "1M")
    top = os.path.join(tmp, "t.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    df = make(tmp, "d.qcow2", "qcow2", "1M", "-o", "data_file=" + os.path.join(tmp, "d.data"))
    l2 = make(tmp, "e.qcow2", "qcow2", "1M", "-o", "extended_l2=on")
    assert P.probe("qcow2", "header", [(0, read(top, 0, 512))]).violations == P.V_BACKING_FILE
    assert P.probe("qcow2", "header", [(0, read(df, 0, 512))]).violations == P.V_DATA_FILE
    assert P.probe("qcow2", "header", [(0, read(l2, 0, 512))]).violations == P.V_UNKNOWN_FEATURES
    # Extended L2 (bit 4) is known once the caller says five bits are.
    assert P.probe("qcow2", "header", [(0, read(l2, 0, 512))], qcow2_known_features=5).violations == 0
    # Too few bytes: no answer yet, and what is needed.
    r = P.probe("qcow2", "header", [(0, read(top, 0, 16))])
    assert r.match is None and r.need == (0, 32)


def test_luks_header_and_payload(tmp):
    path = os.path.join(tmp, "a.luks")
    qimg("create", "-q", "-f", "luks", "--object", "secret,id=s0,data=pw", "-o", "key-secret=s0,iter-time=10",
         path, "4M")
    r = qemu_io("--object", "secret,id=s0,data=pw", "--image-opts",
                "driver=luks,key-secret=s0,file.filename=" + path, "-c", "write -P 0x61 0 512")
    assert r.rc == 0, r
    head = read(path, 0, 592)
    h = P.probe("luks", "header", [(0, head)])
    assert h.match and h.version == 1 and h.key_slot == 0
    assert h.virtual_size is None and info_json(path)["virtual-size"] == os.path.getsize(path) - h.payload_offset * 512
    regions = [(0, head), (h.need[0], read(path, *h.need)), (h.payload_offset * 512, read(path, h.payload_offset * 512, 512))]
    r = P.probe("luks", "payload", regions, luks_passphrase="pw")
    assert r.payload == b"a" * 512       # what qemu-io wrote through qemu's LUKS driver
    with pytest.raises(Exception, match="master key"):
        P.probe("luks", "payload", regions, luks_passphrase="wrong")
    with pytest.raises(Exception, match="iteration limit"):
        P.probe("luks", "payload", regions, luks_passphrase="pw", luks_iter_limit=1)


def test_arguments_and_struct_size():
    with pytest.raises(Invalid):
        P.probe("nosuch", "header", [(0, b"x")])
    with pytest.raises(Invalid):
        P.probe("vmdk", "nosuch", [(0, b"x")])
    L = P._setup()
    err = Error()
    # A result struct declared 8 bytes long: only struct_size and match are written.
    res = P._Result()
    ctypes.memset(ctypes.byref(res), 0x5a, ctypes.sizeof(res))
    res.struct_size = 8
    opts = P._Options(ctypes.sizeof(P._Options), 0, b"qcow2", b"header", 0, None, None, 0)
    data = ctypes.create_string_buffer(b"QFI\xfb" + b"\0" * 508, 512)
    region = P._Region(0, 512, ctypes.cast(data, ctypes.c_void_p))
    assert L.instar_probe(ctypes.byref(region), 1, ctypes.byref(opts), ctypes.byref(res), ctypes.byref(err)) == 0
    assert (res.struct_size, res.match) == (8, 1)
    assert res.virtual_size == 0x5a5a5a5a5a5a5a5a - (1 << 64) or res.virtual_size == 0x5a5a5a5a5a5a5a5a
    # NULL result, NULL regions with a count: INSTAR_E_INVALID.
    assert L.instar_probe(ctypes.byref(region), 1, ctypes.byref(opts), None, ctypes.byref(err)) == -1
    assert L.instar_probe(None, 1, ctypes.byref(opts), ctypes.byref(res), ctypes.byref(err)) == -1
