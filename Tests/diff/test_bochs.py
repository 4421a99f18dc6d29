"""bochs: differential tests against qemu-img 7.2 on growing redolog images built byte by byte
(readonly_images.py; qemu-img cannot create bochs images): every image is checked with qemu-img first, then
instar must describe, map, compare, convert and measure it as qemu-img does, refuse every writer with qemu's
message, probe it as qemu does, and fail on damaged headers and catalogs with qemu's errors under a 1 GiB
address-space limit."""
import os
import struct

import pytest

import readonly_images as R
from conftest import INSTAR, assert_same, run

MiB = 1 << 20
S = R.SECTOR


def _masked(guest, stored):
    """The guest bytes as qemu reads them when only the sectors in `stored` are stored."""
    out = bytearray(len(guest))
    for s in range(len(guest) // S):
        if stored(s):
            out[s * S:(s + 1) * S] = guest[s * S:(s + 1) * S]
    return bytes(out)


def _every_third(s):
    return s % 3 != 1


# name -> (guest bytes as qemu must read them, image bytes)
def _images():
    g = R.guest_pattern(MiB)
    g2 = R.guest_pattern(3 * MiB + 7 * S, seed=3)
    half = g[:MiB // 2] + bytes(MiB // 2)
    return {
        "v2": (g, R.bochs_image(g)),
        "v1": (g, R.bochs_image(g, version=R.BOCHS_V1)),
        "v1-32k-reverse": (g, R.bochs_image(g, version=R.BOCHS_V1, extent=32768, reverse=True)),
        "extent-512": (g[:256 * 1024], R.bochs_image(g[:256 * 1024], extent=512)),
        "extent-8m": (g2, R.bochs_image(g2, extent=8 * MiB)),
        "odd-sectors": (g2, R.bochs_image(g2, extent=65536, reverse=True)),
        "bits-unset": (_masked(g, _every_third), R.bochs_image(g, stored=_every_third)),
        "sparse-half": (half, R.bochs_image(half, extent=16384)),
        "empty": (bytes(MiB), R.bochs_image(bytes(MiB))),
        # A bitmap wider than one sector (two bitmap blocks before each extent's data).
        "bitmap-2-blocks": (g, R.bochs_image(g, bitmap=600)),
        # The catalog further from the start than the header's 512 bytes, with more entries than needed.
        "catalog-gap": (g, R.bochs_image(g, header=2048, catalog=1000)),
        # A disk size that is no multiple of 512: qemu rounds it down to whole sectors.
        "disk-odd-bytes": (g[:MiB - S], R.bochs_image(g, disk=MiB - 1)),
        "disk-zero": (b"", R.bochs_image(g, disk=0)),
    }


IMAGES = _images()


@pytest.fixture
def image(tmp, request):
    guest, data = IMAGES[request.param]
    path = R.write(os.path.join(tmp, "img.bochs"), data)
    R.qemu_reads(tmp, path, guest, "bochs")
    return path, guest


@pytest.mark.parametrize("image", sorted(IMAGES), indirect=True)
def test_reads_as_qemu(tmp, image):
    path, guest = image
    R.same_reads(tmp, path, "bochs")
    R.python_info(path, "bochs", guest)


@pytest.mark.parametrize("image", ["v2", "v1"], indirect=True)
def test_writers_refused_as_qemu(tmp, image):
    R.same_refusals(tmp, image[0], "bochs")


@pytest.mark.parametrize("image", ["v2", "v1"], indirect=True)
def test_commit_refused_as_qemu(tmp, image):
    R.same_commit_refusals(tmp, image[0], "bochs")


@pytest.mark.parametrize("image", ["v2"], indirect=True)
def test_open_options_as_qemu(tmp, image):
    R.same_open_options(tmp, image[0], "bochs")


def test_help_lists_bochs():
    r = run([INSTAR, "--help"])
    assert " bochs " in r.out.split("Supported formats:")[1].splitlines()[0] + " ", r.out


def _header_variant(**fields):
    g = R.guest_pattern(64 * 1024)
    return R.bochs_image(g, **fields)


def _patched(offset, fmt, value):
    """A valid 64 KiB image whose header field at `offset` is overwritten (the layout stays the valid one)."""
    def f():
        data = bytearray(R.bochs_image(R.guest_pattern(64 * 1024)))
        struct.pack_into(fmt, data, offset, value)
        return bytes(data)
    return f


def _catalog_entry(value, index=0):
    def f():
        data = bytearray(R.bochs_image(R.guest_pattern(64 * 1024)))
        struct.pack_into("<I", data, 512 + 4 * index, value)
        return bytes(data)
    return f


def _truncated(length):
    return lambda: R.bochs_image(R.guest_pattern(64 * 1024))[:length]


def _max_catalog():
    # The largest catalog qemu takes (1M entries) and the largest extent: an 8 TiB disk, no data.
    h = R.bochs_header(catalog=0x100000, bitmap=2048, extent=0x800000, disk=0x100000 * 0x800000)
    return bytes(h)


def _wrapping_offset():
    # bitmap 0 makes qemu's bitmap_blocks 2^23; with 8 MiB extents and a catalog entry near 2^32 the extent's
    # file offset wraps around 64 bits.
    h = R.bochs_header(catalog=4, bitmap=0, extent=0x800000, disk=4 * 0x800000)
    return bytes(h) + struct.pack("<4I", 0, 0xFFFFFFFE, 0x7FFFFFFF, 0xFFFFFFFF) + b"\xff" * 4096


HOSTILE = {
    "bad-magic": (lambda: _header_variant(magic=b"Bochs Virtual HD Imagf"), True),
    "bad-type": (lambda: _header_variant(type_=b"Undoable"), True),
    "bad-subtype": (lambda: _header_variant(subtype=b"Volatile"), True),
    "magic-no-nul": (lambda: _header_variant(magic=b"Bochs Virtual HD Image" + b"x" * 10), True),
    "version-3": (lambda: _header_variant(version=0x00030000), True),
    "catalog-too-large": (lambda: _header_variant(catalog=0x100001), True),
    "catalog-huge": (_patched(72, "<I", 0xFFFFFFFF), True),
    "catalog-max": (_patched(72, "<I", 0x100000), True),
    "catalog-too-small": (lambda: _header_variant(disk=1 << 40), True),
    "disk-huge": (lambda: _header_variant(disk=(1 << 64) - 1), True),
    "extent-zero": (_patched(80, "<I", 0), True),
    "extent-256": (lambda: _header_variant(extent=256), True),
    "extent-not-pow2": (lambda: _header_variant(extent=3 * 4096), True),
    "extent-16m": (lambda: _header_variant(extent=16 * MiB), True),
    "extent-huge": (_patched(80, "<I", 0x80000000), True),
    "extent-larger": (_patched(80, "<I", 0x8000), True),
    "entry-past-eof": (_catalog_entry(0xFFFFFFFE), True),
    "entry-duplicate": (_catalog_entry(0, index=5), True),
    "catalog-offset-huge": (_patched(68, "<I", 0xFFFFFF00), True),
    "catalog-offset-zero": (_patched(68, "<I", 0), True),
    "bitmap-zero": (_patched(76, "<I", 0), True),
    "bitmap-huge": (_patched(76, "<I", 0xFFFFFFFF), True),
    "bitmap-big": (_patched(76, "<I", 1 << 20), True),
    "version-1-reads-v2": (_patched(64, "<I", R.BOCHS_V1), True),
    "wrapping-offset": (_wrapping_offset, True),
    "truncated-header": (_truncated(300), True),
    "truncated-catalog": (_truncated(512 + 8), True),
    "truncated-data": (_truncated(512 + 64 + 4096 * 3 + 100), True),
    "max-catalog": (_max_catalog, False),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_as_qemu(tmp, name):
    make, copy = HOSTILE[name]
    path = R.write(os.path.join(tmp, "h.bochs"), make())
    R.same_hostile(tmp, path, "bochs", copy=copy)


def test_probe_needs_whole_header(tmp):
    """qemu probes bochs only with a whole 512-byte header in the file's first bytes; a shorter file with the
    right fields is raw unless -f bochs is given."""
    data = R.bochs_image(R.guest_pattern(64 * 1024))
    for n, name in ((511, "short.img"), (len(data), "whole.img")):
        R.write(os.path.join(tmp, name), data[:n])
        assert_same("info", "--output=json", name, cwd=tmp)
