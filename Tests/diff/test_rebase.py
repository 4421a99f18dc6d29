"""rebase: instar against qemu-img 7.2 on the same chains, built twice (q/ and i/) with the same relative names.
Exit code, stdout and stderr must match; the rebased images must be byte-identical, read the same (qemu-img
compare, also against the image before a safe rebase), give the same `info` and check clean."""
import json
import os
import shutil

import pytest

from conftest import instar, qemu, qemu_io, qimg, run
from imgs import make_ops, qemu_io_script

MiB = 1 << 20
SECRET = "--object", "secret,id=sec0,data=abc123"


def q(d, *args):
    qimg(*args, cwd=d)


def io(d, img, *cmds, fmt="qcow2", extra=()):
    args = [*extra] if extra else ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    qemu_io(*args, img, cwd=d)


def info(d, name, *extra):
    r = qemu("info", "--output=json", *extra, name, cwd=d)
    assert r.rc == 0, r
    j = json.loads(r.out)
    j.pop("actual-size", None)
    return j


def check(d, name, *extra):
    r = qemu("check", "--output=json", *extra, name, cwd=d)
    assert r.rc == 0, r
    j = json.loads(r.out)
    assert j.get("leaks", 0) == 0 and j.get("corruptions", 0) == 0, j


def rebase_both(tmp, setup, args, image="top.qcow2", path=None, byte_equal=True, extra=(), same_content=None,
                cross_compare=True):
    """Builds the chain with `setup(dir)` in q/ and i/, runs `rebase ARGS IMAGE` there with each program and
    compares everything. `path` is the image file when IMAGE is an --image-opts string; `extra` are the
    --object/--image-opts arguments qemu-img info/check/compare need for it. Returns qemu's result."""
    path = path or image
    res = {}
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    setup(src)
    if os.path.exists(os.path.join(src, path)):
        shutil.copyfile(os.path.join(src, path),
                        os.path.join(src, os.path.dirname(path), "orig_" + os.path.basename(path)))
    for tool in ("q", "i"):
        d = os.path.join(tmp, tool)
        shutil.copytree(src, d, symlinks=True)
        res[tool] = (qemu if tool == "q" else instar)("rebase", *args, image, cwd=d)
    rq, ri = res["q"], res["i"]
    assert ri == rq, f"rebase {args}\n qemu: {rq}\n instar: {ri}"
    dq, di = os.path.join(tmp, "q"), os.path.join(tmp, "i")
    if not os.path.exists(os.path.join(dq, path)):
        return rq
    if rq.rc != 0:
        # A failed rebase: the files are the same (nothing written, or the same writes before the failure).
        with open(os.path.join(dq, path), "rb") as a, open(os.path.join(di, path), "rb") as b:
            assert a.read() == b.read(), "files differ after the failure"
        return rq
    fq, fi = os.path.join(dq, path), os.path.join(di, path)
    if byte_equal:
        with open(fq, "rb") as a, open(fi, "rb") as b:
            assert a.read() == b.read(), "rebased files differ"
    assert info(dq, path, *extra) == info(di, path, *extra)
    if path.endswith(".qcow2"):
        check(di, path, *extra)
    # The two results read the same, each through its own (new) chain.
    opts = [x for x in extra if x != "--image-opts"]
    if cross_compare:
        r = run(["qemu-img", "compare", *opts, fq, fi])
        assert r.rc == 0, r
    if same_content is None:
        same_content = rq.rc == 0 and "-u" not in args
    if same_content and not extra:
        orig = os.path.join(di, os.path.dirname(path), "orig_" + os.path.basename(path))
        r = run(["qemu-img", "compare", orig, fi], cwd=di)
        assert r.rc == 0, r
    return rq


def _size(text):
    if text.isdigit():
        return int(text)
    return int(text[:-1]) << {"k": 10, "M": 20}[text[-1]]


def _fit(cmds, size):
    """qemu-io write commands clipped to an image of `size` bytes."""
    out = []
    for c in cmds:
        *head, off, n = c.split()
        off, n = _size(off), _size(n)
        if off < size:
            out.append(" ".join([*head, str(off), str(min(n, size - off))]))
    return out


def basic(d, top_opts=None, base_opts=None, new_opts=None, size="8M", base_size=None, new_size=None):
    base_size, new_size = base_size or size, new_size or size
    q(d, "create", "-q", "-f", "qcow2", *(["-o", base_opts] if base_opts else []), "base.qcow2", base_size)
    io(d, "base.qcow2", *_fit(["write -P 1 0 3M", "write -P 5 5M 1M", "write -z 7M 64k"], _size(base_size)))
    q(d, "create", "-q", "-f", "qcow2", *(["-o", top_opts] if top_opts else []), "-b", "base.qcow2", "-F", "qcow2",
      "top.qcow2", size)
    io(d, "top.qcow2", "write -P 2 1M 64k", "write -P 3 4000k 7k", "write -z 6M 4k", "write -P 4 6500k 1536")
    q(d, "create", "-q", "-f", "qcow2", *(["-o", new_opts] if new_opts else []), "new.qcow2", new_size)
    io(d, "new.qcow2", *_fit(["write -P 1 0 1M", "write -P 9 2M 3M", "write -P 1 2560k 1000"], _size(new_size)))


ARGS = {
    "safe": ["-b", "new.qcow2", "-F", "qcow2"],
    "progress": ["-p", "-b", "new.qcow2", "-F", "qcow2"],
    "quiet_progress": ["-q", "-p", "-b", "new.qcow2", "-F", "qcow2"],
    "standalone": ["-b", ""],
    "standalone_fmt": ["-b", "", "-F", "qcow2"],
    "unsafe": ["-u", "-b", "new.qcow2", "-F", "qcow2"],
    "unsafe_remove": ["-u", "-b", ""],
    "unsafe_nob": ["-u"],
    "unsafe_progress": ["-u", "-p", "-b", "new.qcow2", "-F", "qcow2"],
    "nofmt": ["-b", "new.qcow2"],
    "unsafe_nofmt": ["-u", "-b", "new.qcow2"],
    "cache": ["-t", "none", "-T", "none", "-b", "new.qcow2", "-F", "qcow2"],
    "cache_unsafe": ["-t", "unsafe", "-T", "directsync", "-f", "qcow2", "-b", "new.qcow2", "-F", "qcow2"],
    "force_share": ["-U", "-b", "new.qcow2", "-F", "qcow2"],
    "fmt_raw_new_probe": ["-b", "new.qcow2", "-F", "raw"],
}


@pytest.mark.parametrize("name", sorted(ARGS))
def test_basic_modes(tmp, name):
    rebase_both(tmp, basic, ARGS[name])


LAYOUTS = {
    "ext_l2": dict(top_opts="extended_l2=on"),
    "ext_l2_all": dict(top_opts="extended_l2=on,cluster_size=128k", base_opts="extended_l2=on",
                       new_opts="extended_l2=on,cluster_size=32k"),
    "small_clusters": dict(top_opts="cluster_size=512", base_opts="cluster_size=4k", new_opts="cluster_size=2M"),
    "cluster_1k": dict(top_opts="cluster_size=1k"),
    "cluster_4k": dict(top_opts="cluster_size=4k", new_opts="cluster_size=512"),
    "v2": dict(top_opts="compat=0.10", base_opts="compat=0.10"),
    "lazy": dict(top_opts="lazy_refcounts=on"),
    "refcount1": dict(top_opts="refcount_bits=1"),
    "refcount64": dict(top_opts="refcount_bits=64"),
    "zstd": dict(top_opts="compression_type=zstd"),
    "old_backing_smaller": dict(base_size="3M"),
    "old_backing_larger": dict(base_size="12M"),
    "new_backing_smaller": dict(new_size="5M"),
    "new_backing_larger": dict(new_size="16M"),
    "new_backing_odd": dict(new_size="5000k"),
    "both_smaller": dict(base_size="2M", new_size="6M"),
    # Zero writes past the old backing file's end: explicit zeroes in v2, zero (sub)clusters in v3.
    "v2_old_smaller": dict(top_opts="compat=0.10", base_opts="compat=0.10", base_size="3000k"),
    "ext_l2_old_smaller": dict(top_opts="extended_l2=on", base_size="3000k"),
    "small_clusters_old_smaller": dict(top_opts="cluster_size=512", base_size="2500k", new_size="7M"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", ["safe", "standalone", "progress"])
def test_layouts(tmp, layout, mode):
    rebase_both(tmp, lambda d: basic(d, **LAYOUTS[layout]), ARGS[mode])


def compressed_chain(d):
    """Compressed clusters and zero clusters in the image and in both backing files."""
    q(d, "create", "-q", "-f", "qcow2", "b0.qcow2", "6M")
    io(d, "b0.qcow2", "write -P 7 0 6M")
    q(d, "convert", "-c", "-O", "qcow2", "b0.qcow2", "base.qcow2")
    io(d, "base.qcow2", "write -z 1M 128k", "write -P 8 3M 100k")
    q(d, "create", "-q", "-f", "qcow2", "t0.qcow2", "6M")
    io(d, "t0.qcow2", "write -P 6 512k 512k", "write -P 6 4M 64k")
    q(d, "convert", "-c", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "t0.qcow2", "top.qcow2")
    io(d, "top.qcow2", "write -z 2M 192k", "write -z 5M 4k")
    q(d, "create", "-q", "-f", "qcow2", "n0.qcow2", "6M")
    io(d, "n0.qcow2", "write -P 7 0 2M", "write -P 9 2M 1M")
    q(d, "convert", "-c", "-O", "qcow2", "n0.qcow2", "new.qcow2")


@pytest.mark.parametrize("mode", ["safe", "standalone", "progress", "unsafe"])
def test_compressed_and_zero_clusters(tmp, mode):
    rebase_both(tmp, compressed_chain, ARGS[mode])


def raw_chain(d):
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.truncate(4 * MiB)
        f.seek(4096)
        f.write(bytes(range(256)) * 64)
        f.seek(3 * MiB + 100)
        f.write(b"\x33" * 7000)
    with open(os.path.join(d, "new.raw"), "wb") as f:
        f.truncate(3 * MiB)
        f.seek(4096)
        f.write(bytes(range(256)) * 32)
        f.seek(2 * MiB)
        f.write(b"\x44" * 100000)
    q(d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "5M")
    io(d, "top.qcow2", "write -P 1 8k 4k", "write -z 2M 64k")


@pytest.mark.parametrize("args", [["-b", "new.raw", "-F", "raw"], ["-b", ""], ["-p", "-b", "new.raw", "-F", "raw"],
                                  ["-u", "-b", "new.raw", "-F", "raw"], ["-b", "new.raw", "-F", "qcow2"]],
                         ids=["safe", "standalone", "progress", "unsafe", "wrong_fmt"])
def test_raw_backings(tmp, args):
    rebase_both(tmp, raw_chain, args)


def raw_top(d):
    raw_chain(d)
    with open(os.path.join(d, "top.raw"), "wb") as f:
        f.truncate(MiB)


@pytest.mark.parametrize("args", [["-b", "new.raw", "-F", "raw"], ["-b", "new.raw"], ["-u", "-b", ""], ["-u"],
                                  ["-f", "raw", "-b", "", "-p"], ["-u", "-b", "x", "-F", "raw"]])
def test_raw_image(tmp, args):
    rebase_both(tmp, raw_top, args, image="top.raw")


def three_level(d):
    """base <- mid <- top; rebasing top onto base (in the chain) copies only what mid changed."""
    q(d, "create", "-q", "-f", "qcow2", "base.qcow2", "8M")
    io(d, "base.qcow2", "write -P 1 0 8M")
    q(d, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "6M")
    io(d, "mid.qcow2", "write -P 2 1M 1M", "write -P 1 3M 64k", "write -z 4M 100k")
    q(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "8M")
    io(d, "top.qcow2", "write -P 3 1536k 8k", "write -P 4 7M 4k")


@pytest.mark.parametrize("args", [["-b", "base.qcow2", "-F", "qcow2"], ["-b", "base.qcow2"],
                                  ["-p", "-b", "base.qcow2", "-F", "qcow2"], ["-b", "mid.qcow2", "-F", "qcow2"],
                                  ["-b", "./base.qcow2", "-F", "qcow2"], ["-b", ""]],
                         ids=["base", "base_nofmt", "base_progress", "same", "dot_path", "standalone"])
def test_rebase_within_chain(tmp, args):
    rebase_both(tmp, three_level, args)


def subdirs(d):
    """Images in sub/ named relatively: -b is resolved against the image's directory and stored as given."""
    s = os.path.join(d, "sub")
    os.makedirs(os.path.join(s, "deep"))
    basic(s)
    q(s, "create", "-q", "-f", "qcow2", "deep/other.qcow2", "8M")
    io(s, "deep/other.qcow2", "write -P 6 1M 2M")


@pytest.mark.parametrize("args", [["-b", "new.qcow2", "-F", "qcow2"], ["-b", "deep/other.qcow2", "-F", "qcow2"],
                                  ["-b", "base.qcow2", "-F", "qcow2"], ["-b", "sub/new.qcow2", "-F", "qcow2"],
                                  ["-u", "-b", "deep/../new.qcow2", "-F", "qcow2"]],
                         ids=["sibling", "deeper", "current", "cwd_relative_missing", "unsafe"])
def test_relative_names(tmp, args):
    rebase_both(tmp, subdirs, args, image="sub/top.qcow2")


def test_absolute_new_backing(tmp):
    def setup(d):
        basic(d)
    res = {}
    for tool in ("q", "i"):
        d = os.path.join(tmp, tool)
        os.makedirs(d)
        setup(d)
        res[tool] = (qemu if tool == "q" else instar)("rebase", "-b", os.path.join(d, "new.qcow2"), "-F", "qcow2",
                                                      "top.qcow2", cwd=d)
        assert res[tool].rc == 0, res[tool]
    assert run(["qemu-img", "compare", os.path.join(tmp, "q", "top.qcow2"), os.path.join(tmp, "i", "top.qcow2")]).rc == 0
    check(os.path.join(tmp, "i"), "top.qcow2")


def missing_old(d):
    basic(d)
    os.rename(os.path.join(d, "base.qcow2"), os.path.join(d, "moved.qcow2"))


@pytest.mark.parametrize("args", [["-b", "new.qcow2", "-F", "qcow2"], ["-u", "-b", "moved.qcow2", "-F", "qcow2"],
                                  ["-p", "-b", "", "-F", "qcow2"]])
def test_old_backing_missing(tmp, args):
    rebase_both(tmp, missing_old, args)


ERRORS = [
    [],
    ["-b", "new.qcow2", "-F", "qcow2"],
    ["-b", "new.qcow2", "-F", "qcow2", "top.qcow2", "extra"],
    ["-F", "qcow2", "top.qcow2"],
    ["-b", "missing.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-p", "-b", "missing.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-b", "new.qcow2", "-F", "nosuch", "top.qcow2"],
    ["-u", "-b", "new.qcow2", "-F", "vmdk", "top.qcow2"],
    ["-b", "new.qcow2", "-F", "raw", "-f", "raw", "top.qcow2"],
    ["-t", "bogus", "-b", "new.qcow2", "top.qcow2"],
    ["-p", "-T", "bogus", "-b", "new.qcow2", "top.qcow2"],
    ["-b", "new.qcow2", "-F", "qcow2", "missing.qcow2"],
    ["-f", "qcow2", "--image-opts", "-b", "new.qcow2", "driver=qcow2,file.filename=top.qcow2"],
    ["-x", "top.qcow2"],
    ["-b"],
    ["-u", "-b", "x" * 1100, "-F", "qcow2", "top.qcow2"],
]


@pytest.mark.parametrize("args", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors(tmp, args):
    res = {}
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    basic(src)
    for tool in ("q", "i"):
        d = os.path.join(tmp, tool)
        shutil.copytree(src, d)
        res[tool] = (qemu if tool == "q" else instar)("rebase", *args, cwd=d)
    assert res["i"] == res["q"]
    dq, di = os.path.join(tmp, "q"), os.path.join(tmp, "i")
    with open(os.path.join(dq, "top.qcow2"), "rb") as a, open(os.path.join(di, "top.qcow2"), "rb") as b:
        assert a.read() == b.read()


def test_header_full(tmp):
    """A backing name that no longer fits the 512-byte header cluster: qemu's ENOSPC wording."""
    def setup(d):
        q(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "top.qcow2", "1M")
    rebase_both(tmp, setup, ["-u", "-b", "n" * 400, "-F", "qcow2"])


class Holder:
    """qemu-io holding an image open read/write (and so its write lock) until closed; open once it answered a read."""

    def __init__(self, d, name):
        import subprocess
        self.p = subprocess.Popen(["qemu-io", "-f", "qcow2", name], cwd=d, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.p.stdin.write("read 0 512\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert "read 512/512" in line, line

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=600)


@pytest.mark.parametrize("held,args", [("top.qcow2", ["-u", "-b", ""]), ("top.qcow2", ["-b", "new.qcow2", "-F", "qcow2"]),
                                       ("new.qcow2", ["-b", "new.qcow2", "-F", "qcow2"]),
                                       ("new.qcow2", ["-U", "-b", "new.qcow2", "-F", "qcow2"]),
                                       ("base.qcow2", ["-b", "new.qcow2", "-F", "qcow2"])],
                         ids=["image", "image_safe", "new_backing", "new_backing_U", "old_backing"])
def test_locks(tmp, held, args):
    """Another process writing an image: qemu-img's lock errors (and -U for the new backing file)."""
    res = {}
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    basic(src)
    for tool in ("q", "i"):
        d = os.path.join(tmp, tool)
        shutil.copytree(src, d)
        h = Holder(d, held)
        try:
            res[tool] = (qemu if tool == "q" else instar)("rebase", *args, "top.qcow2", cwd=d)
        finally:
            h.close()
    assert res["i"] == res["q"]
    if held == "top.qcow2":
        assert res["q"].rc == 1 and "lock" in res["q"].err
    with open(os.path.join(tmp, "q", "top.qcow2"), "rb") as a, open(os.path.join(tmp, "i", "top.qcow2"), "rb") as b:
        assert a.read() == b.read()


def bitmap_chain(d):
    basic(d)
    q(d, "bitmap", "--add", "top.qcow2", "b1")
    q(d, "bitmap", "--add", "--disable", "top.qcow2", "b2")


@pytest.mark.parametrize("mode", ["safe", "unsafe", "standalone"])
def test_bitmaps_dirtied(tmp, mode):
    rebase_both(tmp, bitmap_chain, ARGS[mode])
    for tool in ("q", "i"):
        d = os.path.join(tmp, tool)
        r = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", "top.qcow2", "top.qcow2"], cwd=d)
        assert r.rc == 0


def big_chain(d):
    """64 MiB with differences spread over many 2 MiB chunks (progress steps), random ops on every layer."""
    q(d, "create", "-q", "-f", "qcow2", "base.qcow2", "64M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 48M", "base.qcow2", cwd=d)
    q(d, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "64M")
    script = qemu_io_script(make_ops(7, 64 * MiB, 65536, count=60))
    r = run(["qemu-io", "-f", "qcow2", "top.qcow2"], cwd=d, input=script)
    assert r.rc == 0, r
    q(d, "create", "-q", "-f", "qcow2", "new.qcow2", "40M")
    script = qemu_io_script(make_ops(8, 40 * MiB, 65536, count=60))
    r = run(["qemu-io", "-f", "qcow2", "new.qcow2"], cwd=d, input=script)
    assert r.rc == 0, r


@pytest.mark.parametrize("mode", ["progress", "standalone"])
def test_big_random(tmp, mode):
    rebase_both(tmp, big_chain, ARGS[mode])


def small_cluster_progress(d):
    """512-byte clusters: qemu's allocation query stops at each L2 table (32 KiB), so chunks and progress steps
    follow those ends."""
    q(d, "create", "-q", "-f", "qcow2", "base.qcow2", "6M")
    io(d, "base.qcow2", "write -P 1 0 6M")
    q(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "6M")
    io(d, "top.qcow2", "write -P 2 100k 1k")
    q(d, "create", "-q", "-f", "qcow2", "new.qcow2", "6M")


def test_small_cluster_progress(tmp):
    rebase_both(tmp, small_cluster_progress, ARGS["progress"])


ENCRYPTIONS = {"luks": "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
               "aes": "encrypt.format=aes,encrypt.key-secret=sec0"}


def luks_chain(d, kind="luks"):
    basic(d)
    os.unlink(os.path.join(d, "top.qcow2"))
    qimg("create", *SECRET, "-q", "-f", "qcow2", "-o", ENCRYPTIONS[kind],
         "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "8M", cwd=d)
    r = run(["qemu-io", *SECRET, "--image-opts", "-c", "write -P 2 1M 64k", "-c", "write -P 3 4000k 7k",
             "-c", "write -z 6M 4k", "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=sec0"], cwd=d)
    assert r.rc == 0, r


LUKS_IMG = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=sec0"


@pytest.mark.parametrize("args", [["-b", "new.qcow2", "-F", "qcow2"], ["-b", ""], ["-u", "-b", "new.qcow2", "-F", "qcow2"],
                                  ["-b", os.path.join("@DIR@", "new.qcow2"), "-F", "qcow2"]],
                         ids=["relative", "standalone", "unsafe", "absolute"])
@pytest.mark.parametrize("kind", sorted(ENCRYPTIONS))
def test_encrypted(tmp, args, kind):
    res = {}
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    luks_chain(src, kind)
    for tool in ("q", "i"):
        d = os.path.join(tmp, tool)
        shutil.copytree(src, d)
        a = [x.replace("@DIR@", d) for x in args]
        res[tool] = (qemu if tool == "q" else instar)("rebase", *SECRET, "--image-opts", *a, LUKS_IMG, cwd=d)
    rq, ri = res["q"], res["i"]
    assert ri.rc == rq.rc and ri.out == rq.out
    assert ri.err.replace(os.path.join(tmp, "i"), os.path.join(tmp, "q")) == rq.err
    dq, di = os.path.join(tmp, "q"), os.path.join(tmp, "i")
    opts = [*SECRET, "--image-opts"]
    jq, ji = info(dq, LUKS_IMG, *opts), info(di, LUKS_IMG, *opts)
    for j in (jq, ji):
        j.pop("full-backing-filename", None)
        j.pop("backing-filename", None) if "@DIR@" in "".join(args) else None
    assert jq == ji
    check(di, LUKS_IMG, *opts)
    r = run(["qemu-img", "compare", *SECRET, "--image-opts", LUKS_IMG.replace("top.qcow2", os.path.join(dq, "top.qcow2")),
             LUKS_IMG.replace("top.qcow2", os.path.join(di, "top.qcow2"))], cwd=tmp)
    assert r.rc == 0, r


def data_file_chain(d):
    q(d, "create", "-q", "-f", "qcow2", "-o", "data_file=top.data,data_file_raw=on", "top.qcow2", "4M")
    q(d, "create", "-q", "-f", "qcow2", "-o", "data_file=top2.data", "top2.qcow2", "4M")
    io(d, "top2.qcow2", "write -P 3 64k 64k")
    q(d, "create", "-q", "-f", "qcow2", "new.qcow2", "4M")
    io(d, "new.qcow2", "write -P 1 0 1M")


@pytest.mark.parametrize("image", ["top.qcow2", "top2.qcow2"])
@pytest.mark.parametrize("args", [["-b", "new.qcow2", "-F", "qcow2"], ["-u", "-b", "new.qcow2", "-F", "qcow2"],
                                  ["-u", "-b", ""]], ids=["safe", "unsafe", "remove"])
def test_external_data_file(tmp, image, args):
    """A raw external data file cannot gain a backing file (EINVAL); a plain one can."""
    # The data file name is relative to the working directory (qemu 7.2), so each result is checked in its own.
    rebase_both(tmp, data_file_chain, args, image=image, same_content=False, cross_compare=False)


@pytest.mark.parametrize("image", ['json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"}}',
                                   "driver=qcow2,file.filename=top.qcow2"], ids=["json", "image_opts"])
def test_structured_names(tmp, image):
    extra = ["--image-opts"] if image.startswith("driver=") else []
    rebase_both(tmp, basic, [*extra, "-b", "new.qcow2", "-F", "qcow2"], image=image, path="top.qcow2")


def test_raw_window_relative_refused(tmp):
    rebase_both(tmp, raw_chain, ["--image-opts", "-b", "new.raw", "-F", "raw"],
                image="driver=raw,offset=0,file.filename=new.raw", path="new.raw")


def odd_raw_chain(d):
    """Raw backing files whose sizes are not multiples of 512: qemu counts them in whole sectors."""
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.write(b"\x11" * (MiB + 1000))
    with open(os.path.join(d, "new.raw"), "wb") as f:
        f.write(b"\x11" * (MiB + 300) + b"\x22" * 77)
    q(d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "2M")


@pytest.mark.parametrize("args", [["-b", "new.raw", "-F", "raw"], ["-b", ""], ["-p", "-b", "new.raw", "-F", "raw"]],
                         ids=["safe", "standalone", "progress"])
def test_odd_sized_raw_backings(tmp, args):
    rebase_both(tmp, odd_raw_chain, args)


def many_chunks(d):
    """256 MiB: 128 chunks of 0.78 % each, so the meter's 2-point threshold decides which records print."""
    q(d, "create", "-q", "-f", "qcow2", "base.qcow2", "256M")
    io(d, "base.qcow2", "write -P 1 100M 1M")
    q(d, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "256M")
    q(d, "create", "-q", "-f", "qcow2", "new.qcow2", "256M")


def test_progress_threshold(tmp):
    r = rebase_both(tmp, many_chunks, ARGS["progress"])
    assert r.out.count("/100%)") > 20


def snapshot_chain(d):
    """An internal snapshot shares the image's L2 tables: the rebase's writes copy them first."""
    basic(d)
    q(d, "snapshot", "-c", "s1", "top.qcow2")
    io(d, "top.qcow2", "write -P 8 64k 4k")


@pytest.mark.parametrize("mode", ["safe", "standalone", "unsafe"])
def test_internal_snapshot(tmp, mode):
    rebase_both(tmp, snapshot_chain, ARGS[mode])


def new_with_backing(d):
    """The new backing file has a backing file of its own (in another directory), read through its chain."""
    basic(d)
    os.makedirs(os.path.join(d, "nb"))
    q(d, "create", "-q", "-f", "qcow2", "nb/newbase.qcow2", "8M")
    io(d, "nb/newbase.qcow2", "write -P 1 0 2M", "write -P 5 5M 512k")
    q(d, "rebase", "-u", "-b", "nb/newbase.qcow2", "-F", "qcow2", "new.qcow2")


@pytest.mark.parametrize("mode", ["safe", "progress"])
def test_new_backing_with_chain(tmp, mode):
    rebase_both(tmp, new_with_backing, ARGS[mode])


def big_sparse(d):
    """2 GiB, almost all of it reading as zeroes in every layer (unallocated, zero clusters, raw holes)."""
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.truncate(1536 * MiB)
        f.seek(768 * MiB)
        f.write(b"\x42" * 70000)
    q(d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "2G")
    io(d, "top.qcow2", "write -P 1 256M 64k", "write -z 1280M 1M")
    q(d, "create", "-q", "-f", "qcow2", "new.qcow2", "1800M")
    io(d, "new.qcow2", "write -z 512M 3M", "write -P 3 768M 4k", "write -P 7 1799M 1M")


def test_big_sparse(tmp):
    rebase_both(tmp, big_sparse, ARGS["progress"])
