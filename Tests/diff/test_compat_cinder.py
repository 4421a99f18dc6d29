"""instar.compat.cinder against Cinder's qemu-img helpers (cinder/image/image_utils.py): each drop-in function is
called, and the same call is answered the way Cinder answers it: the real qemu-img 7.2 run through
oslo.concurrency's processutils.execute with Cinder's command line, its JSON read by oslo.utils' QemuImgInfo
(with Cinder's renames luks -> raw, vpc -> vhd). Attributes, exception types and texts must be equal, and images
a call writes must end up alike.

Cinder itself is not installed: `Ref` follows its contract with the real oslo pieces. Cinder names the format
its format inspector detected with -f; the reference asks qemu-img's own probe for it.
"""
import json
import os
import time

import pytest

from compat_helpers import (Pair, assert_alike_encrypted, copy_encrypted_sources, ensure_oslo, make_encrypted_sources,
                            mk_qcow2, mk_raw)
from conftest import QEMU_CPU_RACE, QEMU_RETRY_SECONDS, qemu, qimg

ensure_oslo()
from oslo_concurrency import processutils  # noqa: E402
from oslo_utils import imageutils  # noqa: E402

from instar.compat import cinder  # noqa: E402

MiB = 1 << 20


class Ref:
    """Cinder's way, with the real qemu-img."""

    @staticmethod
    def qemu_img_info(path, run_as_root=True, force_share=False, allow_qcow2_backing_file=False):
        r = qemu("info", "--output=json", "-U", path)
        if r.rc == 0:
            probed = json.loads(r.out)
            data = probed.get("format-specific", {}).get("data", {})
            if probed["format"] == "qcow2" and (data.get("data-file") is not None or (
                    "backing-filename" in probed and not allow_qcow2_backing_file)):
                raise processutils.ProcessExecutionError(description="Failed safety check")
            cmd = ["env", "LC_ALL=C", "qemu-img", "info", "-f", probed["format"], "--output=json"]
        else:
            cmd = ["env", "LC_ALL=C", "qemu-img", "info", "--output=json"]
        cmd += (["--force-share"] if force_share else []) + [path]
        out, _err = processutils.execute(*cmd)
        info = imageutils.QemuImgInfo(out, format="json")
        if info.file_format == "vpc":
            info.file_format = "vhd"
        if info.file_format == "luks":
            info.file_format = "raw"
        return info

    @staticmethod
    def convert_image(source, dest, out_format, out_subformat=None, src_format=None, compress=False):
        cmd = ["qemu-img", "convert", "-O", out_format] + (["-f", src_format] if src_format else [])
        cmd += (["-o", "subformat=%s" % out_subformat] if out_subformat else []) + (["-c"] if compress else [])
        processutils.execute(*(cmd + [source, dest]))

    @staticmethod
    def convert_encrypted(source, dest, out_format, src_format=None, cipher_spec=None, passphrase_file=None,
                          src_passphrase_file=None):
        """Cinder's encrypted conversions: to LUKS with the passphrase in a secret file (and the cipher spec as
        -o options), or LUKS to LUKS with the source given by options."""
        if src_passphrase_file is not None:
            if passphrase_file is None:
                raise cinder.NotSupportedOperation(operation="Can't create unencrypted volume %(format)s from an "
                                                   "encrypted source volume." % {"format": out_format})
            cmd = ["qemu-img", "convert", "--object", "secret,id=sec1,format=raw,file=%s" % src_passphrase_file,
                   "--object", "secret,id=sec2,format=raw,file=%s" % passphrase_file, "--image-opts",
                   "encrypt.format=luks,encrypt.key-secret=sec1,file.filename=%s" % source,
                   "-O", "luks", "-o", "key-secret=sec2", dest]
        else:
            cmd = ["qemu-img", "convert", "-O", out_format] + (["-f", src_format] if src_format else [])
            if out_format == "luks":
                if cipher_spec:
                    cmd += ["-o", "cipher-alg=%(cipher_alg)s,cipher-mode=%(cipher_mode)s,ivgen-alg=%(ivgen_alg)s"
                            % cipher_spec]
                cmd += ["--object", "secret,id=luks_sec,format=raw,file=%s" % passphrase_file,
                        "-o", "key-secret=luks_sec"]
            cmd += [source, dest]
        deadline = time.monotonic() + QEMU_RETRY_SECONDS
        while True:
            try:
                processutils.execute(*cmd)
                return
            except processutils.ProcessExecutionError as exp:
                if QEMU_CPU_RACE not in (exp.stderr or "") or time.monotonic() > deadline:
                    raise

    @staticmethod
    def resize_image(source, size, run_as_root=False, file_format=None):
        processutils.execute(*(["qemu-img", "resize"] + (["-f", file_format] if file_format else [])
                               + [source, "%sG" % size]))


def outcome(fn, *args, **kw):
    try:
        r = fn(*args, **kw)
        return ("ok", None if r is None else vars(r))
    except Exception as e:
        return (type(e).__name__, str(e), dict(vars(e)))


def same(ref, ours, *args, **kw):
    q, i = outcome(ref, *args, **kw), outcome(ours, *args, **kw)
    assert i == q, "\n Cinder's way: %r\n instar:       %r" % (q, i)
    return q


@pytest.fixture
def imgs(tmp):
    raw = mk_raw(tmp)
    q = mk_qcow2(tmp)
    top = mk_qcow2(tmp, "top.qcow2", size=None, writes=False, backing="q.qcow2", backing_fmt="qcow2")
    df = os.path.join(tmp, "df.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=df.data", df, "1M")
    return {"raw": raw, "qcow2": q, "top": top, "data_file": df}


# vpc (Cinder's vhd) and luks images are not in this fixture; Tests/diff/test_vpc.py and test_luks_format.py cover
# those formats
@pytest.mark.parametrize("name", ["raw", "qcow2", "top", "data_file"])
def test_qemu_img_info(imgs, name):
    same(Ref.qemu_img_info, cinder.qemu_img_info, imgs[name])
    same(Ref.qemu_img_info, cinder.qemu_img_info, imgs[name], force_share=True)
    same(Ref.qemu_img_info, cinder.qemu_img_info, imgs[name], allow_qcow2_backing_file=True)


def test_qemu_img_info_errors(tmp):
    same(Ref.qemu_img_info, cinder.qemu_img_info, os.path.join(tmp, "missing"))
    same(Ref.qemu_img_info, cinder.qemu_img_info, tmp)


def setup_images(d):
    mk_raw(d)
    mk_qcow2(d)


@pytest.mark.parametrize("src,kw", [
    ("q.qcow2", dict(out_format="raw")), ("r.raw", dict(out_format="qcow2", src_format="raw")),
    ("q.qcow2", dict(out_format="qcow2", compress=True)), ("missing.qcow2", dict(out_format="raw")),
    ("r.raw", dict(out_format="raw", src_format="qcow2")), ("q.qcow2", dict(out_format="bogus"))])
def test_convert_image(tmp, src, kw):
    pair = Pair(tmp, outcome=outcome, setup=setup_images)
    pair.run(Ref.convert_image, cinder.convert_image, src, "out.img", **kw)
    pair.assert_alike("out.img", byte_equal=kw["out_format"] == "qcow2" and not kw.get("compress"))


@pytest.mark.parametrize("name,size,fmt", [("q.qcow2", 1, None), ("r.raw", 2, "raw"), ("r.raw", 1, "qcow2"),
                                           ("missing.raw", 1, None)])
def test_resize_image(tmp, name, size, fmt):
    pair = Pair(tmp, outcome=outcome, setup=setup_images)
    pair.run(Ref.resize_image, cinder.resize_image, name, size=size, file_format=fmt)
    pair.assert_alike(name, byte_equal=name.endswith(".qcow2"))


SRC_PASS, DEST_PASS = "src-pass", "dest-pass"


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory):
    return make_encrypted_sources(str(tmp_path_factory.mktemp("cinder-enc")), SRC_PASS)


AES_XTS = {"cipher_alg": "aes-256", "cipher_mode": "xts", "ivgen_alg": "plain64"}


# Cinder gives no iter-time: each LUKS target costs qemu's default 2 s of PBKDF (kept to two such cases)
@pytest.mark.parametrize("src,kw", [
    ("r.raw", dict(out_format="luks", src_format="raw", cipher_spec=AES_XTS, passphrase_file="dest.pass")),
    ("e.qcow2", dict(out_format="raw", src_passphrase_file="src.pass", passphrase_file="dest.pass")),
    ("e.luks", dict(out_format="raw", src_passphrase_file="src.pass", passphrase_file="dest.pass")),
    ("r.raw", dict(out_format="raw", src_passphrase_file="src.pass"))])
def test_convert_image_encrypted(tmp, encrypted, src, kw):
    def setup(d):
        mk_raw(d)
        copy_encrypted_sources(encrypted, d)
        for name, text in (("src.pass", SRC_PASS), ("dest.pass", DEST_PASS)):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
    pair = Pair(tmp, outcome=outcome, setup=setup)
    files = {k: v for k, v in kw.items() if k.endswith("passphrase_file")}
    rest = {k: v for k, v in kw.items() if k not in files}
    pair.run(lambda s, d, *f: Ref.convert_encrypted(s, d, **rest, **dict(zip(files, f))),
             lambda s, d, *f: cinder.convert_image(s, d, **rest, **dict(zip(files, f))),
             src, "out.img", *files.values())
    assert_alike_encrypted(pair, "out.img", DEST_PASS)
