"""Crash consistency of qcow2 writing: a child process writes, zeroes and discards random clusters through the
Python binding and is SIGKILLed part way (after N operations, or after a delay that lands inside one).
qemu-img check must then find no corruption: leaked clusters are allowed (exit 0 or 3), errors are not.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, qimg, run

CHILD = r"""
import os, random, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bindings", "python"))
import instar
path, size, cluster, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
stop_after = int(os.environ.get("INSTAR_CRASH_AFTER", "-1"))
r = random.Random(seed)
img = instar.Image(path, flags=instar.OPEN_READ_WRITE)
print("ready", flush=True)
for i in range(100000):
    if i == stop_after:
        os.kill(os.getpid(), signal.SIGKILL)
    k = r.random()
    c = r.randrange(size // cluster)
    n = r.randrange(1, 4) * cluster
    off = min(c * cluster + r.randrange(cluster), size - 1)
    n = min(n, size - off)
    if k < 0.7:
        img.write(off, bytes([r.randrange(1, 256)]) * n)
    elif k < 0.85:
        img.write_zeroes(off, n, may_unmap=r.random() < 0.5)
    else:
        img.discard(off, n)
    if i % 97 == 96:
        img.flush()
"""

LAYOUTS = [
    ("512-refbits64", "cluster_size=512,refcount_bits=64", 4 << 20, 512),
    ("64k", "", 32 << 20, 65536),
    ("ext-l2", "extended_l2=on,cluster_size=32k", 16 << 20, 32768),
]


def check_clean(path):
    c = run(["qemu-img", "check", path])
    assert c.rc in (0, 3), c
    assert "ERROR" not in c.out and "corruption" not in c.out.lower(), c.out


def child(tmp, path, size, cluster, seed, env=None):
    return subprocess.Popen([sys.executable, "-c", CHILD, ROOT, path, str(size), str(cluster), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_kill_after_n_operations(tmp, layout):
    name, opts, size, cluster = layout
    for n in (1, 5, 20, 60, 150, 400):
        path = os.path.join(tmp, f"n{n}.qcow2")
        qimg("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, str(size))
        env = dict(os.environ, INSTAR_CRASH_AFTER=str(n))
        p = child(tmp, path, size, cluster, n, env)
        p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, p.returncode
        check_clean(path)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_kill_at_random_moments(tmp, layout):
    name, opts, size, cluster = layout
    for i, delay in enumerate([0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6]):
        path = os.path.join(tmp, f"t{i}.qcow2")
        qimg("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, str(size))
        p = child(tmp, path, size, cluster, 1000 + i)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        check_clean(path)
