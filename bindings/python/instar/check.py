"""instar_check / instar_check_json: what `qemu-img check` reports.

`check(path)` returns the dict `qemu-img check --output=json` prints; `repair="leaks"` or `"all"` repairs the
image first, as `-r leaks` / `-r all` do (the dict then carries leaks-fixed / corruptions-fixed).
"""
from __future__ import annotations

import ctypes
import json
from typing import Any, Dict, Optional, Tuple

from ._lib import Error, Limits, Options, check as _check_rc, encode, lib, take_string
from .image import OPEN_FORCE_SHARE, OPEN_ISOLATED
from .results import CheckResult

REPAIR_LEAKS = 1 << 0
REPAIR_ERRORS = 1 << 1
REPAIR_ALL = REPAIR_LEAKS | REPAIR_ERRORS


class _CheckResult(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("exit_code", ctypes.c_int32), ("check_errors", ctypes.c_int64),
                ("corruptions", ctypes.c_int64), ("leaks", ctypes.c_int64), ("corruptions_fixed", ctypes.c_int64),
                ("leaks_fixed", ctypes.c_int64), ("image_end_offset", ctypes.c_int64),
                ("total_clusters", ctypes.c_int64), ("allocated_clusters", ctypes.c_int64),
                ("fragmented_clusters", ctypes.c_int64), ("compressed_clusters", ctypes.c_int64)]


class _CheckOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("repair", ctypes.c_uint32), ("key_secret", ctypes.c_char_p), ("limits", ctypes.POINTER(Limits))]


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_check_ready", False):
        return L
    L.instar_check_json.argtypes = [ctypes.c_char_p, ctypes.POINTER(_CheckOptions), ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.POINTER(Error)]
    L.instar_check_chain_json.argtypes = [ctypes.c_char_p, ctypes.POINTER(_CheckOptions),
                                          ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int32),
                                          ctypes.POINTER(Error)]
    L.instar_check.argtypes = [ctypes.c_char_p, ctypes.POINTER(_CheckOptions), ctypes.POINTER(_CheckResult),
                               ctypes.POINTER(Error)]
    setattr(L, "_check_ready", True)
    return L


def _options(repair: Optional[str], format: Optional[str], force_share: bool,
             key_secret: Optional[str], isolated: bool = False) -> _CheckOptions:
    modes = {None: 0, "leaks": REPAIR_LEAKS, "all": REPAIR_ALL}
    if repair not in modes:
        raise ValueError("repair must be None, 'leaks' or 'all'")
    return _CheckOptions(ctypes.sizeof(_CheckOptions),
                         (OPEN_FORCE_SHARE if force_share else 0) | (OPEN_ISOLATED if isolated else 0),
                         encode(format) if format else None, modes[repair], encode(key_secret))


def check_result(path: str, repair: Optional[str] = None, format: Optional[str] = None, force_share: bool = False,
                 key_secret: Optional[str] = None, isolated: bool = False) -> CheckResult:
    """The counters of `qemu-img check` as a CheckResult (instar_check); an image with problems is no error, see
    `exit_code`."""
    L = _setup()
    opts = _options(repair, format, force_share, key_secret, isolated)
    r = _CheckResult()
    r.struct_size = ctypes.sizeof(_CheckResult)
    err = Error()
    _check_rc(L.instar_check(encode(path), ctypes.byref(opts), ctypes.byref(r), ctypes.byref(err)), err)
    counts = [getattr(r, f[0]) for f in _CheckResult._fields_[3:]]
    return CheckResult(r.exit_code, r.check_errors, *(None if v < 0 else v for v in counts))


def check_report(path: str, repair: Optional[str] = None, format: Optional[str] = None, force_share: bool = False,
                 key_secret: Optional[str] = None, isolated: bool = False) -> Tuple[CheckResult, str, str]:
    """One check, everything `qemu-img check` reports (instar_check_report): the counters as a CheckResult, the
    text of `--output=json`, and the lines qemu-img prints on stderr while checking ("ERROR cluster 3
    refcount=0 reference=1", with "qemu-img: " where qemu-img prints it; "" when none)."""
    L = _setup()
    if not getattr(L, "_check_report_ready", False):
        L.instar_check_report.argtypes = [ctypes.c_char_p, ctypes.POINTER(_CheckOptions),
                                          ctypes.POINTER(_CheckResult), ctypes.POINTER(ctypes.c_void_p),
                                          ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(Error)]
        setattr(L, "_check_report_ready", True)
    opts = _options(repair, format, force_share, key_secret, isolated)
    r = _CheckResult()
    r.struct_size = ctypes.sizeof(_CheckResult)
    json_text, messages = ctypes.c_void_p(), ctypes.c_void_p()
    err = Error()
    _check_rc(L.instar_check_report(encode(path), ctypes.byref(opts), ctypes.byref(r), ctypes.byref(json_text),
                                    ctypes.byref(messages), ctypes.byref(err)), err)
    counts = [getattr(r, f[0]) for f in _CheckResult._fields_[3:]]
    return (CheckResult(r.exit_code, r.check_errors, *(None if v < 0 else v for v in counts)),
            take_string(json_text), take_string(messages))


def check_json(path: str, repair: Optional[str] = None, format: Optional[str] = None, force_share: bool = False,
               key_secret: Optional[str] = None, isolated: bool = False) -> str:
    """The exact text of `qemu-img check --output=json` (with the trailing newline)."""
    L = _setup()
    opts = _options(repair, format, force_share, key_secret, isolated)
    out = ctypes.c_void_p()
    err = Error()
    _check_rc(L.instar_check_json(encode(path), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(err)), err)
    return take_string(out)


def check(path: str, repair: Optional[str] = None, format: Optional[str] = None, force_share: bool = False,
          key_secret: Optional[str] = None, isolated: bool = False) -> Dict[str, Any]:
    """The ImageCheck object `qemu-img check --output=json` prints, as a dict."""
    result: Dict[str, Any] = json.loads(check_json(path, repair=repair, format=format, force_share=force_share,
                                                   key_secret=key_secret, isolated=isolated))
    return result


def check_chain_json(path: str, repair: Optional[str] = None, format: Optional[str] = None,
                     force_share: bool = False, key_secret: Optional[str] = None) -> Tuple[int, str]:
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
