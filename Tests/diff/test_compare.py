"""compare: messages, offsets and exit codes equal qemu-img's across raw, qcow2 and chains."""
import os

import pytest
from conftest import assert_same, qemu, qimg
from imgs import MiB, chain, qcow2_image, sparse_raw

import instar as pyinstar


def variants(tmp):
    sparse_raw(tmp)
    qimg("convert", "-O", "raw", os.path.join(tmp, "s.raw"), os.path.join(tmp, "same.raw"))
    with open(os.path.join(tmp, "s.raw"), "rb") as f:
        data = bytearray(f.read())
    def put(name, content, size=None):
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(content)
            if size:
                f.truncate(size)
    d = bytearray(data); d[MiB + 5000] ^= 1; put("diff.raw", d)
    put("bigger0.raw", data, 4 * MiB)
    d = bytearray(data) + bytearray(MiB); d[len(data) + 600000] = 7; put("bigger1.raw", d)
    d = bytearray(data); d[0:4096] = bytes(4096); put("zeros.raw", d)
    d = bytearray(data); d[1000] = 1; put("first.raw", d)


@pytest.mark.parametrize("args", [["s.raw", "same.raw"], ["s.raw", "diff.raw"], ["-s", "s.raw", "bigger0.raw"],
                                  ["s.raw", "bigger0.raw"], ["s.raw", "bigger1.raw"], ["bigger1.raw", "s.raw"],
                                  ["-q", "s.raw", "diff.raw"], ["-p", "s.raw", "diff.raw"], ["-p", "s.raw", "same.raw"],
                                  ["-s", "s.raw", "zeros.raw"], ["s.raw", "zeros.raw"], ["s.raw", "first.raw"],
                                  ["-f", "raw", "-F", "raw", "s.raw", "same.raw"], ["-U", "s.raw", "same.raw"],
                                  ["s.raw", "nosuch"], ["s.raw"], ["-T", "bad", "s.raw", "s.raw"], ["-x", "a", "b"],
                                  ["-f", "foo", "s.raw", "s.raw"]])
def test_compare_raw(tmp, args):
    variants(tmp)
    assert_same("compare", *args, cwd=tmp)


def test_compare_progress_64m(tmp):
    p = os.path.join(tmp, "big.raw")
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 3):
            f.seek(i * MiB + i * 777)
            f.write(os.urandom(300000))
    assert_same("compare", "-p", "big.raw", "big.raw", cwd=tmp)


def test_compare_python(tmp):
    variants(tmp)
    r = pyinstar.compare(os.path.join(tmp, "s.raw"), os.path.join(tmp, "diff.raw"))
    q = qemu("compare", "s.raw", "diff.raw", cwd=tmp)
    assert r["message"] == q.out and not r["identical"]
    seen = []
    r = pyinstar.compare(os.path.join(tmp, "s.raw"), os.path.join(tmp, "same.raw"), progress=seen.append)
    assert r["identical"] and seen[0] == 0.0 and seen[-1] == 100.0


def test_compare_qcow2_and_chain(tmp):
    q, c = qcow2_image(tmp)
    qimg("convert", "-O", "raw", q, os.path.join(tmp, "q.raw"))
    base, mid, top = chain(tmp)
    qimg("convert", "-O", "raw", top, os.path.join(tmp, "top.raw"))
    for args in (["q.qcow2", "q.raw"], ["c_q.qcow2", "q.qcow2"], ["-s", "q.qcow2", "q.raw"], ["top.qcow2", "top.raw"],
                 ["top.qcow2", "mid.qcow2"], ["-s", "top.qcow2", "top.raw"], ["mid.qcow2", "base.raw"]):
        assert_same("compare", *args, cwd=tmp)
