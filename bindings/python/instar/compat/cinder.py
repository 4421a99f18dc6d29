"""A drop-in for the qemu-img helpers of Cinder's ``cinder.image.image_utils``, answered by libinstar's calls
instead of a qemu-img process: ``qemu_img_info``, ``convert_image`` and ``resize_image``.

Switch Cinder over where it calls them::

    from instar.compat import cinder as image_utils     # for these three functions of cinder.image.image_utils

Arguments, return values and exceptions are Cinder's: ``qemu_img_info`` returns an
``oslo_utils.imageutils.QemuImgInfo`` (filled from the library's answer, no text parsed; "luks" reads as "raw"
and "vpc" as "vhd", as Cinder reports them); failures raise ``oslo_concurrency.processutils.ProcessExecutionError``
(``stderr`` and ``exit_code`` as qemu-img's; a lookalike class where oslo.concurrency is missing).

Cinder checks an image before it asks qemu-img about it (its format inspector) and names the detected format
with ``-f``: here the library's probe names it, and the check refuses what Cinder's refuses for qcow2 (a backing
file unless ``allow_qcow2_backing_file``, an external data file) with ``ProcessExecutionError(description="Failed
safety check")``; the other formats' inspector checks are ``instar.compat.oslo``'s. ``run_as_root`` and
``throttle`` have no effect (no process is run). Encrypted conversions follow Cinder's command lines: a LUKS
target (``out_format="luks"``) takes the passphrase of ``passphrase_file`` (read as qemu reads a secret with
format=raw) and the ``cipher_spec`` dict (``cipher_alg``, ``cipher_mode``, ``ivgen_alg``); with
``src_passphrase_file`` the source is opened as Cinder's ``encrypt.format=luks,encrypt.key-secret=...`` option string
(the format probed) and the target is always LUKS, and without ``passphrase_file`` it raises Cinder's
NotSupportedOperation. ``out_format="vhd"`` means vpc, ``compress`` applies to qcow2 only (Cinder's
``image_compress_on_upload``, on by default, is ``IMAGE_COMPRESS_ON_UPLOAD`` here) and ``disable_sparse`` is -S 0.
Cinder has no create helper of its own (its drivers call ``qemu-img create`` directly): use ``instar.create``.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any, Dict, Optional

import instar
from instar.compat._info import info_dicts
from instar.compat._openstack import (ProcessExecutionError, QemuImgInfo, execution_error, failed_run, optional,
                                      qemu_img_info_from, stderr_of, supports_direct_io)


def _safety_check(d: Dict[str, Any], allow_qcow2_backing_file: bool) -> None:
    if d.get("format") != "qcow2":
        return
    data = (d.get("format-specific") or {}).get("data", {})
    if data.get("data-file") is not None or (d.get("backing-filename") is not None
                                             and not allow_qcow2_backing_file):
        raise ProcessExecutionError(description="Failed safety check")


def qemu_img_info(path: str, run_as_root: bool = True, force_share: bool = False,
                  allow_qcow2_backing_file: bool = False, *, format: Optional[str] = None) -> Any:
    """What ``qemu-img info -f FORMAT --output=json [--force-share] PATH`` reports, as a QemuImgInfo (FORMAT
    probed and checked first, as Cinder does; `format` names it instead, an instar extension)."""
    try:
        d = info_dicts(path, format=format, force_share=force_share)[0]
    except instar.InstarError as e:
        cmd = ["env", "LC_ALL=C", "qemu-img", "info"] + (["-f", format] if format else []) + ["--output=json"]
        raise execution_error(cmd + (["--force-share"] if force_share else []) + [path], e) from e
    _safety_check(d, allow_qcow2_backing_file)
    info = qemu_img_info_from(d)
    if info.file_format == "vpc":
        info.file_format = "vhd"
    if info.file_format == "luks":
        info.file_format = "raw"
    return info


class _NotSupportedOperation(Exception):
    """cinder.exception.NotSupportedOperation's shape (a CinderException: message from keyword arguments)."""
    message = "Operation not supported: %(operation)s."
    code = 405

    def __init__(self, message: Optional[str] = None, **kwargs: Any) -> None:
        self.kwargs = dict(kwargs, code=self.code)
        self.msg = message or self.message % kwargs
        super().__init__(self.msg)


NotSupportedOperation: Any = optional("cinder.exception", "NotSupportedOperation") or _NotSupportedOperation

IMAGE_COMPRESS_ON_UPLOAD = True
COMPRESSIBLE_IMAGE_FORMATS = ("qcow2",)


def _passphrase(path: str) -> str:
    """The secret qemu reads from `path` with format=raw: the file's bytes as they are."""
    with open(path, "rb") as f:
        data = f.read()
    return data.decode("utf-8")


def convert_image(source: str, dest: str, out_format: str, out_subformat: Optional[str] = None,
                  src_format: Optional[str] = None, run_as_root: bool = True, throttle: Any = None,
                  cipher_spec: Optional[Dict[str, Any]] = None, passphrase_file: Optional[str] = None,
                  compress: bool = False, image_id: Optional[str] = None, data: Any = None,
                  src_passphrase_file: Optional[str] = None, disable_sparse: bool = False) -> None:
    """Converts like Cinder's ``qemu-img convert [-t none] [-S 0] -O OUT [-c] [-o subformat=S] [-f SRC] SOURCE
    DEST`` (cache=none only when DEST is a block device that takes O_DIRECT), with its LUKS options and secrets
    when encrypting (see the module's notes); raises ProcessExecutionError."""
    if src_passphrase_file is not None and passphrase_file is None:
        raise NotSupportedOperation(operation="Can't create unencrypted volume %(format)s from an encrypted source "
                                    "volume." % {"format": out_format})
    cmd = ["qemu-img", "convert"]
    cache: Optional[str] = None
    try:
        is_block = stat.S_ISBLK(os.stat(dest).st_mode)
    except OSError:
        is_block = False
    if is_block and supports_direct_io(os.path.dirname(os.path.abspath(dest))):
        cache = "none"
    if out_format == "vhd" and src_passphrase_file is None:
        out_format = "vpc"
    flags: Dict[str, Any] = dict(sparse_size=0 if disable_sparse else None, target_cache=cache)
    lead = (["-t", cache] if cache else []) + (["-S", "0"] if disable_sparse else [])
    if src_passphrase_file is not None:
        assert passphrase_file is not None
        # Cinder's luks-to-luks command: the source by an option string (no driver: probed), the target LUKS
        opened_as = "encrypt.format=luks,encrypt.key-secret=sec1,file.filename=%s" % source
        cmd += lead + ["--object", "secret,id=sec1,format=raw,file=%s" % src_passphrase_file,
                       "--object", "secret,id=sec2,format=raw,file=%s" % passphrase_file,
                       "--image-opts", opened_as, "-O", "luks", "-o", "key-secret=sec2", dest]
        spec = "json:" + json.dumps({"encrypt.format": "luks", "encrypt.key-secret": "sec1",
                                     "file": {"filename": source}})
        try:
            instar.convert(spec, dest, fmt="luks", options="key-secret=sec2",
                           key_secret=_passphrase(src_passphrase_file),
                           target_key_secret=_passphrase(passphrase_file), **flags)
        except instar.InstarError as e:
            raise failed_run(cmd, stderr_of(e).replace("Could not open '%s'" % spec,
                                                       "Could not open '%s'" % opened_as, 1)) from e
        return
    cmd += ["-O", out_format] + lead
    compress = compress and IMAGE_COMPRESS_ON_UPLOAD and out_format in COMPRESSIBLE_IMAGE_FORMATS
    if compress:
        cmd.append("-c")
    opts = []
    if out_subformat:
        opts.append("subformat=%s" % out_subformat)
        cmd += ["-o", opts[-1]]
    if src_format and src_format.lower() != "ami":
        cmd += ["-f", src_format]
    else:
        src_format = None   # ami: probed
    key: Optional[str] = None
    if out_format == "luks":
        if cipher_spec:
            opts.append("cipher-alg=%s,cipher-mode=%s,ivgen-alg=%s" % (
                cipher_spec["cipher_alg"], cipher_spec["cipher_mode"], cipher_spec["ivgen_alg"]))
            cmd += ["-o", opts[-1]]
        cmd += ["--object", "secret,id=luks_sec,format=raw,file=%s" % passphrase_file, "-o", "key-secret=luks_sec"]
        opts.append("key-secret=luks_sec")
        key = _passphrase(passphrase_file) if passphrase_file is not None else None
    cmd += [source, dest]
    try:
        instar.convert(source, dest, source_format=src_format, fmt=out_format, options=",".join(opts) or None,
                       compress=compress, target_key_secret=key, **flags)
    except instar.InstarError as e:
        raise execution_error(cmd, e) from e


def resize_image(source: str, size: Any, run_as_root: bool = False, file_format: Optional[str] = None) -> None:
    """Sets the virtual size of `source` to `size` GiB (``qemu-img resize [-f FORMAT] SOURCE SIZEG``)."""
    cmd = ["qemu-img", "resize"] + (["-f", file_format] if file_format else []) + [source, "%sG" % size]
    try:
        instar.resize(source, "%sG" % size, fmt=file_format or None)
    except instar.InstarError as e:
        raise execution_error(cmd, e) from e


__all__ = ["qemu_img_info", "convert_image", "resize_image", "QemuImgInfo", "ProcessExecutionError",
           "NotSupportedOperation"]
