"""The installable Python package (bindings/python): pip install from the source tree into a fresh virtualenv,
`make wheel-only` and the wheel's bundled library, the library lookup order and its error, the InstarError
subclasses per code against what qemu-img fails on, the typed results against qemu-img's JSON, Image as a context
manager, the GIL released during library calls (two conversions in flight at once) and cancellation from another
thread.

Virtualenvs are made with the system Python (Debian's python3-venv, python3-setuptools, python3-wheel, which
`make deps` installs), so building and installing needs no download; one test also installs with pip's default
isolated build, which fetches setuptools from PyPI, as a user's `pip install bindings/python` does.
"""
import ast
import ctypes
import json
import os
import pickle
import re
import shutil
import sys
import threading
import time
import zipfile

import pytest

from conftest import BUILD, LIBINSTAR, ROOT, qemu, qemu_io, qimg, run

import instar
from instar import _lib

PKG_SRC = os.path.join(ROOT, "bindings", "python")
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
DEADLINE = 300  # seconds any wait on another thread may take on a loaded machine


def qemu_message(r):
    """qemu-img's error text without its "qemu-img: " prefixes (conftest writes them as "instar: ") and final
    newline: what InstarError.message carries."""
    return "\n".join(line[len("instar: "):] if line.startswith("instar: ") else line
                     for line in r.err.rstrip("\n").split("\n"))


def copy_source(dst):
    """A copy of bindings/python without caches or a bundled library (pip builds in the tree it is given)."""
    shutil.copytree(PKG_SRC, dst, ignore=shutil.ignore_patterns("__pycache__", "_native", "build", "*.egg-info"))
    return dst


def make_venv(path, system_site=False):
    argv = [SYSTEM_PYTHON, "-m", "venv", path] + (["--system-site-packages"] if system_site else [])
    r = run(argv)
    assert r.rc == 0, r
    return os.path.join(path, "bin", "python")


def fake_tools(d, ldconfig_path=None, pkg_libdir=None):
    """A folder with an `ldconfig` that lists libinstar.so at `ldconfig_path` (or nothing) and a `pkg-config`
    that knows instar's libdir `pkg_libdir` (or fails like pkg-config without instar.pc)."""
    os.makedirs(d, exist_ok=True)
    lines = ["#!/bin/sh", 'echo "1 libs found in cache \\`/etc/ld.so.cache\'"']
    if ldconfig_path:
        lines.append('echo "\tlibinstar.so (libc6,x86-64) => %s"' % ldconfig_path)
    with open(os.path.join(d, "ldconfig"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(d, "pkg-config"), "w") as f:
        if pkg_libdir:
            f.write('#!/bin/sh\n[ "$1" = "--variable=libdir" ] && [ "$2" = instar ] && echo "%s" && exit 0\n'
                    'exit 1\n' % pkg_libdir)
        else:
            f.write("#!/bin/sh\necho \"Package instar was not found in the pkg-config search path.\" >&2\n"
                    "exit 1\n")
    for n in ("ldconfig", "pkg-config"):
        os.chmod(os.path.join(d, n), 0o755)
    return d


def py(python, code, tools, library=None, pythonpath=None, cwd=None):
    """Runs `code` with `python` where PATH starts with `tools` and INSTAR_LIBRARY is `library` (unset if None)."""
    env = {k: v for k, v in os.environ.items() if k not in ("INSTAR_LIBRARY", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = tools + os.pathsep + "/usr/bin:/bin"
    if library is not None:
        env["INSTAR_LIBRARY"] = library
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return run([python, "-c", code], env=env, cwd=cwd)


WHERE = "import instar; print(instar.library_path()); print(instar.version())"


def lib_copy(d):
    """libinstar.so reachable under another folder `d` (a symlink to the build's)."""
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "libinstar.so")
    os.symlink(LIBINSTAR, p)
    return p


# ---- the package's sources -------------------------------------------------------------------------------

def test_package_type_checks_for_python_3_9():
    r = run(["mypy", "--strict", "--python-version", "3.9", "--no-incremental", os.path.join(PKG_SRC, "instar")],
            cwd=PKG_SRC)
    assert r.rc == 0 and r.out.startswith("Success"), r


def test_sources_parse_as_python_3_9():
    files = [os.path.join(PKG_SRC, "setup.py")]
    files += [os.path.join(PKG_SRC, "instar", n) for n in os.listdir(os.path.join(PKG_SRC, "instar"))
              if n.endswith(".py")]
    files += [os.path.join(PKG_SRC, "instar", "compat", n)
              for n in os.listdir(os.path.join(PKG_SRC, "instar", "compat")) if n.endswith(".py")]
    for path in files:
        with open(path) as f:
            ast.parse(f.read(), path, feature_version=(3, 9))
    assert os.path.exists(os.path.join(PKG_SRC, "instar", "py.typed"))
    with open(os.path.join(PKG_SRC, "pyproject.toml")) as f:
        text = f.read()
    assert 'build-backend = "setuptools.build_meta"' in text and 'requires-python = ">=3.9"' in text


def test_library_loaded_with_cdll_so_calls_release_the_gil():
    L = _lib.lib()
    assert isinstance(L, ctypes.CDLL) and not isinstance(L, ctypes.PyDLL)
    assert not (L._func_flags_ & ctypes._FUNCFLAG_PYTHONAPI)
    assert os.path.samefile(instar.library_path(), LIBINSTAR)


# ---- pip install and the wheel ---------------------------------------------------------------------------

def test_pip_install_source_tree_offline(tmp):
    """`pip install bindings/python` with the system's setuptools (no build isolation, no index)."""
    python = make_venv(os.path.join(tmp, "venv"), system_site=True)
    r = run([python, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--no-cache-dir",
             copy_source(os.path.join(tmp, "src"))])
    assert r.rc == 0, r
    img = os.path.join(tmp, "a.qcow2")
    qimg("create", "-f", "qcow2", img, "1M")
    tools = fake_tools(os.path.join(tmp, "tools"))
    r = py(python, "import instar, json; print(instar.__file__); print(json.dumps(instar.info(%r).to_dict()))" % img,
           tools, library=LIBINSTAR, cwd=tmp)
    assert r.rc == 0, r
    where, got = r.out.splitlines()
    assert where.startswith(os.path.join(tmp, "venv")) and "site-packages" in where
    q = json.loads(qemu("info", "--output=json", img).out)
    assert json.loads(got) == q
    site = os.path.dirname(where)
    assert os.path.exists(os.path.join(site, "py.typed")) and not os.path.exists(os.path.join(site, "_native"))
    # The installed package is typed (py.typed): mypy checks a client against its hints, and catches a misuse.
    good, bad = os.path.join(tmp, "good.py"), os.path.join(tmp, "bad.py")
    with open(good, "w") as f:
        f.write("import instar\n\n\ndef used(p: str) -> int:\n    r: instar.MeasureResult = instar.measure_result(p)\n"
                "    with instar.Image(p) as img:\n        return img.size + r.required\n")
    with open(bad, "w") as f:
        f.write("import instar\n\nname: int = instar.info_json('x')\n")
    mypy = ["mypy", "--strict", "--no-incremental", "--python-executable", python]
    r = run(mypy + [good], cwd=tmp)
    assert r.rc == 0, r
    r = run(mypy + [bad], cwd=tmp)
    assert r.rc == 1 and 'Incompatible types in assignment (expression has type "str", variable has type "int")' \
        in r.out, r
    # Without the library anywhere, the import works and the first call says where it looked.
    r = py(python, WHERE, tools, cwd=tmp)
    assert r.rc != 0 and "LibraryNotFoundError" in r.err and "4. pkg-config --variable=libdir instar" in r.err


def test_pip_install_source_tree_isolated_build(tmp):
    """What a user types: pip's default isolated build (setuptools from PyPI) in a fresh virtualenv."""
    python = make_venv(os.path.join(tmp, "venv"))
    r = run([python, "-m", "pip", "install", "--no-cache-dir", copy_source(os.path.join(tmp, "src"))])
    assert r.rc == 0, r
    r = py(python, WHERE, fake_tools(os.path.join(tmp, "tools")), library=LIBINSTAR, cwd=tmp)
    assert r.rc == 0, r
    assert r.out.splitlines() == [LIBINSTAR, instar.version()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `make wheel-only` builds from build/lib/libinstar.so (what `make wheel` runs after the build)."""
    d = str(tmp_path_factory.mktemp("wheel"))
    r = run(["make", "-s", "-C", ROOT, "wheel-only", "OUT=" + BUILD, "WHEEL_STAGE=" + os.path.join(d, "stage"),
             "WHEEL_DIR=" + os.path.join(d, "dist"), "PYTHON=" + SYSTEM_PYTHON])
    assert r.rc == 0, r
    wheels = os.listdir(os.path.join(d, "dist"))
    assert len(wheels) == 1 and wheels[0].endswith(".whl"), wheels
    return os.path.join(d, "dist", wheels[0])


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("wheelvenv"))
    python = make_venv(os.path.join(d, "venv"))
    r = run([python, "-m", "pip", "install", "--no-index", "--no-cache-dir", wheel])
    assert r.rc == 0, r
    return python


def test_wheel_carries_the_library(wheel):
    name = os.path.basename(wheel)
    assert name.startswith("instar-") and name.endswith("-py3-none-linux_x86_64.whl"), name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "instar/_native/libinstar.so" in names and "instar/py.typed" in names
        assert "instar/compat/__init__.py" in names and "instar/compat/vdsm.py" in names
        with open(LIBINSTAR, "rb") as f:
            assert z.read("instar/_native/libinstar.so") == f.read()


def test_wheel_loads_bundled_library_without_install(wheel_venv, tmp):
    """No INSTAR_LIBRARY, no `make install`, nothing in ldconfig or pkg-config: the wheel's copy is used."""
    src = os.path.join(tmp, "s.raw")
    qimg("create", "-f", "raw", src, "4M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 1M 64k", src)
    code = ("import instar; print(instar.library_path()); instar.convert(%r, %r, fmt='qcow2'); "
            "print(instar.compare_result(%r, %r).identical)" % (src, os.path.join(tmp, "o.qcow2"), src,
                                                                 os.path.join(tmp, "o.qcow2")))
    r = py(wheel_venv, code, fake_tools(os.path.join(tmp, "tools")), cwd=tmp)
    assert r.rc == 0, r
    where, identical = r.out.splitlines()
    assert where.startswith(os.path.dirname(os.path.dirname(wheel_venv))) and \
        where.endswith(os.path.join("site-packages", "instar", "_native", "libinstar.so")), where
    assert identical == "True"
    assert qemu("compare", src, os.path.join(tmp, "o.qcow2")).rc == 0


# ---- lookup order ----------------------------------------------------------------------------------------

def test_lookup_env_beats_package_copy(wheel_venv, tmp):
    other = lib_copy(os.path.join(tmp, "env"))
    r = py(wheel_venv, WHERE, fake_tools(os.path.join(tmp, "tools"), lib_copy(os.path.join(tmp, "ld"))),
           library=other, cwd=tmp)
    assert r.rc == 0 and r.out.splitlines()[0] == other, r


def test_lookup_env_that_fails_is_reported_not_replaced(wheel_venv, tmp):
    missing = os.path.join(tmp, "nowhere", "libinstar.so")
    r = py(wheel_venv, WHERE, fake_tools(os.path.join(tmp, "tools")), library=missing, cwd=tmp)
    assert r.rc != 0 and "LibraryNotFoundError" in r.err, r
    assert "1. $INSTAR_LIBRARY=%s: %s: no such file" % (missing, missing) in r.err


def test_lookup_package_copy_beats_ldconfig(wheel_venv, tmp):
    tools = fake_tools(os.path.join(tmp, "tools"), lib_copy(os.path.join(tmp, "ld")),
                       os.path.join(tmp, "pc"))
    lib_copy(os.path.join(tmp, "pc"))
    r = py(wheel_venv, WHERE, tools, cwd=tmp)
    assert r.rc == 0 and r.out.splitlines()[0].endswith(os.path.join("instar", "_native", "libinstar.so")), r


def test_lookup_ldconfig_then_pkg_config_then_error(tmp):
    """From the source tree (no copy inside the package): ldconfig's entry, else pkg-config's libdir, else an
    error naming the four places in order."""
    ld, pc = lib_copy(os.path.join(tmp, "ld")), lib_copy(os.path.join(tmp, "pc"))
    tools = fake_tools(os.path.join(tmp, "t1"), ld, os.path.dirname(pc))
    r = py(sys.executable, WHERE, tools, pythonpath=PKG_SRC, cwd=tmp)
    assert r.rc == 0 and r.out.splitlines() == [ld, instar.version()], r
    tools = fake_tools(os.path.join(tmp, "t2"), None, os.path.dirname(pc))
    r = py(sys.executable, WHERE, tools, pythonpath=PKG_SRC, cwd=tmp)
    assert r.rc == 0 and r.out.splitlines() == [pc, instar.version()], r
    # ldconfig names a file that is gone: pkg-config's is used.
    tools = fake_tools(os.path.join(tmp, "t3"), os.path.join(tmp, "gone", "libinstar.so"), os.path.dirname(pc))
    r = py(sys.executable, WHERE, tools, pythonpath=PKG_SRC, cwd=tmp)
    assert r.rc == 0 and r.out.splitlines()[0] == pc, r
    tools = fake_tools(os.path.join(tmp, "t4"))
    r = py(sys.executable, "import instar\ntry:\n instar.version()\nexcept instar.LibraryNotFoundError as e:\n"
           " print(e)\n print(len(e.tried))", tools, pythonpath=PKG_SRC, cwd=tmp)
    assert r.rc == 0, r
    packaged = os.path.join(PKG_SRC, "instar", "_native", "libinstar.so")
    assert r.out == ("libinstar.so could not be loaded; tried, in order:\n"
                     "  1. $INSTAR_LIBRARY: not set\n"
                     "  2. the copy inside the package: %s: no such file\n"
                     "  3. ldconfig -p: libinstar.so not in the linker cache\n"
                     "  4. pkg-config --variable=libdir instar: no instar.pc (Package instar was not found in the "
                     "pkg-config search path.)\n"
                     "Set INSTAR_LIBRARY to the library's path, install the wheel that bundles it (make wheel), or "
                     "run make install.\n4\n") % packaged


# ---- errors ------------------------------------------------------------------------------------------------

def test_error_classes_cover_every_code():
    with open(os.path.join(ROOT, "include", "instar.h")) as f:
        header = f.read()
    codes = {int(v) for v in re.findall(r"INSTAR_E_[A-Z_]+ = (-\d+)", header)}
    assert codes and codes == set(instar.ERROR_CLASSES)
    for code, cls in instar.ERROR_CLASSES.items():
        e = instar.InstarError(code, "msg", 5)
        assert type(e) is cls and isinstance(e, instar.InstarError) and cls.code_value == code
        assert (e.code, e.message, e.errno, str(e)) == (code, "msg", 5, "msg")
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is cls and (back.code, back.message, back.errno) == (code, "msg", 5)
        assert _lib.lib().instar_strerror(code)  # the library knows the code too
    assert type(instar.InstarError(-99, "x")) is instar.InstarError
    e = instar.Locked("held")
    assert (e.code, e.message, e.errno) == (instar.Locked.code_value, "held", 0)


def raises(cls, fn):
    with pytest.raises(instar.InstarError) as ei:
        fn()
    e = ei.value
    assert type(e) is cls and e.code == cls.code_value, (cls, e, e.code)
    return e


def test_errors_against_qemu_img(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    qimg("create", "-f", "qcow2", "a.qcow2", "1M")
    qimg("create", "-f", "raw", "r.raw", "1M")
    # NotFound
    e = raises(instar.NotFound, lambda: instar.info("nope.qcow2"))
    assert e.message == qemu_message(qemu("info", "nope.qcow2")) and e.errno == 2
    # Invalid: a qcow2 header field out of range, a bad creation option, a shrink without --shrink
    shutil.copy("a.qcow2", "bad.qcow2")
    with open("bad.qcow2", "r+b") as f:
        f.seek(20)
        f.write((31).to_bytes(4, "big"))  # cluster_bits
    e = raises(instar.Invalid, lambda: instar.info("bad.qcow2"))
    assert e.message == qemu_message(qemu("info", "bad.qcow2"))
    e = raises(instar.Invalid, lambda: instar.create("c.qcow2", "qcow2", 1 << 20, cluster_size=1000))
    assert e.message == qemu_message(qemu("create", "-f", "qcow2", "-o", "cluster_size=1000", "c.qcow2", "1M"))
    # Unsupported
    e = raises(instar.Unsupported, lambda: instar.check("r.raw"))
    assert e.message == qemu_message(qemu("check", "r.raw"))
    # Locked: an image held open for writing (an OFD lock, which conflicts within one process too)
    with instar.Image("a.qcow2", flags=instar.OPEN_READ_WRITE):
        e = raises(instar.Locked, lambda: instar.resize("a.qcow2", 2 << 20))
        assert e.message == qemu_message(qemu("resize", "a.qcow2", "2M"))
    # Chain: a backing loop
    qimg("create", "-f", "qcow2", "-u", "-b", "l2.qcow2", "-F", "qcow2", "l1.qcow2", "1M")
    qimg("create", "-f", "qcow2", "-u", "-b", "l1.qcow2", "-F", "qcow2", "l2.qcow2", "1M")
    e = raises(instar.Chain, lambda: instar.info("l1.qcow2", backing_chain=True))
    assert e.message == qemu_message(qemu("info", "--backing-chain", "l1.qcow2"))
    # IO: a bench request past the end
    e = raises(instar.IO, lambda: instar.bench("r.raw", fmt="raw", count=4, offset=(1 << 20) - 100))
    assert e.message == qemu_message(qemu("bench", "-f", "raw", "-c", "4", "-o", str((1 << 20) - 100), "r.raw"))
    # Encrypted: a LUKS qcow2 opened without its passphrase
    qimg("create", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "enc.qcow2", "1M")
    e = raises(instar.Encrypted, lambda: instar.Image("enc.qcow2"))
    assert e.message == qemu_message(qemu("compare", "enc.qcow2", "a.qcow2"))
    # Cancelled
    raises(instar.Cancelled, lambda: instar.convert("r.raw", "o.raw", fmt="raw", progress=lambda p: True))
    # Permission and OutOfRange have no qemu-img command; the library's own messages
    with instar.Image("a.qcow2") as img:
        raises(instar.Permission, lambda: img.write(0, b"x" * 512))
        raises(instar.OutOfRange, lambda: img.read(1 << 20, 512))


# ---- typed results -----------------------------------------------------------------------------------------

@pytest.fixture
def data_qcow2(tmp):
    p = os.path.join(tmp, "d.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=4096", p, "8M")
    qemu_io("-c", "write -P 0x11 0 64k", "-c", "write -z 1M 64k", "-c", "write -P 0x22 4M 4k", p)
    return p


def test_map_entries(data_qcow2):
    q = json.loads(qemu("map", "--output=json", data_qcow2).out)
    entries = instar.map_entries(data_qcow2)
    assert all(isinstance(e, instar.MapEntry) for e in entries)
    assert [e.to_dict() for e in entries] == q == instar.map(data_qcow2)
    for e in entries:
        assert (e.filename == data_qcow2) == (e.offset is not None)


def test_compare_result(data_qcow2, tmp):
    other = os.path.join(tmp, "o.qcow2")
    qimg("convert", "-O", "qcow2", data_qcow2, other)
    r = instar.compare_result(data_qcow2, other)
    q = qemu("compare", data_qcow2, other)
    assert isinstance(r, instar.CompareResult) and r.identical and r.message == q.out and q.rc == 0
    qemu_io("-c", "write -P 0x33 5M 512", other)
    r = instar.compare_result(data_qcow2, other)
    q = qemu("compare", data_qcow2, other)
    assert (r.identical, r.size_mismatch, r.mismatch_offset, r.message) == (False, False, 5 << 20, q.out)
    assert r.to_dict() == instar.compare(data_qcow2, other)


def test_measure_result(data_qcow2):
    q = json.loads(qemu("measure", "--output=json", "-O", "qcow2", data_qcow2).out)
    r = instar.measure_result(data_qcow2, "qcow2")
    assert isinstance(r, instar.MeasureResult)
    assert r.to_dict() == q == instar.measure(data_qcow2, "qcow2")
    assert (r.required, r.fully_allocated) == (q["required"], q["fully-allocated"])


def test_check_result(data_qcow2, tmp):
    q = qemu("check", "--output=json", data_qcow2)
    r = instar.check_result(data_qcow2)
    want = {k: v for k, v in json.loads(q.out).items() if k not in ("filename", "format")}
    assert isinstance(r, instar.CheckResult) and r.exit_code == q.rc == 0 and r.to_dict() == want
    assert (r.check_errors, r.total_clusters, r.image_end_offset) == (
        want["check-errors"], want["total-clusters"], want["image-end-offset"])
    # After a write and a discard (a freed cluster, fragmentation counts): still what qemu-img reports
    leaky = os.path.join(tmp, "leak.qcow2")
    shutil.copy(data_qcow2, leaky)
    qemu_io("-c", "write -P 1 2M 4k", "-c", "discard 2M 4k", leaky)
    q = qemu("check", "--output=json", leaky)
    r = instar.check_result(leaky)
    assert r.exit_code == q.rc and r.to_dict() == {k: v for k, v in json.loads(q.out).items()
                                                   if k not in ("filename", "format")}


def test_bench_result(tmp):
    p = os.path.join(tmp, "b.raw")
    qimg("create", "-f", "raw", p, "1M")
    r = instar.bench_result(p, fmt="raw", count=100, depth=4)
    assert isinstance(r, instar.BenchResult) and (r.requests, r.bytes) == (100, 100 * 4096) and r.seconds > 0


# ---- Image as a context manager ---------------------------------------------------------------------------

def test_image_context_manager(data_qcow2, tmp):
    raw = os.path.join(tmp, "d.raw")
    qimg("convert", "-O", "raw", data_qcow2, raw)
    with open(raw, "rb") as f:
        want = f.read()
    with instar.Image(data_qcow2, flags=instar.OPEN_READ_WRITE) as img:
        assert not img.closed and img.size == 8 << 20 and img.read(0, len(want)) == want
        assert qemu("resize", data_qcow2, "16M").rc == 1  # our write lock is held
    assert img.closed
    with pytest.raises(ValueError):
        img.read(0, 512)
    img.close()  # a second close does nothing
    assert qemu("resize", data_qcow2, "16M").rc == 0  # the lock went with the close
    with pytest.raises(KeyError):
        with instar.Image(data_qcow2, flags=instar.OPEN_READ_WRITE) as img:
            raise KeyError("boom")
    assert img.closed and qemu("resize", "--shrink", data_qcow2, "8M").rc == 0


# ---- threads: the GIL and cancellation -------------------------------------------------------------------

@pytest.fixture
def big_raw(tmp):
    """A 64 MiB raw image with data spread over it, so a conversion reports progress many times."""
    p = os.path.join(tmp, "big.raw")
    qimg("create", "-f", "raw", p, "64M")
    qemu_io("-f", "raw", *[a for k in range(0, 64, 4) for a in ("-c", "write -P %d %dM 1M" % (k + 1, k))], p)
    return p


def test_two_conversions_run_at_once(big_raw, tmp):
    """Each conversion's first progress report waits until the other conversion has reported progress too: both
    can only finish if both are inside instar_convert at the same time, which needs the GIL released."""
    reported = [threading.Event(), threading.Event()]
    barrier = threading.Barrier(2, timeout=DEADLINE)
    stamps, errors, saw_other = [None, None], [], [False, False]

    def work(i):
        def progress(_percent):
            if not reported[i].is_set():
                reported[i].set()
                saw_other[i] = reported[1 - i].wait(DEADLINE)
            return False
        try:
            barrier.wait()
            start = time.monotonic()
            instar.convert(big_raw, os.path.join(tmp, "o%d.qcow2" % i), fmt="qcow2", progress=progress)
            stamps[i] = (start, time.monotonic())
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 2)
    assert not errors and all(stamps) and saw_other == [True, True], (errors, stamps, saw_other)
    (s0, e0), (s1, e1) = stamps
    assert s0 < e1 and s1 < e0  # each started before the other finished
    for i in range(2):
        assert qemu("compare", big_raw, os.path.join(tmp, "o%d.qcow2" % i)).rc == 0


def test_python_runs_while_a_conversion_is_inside_the_library(tmp):
    """A conversion throttled by a rate limit sleeps inside instar_convert between its progress reports. With the
    interpreter's switch interval made huge, a thread gives the GIL up only where it blocks: the main thread
    counts in Python (yielding with sleep(0)) and must get ahead between two progress reports, which it can only
    do if the converting thread released the GIL inside the library (loaded with PyDLL, every gap is 0).
    Repeated until seen, on a deadline."""
    src = os.path.join(tmp, "g.raw")
    qimg("create", "-f", "raw", src, "8M")
    qemu_io("-f", "raw", "-c", "write -P 1 0 8M", src)
    deadline = time.monotonic() + DEADLINE
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000)
    try:
        while True:
            counter, gaps, prev, done, errors = [0], [], [None], threading.Event(), []

            def progress(_percent):
                now = counter[0]
                if prev[0] is not None:
                    gaps.append(now - prev[0])
                prev[0] = counter[0]
                return False

            def work():
                try:
                    instar.convert(src, os.path.join(tmp, "g.qcow2"), fmt="qcow2", rate_limit=16 << 20,
                                   progress=progress)
                except Exception as e:  # reported below
                    errors.append(e)
                finally:
                    done.set()

            t = threading.Thread(target=work)
            t.start()
            while not done.is_set() and time.monotonic() < deadline:
                counter[0] += 1
                time.sleep(0)  # releases the GIL for the converting thread's progress callbacks
            t.join(DEADLINE)
            assert not errors, errors
            if any(g > 0 for g in gaps):
                break
            assert time.monotonic() < deadline, gaps
    finally:
        sys.setswitchinterval(interval)
    assert qemu("compare", src, os.path.join(tmp, "g.qcow2")).rc == 0


def test_cancel_from_another_thread(big_raw, tmp):
    token = instar.Cancel()
    started, seen, outcome = threading.Event(), [], []

    def progress(percent):
        seen.append(percent)
        if not started.is_set():
            started.set()
            token.wait(DEADLINE)  # hold the conversion here until the other thread has cancelled
        return False

    def work():
        try:
            instar.convert(big_raw, os.path.join(tmp, "o.qcow2"), fmt="qcow2", progress=progress, cancel=token)
            outcome.append(None)
        except instar.InstarError as e:
            outcome.append(e)

    t = threading.Thread(target=work)
    t.start()
    assert started.wait(DEADLINE)
    token.cancel()
    t.join(DEADLINE)
    assert not t.is_alive() and len(outcome) == 1
    e = outcome[0]
    assert isinstance(e, instar.Cancelled) and e.code == -8 and token.cancelled
    assert seen and seen[-1] < 100.0


def test_cancel_token_without_progress_callable(big_raw, tmp):
    """A cancelled token stops every long operation at its first progress report, no progress callable needed."""
    token = instar.Cancel()
    token.cancel()
    base = os.path.join(tmp, "base.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    qimg("convert", "-O", "qcow2", big_raw, base)
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("-c", "write -P 0x77 0 1M", top)
    ops = {
        "convert": lambda: instar.convert(big_raw, os.path.join(tmp, "c.qcow2"), fmt="qcow2", cancel=token),
        "compare": lambda: instar.compare(big_raw, base, cancel=token),
        "commit": lambda: instar.commit(top, cancel=token),
        "rebase": lambda: instar.rebase(top, "", cancel=token),
        "dd": lambda: instar.dd(big_raw, os.path.join(tmp, "dd.raw"), fmt="raw", out_fmt="raw", cancel=token),
        "bench": lambda: instar.bench(big_raw, fmt="raw", count=1000, cancel=token),
        "amend": lambda: instar.amend(base, compat="0.10", cancel=token),
    }
    for name, fn in ops.items():
        with pytest.raises(instar.Cancelled):
            fn()
    r = qemu("check", top)
    assert r.rc == 0, r
