"""`bench` against qemu-img 7.2: options, errors and output lines (the run time masked), and for write runs the
resulting image byte for byte; the C API's instar_bench through the Python binding."""
import os
import re
import shutil

import pytest

import instar as pyinstar
from conftest import instar, qemu, qimg, run

TIME = re.compile(r"Run completed in \d+\.\d{3} seconds\.")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bench"))
    qimg("create", "-q", "-f", "raw", os.path.join(d, "b.raw"), "16M")
    qimg("create", "-q", "-f", "qcow2", os.path.join(d, "b.qcow2"), "16M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", os.path.join(d, "b.qcow2")])
    return d


def bench_same(images, tmp, args, exact=True):
    """Both tools on copies of the images; with `exact` the images must be byte-identical afterwards, else
    (qemu's own layout varies from run to run) read the same and check clean."""
    res = {}
    for tool in ("q", "i"):
        d = os.path.join(tmp, tool)
        shutil.copytree(images, d)
        r = qemu("bench", *args, cwd=d) if tool == "q" else instar("bench", *args, cwd=d)
        files = {n: open(os.path.join(d, n), "rb").read() for n in ("b.raw", "b.qcow2")}
        res[tool] = (r.rc, TIME.sub("Run completed in T seconds.", r.out), r.err, files)
    assert res["i"][:3] == res["q"][:3], (res["q"][:3], res["i"][:3])
    if exact:
        assert res["i"][3] == res["q"][3], "images differ"
    else:
        for n in ("b.raw", "b.qcow2"):
            a, b = os.path.join(tmp, "q", n), os.path.join(tmp, "i", n)
            assert run(["qemu-img", "compare", a, b]).rc == 0
            if n.endswith(".qcow2"):
                assert run(["qemu-img", "check", b]).rc == 0
    if res["q"][0] == 0:
        assert "Run completed in T seconds." in res["q"][1]


CASES = [
    ["-c", "1000", "-f", "raw", "b.raw"],
    ["-c", "1000", "-d", "1", "-f", "raw", "b.raw"],
    ["-c", "3000", "-d", "16", "-f", "qcow2", "b.qcow2"],
    ["-c", "1000", "-w", "-f", "raw", "--pattern", "65", "b.raw"],
    ["-c", "1000", "-w", "-f", "raw", "--pattern", "0x41", "-s", "512", "-S", "8192", "-o", "4096", "b.raw"],
    ["-w", "-c", "4096", "-d", "16", "--pattern", "65", "-s", "4096", "-f", "qcow2", "b.qcow2"],
    ["-w", "-c", "100", "-d", "4", "--flush-interval", "10", "-f", "raw", "b.raw"],
    ["-w", "-c", "100", "-d", "4", "--flush-interval", "10", "--no-drain", "-f", "qcow2", "b.qcow2"],
    ["-w", "-c", "50", "-t", "none", "-f", "raw", "b.raw"],
    ["-c", "10", "-n", "-t", "none", "-f", "raw", "b.raw"],
    ["-c", "10", "-i", "native", "-t", "directsync", "-f", "raw", "b.raw"],
    ["-c", "10", "-i", "io_uring", "-f", "raw", "b.raw"],
    ["-c", "10", "-n", "b.raw"],
    ["-c", "10", "-i", "bogus", "b.raw"],
    ["-c", "10", "-o", "16776000", "-f", "raw", "b.raw"],
    ["-c", "0", "b.raw"],
    ["-c", "1k", "b.raw"],
    ["-c", "-1", "b.raw"],
    ["-d", "x", "b.raw"],
    ["-c", "10", "-t", "bogus", "b.raw"],
    ["--flush-interval", "3", "b.raw"],
    ["-w", "--flush-interval", "3", "b.raw"],
    ["-w", "--flush-interval", "x", "b.raw"],
    ["-w", "-q", "-c", "10", "b.raw"],
    ["-c", "10", "-s", "0", "b.raw"],
    ["-c", "10", "-s", "3G", "b.raw"],
    ["-c", "10", "-S", "-1", "b.raw"],
    ["-c", "10", "-o", "x", "b.raw"],
    ["--pattern", "256", "b.raw"],
    ["b.raw", "b.qcow2"],
    [],
    ["-c", "50", "-d", "0x10", "-U", "b.qcow2"],
    ["-c", "50", "--image-opts", "driver=qcow2,file.filename=b.qcow2"],
    ["-c", "50", "--image-opts", "-f", "qcow2", "driver=qcow2,file.filename=b.qcow2"],
    ["-c", "5", "missing.qcow2"],
    ["--object", "secret,id=s,data=x", "b.raw"],
    ["-c"],
]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a) or "none")
def test_bench(images, tmp, args):
    bench_same(images, tmp, args)


def test_bench_qcow2_deep_queue(images, tmp):
    """64 requests of whole clusters in flight: qemu-img's own cluster layout changes from run to run here."""
    bench_same(images, tmp, ["-w", "-c", "700", "-d", "64", "-s", "64k", "-f", "qcow2", "b.qcow2"], exact=False)


def test_python_bench(images, tmp):
    d = os.path.join(tmp, "p")
    shutil.copytree(images, d)
    r = pyinstar.bench(os.path.join(d, "b.qcow2"), fmt="qcow2", write=True, count=4096, depth=16, pattern=65)
    assert r["requests"] == 4096 and r["bytes"] == 4096 * 4096 and r["seconds"] > 0
    q = os.path.join(tmp, "q")
    shutil.copytree(images, q)
    assert qemu("bench", "-w", "-c", "4096", "-d", "16", "--pattern", "65", "-f", "qcow2",
                os.path.join(q, "b.qcow2")).rc == 0
    assert open(os.path.join(d, "b.qcow2"), "rb").read() == open(os.path.join(q, "b.qcow2"), "rb").read()
    seen = []
    r = pyinstar.bench(os.path.join(d, "b.raw"), fmt="raw", count=2000, depth=8, progress=seen.append)
    assert seen and seen[-1] == 100.0 and r["requests"] == 2000
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.bench(os.path.join(d, "b.raw"), fmt="raw", count=2000, depth=8, progress=lambda p: p >= 50)
    assert e.value.code == -8
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.bench(os.path.join(d, "b.raw"), fmt="raw", flush_interval=3)
    assert e.value.message == "--flush-interval is only available in write tests"
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.bench(os.path.join(d, "b.raw"), fmt="raw", count=4, offset=16776000)
    assert e.value.message == "Failed request: Input/output error"
