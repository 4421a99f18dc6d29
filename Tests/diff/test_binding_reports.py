"""instar_check_report and instar_create_formatting through the Python binding, against qemu-img on the same
images: the check's counters, JSON text and stderr lines (clean, leaking, corrupt images, and with repair), and
the "Formatting ..." line of create for several formats and options."""
import os
import subprocess

import pytest

from compat_helpers import leak_one_cluster, mk_qcow2, zero_l1_refcount
from conftest import qimg

import instar


def qemu_raw(*args):
    """qemu-img's exit status, stdout and stderr, as it prints them (not renamed)."""
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=600, check=False)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("kind", ["clean", "leaks", "corrupt", "leaks-repaired"])
def test_check_report(tmp, kind):
    path = mk_qcow2(tmp)
    if kind.startswith("leaks"):
        leak_one_cluster(path)
    elif kind == "corrupt":
        zero_l1_refcount(path)
    repair = "leaks" if kind == "leaks-repaired" else None
    twin = os.path.join(tmp, "twin.qcow2")
    with open(path, "rb") as a, open(twin, "wb") as b:
        b.write(a.read())
    rc, out, err = qemu_raw("check", "--output=json", *(["-r", repair] if repair else []), twin)
    result, json_text, messages = instar.check_report(path, repair=repair)
    assert result.exit_code == rc
    assert json_text == out.replace(twin, path)
    assert messages == err.replace(twin, path)
    if kind != "clean":
        assert err  # the case does print findings


@pytest.mark.parametrize("fmt,size,opts", [
    ("raw", 1 << 20, {}), ("qcow2", 1 << 20, {}), ("qcow2", 3 << 30, {"cluster_size": 4096, "compat": "0.10"}),
    ("qcow2", 1 << 20, {"preallocation": "metadata", "lazy_refcounts": "on"}),
    ("raw", 4096, {"preallocation": "full"})])
def test_create_formatting(tmp, fmt, size, opts):
    q, i = os.path.join(tmp, "q.img"), os.path.join(tmp, "i.img")
    argv = ["create", "-f", fmt] + (["-o", ",".join("%s=%s" % kv for kv in opts.items())] if opts else [])
    rc, out, err = qemu_raw(*argv, q, str(size))
    assert rc == 0, err
    line = instar.create_formatting(i, fmt, size, **opts)
    assert line == out.replace(q, i)


def test_create_formatting_errors(tmp):
    with pytest.raises(instar.InstarError) as e:
        instar.create_formatting(os.path.join(tmp, "x.img"), "no-such-format", 1024)
    assert getattr(e.value, "output", None) is None  # failed before qemu-img would print the line
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "1M")
    line = instar.create_formatting(os.path.join(tmp, "top.qcow2"), "qcow2", backing_file=base,
                                    backing_format="qcow2")
    assert line.startswith("Formatting '%s', fmt=qcow2 " % os.path.join(tmp, "top.qcow2"))
