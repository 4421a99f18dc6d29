"""instar_bitmap / instar_dd: qemu-img bitmap and dd."""
from __future__ import annotations

import ctypes
from typing import Any, Dict, Optional, Tuple, Union

from ._lib import Error, Limits, Options, check, encode, lib
from .ops import PROGRESS_FN, _progress
from .progress import WARNING_FN, Cancel, ProgressCallable, WarningCallable, make_warning
from .results import BenchResult as BenchResultData

BITMAP_ADD, BITMAP_REMOVE, BITMAP_CLEAR, BITMAP_ENABLE, BITMAP_DISABLE, BITMAP_MERGE = 1, 2, 3, 4, 5, 6
_ACTIONS = {"add": BITMAP_ADD, "remove": BITMAP_REMOVE, "clear": BITMAP_CLEAR, "enable": BITMAP_ENABLE,
            "disable": BITMAP_DISABLE, "merge": BITMAP_MERGE}
DD_FORCE_SHARE = 1 << 0
DD_NO_CREATE = 1 << 1


class BitmapAction(ctypes.Structure):
    _fields_ = [("action", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("merge_source", ctypes.c_char_p)]


class BitmapOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("granularity", ctypes.c_int64), ("source_file", ctypes.c_char_p),
                ("source_format", ctypes.c_char_p), ("key_secret", ctypes.c_char_p), ("warning", WARNING_FN),
                ("warning_data", ctypes.c_void_p), ("limits", ctypes.POINTER(Limits))]


class DdOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("input_format", ctypes.c_char_p),
                ("output_format", ctypes.c_char_p), ("block_size", ctypes.c_int64), ("count", ctypes.c_int64),
                ("skip", ctypes.c_int64), ("output_size", ctypes.c_int64), ("input_size", ctypes.c_int64),
                ("snapshot", ctypes.c_char_p), ("progress", PROGRESS_FN), ("progress_data", ctypes.c_void_p),
                ("key_secret", ctypes.c_char_p), ("limits", ctypes.POINTER(Limits))]


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_bitmapdd_ready", False):
        return L
    L.instar_bitmap.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(BitmapAction), ctypes.c_uint32,
                                ctypes.POINTER(BitmapOptions), ctypes.POINTER(Error)]
    L.instar_dd.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(DdOptions), ctypes.POINTER(Error)]
    setattr(L, "_bitmapdd_ready", True)
    return L


def bitmap(path: str, name: str, *actions: Union[str, Tuple[str, str]], fmt: Optional[str] = None,
           granularity: int = 0, source: Optional[str] = None, source_fmt: Optional[str] = None, open_flags: int = 0,
           key_secret: Optional[str] = None, warning: Optional[WarningCallable] = None) -> None:
    """Like `qemu-img bitmap [-f FMT] [-g G] [-b SOURCE [-F SOURCE_FMT]] ACTIONS PATH NAME`. Each action is
    "add", "remove", "clear", "enable", "disable" or ("merge", SOURCE_BITMAP); they run in the order given.
    `warning(text)` gets the warnings qemu-img bitmap prints on stderr (the probed-raw one), without the final
    newline."""
    arr = (BitmapAction * max(1, len(actions)))()
    keep = []
    for i, a in enumerate(actions):
        if isinstance(a, (tuple, list)):
            kind, src = a[0], encode(a[1])
            keep.append(src)
        else:
            kind, src = a, None
        arr[i] = BitmapAction(_ACTIONS[kind], 0, src)
    L = _setup()
    o = BitmapOptions(ctypes.sizeof(BitmapOptions), open_flags, encode(fmt), int(granularity), encode(source),
                      encode(source_fmt), encode(key_secret), make_warning(warning), None)
    err = Error()
    check(L.instar_bitmap(encode(path), encode(name), arr, len(actions), ctypes.byref(o), ctypes.byref(err)), err)


def dd(input: str, output: str, fmt: Optional[str] = None, out_fmt: Optional[str] = None, bs: int = 0,
       count: int = -1, skip: int = -1, osize: int = -1, isize: int = -1, snapshot: Optional[str] = None,
       force_share: bool = False, no_create: bool = False, progress: Optional[ProgressCallable] = None,
       key_secret: Optional[str] = None, cancel: Optional[Cancel] = None) -> None:
    """Like `qemu-img dd [-f FMT] [-O OUT_FMT] [-U] [-n] [-l SNAPSHOT] bs= count= skip= osize= isize= if= of=`
    (-1 leaves a number unset). `progress(percent)` may return True to cancel, and so does `cancel.cancel()`
    from another thread."""
    flags = (DD_FORCE_SHARE if force_share else 0) | (DD_NO_CREATE if no_create else 0)
    L = _setup()
    cb = _progress(progress, cancel)
    o = DdOptions(ctypes.sizeof(DdOptions), flags, encode(fmt), encode(out_fmt), int(bs), int(count), int(skip),
                  int(osize), int(isize), encode(snapshot), cb, None, encode(key_secret))
    err = Error()
    check(L.instar_dd(encode(input), encode(output), ctypes.byref(o), ctypes.byref(err)), err)


BENCH_WRITE = 1 << 0
BENCH_NO_DRAIN = 1 << 1
BENCH_FORCE_SHARE = 1 << 2
BENCH_NATIVE_AIO = 1 << 3


class BenchOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("cache", ctypes.c_char_p), ("count", ctypes.c_int32), ("depth", ctypes.c_int32),
                ("offset", ctypes.c_int64), ("buffer_size", ctypes.c_int32), ("step", ctypes.c_int32),
                ("pattern", ctypes.c_int32), ("flush_interval", ctypes.c_int32), ("progress", PROGRESS_FN),
                ("progress_data", ctypes.c_void_p), ("key_secret", ctypes.c_char_p), ("limits", ctypes.POINTER(Limits))]


class BenchResult(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("requests", ctypes.c_uint64),
                ("bytes", ctypes.c_uint64), ("seconds", ctypes.c_double)]


def bench_result(path: str, fmt: Optional[str] = None, write: bool = False, count: int = 75000, depth: int = 64,
                 offset: int = 0, buffer_size: int = 4096, step: int = 0, pattern: int = 0, flush_interval: int = 0,
                 drain: bool = True, cache: Optional[str] = None, force_share: bool = False, native_aio: bool = False,
                 progress: Optional[ProgressCallable] = None, key_secret: Optional[str] = None,
                 cancel: Optional[Cancel] = None) -> BenchResultData:
    """Like `qemu-img bench`; returns a BenchResult. `progress(percent)` may return True to cancel, and so does
    `cancel.cancel()` from another thread."""
    L = lib()
    if not getattr(L, "_bench_ready", False):
        L.instar_bench.argtypes = [ctypes.c_char_p, ctypes.POINTER(BenchOptions), ctypes.POINTER(BenchResult),
                                   ctypes.POINTER(Error)]
        setattr(L, "_bench_ready", True)
    flags = ((BENCH_WRITE if write else 0) | (0 if drain else BENCH_NO_DRAIN) |
             (BENCH_FORCE_SHARE if force_share else 0) | (BENCH_NATIVE_AIO if native_aio else 0))
    cb = _progress(progress, cancel)
    o = BenchOptions(ctypes.sizeof(BenchOptions), flags, encode(fmt), encode(cache), count, depth, offset,
                     buffer_size, step, pattern, flush_interval, cb, None, encode(key_secret))
    r = BenchResult(ctypes.sizeof(BenchResult))
    err = Error()
    check(L.instar_bench(encode(path), ctypes.byref(o), ctypes.byref(r), ctypes.byref(err)), err)
    return BenchResultData(r.requests, r.bytes, r.seconds)


def bench(path: str, fmt: Optional[str] = None, write: bool = False, count: int = 75000, depth: int = 64,
          offset: int = 0, buffer_size: int = 4096, step: int = 0, pattern: int = 0, flush_interval: int = 0,
          drain: bool = True, cache: Optional[str] = None, force_share: bool = False, native_aio: bool = False,
          progress: Optional[ProgressCallable] = None, key_secret: Optional[str] = None,
          cancel: Optional[Cancel] = None) -> Dict[str, Any]:
    """Like `qemu-img bench`; returns {"requests", "bytes", "seconds"} (see bench_result for the dataclass)."""
    return bench_result(path, fmt, write, count, depth, offset, buffer_size, step, pattern, flush_interval, drain,
                        cache, force_share, native_aio, progress, key_secret, cancel).to_dict()
