"""instar.compat.imageio against the module it replaces, ovirt-imageio 2.5.1's ovirt_imageio._internal.qemu_img.

Each case runs one call of the original (in the consumer virtualenv's python, driving the real qemu-img) and the
same call of ours (in this python, over libinstar), each in a fresh process through the same driver, on the same
paths: first the original, then its outputs are moved aside and ours runs. Equal are the return value, the
exception (type, args, and for CalledProcessError returncode, cmd and output), what went to stdout and stderr
(qemu's random node names masked), and the files written, byte for byte.

The original comes from the unpacked sdist `make consumer-test` leaves in build/consumers.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import BUILD, LIBINSTAR, ROOT, qemu_io, qimg, run

SDIST = os.path.join(BUILD, "consumers", "ovirt_imageio-2.5.1")
VENV_PYTHON = os.path.join(BUILD, "consumers", "venv", "bin", "python")
BINDINGS = os.path.join(ROOT, "bindings", "python")
NODE = re.compile(r"#block\d+")

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(SDIST, "ovirt_imageio", "_internal", "qemu_img.py"))
    or not os.access(VENV_PYTHON, os.X_OK),
    reason="the ovirt-imageio sdist and virtualenv are made by `make consumer-test`")

# Calls one function of the module named by argv[1] with the JSON call in argv[2]; writes the outcome as JSON to
# argv[3]. stdout and stderr stay the function's own.
DRIVER = r'''
import importlib, json, subprocess, sys
module = importlib.import_module(sys.argv[1])
call = json.loads(sys.argv[2])
try:
    value = getattr(module, call["fn"])(*call["args"], **call["kwargs"])
    outcome = {"return": value}
except subprocess.CalledProcessError as e:
    outcome = {"raise": "CalledProcessError", "returncode": e.returncode, "cmd": [str(c) for c in e.cmd],
               "output": repr(e.output), "stderr": repr(e.stderr)}
except Exception as e:
    outcome = {"raise": type(e).__name__, "module": type(e).__module__.rsplit(".", 1)[-1], "args": list(e.args)}
sys.stdout.flush()
sys.stderr.flush()
with open(sys.argv[3], "w") as f:
    json.dump(outcome, f)
'''


def _call(which, tmp, fn, args, kwargs):
    driver = os.path.join(tmp, ".driver.py")
    if not os.path.exists(driver):
        with open(driver, "w") as f:
            f.write(DRIVER)
    result = os.path.join(tmp, ".outcome.json")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if which == "original":
        python, module = VENV_PYTHON, "ovirt_imageio._internal.qemu_img"
        env["PYTHONPATH"] = SDIST
    else:
        python, module = sys.executable, "instar.compat.imageio"
        env["PYTHONPATH"] = BINDINGS
        env["INSTAR_LIBRARY"] = LIBINSTAR
    call = json.dumps({"fn": fn, "args": args, "kwargs": kwargs})
    p = subprocess.run([python, driver, module, call, result], cwd=tmp, env=env, capture_output=True, timeout=600)
    assert os.path.exists(result), p
    with open(result) as f:
        outcome = json.load(f)
    os.unlink(result)
    if outcome.get("module") in ("qemu_img", "imageio"):
        outcome["module"] = "compat"  # ContentMismatch / OpenImageError: the module's own classes
    # qemu's generated node names ("#block123") have random digits: masked.
    return {"outcome": outcome, "stdout": p.stdout.decode(), "stderr": NODE.sub("#blockN", p.stderr.decode())}


def same(tmp, fn, *args, outputs=(), **kwargs):
    """Runs fn(*args, **kwargs) with the original, then with ours; asserts equal outcomes and output files.
    `outputs` are files the call writes: the original's are moved aside (and restored before ours runs when they
    existed before the call, e.g. an image the call modifies)."""
    before = {}
    for path in outputs:
        if os.path.exists(path):
            before[path] = path + ".before"
            shutil.copyfile(path, before[path])
    ref = _call("original", tmp, fn, list(args), kwargs)
    for path in outputs:
        if os.path.exists(path):
            os.rename(path, path + ".orig")
        if path in before:
            shutil.copyfile(before[path], path)
    got = _call("instar", tmp, fn, list(args), kwargs)
    assert got == ref
    for path in outputs:
        assert os.path.exists(path) == os.path.exists(path + ".orig"), path
        if not os.path.exists(path):
            continue
        with open(path, "rb") as a, open(path + ".orig", "rb") as b:
            assert a.read() == b.read(), path
    return ref


def p(tmp, name):
    return os.path.join(tmp, name)


def test_public_names():
    """Every public name of the original module is in ours."""
    r = run([VENV_PYTHON, "-c", "import ovirt_imageio._internal.qemu_img as m, json; "
             "print(json.dumps(sorted(n for n in vars(m) if not n.startswith('_'))))"],
            env=dict(os.environ, PYTHONPATH=SDIST))
    assert r.rc == 0, r
    import instar.compat.imageio as ours
    # json, logging and subprocess are the original's imports, not functions it offers.
    missing = [n for n in json.loads(r.out) if n not in ("json", "logging", "subprocess") and not hasattr(ours, n)]
    assert missing == []
    assert issubclass(ours.ContentMismatch, Exception) and issubclass(ours.OpenImageError, Exception)
    assert ours.log.name == "qemu_img"


# ---- create ----

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("size", [1024 ** 2, "1G", "1.5M", "0x10000", 0])
@pytest.mark.parametrize("quiet", [False, True])
def test_create(tmp, fmt, size, quiet):
    img = p(tmp, "img." + fmt)
    same(tmp, "create", img, fmt, size=size, quiet=quiet, outputs=[img])


@pytest.mark.parametrize("size", [-1, "abc", "1Q", "99999999999999999999", None, "9E"])
def test_create_bad_size(tmp, size):
    img = p(tmp, "img.qcow2")
    same(tmp, "create", img, "qcow2", size=size, outputs=[img])


def test_create_backing(tmp):
    base = p(tmp, "base.qcow2")
    qimg("create", "-f", "qcow2", base, "3M")
    top = p(tmp, "top.qcow2")
    same(tmp, "create", top, "qcow2", backing_file=base, backing_format="qcow2", outputs=[top])
    same(tmp, "create", top, "qcow2", size=4 << 20, backing_file=base, backing_format="qcow2", quiet=True,
         outputs=[top])
    # qemu-img 7.2 wants the backing format; and a backing format without a backing file is not passed at all.
    same(tmp, "create", top, "qcow2", backing_file=base, outputs=[top])
    same(tmp, "create", top, "qcow2", size=1 << 20, backing_format="raw", outputs=[top])
    same(tmp, "create", top, "qcow2", backing_file=p(tmp, "missing"), backing_format="qcow2", outputs=[top])


def test_create_errors(tmp):
    same(tmp, "create", p(tmp, "a.img"), "nope", size=1024, outputs=[p(tmp, "a.img")])
    same(tmp, "create", p(tmp, "a.img"), "raw", outputs=[p(tmp, "a.img")])
    same(tmp, "create", p(tmp, "no/such/dir.img"), "qcow2", size=1024)


# ---- info ----

def _images(tmp):
    raw = p(tmp, "d.raw")
    qimg("create", "-f", "raw", raw, "2M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 64k 64k", raw)
    q = p(tmp, "d.qcow2")
    qimg("convert", "-f", "raw", "-O", "qcow2", raw, q)
    old = p(tmp, "old.qcow2")
    qimg("create", "-f", "qcow2", "-o", "compat=0.10", old, "1M")
    top = p(tmp, "top.qcow2")
    qimg("create", "-f", "qcow2", "-b", q, "-F", "qcow2", top)
    snap = p(tmp, "snap.qcow2")
    qimg("create", "-f", "qcow2", snap, "1M")
    qimg("snapshot", "-c", "s1", snap)
    bm = p(tmp, "bm.qcow2")
    qimg("create", "-f", "qcow2", bm, "10M")
    qimg("bitmap", "--add", bm, "b0")
    qimg("bitmap", "--add", "-g", "128k", "--disable", bm, "b1")
    return [raw, q, old, top, snap, bm]


def test_info(tmp):
    for img in _images(tmp) + [p(tmp, "missing"), tmp]:
        same(tmp, "info", img)


def test_info_not_an_image(tmp):
    path = p(tmp, "text.img")
    with open(path, "w") as f:
        f.write("QFI\xfb not really")
    same(tmp, "info", path)


# ---- measure ----

@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_measure(tmp, out_fmt):
    for img in _images(tmp):
        same(tmp, "measure", img, out_fmt)


def test_measure_errors(tmp):
    raw = p(tmp, "d.raw")
    qimg("create", "-f", "raw", raw, "1M")
    same(tmp, "measure", raw, "nope")
    same(tmp, "measure", p(tmp, "missing"), "qcow2")


# ---- convert ----

@pytest.mark.parametrize("src_fmt,dst_fmt,compressed", [
    ("raw", "raw", False), ("raw", "qcow2", False), ("qcow2", "raw", False), ("qcow2", "qcow2", False),
    ("raw", "qcow2", True), ("qcow2", "qcow2", True)])
@pytest.mark.parametrize("progress", [False, True])
def test_convert(tmp, src_fmt, dst_fmt, compressed, progress):
    raw = p(tmp, "s.raw")
    qimg("create", "-f", "raw", raw, "3M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x11 1M 300k", raw)
    src = raw
    if src_fmt == "qcow2":
        src = p(tmp, "s.qcow2")
        qimg("convert", "-O", "qcow2", raw, src)
    dst = p(tmp, "out." + dst_fmt)
    same(tmp, "convert", src, dst, src_fmt, dst_fmt, progress=progress, compressed=compressed, outputs=[dst])


@pytest.mark.parametrize("progress", [False, True])
def test_convert_errors(tmp, progress):
    raw = p(tmp, "s.raw")
    qimg("create", "-f", "raw", raw, "1M")
    dst = p(tmp, "out.img")
    # compression that raw cannot do, a wrong source format, an unknown target format, a missing source
    same(tmp, "convert", raw, dst, "raw", "raw", compressed=True, progress=progress, outputs=[dst])
    same(tmp, "convert", raw, dst, "qcow2", "raw", progress=progress, outputs=[dst])
    same(tmp, "convert", raw, dst, "raw", "nope", progress=progress, outputs=[dst])
    same(tmp, "convert", p(tmp, "missing"), dst, "raw", "qcow2", progress=progress, outputs=[dst])


# ---- unsafe_rebase ----

def test_unsafe_rebase(tmp):
    base = p(tmp, "base.qcow2")
    qimg("create", "-f", "qcow2", base, "1M")
    other = p(tmp, "other.raw")
    qimg("create", "-f", "raw", other, "1M")
    top = p(tmp, "top.qcow2")
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    same(tmp, "unsafe_rebase", top, other, "raw", outputs=[top])
    same(tmp, "unsafe_rebase", top, "no-such-backing.qcow2", "qcow2", outputs=[top])
    same(tmp, "unsafe_rebase", top, "", "raw", outputs=[top])
    same(tmp, "unsafe_rebase", other, base, "qcow2", outputs=[other])
    same(tmp, "unsafe_rebase", p(tmp, "missing"), base, "qcow2")


# ---- bitmap_add ----

def test_bitmap_add(tmp):
    img = p(tmp, "img.qcow2")
    qimg("create", "-f", "qcow2", img, "10M")
    same(tmp, "bitmap_add", img, "b0", outputs=[img])
    same(tmp, "bitmap_add", img, "b1", outputs=[img])
    same(tmp, "bitmap_add", img, "b0", outputs=[img])  # exists already
    same(tmp, "bitmap_add", img, "", outputs=[img])
    raw = p(tmp, "img.raw")
    qimg("create", "-f", "raw", raw, "1M")
    same(tmp, "bitmap_add", raw, "b0", outputs=[raw])
    same(tmp, "bitmap_add", p(tmp, "missing"), "b0")


# ---- compare ----

def _pair(tmp, fmt1, fmt2, size1=1 << 20, size2=1 << 20):
    a, b = p(tmp, "a." + fmt1), p(tmp, "b." + fmt2)
    qimg("create", "-f", fmt1, a, str(size1))
    qimg("create", "-f", fmt2, b, str(size2))
    return a, b


@pytest.mark.parametrize("fmt1,fmt2", [("raw", "raw"), ("qcow2", "qcow2"), ("raw", "qcow2")])
@pytest.mark.parametrize("strict", [False, True])
def test_compare(tmp, fmt1, fmt2, strict):
    a, b = _pair(tmp, fmt1, fmt2)
    same(tmp, "compare", a, b, format1=fmt1, format2=fmt2, strict=strict)
    same(tmp, "compare", a, b, strict=strict)
    qemu_io("-f", fmt2, "-c", "write -z 512k 4k", b)  # same contents, other allocation
    same(tmp, "compare", a, b, format1=fmt1, format2=fmt2, strict=strict)
    qemu_io("-f", fmt2, "-c", "write -P 0x78 700k 1", b)  # other contents
    same(tmp, "compare", a, b, format1=fmt1, format2=fmt2, strict=strict)


@pytest.mark.parametrize("strict", [False, True])
def test_compare_sizes(tmp, strict):
    a, b = _pair(tmp, "qcow2", "raw", 1 << 20, 2 << 20)
    same(tmp, "compare", a, b, strict=strict)
    qemu_io("-f", "raw", "-c", "write -P 1 1536k 4k", b)
    same(tmp, "compare", a, b, strict=strict)
    same(tmp, "compare", b, a, strict=strict)


def test_compare_open_errors(tmp):
    a, b = _pair(tmp, "raw", "raw")
    same(tmp, "compare", a, b, format1="qcow2")
    same(tmp, "compare", a, b, format2="qcow2")
    same(tmp, "compare", a, b, format1="nope")
    same(tmp, "compare", a, p(tmp, "missing"))
    same(tmp, "compare", p(tmp, "missing"), b)
    same(tmp, "compare", a, b, format1="", format2="")


def test_compare_read_error(tmp):
    """A compressed cluster whose data does not inflate: qemu-img compare fails reading it (exit 4), which the
    original turns into RuntimeError(stderr)."""
    raw = p(tmp, "s.raw")
    qimg("create", "-f", "raw", raw, "1M")
    qemu_io("-f", "raw", "-c", "write -P 0x33 0 64k", raw)
    c = p(tmp, "c.qcow2")
    qimg("convert", "-c", "-O", "qcow2", raw, c)
    with open(c, "r+b") as f:
        # header -> L1[0] -> L2[0]: a compressed entry (bit 62) whose low 54 bits (cluster_bits 16) are the offset
        f.seek(40)
        l1 = int.from_bytes(f.read(8), "big")
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & 0x00fffffffffffe00
        f.seek(l2)
        entry = int.from_bytes(f.read(8), "big")
        assert entry & (1 << 62)
        offset = entry & ((1 << 54) - 1)
        f.seek(offset)
        f.write(b"\xff" * 64)
    same(tmp, "compare", raw, c)
    same(tmp, "compare", c, raw, format1="qcow2", strict=True)


def test_module_is_python_3_9_and_packaged():
    """The drop-in parses as Python 3.9 and `pip install bindings/python` ships it (pyproject names the
    subpackage)."""
    import ast
    for name in ("__init__.py", "imageio.py"):
        path = os.path.join(BINDINGS, "instar", "compat", name)
        with open(path) as f:
            ast.parse(f.read(), path, feature_version=(3, 9))
    with open(os.path.join(BINDINGS, "pyproject.toml")) as f:
        text = f.read()
    # Either the subpackage by name or setuptools' find over instar.* (test_python_package checks the wheel).
    assert '"instar.compat"' in text or '"instar.*"' in text


def test_image_in_use(tmp):
    """An image a qemu-nbd serves (holding qemu's write lock): every call fails or succeeds as qemu-img's does,
    with its lock message."""
    from conftest import QemuNbd
    img = p(tmp, "busy.qcow2")
    qimg("create", "-f", "qcow2", img, "1M")
    other = p(tmp, "other.qcow2")
    qimg("create", "-f", "qcow2", other, "1M")
    with QemuNbd(img, "qcow2"):
        same(tmp, "info", img)
        same(tmp, "measure", img, "qcow2")
        same(tmp, "compare", img, other)
        same(tmp, "bitmap_add", img, "b0")
        same(tmp, "unsafe_rebase", img, other, "qcow2")
        same(tmp, "convert", img, p(tmp, "copy.raw"), "qcow2", "raw", outputs=[p(tmp, "copy.raw")])
        same(tmp, "create", img, "qcow2", size=1 << 20)
