"""A drop-in for Nova's qemu-img helpers, answered by libinstar's calls instead of a qemu-img process:
``qemu_img_info``, ``convert_image`` and ``convert_image_unsafe`` of ``nova.virt.images`` (with
``nova.privsep.qemu``'s command lines), ``create_image`` and ``create_cow_image`` of ``nova.virt.libvirt.utils``,
and ``resize_image``, the ``qemu-img resize`` step of ``nova.virt.disk.api.extend``.

Switch Nova over where it calls them::

    from instar.compat import nova as images       # was: from nova.virt import images

Arguments, return values and exceptions are Nova's: ``qemu_img_info`` returns an
``oslo_utils.imageutils.QemuImgInfo`` (filled from the library's answer, no text parsed) and raises
``DiskNotFound`` / ``InvalidDiskInfo``; ``convert_image`` raises ``ImageUnacceptable``; the create and resize
helpers raise ``oslo_concurrency.processutils.ProcessExecutionError``, whose ``stderr`` and ``exit_code`` are
what qemu-img would have given. Nova's own exception classes are used when ``nova.exception`` is importable;
otherwise lookalikes with the same names, keyword arguments and messages.

``convert_image`` takes Nova's ``src_encryption`` / ``dest_encryption`` dicts (``secret``: the passphrase;
``format``: the encryption format of a qcow2 target): the source is opened as the node Nova's ``--image-opts``
names (``[encrypt.]key-secret``), the target gets Nova's LUKS settings (``LUKS_OPTIONS``: aes-256 xts plain64,
sha256, iter-time 2000 ms), and the passphrases go to the library directly instead of through secret files.
A source whose backing file has a passphrase of its own takes it as ``src_encryption["backing_secret"]``
(an instar extension: Nova's ``EncryptionOptions`` has only ``secret`` and ``format`` today, and its ephemeral
encryption spec plans a ``backing_encryption_secret_uuid`` per disk): the command line names it as Nova's
would, ``--object secret,id=sec2`` and ``backing.[encrypt.]key-secret=sec2`` on the ``--image-opts`` node,
and the library gets it as the call's ``backing_key_secret`` (every encrypted image below the source).
``create_cow_image`` takes an ``encryption`` dict too (``secret``, ``format``): the new overlay is encrypted
with Nova's LUKS settings (``-o encrypt.key-secret=sec,encrypt.format=...``); an encrypted backing file needs
no passphrase there (qemu-img create reads only its size). ``convert_image`` picks cache=none when the target's
folder takes O_DIRECT (Nova tests ``CONF.instances_path``, the same folder in practice) and cache=writeback
otherwise, as Nova does. Nova runs qemu-img info under prlimit; libinstar bounds what it reads from an image by
itself (see instar.compat.vdsm).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Union

import instar
from instar.compat._info import info_dicts
from instar.compat._openstack import (ProcessExecutionError, QemuImgInfo, execution_error, failed_run, optional,
                                      qemu_img_info_from, stderr_of, supports_direct_io)


class NovaException(Exception):
    """nova.exception.NovaException's shape: built from keyword arguments into ``msg_fmt``."""
    msg_fmt = "An unknown exception occurred."

    def __init__(self, message: Optional[str] = None, **kwargs: Any) -> None:
        self.kwargs = kwargs
        if not message:
            message = self.msg_fmt % kwargs
        self.message = message
        super().__init__(message)

    def format_message(self) -> str:
        return str(self.args[0])


class _DiskNotFound(NovaException):
    msg_fmt = "No disk at %(location)s"


class _InvalidDiskInfo(NovaException):
    msg_fmt = "Disk info file is invalid: %(reason)s"


class _ImageUnacceptable(NovaException):
    msg_fmt = "Image %(image_id)s is unacceptable: %(reason)s"


DiskNotFound: Any = optional("nova.exception", "DiskNotFound") or _DiskNotFound
InvalidDiskInfo: Any = optional("nova.exception", "InvalidDiskInfo") or _InvalidDiskInfo
ImageUnacceptable: Any = optional("nova.exception", "ImageUnacceptable") or _ImageUnacceptable

_SIZE_ERROR = ("qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
               "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n")


def qemu_img_info(path: str, format: Optional[str] = None) -> Any:
    """What ``qemu-img info PATH --force-share --output=json [-f FORMAT]`` reports, as a QemuImgInfo."""
    if not os.path.exists(path) and not path.startswith("rbd:"):
        raise DiskNotFound(location=path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "DiskDescriptor.xml")):
        path = os.path.join(path, "root.hds")  # a ploop image: its data file
    cmd = ["env", "LC_ALL=C", "LANG=C", "qemu-img", "info", path, "--force-share", "--output=json"]
    if format is not None:
        cmd += ["-f", format]
    try:
        d: Dict[str, Any] = info_dicts(path, format=format, force_share=True)[0]
    except instar.InstarError as e:
        exp = execution_error(cmd, e)
        if "No such file or directory" in exp.stderr:
            raise DiskNotFound(location=path) from e
        raise InvalidDiskInfo(reason="qemu-img failed to execute on %(path)s : %(exp)s"
                              % {"path": path, "exp": exp}) from e
    return qemu_img_info_from(d)


def convert_image(source: str, dest: str, in_format: Optional[str], out_format: str, run_as_root: bool = False,
                  compress: bool = False, src_encryption: Optional[Dict[str, Any]] = None,
                  dest_encryption: Optional[Dict[str, Any]] = None) -> None:
    """Converts `source` (format `in_format`, required) to `dest` in `out_format`, like Nova's
    ``qemu-img convert -t CACHE -O OUT -f IN [-c] SOURCE DEST``; raises ImageUnacceptable on failure."""
    if in_format is None:
        raise RuntimeError("convert_image without input format is a security risk")
    _convert_image(source, dest, in_format, out_format, compress, src_encryption, dest_encryption)


def convert_image_unsafe(source: str, dest: str, out_format: str, run_as_root: bool = False) -> None:
    """convert_image with the input format probed (Nova's unsafe variant, kept for its one caller)."""
    _convert_image(source, dest, None, out_format)


# Nova's LUKS settings for an encrypted target (nova/privsep/qemu.py writes them as -o [encrypt.]NAME=VALUE,
# in this order), qemu's defaults but for iter-time.
LUKS_OPTIONS: Dict[str, Any] = {"cipher-alg": "aes-256", "cipher-mode": "xts", "hash-alg": "sha256",
                                "iter-time": 2000, "ivgen-alg": "plain64", "ivgen-hash-alg": "sha256"}


def _convert_image(source: str, dest: str, in_format: Optional[str], out_format: str, compress: bool = False,
                   src_encryption: Optional[Dict[str, Any]] = None,
                   dest_encryption: Optional[Dict[str, Any]] = None) -> None:
    cache = "none" if supports_direct_io(os.path.dirname(os.path.abspath(dest))) else "writeback"
    cmd = ["qemu-img", "convert", "-t", cache, "-O", out_format]
    if in_format is not None and not src_encryption:
        cmd += ["-f", in_format]
    if compress:
        cmd.append("-c")
    key: Optional[str] = None
    backing_key: Optional[str] = None
    name = opened_as = source
    if src_encryption:
        # Nova: --object secret,id=sec0 --image-opts driver=IN,file.driver=file|rbd,file.filename=SRC,
        # [encrypt.]key-secret=sec0; the library opens the same node from its json: name, the passphrase
        # filling secret sec0.
        key = src_encryption.get("secret")
        backing_key = src_encryption.get("backing_secret")
        prefix = "encrypt." if in_format == "qcow2" else ""
        node: Dict[str, Any] = {} if in_format is None else {"driver": in_format}
        node["file"] = {"driver": "rbd" if source.startswith("rbd:") else "file", "filename": source}
        opts_text = (["driver=%s" % in_format] if in_format is not None else []) \
            + ["file.driver=%s" % node["file"]["driver"], "file.filename=%s" % source]
        if key is not None:
            node[prefix + "key-secret"] = "sec0"
            opts_text.append("%skey-secret=sec0" % prefix)
            cmd += ["--object", "secret,id=sec0,file=<key>"]
        if backing_key is not None:
            # the backing node's option: key-secret for a luks backing file, encrypt.key-secret otherwise
            # (the library hands backing_key_secret to whichever the backing file is)
            opts_text.append("backing.%skey-secret=sec2" % ("" if _backing_format(source, in_format) == "luks"
                                                             else "encrypt."))
            cmd += ["--object", "secret,id=sec2,file=<key>"]
        name = "json:" + json.dumps(node)
        opened_as = ",".join(opts_text)
        cmd += ["--image-opts", opened_as]
    options: Optional[str] = None
    target_key: Optional[str] = None
    if dest_encryption:
        target_key = dest_encryption["secret"]
        prefix = "encrypt." if out_format == "qcow2" else ""
        opts = ["%skey-secret=sec1" % prefix]
        if prefix:
            opts.append("%sformat=%s" % (prefix, dest_encryption["format"]))
        opts += ["%s%s=%s" % (prefix, k, v) for k, v in LUKS_OPTIONS.items()]
        options = ",".join(opts)
        cmd += ["--object", "secret,id=sec1,file=<key>"] + [a for o in opts for a in ("-o", o)]
    if not src_encryption:
        cmd.append(source)
    cmd.append(dest)
    try:
        instar.convert(name, dest, source_format=None if src_encryption else in_format, fmt=out_format,
                       target_cache=cache, compress=compress, options=options, key_secret=key,
                       target_key_secret=target_key, backing_key_secret=backing_key)
    except instar.InstarError as e:
        # qemu names a source given by options by its option string
        exp = failed_run(cmd, _renamed(stderr_of(e), name, opened_as))
        raise ImageUnacceptable(image_id=source, reason="Unable to convert image to %(format)s: %(exp)s"
                                % {"format": out_format, "exp": exp}) from e


def _backing_format(source: str, in_format: Optional[str]) -> Optional[str]:
    """The format of `source`'s backing file as its header records it (None when it names none or cannot be
    read: the open then reports the problem)."""
    try:
        top = instar.info(source, format=in_format, force_share=True)
    except instar.InstarError:
        return None
    return None if isinstance(top, list) else top.backing_filename_format


def _renamed(stderr: str, path: str, name: str) -> str:
    """qemu-img's first "Could not open 'PATH'" with the name qemu gives the node (its option string) instead."""
    return stderr.replace("Could not open '%s'" % path, "Could not open '%s'" % name, 1)


def _size_bytes(size: Union[int, str], cmd: Any) -> int:
    """`size` as qemu-img reads its size argument (bytes, or a number with a k/M/G/T/P/E suffix)."""
    if isinstance(size, int):
        return size
    text = str(size).strip()
    shift = 0
    units = "bkmgtpe"
    if text and text[-1].lower() in units:
        shift, text = 10 * units.index(text[-1].lower()), text[:-1]
    try:
        value = float(text)
        if value < 0 or not text or text.lstrip("0123456789.") != "":
            raise ValueError(text)
    except ValueError:
        raise ProcessExecutionError(stdout="", stderr=_SIZE_ERROR, exit_code=1,
                                    cmd=" ".join(cmd)) from None
    return int(value * (1 << shift))


def create_image(disk_format: str, path: str, size: Union[int, str]) -> None:
    """Creates `path` like ``qemu-img create -f DISK_FORMAT PATH SIZE`` (`size` in bytes, or a string with a
    K/M/G/T suffix); raises ProcessExecutionError on failure."""
    cmd = ["qemu-img", "create", "-f", disk_format, path, str(size)]
    nbytes = _size_bytes(size, cmd)
    try:
        instar.create(path, disk_format, nbytes)
    except instar.InstarError as e:
        raise execution_error(cmd, e) from e


def create_cow_image(backing_file: Optional[str], path: str, size: Optional[int] = None,
                     encryption: Optional[Dict[str, Any]] = None) -> None:
    """Creates a qcow2 overlay `path` on `backing_file` (its format and cluster size inherited, as Nova does),
    like ``qemu-img create -f qcow2 -o backing_file=B,backing_fmt=F,cluster_size=C[,size=S] PATH``; with
    `encryption` (``secret``, ``format``) the overlay is encrypted with Nova's LUKS settings, like
    ``--object secret,id=sec,file=K -o encrypt.key-secret=sec -o encrypt.format=F -o encrypt.OPT=V...``."""
    opts = []
    backing_fmt: Optional[str] = None
    cluster: Optional[int] = None
    if backing_file:
        base = qemu_img_info(backing_file)
        backing_fmt, cluster = base.file_format, base.cluster_size
        opts += ["backing_file=%s" % backing_file, "backing_fmt=%s" % backing_fmt]
        if cluster is not None:
            opts.append("cluster_size=%s" % cluster)
    if size is not None:
        opts.append("size=%s" % size)
    cmd = ["qemu-img", "create", "-f", "qcow2"] + (["-o", ",".join(opts)] if opts else [])
    extra: Dict[str, Any] = {} if cluster is None else {"cluster_size": cluster}
    key: Optional[str] = None
    if encryption:
        key = encryption["secret"]
        enc = [("encrypt.key-secret", "sec"), ("encrypt.format", encryption["format"])] \
            + [("encrypt." + k, v) for k, v in LUKS_OPTIONS.items()]
        cmd += ["--object", "secret,id=sec,file=<key>"] + [a for k, v in enc for a in ("-o", "%s=%s" % (k, v))]
        extra.update(enc)
    cmd.append(path)
    try:
        # backing_file/backing_format are -o backing_file/backing_fmt, and `size` the size option, to qemu-img
        instar.create(path, "qcow2", size, backing_file=backing_file or None, backing_format=backing_fmt,
                      key_secret=key, **extra)
    except instar.InstarError as e:
        raise execution_error(cmd, e) from e


def resize_image(path: str, size: Union[int, str]) -> None:
    """Sets the virtual size of `path` like ``qemu-img resize PATH SIZE`` (Nova's disk extend); raises
    ProcessExecutionError on failure."""
    cmd = ["qemu-img", "resize", path, str(size)]
    try:
        instar.resize(path, size)
    except instar.InstarError as e:
        raise execution_error(cmd, e) from e


__all__ = ["qemu_img_info", "convert_image", "convert_image_unsafe", "create_image", "create_cow_image",
           "resize_image", "QemuImgInfo", "ProcessExecutionError", "DiskNotFound", "InvalidDiskInfo",
           "ImageUnacceptable", "NovaException"]
