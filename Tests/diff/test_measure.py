"""qemu-img measure parity: --size over sizes and option sets, sources, JSON and messages."""
import os

import pytest

from conftest import assert_same, qimg, qemu, qemu_io

SIZES = ["0", "1", "512", "3000000", "64M", "1G", "100G", "1T", "16T"]
OPTS = [[], ["-o", "cluster_size=2M"], ["-o", "cluster_size=512"], ["-o", "extended_l2=on"],
        ["-o", "refcount_bits=64"], ["-o", "refcount_bits=1"], ["-o", "preallocation=full"],
        ["-o", "preallocation=metadata"], ["-o", "preallocation=falloc,cluster_size=4k"], ["-o", "compat=0.10"]]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: ",".join(o) or "default")
def test_measure_size_qcow2(tmp, size, opts):
    assert_same("measure", "--size", size, "-O", "qcow2", *opts, cwd=tmp)
    assert_same("measure", "--size", size, "-O", "qcow2", "--output=json", *opts, cwd=tmp)


@pytest.mark.parametrize("size", SIZES)
def test_measure_size_raw(tmp, size):
    assert_same("measure", "--size", size, cwd=tmp)
    assert_same("measure", "--size", size, "-O", "raw", "--output=json", cwd=tmp)


def make_raw_source(tmp):
    p = os.path.join(tmp, "src.raw")
    qimg("create", "-q", "-f", "raw", p, "64M")
    qemu_io("-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -P 2 10M 100k", "-c", "write -P 3 40000k 7k", p)
    return p


@pytest.mark.parametrize("opts", OPTS[:6], ids=lambda o: ",".join(o) or "default")
def test_measure_raw_source(tmp, opts):
    make_raw_source(tmp)
    for out in ("human", "json"):
        assert_same("measure", "-O", "qcow2", "--output=" + out, *opts, "src.raw", cwd=tmp)
        assert_same("measure", "-f", "raw", "-O", "raw", "--output=" + out, "src.raw", cwd=tmp)
    assert_same("measure", "-O", "qcow2", "-o", "backing_file=x", "src.raw", cwd=tmp)


ERRORS = [
    [], ["--size", "1G", "x.raw"], ["a", "b"], ["--size", "1x"], ["--size", "8E"], ["--output=xml", "--size", "1"],
    ["-O", "qcow2", "-o", "foo=1", "--size", "1M"], ["-O", "qcow2", "-o", "cluster_size=3k", "--size", "1M"],
    ["-O", "qcow2", "-o", "compat=9", "--size", "1M"], ["-O", "qcow2", "-o", "preallocation=bad", "--size", "1M"],
    ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1M"], ["-f", "raw", "--size", "1M"],
    ["-O", "nosuch", "--size", "1M"], ["-O", "qcow2", "-o", "", "--size", "1M"], ["missing.raw"],
]


@pytest.mark.parametrize("args", ERRORS, ids=lambda a: " ".join(a) or "none")
def test_measure_errors(tmp, args):
    open(os.path.join(tmp, "x.raw"), "wb").close()
    assert_same("measure", *args, cwd=tmp)


def test_python_measure(tmp):
    import instar
    r = instar.measure(out_fmt="qcow2", size=1 << 30)
    q = qemu("measure", "--output=json", "-O", "qcow2", "--size", "1G")
    import json
    assert r == json.loads(q.out)


def make_qcow2_sources(tmp):
    s = os.path.join(tmp, "s.qcow2")
    qimg("create", "-q", "-f", "qcow2", s, "64M")
    qemu_io("-c", "write -P 1 0 1M", "-c", "write -P 2 10M 100k", "-c", "write -z 20M 1M", s)
    qimg("bitmap", "--add", s, "b0")
    qimg("bitmap", "--add", "-g", "512", s, "a_long_bitmap_name")
    v2 = os.path.join(tmp, "v2.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "64M")
    qemu_io("-c", "write -P 1 0 3M", v2)
    qimg("snapshot", "-c", "sn", v2)
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "s.qcow2", "-F", "qcow2", top)
    qemu_io("-c", "write -P 5 30M 1M", top)
    qimg("convert", "-c", "-O", "qcow2", s, os.path.join(tmp, "comp.qcow2"))
    return ["s.qcow2", "v2.qcow2", "top.qcow2", "comp.qcow2"]


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=512"], ["-o", "compat=0.10"],
                                  ["-o", "preallocation=full"], ["-o", "backing_file=x"]],
                         ids=lambda o: ",".join(o) or "default")
def test_measure_qcow2_source(tmp, opts):
    for src in make_qcow2_sources(tmp):
        for out in ("human", "json"):
            assert_same("measure", "-O", "qcow2", "--output=" + out, *opts, src, cwd=tmp)
        assert_same("measure", "--output=json", src, cwd=tmp)
