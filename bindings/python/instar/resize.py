"""instar_resize / instar_amend: qemu-img resize and amend."""
from __future__ import annotations

import ctypes
from typing import Optional, Tuple, Union

from ._lib import Error, Limits, Options, check, encode, lib
from .create import _option_string
from .ops import PROGRESS_FN, _progress
from .progress import Cancel, ProgressCallable

RESIZE_RELATIVE = 1 << 0
RESIZE_SHRINK = 1 << 1


class ResizeOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("preallocation", ctypes.c_char_p), ("flags", ctypes.c_uint32), ("key_secret", ctypes.c_char_p),
                ("limits", ctypes.POINTER(Limits))]


class AmendOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("options", ctypes.c_char_p), ("force", ctypes.c_uint32), ("progress", PROGRESS_FN),
                ("progress_data", ctypes.c_void_p), ("key_secret", ctypes.c_char_p),
                ("new_secret", ctypes.c_char_p), ("old_secret", ctypes.c_char_p), ("limits", ctypes.POINTER(Limits))]


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_resize_ready", False):
        return L
    L.instar_resize.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.POINTER(ResizeOptions), ctypes.POINTER(Error)]
    L.instar_amend.argtypes = [ctypes.c_char_p, ctypes.POINTER(AmendOptions), ctypes.POINTER(Error)]
    setattr(L, "_resize_ready", True)
    return L


def _parse_size(text: str, relative: bool) -> Tuple[int, bool]:
    sign = 1
    if text[:1] in "+-":
        relative, sign, text = True, (1 if text[0] == "+" else -1), text[1:]
    units = "bkmgtpe"
    shift = 0
    if text and text[-1].lower() in units:
        shift, text = 10 * units.index(text[-1].lower()), text[:-1]
    return sign * int(float(text) * (1 << shift)), relative


def resize(path: str, size: Union[int, str], fmt: Optional[str] = None, relative: bool = False, shrink: bool = False,
           preallocation: Optional[str] = None, open_flags: int = 0, key_secret: Optional[str] = None) -> None:
    """Like `qemu-img resize [-f FMT] [--shrink] [--preallocation=P] PATH [+|-]SIZE`. `size` is bytes; with
    `relative` it is a signed change (a string "+1G"/"-1G" sets relative by itself)."""
    if isinstance(size, str):
        size, relative = _parse_size(size, relative)
    flags = (RESIZE_RELATIVE if relative else 0) | (RESIZE_SHRINK if shrink else 0)
    L = _setup()
    o = ResizeOptions(ctypes.sizeof(ResizeOptions), open_flags, encode(fmt), encode(preallocation), flags,
                      encode(key_secret))
    err = Error()
    check(L.instar_resize(encode(path), int(size), ctypes.byref(o), ctypes.byref(err)), err)


def amend(path: str, options: Optional[str] = None, fmt: Optional[str] = None, force: bool = False,
          progress: Optional[ProgressCallable] = None, open_flags: int = 0, key_secret: Optional[str] = None,
          cancel: Optional[Cancel] = None, new_secret: Optional[str] = None, old_secret: Optional[str] = None,
          **opts: object) -> None:
    """Like `qemu-img amend [-f FMT] [--force] -o OPTIONS PATH`. `options` is the -o string; keyword arguments
    (compat="0.10", lazy_refcounts=True, ...) are added to it. `progress(percent)` may return True to cancel, and
    so does `cancel.cancel()` from another thread. LUKS key slots: `key_secret` unlocks the image, `new_secret`
    is the passphrase a slot made active gets and `old_secret` selects the slots to erase (options such as
    "state=active" or "encrypt.state=inactive,encrypt.keyslot=1" say what to do)."""
    text = ",".join(x for x in (options, _option_string(opts)) if x)
    L = _setup()
    cb = _progress(progress, cancel)
    o = AmendOptions(ctypes.sizeof(AmendOptions), open_flags, encode(fmt), encode(text or None), 1 if force else 0,
                     cb, None, encode(key_secret), encode(new_secret), encode(old_secret))
    err = Error()
    check(L.instar_amend(encode(path), ctypes.byref(o), ctypes.byref(err)), err)
