"""instar_rebase: qemu-img rebase."""
from __future__ import annotations

import ctypes
from typing import Optional

from ._lib import Error, Limits, Options, check, encode, lib
from .ops import PROGRESS_FN, _progress
from .progress import WARNING_FN, Cancel, ProgressCallable, WarningCallable, make_warning

REBASE_UNSAFE = 1 << 0
REBASE_FORCE_SHARE = 1 << 1


class RebaseOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("backing_file", ctypes.c_char_p), ("backing_format", ctypes.c_char_p), ("cache", ctypes.c_char_p),
                ("source_cache", ctypes.c_char_p), ("progress", PROGRESS_FN), ("progress_data", ctypes.c_void_p),
                ("key_secret", ctypes.c_char_p), ("warning", WARNING_FN), ("warning_data", ctypes.c_void_p),
                ("limits", ctypes.POINTER(Limits))]


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_rebase_ready", False):
        return L
    L.instar_rebase.argtypes = [ctypes.c_char_p, ctypes.POINTER(RebaseOptions), ctypes.POINTER(Error)]
    setattr(L, "_rebase_ready", True)
    return L


def rebase(path: str, backing_file: Optional[str] = None, backing_format: Optional[str] = None, unsafe: bool = False,
           fmt: Optional[str] = None, cache: Optional[str] = None, source_cache: Optional[str] = None,
           force_share: bool = False, progress: Optional[ProgressCallable] = None, key_secret: Optional[str] = None,
           cancel: Optional[Cancel] = None, warning: Optional[WarningCallable] = None) -> None:
    """Like `qemu-img rebase [-u] [-U] [-f FMT] [-t CACHE] [-T SRC_CACHE] -b BACKING [-F BACKING_FMT] PATH`.
    `backing_file` "" makes the image standalone; None is allowed with `unsafe` (the backing file is removed).
    `progress(percent)` gets the values `-p` prints; a true return cancels, and so does
    `cancel.cancel()` from another thread (the image keeps its contents). `warning(text)` gets the warnings
    qemu-img rebase prints on stderr (the probed-raw one), without the final newline."""
    L = _setup()
    flags = (REBASE_UNSAFE if unsafe else 0) | (REBASE_FORCE_SHARE if force_share else 0)
    cb = _progress(progress, cancel)
    o = RebaseOptions(ctypes.sizeof(RebaseOptions), flags, encode(fmt), encode(backing_file), encode(backing_format),
                      encode(cache), encode(source_cache), cb, None, encode(key_secret), make_warning(warning), None)
    err = Error()
    check(L.instar_rebase(encode(path), ctypes.byref(o), ctypes.byref(err)), err)
