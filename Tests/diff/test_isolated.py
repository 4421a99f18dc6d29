"""Isolated mode (INSTAR_OPEN_ISOLATED, `--isolated`, `isolated=True`; docs/isolated.md): info, check and map
parsed in the confined helper `instar-isolate` give what the in-process call and qemu-img give, on normal and
hostile images; a helper that crashes, hangs or makes a forbidden system call is an error of the call and the
calling process (this pytest process, through ctypes) lives on."""
import os
import time

import pytest

from conftest import INSTAR, BUILD, instar, qemu, qemu_io, qimg, run
import hostile_images as H

import instar as lib

HELPER = os.path.join(BUILD, "libexec", "instar-isolate")


def _with_env(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def _iso(cmd, *args):
    """`instar CMD --isolated ARGS`."""
    return instar(cmd, "--isolated", *args)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A few normal images: a qcow2 with a backing file and data in both layers, a vmdk with two extents, a vpc,
    a qcow2 with leaked clusters (its check exits 3) and a LUKS image."""
    d = str(tmp_path_factory.mktemp("iso"))
    qimg("create", "-f", "qcow2", "base.qcow2", "64M", cwd=d)
    qemu_io("-c", "write -P 1 0 1M", "-c", "write -P 2 8M 64k", "base.qcow2", cwd=d)
    qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    qemu_io("-c", "write -P 3 512k 1M", "-c", "write -z 30M 1M", "top.qcow2", cwd=d)
    qimg("snapshot", "-c", "snap1", "top.qcow2", cwd=d)
    qimg("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "split.vmdk", "3G", cwd=d)
    qemu_io("-f", "vmdk", "-c", "write -P 4 2047M 2M", "split.vmdk", cwd=d)
    qimg("create", "-f", "vpc", "disk.vhd", "32M", cwd=d)
    qemu_io("-f", "vpc", "-c", "write -P 5 1M 1M", "disk.vhd", cwd=d)
    # A leak: one more cluster at the end of the file, its refcount raised to 1 by hand.
    qimg("create", "-f", "qcow2", "leak.qcow2", "16M", cwd=d)
    qemu_io("-c", "write -P 6 0 64k", "leak.qcow2", cwd=d)
    with open(os.path.join(d, "leak.qcow2"), "r+b") as f:
        hdr = f.read(104)
        rt_off = int.from_bytes(hdr[48:56], "big")
        f.seek(rt_off)
        rb_off = int.from_bytes(f.read(8), "big")
        size = os.fstat(f.fileno()).st_size
        f.truncate(size + 65536)
        f.seek(rb_off + 2 * (size // 65536))
        f.write((1).to_bytes(2, "big"))
    qimg("create", "-f", "luks", "--object", "secret,id=s,data=pw", "-o", "key-secret=s,iter-time=10",
         "enc.luks", "16M", cwd=d)
    return d


NORMAL = [("top.qcow2", ()), ("top.qcow2", ("--backing-chain",)), ("split.vmdk", ()), ("disk.vhd", ()),
          ("leak.qcow2", ()), ("enc.luks", ())]


@pytest.mark.parametrize("name,extra", NORMAL)
def test_info_equals_in_process_and_qemu(images, name, extra):
    for out in ("--output=json", "--output=human"):
        q = qemu("info", out, *extra, name, cwd=images)
        i = instar("info", out, *extra, name, cwd=images)
        s = run([INSTAR, "info", "--isolated", out, *extra, name], cwd=images)
        assert q.rc == 0, q
        assert s == i, (s, i)
        assert s == q, (s, q)


@pytest.mark.parametrize("name", ["top.qcow2", "split.vmdk", "disk.vhd", "leak.qcow2"])
def test_map_and_check_equal_in_process_and_qemu(images, name):
    for argv in (["map", "--output=json"], ["map"], ["check", "--output=json"], ["check"]):
        q = qemu(*argv, name, cwd=images)
        i = instar(*argv, name, cwd=images)
        s = run([INSTAR, argv[0], "--isolated", *argv[1:], name], cwd=images)
        assert s == i, (argv, s, i)
        assert s == q, (argv, s, q)
    if name == "leak.qcow2":
        assert q.rc == 3, q  # the check found the leak, through the helper too


@pytest.mark.parametrize("name", ["top.qcow2", "split.vmdk", "disk.vhd"])
def test_measure_and_compare_equal_in_process_and_qemu(images, name):
    for argv in (["measure", "-O", "qcow2", name], ["measure", "--output=json", "-O", "vmdk", name],
                 ["compare", name, name], ["compare", "-s", "top.qcow2", name], ["compare", "-p", name, "disk.vhd"],
                 ["compare", name, "missing.qcow2"]):
        q = qemu(*argv, cwd=images)
        i = instar(*argv, cwd=images)
        s = run([INSTAR, argv[0], "--isolated", *argv[1:]], cwd=images)
        assert s == i, (argv, s, i)
        assert s == q, (argv, s, q)


def test_python_measure_and_compare(images):
    top, vhd = os.path.join(images, "top.qcow2"), os.path.join(images, "disk.vhd")
    assert lib.measure_result(top, "qcow2", isolated=True) == lib.measure_result(top, "qcow2")
    assert lib.measure_result(size=1 << 30, out_fmt="qcow2", isolated=True) == \
        lib.measure_result(size=1 << 30, out_fmt="qcow2")
    for other in (vhd, top):
        seen, seen_in = [], []
        assert lib.compare_result(top, other, isolated=True, progress=seen.append) == \
            lib.compare_result(top, other, progress=seen_in.append)
        assert seen and seen == seen_in, (seen, seen_in)  # the helper's progress reaches the caller's callback
    a, ea = lib.compare_status(top, os.path.join(images, "missing.qcow2"))
    b, eb = lib.compare_status(top, os.path.join(images, "missing.qcow2"), isolated=True)
    assert a == b and (ea.code, ea.message) == (eb.code, eb.message)
    with pytest.raises(lib.Cancelled):
        lib.compare_result(top, top, isolated=True, progress=lambda p: True)  # the callback cancels


def test_python_binding_same_structs(images):
    for name in ("top.qcow2", "split.vmdk", "enc.luks"):
        path = os.path.join(images, name)
        assert lib.info(path, isolated=True) == lib.info(path)
        assert lib.info(path, backing_chain=True, isolated=True) == lib.info(path, backing_chain=True)
        assert lib.info_json(path, isolated=True) == lib.info_json(path)
        key = "pw" if name.endswith(".luks") else None  # the secret crosses to the helper
        assert lib.map_entries(path, key_secret=key, isolated=True) == lib.map_entries(path, key_secret=key)
    path = os.path.join(images, "leak.qcow2")
    assert lib.check_result(path, isolated=True) == lib.check_result(path)
    assert lib.check_report(path, isolated=True) == lib.check_report(path)
    with pytest.raises(lib.Invalid):
        lib.check_result(path, repair="leaks", isolated=True)  # the helper never writes


def test_errors_cross_back(images):
    missing = os.path.join(images, "missing.qcow2")
    with pytest.raises(lib.NotFound) as e1:
        lib.info(missing)
    with pytest.raises(lib.NotFound) as e2:
        lib.info(missing, isolated=True)
    assert (e1.value.message, e1.value.errno) == (e2.value.message, e2.value.errno)
    # A backing file that does not exist, and a chain through the CLI: same exit code and message as qemu-img.
    qimg("create", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2", "1M", "-u", cwd=images)
    q = qemu("info", "--backing-chain", "orphan.qcow2", cwd=images)
    s = _iso_in(images, "info", "--backing-chain", "orphan.qcow2")
    assert q.rc == 1 and s == q, (s, q)


def _iso_in(cwd, cmd, *args):
    return run([INSTAR, cmd, "--isolated", *args], cwd=cwd)


# A sample of the hostile variants (every 12th name, so the sample is fixed and spreads over the kinds): the
# isolated run must print exactly what the in-process run prints, which test_hostile compares with qemu-img.
HOSTILE = sorted(H.VARIANTS)[::12]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return H.build(str(tmp_path_factory.mktemp("iso-hostile")), HOSTILE)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_same_as_in_process(hostile, name):
    image = hostile[name]
    d = os.path.dirname(image)
    for argv in (["info", "--output=json"], ["map", "--output=json"], ["check", "--output=json"]):
        i = run(["prlimit", "--as=%d" % (1 << 30), "--cpu=20", "--", INSTAR, *argv, image], cwd=d)
        s = run([INSTAR, argv[0], "--isolated", *argv[1:], image], cwd=d)
        assert s == i, (argv, s, i)
    if name != "chain-depth-300":
        q = qemu("info", "--output=json", image, cwd=d)
        if q.rc == 0:
            assert run([INSTAR, "info", "--isolated", "--output=json", image], cwd=d) == q


def test_helper_crash_is_an_error(images, monkeypatch):
    path = os.path.join(images, "top.qcow2")
    _with_env(monkeypatch, INSTAR_ISOLATE_TEST="abort")
    with pytest.raises(lib.IsolationFailed) as e:
        lib.info(path, isolated=True)
    assert "crashed" in e.value.message and "Abort" in e.value.message, e.value.message
    with pytest.raises(lib.IsolationFailed):
        lib.map_entries(path, isolated=True)
    r = _iso("info", path)
    assert r.rc == 1 and "isolated helper crashed" in r.err and r.out == "", r
    monkeypatch.delenv("INSTAR_ISOLATE_TEST")
    assert lib.info(path, isolated=True) == lib.info(path)  # this process lives on, and so does the mode


def test_helper_hang_is_killed_at_the_deadline(images, monkeypatch):
    path = os.path.join(images, "top.qcow2")
    _with_env(monkeypatch, INSTAR_ISOLATE_TEST="hang", INSTAR_ISOLATE_TIMEOUT_MS="500")
    start = time.monotonic()
    with pytest.raises(lib.LimitReached) as e:
        lib.info(path, isolated=True)
    assert "did not finish within 500 ms" in e.value.message, e.value.message
    # The caller's own limits set the helper's deadline too.
    monkeypatch.delenv("INSTAR_ISOLATE_TIMEOUT_MS")
    with pytest.raises(lib.LimitReached):
        with lib.limits(timeout=0.3):
            lib.check_result(path, isolated=True)
    assert time.monotonic() - start < 60


def test_seccomp_kills_open(images, monkeypatch):
    """The helper's filter is on: open(2) after the lockdown kills it (SIGSYS)."""
    path = os.path.join(images, "top.qcow2")
    _with_env(monkeypatch, INSTAR_ISOLATE_TEST="open")
    with pytest.raises(lib.IsolationFailed) as e:
        lib.info(path, isolated=True)
    assert "seccomp" in e.value.message, e.value.message


def test_helper_missing(images, monkeypatch):
    _with_env(monkeypatch, INSTAR_HELPER=os.path.join(images, "no-such-helper"))
    with pytest.raises(lib.IsolationFailed) as e:
        lib.info(os.path.join(images, "top.qcow2"), isolated=True)
    assert "Could not start the isolated helper" in e.value.message


def test_helper_is_confined(images):
    """The helper runs with no new privileges, a seccomp filter and the rlimits, holding no file but its socket
    and the images: checked from /proc while a hung helper waits to be killed."""
    path = os.path.join(images, "top.qcow2")
    import subprocess
    env = dict(os.environ, INSTAR_ISOLATE_TEST="hang", INSTAR_ISOLATE_TIMEOUT_MS="120000")
    p = subprocess.Popen([INSTAR, "info", "--isolated", path], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        child = None
        while child is None and time.monotonic() < deadline:
            try:
                with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                    kids = f.read().split()
            except FileNotFoundError:
                kids = []
            for k in kids:
                try:
                    with open(f"/proc/{k}/status") as f:
                        st = f.read()
                except FileNotFoundError:
                    continue
                if "Seccomp:\t2" in st:
                    child = (k, st)
            time.sleep(0.01)
        assert child is not None, "no confined helper appeared"
        k, st = child
        assert "NoNewPrivs:\t1" in st
        with open(f"/proc/{k}/limits") as f:
            limits = f.read()
        assert any(l.startswith("Max address space") and "1073741824" in l for l in limits.splitlines()), limits
        assert any(l.startswith("Max cpu time") and " 30 " in l for l in limits.splitlines()), limits
        fds = sorted(int(x) for x in os.listdir(f"/proc/{k}/fd"))
        targets = [os.readlink(f"/proc/{k}/fd/{x}") for x in fds]
        assert fds[:4] == [0, 1, 2, 3], targets
        assert targets[:3] == ["/dev/null"] * 3 and targets[3].startswith("socket:"), targets
        assert all(t.endswith(".qcow2") for t in targets[4:]), targets
    finally:
        p.kill()
        p.wait()


def test_threads_spawn_helpers_together(images):
    """A multi-threaded host: helpers spawned from several threads at once each answer their own caller."""
    import concurrent.futures
    names = ["top.qcow2", "split.vmdk", "disk.vhd", "leak.qcow2"] * 3
    want = {n: lib.info_json(os.path.join(images, n)) for n in set(names)}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda n: lib.info_json(os.path.join(images, n), isolated=True), names))
    assert got == [want[n] for n in names]
