"""instar_map / instar_compare / instar_convert."""
from __future__ import annotations

import ctypes
from typing import Any, Dict, List, Optional, Tuple

from ._lib import Error, Limits, Options, InstarError, check, encode, lib  # noqa: F401
from .image import OPEN_FORCE_SHARE, OPEN_ISOLATED
from .progress import PROGRESS_FN as PROGRESS_FN  # re-exported: the other modules take it from here
from .progress import Cancel, ProgressCallable, make_progress
from .results import CompareResult as CompareResultData
from .results import MapEntry as MapEntryData

CONVERT_NO_CREATE = 1 << 0
CONVERT_TARGET_IS_ZERO = 1 << 1
CONVERT_FORCE_SHARE = 1 << 2
CONVERT_COMPRESS = 1 << 3
CONVERT_UNORDERED_WRITES = 1 << 4
CONVERT_BITMAPS = 1 << 5
CONVERT_SKIP_BROKEN_BITMAPS = 1 << 6
CONVERT_COPY_RANGE = 1 << 7
CONVERT_SALVAGE = 1 << 8


class MapEntry(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("length", ctypes.c_uint64), ("depth", ctypes.c_int32),
                ("present", ctypes.c_int32), ("zero", ctypes.c_int32), ("data", ctypes.c_int32),
                ("has_offset", ctypes.c_int32), ("offset", ctypes.c_uint64), ("filename", ctypes.c_char_p)]


class Map(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("entries", ctypes.POINTER(MapEntry))]


class MapOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("start_offset", ctypes.c_uint64), ("max_length", ctypes.c_int64), ("key_secret", ctypes.c_char_p),
                ("limits", ctypes.POINTER(Limits)), ("backing_key_secret", ctypes.c_char_p)]


class CompareOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format1", ctypes.c_char_p),
                ("format2", ctypes.c_char_p), ("strict", ctypes.c_int32), ("progress", PROGRESS_FN),
                ("progress_data", ctypes.c_void_p), ("key_secret1", ctypes.c_char_p),
                ("key_secret2", ctypes.c_char_p), ("limits", ctypes.POINTER(Limits)),
                ("backing_key_secret1", ctypes.c_char_p), ("backing_key_secret2", ctypes.c_char_p)]


class CompareResult(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("identical", ctypes.c_int32), ("size_mismatch", ctypes.c_int32),
                ("mismatch_offset", ctypes.c_int64), ("message", ctypes.c_char * 256),
                ("exit_status", ctypes.c_int32), ("error_message", ctypes.c_char * 512)]


class ConvertOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("source_format", ctypes.c_char_p),
                ("target_format", ctypes.c_char_p), ("source_cache", ctypes.c_char_p),
                ("target_cache", ctypes.c_char_p), ("sparse_size", ctypes.c_int64), ("progress", PROGRESS_FN),
                ("progress_data", ctypes.c_void_p), ("options", ctypes.c_char_p), ("backing_file", ctypes.c_char_p),
                ("backing_format", ctypes.c_char_p), ("snapshot", ctypes.c_char_p), ("coroutines", ctypes.c_int32),
                ("rate_limit", ctypes.c_int64), ("key_secret", ctypes.c_char_p),
                ("target_key_secret", ctypes.c_char_p), ("limits", ctypes.POINTER(Limits)),
                ("backing_key_secret", ctypes.c_char_p), ("open_flags", ctypes.c_uint32)]


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_ops_ready", False):
        return L
    L.instar_map.argtypes = [ctypes.c_char_p, ctypes.POINTER(MapOptions), ctypes.POINTER(ctypes.POINTER(Map)),
                             ctypes.POINTER(Error)]
    L.instar_map_free.argtypes = [ctypes.POINTER(Map)]
    L.instar_map_free.restype = None
    L.instar_compare.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(CompareOptions),
                                 ctypes.POINTER(CompareResult), ctypes.POINTER(Error)]
    L.instar_convert.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ConvertOptions),
                                 ctypes.POINTER(Error)]
    setattr(L, "_ops_ready", True)
    return L


def _progress(callback: Optional[ProgressCallable], cancel: Optional[Cancel] = None) -> Any:
    """A C progress callback around a Python callable and/or Cancel token; returning True (or raising) from the
    callable cancels."""
    return make_progress(callback, cancel)


def map_entries(path: str, format: Optional[str] = None, start_offset: int = 0, max_length: Optional[int] = None,
                force_share: bool = False, key_secret: Optional[str] = None,
                isolated: bool = False, backing_key_secret: Optional[str] = None) -> List[MapEntryData]:
    """The extents `qemu-img map` reports, as MapEntry dataclasses (with the C struct's fields, the data's file
    name included)."""
    L = _setup()
    opts = MapOptions(ctypes.sizeof(MapOptions),
                      (OPEN_FORCE_SHARE if force_share else 0) | (OPEN_ISOLATED if isolated else 0), encode(format),
                      start_offset, -1 if max_length is None else max_length, encode(key_secret))
    opts.backing_key_secret = encode(backing_key_secret)
    out = ctypes.POINTER(Map)()
    err = Error()
    check(L.instar_map(encode(path), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(err)), err)
    try:
        result = []
        for i in range(out.contents.count):
            e = out.contents.entries[i]
            result.append(MapEntryData(
                e.start, e.length, e.depth, bool(e.present), bool(e.zero), bool(e.data),
                e.offset if e.has_offset else None,
                e.filename.decode("utf-8", "surrogateescape") if e.has_offset and e.filename else None))
        return result
    finally:
        L.instar_map_free(out)


def map(path: str, format: Optional[str] = None, start_offset: int = 0, max_length: Optional[int] = None,
        force_share: bool = False, key_secret: Optional[str] = None, isolated: bool = False,
        backing_key_secret: Optional[str] = None) -> List[Dict[str, Any]]:
    """The entries of `qemu-img map --output=json` as dicts with the same keys in the same order (see
    map_entries for dataclasses)."""
    return [e.to_dict() for e in map_entries(path, format, start_offset, max_length, force_share, key_secret,
                                             isolated, backing_key_secret)]


def compare_result(path1: str, path2: str, format1: Optional[str] = None, format2: Optional[str] = None,
                   strict: bool = False, force_share: bool = False, progress: Optional[ProgressCallable] = None,
                   key_secret1: Optional[str] = None, key_secret2: Optional[str] = None,
                   cancel: Optional[Cancel] = None, isolated: bool = False,
                   backing_key_secret1: Optional[str] = None,
                   backing_key_secret2: Optional[str] = None) -> CompareResultData:
    """Compares like `qemu-img compare`; returns a CompareResult. Images that differ are no error.
    `key_secret1`/`key_secret2` are the passphrases of encrypted images, `backing_key_secret1`/`2` those of the
    encrypted images below them; `progress(percent)` may return True to cancel, and so does `cancel.cancel()`
    from another thread."""
    result, error = compare_status(path1, path2, format1, format2, strict, force_share, progress, key_secret1,
                                   key_secret2, cancel, isolated, backing_key_secret1, backing_key_secret2)
    if error is not None:
        raise error
    return result


def compare_status(path1: str, path2: str, format1: Optional[str] = None, format2: Optional[str] = None,
                   strict: bool = False, force_share: bool = False, progress: Optional[ProgressCallable] = None,
                   key_secret1: Optional[str] = None, key_secret2: Optional[str] = None,
                   cancel: Optional[Cancel] = None,
                   isolated: bool = False, backing_key_secret1: Optional[str] = None,
                   backing_key_secret2: Optional[str] = None) -> Tuple[CompareResultData, Optional[InstarError]]:
    """Like compare_result, but a failure is returned, not raised: (result, error). `result.exit_status` is
    qemu-img compare's exit status in every case (0 identical, 1 different, 2 an image could not be opened, 3 a
    block-status query failed or an image is corrupt, 4 a read failed) and, on failure, `result.error_message`
    the line qemu-img prints on stderr after "qemu-img: "; `error` is the InstarError (None on success)."""
    L = _setup()
    cb = _progress(progress, cancel)
    flags = (OPEN_FORCE_SHARE if force_share else 0) | (OPEN_ISOLATED if isolated else 0)
    opts = CompareOptions(ctypes.sizeof(CompareOptions), flags, encode(format1),
                          encode(format2), 1 if strict else 0, cb, None, encode(key_secret1), encode(key_secret2))
    opts.backing_key_secret1 = encode(backing_key_secret1)
    opts.backing_key_secret2 = encode(backing_key_secret2)
    res = CompareResult()
    res.struct_size = ctypes.sizeof(CompareResult)
    err = Error()
    rc = L.instar_compare(encode(path1), encode(path2), ctypes.byref(opts), ctypes.byref(res), ctypes.byref(err))
    error: Optional[InstarError] = None
    try:
        check(rc, err)
    except InstarError as e:
        error = e
    return CompareResultData(bool(res.identical), bool(res.size_mismatch),
                             None if res.mismatch_offset < 0 else res.mismatch_offset, res.message.decode(),
                             res.exit_status, res.error_message.decode("utf-8", "replace")), error


def compare(path1: str, path2: str, format1: Optional[str] = None, format2: Optional[str] = None,
            strict: bool = False, force_share: bool = False, progress: Optional[ProgressCallable] = None,
            key_secret1: Optional[str] = None, key_secret2: Optional[str] = None,
            cancel: Optional[Cancel] = None, isolated: bool = False, backing_key_secret1: Optional[str] = None,
            backing_key_secret2: Optional[str] = None) -> Dict[str, Any]:
    """Compares like `qemu-img compare`; returns a dict with identical, size_mismatch, mismatch_offset, message
    (see compare_result for the dataclass)."""
    return compare_result(path1, path2, format1, format2, strict, force_share, progress, key_secret1, key_secret2,
                          cancel, isolated, backing_key_secret1, backing_key_secret2).to_dict()


def convert(src: str, dst: str, source_format: Optional[str] = None, target_format: Optional[str] = None,
            no_create: bool = False, target_is_zero: bool = False, force_share: bool = False,
            source_cache: Optional[str] = None, target_cache: Optional[str] = None, sparse_size: Optional[int] = None,
            progress: Optional[ProgressCallable] = None, fmt: Optional[str] = None, options: Optional[str] = None,
            compress: bool = False, backing_file: Optional[str] = None, backing_format: Optional[str] = None,
            snapshot: Optional[str] = None, coroutines: int = 8, rate_limit: int = 0, unordered_writes: bool = False,
            bitmaps: bool = False, skip_broken_bitmaps: bool = False, key_secret: Optional[str] = None,
            target_key_secret: Optional[str] = None, cancel: Optional[Cancel] = None, copy_range: bool = False,
            salvage: bool = False, backing_key_secret: Optional[str] = None, isolated: bool = False) -> None:
    """Converts like `qemu-img convert`. `fmt` (or `target_format`) is -O, `options` the -o string, `compress`
    -c, `backing_file`/`backing_format` -B/-F, `snapshot` -l, `coroutines` -m, `rate_limit` -r (bytes/s).
    `key_secret` unlocks an encrypted source, `backing_key_secret` the encrypted images below it (its backing
    file and theirs), `target_key_secret` an encrypted target (existing with
    no_create, or new with options asking for encrypt.format=luks or aes). `copy_range` is -C (copy
    offloading), `salvage` --salvage (unreadable sectors become zeroes). `isolated` parses the (untrusted)
    source in the confined helper process and reads it through it; the target is written in this process
    (a crash or hang of the helper raises IsolationFailed or LimitReached).
    `progress(percent)` gets qemu's progress values; a true return cancels, and so does `cancel.cancel()` from
    another thread (instar.Cancelled is raised)."""
    L = _setup()
    flags = (CONVERT_NO_CREATE if no_create else 0) | (CONVERT_TARGET_IS_ZERO if target_is_zero else 0) | \
        (CONVERT_FORCE_SHARE if force_share else 0) | (CONVERT_COMPRESS if compress else 0) | \
        (CONVERT_UNORDERED_WRITES if unordered_writes else 0) | (CONVERT_BITMAPS if bitmaps else 0) | \
        (CONVERT_SKIP_BROKEN_BITMAPS if skip_broken_bitmaps else 0) | (CONVERT_COPY_RANGE if copy_range else 0) | \
        (CONVERT_SALVAGE if salvage else 0)
    cb = _progress(progress, cancel)
    opts = ConvertOptions(ctypes.sizeof(ConvertOptions), flags, encode(source_format), encode(fmt or target_format),
                          encode(source_cache), encode(target_cache), -1 if sparse_size is None else sparse_size,
                          cb, None, encode(options), encode(backing_file), encode(backing_format), encode(snapshot),
                          coroutines, rate_limit, encode(key_secret), encode(target_key_secret))
    opts.backing_key_secret = encode(backing_key_secret)
    opts.open_flags = OPEN_ISOLATED if isolated else 0
    err = Error()
    check(L.instar_convert(encode(src), encode(dst), ctypes.byref(opts), ctypes.byref(err)), err)
