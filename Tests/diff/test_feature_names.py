"""Feature bits qemu-img 7.2 does not know, against qemu-img: unknown incompatible bits refuse the image, named from
the image's feature-name table where it names them (qemu's report_unsupported_feature, with the quirks of its walk
over the header extensions), unknown compatible bits are kept and unknown autoclear bits are dropped by the first
writable open."""
import os
import struct

import pytest

from conftest import assert_same, qimg, qemu_io
from test_bitmap_writes import same_result

FEATURE_TABLE = 0x6803F857
BACKING_FORMAT = 0xE2792ACA
BITMAPS = 0x23852875
CRYPTO = 0x0537BE77
UNKNOWN_EXT = 0x12345678


def entry(kind, bit, name):
    """One 48-byte feature-name table entry (name truncated or NUL padded to 46 bytes)."""
    raw = name if isinstance(name, bytes) else name.encode()
    return struct.pack(">BB", kind, bit) + raw[:46].ljust(46, b"\0")


def ext(kind, data):
    return struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)


def table(*entries):
    return ext(FEATURE_TABLE, b"".join(entry(*e) for e in entries))


def image(tmp, extensions, incompat=0, compat=0, autoclear=0, name="f.qcow2"):
    """A qcow2 made by qemu-img with extra feature bits set and its header extensions replaced by `extensions`
    (bytes, followed by the end marker)."""
    path = os.path.join(tmp, name)
    qimg("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 7 0 64k", path)
    with open(path, "r+b") as f:
        area = bytearray(f.read(65536))
        hlen = struct.unpack_from(">I", area, 100)[0]
        for off, bits in ((72, incompat), (80, compat), (88, autoclear)):
            struct.pack_into(">Q", area, off, struct.unpack_from(">Q", area, off)[0] | bits)
        body = extensions + struct.pack(">II", 0, 0)
        area[hlen:hlen + len(body)] = body
        area[hlen + len(body):] = b"\0" * (len(area) - hlen - len(body))
        f.seek(0)
        f.write(area)
    return path


TEST = (0, 63, "Test feature")
CASES = {
    # The example: one named bit, two unnamed ones.
    "named_and_unnamed": (table(TEST), (1 << 63) | (3 << 61)),
    "named": (table(TEST), 1 << 63),
    "unnamed_no_table": (b"", 1 << 40),
    "unnamed_with_qemu_table": (None, 1 << 40),
    "several_named_in_table_order": (table((0, 9, "nine"), (0, 5, "five"), (0, 7, "seven")), (1 << 5) | (1 << 7) | (1 << 9)),
    "compatible_and_autoclear_names_ignored": (table((1, 40, "compat name"), (2, 40, "autoclear name")), 1 << 40),
    "known_bits_renamed": (table((0, 0, "my dirty"), (0, 40, "forty")), (1 << 40) | 1),
    "bit_number_wraps": (table((0, 104, "bit 104")), 1 << 40),
    "duplicate_names": (table((0, 40, "first"), (0, 40, "second")), 1 << 40),
    "name_46_bytes": (table((0, 40, "x" * 46)), 1 << 40),
    "name_longer_cut": (table((0, 40, "y" * 60)), 1 << 40),
    "empty_name_ends_table": (table((0, 41, "a"), (0, 42, ""), (0, 43, "c")), (1 << 41) | (1 << 43)),
    "last_table_wins": (table((0, 40, "old")) + table((0, 41, "new")), (1 << 40) | (1 << 41)),
    "short_last_entry": (ext(FEATURE_TABLE, entry(0, 40, "whole") + entry(0, 41, "cut here")[:5]), (1 << 40) | (1 << 41)),
    "short_entry_no_name": (ext(FEATURE_TABLE, entry(0, 40, "whole") + entry(0, 41, "gone")[:2]), (1 << 40) | (1 << 41)),
    "after_unknown_extension": (ext(UNKNOWN_EXT, b"abc") + table((0, 40, "after")), 1 << 40),
    "after_backing_format": (ext(BACKING_FORMAT, b"raw") + table((0, 40, "after")), 1 << 40),
    "after_bad_backing_format": (ext(BACKING_FORMAT, b"r" * 1100) + table((0, 40, "never read")), 1 << 40),
    "table_then_bad_backing_format": (table((0, 40, "read")) + ext(BACKING_FORMAT, b"r" * 1100), 1 << 40),
    "after_crypto": (ext(CRYPTO, b"\0" * 16) + table((0, 40, "never read")), 1 << 40),
    "after_bad_bitmaps_length": (ext(BITMAPS, b"\0" * 8) + table((0, 40, "never read")), 1 << 40),
    "after_unvouched_bitmaps": (ext(BITMAPS, struct.pack(">IIQQ", 1, 0, 64, 0x30000)) + table((0, 40, "named")), 1 << 40),
    "after_zero_bitmaps": (ext(BITMAPS, struct.pack(">IIQQ", 0, 0, 64, 0x30000)) + table((0, 40, "never read")), 1 << 40, 0, 1),
    "after_good_bitmaps": (ext(BITMAPS, struct.pack(">IIQQ", 1, 0, 64, 0x30000)) + table((0, 40, "named")), 1 << 40, 0, 1),
    "too_large_extension": (table((0, 40, "named")) + struct.pack(">II", UNKNOWN_EXT, 0x7FFFFFFF), 1 << 40),
    "not_utf8_free_ascii_punctuation": (table((0, 40, "a, b: c (d)")), 1 << 40),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cmd", [["info"], ["info", "--output=json"], ["check"], ["map", "--output=json"],
                                 ["convert", "-O", "raw", "X", "out.raw"], ["resize", "X", "+1M"],
                                 ["amend", "-o", "lazy_refcounts=on", "X"], ["compare", "X", "X"]],
                         ids=lambda c: "-".join(c[:2]).replace("--output=", ""))
def test_unknown_incompatible_features(tmp, case, cmd):
    spec = CASES[case]
    extensions, incompat = spec[0], spec[1]
    autoclear = spec[3] if len(spec) > 3 else 0
    if extensions is None:
        # qemu-img's own table stays: it names only the features qemu knows.
        path = os.path.join(tmp, "f.qcow2")
        qimg("create", "-q", "-f", "qcow2", path, "4M")
        with open(path, "r+b") as f:
            f.seek(72)
            old = struct.unpack(">Q", f.read(8))[0]
            f.seek(72)
            f.write(struct.pack(">Q", old | incompat))
    else:
        path = image(tmp, extensions, incompat=incompat, autoclear=autoclear)
    args = [a if a != "X" else "f.qcow2" for a in cmd]
    if "X" not in cmd:
        args.append("f.qcow2")
    r = assert_same(*args, cwd=tmp)
    assert r.rc != 0 and "Unsupported qcow2 feature(s): " in r.err


@pytest.mark.parametrize("compat,autoclear", [(1 << 5, 0), (1 << 40, 0), (0, 1 << 7), (0, 1 << 50), (1 << 9, 1 << 9)])
@pytest.mark.parametrize("args", [["info", "X"], ["info", "--output=json", "X"], ["check", "X"],
                                  ["resize", "X", "+1M"], ["amend", "-o", "lazy_refcounts=on", "X"],
                                  ["check", "-r", "all", "X"], ["convert", "-n", "-O", "qcow2", "SRC.raw", "X"]],
                         ids=lambda a: "-".join(a[:2]))
def test_unknown_compatible_and_autoclear_bits(tmp, compat, autoclear, args):
    # Compatible bits stay; autoclear bits qemu does not know go at the first writable open. Their names in the
    # table change nothing.
    with open(os.path.join(tmp, "SRC.raw"), "wb") as f:
        f.write(b"\x11" * 65536 + b"\0" * (4 * 1024 * 1024 - 65536))
    src = image(tmp, table((1, 40, "compat"), (2, 7, "autoclear"), (0, 40, "incompat")), compat=compat,
                autoclear=autoclear, name="src.qcow2")
    same_result(tmp, src, args)
