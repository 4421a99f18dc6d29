"""qemu's small drivers that scripts and benchmarks use, against qemu-img 7.2: null-co and null-aio (a device that
holds nothing: `null-co://`, `json:{"driver": "null-co", ...}`, --image-opts; size, read-zeroes, latency-ns) and
the file protocol driver used as a format (`-f file`)."""
import json
import os

import pytest

from conftest import assert_same, both, qemu, instar, qimg, qemu_io

NULL_NAMES = [
    "null-co://",
    "null-aio://",
    'json:{"driver": "null-co", "size": 1048576}',
    'json:{"driver": "null-aio", "size": "1M", "latency-ns": 100}',
    'json:{"driver": "null-co", "size": 1000}',
    'json:{"driver": "null-co", "size": 4194304, "read-zeroes": true}',
    'json:{"driver": "null-aio", "read-zeroes": false}',
    'json:{"driver": "null-co", "latency-ns": 5}',
    'json:{"driver": "null-co"}',
]


@pytest.mark.parametrize("name", NULL_NAMES)
@pytest.mark.parametrize("cmd", [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"]],
                         ids=lambda c: "-".join(c))
def test_null_read_commands(tmp, name, cmd):
    assert_same(*cmd, name, cwd=tmp)


@pytest.mark.parametrize("name", ["null-co://", "null-aio://"])
@pytest.mark.parametrize("cmd", [["info", "-f", "raw"], ["map", "--output=json", "-f", "raw"], ["info", "-f", "null-co"],
                                 ["info", "-f", "null-aio"], ["info", "-f", "qcow2"], ["check", "-f", "null-aio"]],
                         ids=lambda c: "-".join(c))
def test_null_url_with_format(tmp, name, cmd):
    assert_same(*cmd, name, cwd=tmp)


@pytest.mark.parametrize("opts", ["driver=null-co", "driver=null-co,size=2M,read-zeroes=on",
                                  "driver=null-aio,size=1000", "driver=null-co,latency-ns=100",
                                  "driver=null-co,latency-ns=-1", "driver=null-co,bogus=1",
                                  "driver=null-aio,read-zeroes=off,size=64k"])
@pytest.mark.parametrize("cmd", [["info"], ["info", "--output=json"], ["map", "--output=json"]],
                         ids=lambda c: "-".join(c))
def test_null_image_opts(tmp, opts, cmd):
    assert_same(*cmd, "--image-opts", opts, cwd=tmp)


@pytest.mark.parametrize("args", [
    ["info", "-f", "null-co", "x"],
    ["info", "null-co://x"],
    ["info", "-f", "null-aio", "null-co://"],
    ["resize", "-f", "null-co", "null-co://", "2G"],
    ["create", "-f", "null-co", "null-co://", "1M"],
    ["create", "-f", "null-aio", "x", "1M"],
    ["create", "-f", "raw", "null-co://", "1M"],
    ["create", "-f", "qcow2", "null-co://", "1M"],
    ["create", "-f", "qcow2", "null-aio://", "1M"],
    ["measure", "-O", "null-co", "--size", "1G"],
    ["measure", "-O", "qcow2", "null-co://"],
    ["measure", "-O", "raw", "--output=json", 'json:{"driver": "null-co", "size": 1048576}'],
    ["compare", "null-co://", 'json:{"driver": "null-co", "read-zeroes": true}'],
    ["compare", "-s", "null-aio://", 'json:{"driver": "null-co", "read-zeroes": true}'],
], ids=lambda a: " ".join(a))
def test_null_messages(tmp, args):
    assert_same(*args, cwd=tmp)


def source(tmp):
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", src, "8M")
    qemu_io("-f", "qcow2", "-c", "write -P 7 1M 1M", "-c", "write -z 4M 64k", src)
    return src


@pytest.mark.parametrize("args", [
    ["-n", "SRC", "null-co://"],
    ["-n", "-O", "raw", "SRC", "null-co://"],
    ["-n", "-O", "null-co", "SRC", "null-co://"],
    ["-n", "-O", "null-aio", "SRC", "null-aio://"],
    ["-n", "-p", "SRC", "null-co://"],
    ["-n", "-t", "none", "SRC", "null-co://"],
    ["-n", "--target-image-opts", "SRC", "driver=null-co,size=8M"],
    ["-O", "raw", "SRC", "null-co://"],
    ["-O", "qcow2", "SRC", "null-aio://"],
    ["-O", "null-co", "SRC", "null-co://"],
    ["-O", "null", "SRC", "null-co://"],
], ids=lambda a: " ".join(a))
def test_convert_to_null(tmp, args):
    src = source(tmp)
    q, i = both("convert", *[a if a != "SRC" else src for a in args], cwd=tmp)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (q, i)


@pytest.mark.parametrize("name", ["null-co://", 'json:{"driver": "null-aio", "size": 3145728, "read-zeroes": true}'])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_from_null(tmp, name, fmt):
    outs = {}
    for tool, run in (("q", qemu), ("i", instar)):
        out = os.path.join(tmp, f"{tool}.{fmt}")
        r = run("convert", "-O", fmt, name, out, cwd=tmp)
        assert r.rc == 0 and r.out == "" and r.err == "", r
        outs[tool] = out
    assert_same("compare", outs["q"], outs["i"], cwd=tmp)
    q, i = (qemu("map", "--output=json", outs[t]) for t in "qi")
    assert q.out.replace(outs["q"], "X") == i.out.replace(outs["i"], "X")
    if fmt == "qcow2":
        with open(outs["q"], "rb") as a, open(outs["i"], "rb") as b:
            assert a.read() == b.read()


def test_null_in_help_formats():
    line = [x for x in instar("--help").out.splitlines() if x.startswith("Supported formats:")][0]
    assert {"file", "null-co", "null-aio"} <= set(line.split()[2:])


# The file driver as a format.

@pytest.mark.parametrize("args", [
    ["create", "-f", "file", "F", "1M"],
    ["create", "-f", "file", "F", "1000"],
    ["create", "-f", "file", "F"],
    ["create", "-f", "file", "-o", "preallocation=falloc", "F", "1M"],
    ["create", "-f", "file", "-o", "preallocation=full", "F", "64k"],
    ["create", "-f", "file", "-o", "size=2M,nocow=on", "F"],
    ["create", "-f", "file", "-o", "extent_size_hint=0", "F", "1M"],
    ["create", "-f", "file", "-o", "preallocation=metadata", "F", "1M"],
    ["create", "-f", "file", "-o", "cluster_size=4k", "F", "1M"],
    ["create", "-f", "file", "-b", "base.qcow2", "-F", "qcow2", "F", "1M"],
    ["create", "-f", "file", "-o", "help", "F"],
], ids=lambda a: " ".join(a[1:]))
def test_create_file(tmp, args):
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "base.qcow2"), "1M")
    results = []
    for tool, name in ((qemu, "q.file"), (instar, "i.file")):
        r = tool(*[a if a != "F" else name for a in args], cwd=tmp)
        results.append((r.rc, r.out.replace(name, "F"), r.err.replace(name, "F")))
    assert results[1] == results[0]
    q, i = os.path.join(tmp, "q.file"), os.path.join(tmp, "i.file")
    if results[0][0] == 0 and os.path.exists(q):
        assert os.path.getsize(i) == os.path.getsize(q)
        with open(q, "rb") as a, open(i, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("cmd", [["info", "-f", "file"], ["info", "--output=json", "-f", "file"],
                                 ["map", "--output=json", "-f", "file"], ["map", "-f", "file"],
                                 ["check", "-f", "file"], ["compare", "-f", "file", "-F", "raw", "X"],
                                 ["info", "--image-opts", "driver=file,filename=X"]],
                         ids=lambda c: "-".join(c))
def test_file_format_read(tmp, cmd):
    path = os.path.join(tmp, "d.raw")
    with open(path, "wb") as f:
        f.write(b"\x01" * 70000)
        f.truncate(3 * 1024 * 1024 + 100)
    args = [a.replace("X", "d.raw") if "X" in a else a for a in cmd]
    if "--image-opts" not in cmd:
        args.append("d.raw")
    assert_same(*args, cwd=tmp)


@pytest.mark.parametrize("args", [["convert", "-O", "file", "SRC", "OUT"], ["convert", "-f", "file", "-O", "raw", "RAW", "OUT"],
                                  ["resize", "-f", "file", "OUT0", "5M"], ["resize", "-f", "file", "--shrink", "OUT0", "1M"],
                                  ["resize", "-f", "file", "OUT0", "+100"]],
                         ids=lambda a: " ".join(a[:3]))
def test_file_format_write(tmp, args):
    src = source(tmp)
    raw = os.path.join(tmp, "r.raw")
    qimg("convert", "-O", "raw", src, raw)
    outs = []
    for tool, name in ((qemu, "q.out"), (instar, "i.out")):
        path = os.path.join(tmp, name)
        qimg("create", "-q", "-f", "raw", path, "2M")
        argv = [{"SRC": src, "RAW": raw, "OUT": path, "OUT0": path}.get(a, a) for a in args]
        r = tool(*argv, cwd=tmp)
        outs.append((r.rc, r.out, r.err.replace(path, "OUT"), path))
    assert outs[1][:3] == outs[0][:3]
    with open(outs[0][3], "rb") as a, open(outs[1][3], "rb") as b:
        assert a.read() == b.read()
    assert json.loads(qemu("info", "--output=json", outs[1][3]).out)["virtual-size"] == \
        json.loads(qemu("info", "--output=json", outs[0][3]).out)["virtual-size"]
