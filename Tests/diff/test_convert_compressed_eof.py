"""convert -c: the target file must be qemu-img's byte for byte, length included. qemu-img ends a compressed copy
with an empty compressed write, which qcow2 turns into a truncate of its file to the length the block layer
reports (whole 512-byte sectors), so a file that ends inside a sector (after a compressed stream, or after a
short L1 table) grows to the sector's end. Every case runs both tools and compares the files with cmp(1)."""
import os
import random
import subprocess

import pytest
from conftest import convert_both, qemu_io, qimg

KiB = 1024
MiB = 1024 * KiB


def _write(path, size, chunks):
    """A file of `size` bytes (a hole where nothing is written) with `chunks` = [(offset, bytes)]."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks:
            f.seek(off)
            f.write(data)
    return path


def _noise(seed, n):
    return random.Random(seed).randbytes(n)


def _text(n):
    out = b"".join(b"line %d of some compressible text\n" % i for i in range(n // 20 + 1))
    return out[:n]


# name -> builder(dir) -> path. Sizes that are not multiples of the cluster (or of a sector) are deliberate.
SOURCES = {
    "random-odd": lambda d: _write(os.path.join(d, "r.raw"), MiB + 777, [(0, _noise(1, MiB + 777))]),
    "random-aligned": lambda d: _write(os.path.join(d, "ra.raw"), MiB, [(0, _noise(2, MiB))]),
    "text-odd": lambda d: _write(os.path.join(d, "t.raw"), MiB + 1234, [(0, _text(MiB + 1234))]),
    "mixed": lambda d: _write(os.path.join(d, "m.raw"), 2 * MiB + 1536, [
        (0, _noise(3, 100000)), (300 * KiB, _text(200 * KiB)), (MiB, b"\0" * (128 * KiB)),
        (MiB + 200 * KiB, _noise(4, 70000)), (2 * MiB + 1000, b"x" * 536)]),
    "zeroes": lambda d: _write(os.path.join(d, "z.raw"), 3 * MiB, [(0, b"\0" * (3 * MiB))]),
    "hole": lambda d: _write(os.path.join(d, "h.raw"), 1000, []),
    "empty": lambda d: _write(os.path.join(d, "e.raw"), 0, []),
}


def cmp_files(a, b):
    r = subprocess.run(["cmp", a, b], capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout, r.stderr, os.path.getsize(a), os.path.getsize(b))


def both_convert(tmp, args, srcs, setup=None):
    """Runs `convert ARGS SRCS OUT` with both tools; equal exit codes, messages and target files."""
    q, qd, idst = convert_both(tmp, args, srcs, setup=setup)
    if q.rc == 0:
        cmp_files(qd, idst)
    return qd, idst


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", [512, 1024, 2048, 4096, 65536])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_compressed_file_matches(tmp, source, cluster, ctype):
    src = SOURCES[source](tmp)
    both_convert(tmp, ["-c", "-O", "qcow2", "-o", f"cluster_size={cluster},compression_type={ctype}"], [src])


@pytest.mark.parametrize("cache", ["none", "writethrough", "directsync", "unsafe"])
@pytest.mark.parametrize("cluster", [512, 4096])
def test_compressed_cache_modes(tmp, cache, cluster):
    src = SOURCES["random-odd"](tmp)
    both_convert(tmp, ["-t", cache, "-c", "-O", "qcow2", "-o", f"cluster_size={cluster}"], [src])


@pytest.mark.parametrize("extra", [["-S", "0"], ["-m", "1"], ["-o", "compat=0.10"]])
def test_compressed_options(tmp, extra):
    src = SOURCES["mixed"](tmp)
    both_convert(tmp, ["-c", "-O", "qcow2", "-o", "cluster_size=1024", *extra], [src])


@pytest.mark.parametrize("source", ["random-odd", "zeroes"])
def test_compressed_existing_target(tmp, source):
    src = SOURCES[source](tmp)

    def fresh(dst):
        qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=1024", dst, "4M")

    both_convert(tmp, ["-n", "-c", "-O", "qcow2"], [src], setup=fresh)


def test_compressed_with_backing(tmp):
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "2M")
    qemu_io("-f", "qcow2", "-c", "write -P 7 0 1M", base)
    src = SOURCES["mixed"](tmp)
    both_convert(tmp, ["-c", "-O", "qcow2", "-o", "cluster_size=512", "-B", base, "-F", "qcow2"], [src])


def test_compressed_from_compressed_qcow2(tmp):
    raw = SOURCES["text-odd"](tmp)
    src = os.path.join(tmp, "src.qcow2")
    qimg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=2048", raw, src)
    other = SOURCES["random-odd"](tmp)
    both_convert(tmp, ["-c", "-O", "qcow2", "-o", "cluster_size=512,compression_type=zstd"], [src, other])
