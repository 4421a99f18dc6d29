"""Writing qcow2 images with an external data file (qcow2.txt "External data file"): convert into such a target,
guest writes / zero writes / discards through the Python binding, and amend of the data file name. Each case runs
qemu-img / qemu-io in one directory and instar in another with the same relative names, so the qcow2 files and
the data files can be compared byte for byte."""
import json
import os
import shutil

import pytest
from conftest import INSTAR, qimg, run
from imgs import MiB
from test_convert_qcow2 import mixed_raw
from test_qcow2_write import apply_instar, apply_qemu, make_ops

import instar


def two_dirs(tmp):
    q, i = os.path.join(tmp, "q"), os.path.join(tmp, "i")
    os.makedirs(q)
    os.makedirs(i)
    return q, i


def same_in_dirs(q, i, args):
    """Runs qemu-img in `q` and instar in `i` with the same arguments; exit codes and messages must match."""
    rq = run(["qemu-img", *args], cwd=q)
    ri = run([INSTAR, *args], cwd=i)
    assert (rq.rc, rq.err.replace("qemu-img", "instar")) == (ri.rc, ri.err)
    return rq


def same_files(q, i, names):
    for n in names:
        with open(os.path.join(q, n), "rb") as a, open(os.path.join(i, n), "rb") as b:
            assert a.read() == b.read(), n


def replay_both(q, i, ops):
    """The same operations on t.qcow2 through the binding in `i` and through qemu-io in `q`, each run from its
    directory (qemu opens a relative data file name against the working directory); then the instar copy is
    clean, reads as qemu's and has the same data file."""
    cwd = os.getcwd()
    try:
        os.chdir(i)
        apply_instar("t.qcow2", ops)
        os.chdir(q)
        apply_qemu("t.qcow2", ops, q)
    finally:
        os.chdir(cwd)
    check_clean(i, "t.qcow2")
    cmp = run(["qemu-img", "compare", os.path.join(q, "t.qcow2"), os.path.join(i, "t.qcow2")], cwd=i)
    assert cmp.rc == 0, cmp
    same_files(q, i, ["t.data"])


def check_clean(d, name):
    c = run(["qemu-img", "check", name], cwd=d)
    assert c.rc == 0 and "No errors were found" in c.out and "leaked" not in c.out, c


def info(d, name):
    j = json.loads(qimg("info", "--output=json", name, cwd=d).out)
    j.pop("actual-size", None)
    return j


@pytest.mark.parametrize("opts", [
    "data_file=t.data",
    "data_file=t.data,data_file_raw=on",
    "data_file=t.data,cluster_size=4096",
    "data_file=t.data,extended_l2=on",
    "data_file=t.data,data_file_raw=on,extended_l2=on,cluster_size=16384",
    "data_file=t.data,preallocation=metadata",
    "data_file=t.data,preallocation=full",
])
def test_convert(tmp, opts):
    src = mixed_raw(tmp)
    q, i = two_dirs(tmp)
    args = ["convert", "-O", "qcow2", "-o", opts, src, "t.qcow2"]
    rq = same_in_dirs(q, i, args)
    assert rq.rc == 0
    check_clean(i, "t.qcow2")
    same_files(q, i, ["t.qcow2", "t.data"])
    assert info(q, "t.qcow2") == info(i, "t.qcow2")
    assert run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, os.path.join(i, "t.qcow2")], cwd=i).rc == 0


def test_convert_compressed_refused(tmp):
    src = mixed_raw(tmp)
    q, i = two_dirs(tmp)
    args = ["convert", "-c", "-O", "qcow2", "-o", "data_file=t.data", src, "t.qcow2"]
    rq = same_in_dirs(q, i, args)
    assert rq.rc != 0
    same_files(q, i, ["t.qcow2", "t.data"])


@pytest.mark.parametrize("raw", ["off", "on"])
def test_convert_existing_target(tmp, raw):
    """convert -n into an image that already has a data file (and old contents)."""
    src = mixed_raw(tmp)
    size = os.path.getsize(src)
    q, i = two_dirs(tmp)
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file=t.data,data_file_raw={raw}", "t.qcow2", str(size), cwd=q)
    assert run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 6M", "t.qcow2"], cwd=q).rc == 0
    for n in ("t.qcow2", "t.data"):
        shutil.copy(os.path.join(q, n), os.path.join(i, n))
    args = ["convert", "-n", "-O", "qcow2", src, "t.qcow2"]
    rq = same_in_dirs(q, i, args)
    assert rq.rc == 0
    check_clean(i, "t.qcow2")
    same_files(q, i, ["t.qcow2", "t.data"])


def test_binding_writes_with_backing(tmp):
    """Copy-on-write from a backing file into the data file."""
    q, i = two_dirs(tmp)
    size = 3 * MiB
    for d in (q, i):
        qimg("create", "-q", "-f", "qcow2", "b.qcow2", str(size), cwd=d)
        assert run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 3M", "b.qcow2"], cwd=d).rc == 0
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2",
         str(size), cwd=q)
    for n in ("t.qcow2", "t.data"):
        shutil.copy(os.path.join(q, n), os.path.join(i, n))
    ops = make_ops(5, size, 65536, count=60)
    replay_both(q, i, ops)


@pytest.mark.parametrize("raw", ["off", "on"])
@pytest.mark.parametrize("extra", ["", ",cluster_size=4096", ",extended_l2=on", ",preallocation=metadata"])
def test_binding_writes(tmp, raw, extra):
    if raw == "on" and "preallocation" in extra:
        pytest.skip("data_file_raw already implies preallocated metadata")
    q, i = two_dirs(tmp)
    size = 4 * MiB + 512
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file=t.data,data_file_raw={raw}{extra}", "t.qcow2", str(size),
         cwd=q)
    qemu_ops = make_ops(11, size, 4096 if "4096" in extra else 65536, count=80)
    # Seed data with qemu-io, then copy both files to the other directory.
    assert run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 1M", "t.qcow2"], cwd=q).rc == 0
    for n in ("t.qcow2", "t.data"):
        shutil.copy(os.path.join(q, n), os.path.join(i, n))
    replay_both(q, i, qemu_ops)
    assert info(q, "t.qcow2") == info(i, "t.qcow2")


@pytest.mark.parametrize("raw", ["off", "on"])
@pytest.mark.parametrize("opts", ["data_file=new.data", "data_file=new.data,data_file_raw=off", "data_file_raw=off",
                                  "data_file=", "data_file_raw=on"])
def test_amend(tmp, raw, opts):
    q, i = two_dirs(tmp)
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file=a.data,data_file_raw={raw}", "a.qcow2", "4M", cwd=q)
    assert run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "a.qcow2"], cwd=q).rc == 0
    for n in ("a.qcow2", "a.data"):
        shutil.copy(os.path.join(q, n), os.path.join(i, n))
    rq = run(["qemu-img", "amend", "-o", opts, "a.qcow2"], cwd=q)
    ri = run([INSTAR, "amend", "-o", opts, "a.qcow2"], cwd=i)
    assert (rq.rc, rq.out, rq.err.replace("qemu-img", "instar")) == (ri.rc, ri.out, ri.err)
    same_files(q, i, ["a.qcow2", "a.data"])


@pytest.mark.parametrize("ext", ["", ",extended_l2=on"])
@pytest.mark.parametrize("raw", ["off", "on"])
@pytest.mark.parametrize("size,pre", [("12M", ""), ("9000448", ""), ("9000448", "--preallocation=metadata"),
                                      ("12M", "--preallocation=full"), ("2M", ""), ("7000064", "")])
def test_resize(tmp, ext, raw, size, pre):
    """qcow2_co_truncate resizes the data file too (a raw one grows with metadata preallocation)."""
    q, i = two_dirs(tmp)
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file=t.data,data_file_raw={raw}{ext}", "t.qcow2", "8M", cwd=q)
    assert run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 5M", "t.qcow2"], cwd=q).rc == 0
    for n in ("t.qcow2", "t.data"):
        shutil.copy(os.path.join(q, n), os.path.join(i, n))
    args = ["resize"] + (["--shrink"] if size in ("2M", "7000064") else []) + ([pre] if pre else []) + ["t.qcow2", size]
    rq = run(["qemu-img", *args], cwd=q)
    ri = run([INSTAR, *args], cwd=i)
    assert (rq.rc, rq.out, rq.err.replace("qemu-img", "instar")) == (ri.rc, ri.out, ri.err)
    assert rq.rc == 0
    same_files(q, i, ["t.qcow2", "t.data"])
