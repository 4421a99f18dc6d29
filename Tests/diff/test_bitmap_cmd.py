"""`bitmap` against qemu-img 7.2: every operation and combination on copies of the same images, compared for
exit code, messages (qemu's generated node name "#blockNNN" has two random digits, so it is masked) and the
resulting file byte for byte; SIGKILL during add/merge leaves an image qemu-img check finds free of corruption;
damaged bitmap directories and tables are refused with one clear line, exit 1, and the file untouched, under a
1 GiB address-space limit.
"""
import hashlib
import os
import re
import resource
import shutil
import struct
import subprocess
import time

import pytest

from conftest import INSTAR, instar, qemu, qemu_io, qimg, run
from test_bitmap_writes import build, set_entry
from test_convert_bitmaps import directory, header

NODE = re.compile(r"#block\d+")


def norm(s):
    return NODE.sub("#blockN", s)


def same(tmp, srcs, args):
    """Runs `bitmap ARGS` with both tools, each on its own copies of `srcs` ({placeholder: path}); messages and
    every resulting file must match. Returns qemu's result."""
    res, files = {}, {}
    for tool in ("q", "i"):
        m = {}
        for ph, p in srcs.items():
            dst = os.path.join(tmp, f"{tool}_{ph}.qcow2")
            shutil.copyfile(p, dst)
            m[ph] = dst
        argv = ["bitmap"] + [m.get(a, a) for a in args]
        r = qemu(*argv, cwd=tmp) if tool == "q" else instar(*argv, cwd=tmp)
        out, err = r.out, r.err
        for ph, p in m.items():
            out, err = out.replace(p, ph), err.replace(p, ph)
        res[tool] = (r.rc, out, norm(err))
        files[tool] = {ph: open(p, "rb").read() for ph, p in m.items()}
    assert res["i"] == res["q"], res
    for ph in srcs:
        assert files["i"][ph] == files["q"][ph], f"{ph} differs after bitmap {args}"
    return res["q"]


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("bitmap-cmd"))
    out = {
        "X": build(tmp, "x", size="64M", before=["write -P 1 0 1M", "write -P 2 10M 3M"],
                   after=["write -P 3 20M 1M", "write -P 4 40M 100k"]),
        "S": build(tmp, "s", opts="cluster_size=4k", size="64M", bitmaps=(("sb", "-g", "8k"), ("sd", "--disable")),
                   after=["write -P 5 5M 2M", "write -P 6 63M 1M"]),
        "SMALL": build(tmp, "small", size="32M", bitmaps=(("sm",),), after=["write 0 64k"]),
        "ODD": build(tmp, "odd", opts="cluster_size=512", size="3000k",
                     bitmaps=(("fine", "-g", "512"), ("b2",)), after=["write -P 8 2900k 100k"]),
        "NONE": build(tmp, "none", size="64M", bitmaps=()),
    }
    inuse = os.path.join(tmp, "inuse.qcow2")
    shutil.copyfile(out["X"], inuse)
    set_entry(inuse, "b0", "flags", 1)
    out["INUSE"] = inuse
    v2 = os.path.join(tmp, "v2.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
    out["V2"] = v2
    raw = os.path.join(tmp, "r.raw")
    qimg("create", "-q", "-f", "raw", raw, "1M")
    out["RAW"] = raw
    return out


OPS = [
    ["--add", "X", "new"],
    ["--add", "-g", "128k", "X", "new"],
    ["--add", "-g", "512", "X", "new"],
    ["--add", "--disable", "X", "new"],
    ["--add", "X", "b1"],
    ["--add", "-g", "100", "X", "new"],
    ["--add", "-g", "4G", "X", "new"],
    ["--add", "-g", "2G", "X", "new"],
    ["--add", "-g", "abc", "X", "new"],
    ["--add", "X", ""],
    ["--add", "X", "n" * 1024],
    ["--add", "X", "n" * 1023],
    ["--remove", "X", "b1"],
    ["--remove", "X", "b0"],
    ["--remove", "X", "b2"],
    ["--remove", "X", "nope"],
    ["--remove", "SMALL", "sm"],
    ["--clear", "X", "b1"],
    ["--clear", "X", "nope"],
    ["--enable", "X", "b0"],
    ["--disable", "X", "b1"],
    ["--disable", "--enable", "X", "b1"],
    ["--merge", "b1", "X", "b0"],
    ["--merge", "b1", "X", "b2"],
    ["--merge", "b2", "X", "b1"],
    ["--merge", "b1", "X", "b1"],
    ["--merge", "nope", "X", "b1"],
    ["--merge", "b1", "X", "nope"],
    ["--add", "--merge", "b1", "X", "nb"],
    ["--add", "-g", "1M", "--merge", "b2", "X", "nb"],
    ["--add", "-g", "512", "--merge", "b2", "--disable", "X", "nb"],
    ["--remove", "--add", "X", "b1"],
    ["--add", "--remove", "X", "tmp"],
    ["--add", "--add", "X", "twice"],
    ["--clear", "--remove", "X", "b2"],
    ["--remove", "--remove", "X", "b2"],
    ["--remove", "X", "b1", "--remove"],
    ["--merge", "sb", "-b", "S", "X", "b1"],
    ["--merge", "sd", "-b", "S", "-F", "qcow2", "X", "b0"],
    ["--merge", "nope", "-b", "S", "X", "b1"],
    ["--merge", "sm", "-b", "SMALL", "X", "b1"],
    ["--merge", "b1", "-b", "X", "X", "b1"],
    ["--add", "--merge", "sb", "-b", "S", "NONE", "copy"],
    ["--add", "ODD", "n"],
    ["--merge", "fine", "ODD", "b2"],
    ["--merge", "b2", "ODD", "fine"],
    ["--remove", "ODD", "fine"],
    ["--clear", "ODD", "fine"],
    ["--add", "NONE", "first"],
    ["--add", "-g", "512", "--add", "NONE", "first"],
    ["--remove", "NONE", "x"],
    ["--remove", "INUSE", "b0"],
    ["--clear", "INUSE", "b0"],
    ["--enable", "INUSE", "b0"],
    ["--disable", "INUSE", "b0"],
    ["--merge", "b0", "INUSE", "b1"],
    ["--merge", "b1", "INUSE", "b0"],
    ["--add", "INUSE", "b5"],
    ["--clear", "INUSE", "b1"],
    ["--add", "V2", "b"],
    ["--remove", "V2", "b"],
    ["--add", "RAW", "b"],
    ["--add", "-f", "raw", "RAW", "b"],
    ["--clear", "-f", "raw", "RAW", "b"],
    ["--merge", "b1", "-f", "raw", "RAW", "b"],
    ["-f", "qcow2", "--add", "X", "f"],
    ["-f", "raw", "--add", "X", "f"],
    ["--add", "missing.qcow2", "b"],
    ["X", "b1"],
    ["--add", "X"],
    ["--add", "X", "a", "b"],
    ["-g", "64k", "--clear", "X", "b1"],
    ["-F", "qcow2", "--clear", "X", "b1"],
    ["-b", "S", "--clear", "X", "b1"],
    ["--bogus", "X", "b1"],
    ["--merge"],
    ["--object", "secret,id=s0,data=x", "--add", "X", "o"],
    ["--object", "bogus", "--add", "X", "o"],
]


@pytest.mark.parametrize("args", OPS, ids=lambda a: " ".join(x[:20] for x in a))
def test_bitmap_cli(imgs, tmp, args):
    srcs = {ph: imgs[ph] for ph in imgs if ph in args}
    same(tmp, srcs, args)


def test_image_opts(imgs, tmp):
    for tool, fn in (("q", qemu), ("i", instar)):
        p = os.path.join(tmp, f"{tool}.qcow2")
        shutil.copyfile(imgs["X"], p)
    q = qemu("bitmap", "--image-opts", "--add", f"driver=qcow2,file.filename={tmp}/q.qcow2", "io", cwd=tmp)
    i = instar("bitmap", "--image-opts", "--add", f"driver=qcow2,file.filename={tmp}/i.qcow2", "io", cwd=tmp)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
    assert open(f"{tmp}/q.qcow2", "rb").read() == open(f"{tmp}/i.qcow2", "rb").read()


def test_result_is_clean_and_usable(imgs, tmp):
    """After a chain of operations by instar, qemu-img check is clean and qemu-img reads the bitmaps."""
    p = os.path.join(tmp, "c.qcow2")
    shutil.copyfile(imgs["X"], p)
    for args in (["--add", "-g", "4k", p, "n1"], ["--merge", "b1", p, "n1"], ["--remove", p, "b2"],
                 ["--clear", p, "b0"], ["--merge", "sb", "-b", imgs["S"], p, "n1"]):
        r = instar("bitmap", *args)
        assert r.rc == 0, r
    c = run(["qemu-img", "check", p])
    assert c.rc == 0, c
    names = sorted(n for _, n, *_ in directory(p))
    assert names == ["b0", "b1", "n1"]


# ---- SIGKILL -----------------------------------------------------------------------------------------

def _dir_flags(path):
    try:
        return [fl for _, _, fl, *_ in directory(path)]
    except Exception:
        return None


@pytest.fixture(scope="module")
def kill_src(tmp_path_factory):
    """The image the SIGKILL-during runs work on (each on its own copy): built once, as its 512-byte clusters
    make qemu-io's writes slow."""
    return build(str(tmp_path_factory.mktemp("bitmap-kill")), "k", opts="cluster_size=512", size="1G",
                 bitmaps=[("b1", "-g", "512"), ("b2", "-g", "1k")],
                 after=[f"write {i * 7}M 3M" for i in range(0, 140, 9)])


@pytest.mark.parametrize("stage", ["marked", "growing"])
@pytest.mark.parametrize("args", [["--add", "-g", "512", "--merge", "b1", "--merge", "b2"],
                                  ["--merge", "b2", "--disable"]])
def test_kill_during_bitmap(tmp, kill_src, stage, args):
    """SIGKILL of `bitmap` once the image is marked in use ("marked") or once storing has grown the file
    ("growing"), polled on a deadline: qemu-img check finds no corruption afterwards."""
    path = os.path.join(tmp, "k.qcow2")
    shutil.copyfile(kill_src, path)
    size0 = os.path.getsize(path)
    p = subprocess.Popen([INSTAR, "bitmap", *args, path, "nb" if "--add" in args else "b1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        if stage == "marked":
            flags = _dir_flags(path)
            if flags and all(f & 1 for f in flags):
                break
        elif os.path.getsize(path) > size0:
            break
    p.kill()
    _, err = p.communicate(timeout=60)
    # Killed, or (on a fast run) finished without error before the condition was seen.
    assert p.returncode in (0, -9), err
    c = run(["qemu-img", "check", path])
    assert c.rc in (0, 3), c
    assert "ERROR" not in c.err and "corruption" not in c.out.lower(), c


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace for its syscall fault injection")
@pytest.mark.parametrize("args,name", [(["--add", "-g", "512", "--merge", "b1", "--merge", "b2"], "nb"),
                                       (["--remove", "--add", "--merge", "b2"], "b1"),
                                       (["--merge", "b2", "--clear", "--enable"], "b0")])
def test_kill_at_every_write(imgs, tmp, args, name):
    """SIGKILL at each file write of a `bitmap` run in turn (strace's fault injection kills the process on its
    k-th pwrite, k = 1 .. all of them): no wait on a clock, every point of the write order covered; qemu-img
    check finds no corruption at any of them."""
    src = imgs["X"]
    log = os.path.join(tmp, "writes.log")
    probe = os.path.join(tmp, "probe.qcow2")
    shutil.copyfile(src, probe)
    r = run(["strace", "-f", "-o", log, "-e", "trace=pwrite64", INSTAR, "bitmap", *args, probe, name])
    assert r.rc == 0, r
    writes = sum(1 for line in open(log) if "pwrite64(" in line)
    assert writes > 3, writes
    for k in range(1, writes + 1):
        path = os.path.join(tmp, f"k{k}.qcow2")
        shutil.copyfile(src, path)
        r = run(["strace", "-f", "-o", "/dev/null", "-e", "trace=pwrite64", "-e",
                 f"inject=pwrite64:signal=SIGKILL:when={k}", INSTAR, "bitmap", *args, path, name])
        assert r.rc in (-9, 128 + 9), (k, r)
        c = run(["qemu-img", "check", path])
        assert c.rc in (0, 3), (k, c)
        assert "ERROR" not in c.err and "corruption" not in c.out.lower(), (k, c)
        os.unlink(path)


# ---- hostile directories -----------------------------------------------------------------------------

def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _damaged(tmp):
    """(name, path) of copies of an image like X with one field of the bitmap metadata damaged."""
    out = []
    # Image X's bitmaps and layout with little data, so the ~1000 copies below stay small.
    base = build(tmp, "hx", size="64M", before=["write -P 1 0 64k"], after=["write -P 3 20M 64k", "write -P 4 40M 64k"])
    entries = directory(base)
    cs, _, hdr_len = header(base)
    pos0, _, _, _, toff, tsize = entries[0]
    fields = {"table_offset": (0, ">Q"), "table_size": (8, ">I"), "flags": (12, ">I"), "type": (16, ">B"),
              "gran": (17, ">B"), "name_size": (18, ">H"), "extra": (20, ">I")}
    values = [0, 1, 0x200, 0xff, 0xffff, 0xffffffff, 0x7fffffffffffffff, 0xffffffffffffffff]
    for fname, (off, fmt) in fields.items():
        bits = struct.calcsize(fmt) * 8
        # Each distinct value once (a value wider than the field is truncated to one already listed).
        for v in dict.fromkeys(v & ((1 << bits) - 1) for v in values):
            p = os.path.join(tmp, f"h_{fname}_{v:x}.qcow2")
            shutil.copyfile(base, p)
            with open(p, "r+b") as f:
                f.seek(pos0 + off)
                f.write(struct.pack(fmt, v))
            out.append((f"{fname}={v:x}", p))
    for v in (1 << 63, 0x1ff, 0x201, 1 << 60, 0xffffffffffffffff, 1):
        p = os.path.join(tmp, f"h_table_{v:x}.qcow2")
        shutil.copyfile(base, p)
        with open(p, "r+b") as f:
            f.seek(toff)
            f.write(struct.pack(">Q", v))
        out.append((f"table[0]={v:x}", p))
    # The extension: count, directory size, directory offset.
    with open(base, "rb") as f:
        area = f.read(cs)
    pos = hdr_len
    while pos + 8 <= len(area):
        t, ln = struct.unpack(">II", area[pos:pos + 8])
        if t == 0x23852875:
            break
        pos += 8 + ((ln + 7) & ~7)
    for fname, off, fmt, vals in (("count", 8, ">I", (0, 1, 5, 0xffffffff)), ("dirsize", 16, ">Q", (0, 8, 1 << 40)),
                                  ("diroff", 24, ">Q", (0, 1, 1 << 40, 0x200))):
        for v in vals:
            p = os.path.join(tmp, f"h_ext_{fname}_{v:x}.qcow2")
            shutil.copyfile(base, p)
            with open(p, "r+b") as f:
                f.seek(pos + off)
                f.write(struct.pack(fmt, v))
            out.append((f"ext.{fname}={v:x}", p))
    return out


HOSTILE_OPS = [["--add"], ["--remove"], ["--clear"], ["--enable"], ["--disable"], ["--merge", "b1"],
               ["--add", "--merge", "b2"]]


def test_hostile_directories(tmp):
    """Each damaged image through every operation: instar is never killed, never hangs; where qemu-img refuses
    the image (exit 1, file untouched), instar refuses it with one "instar: " line, exit 1, the file untouched."""
    checked = 0
    for name, path in _damaged(tmp):
        orig = open(path, "rb").read()
        for op in HOSTILE_OPS:
            target = "nb" if op[0] == "--add" else "b2"
            q_path, i_path = path + ".q", path + ".i"
            shutil.copyfile(path, q_path)
            shutil.copyfile(path, i_path)
            q = run(["qemu-img", "bitmap", *op, q_path, target])
            p = subprocess.run([INSTAR, "bitmap", *op, i_path, target], capture_output=True, text=True,
                               timeout=60, preexec_fn=_limit)
            assert p.returncode >= 0, (name, op, p)
            if q.rc == 1 and open(q_path, "rb").read() == orig:
                checked += 1
                assert p.returncode == 1, (name, op, q, p)
                lines = p.stderr.splitlines()
                assert lines and lines[0].startswith("instar: ") and len(lines) <= max(2, len(q.err.splitlines())), \
                    (name, op, q, p)
                assert open(i_path, "rb").read() == orig, (name, op, "instar wrote to a refused image")
    assert checked > 50, checked


def test_encrypted_image(tmp):
    """A LUKS-encrypted qcow2 through --object secret and --image-opts, byte for byte; without the key both
    refuse the same way."""
    e = os.path.join(tmp, "e.qcow2")
    qimg("create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw", "-o",
         "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", e, "16M")
    run(["qemu-io", "--object", "secret,id=s,data=pw", "--image-opts",
         f"driver=qcow2,file.filename={e},encrypt.key-secret=s", "-c", "write -P 5 0 1M"])
    outs = {}
    for tool, fn in (("q", qemu), ("i", instar)):
        p = os.path.join(tmp, f"{tool}.qcow2")
        shutil.copyfile(e, p)
        a = fn("bitmap", "--object", "secret,id=s,data=pw", "--add", "--image-opts",
               f"driver=qcow2,file.filename={p},encrypt.key-secret=s", "bm")
        b = fn("bitmap", "--add", p, "bm2")
        outs[tool] = (a.rc, a.err.replace(p, "P"), b.rc, b.err.replace(p, "P"), open(p, "rb").read())
    assert outs["i"] == outs["q"], (outs["q"][:4], outs["i"][:4])
