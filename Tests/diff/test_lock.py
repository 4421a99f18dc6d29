"""Image locking interoperates with QEMU: a qemu-nbd writer blocks instar readers exactly as it blocks qemu-img
(same message and exit code), -U reads anyway, and an instar reader blocks a qemu writer."""
import os
import subprocess
import time

import pytest
from conftest import QemuNbd, assert_same, qemu, qemu_io, qimg, run
from imgs import sparse_raw

import instar as pyinstar


@pytest.fixture
def nbd_writer(tmp):
    servers = []

    def start(path, fmt):
        servers.append(QemuNbd(path, fmt, cwd=tmp))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


def test_qcow2_held_by_qemu_nbd(tmp, nbd_writer):
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "l.qcow2"), "1M")
    nbd_writer(os.path.join(tmp, "l.qcow2"), "qcow2")
    for args in (["map", "l.qcow2"], ["map", "--output=json", "l.qcow2"], ["convert", "l.qcow2", "o.raw"],
                 ["convert", "-f", "raw", "l.qcow2", "o.raw"], ["compare", "l.qcow2", "l.qcow2"]):
        q = assert_same(*args, cwd=tmp)
        assert q.rc != 0 and "Failed to get shared \"write\" lock" in q.err
    # -U reads it anyway (as raw here, which needs no qcow2 driver).
    assert_same("map", "-U", "-f", "raw", "--output=json", "l.qcow2", cwd=tmp)
    assert_same("convert", "-U", "-f", "raw", "l.qcow2", "o.raw", cwd=tmp)
    assert_same("map", "-U", "--output=json", "l.qcow2", cwd=tmp)


def test_info_of_qcow2_held_by_qemu_nbd(tmp, nbd_writer):
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "l.qcow2"), "1M")
    nbd_writer(os.path.join(tmp, "l.qcow2"), "qcow2")
    assert_same("info", "l.qcow2", cwd=tmp)
    assert_same("info", "-U", "l.qcow2", cwd=tmp)


def test_raw_held_by_qemu_nbd(tmp, nbd_writer):
    sparse_raw(tmp)
    nbd_writer(os.path.join(tmp, "s.raw"), "raw")
    # qemu's raw passes a plain reader's sharing through: map and compare work, convert refuses.
    for args in (["map", "--output=json", "s.raw"], ["compare", "s.raw", "s.raw"], ["convert", "s.raw", "o.raw"],
                 ["convert", "-U", "s.raw", "o.raw"], ["map", "-f", "raw", "s.raw"]):
        assert_same(*args, cwd=tmp)


def test_instar_reader_blocks_qemu_writer(tmp):
    p = sparse_raw(tmp)
    q = os.path.join(tmp, "l.qcow2")
    qimg("create", "-q", "-f", "qcow2", q, "1M")
    with pyinstar.Image(p, format="raw", flags=0):
        # A raw reader shares writing, as qemu's does.
        r = run(["qemu-io", "-f", "raw", "-c", "write 0 512", p])
        assert r.rc == 0, r
    with pyinstar.Image(q, format="raw"):
        r = run(["qemu-io", "-f", "raw", "-c", "write 0 512", q])
        assert r.rc == 0
    # Opening for writing takes the write lock: qemu-io can neither write nor read without -U.
    with pyinstar.Image(p, flags=pyinstar.OPEN_READ_WRITE):
        r = run(["qemu-io", "-f", "raw", "-c", "write 0 512", p])
        assert r.rc != 0 and "Failed to get \"write\" lock" in r.err, r
        # qemu-img's plain raw reader shares writing, so it still maps the file.
        assert qemu("map", p).rc == 0
    r = run(["qemu-io", "-f", "raw", "-c", "write 0 512", p])
    assert r.rc == 0, r


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_and_convert_refuse_an_image_in_use(tmp, nbd_writer, fmt):
    """create and convert make their target through qemu's file create, which locks before it empties the file:
    an image a qemu-nbd serves is refused with qemu-img's message and stays as it was."""
    busy = os.path.join(tmp, "busy." + fmt)
    qimg("create", "-q", "-f", fmt, busy, "1M")
    qemu_io("-f", fmt, "-c", "write -P 0x5a 0 64k", busy)
    with open(busy, "rb") as f:
        before = f.read()
    src = os.path.join(tmp, "src.raw")
    qimg("create", "-q", "-f", "raw", src, "1M")
    nbd_writer(busy, fmt)
    for out_fmt in ("raw", "qcow2"):
        q = assert_same("create", "-f", out_fmt, busy, "2M", cwd=tmp)
        assert q.rc == 1 and "Is another process using the image" in q.err
        q = assert_same("convert", "-O", out_fmt, src, busy, cwd=tmp)
        assert q.rc == 1 and "Is another process using the image" in q.err
        with pytest.raises(pyinstar.Locked):
            pyinstar.create(busy, out_fmt, 1 << 20)
        with pytest.raises(pyinstar.Locked):
            pyinstar.convert(src, busy, fmt=out_fmt)
    with open(busy, "rb") as f:
        assert f.read() == before
