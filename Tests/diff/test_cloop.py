"""cloop: differential tests against qemu-img 7.2 on V2.0 images built byte by byte (readonly_images.py;
qemu-img cannot create cloop images): every image is checked with qemu-img first, then instar must describe,
map, compare, convert and measure it as qemu-img does, refuse every writer with qemu's message, probe it as qemu
does, and fail on damaged headers, offset tables and compressed blocks (decompression bombs included) with
qemu's errors under a 1 GiB address-space limit."""
import os
import struct
import zlib

import pytest

import peak_rss
import readonly_images as R
from conftest import BUILD, INSTAR, assert_same, normalize, qemu, run

MiB = 1 << 20
KiB = 1 << 10


def _images():
    g = R.guest_pattern(MiB)
    g3 = R.guest_pattern(3 * MiB + 5 * 512, seed=7)
    g3_padded = g3 + bytes(-len(g3) % (256 * KiB))
    return {
        "64k": (g, R.cloop_image(g)),
        "512": (g[:64 * KiB], R.cloop_image(g[:64 * KiB], block_size=512)),
        "256k-padded": (g3_padded, R.cloop_image(g3, block_size=256 * KiB)),
        "level-0": (g, R.cloop_image(g, block_size=128 * KiB, level=0)),
        "zeros": (bytes(2 * MiB), R.cloop_image(bytes(2 * MiB), block_size=MiB)),
        "one-block-64m": (bytes(64 * MiB), R.cloop_image(bytes(64 * MiB), block_size=64 * MiB)),
        "no-blocks": (b"", R.cloop_image(b"")),
    }


IMAGES = _images()


@pytest.fixture
def image(tmp, request):
    guest, data = IMAGES[request.param]
    path = R.write(os.path.join(tmp, "img.cloop"), data)
    R.qemu_reads(tmp, path, guest, "cloop")
    return path, guest


@pytest.mark.parametrize("image", sorted(IMAGES), indirect=True)
def test_reads_as_qemu(tmp, image):
    path, guest = image
    R.same_reads(tmp, path, "cloop")
    R.python_info(path, "cloop", guest)


@pytest.mark.parametrize("image", ["64k"], indirect=True)
def test_writers_refused_as_qemu(tmp, image):
    R.same_refusals(tmp, image[0], "cloop")


@pytest.mark.parametrize("image", ["64k"], indirect=True)
def test_commit_refused_as_qemu(tmp, image):
    R.same_commit_refusals(tmp, image[0], "cloop")


@pytest.mark.parametrize("image", ["64k"], indirect=True)
def test_open_options_as_qemu(tmp, image):
    R.same_open_options(tmp, image[0], "cloop")


def test_help_lists_cloop():
    r = run([INSTAR, "--help"])
    assert " cloop " in r.out.split("Supported formats:")[1].splitlines()[0] + " ", r.out


G = R.guest_pattern(256 * KiB, seed=5)
BS = 64 * KiB


def _base(**kw):
    return lambda: R.cloop_image(G, block_size=BS, **kw)


def _field(offset, fmt, value, **kw):
    def f():
        data = bytearray(R.cloop_image(G, block_size=BS, **kw))
        struct.pack_into(fmt, data, offset, value)
        return bytes(data)
    return f


def _offsets(change):
    """The valid image with its offsets table changed by `change(list)`."""
    def f():
        data = bytearray(R.cloop_image(G, block_size=BS))
        n = struct.unpack_from(">I", data, 132)[0]
        offs = list(struct.unpack_from(f">{n + 1}Q", data, 136))
        change(offs)
        struct.pack_into(f">{n + 1}Q", data, 136, *offs)
        return bytes(data)
    return f


def _set(i, v):
    def change(offs):
        offs[i] = v
    return change


def _chunk(i, payload):
    """Block i's stream replaced by `payload` (the table rebuilt around it)."""
    def f():
        chunks = [zlib.compress(G[k * BS:(k + 1) * BS], 9) for k in range(len(G) // BS)]
        chunks[i] = payload
        return R.cloop_image(G, block_size=BS, chunks=chunks)
    return f


def _big_table(n_blocks, block_size=BS):
    """Only the preamble and the counts: the table (read as zeroes past the end of the file) is all zero."""
    return lambda: R.cloop_image(b"", block_size=block_size, n_blocks=n_blocks, chunks=[], offsets=[])


# name -> (image maker, whether convert and compare run too)
HOSTILE = {
    "block-size-1000": (_field(128, ">I", 1000), True),
    "block-size-zero": (_field(128, ">I", 0), True),
    "block-size-128m": (_field(128, ">I", 128 * MiB), True),
    "block-size-64m-1": (_field(128, ">I", 64 * MiB + 512), True),
    "block-size-huge": (_field(128, ">I", 0xFFFFFE00), True),
    "block-size-doubled": (_field(128, ">I", 2 * BS), True),
    "block-size-halved": (_field(128, ">I", BS // 2), True),
    "n-blocks-too-many": (_field(132, ">I", 0x20000000), True),
    "n-blocks-max": (_field(132, ">I", 0x1FFFFFFF), True),
    "n-blocks-uint32-max": (_field(132, ">I", 0xFFFFFFFF), True),
    "too-many-offsets": (_field(132, ">I", 64 * MiB), True),
    "largest-table": (_big_table(64 * MiB - 1), True),
    "size-wraps-to-zero": (_big_table(65536, block_size=64 * MiB), True),
    "size-wraps": (_big_table(65537, block_size=64 * MiB), True),
    "n-blocks-more": (_field(132, ">I", 5), True),
    "n-blocks-fewer": (_field(132, ">I", 2), True),
    "non-monotonic": (_offsets(_set(2, 0)), True),
    "non-monotonic-last": (_offsets(_set(4, 136)), True),
    "first-offset-past-table": (_offsets(_set(0, 0)), True),
    "chunk-too-big": (_offsets(lambda o: o.__setitem__(slice(2, 5), [x + 128 * MiB + 1 for x in o[2:5]])), True),
    "chunk-128m": (_offsets(lambda o: o.__setitem__(slice(2, 5), [x + 128 * MiB - (o[2] - o[1]) for x in o[2:5]])),
                   True),
    "offsets-past-eof": (_offsets(lambda o: o.__setitem__(slice(0, 5), [x + (1 << 40) for x in o])), True),
    "offsets-near-int64-max": (_offsets(lambda o: o.__setitem__(slice(0, 5), [x + (1 << 63) - 4096 for x in o])),
                               True),
    "offsets-all-zero": (_offsets(lambda o: o.__setitem__(slice(0, 5), [0] * 5)), True),
    "bomb": (_chunk(1, zlib.compress(bytes(64 * MiB), 9)), True),
    "inflates-beyond-block": (_chunk(1, zlib.compress(bytes(BS + 512), 9)), True),
    "inflates-short": (_chunk(1, zlib.compress(bytes(BS - 512), 9)), True),
    "raw-deflate": (_chunk(1, zlib.compress(bytes(BS), 9)[2:-4]), True),
    "garbage-chunk": (_chunk(2, b"\x78\x9c" + b"\xff" * 100), True),
    "empty-chunk": (_chunk(3, b""), True),
    "trailing-bytes": (_chunk(0, zlib.compress(G[:BS], 9) + b"junk"), True),
    "truncated-table": (lambda: R.cloop_image(G, block_size=BS)[:136 + 20], True),
    "truncated-data": (lambda: R.cloop_image(G, block_size=BS)[:-100], True),
    "truncated-header": (lambda: R.cloop_image(G, block_size=BS)[:130], True),
    "bad-magic": (lambda: R.cloop_image(G, block_size=BS, magic=b"#!/bin/sh\n#V3.0 Format\n"), True),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_as_qemu(tmp, name):
    make, copy = HOSTILE[name]
    path = R.write(os.path.join(tmp, "h.cloop"), make())
    R.same_hostile(tmp, path, "cloop", copy=copy)


def test_probe_prefix(tmp):
    """qemu's cloop probe compares the preamble only over the bytes the file has: a file holding just the first
    bytes of it is cloop (score 2, below every other format), and a file whose preamble differs is raw."""
    for name, data in (("prefix.img", R.CLOOP_MAGIC[:20]), ("whole.img", R.cloop_image(G, block_size=BS)),
                       ("other.img", b"#!/bin/sh\necho hi\n" + bytes(1000))):
        R.write(os.path.join(tmp, name), data)
        assert_same("info", "--output=json", name, cwd=tmp)
        assert_same("info", name, cwd=tmp)


def test_table_larger_than_kept_in_memory(tmp):
    """A table of more than 4M entries, which instar reads from the file as it goes instead of holding it: the
    blocks near the start and the end read as qemu reads them (info, and dd of a few blocks at each end)."""
    n = (4 << 20) + 3
    zero = zlib.compress(bytes(512), 9)
    chunks = [zero] * n
    marks = {0: b"first", 1: b"second", n - 2: b"next-to-last", n - 1: b"last"}
    for i, text in marks.items():
        chunks[i] = zlib.compress(text.ljust(512, b"."), 9)
    path = R.write(os.path.join(tmp, "big.cloop"), R.cloop_image(b"", block_size=512, chunks=chunks))
    assert_same("info", "--output=json", "big.cloop", cwd=tmp)
    assert_same("map", "--output=json", "big.cloop", cwd=tmp)
    for skip in (0, n - 4):
        # qemu-img 7.2's dd counts `count` from the start of the input, skipped blocks included.
        outs = []
        for who, tool in (("q", "qemu-img"), ("i", None)):
            out = os.path.join(tmp, f"dd-{who}.raw")
            argv = ["dd", "-O", "raw", "bs=512", f"skip={skip}", f"count={skip + 4}", "if=big.cloop", f"of={out}"]
            r = qemu(*argv, cwd=tmp) if tool else run([INSTAR, *argv], cwd=tmp)
            assert r.rc == 0, r
            outs.append(open(out, "rb").read())
        assert outs[0] == outs[1] and len(outs[0]) == 2048
        want = b"".join(marks.get(skip + k, b"").ljust(512, b".") if skip + k in marks else bytes(512)
                        for k in range(4))
        assert outs[0] == want
    os.unlink(path)


def test_failing_block_of_64m_stays_small(tmp):
    """size-wraps: 65537 blocks of 64 MiB whose table is all zero, so block 0's stream is empty. instar filled a
    64 MiB block buffer with zeroes before inflating nothing (74 MiB resident against qemu's 8 MiB); the buffer
    is now left unwritten until inflate fills it. Same output as qemu-img, and about its peak RSS."""
    make, _ = HOSTILE["size-wraps"]
    R.write(os.path.join(tmp, "h.cloop"), make())
    argv = ["convert", "-O", "raw", "h.cloop", "out.raw"]
    q = peak_rss.run(BUILD, ["qemu-img", *argv], tmp)
    i = peak_rss.run(BUILD, [INSTAR, *argv], tmp)
    assert i[0] == q[0] == 1 and i[1] == normalize(q[1]) and i[2] == normalize(q[2]).splitlines(True)[0], (q, i)
    assert i[3] <= q[3] + (16 << 20), f"instar {i[3] >> 20} MiB, qemu-img {q[3] >> 20} MiB"
