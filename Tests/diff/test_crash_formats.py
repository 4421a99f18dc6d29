"""Crash consistency of the vmdk (monolithicSparse, twoGbMaxExtentSparse) and vpc (dynamic) writers, as
test_crash.py does for qcow2: a child process writes and zeroes random ranges through the Python binding, flushing
after each, and is SIGKILLed. Killed right after its Nth flush, every acknowledged write must read back (nothing
lost); killed at a random moment inside the loop, the image must still open and read with qemu-img, and qemu-img
check (vmdk) must find no corruption."""
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, qimg, run

SIZE = 8 << 20

CHILD = r"""
import os, random, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bindings", "python"))
import instar
path, fmt, size, seed, stop_after = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
r = random.Random(seed)
img = instar.Image(path, format=fmt, flags=instar.OPEN_READ_WRITE)
print("ready", flush=True)
for i in range(100000):
    if i == stop_after:
        os.kill(os.getpid(), signal.SIGKILL)
    off = r.randrange(size // 512) * 512
    n = min(r.randrange(1, 300) * 512, size - off)
    if r.random() < 0.8:
        img.write(off, bytes([r.randrange(1, 256)]) * n)
    else:
        img.write_zeroes(off, n)
    img.flush()
"""


def model(size, seed, ops):
    """The guest bytes after the child's first `ops` operations (the same random sequence)."""
    r = random.Random(seed)
    data = bytearray(size)
    for _ in range(ops):
        off = r.randrange(size // 512) * 512
        n = min(r.randrange(1, 300) * 512, size - off)
        if r.random() < 0.8:
            data[off:off + n] = bytes([r.randrange(1, 256)]) * n
        else:
            data[off:off + n] = bytes(n)
    return bytes(data)


def child(tmp, path, fmt, seed, stop_after=-1):
    return subprocess.Popen([sys.executable, "-c", CHILD, ROOT, path, fmt, str(SIZE), str(seed), str(stop_after)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp)


def guest_bytes(tmp, path, fmt):
    out = os.path.join(tmp, "read.raw")
    r = run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, out])
    assert r.rc == 0, r
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def check_vmdk(path):
    c = run(["qemu-img", "check", "-U", "-f", "vmdk", path])
    assert c.rc in (0, 3), c
    assert "ERROR" not in c.out and "corruption" not in c.out.lower(), c.out


IMAGES = [("vmdk-sparse", "vmdk", "subformat=monolithicSparse"),
          ("vmdk-2gb-sparse", "vmdk", "subformat=twoGbMaxExtentSparse"),
          ("vpc-dynamic", "vpc", "subformat=dynamic")]


@pytest.mark.parametrize("name,fmt,opts", IMAGES, ids=[x[0] for x in IMAGES])
@pytest.mark.parametrize("ops", [1, 7, 40, 200])
def test_killed_after_flush_loses_nothing(tmp, name, fmt, opts, ops):
    path = os.path.join(tmp, "img." + fmt)
    qimg("create", "-q", "-f", fmt, "-o", opts, path, str(SIZE))
    p = child(tmp, path, fmt, seed=ops, stop_after=ops)
    _, err = p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL, err
    if fmt == "vmdk":
        check_vmdk(path)
    got = guest_bytes(tmp, path, fmt)
    assert got[:SIZE] == model(SIZE, ops, ops), "an acknowledged write was lost"


@pytest.mark.parametrize("name,fmt,opts", IMAGES, ids=[x[0] for x in IMAGES])
@pytest.mark.parametrize("seed", [3, 11])
def test_killed_at_a_random_moment_stays_readable(tmp, name, fmt, opts, seed):
    """The kill lands wherever the child is (inside a write, a table update or a flush): the image opens, reads
    and checks clean; each byte is either what the model had before or after some operation (not verified per
    byte: the in-flight operation may be partly there)."""
    path = os.path.join(tmp, "img." + fmt)
    qimg("create", "-q", "-f", fmt, "-o", opts, path, str(SIZE))
    p = child(tmp, path, fmt, seed=seed)
    assert p.stdout.readline().strip() == b"ready"
    # Kill it after a random while, wherever it is (the outcome must not depend on where).
    try:
        p.wait(timeout=random.Random(seed).uniform(0.05, 0.5))
    except subprocess.TimeoutExpired:
        pass
    p.kill()
    p.communicate(timeout=600)
    if fmt == "vmdk":
        check_vmdk(path)
    assert len(guest_bytes(tmp, path, fmt)) >= SIZE
