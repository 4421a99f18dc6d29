"""instar_probe: one structure of an image read from bytes the caller captured while streaming the file.

`probe(format, part, regions)` hands the library a list of `(offset, bytes)` regions and returns a `ProbeResult`:
whether the bytes are that format, the virtual size, the next region the format needs, and the safety findings
(``V_*`` bits, with the first one's text). Nothing is read from disk; the parsing is the library's (Inspect/).
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import Optional, Sequence, Tuple, Union

from ._lib import Error, Limits, Options, check, encode, lib

V_BACKING_FILE = 1 << 0
V_DATA_FILE = 1 << 1
V_UNKNOWN_FEATURES = 1 << 2
V_UNSUPPORTED_VERSION = 1 << 3
V_BANNED = 1 << 4
V_DESCRIPTOR = 1 << 5
V_SUBFORMAT = 1 << 6
V_EXTENT_PATH = 1 << 7
V_NO_EXTENTS = 1 << 8
V_FOOTER = 1 << 9
V_PARTITIONS = 1 << 10


class _Region(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64), ("data", ctypes.c_void_p)]


class _Options(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("part", ctypes.c_char_p), ("qcow2_known_features", ctypes.c_uint32),
                ("vhdx_item", ctypes.c_void_p), ("luks_passphrase", ctypes.c_char_p),
                ("luks_iter_limit", ctypes.c_uint32), ("limits", ctypes.POINTER(Limits))]


class _Result(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("match", ctypes.c_int32), ("virtual_size", ctypes.c_int64),
                ("version", ctypes.c_int32), ("violations", ctypes.c_uint32), ("need_offset", ctypes.c_uint64),
                ("need_length", ctypes.c_uint64), ("footer", ctypes.c_int32), ("text", ctypes.c_int32),
                ("payload_offset", ctypes.c_uint32), ("key_slot", ctypes.c_int32),
                ("subformat", ctypes.c_char * 64),
                ("message", ctypes.c_char * 256), ("payload", ctypes.c_uint8 * 512),
                ("sectors", ctypes.c_uint64)]


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What instar_probe found (the fields of instar_probe_result_t; None for -1 / "unknown"; `payload` only
    for luks "payload")."""
    match: Optional[bool]
    virtual_size: Optional[int]
    version: Optional[int]
    violations: int
    need: Optional[Tuple[int, int]]
    footer: bool
    text: bool
    payload_offset: int
    key_slot: Optional[int]
    subformat: str
    message: str
    payload: bytes = b""
    sectors: int = 0


def _setup() -> ctypes.CDLL:
    L = lib()
    if not getattr(L, "_probe_ready", False):
        L.instar_probe.argtypes = [ctypes.POINTER(_Region), ctypes.c_uint32, ctypes.POINTER(_Options),
                                   ctypes.POINTER(_Result), ctypes.POINTER(Error)]
        L.instar_probe.restype = ctypes.c_int
        setattr(L, "_probe_ready", True)
    return L


Bytes = Union[bytes, bytearray]


def probe(format: str, part: str, regions: Sequence[Tuple[int, Bytes]], qcow2_known_features: int = 0,
          vhdx_item: Optional[bytes] = None, luks_passphrase: Optional[str] = None,
          luks_iter_limit: int = 0) -> ProbeResult:
    """Probes `part` of `format` over `regions` ((file offset, bytes) pairs). Raises Corrupt for a malformed
    structure (the library's message says which) and Invalid for an unknown format or part."""
    L = _setup()
    arr = (_Region * max(1, len(regions)))()
    keep = []
    for i, (offset, data) in enumerate(regions):
        buf = ctypes.create_string_buffer(bytes(data), len(data)) if data else None
        keep.append(buf)
        arr[i] = _Region(offset, len(data), ctypes.cast(buf, ctypes.c_void_p) if buf is not None else None)
    item = ctypes.create_string_buffer(vhdx_item, 16) if vhdx_item is not None else None
    opts = _Options(ctypes.sizeof(_Options), 0, encode(format), encode(part), qcow2_known_features,
                    ctypes.cast(item, ctypes.c_void_p) if item is not None else None, encode(luks_passphrase),
                    max(0, min(luks_iter_limit, 0xFFFFFFFF)))
    res = _Result()
    res.struct_size = ctypes.sizeof(_Result)
    err = Error()
    check(L.instar_probe(arr, len(regions), ctypes.byref(opts), ctypes.byref(res), ctypes.byref(err)), err)
    return ProbeResult(
        match=None if res.match < 0 else bool(res.match),
        virtual_size=None if res.virtual_size < 0 else int(res.virtual_size),
        version=None if res.version < 0 else int(res.version),
        violations=int(res.violations),
        need=(int(res.need_offset), int(res.need_length)) if res.need_length else None,
        footer=bool(res.footer), text=bool(res.text), payload_offset=int(res.payload_offset),
        key_slot=None if res.key_slot < 0 else int(res.key_slot),
        subformat=res.subformat.decode("ascii", "replace"), message=res.message.decode("utf-8", "replace"),
        payload=bytes(res.payload) if part == "payload" else b"", sectors=int(res.sectors))
