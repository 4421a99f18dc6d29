"""instar_check / instar_check_json: what `qemu-img check` reports.

`check(path)` returns the dict `qemu-img check --output=json` prints; `repair="leaks"` or `"all"` repairs the
image first, as `-r leaks` / `-r all` do (the dict then carries leaks-fixed / corruptions-fixed).
"""
import ctypes
import json

from ._lib import Error, check as _check_rc, encode, lib, take_string
from .image import OPEN_FORCE_SHARE

REPAIR_LEAKS = 1 << 0
REPAIR_ERRORS = 1 << 1
REPAIR_ALL = REPAIR_LEAKS | REPAIR_ERRORS


class _CheckOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("repair", ctypes.c_uint32), ("key_secret", ctypes.c_char_p)]


def _setup():
    L = lib()
    if getattr(L, "_check_ready", False):
        return L
    L.instar_check_json.argtypes = [ctypes.c_char_p, ctypes.POINTER(_CheckOptions), ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.POINTER(Error)]
    L.instar_check_chain_json.argtypes = [ctypes.c_char_p, ctypes.POINTER(_CheckOptions),
                                          ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int32),
                                          ctypes.POINTER(Error)]
    L._check_ready = True
    return L


def check_json(path, repair=None, format=None, force_share=False, key_secret=None):
    """The exact text of `qemu-img check --output=json` (with the trailing newline)."""
    L = _setup()
    modes = {None: 0, "leaks": REPAIR_LEAKS, "all": REPAIR_ALL}
    if repair not in modes:
        raise ValueError("repair must be None, 'leaks' or 'all'")
    opts = _CheckOptions(ctypes.sizeof(_CheckOptions), OPEN_FORCE_SHARE if force_share else 0,
                         encode(format) if format else None, modes[repair], encode(key_secret))
    out = ctypes.c_void_p()
    err = Error()
    _check_rc(L.instar_check_json(encode(path), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(err)), err)
    return take_string(out)


def check(path, repair=None, format=None, force_share=False, key_secret=None):
    """The ImageCheck object `qemu-img check --output=json` prints, as a dict."""
    return json.loads(check_json(path, repair=repair, format=format, force_share=force_share, key_secret=key_secret))


def check_chain_json(path, repair=None, format=None, force_share=False, key_secret=None):
    """`check --chain --output=json` (an instar extension): (worst exit status, the JSON array text) for every
    image of the backing chain, top first. The worst status ranks 1 > 2 > 3 > 63 > 0."""
    L = _setup()
    modes = {None: 0, "leaks": REPAIR_LEAKS, "all": REPAIR_ALL}
    if repair not in modes:
        raise ValueError("repair must be None, 'leaks' or 'all'")
    opts = _CheckOptions(ctypes.sizeof(_CheckOptions), OPEN_FORCE_SHARE if force_share else 0,
                         encode(format) if format else None, modes[repair], encode(key_secret))
    out = ctypes.c_void_p()
    code = ctypes.c_int32(0)
    err = Error()
    _check_rc(L.instar_check_chain_json(encode(path), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(code),
                                        ctypes.byref(err)), err)
    return code.value, take_string(out)
