"""instar.compat.nova against Nova's qemu-img helpers: each drop-in function is called, and the same call is
answered the way Nova answers it: the real qemu-img 7.2 run through oslo.concurrency's processutils.execute with
Nova's command line, its JSON read by oslo.utils' QemuImgInfo, its failures turned into Nova's exceptions. The
QemuImgInfo attributes, the exception types and their messages must be equal, and images that a call writes must
end up alike (qemu-img info, compare, check, bytes where qemu's layout is fixed).

Nova itself is not installed (it drags in most of OpenStack): `Ref` below follows nova/virt/images.py,
nova/privsep/qemu.py and nova/virt/libvirt/utils.py's contract (command lines, error handling), with the real
oslo pieces they use.
"""
import json
import os
import re
import shutil
import tempfile
import time

import pytest

from compat_helpers import (Pair, assert_alike_encrypted, copy_encrypted_sources, ensure_oslo, make_encrypted_sources,
                            masked_luks_info, mk_qcow2, mk_raw)
from conftest import QEMU_CPU_RACE, QEMU_RETRY_SECONDS, info_json, qemu, qemu_io, qimg

ensure_oslo()
from oslo_concurrency import processutils  # noqa: E402
from oslo_utils import imageutils  # noqa: E402

import instar  # noqa: E402
from instar.compat import _openstack, nova  # noqa: E402

MiB = 1 << 20


class Ref:
    """Nova's way, with the real qemu-img."""

    @staticmethod
    def qemu_img_info(path, format=None):
        if not os.path.exists(path):
            raise nova.DiskNotFound(location=path)
        cmd = ("env", "LC_ALL=C", "LANG=C", "qemu-img", "info", path, "--force-share", "--output=json")
        if format is not None:
            cmd += ("-f", format)
        try:
            out, err = processutils.execute(*cmd)
        except processutils.ProcessExecutionError as exp:
            if exp.exit_code == 1 and "No such file or directory" in exp.stderr:
                raise nova.DiskNotFound(location=path)
            raise nova.InvalidDiskInfo(reason="qemu-img failed to execute on %(path)s : %(exp)s"
                                       % {"path": path, "exp": exp})
        return imageutils.QemuImgInfo(out, format="json")

    @staticmethod
    def convert_image(source, dest, in_format, out_format, compress=False):
        if in_format is None:
            raise RuntimeError("convert_image without input format is a security risk")
        cache = "none" if _openstack.supports_direct_io(os.path.dirname(dest)) else "writeback"
        cmd = ("qemu-img", "convert", "-t", cache, "-O", out_format, "-f", in_format)
        cmd += (("-c",) if compress else ()) + (source, dest)
        try:
            processutils.execute(*cmd)
        except processutils.ProcessExecutionError as exp:
            raise nova.ImageUnacceptable(image_id=source, reason="Unable to convert image to %(format)s: %(exp)s"
                                         % {"format": out_format, "exp": exp})

    # nova/privsep/qemu.py's LUKS settings of an encrypted target
    LUKS = {"cipher-alg": "aes-256", "cipher-mode": "xts", "hash-alg": "sha256", "iter-time": 2000,
            "ivgen-alg": "plain64", "ivgen-hash-alg": "sha256"}

    @staticmethod
    def convert_encrypted(source, dest, in_format, out_format, compress=False, src_encryption=None,
                          dest_encryption=None):
        """Nova's convert_image with src_encryption / dest_encryption: the passphrases in secret files named by
        --object, an encrypted source given by --image-opts, the LUKS settings as -o options."""
        cache = "none" if _openstack.supports_direct_io(os.path.dirname(dest)) else "writeback"
        cmd = ["qemu-img", "convert", "-t", cache, "-O", out_format]
        if not src_encryption:
            cmd += ["-f", in_format]
        cmd += ["-c"] if compress else []
        with tempfile.TemporaryDirectory() as secrets:
            def secret_file(name, text):
                path = os.path.join(secrets, name)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
                return path
            if src_encryption:
                # a backing file with its own passphrase (backing_secret) is named on the same node as
                # backing.[encrypt.]key-secret, its passphrase in one more secret object
                node = "driver=%s,file.driver=file,file.filename=%s" % (in_format, source)
                if "secret" in src_encryption:
                    key = "encrypt.key-secret" if in_format == "qcow2" else "key-secret"
                    cmd += ["--object", "secret,id=sec0,file=" + secret_file("src", src_encryption["secret"])]
                    node += ",%s=sec0" % key
                if "backing_secret" in src_encryption:
                    bfmt = Ref.qemu_img_info(source).backing_file_format
                    cmd += ["--object", "secret,id=sec2,file=" + secret_file("back", src_encryption["backing_secret"])]
                    node += ",backing.%skey-secret=sec2" % ("" if bfmt == "luks" else "encrypt.")
                cmd += ["--image-opts", node]
            if dest_encryption:
                prefix = "encrypt." if out_format == "qcow2" else ""
                cmd += ["--object", "secret,id=sec1,file=" + secret_file("dest", dest_encryption["secret"]),
                        "-o", prefix + "key-secret=sec1"]
                if prefix:
                    cmd += ["-o", "encrypt.format=" + dest_encryption["format"]]
                for k, v in Ref.LUKS.items():
                    cmd += ["-o", "%s%s=%s" % (prefix, k, v)]
            cmd += ([] if src_encryption else [source]) + [dest]
            deadline = time.monotonic() + QEMU_RETRY_SECONDS
            while True:
                try:
                    processutils.execute(*cmd)
                    return
                except processutils.ProcessExecutionError as exp:
                    if QEMU_CPU_RACE in (exp.stderr or "") and time.monotonic() < deadline:
                        continue
                    raise nova.ImageUnacceptable(image_id=source, reason="Unable to convert image to %(format)s: "
                                                 "%(exp)s" % {"format": out_format, "exp": exp})

    @staticmethod
    def create_image(disk_format, path, size):
        processutils.execute("qemu-img", "create", "-f", disk_format, path, size)

    @staticmethod
    def create_cow_image(backing_file, path, size=None, encryption=None):
        opts = []
        if backing_file:
            base = Ref.qemu_img_info(backing_file)
            opts += ["backing_file=%s" % backing_file, "backing_fmt=%s" % base.file_format]
            if base.cluster_size is not None:
                opts.append("cluster_size=%s" % base.cluster_size)
        if size is not None:
            opts.append("size=%s" % size)
        cmd = ["qemu-img", "create", "-f", "qcow2"] + (["-o", ",".join(opts)] if opts else [])
        if not encryption:
            processutils.execute(*(cmd + [path]))
            return
        # an encrypted overlay: Nova's secret file and LUKS settings, as its encrypted conversions give them
        with tempfile.NamedTemporaryFile(mode="w", encoding="utf-8") as f:
            f.write(encryption["secret"])
            f.flush()
            cmd += ["--object", "secret,id=sec,file=" + f.name, "-o", "encrypt.key-secret=sec",
                    "-o", "encrypt.format=" + encryption["format"]]
            for k, v in Ref.LUKS.items():
                cmd += ["-o", "encrypt.%s=%s" % (k, v)]
            deadline = time.monotonic() + QEMU_RETRY_SECONDS
            while True:
                try:
                    processutils.execute(*(cmd + [path]))
                    return
                except processutils.ProcessExecutionError as exp:
                    if QEMU_CPU_RACE not in (exp.stderr or "") or time.monotonic() >= deadline:
                        raise

    @staticmethod
    def resize_image(path, size):
        processutils.execute("qemu-img", "resize", path, size)


def outcome(fn, *args, **kw):
    """("ok", the result's attributes) or (exception class name, its text, its attributes)."""
    try:
        r = fn(*args, **kw)
        return ("ok", None if r is None else vars(r))
    except Exception as e:
        attrs = {k: v for k, v in vars(e).items()}
        return (type(e).__name__, str(e), attrs)


def same(ref, ours, *args, **kw):
    q, i = outcome(ref, *args, **kw), outcome(ours, *args, **kw)
    assert i == q, "\n Nova's way: %r\n instar:     %r" % (q, i)
    return q


def test_real_oslo_classes():
    # beside oslo (as beside Nova) the drop-in hands back oslo's own classes
    assert nova.QemuImgInfo is imageutils.QemuImgInfo
    assert nova.ProcessExecutionError is processutils.ProcessExecutionError
    assert isinstance(nova.qemu_img_info(__file__), imageutils.QemuImgInfo)


@pytest.fixture
def imgs(tmp):
    raw = mk_raw(tmp)
    q = mk_qcow2(tmp)
    qimg("snapshot", "-c", "snap1", q)
    old = mk_qcow2(tmp, "old.qcow2", opts="compat=0.10,cluster_size=4096")
    top = mk_qcow2(tmp, "top.qcow2", size=None, writes=False, backing="q.qcow2", backing_fmt="qcow2")
    comp = os.path.join(tmp, "c.qcow2")
    qimg("convert", "-c", "-O", "qcow2", q, comp)
    bm = mk_qcow2(tmp, "bm.qcow2")
    qimg("bitmap", "--add", bm, "b0")
    return {"raw": raw, "qcow2": q, "old": old, "top": top, "compressed": comp, "bitmaps": bm}


@pytest.mark.parametrize("name", ["raw", "qcow2", "old", "top", "compressed", "bitmaps"])
def test_qemu_img_info(imgs, name):
    same(Ref.qemu_img_info, nova.qemu_img_info, imgs[name])
    fmt = "raw" if name == "raw" else "qcow2"
    same(Ref.qemu_img_info, nova.qemu_img_info, imgs[name], format=fmt)
    same(Ref.qemu_img_info, nova.qemu_img_info, imgs[name], format="raw")


def test_qemu_img_info_errors(imgs, tmp):
    same(Ref.qemu_img_info, nova.qemu_img_info, os.path.join(tmp, "missing"))
    same(Ref.qemu_img_info, nova.qemu_img_info, imgs["raw"], format="qcow2")
    same(Ref.qemu_img_info, nova.qemu_img_info, tmp)
    broken = mk_qcow2(tmp, "broken.qcow2", size=None, writes=False, backing="q.qcow2", backing_fmt="qcow2")
    os.rename(imgs["qcow2"], imgs["qcow2"] + ".away")
    same(Ref.qemu_img_info, nova.qemu_img_info, broken)
    with open(os.path.join(tmp, "junk.qcow2"), "wb") as f:
        f.write(b"QFI\xfb" + b"\xff" * 200)
    same(Ref.qemu_img_info, nova.qemu_img_info, os.path.join(tmp, "junk.qcow2"))


def setup_images(d):
    mk_raw(d)
    mk_qcow2(d)
    mk_qcow2(d, "c4k.qcow2", opts="cluster_size=4096")


CONVERT_CASES = [("q.qcow2", "qcow2", "raw", False), ("r.raw", "raw", "qcow2", False),
                 ("q.qcow2", "qcow2", "qcow2", True), ("r.raw", "qcow2", "raw", False),
                 ("missing.qcow2", "qcow2", "raw", False), ("q.qcow2", "qcow2", "bogus", False),
                 ("q.qcow2", None, "raw", False)]


@pytest.mark.parametrize("src,in_fmt,out_fmt,compress", CONVERT_CASES)
def test_convert_image(tmp, src, in_fmt, out_fmt, compress):
    pair = Pair(tmp, outcome=outcome, setup=setup_images)
    pair.run(Ref.convert_image, nova.convert_image, src, "out.img", in_format=in_fmt, out_format=out_fmt,
             compress=compress)
    pair.assert_alike("out.img", byte_equal=out_fmt == "qcow2" and not compress)


SRC_PASS, DEST_PASS = "src-pass", "dest-pass"


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory):
    return make_encrypted_sources(str(tmp_path_factory.mktemp("nova-enc")), SRC_PASS)


def unsecret(v):
    """An outcome with the secret files' names (temporary in Nova's way) left out."""
    return re.sub(r"(secret,id=sec\d),file=[^ ',]+", r"\1,file=*", repr(v))


DEST = {"secret": DEST_PASS, "format": "luks"}
SRC = {"secret": SRC_PASS}
ENCRYPTED_CASES = [("r.raw", "raw", "qcow2", None, DEST), ("q.qcow2", "qcow2", "luks", None, DEST),
                   ("e.luks", "luks", "raw", SRC, None), ("e.qcow2", "qcow2", "qcow2", SRC, DEST),
                   ("e.qcow2", "qcow2", "raw", {"secret": "wrong"}, None), ("e.luks", "raw", "raw", SRC, None),
                   ("missing.luks", "luks", "raw", SRC, None)]


@pytest.mark.parametrize("src,in_fmt,out_fmt,src_enc,dest_enc", ENCRYPTED_CASES)
def test_convert_image_encrypted(tmp, encrypted, monkeypatch, src, in_fmt, out_fmt, src_enc, dest_enc):
    # Nova's LUKS settings, with a short PBKDF time on both sides so the test stays quick
    assert nova.LUKS_OPTIONS == Ref.LUKS
    monkeypatch.setitem(Ref.LUKS, "iter-time", 10)
    monkeypatch.setitem(nova.LUKS_OPTIONS, "iter-time", 10)
    def setup(d):
        setup_images(d)
        copy_encrypted_sources(encrypted, d)
    pair = Pair(tmp, outcome=lambda *a, **kw: unsecret(outcome(*a, **kw)), setup=setup)
    pair.run(Ref.convert_encrypted, nova.convert_image, src, "out.img", in_format=in_fmt, out_format=out_fmt,
             src_encryption=src_enc, dest_encryption=dest_enc)
    if dest_enc:
        assert_alike_encrypted(pair, "out.img", DEST_PASS)
    else:
        pair.assert_alike("out.img")


TOP_PASS = "top-pass"
# the overlays' own writes: a range over the middle of the backing file's data
TOP_WRITE = "write -P 0x55 1040384 600000"


@pytest.fixture(scope="module")
def chained(encrypted, tmp_path_factory):
    """ov.qcow2 over e.qcow2 and ovl.qcow2 over e.luks: LUKS qcow2 overlays (TOP_PASS) on backing files with a
    passphrase of their own (SRC_PASS), each with data of its own over the backing file's."""
    d = str(tmp_path_factory.mktemp("nova-chain"))
    copy_encrypted_sources(encrypted, d)
    objs = ["--object", "secret,id=t,data=" + TOP_PASS, "--object", "secret,id=s,data=" + SRC_PASS]
    ov, ovl = os.path.join(d, "ov.qcow2"), os.path.join(d, "ovl.qcow2")
    qimg("create", "-q", *objs, "-f", "qcow2", "-o", "backing_file=e.qcow2,backing_fmt=qcow2,encrypt.format=luks,"
         "encrypt.key-secret=t,encrypt.iter-time=10", ov)
    qemu_io(*objs, "--image-opts", "driver=qcow2,file.filename=%s,encrypt.key-secret=t,backing.encrypt.key-secret=s"
            % ov, "-c", TOP_WRITE)
    # the same top over e.luks (same guest data as e.qcow2): creating LUKS costs qemu's PBKDF benchmark, a
    # backing link changed in place does not
    shutil.copyfile(ov, ovl)
    qimg("rebase", "-u", *objs, "-b", "e.luks", "-F", "luks", "--image-opts",
         "driver=qcow2,file.filename=%s,encrypt.key-secret=t" % ovl)
    return d


def copy_chained(src, d):
    for name in ("e.luks", "e.qcow2", "ov.qcow2", "ovl.qcow2"):
        shutil.copyfile(os.path.join(src, name), os.path.join(d, name))


def chain_node(path, top_pass_id="t", backing_id="s"):
    """The --image-opts node of a chained overlay, both passphrases named (the backing file's by its format)."""
    bfmt = info_json(path).get("backing-filename-format")
    return "driver=qcow2,file.filename=%s,encrypt.key-secret=%s,backing.%skey-secret=%s" % (
        path, top_pass_id, "" if bfmt == "luks" else "encrypt.", backing_id)


BACKING = {"secret": TOP_PASS, "backing_secret": SRC_PASS}
BACKING_CASES = [("ov.qcow2", "raw", BACKING, None), ("ovl.qcow2", "raw", BACKING, None),
                 ("ovl.qcow2", "qcow2", BACKING, DEST), ("ov.qcow2", "qcow2", BACKING, None),
                 ("ov.qcow2", "raw", {"secret": TOP_PASS, "backing_secret": "wrong"}, None),
                 ("ovl.qcow2", "raw", {"secret": TOP_PASS, "backing_secret": "wrong"}, None),
                 ("ov.qcow2", "raw", SRC, None)]


@pytest.mark.parametrize("src,out_fmt,src_enc,dest_enc", BACKING_CASES)
def test_convert_image_backing_secret(tmp, chained, monkeypatch, src, out_fmt, src_enc, dest_enc):
    """An encrypted overlay whose backing file has another passphrase, converted: Nova's command line (the
    backing passphrase named on the source node) and the drop-in (the library's backing_key_secret) give the
    same result, the same exception for a wrong or missing backing passphrase."""
    monkeypatch.setitem(Ref.LUKS, "iter-time", 10)
    monkeypatch.setitem(nova.LUKS_OPTIONS, "iter-time", 10)
    pair = Pair(tmp, outcome=lambda *a, **kw: unsecret(outcome(*a, **kw)), setup=lambda d: copy_chained(chained, d))
    pair.run(Ref.convert_encrypted, nova.convert_image, src, "out.img", in_format="qcow2", out_format=out_fmt,
             src_encryption=src_enc, dest_encryption=dest_enc)
    if dest_enc:
        assert_alike_encrypted(pair, "out.img", DEST_PASS)
    else:
        pair.assert_alike("out.img")
    out = os.path.join(pair.i, "out.img")
    if os.path.exists(out) and not dest_enc:
        # the guest data is the chain's: qemu-img compare of the overlay (both passphrases) and instar's output
        r = qemu("compare", "--object", "secret,id=t,data=" + TOP_PASS, "--object", "secret,id=s,data=" + SRC_PASS,
                 "--image-opts", chain_node(os.path.join(pair.q, src)),
                 "driver=%s,file.filename=%s" % (out_fmt, out))
        assert r.rc == 0 and r.out == "Images are identical.\n", r


def test_backing_secret_info_and_library(chained, tmp):
    """qemu_img_info of the overlays (no passphrase needed, as for qemu-img info), and the library calls with
    backing_key_secret against qemu-img with both secret objects: info of the chain, compare, a read, a map."""
    copy_chained(chained, tmp)
    objs = ["--object", "secret,id=t,data=" + TOP_PASS, "--object", "secret,id=s,data=" + SRC_PASS]
    for name in ("ov.qcow2", "ovl.qcow2"):
        p = os.path.join(tmp, name)
        same(Ref.qemu_img_info, nova.qemu_img_info, p)
        # (qemu-img info reads metadata only: the chain's info needs no passphrase, and the library's is the same
        # with both given)
        r = qemu("info", "--output=json", "--backing-chain", p)
        assert instar.info_json(p, backing_chain=True, key_secret=TOP_PASS, backing_key_secret=SRC_PASS) == r.out, r
        base = os.path.join(tmp, "e.qcow2" if name == "ov.qcow2" else "e.luks")
        # the overlay differs from its backing file only where it wrote: qemu and the library agree where
        r = qemu("compare", *objs, "--image-opts", chain_node(p),
                 "driver=%s,file.filename=%s,%s=s" % (info_json(base)["format"], base,
                                                      "encrypt.key-secret" if base.endswith("qcow2") else "key-secret"))
        c = instar.compare_result(p, base, key_secret1=TOP_PASS, backing_key_secret1=SRC_PASS, key_secret2=SRC_PASS)
        assert (c.exit_status, c.message) == (r.rc, r.out), r
        with instar.Image(p, key_secret=TOP_PASS, backing_key_secret=SRC_PASS) as img:
            data = img.read(0, 3 * MiB)
        raw = os.path.join(tmp, name + ".raw")
        qimg("convert", *objs, "--image-opts", chain_node(p), "-O", "raw", raw)
        with open(raw, "rb") as f:
            assert data == f.read()
        r = qemu("map", "--output=json", *objs, "--image-opts", chain_node(p))
        assert instar.map(p, key_secret=TOP_PASS, backing_key_secret=SRC_PASS) == json.loads(r.out), r
        with pytest.raises(instar.InstarError, match="Invalid password"):
            instar.Image(p, key_secret=TOP_PASS, backing_key_secret="wrong")


def test_backing_secret_commit(tmp, chained):
    """instar.commit with backing_key_secret writes into an encrypted base as qemu-img commit does given the
    base's passphrase on the overlay's node (backing.encrypt.key-secret)."""
    def setup(d):
        copy_chained(chained, d)
    pair = Pair(tmp, outcome=outcome, setup=setup)
    objs = ["--object", "secret,id=t,data=" + TOP_PASS, "--object", "secret,id=s,data=" + SRC_PASS]
    qimg("commit", *objs, "--image-opts", chain_node(os.path.join(pair.q, "ov.qcow2")))
    instar.commit(os.path.join(pair.i, "ov.qcow2"), key_secret=TOP_PASS, backing_key_secret=SRC_PASS)
    node = "driver=qcow2,file.filename=%s,encrypt.key-secret=s"
    r = qemu("compare", *objs, "--image-opts", node % os.path.join(pair.q, "e.qcow2"),
             node % os.path.join(pair.i, "e.qcow2"))
    assert r.rc == 0 and r.out == "Images are identical.\n", r
    for name in ("ov.qcow2", "e.qcow2"):
        assert json.dumps(info_json(os.path.join(pair.i, name))).replace(pair.i, pair.q) \
            == json.dumps(info_json(os.path.join(pair.q, name)))
    r = qemu("check", *objs, "--image-opts", node % os.path.join(pair.i, "e.qcow2"))
    assert r.rc == 0, r
    with pytest.raises(instar.InstarError, match="Invalid password"):
        instar.commit(os.path.join(pair.i, "ov.qcow2"), key_secret=TOP_PASS, backing_key_secret="wrong")


@pytest.mark.parametrize("base", ["e.luks"])
def test_create_cow_image_encrypted_on_encrypted_backing(tmp, chained, monkeypatch, base):
    """An encrypted overlay created on a backing file with a passphrase of its own (qemu-img create reads only
    the backing file's size, so no backing passphrase is needed), then read through both passphrases."""
    monkeypatch.setitem(Ref.LUKS, "iter-time", 10)
    monkeypatch.setitem(nova.LUKS_OPTIONS, "iter-time", 10)
    pair = Pair(tmp, outcome=lambda *a, **kw: unsecret(outcome(*a, **kw)), setup=lambda d: copy_chained(chained, d))
    pair.run(lambda b, p: Ref.create_cow_image(b, p, encryption=DEST),
             lambda b, p: nova.create_cow_image(b, p, encryption=DEST), base, "new.qcow2")
    qp, ip = os.path.join(pair.q, "new.qcow2"), os.path.join(pair.i, "new.qcow2")
    assert json.loads(json.dumps(masked_luks_info(info_json(ip))).replace(pair.i, pair.q)) \
        == masked_luks_info(info_json(qp))
    objs = ["--object", "secret,id=t,data=" + DEST_PASS, "--object", "secret,id=s,data=" + SRC_PASS]
    r = qemu("compare", *objs, "--image-opts", chain_node(qp), chain_node(ip))
    assert r.rc == 0 and r.out == "Images are identical.\n", r
    r = qemu("check", *objs, "--image-opts", chain_node(ip))
    assert r.rc == 0, r


@pytest.mark.parametrize("fmt,size", [("raw", 4 * MiB), ("qcow2", 4 * MiB), ("qcow2", "10G"), ("raw", "1M"),
                                      ("qcow2", "12x"), ("bogus", 1024)])
def test_create_image(tmp, fmt, size):
    pair = Pair(tmp, outcome=outcome, setup=setup_images)
    ref = (lambda p, **kw: Ref.create_image(fmt, p, str(size)))
    ours = (lambda p, **kw: nova.create_image(fmt, p, size))
    pair.run(ref, ours, "new.img")
    pair.assert_alike("new.img", byte_equal=fmt == "qcow2")


@pytest.mark.parametrize("backing,size", [("q.qcow2", None), ("c4k.qcow2", 8 * MiB), ("r.raw", None),
                                          (None, 2 * MiB), ("missing.qcow2", None)])
def test_create_cow_image(tmp, backing, size):
    pair = Pair(tmp, outcome=outcome, setup=setup_images)
    if backing is None:
        pair.run(lambda p: Ref.create_cow_image(None, p, size), lambda p: nova.create_cow_image(None, p, size),
                 "new.qcow2")
    else:
        pair.run(lambda b, p: Ref.create_cow_image(b, p, size), lambda b, p: nova.create_cow_image(b, p, size),
                 backing, "new.qcow2")
    pair.assert_alike("new.qcow2", byte_equal=True)


@pytest.mark.parametrize("name,size", [("q.qcow2", 8 * MiB), ("r.raw", "5M"), ("q.qcow2", MiB),
                                       ("missing.raw", MiB)])
def test_resize_image(tmp, name, size):
    pair = Pair(tmp, outcome=outcome, setup=setup_images)
    pair.run(lambda p: Ref.resize_image(p, size), lambda p: nova.resize_image(p, size), name)
    pair.assert_alike(name, byte_equal=name.endswith(".qcow2"))


def test_lookalikes_without_oslo(imgs, tmp):
    """Where oslo is missing, the lookalike classes carry the same attributes and text."""
    ours = _openstack._QemuImgInfo()
    for k, v in vars(nova.qemu_img_info(imgs["top"])).items():
        setattr(ours, k, v)
    assert str(ours) == str(nova.qemu_img_info(imgs["top"]))
    assert set(vars(_openstack._QemuImgInfo())) == set(vars(imageutils.QemuImgInfo()))
    theirs = processutils.ProcessExecutionError(stdout="", stderr="qemu-img: x\n", exit_code=1, cmd="qemu-img y")
    mine = _openstack._ProcessExecutionError(stdout="", stderr="qemu-img: x\n", exit_code=1, cmd="qemu-img y")
    assert str(mine) == str(theirs) and vars(mine) == vars(theirs)
