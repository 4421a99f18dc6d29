"""instar_map / instar_compare / instar_convert."""
import ctypes

from ._lib import Error, InstarError, check, encode, lib
from .image import OPEN_FORCE_SHARE

PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_double, ctypes.c_void_p)

CONVERT_NO_CREATE = 1 << 0
CONVERT_TARGET_IS_ZERO = 1 << 1
CONVERT_FORCE_SHARE = 1 << 2
CONVERT_COMPRESS = 1 << 3
CONVERT_UNORDERED_WRITES = 1 << 4
CONVERT_BITMAPS = 1 << 5
CONVERT_SKIP_BROKEN_BITMAPS = 1 << 6


class MapEntry(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("length", ctypes.c_uint64), ("depth", ctypes.c_int32),
                ("present", ctypes.c_int32), ("zero", ctypes.c_int32), ("data", ctypes.c_int32),
                ("has_offset", ctypes.c_int32), ("offset", ctypes.c_uint64), ("filename", ctypes.c_char_p)]


class Map(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("entries", ctypes.POINTER(MapEntry))]


class MapOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("start_offset", ctypes.c_uint64), ("max_length", ctypes.c_int64), ("key_secret", ctypes.c_char_p)]


class CompareOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format1", ctypes.c_char_p),
                ("format2", ctypes.c_char_p), ("strict", ctypes.c_int32), ("progress", PROGRESS_FN),
                ("progress_data", ctypes.c_void_p), ("key_secret1", ctypes.c_char_p),
                ("key_secret2", ctypes.c_char_p)]


class CompareResult(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("identical", ctypes.c_int32), ("size_mismatch", ctypes.c_int32),
                ("mismatch_offset", ctypes.c_int64), ("message", ctypes.c_char * 256)]


class ConvertOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("source_format", ctypes.c_char_p),
                ("target_format", ctypes.c_char_p), ("source_cache", ctypes.c_char_p),
                ("target_cache", ctypes.c_char_p), ("sparse_size", ctypes.c_int64), ("progress", PROGRESS_FN),
                ("progress_data", ctypes.c_void_p), ("options", ctypes.c_char_p), ("backing_file", ctypes.c_char_p),
                ("backing_format", ctypes.c_char_p), ("snapshot", ctypes.c_char_p), ("coroutines", ctypes.c_int32),
                ("rate_limit", ctypes.c_int64), ("key_secret", ctypes.c_char_p),
                ("target_key_secret", ctypes.c_char_p)]


def _setup():
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
    L._ops_ready = True
    return L


def _progress(callback):
    """A C progress callback around a Python callable; returning True (or raising) from it cancels."""
    if callback is None:
        return PROGRESS_FN()

    def fn(percent, _data):
        try:
            return 1 if callback(percent) else 0
        except Exception:
            return 1
    return PROGRESS_FN(fn)


def map(path, format=None, start_offset=0, max_length=None, force_share=False, key_secret=None):
    """The entries of `qemu-img map --output=json` as dicts with the same keys in the same order."""
    L = _setup()
    opts = MapOptions(ctypes.sizeof(MapOptions), OPEN_FORCE_SHARE if force_share else 0, encode(format),
                      start_offset, -1 if max_length is None else max_length, encode(key_secret))
    out = ctypes.POINTER(Map)()
    err = Error()
    check(L.instar_map(encode(path), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(err)), err)
    try:
        result = []
        for i in range(out.contents.count):
            e = out.contents.entries[i]
            d = {"start": e.start, "length": e.length, "depth": e.depth, "present": bool(e.present),
                 "zero": bool(e.zero), "data": bool(e.data)}
            if e.has_offset:
                d["offset"] = e.offset
            result.append(d)
        return result
    finally:
        L.instar_map_free(out)


def compare(path1, path2, format1=None, format2=None, strict=False, force_share=False, progress=None,
            key_secret1=None, key_secret2=None):
    """Compares like `qemu-img compare`; returns a dict with identical, size_mismatch, mismatch_offset, message.
    `key_secret1`/`key_secret2` are the passphrases of encrypted images."""
    L = _setup()
    cb = _progress(progress)
    opts = CompareOptions(ctypes.sizeof(CompareOptions), OPEN_FORCE_SHARE if force_share else 0, encode(format1),
                          encode(format2), 1 if strict else 0, cb, None, encode(key_secret1), encode(key_secret2))
    res = CompareResult()
    res.struct_size = ctypes.sizeof(CompareResult)
    err = Error()
    check(L.instar_compare(encode(path1), encode(path2), ctypes.byref(opts), ctypes.byref(res), ctypes.byref(err)),
          err)
    return {"identical": bool(res.identical), "size_mismatch": bool(res.size_mismatch),
            "mismatch_offset": None if res.mismatch_offset < 0 else res.mismatch_offset,
            "message": res.message.decode()}


def convert(src, dst, source_format=None, target_format=None, no_create=False, target_is_zero=False,
            force_share=False, source_cache=None, target_cache=None, sparse_size=None, progress=None, fmt=None,
            options=None, compress=False, backing_file=None, backing_format=None, snapshot=None, coroutines=8,
            rate_limit=0, unordered_writes=False, bitmaps=False, skip_broken_bitmaps=False, key_secret=None,
            target_key_secret=None):
    """Converts like `qemu-img convert`. `fmt` (or `target_format`) is -O, `options` the -o string, `compress`
    -c, `backing_file`/`backing_format` -B/-F, `snapshot` -l, `coroutines` -m, `rate_limit` -r (bytes/s).
    `key_secret` unlocks an encrypted source, `target_key_secret` an encrypted target (existing with
    no_create, or new with options asking for encrypt.format=luks or aes).
    `progress(percent)` gets qemu's progress values; a true return cancels."""
    L = _setup()
    flags = (CONVERT_NO_CREATE if no_create else 0) | (CONVERT_TARGET_IS_ZERO if target_is_zero else 0) | \
        (CONVERT_FORCE_SHARE if force_share else 0) | (CONVERT_COMPRESS if compress else 0) | \
        (CONVERT_UNORDERED_WRITES if unordered_writes else 0) | (CONVERT_BITMAPS if bitmaps else 0) | \
        (CONVERT_SKIP_BROKEN_BITMAPS if skip_broken_bitmaps else 0)
    cb = _progress(progress)
    opts = ConvertOptions(ctypes.sizeof(ConvertOptions), flags, encode(source_format), encode(fmt or target_format),
                          encode(source_cache), encode(target_cache), -1 if sparse_size is None else sparse_size,
                          cb, None, encode(options), encode(backing_file), encode(backing_format), encode(snapshot),
                          coroutines, rate_limit, encode(key_secret), encode(target_key_secret))
    err = Error()
    check(L.instar_convert(encode(src), encode(dst), ctypes.byref(opts), ctypes.byref(err)), err)
