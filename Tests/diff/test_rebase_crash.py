"""Crash consistency of a safe rebase: the process is SIGKILLed part way through copying the differences (from
its own progress callback at a chosen percentage, and from the parent after the k-th progress record of
`instar rebase -p`, which lands anywhere in the write that follows). Afterwards `qemu-img check` finds no
corruption (leaks allowed) and the image reads exactly what it read before, through whichever backing file its
header names."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import INSTAR, ROOT, qemu_io, qimg, run
from imgs import make_ops, qemu_io_script

MiB = 1 << 20

CHILD = r"""
import os, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bindings", "python"))
import instar
path, backing, stop = sys.argv[2], sys.argv[3], float(sys.argv[4])
def cb(percent):
    if percent >= stop:
        os.kill(os.getpid(), signal.SIGKILL)
instar.rebase(path, backing_file=backing, backing_format="qcow2", progress=cb)
print("finished", flush=True)
"""

LAYOUTS = [
    ("64k", "", 65536),
    ("512-refbits64", "cluster_size=512,refcount_bits=64", 512),
    ("ext-l2", "extended_l2=on,cluster_size=32k", 32768),
    ("lazy", "lazy_refcounts=on", 65536),
]
SIZE = 24 * MiB


def make_chain(d, opts, cluster):
    qimg("create", "-q", "-f", "qcow2", "base.qcow2", str(SIZE), cwd=d)
    qemu_io("-f", "qcow2", "-c", f"write -P 1 0 {SIZE - 4 * MiB}", "base.qcow2", cwd=d)
    qimg("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), "-b", "base.qcow2", "-F", "qcow2",
         "top.qcow2", str(SIZE), cwd=d)
    r = run(["qemu-io", "-f", "qcow2", "top.qcow2"], cwd=d, input=qemu_io_script(make_ops(3, SIZE, cluster, count=40)))
    assert r.rc == 0, r
    qimg("create", "-q", "-f", "qcow2", "new.qcow2", str(SIZE), cwd=d)
    r = run(["qemu-io", "-f", "qcow2", "new.qcow2"], cwd=d, input=qemu_io_script(make_ops(4, SIZE, 65536, count=40)))
    assert r.rc == 0, r
    shutil.copyfile(os.path.join(d, "top.qcow2"), os.path.join(d, "orig.qcow2"))


def assert_intact(d):
    c = run(["qemu-img", "check", "top.qcow2"], cwd=d)
    assert c.rc in (0, 3), c
    assert "ERROR" not in c.out and "corruption" not in c.out.lower(), c.out
    r = run(["qemu-img", "compare", "orig.qcow2", "top.qcow2"], cwd=d)
    assert r.rc == 0, r


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_kill_from_progress_callback(tmp, layout):
    name, opts, cluster = layout
    for stop in (3, 20, 55, 90, 99.9):
        d = os.path.join(tmp, f"s{stop}")
        os.makedirs(d)
        make_chain(d, opts, cluster)
        p = subprocess.run([sys.executable, "-c", CHILD, ROOT, "top.qcow2", "new.qcow2", str(stop)], cwd=d,
                           capture_output=True, timeout=600)
        assert p.returncode == -signal.SIGKILL, p
        assert_intact(d)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_kill_after_progress_records(tmp, layout):
    name, opts, cluster = layout
    for k in (2, 6, 15, 30):
        d = os.path.join(tmp, f"k{k}")
        os.makedirs(d)
        make_chain(d, opts, cluster)
        p = subprocess.Popen([INSTAR, "rebase", "-p", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"], cwd=d,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = 0
        while seen < k:
            c = p.stdout.read(1)
            if not c:
                break
            if c == b"\r":
                seen += 1
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=600)
        assert p.returncode in (-signal.SIGKILL, 0), p.returncode
        assert_intact(d)
