"""instar_create / instar_measure: qemu-img create and measure."""
from __future__ import annotations

import ctypes
from typing import Any, Callable, Dict, Mapping, Optional, Union

from ._lib import Error, Limits, Options, InstarError, check, encode, lib, take_string
from .results import MeasureResult as MeasureResultData

CREATE_NO_BACKING_OPEN = 1 << 0


class CreateOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("size", ctypes.c_int64), ("backing_file", ctypes.c_char_p), ("backing_format", ctypes.c_char_p),
                ("options", ctypes.c_char_p), ("key_secret", ctypes.c_char_p), ("size_text", ctypes.c_char_p),
                ("limits", ctypes.POINTER(Limits))]


class MeasureOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32),
                ("source_format", ctypes.c_char_p), ("output_format", ctypes.c_char_p),
                ("options", ctypes.c_char_p), ("size", ctypes.c_int64), ("key_secret", ctypes.c_char_p),
                ("limits", ctypes.POINTER(Limits))]


class MeasureResult(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("has_bitmaps", ctypes.c_int32), ("required", ctypes.c_uint64),
                ("fully_allocated", ctypes.c_uint64), ("bitmaps", ctypes.c_uint64)]


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_create_ready", False):
        return L
    L.instar_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(CreateOptions), ctypes.POINTER(Error)]
    L.instar_measure.argtypes = [ctypes.c_char_p, ctypes.POINTER(MeasureOptions), ctypes.POINTER(MeasureResult),
                                 ctypes.POINTER(Error)]
    setattr(L, "_create_ready", True)
    return L


def _option_string(opts: Mapping[str, object]) -> Optional[str]:
    parts = []
    for k, v in opts.items():
        if isinstance(v, bool):
            v = "on" if v else "off"
        parts.append("%s=%s" % (k, str(v).replace(",", ",,")))
    return ",".join(parts) or None


def _create_options(fmt: str, size: Union[int, str, None], backing_file: Optional[str],
                    backing_format: Optional[str], no_backing_open: bool, key_secret: Optional[str],
                    opts: Mapping[str, object]) -> CreateOptions:
    """The C options; a str size goes as qemu-img's size text (size_text)."""
    return CreateOptions(ctypes.sizeof(CreateOptions), CREATE_NO_BACKING_OPEN if no_backing_open else 0,
                         encode(fmt), int(size) if isinstance(size, int) else -1, encode(backing_file),
                         encode(backing_format), encode(_option_string(opts)), encode(key_secret),
                         encode(size) if isinstance(size, str) else None)


def create(path: str, fmt: str = "raw", size: Union[int, str, None] = None, backing_file: Optional[str] = None,
           backing_format: Optional[str] = None, no_backing_open: bool = False, key_secret: Optional[str] = None,
           formatting: Optional[Callable[[str], object]] = None, **opts: object) -> None:
    """Creates an image like `qemu-img create -f FMT [-b B -F BF] [-o k=v,...] PATH SIZE`.
    `size` is bytes, or a str as qemu-img's size operand takes it ("1G", "1.5M"; qemu-img's errors otherwise).
    Extra keyword arguments are -o options (cluster_size=65536, preallocation="metadata", ...); dotted names
    such as encrypt.format go through a dict: create(p, "qcow2", n, key_secret="pw", **{"encrypt.format": "luks"}).
    `key_secret` is the new image's passphrase when the options ask for encryption.
    `formatting(line)` gets the `Formatting '...', fmt=...` line qemu-img create prints (no newline) once the
    request is valid, before any error of the creation itself is raised."""
    if formatting is not None:
        try:
            line = create_formatting(path, fmt, size, backing_file, backing_format, no_backing_open, key_secret,
                                     **opts)
        except InstarError as e:
            printed = getattr(e, "output", None)
            if printed:
                formatting(printed[:-1] if printed.endswith("\n") else printed)
            raise
        formatting(line[:-1] if line.endswith("\n") else line)
        return
    L = _setup()
    o = _create_options(fmt, size, backing_file, backing_format, no_backing_open, key_secret, opts)
    err = Error()
    check(L.instar_create(encode(path), ctypes.byref(o), ctypes.byref(err)), err)


def create_formatting(path: str, fmt: str = "raw", size: Union[int, str, None] = None,
                      backing_file: Optional[str] = None, backing_format: Optional[str] = None,
                      no_backing_open: bool = False, key_secret: Optional[str] = None, **opts: object) -> str:
    """create(), returning the line `qemu-img create` prints ("Formatting 'PATH', fmt=...\\n";
    instar_create_formatting). When the creation fails after that line (qemu-img printed it, then failed), the
    InstarError raised carries it as `.output` (None when it failed before)."""
    L = _setup()
    if not getattr(L, "_create_formatting_ready", False):
        L.instar_create_formatting.argtypes = [ctypes.c_char_p, ctypes.POINTER(CreateOptions),
                                               ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(Error)]
        setattr(L, "_create_formatting_ready", True)
    o = _create_options(fmt, size, backing_file, backing_format, no_backing_open, key_secret, opts)
    err = Error()
    line = ctypes.c_void_p()
    rc = L.instar_create_formatting(encode(path), ctypes.byref(o), ctypes.byref(line), ctypes.byref(err))
    text = take_string(line) if line.value else None
    try:
        check(rc, err)
    except InstarError as e:
        setattr(e, "output", text)
        raise
    return text or ""


def measure_result(path: Optional[str] = None, out_fmt: str = "raw", size: Optional[int] = None,
                   source_format: Optional[str] = None, key_secret: Optional[str] = None, isolated: bool = False,
                   **opts: object) -> MeasureResultData:
    """Like `qemu-img measure` (of `path`, or of a new image of `size` bytes); returns a MeasureResult.
    `key_secret` is the passphrase of an encrypted source, and of the output when the options ask for
    encryption. `isolated` reads the source in a confined helper process (docs/isolated.md)."""
    L = _setup()
    o = MeasureOptions(ctypes.sizeof(MeasureOptions), 1 << 4 if isolated else 0, encode(source_format), encode(out_fmt),
                       encode(_option_string(opts)), -1 if size is None else int(size), encode(key_secret))
    r = MeasureResult()
    r.struct_size = ctypes.sizeof(MeasureResult)
    err = Error()
    check(L.instar_measure(encode(path), ctypes.byref(o), ctypes.byref(r), ctypes.byref(err)), err)
    return MeasureResultData(r.required, r.fully_allocated, r.bitmaps if r.has_bitmaps else None)


def measure(path: Optional[str] = None, out_fmt: str = "raw", size: Optional[int] = None,
            source_format: Optional[str] = None, key_secret: Optional[str] = None, isolated: bool = False,
            **opts: object) -> Dict[str, Any]:
    """Like `qemu-img measure`; returns {"required", "fully-allocated"[, "bitmaps"]} (see measure_result for the
    dataclass)."""
    return measure_result(path, out_fmt, size, source_format, key_secret, isolated, **opts).to_dict()
