"""Threads and cancellation of instar.convert beyond what test_python_package.py covers: what a cancelled
conversion leaves behind, cancelling one of two conversions running at once, a token cancelled mid-run with no
progress callable, and a progress callable that raises. Every wait across threads is on a deadline."""
import os
import threading
import time

import pytest

import instar
from conftest import qemu, qemu_io, qimg

DEADLINE = 300  # seconds any wait on another thread may take on a loaded machine


@pytest.fixture
def big_raw(tmp):
    """A 64 MiB raw image with data spread over it, so a conversion reports progress many times."""
    p = os.path.join(tmp, "big.raw")
    qimg("create", "-f", "raw", p, "64M")
    qemu_io("-f", "raw", *[a for k in range(0, 64, 4) for a in ("-c", "write -P %d %dM 1M" % (k + 1, k))], p)
    return p


def _held_conversion(src, dst, token, **kw):
    """Starts instar.convert(src, dst) on a thread whose first progress report waits until `token` is cancelled.
    Returns (thread, started event, outcome list)."""
    started, outcome = threading.Event(), []

    def progress(_percent):
        if not started.is_set():
            started.set()
            token.wait(DEADLINE)
        return False

    def work():
        try:
            instar.convert(src, dst, progress=progress, cancel=token, **kw)
            outcome.append(None)
        except Exception as e:  # checked by the caller
            outcome.append(e)

    t = threading.Thread(target=work)
    t.start()
    return t, started, outcome


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_cancelled_conversion_removes_the_target_it_created(big_raw, tmp, fmt):
    dst = os.path.join(tmp, "o." + fmt)
    token = instar.Cancel()
    t, started, outcome = _held_conversion(big_raw, dst, token, fmt=fmt)
    assert started.wait(DEADLINE)
    token.cancel()
    t.join(DEADLINE)
    assert not t.is_alive() and len(outcome) == 1 and isinstance(outcome[0], instar.Cancelled), outcome
    assert not os.path.exists(dst)
    # the source is untouched and a later conversion to the same name works
    instar.convert(big_raw, dst, fmt=fmt)
    assert qemu("compare", big_raw, dst).rc == 0


def test_cancelled_conversion_keeps_an_existing_target(big_raw, tmp):
    """With no_create the target was there before: a cancelled conversion leaves it (partly written) in place,
    still an image qemu-img check finds clean."""
    dst = os.path.join(tmp, "o.qcow2")
    qimg("create", "-f", "qcow2", dst, "64M")
    token = instar.Cancel()
    t, started, outcome = _held_conversion(big_raw, dst, token, fmt="qcow2", no_create=True)
    assert started.wait(DEADLINE)
    token.cancel()
    t.join(DEADLINE)
    assert not t.is_alive() and isinstance(outcome[0], instar.Cancelled), outcome
    assert os.path.exists(dst)
    r = qemu("check", dst)
    assert r.rc == 0, r


def test_cancelling_one_conversion_leaves_the_other_running(big_raw, tmp):
    """Two conversions with their own tokens, both held inside the library at their first progress report:
    cancelling the first stops only the first; the second then finishes with qemu-img's result."""
    tokens = [instar.Cancel(), instar.Cancel()]
    release_second = threading.Event()
    a = _held_conversion(big_raw, os.path.join(tmp, "a.qcow2"), tokens[0], fmt="qcow2")
    started_b, outcome_b = threading.Event(), []

    def progress_b(_percent):
        if not started_b.is_set():
            started_b.set()
            release_second.wait(DEADLINE)
        return False

    def work_b():
        try:
            instar.convert(big_raw, os.path.join(tmp, "b.qcow2"), fmt="qcow2", progress=progress_b,
                           cancel=tokens[1])
            outcome_b.append(None)
        except Exception as e:  # checked below
            outcome_b.append(e)

    tb = threading.Thread(target=work_b)
    tb.start()
    ta, started_a, outcome_a = a
    assert started_a.wait(DEADLINE) and started_b.wait(DEADLINE)
    tokens[0].cancel()
    ta.join(DEADLINE)
    assert not ta.is_alive() and isinstance(outcome_a[0], instar.Cancelled), outcome_a
    assert tb.is_alive() and not tokens[1].cancelled  # still held inside its conversion
    release_second.set()
    tb.join(DEADLINE)
    assert not tb.is_alive() and outcome_b == [None], outcome_b
    assert qemu("compare", big_raw, os.path.join(tmp, "b.qcow2")).rc == 0
    assert not os.path.exists(os.path.join(tmp, "a.qcow2"))


def test_token_cancelled_mid_run_without_progress_callable(big_raw, tmp):
    """A rate-limited conversion (16 MiB of data at 256 KiB/s takes a minute) with only a token: cancelled from
    this thread once the target exists, it stops with Cancelled long before it could have finished."""
    dst = os.path.join(tmp, "o.qcow2")
    token, outcome, done = instar.Cancel(), [], threading.Event()

    def work():
        try:
            instar.convert(big_raw, dst, fmt="qcow2", rate_limit=256 << 10, cancel=token)
            outcome.append(None)
        except Exception as e:  # checked below
            outcome.append(e)
        finally:
            done.set()

    start = time.monotonic()
    t = threading.Thread(target=work)
    t.start()
    deadline = start + DEADLINE
    while not os.path.exists(dst) and not done.is_set() and time.monotonic() < deadline:
        done.wait(0.01)
    assert os.path.exists(dst) or done.is_set()
    token.cancel()
    t.join(DEADLINE)
    assert not t.is_alive() and len(outcome) == 1 and isinstance(outcome[0], instar.Cancelled), outcome
    assert not os.path.exists(dst)


def test_progress_callable_that_raises_cancels(big_raw, tmp):
    """An exception in the progress callable cannot unwind through the library: the conversion stops with
    Cancelled at that report, and the process goes on."""
    calls = []

    def progress(percent):
        calls.append(percent)
        if len(calls) == 3:
            raise RuntimeError("stop here")
        return False

    dst = os.path.join(tmp, "o.qcow2")
    with pytest.raises(instar.Cancelled):
        instar.convert(big_raw, dst, fmt="qcow2", progress=progress)
    assert len(calls) == 3 and not os.path.exists(dst)


def test_convert_runs_on_many_threads_at_once(big_raw, tmp):
    """Four threads convert the same source at once, each to its own target and format; each result is what
    qemu-img makes of the source."""
    errors = []
    barrier = threading.Barrier(4, timeout=DEADLINE)

    def work(i):
        try:
            barrier.wait()
            instar.convert(big_raw, os.path.join(tmp, "t%d" % i), fmt="qcow2" if i % 2 else "raw",
                           compress=(i == 3))
        except Exception as e:  # checked below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    for i in range(4):
        assert qemu("compare", big_raw, os.path.join(tmp, "t%d" % i)).rc == 0
