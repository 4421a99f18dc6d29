"""convert -O raw: output bytes, holes (map of the output), progress records, messages and exit codes equal
qemu-img's."""
import os

import pytest
from conftest import both, convert_both, qemu, qimg, run
from imgs import MiB, chain, qcow2_image, sparse_raw

import instar as pyinstar


def same_convert(tmp, args, src, extra_setup=None):
    """Runs both converters into separate targets and compares rc/stdout/stderr, bytes and map."""
    q, qd, idst = convert_both(tmp, args, src, fmt="raw", setup=extra_setup)
    if q.rc == 0:
        with open(qd, "rb") as a, open(idst, "rb") as b:
            assert a.read() == b.read()
        mq = qemu("map", "--output=json", qd).out
        mi = qemu("map", "--output=json", idst).out.replace(idst, qd)
        assert mi == mq
    return q


@pytest.mark.parametrize("args", [[], ["-O", "raw"], ["-S", "0"], ["-S", "64k"], ["-p"], ["-t", "writeback"],
                                  ["-t", "none"], ["-T", "none"], ["-f", "raw", "-O", "raw"], ["-U"], ["-q", "-p"],
                                  ["-m", "1"], ["-W"]])
def test_convert_sparse_raw(tmp, args):
    p = sparse_raw(tmp)
    same_convert(tmp, args, [p])


def test_convert_multiple_sources(tmp):
    a = sparse_raw(tmp)
    b = os.path.join(tmp, "t.raw")
    with open(b, "wb") as f:
        f.write(os.urandom(1000))
    same_convert(tmp, ["-p"], [a, b, a])


@pytest.mark.parametrize("args", [["-n"], ["-n", "-S", "0"], ["-n", "--target-is-zero"]])
def test_convert_existing_target(tmp, args):
    p = sparse_raw(tmp)
    size = os.path.getsize(p) + 24
    junk = os.urandom(size)

    def setup(dst):
        with open(dst, "wb") as f:
            f.write(junk)
    same_convert(tmp, args, [p], setup)


def test_convert_progress_64m(tmp):
    p = os.path.join(tmp, "big.raw")
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 3):
            f.seek(i * MiB + i * 777)
            f.write(os.urandom(300000 + i * 1000))
        f.seek(40 * MiB)
        f.write(bytes(MiB))
    same_convert(tmp, ["-p"], [p])
    same_convert(tmp, ["-p", "-S", "0"], [p])


@pytest.mark.parametrize("args", [["-m", "17"], ["-m", "abc"], ["-c", "-O", "raw"], ["-O", "foo"], ["-f", "foo"],
                                  ["--target-is-zero"], ["-S", "1000"], ["-S", "100M"], ["-T", "bogus"], ["-x"],
                                  ["-B", "b.raw"], ["-n", "-o", "size=1M"], ["--bitmaps", "-O", "raw"]])
def test_convert_errors(tmp, args):
    p = sparse_raw(tmp)
    same_convert(tmp, args, [p])


def test_convert_error_messages_misc(tmp):
    p = sparse_raw(tmp)
    for argv in (["convert", "s.raw"], ["convert", "nosuch", "x.raw"], ["convert", "-p", "nosuch", "x.raw"],
                 ["convert", "s.raw", "/nonexistent/x.raw"], ["convert", "-n", "s.raw", "nosuchtarget.raw"]):
        q, i = both(*argv, cwd=tmp)
        assert i == q
    small = os.path.join(tmp, "small.raw")
    with open(small, "wb") as f:
        f.truncate(1024)
    q, i = both("convert", "-n", "s.raw", "small.raw", cwd=tmp)
    assert i == q


def test_convert_python(tmp):
    p = sparse_raw(tmp)
    qimg("convert", "-O", "raw", p, os.path.join(tmp, "q.raw"))
    seen = []
    pyinstar.convert(p, os.path.join(tmp, "i.raw"), progress=seen.append)
    assert open(os.path.join(tmp, "q.raw"), "rb").read() == open(os.path.join(tmp, "i.raw"), "rb").read()
    r = qemu("convert", "-p", p, os.path.join(tmp, "q2.raw"))
    recs = [float(x.strip()[1:].split("/")[0]) for x in r.out.splitlines() if x.strip()]
    assert [round(x, 2) for x in seen] == recs
    # Cancelling removes the target the call created.
    dst = os.path.join(tmp, "cancel.raw")
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.convert(p, dst, progress=lambda pct: pct > 1)
    assert e.value.code == -8
    assert not os.path.exists(dst)


def test_convert_qcow2_sources(tmp):
    q, c = qcow2_image(tmp)
    same_convert(tmp, [], [q])
    same_convert(tmp, ["-p"], [c])
    q2, _ = qcow2_image(tmp, "e.qcow2", opts="extended_l2=on")
    same_convert(tmp, [], [q2])


def test_convert_chain(tmp):
    base, mid, top = chain(tmp)
    same_convert(tmp, ["-p"], [top])
    same_convert(tmp, [], [mid])
