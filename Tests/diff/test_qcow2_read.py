"""qcow2 read side: every layout qemu-img can make reads back through the C API byte-identical to
`qemu-img convert -O raw` of the same image."""
import os

import pytest
from conftest import qemu_io, qimg

import instar as pyinstar

SIZE = 4 << 20
CHUNK = 300007  # odd chunk size so reads straddle cluster and subcluster boundaries


def qemu_raw(path, tmp):
    out = os.path.join(tmp, "expected.raw")
    qimg("convert", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def instar_bytes(path):
    with pyinstar.Image(path) as img:
        size = img.size
        parts = []
        off = 0
        while off < size:
            n = min(CHUNK, size - off)
            parts.append(img.read(off, n))
            off += n
    return b"".join(parts)


def assert_reads_same(path, tmp):
    expected = qemu_raw(path, tmp)
    got = instar_bytes(path)
    assert len(got) == len(expected)
    if got != expected:
        first = next(i for i in range(len(got)) if got[i] != expected[i])
        pytest.fail(f"{path}: first differing byte at {first:#x}")


def scribble(path, fmt="qcow2"):
    """Data at odd offsets, zero writes, a discard: the mix that exercises every L2 entry kind."""
    cmds = [
        "write -P 0x11 0 65536",
        "write -P 0x22 70000 12345",
        "write -P 0x33 1048000 200000",
        "write -z 1100000 300000",
        "write -P 0x44 2097152 1048576",
        "discard 2162688 131072",
        "write -z -u 2500000 100000",
        "write -P 0x55 4193000 1304",
    ]
    args = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    qemu_io(*args, path)


LAYOUTS = [
    "compat=0.10",
    "compat=1.1",
    "cluster_size=512",
    "cluster_size=4096",
    "cluster_size=65536",
    "cluster_size=2M",
    "extended_l2=on,cluster_size=64k",
    "extended_l2=on,cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=8",
    "refcount_bits=64",
    "lazy_refcounts=on",
    "preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full",
    "compression_type=zstd",
]


@pytest.mark.parametrize("opts", LAYOUTS)
def test_layouts(tmp, opts):
    p = os.path.join(tmp, "a.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", opts, p, str(SIZE))
    assert_reads_same(p, tmp)
    scribble(p)
    assert_reads_same(p, tmp)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed(tmp, ctype):
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", src, str(SIZE))
    scribble(src)
    # Compressible and incompressible data both (qemu stores the latter uncompressed).
    qemu_io("-f", "qcow2", "-c", "write -P 0x00 3145728 65536", "-c", "write -P 0x66 3211264 65536", src)
    with open(os.path.join(tmp, "noise"), "wb") as f:
        f.write(os.urandom(100000))
    p = os.path.join(tmp, "c.qcow2")
    qimg("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, p)
    assert_reads_same(p, tmp)
    # Rewrite clusters inside compressed ones afterwards.
    qemu_io("-f", "qcow2", "-c", "write -P 0x77 70100 1000", "-c", "write -z 2100000 5000", p)
    assert_reads_same(p, tmp)


def test_backing_chain(tmp):
    base = os.path.join(tmp, "base.raw")
    with open(base, "wb") as f:
        f.write(os.urandom(2 << 20))
    mid = os.path.join(tmp, "mid.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    qemu_io("-f", "qcow2", "-c", "write -P 0x21 100000 300000", "-c", "write -z 1000000 70000", mid)
    qimg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "-b", "mid.qcow2", "-F", "qcow2",
         top, str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x31 5000 3000", "-c", "write -z 200000 10000",
            "-c", "write -P 0x32 3000000 4096", "-c", "discard 0 65536", top)
    assert_reads_same(top, tmp)
    assert_reads_same(mid, tmp)


def test_internal_snapshots(tmp):
    p = os.path.join(tmp, "s.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, str(SIZE))
    scribble(p)
    qimg("snapshot", "-c", "snap1", p)
    qemu_io("-f", "qcow2", "-c", "write -P 0x99 0 100000", p)
    qimg("snapshot", "-c", "snap2", p)
    assert_reads_same(p, tmp)


def test_bitmaps(tmp):
    p = os.path.join(tmp, "b.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, str(SIZE))
    qimg("bitmap", "--add", p, "bm0")
    qimg("bitmap", "--add", "-g", "128k", p, "bm1")
    scribble(p)
    assert_reads_same(p, tmp)


@pytest.mark.parametrize("raw", ["off", "on"])
def test_data_file(tmp, raw):
    p = os.path.join(tmp, "d.qcow2")
    data = os.path.join(tmp, "d.data")
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw={raw}", p, str(SIZE))
    scribble(p)
    assert_reads_same(p, tmp)


def test_data_file_relative_name(tmp):
    """qemu opens a relative data file name relative to the working directory, not the image."""
    sub = os.path.join(tmp, "sub")
    os.mkdir(sub)
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=rel.data", "sub/r.qcow2", str(SIZE), cwd=tmp)
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 70000", "sub/r.qcow2", cwd=tmp)
    here = os.getcwd()
    try:
        os.chdir(tmp)
        with pyinstar.Image("sub/r.qcow2") as img:
            assert img.read(0, 70001) == b"\x5a" * 70000 + b"\0"
        os.chdir(sub)
        with pytest.raises(pyinstar.InstarError) as e:
            pyinstar.Image("r.qcow2")
        assert e.value.message == "Could not open 'r.qcow2': Could not open 'rel.data': No such file or directory"
    finally:
        os.chdir(here)


def test_luks_refuses_reads(tmp):
    p = os.path.join(tmp, "l.qcow2")
    qimg("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456", "-o",
         "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", p, "1M")
    # Like qemu, opening for I/O without the secret fails (the C API has no way to pass one yet).
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.Image(p)
    assert e.value.code == -10


def test_bad_headers(tmp):
    """Headers qemu refuses are refused with qemu's message."""
    import struct
    import subprocess
    p = os.path.join(tmp, "h.qcow2")
    cases = [
        (4, struct.pack(">I", 4), "Unsupported qcow2 version 4"),
        (20, struct.pack(">I", 22), "Unsupported cluster size: 2^22"),
        (96, struct.pack(">I", 7), "Reference count entry width too large; may not exceed 64 bits"),
        (100, struct.pack(">I", 90), "qcow2 header too short"),
        (8, struct.pack(">Q", 1 << 20), "Invalid backing file offset"),
        (36, struct.pack(">I", 0x7fffffff), "Active L1 table too large"),
        (72, struct.pack(">Q", 1 << 40), "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"),
    ]
    for off, patch, msg in cases:
        if os.path.exists(p):
            os.unlink(p)
        qimg("create", "-q", "-f", "qcow2", p, "1M")
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(patch)
        q = subprocess.run(["qemu-img", "info", p], capture_output=True, text=True)
        assert msg in q.stderr, q.stderr
        with pytest.raises(pyinstar.InstarError) as e:
            pyinstar.Image(p)
        assert e.value.message == f"Could not open '{p}': {msg}"
