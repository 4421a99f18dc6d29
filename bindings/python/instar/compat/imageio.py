"""Drop-in for ovirt-imageio's ``ovirt_imageio._internal.qemu_img`` (ovirt-imageio 2.5.1), built on libinstar.

Same public names, arguments, return values and exceptions as that module, which runs ``qemu-img``: here every
function is a library call, so nothing is spawned and no JSON text is parsed.

- ``create``, ``convert``, ``unsafe_rebase`` and ``bitmap_add`` return None and fail with
  :class:`subprocess.CalledProcessError` (``returncode`` 1, ``cmd`` the qemu-img command line the original would
  have run), after writing qemu-img's ``qemu-img: ...`` message to stderr as qemu-img would. What qemu-img prints
  on stdout (``create``'s ``Formatting ...`` line unless ``quiet``, ``convert``'s progress records with
  ``progress=True``) goes to ``sys.stdout``. The library's :class:`instar.InstarError` is the exception's
  ``__cause__``.
- ``info`` and ``measure`` return the dicts ``qemu-img info/measure --output json`` print; a failure is a
  ``CalledProcessError`` with ``output`` b"" (what ``subprocess.check_output`` gives).
- ``compare`` returns None for identical images and raises :class:`ContentMismatch` (args: qemu-img's stdout,
  e.g. ``"Content mismatch at offset 524288!\\n"``) when they differ, :class:`OpenImageError` (args: qemu-img's
  stdout, empty) when an image cannot be opened, and :exc:`RuntimeError` (args: qemu-img's stderr) for a failure
  while comparing, as the original maps qemu-img compare's exit statuses 1, 2 and above.

Switching ovirt-imageio over is one line run before it imports the module:
``sys.modules["ovirt_imageio._internal.qemu_img"] = importlib.import_module("instar.compat.imageio")``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, Dict, List, NoReturn, Optional, Union

from .._lib import InstarError
from ..bitmapdd import bitmap as _bitmap
from ..create import create as _create
from ..create import measure_result as _measure_result
from ..info import ImageInfo
from ..info import info as _info
from ..ops import compare_status as _compare_status
from ..ops import convert as _convert
from ..rebase import rebase as _rebase

__all__ = ["ContentMismatch", "OpenImageError", "create", "convert", "unsafe_rebase", "info", "measure", "compare",
           "bitmap_add", "log"]

log = logging.getLogger("qemu_img")

PathArg = Union[str, "os.PathLike[str]"]


class ContentMismatch(Exception):
    """The compared images differ; the argument is what qemu-img compare printed on stdout."""


class OpenImageError(Exception):
    """An image could not be opened (for example a format that does not match the image); the argument is what
    qemu-img compare printed on stdout."""


def _stderr(message: str) -> None:
    """Writes an error the way qemu-img prints it after "qemu-img: ": a size error's two lines each with the
    prefix, create's backing-format hint without a newline at its end."""
    if "\nkilobytes, megabytes" in message:
        text = "".join("qemu-img: %s\n" % line for line in message.split("\n"))
    elif "\nDetected format of " in message:
        text = "qemu-img: " + message
    else:
        text = "qemu-img: %s\n" % message
    sys.stdout.flush()
    sys.stderr.write(text)
    sys.stderr.flush()


def _failed(cmd: List[Any], error: InstarError, output: Optional[bytes] = None) -> NoReturn:
    """qemu-img's exit after an error: its message on stderr, then the error check_call/check_output raise."""
    _stderr(error.message)
    raise subprocess.CalledProcessError(1, cmd, output) from error


def _warning(text: str) -> None:
    """A warning qemu-img prints on stderr while it goes on (no program name before it)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _path(p: PathArg) -> str:
    return os.fspath(p)


def create(path: PathArg, fmt: str, size: Union[int, str, None] = None, backing_file: Optional[str] = None,
           backing_format: Optional[str] = None, quiet: bool = False) -> None:
    """Creates an image like ``qemu-img create -f FMT [-b BACKING [-F BACKING_FMT]] [-q] PATH [SIZE]``.

    `size` is bytes or qemu-img's size text ("1G"); None takes the backing file's size. Unless `quiet`, the
    ``Formatting ...`` line goes to stdout."""
    cmd: List[Any] = ["qemu-img", "create", "-f", fmt]
    if backing_file:
        cmd += ["-b", backing_file]
        if backing_format:
            cmd += ["-F", backing_format]
    if quiet:
        cmd.append("-q")
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))

    def formatting(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    text = None if size is None else str(size)
    if text is not None and text.startswith("-") and text != "-":
        # On qemu-img's command line a negative size reads as an option it does not know.
        sys.stderr.write("qemu-img: unrecognized option '%s'\nTry 'qemu-img --help' for more information\n" % text)
        sys.stderr.flush()
        raise subprocess.CalledProcessError(1, cmd)
    try:
        _create(_path(path), fmt, text, backing_file or None,
                       (backing_format or None) if backing_file else None,
                       formatting=None if quiet else formatting)
    except InstarError as e:
        _failed(cmd, e)


def convert(src: PathArg, dst: PathArg, src_fmt: str, dst_fmt: str, progress: bool = False,
            compressed: bool = False) -> None:
    """Converts like ``qemu-img convert -f SRC_FMT -O DST_FMT [-p] [-c] SRC DST``. With `progress`, qemu-img's
    progress records (``    (NN.NN/100%)\\r``, then a newline) go to stdout."""
    cmd: List[Any] = ["qemu-img", "convert", "-f", src_fmt, "-O", dst_fmt]
    if progress:
        cmd.append("-p")
    if compressed:
        cmd.append("-c")
    cmd += [src, dst]

    def report(percent: float) -> None:
        sys.stdout.write("    (%3.2f/100%%)\r" % percent)
        sys.stdout.flush()

    try:
        _convert(_path(src), _path(dst), source_format=src_fmt, fmt=dst_fmt, compress=compressed,
                     progress=report if progress else None)
    except InstarError as e:
        if progress:
            sys.stdout.write("\n")
        _failed(cmd, e)
    if progress:
        sys.stdout.write("\n")
        sys.stdout.flush()


def unsafe_rebase(path: PathArg, backing: str, backing_fmt: str) -> None:
    """Points the image at another backing file without touching its data, like
    ``qemu-img rebase -u -b BACKING -F BACKING_FMT PATH``."""
    cmd: List[Any] = ["qemu-img", "rebase", "-u", "-b", backing, "-F", backing_fmt, path]
    try:
        _rebase(_path(path), backing, backing_fmt, unsafe=True, warning=_warning)
    except InstarError as e:
        _failed(cmd, e)


def info(path: PathArg) -> Dict[str, Any]:
    """What ``qemu-img info --output json PATH`` prints, as a dict with its keys ("virtual-size", "format",
    "format-specific", ...)."""
    try:
        result = _info(_path(path))
    except InstarError as e:
        _failed(["qemu-img", "info", "--output", "json", path], e, b"")
    assert isinstance(result, ImageInfo)
    return result.to_dict()


def measure(path: PathArg, out_fmt: str) -> Dict[str, Any]:
    """What ``qemu-img measure --output json -O OUT_FMT PATH`` prints: {"required", "fully-allocated"[,
    "bitmaps"]}."""
    try:
        return _measure_result(_path(path), out_fmt).to_dict()
    except InstarError as e:
        _failed(["qemu-img", "measure", "--output", "json", "-O", out_fmt, path], e, b"")


def compare(a: PathArg, b: PathArg, format1: Optional[str] = None, format2: Optional[str] = None,
            strict: bool = False) -> None:
    """Compares two images' contents like ``qemu-img compare [-s] [-f FORMAT1] [-F FORMAT2] A B``: returns None
    when identical, raises ContentMismatch when they differ (with `strict`, also when allocation or size
    differs), OpenImageError when an image cannot be opened, RuntimeError for a failure while comparing."""
    result, error = _compare_status(_path(a), _path(b), format1 or None, format2 or None, strict)
    if result.exit_status == 0 and error is None:
        return
    if result.exit_status == 1 and error is None:
        raise ContentMismatch(result.message)
    if result.exit_status == 2:
        raise OpenImageError("") from error
    raise RuntimeError("qemu-img: %s\n" % result.error_message) from error


def bitmap_add(path: PathArg, bitmap: str) -> None:
    """Adds a persistent dirty bitmap like ``qemu-img bitmap --add PATH BITMAP``."""
    try:
        _bitmap(_path(path), bitmap, "add", warning=_warning)
    except InstarError as e:
        _failed(["qemu-img", "bitmap", "--add", path, bitmap], e)
