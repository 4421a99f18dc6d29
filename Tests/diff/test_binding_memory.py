"""The Python binding does not leak: 100,000 `instar.info` calls (and 20,000 `instar.compat.vdsm.info` calls,
the drop-in's leaner path, and 20,000 failing calls) leave the process's resident memory flat. RSS is read from
/proc/self/statm after a warm-up (allocator pools, ctypes type caches and the library's first-use state are filled by then) and again at
the end; a leak of a few bytes per call would show as megabytes over 100,000 calls, which the bound rules out.
"""
import os

import pytest

from conftest import qemu_io, qimg

import instar
from instar.compat import vdsm

CALLS = 100_000
WARMUP = 5_000
BOUND = 4 << 20  # bytes of growth allowed: allocator noise, far below 100,000 x any per-call leak worth finding
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def chain(tmp):
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "64M")
    qimg("bitmap", "--add", base, "b0")
    qimg("snapshot", "-c", "s1", base)
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", top)
    return base, top


def flat(fn, calls=CALLS):
    for _ in range(WARMUP):
        fn()
    before = rss()
    for _ in range(calls):
        fn()
    grown = rss() - before
    assert grown < BOUND, "RSS grew by %d bytes over %d calls" % (grown, calls)


@pytest.mark.parametrize("kind", ["instar.info", "compat.vdsm.info"])
def test_info_calls_leave_rss_flat(tmp, kind):
    base, top = chain(tmp)
    # the base has a snapshot and a bitmap, so every struct array of instar_info_t is filled and freed
    if kind == "instar.info":
        def call():
            instar.info(base)
            instar.info(top, backing_chain=True)
        flat(call, CALLS // 2)
    else:  # the same path below the drop-in; 20,000 calls keep the file within a minute on a loaded machine
        def call():
            vdsm.info(base)
            vdsm.info(top, backing_chain=True)
        flat(call, CALLS // 10)


def test_failing_info_calls_leave_rss_flat(tmp):
    missing = os.path.join(tmp, "missing.qcow2")

    def call():
        try:
            instar.info(missing)
        except instar.NotFound:
            pass
    flat(call, CALLS // 5)  # 20,000
