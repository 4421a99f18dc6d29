"""qcow (version 1): differential tests against qemu-img 7.2 on images qemu-img/qemu-io make (create, reads,
writes through convert/commit and the library, compressed clusters, AES encryption, backing chains), the
operations qemu refuses on qcow, and hostile variants of the header and tables. qemu's qcow layout is
deterministic, so resulting files must be byte-identical."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from conftest import INSTAR, assert_same, info_json, instar, normalize, qemu, qemu_io, qimg, run

MiB = 1 << 20
SECRET = ["--object", "secret,id=s0,data=passw0rd"]
IMG_OPTS = "driver=qcow,file.filename={},encrypt.key-secret=s0"


def pair(tmp, files):
    """Copies `files` (names in tmp) into tmp/q and tmp/i; returns the two directories."""
    dirs = []
    for who in ("q", "i"):
        d = os.path.join(tmp, who)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for f in files:
            shutil.copyfile(os.path.join(tmp, f), os.path.join(d, f))
        dirs.append(d)
    return dirs


def same_write(tmp, files, *args):
    """Runs the same writing command in copies for both tools (cwd = the copy): messages, exit codes and the
    bytes of every file must match."""
    dq, di = pair(tmp, files)
    q = qemu(*args, cwd=dq)
    i = instar(*args, cwd=di)
    # qemu names the node with random digits (id_generate).
    q.err, i.err = (re.sub(r"#block\d+", "#blockNNN", r.err) for r in (q, i))
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)
    for f in sorted(set(os.listdir(dq)) | set(os.listdir(di))):
        a, b = os.path.join(dq, f), os.path.join(di, f)
        assert os.path.exists(a) and os.path.exists(b), f"{args}: {f} exists for one tool only"
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), f"{args}: {f} differs"
    return q


def reads_same(tmp, name, *fmt, targets=("raw", "qcow2", "qcow")):
    for args in (["info", *fmt, name], ["info", "--output=json", *fmt, name], ["info", "--backing-chain", *fmt, name],
                 ["map", *fmt, name], ["map", "--output=json", *fmt, name], ["check", *fmt, name],
                 ["compare", *fmt, name, name]):
        assert_same(*args, cwd=tmp)
    for target in targets:
        outs = []
        for who in ("q", "i"):
            out = os.path.join(tmp, f"conv-{who}.{target}")
            r = (qemu if who == "q" else instar)("convert", *fmt, "-O", target, name, out, cwd=tmp)
            assert r.rc == 0, r
            with open(out, "rb") as f:
                outs.append(f.read())
            os.unlink(out)
        assert outs[0] == outs[1], f"convert -O {target} differs"


def compressed_copy(tmp, src, dst):
    """qemu-img convert -c -O qcow: the copy is complete, but qemu-img exits 1 without a message (its
    end-of-stream compressed write fails on qcow)."""
    r = run(["qemu-img", "convert", "-c", "-O", "qcow", os.path.join(tmp, src), os.path.join(tmp, dst)])
    assert (r.rc, r.out, r.err) == (1, "", ""), r


def seeded(tmp, name="a.qcow", size="64M", args=(), ops=()):
    qimg("create", "-q", "-f", "qcow", *args, os.path.join(tmp, name), size)
    if ops:
        script = []
        for op in ops:
            script += ["-c", op]
        qemu_io("-f", "qcow", *script, os.path.join(tmp, name), cwd=tmp)
    return name


WRITES = ["write -P 0x11 0 1M", "write -P 0x22 5M 100k", "write -z 8M 1M", "write -P 0x33 8200k 7k",
          "write -P 0x44 63M 1M", "write -P 0x55 30001k 3k", "write -P 0x66 33M 3"]


# --- create -------------------------------------------------------------------------------------------------

CREATE_CASES = [
    ["64M"], ["1G"], ["0"], ["1"], ["1000"], ["3T"], ["-o", "size=4M"], ["-o", "cluster_size=512", "1M"],
    ["-o", "backing_fmt=raw", "1M"], ["-o", "backing_fmt=nosuch", "1M"], ["-o", "preallocation=full", "1M"],
    ["-o", "preallocation=falloc", "1M"], ["-o", "preallocation=metadata", "1M"], ["-o", "encryption=off", "1M"],
    ["-o", "encryption=on", "1M"], ["-o", "encryption=on,encrypt.key-secret=s0", "1M"],
    ["-o", "encrypt.format=aes,encrypt.key-secret=s0", "1M"], ["-o", "encrypt.format=aes,encrypt.key-secret=zz", "1M"],
    ["-o", "encrypt.format=luks,encrypt.key-secret=s0", "1M"], ["-o", "encrypt.format=foo", "1M"],
    ["-o", "encrypt.format=qcow,encrypt.key-secret=s0", "1M"], ["-o", "encrypt.key-secret=s0", "1M"],
    ["-o", "encrypt.format=aes,encryption=on,encrypt.key-secret=s0", "1M"],
    ["-o", "encrypt.format=aes,encryption=off,encrypt.key-secret=s0", "1M"],
    ["-o", "encryption=yes,encrypt.key-secret=s0", "1M"], ["-o", "encrypt.format=aes", "0"],
]


@pytest.mark.parametrize("args", CREATE_CASES, ids=[" ".join(a) for a in CREATE_CASES])
def test_create(tmp, args):
    same_write(tmp, [], "create", *SECRET, "-f", "qcow", *args[:-1], "img.qcow", args[-1])


def test_create_help(tmp):
    assert_same("create", "-f", "qcow", "-o", "help", cwd=tmp)
    assert_same("create", "-f", "qcow", "-o", "?", "x.qcow", cwd=tmp)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "qcow"])
def test_create_with_backing(tmp, fmt):
    qimg("create", "-q", "-f", fmt, os.path.join(tmp, f"base.{fmt}"), "32M")
    same_write(tmp, [f"base.{fmt}"], "create", "-f", "qcow", "-b", f"base.{fmt}", "-F", fmt, "top.qcow")
    same_write(tmp, [f"base.{fmt}"], "create", "-f", "qcow", "-b", f"base.{fmt}", "-F", fmt, "top.qcow", "64M")
    same_write(tmp, [f"base.{fmt}"], "create", "-f", "qcow", "-b", f"base.{fmt}", "top.qcow")
    same_write(tmp, [f"base.{fmt}"], "create", "-f", "qcow", "-u", "-b", "nosuch", "-F", fmt, "top.qcow", "1M")


# --- reading ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["64M", "1000000"])
def test_read(tmp, size):
    name = seeded(tmp, size=size, ops=WRITES if size == "64M" else ["write -P 0x11 0 100k", "write -P 2 976k 1k"])
    reads_same(tmp, name)
    reads_same(tmp, name, "-f", "qcow")


def test_read_empty(tmp):
    reads_same(tmp, seeded(tmp, "e.qcow"))


def test_probe_and_help_list(tmp):
    r = instar("--help")
    assert r.rc == 0 and " qcow " in r.out.split("Supported formats:")[1] + " ", r
    name = seeded(tmp, ops=["write -P 1 0 64k"])
    q = json.loads(qemu("info", "--output=json", name, cwd=tmp).out)
    i = json.loads(instar("info", "--output=json", name, cwd=tmp).out)
    assert q == i and i["format"] == "qcow" and "format-specific" not in i


@pytest.mark.parametrize("base_fmt", ["raw", "qcow", "qcow2"])
def test_chain_reads(tmp, base_fmt):
    qimg("create", "-q", "-f", base_fmt, os.path.join(tmp, f"base.{base_fmt}"), "32M")
    qemu_io("-f", base_fmt, "-c", "write -P 0x5a 0 32M", os.path.join(tmp, f"base.{base_fmt}"))
    seeded(tmp, "top.qcow", size="48M", args=["-b", f"base.{base_fmt}", "-F", base_fmt],
           ops=["write -P 1 1M 64k", "write -P 2 3000 700", "write -z 10M 1M", "write -P 3 40M 5k"])
    reads_same(tmp, "top.qcow")
    assert_same("compare", f"base.{base_fmt}", "top.qcow", cwd=tmp)


def test_compressed_reads(tmp):
    seeded(tmp, "src.qcow", ops=WRITES)
    compressed_copy(tmp, "src.qcow", "c.qcow")
    reads_same(tmp, "c.qcow")


# --- writing ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src_fmt", ["raw", "qcow2", "qcow"])
def test_convert_to_qcow(tmp, src_fmt):
    seeded(tmp, "s.qcow", ops=WRITES)
    src = f"s.{src_fmt}"
    if src_fmt != "qcow":
        qimg("convert", "-O", src_fmt, os.path.join(tmp, "s.qcow"), os.path.join(tmp, src))
    same_write(tmp, [src], "convert", "-O", "qcow", src, "out.qcow")
    same_write(tmp, [src], "convert", "-c", "-O", "qcow", src, "out.qcow")
    same_write(tmp, [src], "convert", "-p", "-c", "-O", "qcow", src, "out.qcow")
    same_write(tmp, [src], "convert", "-c", "-O", "qcow", "-o", "preallocation=full", src, "out.qcow")
    same_write(tmp, [src], "convert", "-c", "-O", "qcow", "-o", "encryption=on", src, "out.qcow")
    same_write(tmp, [src], "convert", *SECRET, "-c", "-O", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=s0",
               src, "out.qcow")


def test_convert_incompressible(tmp):
    with open(os.path.join(tmp, "r.raw"), "wb") as f:
        f.write(os.urandom(300 * 1024) + b"\x07" * (1 << 20) + os.urandom(5000))
    same_write(tmp, ["r.raw"], "convert", "-c", "-O", "qcow", "-f", "raw", "r.raw", "out.qcow")
    same_write(tmp, ["r.raw"], "convert", "-O", "qcow", "-f", "raw", "r.raw", "out.qcow")


def test_convert_with_backing_target(tmp):
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "b.raw"), "16M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 16M", os.path.join(tmp, "b.raw"))
    seeded(tmp, "t.qcow", size="16M", args=["-b", "b.raw", "-F", "raw"],
           ops=["write -P 1 1M 64k", "write -P 2 3000 700", "write -z 10M 1M"])
    same_write(tmp, ["b.raw", "t.qcow"], "convert", "-O", "qcow", "-B", "b.raw", "-F", "raw", "t.qcow", "o.qcow")
    same_write(tmp, ["b.raw", "t.qcow"], "convert", "-O", "qcow", "-o", "backing_file=b.raw,backing_fmt=raw",
               "t.qcow", "o.qcow")


def test_convert_into_existing(tmp):
    seeded(tmp, "s.qcow", size="16M", ops=["write -P 1 0 3M", "write -P 2 7M 5k"])
    seeded(tmp, "d.qcow", size="16M", ops=["write -P 9 1M 4M", "write -P 8 12M 64k"])
    same_write(tmp, ["s.qcow", "d.qcow"], "convert", "-n", "-O", "qcow", "s.qcow", "d.qcow")
    compressed_copy(tmp, "d.qcow", "dc.qcow")
    same_write(tmp, ["s.qcow", "dc.qcow"], "convert", "-n", "-O", "qcow", "s.qcow", "dc.qcow")


@pytest.mark.parametrize("base_fmt", ["raw", "qcow", "qcow2"])
def test_commit(tmp, base_fmt):
    qimg("create", "-q", "-f", base_fmt, os.path.join(tmp, f"base.{base_fmt}"), "16M")
    qemu_io("-f", base_fmt, "-c", "write -P 0x5a 0 9M", os.path.join(tmp, f"base.{base_fmt}"))
    seeded(tmp, "top.qcow", size="16M", args=["-b", f"base.{base_fmt}", "-F", base_fmt],
           ops=["write -P 1 1M 64k", "write -P 2 3000 700", "write -P 3 12M 2M"])
    # qemu's mirror-based commit writes with parallel requests, which place clusters of a qcow or qcow2 base
    # in no fixed order: there the guest data must agree (and the qcow tables be sound).
    files = [f"base.{base_fmt}", "top.qcow"]
    dq, di = pair(tmp, files)
    q = qemu("commit", "top.qcow", cwd=dq)
    i = instar("commit", "top.qcow", cwd=di)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (q, i)
    for f in files:
        a, b = os.path.join(dq, f), os.path.join(di, f)
        if base_fmt != "raw" and f == files[0]:
            assert qemu("compare", a, b).rc == 0
            if base_fmt == "qcow":
                _qcow_tables_sound(b)
            continue
        assert open(a, "rb").read() == open(b, "rb").read(), f"{f} differs"
    if base_fmt == "raw":
        same_write(tmp, files, "commit", "-d", "top.qcow")


def test_commit_qcow2_top_into_qcow_base(tmp):
    seeded(tmp, "base.qcow", size="16M", ops=["write -P 0x5a 0 9M"])
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow", "-F", "qcow", os.path.join(tmp, "top.qcow2"))
    qemu_io("-c", "write -P 1 1M 64k", "-c", "write -P 2 3000 700", "-c", "write -P 3 12M 2M",
            os.path.join(tmp, "top.qcow2"))
    dq, di = pair(tmp, ["base.qcow", "top.qcow2"])
    q = qemu("commit", "-d", "top.qcow2", cwd=dq)
    i = instar("commit", "-d", "top.qcow2", cwd=di)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (q, i)
    # qemu's mirror-based commit writes with parallel requests: the guest data must agree.
    assert qemu("compare", os.path.join(dq, "base.qcow"), os.path.join(di, "base.qcow")).rc == 0


@pytest.mark.parametrize("args", [["rebase", "-u", "-b", "base.raw", "-F", "raw", "top.qcow"],
                                  ["rebase", "-b", "", "top.qcow"],
                                  ["rebase", "-b", "other.raw", "-F", "raw", "top.qcow"],
                                  ["rebase", "-u", "-b", "", "top.qcow"]])
def test_rebase_refused(tmp, args):
    """qcow cannot change its backing file: qemu-img says so after a safe rebase has copied the data."""
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "base.raw"), "8M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 8M", os.path.join(tmp, "base.raw"))
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "other.raw"), "8M")
    seeded(tmp, "top.qcow", size="8M", args=["-b", "base.raw", "-F", "raw"], ops=["write -P 1 1M 64k"])
    same_write(tmp, ["base.raw", "other.raw", "top.qcow"], *args)


@pytest.mark.parametrize("args", [["amend", "-o", "size=1G", "IMG"], ["snapshot", "-c", "s", "IMG"],
                                  ["snapshot", "-l", "IMG"], ["measure", "-O", "qcow", "IMG"],
                                  ["measure", "-O", "qcow", "--size", "1G"], ["bitmap", "--add", "IMG", "b"],
                                  ["commit", "IMG"], ["resize", "IMG", "+1M"], ["resize", "--shrink", "IMG", "1M"],
                                  ["check", "IMG"], ["check", "-r", "all", "IMG"], ["check", "--output=json", "IMG"]])
def test_refused(tmp, args):
    """Operations qemu-img 7.2 cannot do on qcow answer with its message and exit code, the image untouched."""
    name = seeded(tmp, ops=["write -P 0x11 0 1M"])
    same_write(tmp, [name], *[name if a == "IMG" else a for a in args])


# --- guest writes through the library against qemu-io --------------------------------------------------------

def _ops(seed, size, count=60):
    import random
    r = random.Random(seed)
    ops = []
    for _ in range(count):
        off = r.randrange(size - 1)
        n = min(r.choice([1, 100, 511, 512, 4096, 5000, 65536, 70000, 1 << 20]), size - off)
        if r.random() < 0.75:
            ops.append(("w", off, n, r.randrange(1, 256)))
        else:
            a = off - off % 4096 if r.random() < 0.5 else off
            ops.append(("z", a, min(n, size - a), 0))
    return ops


def _library_writes(path, ops, key=None):
    import instar as lib
    kw = {"key_secret": key} if key else {}
    img = lib.Image(path, flags=lib.OPEN_READ_WRITE, **kw)
    try:
        for kind, off, n, pat in ops:
            if kind == "w":
                img.write(off, bytes([pat]) * n)
            else:
                img.write_zeroes(off, n, may_unmap=False)
    finally:
        img.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("kind", ["plain", "backing", "compressed", "encrypted"])
def test_library_writes_match_qemu_io(tmp, seed, kind):
    """The same unaligned writes and zero writes, through qemu-io and through instar's Python binding, give
    byte-identical qcow files (qemu's block layer pads to sectors; instar writes bytes: the result is the same)."""
    size = 24 << 20
    extra = []
    if kind == "backing":
        qimg("create", "-q", "-f", "raw", os.path.join(tmp, "b.raw"), str(size))
        qemu_io("-f", "raw", "-c", f"write -P 0x5a 0 {size}", os.path.join(tmp, "b.raw"))
        extra = ["-b", "b.raw", "-F", "raw"]
    if kind == "encrypted":
        extra = [*SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=s0"]
    for name in ("q.qcow", "i.qcow"):
        if kind == "compressed":
            seeded(tmp, "src.qcow", size=str(size), ops=["write -P 0x21 0 5M", "write -P 0x22 9M 3M"])
            compressed_copy(tmp, "src.qcow", name)
        else:
            qimg("create", "-q", "-f", "qcow", *extra, os.path.join(tmp, name), str(size))
    ops = _ops(seed, size)
    script = []
    for k, off, n, pat in ops:
        script += ["-c", f"write -P {pat} {off} {n}" if k == "w" else f"write -z {off} {n}"]
    if kind == "encrypted":
        qemu_io(*SECRET, "--image-opts", *script, IMG_OPTS.format(os.path.join(tmp, "q.qcow")))
    else:
        qemu_io(*script, os.path.join(tmp, "q.qcow"), cwd=tmp)
    _library_writes(os.path.join(tmp, "i.qcow"), ops, key="passw0rd" if kind == "encrypted" else None)
    with open(os.path.join(tmp, "q.qcow"), "rb") as a, open(os.path.join(tmp, "i.qcow"), "rb") as b:
        assert a.read() == b.read()


# --- encryption ---------------------------------------------------------------------------------------------

def test_encrypted(tmp):
    args = [*SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=s0"]
    seeded(tmp, "e.qcow", size="16M", args=args)
    qemu_io(*SECRET, "--image-opts", "-c", "write -P 7 0 1M", "-c", "write -P 8 3000 5000",
            IMG_OPTS.format(os.path.join(tmp, "e.qcow")))
    opts = IMG_OPTS.format("e.qcow")
    for a in (["info", "e.qcow"], ["info", "--output=json", "e.qcow"], ["map", "--output=json", "e.qcow"],
              ["convert", "-O", "raw", "e.qcow", "x.raw"], ["compare", "e.qcow", "e.qcow"],
              [*SECRET, "map", "--output=json", "--image-opts", opts],
              [*SECRET, "compare", "--image-opts", opts, opts],
              [*SECRET, "info", "--image-opts", opts],
              ["info", "--image-opts", "driver=qcow,file.filename=e.qcow,encrypt.format=luks"]):
        assert_same(*a, cwd=tmp)
    same_write(tmp, ["e.qcow"], *SECRET, "convert", "--image-opts", opts, "-O", "raw", "x.raw")
    same_write(tmp, ["e.qcow"], *SECRET, "convert", "--image-opts", opts, "-O", "qcow", "-o",
               "encrypt.format=aes,encrypt.key-secret=s0", "y.qcow")
    same_write(tmp, ["e.qcow"], *SECRET, "convert", "--image-opts", opts, "-O", "qcow", "-c", "y.qcow")
    seeded(tmp, "p.qcow", size="1M")
    assert_same("info", "--image-opts", "driver=qcow,file.filename=p.qcow,encrypt.format=aes", cwd=tmp)


# --- hostile variants ---------------------------------------------------------------------------------------

# Header fields: magic, version, backing offset, backing size, mtime, size, cluster bits, l2 bits, padding,
# crypt method, l1 offset.
HFMT = ">IIQIIQBBHIQ"
FIELDS = ["magic", "version", "backing_offset", "backing_size", "mtime", "size", "cluster_bits", "l2_bits",
          "padding", "crypt", "l1_offset"]


def _hostile(tmp, field, value):
    if field.startswith("backing"):
        qimg("create", "-q", "-f", "raw", os.path.join(tmp, "b.raw"), "16M")
    name = seeded(tmp, size="16M", args=["-b", "b.raw", "-F", "raw"] if field.startswith("backing") else [],
                  ops=["write -P 0x11 0 40k", "write -P 0x22 9M 8k"])
    p = os.path.join(tmp, name)
    with open(p, "rb") as f:
        h = list(struct.unpack(HFMT, f.read(48)))
    if field == "truncated":
        with open(p, "r+b") as f:
            f.truncate(value)
        return name
    if field in ("l1", "l2", "data", "compressed"):
        with open(p, "r+b") as f:
            f.seek(h[10])
            l2 = struct.unpack(">Q", f.read(8))[0]
            if field == "l1":
                f.seek(h[10])
            else:
                f.seek(l2)
            if field == "compressed":
                value |= 1 << 63
            f.write(struct.pack(">Q", value))
        return name
    h[FIELDS.index(field)] = value
    with open(p, "r+b") as f:
        f.write(struct.pack(HFMT, *h))
    return name


HOSTILE = [
    ("magic", 0x12345678), ("version", 0), ("version", 2), ("version", 3), ("version", 0xFFFFFFFF),
    ("size", 0), ("size", 1), ("size", 2), ("size", 1 << 62), ("size", 0xFFFFFFFFFFFFFFFF), ("size", 1 << 50),
    ("cluster_bits", 0), ("cluster_bits", 8), ("cluster_bits", 17), ("cluster_bits", 255), ("cluster_bits", 16),
    ("l2_bits", 5), ("l2_bits", 14), ("l2_bits", 255), ("l2_bits", 13), ("crypt", 2), ("crypt", 0xFFFFFFFF),
    ("crypt", 1), ("l1_offset", 0), ("l1_offset", 1 << 62), ("l1_offset", 0xFFFFFFFFFFFFF000),
    ("l1_offset", 1 << 40), ("l1_offset", 3),
    ("backing_offset", 0xFFFFFFFFFFFFFFFF), ("backing_offset", 1 << 40), ("backing_size", 1023),
    ("backing_size", 1024), ("backing_size", 0xFFFFFFFF), ("backing_size", 0),
    ("l1", 1 << 60), ("l1", 4097), ("l1", 0xFFFFFFFFFFFFF000), ("l1", 1 << 40), ("l1", 0),
    ("l2", 1 << 60), ("l2", 4097), ("l2", 0x7FFFFFFFFFFFF000), ("l2", 1 << 40), ("l2", 100),
    ("compressed", 0), ("compressed", 4096), ("compressed", 0x7FFFFFFFFFFFFFFF), ("compressed", 1 << 40),
    ("truncated", 10), ("truncated", 47), ("truncated", 48), ("truncated", 600), ("truncated", 5000),
]
READ_CMDS = [["info", "IMG"], ["info", "--output=json", "IMG"], ["map", "--output=json", "IMG"],
             ["convert", "-O", "raw", "IMG", "out.raw"], ["compare", "IMG", "IMG"], ["check", "IMG"],
             ["info", "-f", "qcow", "IMG"]]
WRITE_CMDS = [["convert", "-n", "-O", "qcow", "IMG", "IMG"], ["commit", "IMG"], ["resize", "IMG", "+1M"]]


def limited(args, cwd, tool):
    argv = ["prlimit", "--as=%d" % (1 << 30), "--cpu=60", "--", INSTAR] if tool == "i" else ["qemu-img"]
    p = subprocess.run(argv + args, cwd=cwd, capture_output=True, text=True, timeout=600, errors="replace")
    return p.returncode, normalize(p.stdout), normalize(p.stderr)


@pytest.mark.parametrize("field,value", HOSTILE, ids=[f"{f}={v:#x}" for f, v in HOSTILE])
def test_hostile(tmp, field, value):
    name = _hostile(tmp, field, value)
    for cmd in READ_CMDS:
        args = [name if a == "IMG" else a for a in cmd]
        q = limited(args, tmp, "q")
        i = limited(args, tmp, "i")
        assert 0 <= i[0] < 128 and "Fatal error" not in i[2], (args, i)
        assert i == q, (args, q, i)
    for cmd in WRITE_CMDS:
        results = []
        for who in ("q", "i"):
            d = os.path.join(tmp, "w" + who)
            os.makedirs(d, exist_ok=True)
            for f in os.listdir(tmp):
                if os.path.isfile(os.path.join(tmp, f)):
                    shutil.copyfile(os.path.join(tmp, f), os.path.join(d, f))
            args = [name if a == "IMG" else a for a in cmd]
            results.append(limited(args, d, who))
            with open(os.path.join(d, name), "rb") as f:
                results.append(f.read())
        qr, qb, ir, ib = results
        assert 0 <= ir[0] < 128 and "Fatal error" not in ir[2], (cmd, ir)
        assert ir == qr, (cmd, qr, ir)
        assert ib == qb, (cmd, "image bytes differ")


# --- crash consistency --------------------------------------------------------------------------------------

CRASH_CHILD = r"""
import os, random, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bindings", "python"))
import instar
path, size, cluster, seed, stop_after = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
r = random.Random(seed)
img = instar.Image(path, flags=instar.OPEN_READ_WRITE)
for i in range(100000):
    if i == stop_after:
        os.kill(os.getpid(), signal.SIGKILL)
    c = r.randrange(size // cluster)
    n = r.randrange(1, 40) * cluster
    off = min(c * cluster + r.randrange(cluster), size - 1)
    n = min(n, size - off)
    if r.random() < 0.8:
        img.write(off, bytes([r.randrange(1, 256)]) * n)
    else:
        img.write_zeroes(off, n, may_unmap=False)
"""


def _qcow_tables_sound(path):
    """qemu has no check for qcow: instead every table and cluster offset must lie inside the file, sector
    aligned, used once, and not over the header or the L1 table."""
    data = open(path, "rb").read()
    h = struct.unpack(HFMT, data[:48])
    cs, l2n = 1 << h[6], 1 << h[7]
    shift = h[6] + h[7]
    l1n = (h[5] + (1 << shift) - 1) >> shift
    used = {}
    meta_end = h[10] + 8 * l1n
    for i in range(l1n):
        l2 = struct.unpack_from(">Q", data, h[10] + 8 * i)[0]
        if not l2:
            continue
        assert l2 % cs == 0 and l2 >= meta_end and l2 + 8 * l2n <= len(data), (i, l2)
        for c in range(l2 // cs, (l2 + 8 * l2n + cs - 1) // cs):
            assert c not in used, (i, l2)
            used[c] = "l2"
        for j in range(l2n):
            e = struct.unpack_from(">Q", data, l2 + 8 * j)[0]
            if not e:
                continue
            assert e >> 63 == 0 and e % cs == 0 and e >= meta_end and e + cs <= len(data), (i, j, e)
            assert e // cs not in used, (i, j, e)
            used[e // cs] = "data"


@pytest.mark.parametrize("backing", [False, True])
def test_sigkill_leaves_consistent_tables(tmp, backing):
    """A writer killed part way leaves tables that point only at whole clusters it wrote (qemu-img has no qcow
    check to ask), and the image still reads the same through qemu-img and instar."""
    from conftest import ROOT  # noqa: E402
    size, cluster = 16 << 20, 4096
    if backing:
        qimg("create", "-q", "-f", "raw", os.path.join(tmp, "b.raw"), str(size))
        qemu_io("-f", "raw", "-c", f"write -P 0x5a 0 {size}", os.path.join(tmp, "b.raw"))
    for n in (1, 5, 20, 60):
        path = os.path.join(tmp, f"n{n}.qcow")
        extra = ["-b", "b.raw", "-F", "raw"] if backing else []
        qimg("create", "-q", "-f", "qcow", *extra, path, str(size))
        p = subprocess.run([sys.executable, "-c", CRASH_CHILD, ROOT, path, str(size), str(cluster), str(n), str(n)],
                           capture_output=True, cwd=tmp, timeout=300)
        assert p.returncode == -signal.SIGKILL, p
        _qcow_tables_sound(path)
        out = os.path.join(tmp, "r.raw")
        for tool in ("q", "i"):
            r = (qemu if tool == "q" else instar)("convert", "-O", "raw", path, out + tool, cwd=tmp)
            assert r.rc == 0, r
        assert open(out + "q", "rb").read() == open(out + "i", "rb").read()


def test_library_info(tmp):
    """The C API / Python binding describe qcow images as qemu-img info does (qemu prints no format-specific
    data for qcow), encrypted or not."""
    import instar as lib
    seeded(tmp, "p.qcow", size="16M", ops=["write -P 1 0 1M"])
    seeded(tmp, "e.qcow", size="16M", args=[*SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=s0"])
    for name, encrypted in (("p.qcow", None), ("e.qcow", True)):
        path = os.path.join(tmp, name)
        i = lib.info(path)
        assert (i.format, i.cluster_size, i.encrypted, i.format_specific) == ("qcow", 4096, encrypted, None), i
        assert lib.info_json(path).rstrip("\n") == qemu("info", "--output=json", path).out.rstrip("\n")
