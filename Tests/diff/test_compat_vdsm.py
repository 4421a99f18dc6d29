"""instar.compat.vdsm against VDSM's qemuimg contract: each drop-in function is called, and the same call is
answered by the real qemu-img 7.2 run the way vdsm.storage.qemuimg runs it (the same command line, its JSON
output read the way VDSM reads it, a non-zero exit status turned into an error carrying cmd, rc, out and err).
Return values must be equal, errors must carry the same rc and stderr (and the same command line), and images
that an operation writes must end up alike (qemu-img info, compare, check; bytes where qemu's layout is fixed).

VDSM itself is not installed here (it is no PyPI package), so `Vdsm` below is a small stand-in written from its
module's contract (which command line each function runs, what it returns), not its code.
"""
import json
import os
import re
import shutil
import subprocess
import threading

import pytest

from compat_helpers import Pair, leak_one_cluster, mk_qcow2, mk_raw, zero_l1_refcount
from conftest import qemu, qemu_io, qimg

from instar.compat import vdsm

MiB = 1 << 20
DEADLINE = 300  # seconds a wait on another thread may take on a loaded machine


# ---- VDSM's way: run qemu-img, read its output --------------------------------------------------------------

class RefError(Exception):
    def __init__(self, cmd, rc, out, err):
        super().__init__(cmd, rc, out, err)
        self.cmd, self.rc, self.out, self.err = cmd, rc, out, err


def _run(cmd, progress=None):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600, check=False)
    if progress is not None:
        # VDSM's ProgressCommand reads the last "(NN.NN/100%)" record that qemu-img -p printed
        records = [r.strip() for r in p.stdout.split(b"\r") if r.strip().startswith(b"(")]
        if records:
            progress.append(float(records[-1][1:].split(b"/")[0]))
    if p.returncode != 0:
        # VDSM's ProgressCommand streams stdout for the progress and raises with out=b""
        raise RefError(cmd, p.returncode, p.stdout if progress is None else b"", p.stderr)
    return p.stdout if progress is None else None


class Vdsm:
    """The qemu-img command lines of vdsm.storage.qemuimg, run with the real qemu-img."""
    Q = "qemu-img"

    @staticmethod
    def info(image, format=None, unsafe=False, backing_chain=False):
        cmd = [Vdsm.Q, "info", "--output", "json"] + (["-f", format] if format else []) + (["-U"] if unsafe else [])
        cmd += (["--backing-chain"] if backing_chain else []) + [image]
        return json.loads(_run(cmd).decode("utf8"))

    @staticmethod
    def measure(image, format=None, output_format=None, backing=True, is_block=False):
        if not format and not backing:
            raise ValueError("backing=False requires specifying image format")
        node = {"file": {"driver": "host_device" if is_block else "file", "filename": image}}
        if format:
            node["driver"] = format
            if format == "qcow2" and not backing:
                node["backing"] = None
        cmd = [Vdsm.Q, "measure", "--output", "json"] + (["-O", output_format] if output_format else [])
        return json.loads(_run(cmd + ["json:" + json.dumps(node)]).decode("utf8"))

    @staticmethod
    def check(image, format=None):
        cmd = [Vdsm.Q, "check", "--output", "json"] + (["-f", format] if format else []) + [image]
        try:
            out = _run(cmd)
        except RefError as e:
            if e.rc != 3:
                raise
            out = e.out
        return {"offset": json.loads(out.decode("utf8"))["image-end-offset"]}

    @staticmethod
    def create(image, size=None, format=None, compat="1.1", backing=None, backingFormat=None, preallocation=None,
               unsafe=False):
        cmd = [Vdsm.Q, "create"]
        if format:
            cmd += ["-f", format] + (["-o", "compat=" + compat] if format == "qcow2" else [])
        cmd += (["-b", backing] if backing else []) + (["-F", backingFormat] if backingFormat else [])
        cmd += (["-o", "preallocation=" + preallocation] if preallocation else []) + (["-u"] if unsafe else [])
        return _run(cmd + [image] + ([str(size)] if size is not None else []))

    @staticmethod
    def convert(src, dst, srcFormat=None, dstFormat=None, compat="1.1", backing=None, backingFormat=None,
                preallocation=None, compressed=False, unordered_writes=False, create=True, bitmaps=False,
                target_is_zero=False, progress=None):
        cmd = [Vdsm.Q, "convert", "-p", "-t", "none", "-T", "none"] + (["-f", srcFormat] if srcFormat else [])
        opts = []
        if dstFormat:
            cmd += ["-O", dstFormat]
            if create and dstFormat == "qcow2":
                opts.append("compat=" + compat)
            if create and preallocation:
                opts.append("preallocation=" + preallocation)
        if backing:
            if create:
                opts += ["backing_file=" + backing] + (["backing_fmt=" + backingFormat] if backingFormat else [])
            else:
                cmd += ["-B", backing]
        if create:
            cmd += ["-o", ",".join(opts)] if opts else []
        else:
            cmd += ["-n"] + (["--target-is-zero"] if backing is None and target_is_zero else [])
        cmd += (["-c"] if compressed else []) + (["-W"] if unordered_writes else [])
        cmd += (["--bitmaps"] if bitmaps else []) + [src, dst]
        return _run(cmd, progress)

    @staticmethod
    def commit(top, topFormat, base=None, progress=None):
        cmd = [Vdsm.Q, "commit", "-p", "-t", "none"] + (["-b", base] if base else ["-d"]) + ["-f", topFormat, top]
        return _run(cmd, progress)

    @staticmethod
    def map(image):
        return json.loads(_run([Vdsm.Q, "map", "--output", "json", image]).decode("utf8"))

    @staticmethod
    def amend(image, compat):
        if compat not in ("0.10", "1.1"):
            raise ValueError("Invalid compat version %r" % compat)
        _run([Vdsm.Q, "amend", "-o", "compat=" + compat, image])

    @staticmethod
    def resize(image, newSize, format=None):
        _run([Vdsm.Q, "resize"] + (["-f", format] if format else []) + [image, str(newSize)])

    @staticmethod
    def rebase(image, backing, format=None, backingFormat=None, unsafe=False):
        cmd = [Vdsm.Q, "rebase", "-t", "none", "-T", "none"] + (["-u"] if unsafe else [])
        cmd += (["-f", format] if format else []) + (["-F", backingFormat] if backingFormat else [])
        return _run(cmd + ["-b", backing, image])

    @staticmethod
    def compare(img1, img2, img1_format=None, img2_format=None, strict=False):
        cmd = [Vdsm.Q, "compare", "-p"] + (["-f", img1_format] if img1_format else [])
        cmd += (["-F", img2_format] if img2_format else []) + (["-s"] if strict else []) + [img1, img2]
        return _run(cmd)

    @staticmethod
    def bitmap_add(image, bitmap, enable=True, granularity=None):
        cmd = [Vdsm.Q, "bitmap", "--add", "--enable" if enable else "--disable", image, bitmap]
        return _run(cmd + (["-g", str(granularity)] if granularity else []))

    @staticmethod
    def bitmap_remove(image, bitmap):
        return _run([Vdsm.Q, "bitmap", "--remove", image, bitmap])

    @staticmethod
    def bitmap_merge(src_image, src_bitmap, src_fmt, dst_image, dst_bitmap):
        return _run([Vdsm.Q, "bitmap", "--merge", src_bitmap, "-F", src_fmt, "-b", src_image, dst_image,
                     dst_bitmap])

    @staticmethod
    def bitmap_update(image, bitmap, enable):
        return _run([Vdsm.Q, "bitmap", "--enable" if enable else "--disable", image, bitmap])


def outcome(fn, *args, **kw):
    """("ok", value) or ("error", cmd, rc, out, err) or (exception type name, text). qemu's internal node names
    ("#block123", a counter of the process) read as "#blockN"."""
    try:
        return ("ok", fn(*args, **kw))
    except (RefError, vdsm.Error) as e:
        return ("error", e.cmd, e.rc, e.out, re.sub(rb"#block[0-9]+", b"#blockN", e.err))
    except ValueError as e:
        return ("ValueError", str(e))


def same(ref, ours, *args, **kw):
    q = outcome(ref, *args, **kw)
    i = outcome(ours, *args, **kw)
    assert i == q, "\n qemu-img (VDSM's way): %r\n instar.compat.vdsm:    %r" % (q, i)
    return q


def run_op(op):
    """Runs an operation object as VDSM does and returns what run() returned."""
    return op.run()


# ---- images -------------------------------------------------------------------------------------------------

@pytest.fixture
def imgs(tmp):
    """A set of images: raw, qcow2 1.1 and 0.10, compressed, an overlay with a relative backing name, bitmaps,
    vmdk."""
    raw = mk_raw(tmp)
    q = mk_qcow2(tmp)
    old = mk_qcow2(tmp, "old.qcow2", opts="compat=0.10")
    comp = os.path.join(tmp, "c.qcow2")
    qimg("convert", "-c", "-O", "qcow2", q, comp)
    top = mk_qcow2(tmp, "top.qcow2", size=None, writes=False, backing="q.qcow2", backing_fmt="qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 0x44 8k 4k", top)
    bm = mk_qcow2(tmp, "bm.qcow2")
    qimg("bitmap", "--add", bm, "b0")
    qimg("bitmap", "--add", "--disable", "-g", "128k", bm, "b1")
    vmdk = os.path.join(tmp, "v.vmdk")
    qimg("convert", "-O", "vmdk", raw, vmdk)
    return {"raw": raw, "qcow2": q, "old": old, "compressed": comp, "top": top, "bitmaps": bm, "vmdk": vmdk}


IMAGES = ["raw", "qcow2", "old", "compressed", "top", "bitmaps", "vmdk"]


# ---- read-only functions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", IMAGES)
def test_info(imgs, name):
    p = imgs[name]
    same(Vdsm.info, vdsm.info, p)
    same(Vdsm.info, vdsm.info, p, unsafe=True)
    same(Vdsm.info, vdsm.info, p, backing_chain=True)


def test_info_formats_and_errors(imgs, tmp):
    same(Vdsm.info, vdsm.info, imgs["qcow2"], format="qcow2")
    same(Vdsm.info, vdsm.info, imgs["qcow2"], format="raw")
    same(Vdsm.info, vdsm.info, imgs["raw"], format="qcow2")
    same(Vdsm.info, vdsm.info, os.path.join(tmp, "missing.qcow2"))
    same(Vdsm.info, vdsm.info, tmp)
    # trusted_image=False changes nothing in the answer (see the module's notes)
    assert vdsm.info(imgs["top"], trusted_image=False) == Vdsm.info(imgs["top"])


@pytest.mark.parametrize("name", IMAGES)
def test_measure(imgs, name):
    p = imgs[name]
    for out_fmt in (None, "raw", "qcow2"):
        same(Vdsm.measure, vdsm.measure, p, output_format=out_fmt)
    fmt = "raw" if name == "raw" else "qcow2"
    same(Vdsm.measure, vdsm.measure, p, format=fmt, output_format="qcow2")
    same(Vdsm.measure, vdsm.measure, p, format=fmt, output_format="qcow2", backing=False)


def test_measure_errors(imgs, tmp):
    same(Vdsm.measure, vdsm.measure, imgs["raw"], backing=False)
    same(Vdsm.measure, vdsm.measure, os.path.join(tmp, "missing.qcow2"), format="qcow2")
    same(Vdsm.measure, vdsm.measure, imgs["raw"], format="qcow2")
    # is_block names the host_device driver, which refuses a regular file alike and takes a device
    same(Vdsm.measure, vdsm.measure, imgs["qcow2"], format="qcow2", is_block=True)
    same(Vdsm.measure, vdsm.measure, os.path.join(tmp, "missing"), format="raw", is_block=True)
    for fmt, out_fmt in ((None, None), ("raw", "qcow2")):
        same(Vdsm.measure, vdsm.measure, "/dev/null", format=fmt, output_format=out_fmt, is_block=True)


@pytest.mark.parametrize("name", IMAGES)
def test_map(imgs, name):
    same(Vdsm.map, vdsm.map, imgs[name])


def test_map_error(tmp):
    same(Vdsm.map, vdsm.map, os.path.join(tmp, "missing.raw"))


@pytest.mark.parametrize("name", [n for n in IMAGES if n != "vmdk"])  # VDSM checks qcow2 and raw only
def test_check(imgs, name):
    same(Vdsm.check, vdsm.check, imgs[name])


def test_check_leaks_corruption_errors(imgs, tmp):
    leaky = mk_qcow2(tmp, "leaky.qcow2")
    leak_one_cluster(leaky)
    assert qemu("check", leaky).rc == 3
    r = same(Vdsm.check, vdsm.check, leaky)
    assert r[0] == "ok"
    bad = mk_qcow2(tmp, "bad.qcow2")
    zero_l1_refcount(bad)
    assert qemu("check", bad).rc == 2
    r = same(Vdsm.check, vdsm.check, bad)
    # rc 2, the JSON report in out and qemu-img's findings ("ERROR cluster 3 refcount=0 reference=1") in err
    assert r[0] == "error" and r[2] == 2 and r[4].startswith(b"ERROR cluster")
    same(Vdsm.check, vdsm.check, imgs["raw"], format="raw")
    same(Vdsm.check, vdsm.check, os.path.join(tmp, "missing.qcow2"))


@pytest.mark.parametrize("strict", [False, True])
def test_compare(imgs, tmp, strict):
    p = imgs["qcow2"]
    copy = os.path.join(tmp, "copy.raw")
    qimg("convert", "-O", "raw", p, copy)
    other = os.path.join(tmp, "other.qcow2")
    shutil.copy(p, other)
    qemu_io("-f", "qcow2", "-c", "write -P 0x77 2M 4k", other)
    bigger = os.path.join(tmp, "bigger.raw")
    shutil.copy(copy, bigger)
    os.truncate(bigger, 8 * MiB)

    def ours(*a, **kw):
        return vdsm.compare(*a, **kw).run()
    same(Vdsm.compare, ours, p, copy, strict=strict)
    same(Vdsm.compare, ours, p, copy, img1_format="qcow2", img2_format="raw", strict=strict)
    same(Vdsm.compare, ours, p, other, strict=strict)
    same(Vdsm.compare, ours, copy, bigger, strict=strict)
    same(Vdsm.compare, ours, p, os.path.join(tmp, "missing"), strict=strict)


# ---- operations that write: VDSM's way in one folder, ours in another with the same names ------------------

def ours_op(fn):
    """Calls fn (a function returning an operation object) and runs the operation."""
    def call(*a, **kw):
        return fn(*a, **kw).run()
    return call


def base_images(d):
    mk_raw(d)
    mk_qcow2(d)


CREATE_CASES = [
    dict(size=4 * MiB, format="raw"),
    dict(size=4 * MiB),
    dict(size=4 * MiB, format="qcow2"),
    dict(size=4 * MiB, format="qcow2", qcow2Compat="0.10"),
    dict(size=4 * MiB, format="qcow2", preallocation="metadata"),
    dict(size=4 * MiB, format="raw", preallocation="falloc"),
    dict(size=4 * MiB, format="raw", preallocation="full"),
    dict(format="qcow2", backing="q.qcow2", backingFormat="qcow2"),
    dict(size=8 * MiB, format="qcow2", backing="r.raw", backingFormat="raw"),
    dict(size=8 * MiB, format="qcow2", backing="missing.qcow2", backingFormat="qcow2", unsafe=True),
    dict(format="qcow2", backing="missing.qcow2", backingFormat="qcow2"),
]


@pytest.mark.parametrize("case", CREATE_CASES, ids=lambda c: ",".join("%s=%s" % kv for kv in c.items()))
def test_create(tmp, case):
    pair = Pair(tmp, outcome=outcome, setup=base_images)
    ref_kw = dict(case)
    compat = ref_kw.pop("qcow2Compat", "1.1")

    def ref(image, **kw):
        return Vdsm.create(image, compat=compat, **kw)  # stdout: "Formatting 'new.img', fmt=..."
    pair.run(ref, lambda image, **kw: ours_op(vdsm.create)(image, qcow2Compat=case.get("qcow2Compat"), **kw),
             "new.img", **ref_kw)
    pair.assert_alike("new.img", byte_equal=case.get("format") == "qcow2" or "backing" in case)


def test_create_invalid_arguments(tmp):
    with pytest.raises(ValueError):
        vdsm.create(os.path.join(tmp, "x"), 1, format="qcow2", qcow2Compat="2.0")
    with pytest.raises(ValueError):
        vdsm.create(os.path.join(tmp, "x"), 1, format="raw", preallocation="metadata")
    with pytest.raises(ValueError):
        vdsm.create(os.path.join(tmp, "x"), 1, format="raw", preallocation="bogus")
    assert not os.path.exists(os.path.join(tmp, "x"))


CONVERT_CASES = [
    ("q.qcow2", dict(dstFormat="raw")),
    ("q.qcow2", dict(srcFormat="qcow2", dstFormat="qcow2")),
    ("r.raw", dict(srcFormat="raw", dstFormat="qcow2", dstQcow2Compat="0.10")),
    ("r.raw", dict(dstFormat="qcow2", preallocation="metadata")),
    ("q.qcow2", dict(dstFormat="raw", preallocation="falloc")),
    ("q.qcow2", dict(dstFormat="qcow2", compressed=True)),
    ("q.qcow2", dict(dstFormat="qcow2", unordered_writes=True)),
    ("bm.qcow2", dict(dstFormat="qcow2", bitmaps=True)),
    ("top.qcow2", dict(dstFormat="qcow2", backing="q.qcow2", backingFormat="qcow2")),
    ("missing.qcow2", dict(dstFormat="qcow2")),
    ("r.raw", dict(srcFormat="qcow2", dstFormat="raw")),
]


def convert_images(d):
    base_images(d)
    top = mk_qcow2(d, "top.qcow2", size=None, writes=False, backing="q.qcow2", backing_fmt="qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 0x44 8k 4k", top)
    bm = mk_qcow2(d, "bm.qcow2")
    qimg("bitmap", "--add", bm, "b0")
    qimg("bitmap", "--add", "--disable", bm, "b1")


@pytest.mark.parametrize("src,case", CONVERT_CASES, ids=lambda c: str(c))
def test_convert(tmp, src, case):
    pair = Pair(tmp, outcome=outcome, setup=convert_images)
    compat = case.get("dstQcow2Compat") or "1.1"
    ref_kw = {k: v for k, v in case.items() if k != "dstQcow2Compat"}
    progress = {}

    def ref(s, dst, **kw):
        seen = []
        Vdsm.convert(s, dst, compat=compat, progress=seen, **kw)
        progress["q"] = seen[-1] if seen else None

    def ours(s, dst, **kw):
        op = vdsm.convert(s, dst, dstQcow2Compat=case.get("dstQcow2Compat"), **kw)
        assert op.progress == 0.0
        out = op.run()
        progress["i"] = op.progress
        return out
    r = pair.run(ref, ours, src, "out.img", **ref_kw)
    if r[0] == "ok":
        assert progress["i"] == progress["q"] == 100.0
    # -W lets qemu-img's coroutines write in any order, so its qcow2 cluster layout differs from run to run.
    pair.assert_alike("out.img", byte_equal=case.get("dstFormat") == "qcow2" and not case.get("compressed")
                      and not case.get("unordered_writes"))


def test_convert_into_existing_target(tmp):
    def setup(d):
        base_images(d)
        qimg("create", "-q", "-f", "qcow2", os.path.join(d, "dst.qcow2"), "4M")
        qimg("create", "-q", "-f", "qcow2", os.path.join(d, "dst2.qcow2"), "4M")
        qimg("create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", os.path.join(d, "dst3.qcow2"), "4M")
    pair = Pair(tmp, outcome=outcome, setup=setup)
    pair.run(lambda s, d, **kw: Vdsm.convert(s, d, progress=[], **kw), ours_op(vdsm.convert), "q.qcow2", "dst.qcow2",
             dstFormat="qcow2", create=False)
    pair.assert_alike("dst.qcow2")
    pair.run(lambda s, d, **kw: Vdsm.convert(s, d, progress=[], **kw), ours_op(vdsm.convert), "q.qcow2", "dst2.qcow2",
             dstFormat="qcow2", create=False, target_is_zero=True)
    pair.assert_alike("dst2.qcow2")
    pair.run(lambda s, d, **kw: Vdsm.convert(s, d, progress=[], **kw), ours_op(vdsm.convert), "q.qcow2", "dst3.qcow2",
             dstFormat="qcow2", create=False, backing="r.raw")
    pair.assert_alike("dst3.qcow2")


def chain_images(d):
    mk_raw(d, "base.raw", size=4 * MiB)
    mk_qcow2(d, "mid.qcow2", size=None, writes=False, backing="base.raw", backing_fmt="raw")
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 64k 64k", os.path.join(d, "mid.qcow2"))
    mk_qcow2(d, "top.qcow2", size=None, writes=False, backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 0x44 8k 4k", "-c", "write -P 0x55 2M 100k", os.path.join(d, "top.qcow2"))


@pytest.mark.parametrize("with_base", [False, True])
def test_commit(tmp, with_base):
    pair = Pair(tmp, outcome=outcome, setup=chain_images)
    progress = {}

    def ref(top, base=None):
        seen = []
        Vdsm.commit(top, "qcow2", base=base, progress=seen)
        progress["q"] = seen[-1] if seen else None

    def ours(top, base=None):
        op = vdsm.commit(top, "qcow2", base=base)
        out = op.run()
        progress["i"] = op.progress
        return out
    if with_base:
        pair.run(ref, ours, "top.qcow2", "base.raw")
    else:
        pair.run(ref, ours, "top.qcow2")
    assert progress["i"] == progress["q"] == 100.0
    for name in ("base.raw", "mid.qcow2", "top.qcow2"):
        pair.assert_alike(name)
    pair.run(ref, ours, "missing.qcow2")


def test_amend_resize(tmp):
    def setup(d):
        base_images(d)
        mk_qcow2(d, "old.qcow2", opts="compat=0.10")
    pair = Pair(tmp, outcome=outcome, setup=setup)
    pair.run(Vdsm.amend, vdsm.amend, "old.qcow2", compat="1.1")
    pair.assert_alike("old.qcow2", byte_equal=True)
    pair.run(Vdsm.amend, vdsm.amend, "q.qcow2", compat="0.10")
    pair.assert_alike("q.qcow2", byte_equal=True)
    pair.run(Vdsm.amend, vdsm.amend, "q.qcow2", compat="2.0")
    pair.run(Vdsm.amend, vdsm.amend, "r.raw", compat="1.1")
    pair.run(Vdsm.amend, vdsm.amend, "missing.qcow2", compat="1.1")
    pair.run(Vdsm.resize, vdsm.resize, "q.qcow2", newSize=8 * MiB)
    pair.assert_alike("q.qcow2", byte_equal=True)
    pair.run(Vdsm.resize, vdsm.resize, "r.raw", newSize=5 * MiB, format="raw")
    pair.assert_alike("r.raw")
    pair.run(Vdsm.resize, vdsm.resize, "q.qcow2", newSize=MiB)
    pair.run(Vdsm.resize, vdsm.resize, "missing.qcow2", newSize=MiB)


@pytest.mark.parametrize("unsafe", [False, True])
def test_rebase(tmp, unsafe):
    pair = Pair(tmp, outcome=outcome, setup=chain_images)

    def ref(image, backing, **kw):
        Vdsm.rebase(image, backing, **kw)
        return b""
    pair.run(ref, ours_op(vdsm.rebase), "top.qcow2", "base.raw", format="qcow2", backingFormat="raw", unsafe=unsafe)
    for name in ("base.raw", "mid.qcow2", "top.qcow2"):
        pair.assert_alike(name)
    pair.run(ref, ours_op(vdsm.rebase), "top.qcow2", "missing.raw", backingFormat="raw", unsafe=unsafe)
    pair.assert_alike("top.qcow2")


def test_bitmaps(tmp):
    def setup(d):
        mk_qcow2(d, "a.qcow2")
        mk_qcow2(d, "b.qcow2")
        mk_raw(d)

    def ref(fn):
        def call(*a, **kw):
            fn(*a, **kw)
            return b""
        return call
    pair = Pair(tmp, outcome=outcome, setup=setup)
    pair.run(ref(Vdsm.bitmap_add), ours_op(vdsm.bitmap_add), "a.qcow2", bitmap="b0")
    pair.run(ref(Vdsm.bitmap_add), ours_op(vdsm.bitmap_add), "a.qcow2", bitmap="b1", enable=False, granularity=131072)
    pair.run(ref(Vdsm.bitmap_add), ours_op(vdsm.bitmap_add), "b.qcow2", bitmap="dst")
    pair.run(ref(Vdsm.bitmap_add), ours_op(vdsm.bitmap_add), "a.qcow2", bitmap="b0")  # exists
    pair.run(ref(Vdsm.bitmap_add), ours_op(vdsm.bitmap_add), "r.raw", bitmap="b0")    # raw: no bitmaps
    pair.run(ref(Vdsm.bitmap_update), ours_op(vdsm.bitmap_update), "a.qcow2", bitmap="b1", enable=True)
    pair.run(ref(Vdsm.bitmap_update), ours_op(vdsm.bitmap_update), "a.qcow2", bitmap="b0", enable=False)
    pair.run(ref(Vdsm.bitmap_update), ours_op(vdsm.bitmap_update), "a.qcow2", bitmap="nosuch", enable=False)
    def merge(fn):
        return lambda src, dst: fn(src, "b0", "qcow2", dst, "dst")
    pair.run(ref(merge(Vdsm.bitmap_merge)), merge(ours_op(vdsm.bitmap_merge)), "a.qcow2", "b.qcow2")
    pair.run(ref(Vdsm.bitmap_remove), ours_op(vdsm.bitmap_remove), "a.qcow2", bitmap="b1")
    pair.run(ref(Vdsm.bitmap_remove), ours_op(vdsm.bitmap_remove), "a.qcow2", bitmap="b1")
    for name in ("a.qcow2", "b.qcow2"):
        pair.assert_alike(name)


# ---- the rest of the module's surface -----------------------------------------------------------------------

def test_constants_and_helpers():
    assert (vdsm.FORMAT.QCOW2, vdsm.FORMAT.QCOW, vdsm.FORMAT.QED, vdsm.FORMAT.RAW, vdsm.FORMAT.VMDK) == \
        ("qcow2", "qcow", "qed", "raw", "vmdk")
    assert (vdsm.PREALLOCATION.OFF, vdsm.PREALLOCATION.METADATA, vdsm.PREALLOCATION.FALLOC,
            vdsm.PREALLOCATION.FULL) == ("off", "metadata", "falloc", "full")
    assert vdsm.supports_compat("0.10") and vdsm.supports_compat("1.1") and not vdsm.supports_compat("1.0")
    assert vdsm.default_qcow2_compat() == "1.1"
    # qemu-img 7.2 has what VDSM probes for (bitmaps since 5.1, --target-is-zero in its help)
    assert vdsm.bitmaps_supported() is True
    assert vdsm.target_is_zero_supported() is (" [--target-is-zero] " in qemu("--help").out)
    e = vdsm.InvalidOutput(["qemu-img", "x"], b"out", "why")
    assert isinstance(e, vdsm.Error) and (e.cmd, e.out, e.reason) == (["qemu-img", "x"], b"out", "why")
    assert "why" in str(e)
    e = vdsm.Error(["qemu-img"], 1, b"o", b"e")
    assert (e.rc, e.out, e.err) == (1, b"o", b"e") and "rc=1" in str(e)


def test_operation_states(tmp):
    src = mk_qcow2(tmp)
    op = vdsm.convert(src, os.path.join(tmp, "a.raw"), dstFormat="raw")
    op.abort()
    with pytest.raises(vdsm.ActionStopped):
        op.run()
    assert not os.path.exists(os.path.join(tmp, "a.raw"))
    op = vdsm.create(os.path.join(tmp, "b.qcow2"), 1 * MiB, format="qcow2")
    assert op.run().startswith(b"Formatting '%s', fmt=qcow2 " % os.path.join(tmp, "b.qcow2").encode())
    op.abort()  # after the end: nothing happens
    with pytest.raises(RuntimeError):
        op.run()


@pytest.mark.parametrize("kind", ["convert", "commit", "rebase", "compare"])
def test_abort_from_another_thread(tmp, kind):
    """abort() from another thread while the library call runs: run() raises ActionStopped, and the images stay
    usable (qemu-img check clean)."""
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "64M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 24M", base)
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 0 24M", top)
    other = os.path.join(tmp, "other.qcow2")
    qimg("create", "-q", "-f", "qcow2", other, "64M")
    if kind == "convert":
        op = vdsm.convert(top, os.path.join(tmp, "out.qcow2"), dstFormat="qcow2")
    elif kind == "commit":
        op = vdsm.commit(top, "qcow2")
    elif kind == "rebase":
        op = vdsm.rebase(top, "other.qcow2", backingFormat="qcow2")
    else:
        op = vdsm.compare(top, base)
    in_call, aborted = threading.Event(), threading.Event()
    report = op._progress

    def hook(percent):
        report(percent)
        if not in_call.is_set():
            in_call.set()
            assert aborted.wait(DEADLINE)
    op._progress = hook
    result = {}

    def runner():
        try:
            result["value"] = op.run()
        except BaseException as e:  # handed to the main thread
            result["error"] = e
    t = threading.Thread(target=runner)
    t.start()
    assert in_call.wait(DEADLINE), "the operation never reported progress"
    op.abort()
    aborted.set()
    t.join(DEADLINE)
    assert not t.is_alive()
    assert isinstance(result.get("error"), vdsm.ActionStopped), result
    op.abort()  # again, after the end: nothing happens
    for p in (base, top):
        r = qemu("check", p)
        assert r.rc == 0, r
