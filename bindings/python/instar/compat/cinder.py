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
``throttle`` have no effect (no process is run); encrypted conversions (``cipher_spec``, ``passphrase_file``,
``src_passphrase_file``) raise NotImplementedError. Cinder has no create helper of its own (its drivers call
``qemu-img create`` directly): use ``instar.create``.
"""
from __future__ import annotations

import os
import stat
from typing import Any, Dict, Optional

import instar
from instar.compat._info import info_dicts
from instar.compat._openstack import (ProcessExecutionError, QemuImgInfo, execution_error, qemu_img_info_from,
                                      supports_direct_io)


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


def convert_image(source: str, dest: str, out_format: str, out_subformat: Optional[str] = None,
                  src_format: Optional[str] = None, run_as_root: bool = True, throttle: Any = None,
                  cipher_spec: Optional[Dict[str, Any]] = None, passphrase_file: Optional[str] = None,
                  compress: bool = False, image_id: Optional[str] = None, data: Any = None,
                  src_passphrase_file: Optional[str] = None) -> None:
    """Converts like Cinder's ``qemu-img convert [-t none] -O OUT [-f SRC] [-o subformat=S] [-c] SOURCE DEST``
    (cache=none only when DEST is a block device that takes O_DIRECT); raises ProcessExecutionError."""
    if cipher_spec or passphrase_file or src_passphrase_file:
        raise NotImplementedError("instar.compat.cinder: encrypted conversions are not supported yet")
    cmd = ["qemu-img", "convert"]
    cache: Optional[str] = None
    try:
        is_block = stat.S_ISBLK(os.stat(dest).st_mode)
    except OSError:
        is_block = False
    if is_block and supports_direct_io(os.path.dirname(os.path.abspath(dest))):
        cache = "none"
        cmd += ["-t", "none"]
    cmd += ["-O", out_format]
    if src_format:
        cmd += ["-f", src_format]
    options = None
    if out_subformat:
        options = "subformat=%s" % out_subformat
        cmd += ["-o", options]
    if compress:
        cmd.append("-c")
    cmd += [source, dest]
    try:
        instar.convert(source, dest, source_format=src_format or None, fmt=out_format, target_cache=cache,
                       options=options, compress=compress)
    except instar.InstarError as e:
        raise execution_error(cmd, e) from e


def resize_image(source: str, size: Any, run_as_root: bool = False, file_format: Optional[str] = None) -> None:
    """Sets the virtual size of `source` to `size` GiB (``qemu-img resize [-f FORMAT] SOURCE SIZEG``)."""
    cmd = ["qemu-img", "resize"] + (["-f", file_format] if file_format else []) + [source, "%sG" % size]
    try:
        instar.resize(source, "%sG" % size, fmt=file_format or None)
    except instar.InstarError as e:
        raise execution_error(cmd, e) from e


__all__ = ["qemu_img_info", "convert_image", "resize_image", "QemuImgInfo", "ProcessExecutionError"]
