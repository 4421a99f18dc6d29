"""instar_bitmap / instar_dd through the C ABI (Tests/capi/bitmapdd_test.c, built with -pedantic -Werror) and
through the Python binding, with every resulting file compared byte for byte with what qemu-img makes of the
same commands."""
import os
import re
import shutil

import pytest

import instar as pyinstar
from conftest import LIBINSTAR, ROOT, qemu, qimg, run
from test_bitmap_writes import build

SOURCE = os.path.join(ROOT, "Tests", "capi", "bitmapdd_test.c")


def make_inputs(d):
    os.makedirs(d)
    build(d, "x", size="64M", bitmaps=(("b1",), ("b2", "-g", "128k")), after=["write 1M 3M", "write 40M 64k"])
    build(d, "s", opts="cluster_size=4k", size="64M", bitmaps=(("sb", "-g", "8k"),), after=["write 9M 2M"])
    qimg("create", "-q", "-f", "qcow2", os.path.join(d, "in.qcow2"), "10M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", "-c", "write -P 9 5M 100k",
         os.path.join(d, "in.qcow2")])


def qemu_reference(d, failing):
    """What qemu-img makes of the calls the C program and the Python test make. `failing` are the bitmap
    calls on x.qcow2 that fail after opening it (the image is still stored again at close)."""
    x, s, i = (os.path.join(d, n) for n in ("x.qcow2", "s.qcow2", "in.qcow2"))
    steps = [["bitmap", "--add", "-g", "4096", "--merge", "b1", "--disable", x, "nb"],
             ["bitmap", "--merge", "sb", "-b", s, "-F", "qcow2", x, "nb"],
             ["bitmap", "--remove", x, "b2"]]
    for a in steps:
        r = qemu(*a)
        assert r.rc == 0, r
    for a in failing:
        r = qemu("bitmap", a[0], x, a[1])
        assert r.rc == 1, r
    for a in (["dd", "-O", "qcow2", "bs=65536", "count=100", f"if={i}", f"of={d}/dd.qcow2"],
              ["dd", "skip=3", "bs=1M", f"if={i}", f"of={d}/dd.raw"]):
        r = qemu(*a)
        assert r.rc == 0, r


def same_files(a, b, names):
    for n in names:
        assert open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read(), n


def test_c_abi(tmp):
    exe = os.path.join(tmp, "bitmapdd_test")
    r = run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", SOURCE,
             "-I", os.path.join(ROOT, "include"), "-L", os.path.dirname(LIBINSTAR), "-linstar",
             "-Wl,-rpath," + os.path.dirname(LIBINSTAR), "-o", exe])
    assert r.rc == 0, r
    ours, ref = os.path.join(tmp, "ours"), os.path.join(tmp, "ref")
    make_inputs(ours)
    shutil.copytree(ours, ref)
    r = run([exe, ours])
    assert r.rc == 0 and r.err == "", r
    lines = dict(line.split(" ", 1) for line in r.out.splitlines())
    assert lines["bitmap-add-merge"] == "0 0 "
    assert lines["bitmap-merge-source"] == "0 0 "
    assert lines["bitmap-remove"] == "0 0 "
    assert lines["bitmap-remove-again"] == "-3 -3 Operation remove on bitmap b2 failed: Dirty bitmap 'b2' not found"
    assert lines["bitmap-add-exists"] == "-1 -1 Operation add on bitmap b1 failed: Bitmap already exists: b1"
    assert lines["bitmap-none"].startswith("-1 -1 Need at least one of --add")
    assert lines["dd-qcow2"] == "0 0 " and lines["dd-raw-skip"] == "0 0 "
    assert lines["dd-cancel"].startswith("-8 -8 ")
    assert lines["dd-bad-bs"] == "-1 -1 Invalid bs specified. Must be between 1 and 2147483647."
    assert lines["progress-calls"] == "1"
    qemu_reference(ref, [["--remove", "b2"], ["--add", "b1"]])
    same_files(ours, ref, ["x.qcow2", "s.qcow2", "dd.qcow2", "dd.raw"])


def test_python(tmp):
    ours, ref = os.path.join(tmp, "ours"), os.path.join(tmp, "ref")
    make_inputs(ours)
    shutil.copytree(ours, ref)
    x, s, i = (os.path.join(ours, n) for n in ("x.qcow2", "s.qcow2", "in.qcow2"))
    pyinstar.bitmap(x, "nb", "add", ("merge", "b1"), "disable", granularity=4096)
    pyinstar.bitmap(x, "nb", ("merge", "sb"), source=s, source_fmt="qcow2")
    pyinstar.bitmap(x, "b2", "remove")
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.bitmap(x, "b2", "clear")
    assert e.value.message == "Operation clear on bitmap b2 failed: Dirty bitmap 'b2' not found"
    seen = []
    pyinstar.dd(i, os.path.join(ours, "dd.qcow2"), out_fmt="qcow2", bs=65536, count=100,
                progress=lambda p: seen.append(p))
    assert seen and seen[-1] == 100.0
    pyinstar.dd(i, os.path.join(ours, "dd.raw"), skip=3, bs=1 << 20)
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.dd(i, os.path.join(ours, "c.raw"), bs=4096, progress=lambda p: p > 10)
    assert e.value.code == -8
    qemu_reference(ref, [["--clear", "b2"]])
    same_files(ours, ref, ["x.qcow2", "s.qcow2", "dd.qcow2", "dd.raw"])
