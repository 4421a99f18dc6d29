"""Differential-test harness: run the real qemu-img and instar on the same input and compare.

Images are made at test time with qemu-img/qemu-io. `INSTAR_BUILD` points at the build/ folder that holds
bin/instar and lib/libinstar.so (the Makefile sets it).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("INSTAR_BUILD", os.path.join(ROOT, "build"))
INSTAR = os.path.join(BUILD, "bin", "instar")
LIBINSTAR = os.path.join(BUILD, "lib", "libinstar.so")
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
os.environ.setdefault("INSTAR_LIBRARY", LIBINSTAR)


class Result:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self):
        return f"Result(rc={self.rc}, out={self.out!r}, err={self.err!r})"

    def __eq__(self, other):
        return (self.rc, self.out, self.err) == (other.rc, other.out, other.err)


# qemu's PBKDF2 benchmark (LUKS creation, and measure of a LUKS target) reads thread CPU time in milliseconds and
# fails with this message when a run reads as 0 ms, which a tick-based clock does now and then on a busy machine.
# Every run of a qemu tool goes through run(), which retries that failure until QEMU_RETRY_SECONDS have passed:
# a deadline, not a count, so a loaded machine only makes the wait longer.
QEMU_CPU_RACE = "Unable to get accurate CPU usage"
QEMU_RETRY_SECONDS = 900


def _qemu_lost_cpu_race(argv, returncode, stderr):
    if returncode == 0 or not argv or os.path.basename(str(argv[0])) not in ("qemu-img", "qemu-io", "qemu-nbd"):
        return False
    err = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    return QEMU_CPU_RACE in err


def run(argv, cwd=None, timeout=600, text=True, env=None, input=None):
    deadline = time.monotonic() + QEMU_RETRY_SECONDS
    while True:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout, text=text, env=env, input=input)
        if not _qemu_lost_cpu_race(argv, p.returncode, p.stderr) or time.monotonic() > deadline:
            return Result(p.returncode, p.stdout, p.stderr)


def qemu(*args, cwd=None, **kw):
    """Runs the real qemu-img; output is normalised so its program name reads 'instar'."""
    r = run(["qemu-img", *args], cwd=cwd, **kw)
    return Result(r.rc, normalize(r.out), normalize(r.err))


def instar(*args, cwd=None, **kw):
    return run([INSTAR, *args], cwd=cwd, **kw)


def qemu_io(*args, cwd=None):
    r = run(["qemu-io", *args], cwd=cwd)
    assert r.rc == 0, r
    return r


def normalize(s):
    if isinstance(s, bytes):
        return s.replace(b"qemu-img", b"instar")
    return s.replace("qemu-img", "instar")


def both(*args, cwd=None, **kw):
    """Runs qemu-img and instar with the same arguments and returns both results."""
    return qemu(*args, cwd=cwd, **kw), instar(*args, cwd=cwd, **kw)


def assert_same(*args, cwd=None, **kw):
    q, i = both(*args, cwd=cwd, **kw)
    assert i == q, f"instar {' '.join(args)}\n qemu: {q}\n instar: {i}"
    return q


def qimg(*args, cwd=None):
    """Runs qemu-img to set something up; it must succeed (run() already waits out qemu's LUKS CPU-clock race)."""
    r = run(["qemu-img", *args], cwd=cwd)
    assert r.rc == 0, r
    return r


def info_json(path, *extra, keep=()):
    """`qemu-img info --output=json` of `path` as a dict, without "filename" and "actual-size" (unless in `keep`)."""
    r = qemu("info", "--output=json", *extra, path)
    assert r.rc == 0, r
    d = json.loads(r.out)
    for k in ("filename", "actual-size"):
        if k not in keep:
            d.pop(k, None)
    return d


def check_clean(path):
    """`qemu-img check` finds neither leaks nor corruptions."""
    r = qemu("check", "--output=json", path)
    assert r.rc == 0, r
    d = json.loads(r.out)
    assert d.get("leaks", 0) == 0 and d.get("corruptions", 0) == 0, d


def convert_both(tmp, args, srcs, fmt="qcow2", setup=None):
    """Runs `convert ARGS SRCS OUT` with qemu-img (into out_q.FMT) and instar (into out_i.FMT) in `tmp`, each
    after `setup(OUT)` if given; exit codes and messages must match. Returns (qemu's result, its target, ours)."""
    outs = {}
    for tool in ("q", "i"):
        dst = os.path.join(tmp, f"out_{tool}.{fmt}")
        if os.path.exists(dst):
            os.unlink(dst)
        if setup:
            setup(dst)
        argv = ["convert", *args, *srcs, dst]
        outs[tool] = (qemu(*argv, cwd=tmp) if tool == "q" else run([INSTAR, *argv], cwd=tmp), dst)
    (q, qd), (i, idst) = outs["q"], outs["i"]
    assert (i.rc, i.out, i.err.replace(idst, qd)) == (q.rc, q.out, q.err), (q, i)
    return q, qd, idst


@pytest.fixture
def tmp(tmp_path):
    return str(tmp_path)


class QemuNbd:
    """A qemu-nbd serving `path` on a unix socket, started with --fork: qemu-nbd's parent exits only once the
    image is open (locks taken) and the socket listens, so no polling and no sleep is needed. stop() ends the
    server and waits, on a deadline, until its image locks are gone."""

    def __init__(self, path, fmt, cwd=None, extra=()):
        d = cwd or os.path.dirname(os.path.abspath(path))
        n = 0
        while os.path.exists(os.path.join(d, f"nbd{n}.sock")):
            n += 1
        self.sock = os.path.join(d, f"nbd{n}.sock")
        pidfile = os.path.join(d, f"nbd{n}.pid")
        r = run(["qemu-nbd", "--fork", "--pid-file", pidfile, "-k", self.sock, "-f", fmt, *extra, path], cwd=cwd)
        assert r.rc == 0, r
        with open(pidfile) as f:
            self.pid = int(f.read().strip())

    def stop(self, deadline_seconds=120):
        try:
            os.kill(self.pid, 15)
        except ProcessLookupError:
            return
        end = time.monotonic() + deadline_seconds
        while time.monotonic() < end:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return  # exited (a zombie holds no file and no lock)
            except (FileNotFoundError, ProcessLookupError, IndexError):
                return
            time.sleep(0.01)
        raise AssertionError(f"qemu-nbd {self.pid} did not stop within {deadline_seconds}s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# Disk: the suite makes many large (often preallocated) images; kept for every test they add up to tens of GiB,
# more than a CI machine may have free. A test that passed has its tmp_path removed at teardown; a failed one
# keeps it for inspection (pytest still keeps only its last three runs).
@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(autouse=True)
def _drop_tmp_path_of_passed_test(request):
    if "tmp_path" not in request.fixturenames:
        yield
        return
    path = str(request.getfixturevalue("tmp_path"))
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        shutil.rmtree(path, ignore_errors=True)


# A watchdog for hangs. Every run of a tool goes through run(), which has a timeout, but a test that calls
# libinstar in this process (the bindings, the C API) or waits on a server of its own has no such bound, and a
# deadlock there would hold the whole suite until CI's own limit. A test (setup, call and teardown) that runs
# past TEST_DEADLINE seconds gets its Python stacks, and the native stacks of this process and its children (gdb),
# written to stderr; then this worker ends, so xdist reports that test as failed and goes on with the rest.
TEST_DEADLINE = float(os.environ.get("INSTAR_TEST_DEADLINE", "1200"))
_watch = {"item": None, "since": None}


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _dump_hang(nodeid, seconds, out):
    import faulthandler

    def say(text):
        out.write(text)
        out.flush()

    say(f"\n=== watchdog: {nodeid} still running after {seconds:.0f} s; stacks follow ===\n")
    faulthandler.dump_traceback(file=out, all_threads=True)
    pids, todo = [], [os.getpid()]
    while todo and len(pids) < 16:
        pid = todo.pop(0)
        pids.append(pid)
        todo.extend(_children(pid))
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        say(f"--- native stacks of {pid}: {cmd[:300]}\n")
        if shutil.which("gdb"):
            try:
                r = subprocess.run(["gdb", "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt 30"],
                                   capture_output=True, text=True, timeout=120)
                say("\n".join(l for l in r.stdout.splitlines() if l.startswith(("#", "Thread"))) + "\n")
            except (OSError, subprocess.TimeoutExpired) as e:
                say(f"gdb failed: {e}\n")
    for pid in pids[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    say("=== watchdog: ending this worker and its children ===\n")


# xdist gives a crashed worker's file, the hung test included, to a new worker: the tests that hung are listed
# in this file (one per test run), and run again they fail at once, with the stacks as their message (the worker's
# own stderr is captured by pytest and lost with it), instead of hanging a second time.
_HUNG = os.path.join("/tmp", f"instar-hung-tests-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}")


def _watchdog():
    while True:
        time.sleep(5)
        item, since = _watch["item"], _watch["since"]
        if item is not None and since is not None and time.monotonic() - since > TEST_DEADLINE:
            try:
                stacks = f"{_HUNG}-{os.getpid()}.txt"
                with open(_HUNG, "a") as f:
                    f.write(f"{item}\t{stacks}\n")
                with open(stacks, "w") as out:
                    _dump_hang(item, time.monotonic() - since, out)
            finally:
                os._exit(3)


def pytest_runtest_setup(item):
    try:
        with open(_HUNG) as f:
            hung = dict(line.split("\t", 1) for line in f.read().splitlines())
    except OSError:
        return
    if item.nodeid in hung:
        try:
            with open(hung[item.nodeid]) as f:
                stacks = f.read()[-60000:]
        except OSError as e:
            stacks = f"(no stacks: {e})"
        pytest.fail(f"this test ran past {TEST_DEADLINE:.0f} s and its worker was ended:\n{stacks}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _watch.get("thread") is None:
        import threading
        _watch["thread"] = threading.Thread(target=_watchdog, name="instar-test-watchdog", daemon=True)
        _watch["thread"].start()
    _watch["item"], _watch["since"] = item.nodeid, time.monotonic()
    try:
        yield
    finally:
        _watch["item"], _watch["since"] = None, None
