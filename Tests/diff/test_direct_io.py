"""O_DIRECT (cache.direct=on, -t/-T none) on raw files whose length is not a multiple of 512, against qemu-img 7.2:
block status works in whole sectors then, so data reaching the end of the file covers the last partial sector."""
import os

import pytest

from conftest import assert_same, qemu, instar

LENGTHS = [1, 511, 513, 1000, 4095, 4097, 65535, 65537, 131071, 1048575]


def make(tmp, length, layout):
    path = os.path.join(tmp, "odd.raw")
    with open(path, "wb") as f:
        if layout == "data":
            f.write(bytes((i * 7 + 1) & 0xFF or 1 for i in range(length)))
        elif layout == "hole_then_data":
            f.truncate(length)
            tail = min(length, 3000)
            f.seek(length - tail)
            f.write(b"\x5a" * tail)
        elif layout == "data_then_hole":
            f.write(b"\x33" * min(length, 8192))
            f.truncate(length + (1 << 20) if length > 8192 else length)
        else:
            f.truncate(length)
    return path


def spec(path, direct="on"):
    return f"driver=raw,file.filename={path},cache.direct={direct}"


@pytest.mark.parametrize("layout", ["data", "hole_then_data", "data_then_hole", "sparse"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("cmd", [["map", "--output=json"], ["map"], ["info"], ["info", "--output=json"],
                                 ["map", "--output=json", "--start-offset=512"]],
                         ids=lambda c: "-".join(c))
def test_read_commands(tmp, layout, length, cmd):
    path = make(tmp, length, layout)
    assert_same(*cmd, "--image-opts", spec(path), cwd=tmp)


@pytest.mark.parametrize("layout", ["data", "hole_then_data", "sparse"])
@pytest.mark.parametrize("length", LENGTHS)
def test_compare_and_convert(tmp, layout, length):
    path = make(tmp, length, layout)
    assert_same("compare", "--image-opts", spec(path), spec(path), cwd=tmp)
    assert_same("compare", "-T", "none", "-f", "raw", "-F", "raw", path, path, cwd=tmp)
    for fmt in ("raw", "qcow2"):
        outs = []
        for tool, name in ((qemu, "q"), (instar, "i")):
            out = os.path.join(tmp, f"{name}.{fmt}")
            r = tool("convert", "-T", "none", "-t", "none", "-f", "raw", "-O", fmt, path, out, cwd=tmp)
            outs.append((r.rc, r.out, r.err.replace(out, "OUT"), out))
        (qrc, qo, qe, qout), (irc, io, ie, iout) = outs
        assert (irc, io, ie) == (qrc, qo, qe)
        if qrc == 0:
            assert_same("compare", qout, iout, cwd=tmp)
            assert_same("map", "--output=json", "--image-opts", spec(iout) if fmt == "raw" else
                        f"driver=qcow2,file.filename={iout},cache.direct=on", cwd=tmp)
            assert os.path.getsize(qout) == os.path.getsize(iout)
