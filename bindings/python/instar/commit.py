"""instar_commit: qemu-img commit."""
from __future__ import annotations

import ctypes
from typing import Optional

from ._lib import Error, Limits, Options, check, encode, lib
from .ops import PROGRESS_FN, _progress
from .progress import Cancel, ProgressCallable

COMMIT_NO_EMPTY = 1 << 0


class CommitOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("base", ctypes.c_char_p), ("cache", ctypes.c_char_p), ("rate_limit", ctypes.c_int64),
                ("progress", PROGRESS_FN), ("progress_data", ctypes.c_void_p), ("key_secret", ctypes.c_char_p),
                ("limits", ctypes.POINTER(Limits)), ("backing_key_secret", ctypes.c_char_p)]


def commit(path: str, base: Optional[str] = None, drop: bool = False, fmt: Optional[str] = None,
           cache: Optional[str] = None, rate_limit: int = 0, progress: Optional[ProgressCallable] = None,
           key_secret: Optional[str] = None, cancel: Optional[Cancel] = None,
           backing_key_secret: Optional[str] = None) -> None:
    """Like `qemu-img commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-r RATE] PATH`: copies the data above the base
    into it and, unless `drop` or a `base` is given, empties PATH. `progress(percent)` may return True to cancel,
    and so does `cancel.cancel()` from another thread (instar.Cancelled; what was copied stays in the base).
    `key_secret` unlocks an encrypted PATH, `backing_key_secret` the encrypted images below it (the base too)."""
    L = lib()
    L.instar_commit.argtypes = [ctypes.c_char_p, ctypes.POINTER(CommitOptions), ctypes.POINTER(Error)]
    cb = _progress(progress, cancel)
    o = CommitOptions(ctypes.sizeof(CommitOptions), COMMIT_NO_EMPTY if drop else 0, encode(fmt), encode(base),
                      encode(cache), rate_limit, cb, None, encode(key_secret))
    o.backing_key_secret = encode(backing_key_secret)
    err = Error()
    check(L.instar_commit(encode(path), ctypes.byref(o), ctypes.byref(err)), err)
