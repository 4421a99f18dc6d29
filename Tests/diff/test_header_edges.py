"""Header oddities on the write paths, against qemu-img 7.2: header fields qemu does not know (header_length past
112) are kept when the header is written again, a header with no room left fails the way qemu's does, and an
image without a refcount table opens for `check`, which rebuilds it."""
import os
import struct

import pytest

from conftest import qimg, qemu_io
from test_bitmap_writes import same_result


def image(tmp, name, edit):
    path = os.path.join(tmp, name)
    qimg("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 3 0 64k", "-c", "write -P 4 1M 64k", path)
    with open(path, "r+b") as f:
        edit(f)
    return path


def header_length(n, fill=b""):
    """Sets header_length to `n`; with `fill`, those bytes become fields past 112 and the extensions move up."""
    def edit(f):
        area = bytearray(f.read(65536))
        if fill:
            area[112:] = fill + area[112:len(area) - len(fill)]
        struct.pack_into(">I", area, 100, n)
        f.seek(0)
        f.write(area)
    return edit


AMENDS = [["-o", "lazy_refcounts=on"], ["-o", "compat=0.10"], ["-o", "size=8M"], ["-o", "compat=1.1"]]


@pytest.mark.parametrize("opts", AMENDS, ids=lambda o: o[1])
@pytest.mark.parametrize("length", [120, 0x10000])
def test_unknown_header_fields(tmp, length, opts):
    # 120: eight bytes of fields qemu does not know, kept; 0x10000: no room left for the extensions.
    src = image(tmp, "h.qcow2", header_length(length, b"\x5a" * 8))
    same_result(tmp, src, ["amend", *opts, "X"])


def test_unknown_header_fields_survive_resize_and_bitmaps(tmp):
    src = image(tmp, "h.qcow2", header_length(120, b"\x5a" * 8))
    qimg("bitmap", "--add", src, "b0")
    for args in (["resize", "X", "+1M"], ["amend", "-o", "lazy_refcounts=on", "X"], ["check", "-r", "all", "X"]):
        same_result(tmp, src, args)


def no_refcount_table(f):
    f.seek(56)
    f.write(struct.pack(">I", 0))


@pytest.mark.parametrize("args", [["check", "X"], ["check", "--output=json", "X"], ["check", "-r", "all", "X"],
                                  ["info", "X"], ["resize", "X", "8M"]], ids=lambda a: " ".join(a))
def test_no_refcount_table(tmp, args):
    # qemu-img 7.2 crashes on `check -r leaks` of this image, so that one is left out.
    same_result(tmp, image(tmp, "n.qcow2", no_refcount_table), args)
