"""map: instar's human and JSON output, errors and exit codes equal qemu-img's; the C API/Python equal its JSON."""
import json
import os

import pytest
from conftest import assert_same, qemu
from imgs import chain, qcow2_image, sparse_raw

import instar as pyinstar


@pytest.mark.parametrize("args", [[], ["--output=json"], ["--output=human"], ["--start-offset", "1000"],
                                  ["--output=json", "--start-offset", "1000", "--max-length", "7000"],
                                  ["--output=json", "--start-offset", "64M"], ["-f", "raw", "--output=json"],
                                  ["-U", "--output=json"], ["--output=json", "--max-length", "0x1000"]])
def test_map_sparse_raw(tmp, args):
    sparse_raw(tmp)
    assert_same("map", *args, "s.raw", cwd=tmp)


def test_map_tiny_and_empty(tmp):
    with open(os.path.join(tmp, "t.raw"), "wb") as f:
        f.write(b"x" * 1000)
    open(os.path.join(tmp, "e.raw"), "wb").close()
    for name in ("t.raw", "e.raw"):
        assert_same("map", "--output=json", name, cwd=tmp)
        assert_same("map", name, cwd=tmp)


def test_map_json_and_image_opts(tmp):
    sparse_raw(tmp)
    assert_same("map", '--output=json', 'json:{"driver":"raw","file":{"driver":"file","filename":"s.raw"}}', cwd=tmp)
    assert_same("map", '--output=json',
                'json:{"driver":"raw","offset":4096,"size":1048576,"file":{"driver":"file","filename":"s.raw"}}',
                cwd=tmp)
    assert_same("map", "--image-opts", "driver=raw,file.filename=s.raw", cwd=tmp)
    assert_same("map", "--image-opts", "-f", "raw", "driver=raw,file.filename=s.raw", cwd=tmp)


@pytest.mark.parametrize("args", [["--output=xml", "s.raw"], [], ["a", "b"], ["-x", "s.raw"], ["--start-offset"],
                                  ["--start-offset", "abc", "s.raw"], ["--max-length", "99999999999999999999", "s.raw"],
                                  ["nosuch.raw"], ["-f", "foo", "s.raw"], ["-f", "qcow2", "s.raw"]])
def test_map_errors(tmp, args):
    sparse_raw(tmp)
    assert_same("map", *args, cwd=tmp)


def test_map_python_equals_qemu_json(tmp):
    p = sparse_raw(tmp)
    q = json.loads(qemu("map", "--output=json", p).out)
    assert pyinstar.map(p) == q
    q = json.loads(qemu("map", "--output=json", "--start-offset", "4096", "--max-length", "1M", p).out)
    assert pyinstar.map(p, start_offset=4096, max_length=1 << 20) == q


def test_map_qcow2(tmp):
    qcow2_image(tmp)
    for name in ("q.qcow2", "c_q.qcow2"):
        assert_same("map", "--output=json", name, cwd=tmp)
        assert_same("map", name, cwd=tmp)


def test_map_chain(tmp):
    chain(tmp)
    assert_same("map", "--output=json", "top.qcow2", cwd=tmp)
    assert_same("map", "top.qcow2", cwd=tmp)
    assert_same("map", "--output=json", "--start-offset", "1M", "mid.qcow2", cwd=tmp)
