"""resize: differential tests against qemu-img 7.2 (messages, exit codes, resulting images)."""
import os
import shutil

import pytest

from conftest import assert_same, both, check_clean, info_json, instar, qemu, qemu_io, qimg


def info(path, *extra):
    return info_json(path, *extra, keep=("actual-size",))


def same_result(tmp, src, args, fmt="qcow2", compare_actual=False):
    """Copies `src` twice, runs the same resize with both tools, compares output, guest content and info."""
    a = os.path.join(tmp, "q." + fmt)
    b = os.path.join(tmp, "i." + fmt)
    shutil.copyfile(src, a)
    shutil.copyfile(src, b)
    q = qemu("resize", *[x if x != "IMG" else a for x in args])
    i = instar("resize", *[x if x != "IMG" else b for x in args])
    assert (i.rc, i.out, i.err.replace(b, a)) == (q.rc, q.out, q.err), (q, i)
    if fmt == "qcow2":
        check_clean(b)
    ia, ib = info(a), info(b)
    if not compare_actual:
        ia.pop("actual-size", None)
        ib.pop("actual-size", None)
    assert ia == ib
    r = qemu("compare", "-f", fmt, "-F", fmt, a, b)
    assert r.rc == 0, r
    return q


def seeded(tmp, fmt="qcow2", size="4M", opts=None, writes=()):
    path = os.path.join(tmp, "src." + fmt)
    args = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", opts]
    qimg(*args, path, size)
    for off, ln, pat in writes:
        qemu_io("-f", fmt, "-c", f"write -P {pat} {off} {ln}", path)
    return path


RAW_CASES = [
    ["-f", "raw", "IMG", "8M"],
    ["-f", "raw", "IMG", "+1M"],
    ["-f", "raw", "IMG", "+1000"],
    ["-f", "raw", "--shrink", "IMG", "1M"],
    ["-f", "raw", "--shrink", "IMG", "1000"],
    ["-f", "raw", "--shrink", "IMG", "-1M"],
    ["-f", "raw", "IMG", "1M"],
    ["-f", "raw", "--preallocation=falloc", "IMG", "+3M"],
    ["-f", "raw", "--preallocation=full", "IMG", "+2M"],
    ["-f", "raw", "--preallocation=metadata", "IMG", "+2M"],
    ["-f", "raw", "--preallocation=full", "IMG", "1M"],
    ["-f", "raw", "-q", "IMG", "5M"],
    ["IMG", "6M"],
]


@pytest.mark.parametrize("args", RAW_CASES, ids=[" ".join(a) for a in RAW_CASES])
def test_raw(tmp, args):
    src = seeded(tmp, "raw", writes=[(0, 65536, 1), (4 * 1024 * 1024 - 4096, 4096, 2)])
    same_result(tmp, src, args, fmt="raw", compare_actual="full" in " ".join(args))


ERROR_CASES = [
    ["IMG"],
    ["resize"],
    ["IMG", "1", "2"],
    ["-f", "qcow2", "IMG", "0"],
    ["-f", "qcow2", "IMG", "-5M"],
    ["-f", "qcow2", "IMG", "--", "-5M"],
    ["-f", "qcow2", "IMG", "+1x"],
    ["-f", "qcow2", "IMG", "16E"],
    ["-f", "qcow2", "IMG", "8E"],
    ["-f", "qcow2", "IMG", "1000"],
    ["-f", "qcow2", "IMG", "+1000"],
    ["-f", "qcow2", "--shrink", "IMG", "1000"],
    ["-f", "qcow2", "IMG", "2M"],
    ["-f", "qcow2", "--preallocation=bogus", "IMG", "+1M"],
    ["-f", "qcow2", "--preallocation=full", "IMG", "2M"],
    ["-f", "qcow2", "--shrink", "--preallocation=metadata", "IMG", "2M"],
    ["-f", "qcow2", "-U", "IMG", "8M"],
    ["-f", "raw", "IMG", "8M"],
    ["-f", "qcow2", "--image-opts", "driver=qcow2,file.filename=IMG", "8M"],
    ["--image-opts", "driver=qcow2,file.filename=IMG", "8M"],
    ["-f", "qcow2", "nosuch.qcow2", "8M"],
    ["-f", "qcow2", "IMG", "4M"],
]


@pytest.mark.parametrize("args", ERROR_CASES, ids=[" ".join(a) for a in ERROR_CASES])
def test_messages(tmp, args):
    src = seeded(tmp, writes=[(0, 65536, 1)])
    a = os.path.join(tmp, "q.qcow2")
    b = os.path.join(tmp, "i.qcow2")
    shutil.copyfile(src, a)
    shutil.copyfile(src, b)
    q = qemu("resize", *[x.replace("IMG", "q.qcow2") for x in args], cwd=tmp)
    i = instar("resize", *[x.replace("IMG", "i.qcow2") for x in args], cwd=tmp)
    assert (i.rc, i.out, i.err.replace("i.qcow2", "q.qcow2")) == (q.rc, q.out, q.err)
    assert info(a) | {"actual-size": 0} == info(b) | {"actual-size": 0}


QCOW2_LAYOUTS = [
    "cluster_size=65536",
    "cluster_size=512",
    "cluster_size=2M",
    "cluster_size=65536,extended_l2=on",
    "cluster_size=4096,refcount_bits=1",
    "compat=0.10",
    "cluster_size=65536,lazy_refcounts=on",
]

QCOW2_RESIZES = [
    ["IMG", "8M"],
    ["IMG", "+1G"],
    ["IMG", "3T"],
    ["--shrink", "IMG", "2M"],
    ["--shrink", "IMG", "1536K"],
    ["--shrink", "IMG", "512"],
    ["--shrink", "IMG", "-1M"],
]


@pytest.mark.parametrize("layout", QCOW2_LAYOUTS)
@pytest.mark.parametrize("args", QCOW2_RESIZES, ids=[" ".join(a) for a in QCOW2_RESIZES])
def test_qcow2(tmp, layout, args):
    if "cluster_size=512" in layout and "3T" in args:
        pytest.skip("an L1 table that large is refused by both, slowly")
    src = seeded(tmp, opts=layout, writes=[(0, 65536, 1), (1024 * 1024, 512 * 1024, 2),
                                           (4 * 1024 * 1024 - 4096, 4096, 3)])
    # Files come out byte-identical; below 4 KiB clusters the file system's block accounting of the last,
    # partly used block may differ, so actual-size is compared from 4 KiB clusters up.
    same_result(tmp, src, ["-f", "qcow2", *args], compare_actual="cluster_size=512" not in layout)
    if "cluster_size=512" not in layout or "--shrink" in args:
        # (Growing 512-byte-cluster images over refcount-block boundaries places the new L1 table a few
        # clusters apart from qemu: the write path's allocator creates refcount blocks in another order.)
        assert open(os.path.join(tmp, "q.qcow2"), "rb").read() == open(os.path.join(tmp, "i.qcow2"), "rb").read()


@pytest.mark.parametrize("args", [["IMG", "+64M"], ["--shrink", "IMG", "1M"], ["--shrink", "IMG", "3M"]])
def test_qcow2_snapshots(tmp, args):
    src = seeded(tmp, writes=[(0, 65536, 1), (3 * 1024 * 1024, 1024 * 1024, 2)])
    qimg("snapshot", "-c", "s1", src)
    qemu_io("-f", "qcow2", "-c", "write -P 9 3M 64k", src)
    same_result(tmp, src, ["-f", "qcow2", *args])


def test_qcow2_v2_snapshots_refused(tmp):
    src = seeded(tmp, opts="compat=0.10", writes=[(0, 65536, 1)])
    qimg("snapshot", "-c", "s1", src)
    same_result(tmp, src, ["-f", "qcow2", "IMG", "+1M"])


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("layout", ["cluster_size=65536", "cluster_size=16384,extended_l2=on", "cluster_size=512"])
def test_qcow2_preallocation(tmp, mode, layout):
    src = seeded(tmp, opts=layout, writes=[(0, 65536, 1)])
    same_result(tmp, src, ["-f", "qcow2", f"--preallocation={mode}", "IMG", "+3M"])


def test_qcow2_backing(tmp):
    base = seeded(tmp, writes=[(0, 8 * 1024 * 1024 // 2, 7)], size="8M")
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 5 1M 64k", top)
    same_result(tmp, top, ["-f", "qcow2", "IMG", "6M"])


def test_probed_raw_warning(tmp):
    src = seeded(tmp, "raw")
    same_result(tmp, src, ["IMG", "+1M"], fmt="raw")


def test_lock_held(tmp):
    from conftest import QemuNbd
    src = seeded(tmp)
    with QemuNbd(src, "qcow2", cwd=tmp, extra=["--persistent"]):
        q, i = both("resize", "-f", "qcow2", src, "8M")
        assert i == q


def test_python_and_c_api(tmp):
    import instar
    src = seeded(tmp, writes=[(0, 65536, 1), (3 * 1024 * 1024, 65536, 2)])
    a = os.path.join(tmp, "q.qcow2")
    b = os.path.join(tmp, "i.qcow2")
    for path in (a, b):
        shutil.copyfile(src, path)
    qimg("resize", "-f", "qcow2", a, "+2M")
    instar.resize(b, "+2M", fmt="qcow2")
    qimg("resize", "-f", "qcow2", "--shrink", a, "5M")
    instar.resize(b, 5 * 1024 * 1024, fmt="qcow2", shrink=True)
    assert open(a, "rb").read() == open(b, "rb").read()
    with pytest.raises(instar.InstarError) as e:
        instar.resize(b, 1024 * 1024, fmt="qcow2")
    assert "Use the --shrink option" in str(e.value)
    seen = []
    qimg("amend", "-o", "compat=0.10", a)
    instar.amend(b, compat="0.10", progress=seen.append)
    assert seen and seen[0] == 0 and seen[-1] == 100
    assert open(a, "rb").read() == open(b, "rb").read()
    with pytest.raises(instar.InstarError) as e:
        instar.amend(b, "cluster_size=4k")
    assert "only supported for image creation" in str(e.value)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("old,new", [("1000k", "6M"), ("1M", "12M"), ("640k", "1100k"), ("1M", "+512")])
def test_overlay_grows_over_longer_backing(tmp, compat, old, new):
    """qemu zeroes the grown tail of an overlay whose backing file is longer than its old size."""
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io("-f", "qcow2", "-c", "write -P 9 0 8M", base)
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-b", "base.qcow2", "-F", "qcow2", top, old)
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 4k", top)
    a, b = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    shutil.copyfile(top, a)
    shutil.copyfile(top, b)
    q = qemu("resize", "q.qcow2", new, cwd=tmp)
    i = instar("resize", "i.qcow2", new, cwd=tmp)
    assert (i.rc, i.out, i.err.replace("i.qcow2", "q.qcow2")) == (q.rc, q.out, q.err), (q, i)
    assert open(a, "rb").read() == open(b, "rb").read()
    if q.rc == 0:
        r = qemu("compare", "-f", "qcow2", "-F", "qcow2", a, b)
        assert r.rc == 0, r


HOLD = r"""
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
# OFD read lock on one byte of QEMU's lock area (struct flock: type, whence, start, len, pid).
fcntl.fcntl(fd, getattr(fcntl, "F_OFD_SETLK", 37), struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, int(sys.argv[2]), 1, 0))
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("byte", [101, 103, 203])
@pytest.mark.parametrize("cmd", [["resize", "IMG", "+1M"], ["amend", "-o", "size=3M", "IMG"]])
def test_resize_permission_lock(tmp, fmt, byte, cmd):
    """Another process using (103) or refusing to share (203) the resize permission, as a second qemu
    would: resize takes the permission, and so does any writable qcow2 open."""
    import subprocess
    import sys
    if fmt == "raw" and cmd[0] == "amend":
        pytest.skip("raw has no amend")
    img = os.path.join(tmp, "img")
    qimg("create", "-q", "-f", fmt, img, "1M")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, img, str(byte)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = [x if x != "IMG" else "img" for x in cmd]
        args.insert(1, "-f")
        args.insert(2, fmt)
        q = qemu(*args, cwd=tmp)
        i = instar(*args, cwd=tmp)
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err.replace("qemu-img:", "instar:")), (q, i)
    finally:
        holder.stdin.close()
        holder.wait()


PREALLOC_LAYOUTS = [
    "cluster_size=65536",
    "cluster_size=512",
    "cluster_size=2M",
    "extended_l2=on",
    "cluster_size=16384,extended_l2=on",
    "lazy_refcounts=on",
    "refcount_bits=1",
    "refcount_bits=64",
    "cluster_size=512,refcount_bits=1",
    "compat=0.10",
]

# (virtual size, resize steps); "P" stands for the preallocation option under test.
PREALLOC_SEQUENCES = [
    ("4M", [["P", "+256k"]]),
    ("4M", [["P", "+1M"]]),               # 512-byte clusters: across an L2 table boundary
    ("4M", [["P", "64M"]]),               # 512-byte clusters: many more refcount blocks
    ("4001k", [["P", "+100k"]]),          # a partial first cluster (copy-on-write of its head)
    ("4001k", [["P", "+1k"]]),
    ("4M", [["--shrink", "2M"], ["P", "+1M"]]),
    ("4M", [["--shrink", "1M"], ["P", "8M"], ["--shrink", "3M"], ["P", "+3M"]]),
]


def _both_resize_steps(tmp, src, steps, mode, prefix=()):
    a, b = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    shutil.copyfile(src, a)
    shutil.copyfile(src, b)
    for st in steps:
        st = [f"--preallocation={mode}" if x == "P" else x for x in st]
        q = qemu("resize", *prefix, *st, "q.qcow2", cwd=tmp)
        i = instar("resize", *prefix, *st, "i.qcow2", cwd=tmp)
        assert (i.rc, i.out, i.err.replace("i.qcow2", "q.qcow2")) == (q.rc, q.out, q.err), (st, q, i)
    return a, b


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("layout", PREALLOC_LAYOUTS)
@pytest.mark.parametrize("size,steps", PREALLOC_SEQUENCES,
                         ids=[f"{s}:" + ";".join(" ".join(x) for x in st) for s, st in PREALLOC_SEQUENCES])
def test_qcow2_preallocation_same_file(tmp, mode, layout, size, steps):
    """Preallocated growth leaves the very file qemu-img leaves: falloc/full put an exact refcount area (and so a
    new refcount table) at the end of the used clusters with the data clusters after it; metadata copies the
    partial head and tail clusters as qemu's copy-on-write does."""
    if "cluster_size=512" not in layout and "64M" in str(steps) and mode != "metadata":
        pytest.skip("the large growth is for refcount-block coverage with small clusters")
    writes = ["write -P 1 0 64k", "write -P 2 1M 64k"]
    if size == "4001k":
        writes.append("write -P 3 3968k 33k")
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", layout, src, size)
    for w in writes:
        qemu_io("-f", "qcow2", "-c", w, src)
    a, b = _both_resize_steps(tmp, src, steps, mode)
    assert open(a, "rb").read() == open(b, "rb").read()
    check_clean(b)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("layout", ["cluster_size=65536", "cluster_size=512", "cluster_size=16384,extended_l2=on"])
@pytest.mark.parametrize("case", ["bitmaps", "snapshot", "backing", "compressed-head"])
def test_qcow2_preallocation_same_file_special(tmp, mode, layout, case):
    """The same over persistent bitmaps (stored again at close), a snapshot sharing the partial head cluster, a
    longer backing file (whose data the head copy keeps and the grown area hides) and a compressed head."""
    src = os.path.join(tmp, "src.qcow2")
    size = "4096k" if case == "bitmaps" else "4001k"
    extra = []
    if case == "backing":
        base = os.path.join(tmp, "base.qcow2")
        qimg("create", "-q", "-f", "qcow2", base, "8M")
        qemu_io("-f", "qcow2", "-c", "write -P 9 0 8M", base)
        extra = ["-b", "base.qcow2", "-F", "qcow2"]
    qimg("create", "-q", "-f", "qcow2", "-o", layout, *extra, src, size)
    if case == "bitmaps":
        qemu_io("-f", "qcow2", "-c", "write -P 1 0 64k", src)
        qimg("bitmap", "--add", src, "b0")
        qimg("bitmap", "--add", "-g", "512k", src, "b1")
        qemu_io("-f", "qcow2", "-c", "write -P 7 2M 64k", src)
    elif case == "snapshot":
        qemu_io("-f", "qcow2", "-c", "write -P 1 3970k 2k", src)
        qimg("snapshot", "-c", "s1", src)
    elif case == "backing":
        qemu_io("-f", "qcow2", "-c", "write -P 1 3970k 2k", src)
    else:
        last = "4000k 1k" if "cluster_size=512" in layout else ("3984k 17k" if "16384" in layout else "3968k 33k")
        qemu_io("-f", "qcow2", "-c", f"write -c -P 5 {last}", src)
    for steps in ([["P", "+1M"]], [["P", "12M"]]):
        a, b = _both_resize_steps(tmp, src, steps, mode)
        assert open(a, "rb").read() == open(b, "rb").read(), steps
        check_clean(b)
        r = qemu("compare", "-f", "qcow2", "-F", "qcow2", a, b)
        assert r.rc == 0, r


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_qcow2_preallocation_same_file_luks(tmp, mode):
    """Encrypted images: the copied head and tail regions are encrypted at their new host offsets."""
    src = os.path.join(tmp, "src.qcow2")
    sec = ["--object", "secret,id=sec0,data=abc"]
    # A 10 ms PBKDF: qemu's default 2 s would be paid again at every open below (the key slot is not what is tested).
    qimg("create", "-q", "-f", "qcow2", *sec, "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
         src, "4001k")
    qemu_io(*sec, "--image-opts", "-c", "write -P 3 3900k 101k",
            f"driver=qcow2,file.filename={src},encrypt.key-secret=sec0")
    a, b = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    shutil.copyfile(src, a)
    shutil.copyfile(src, b)
    for f, tool in ((a, qemu), (b, instar)):
        r = tool("resize", *sec, "--image-opts", f"--preallocation={mode}",
                 f"driver=qcow2,file.filename={f},encrypt.key-secret=sec0", "+100k")
        assert r.rc == 0, r
    assert open(a, "rb").read() == open(b, "rb").read()
