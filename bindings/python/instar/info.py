"""instar_info / instar_info_json / instar_info_human: what `qemu-img info` reports.

`info()` returns an `ImageInfo` dataclass whose fields are qemu-img's JSON keys with '-' written as '_';
`ImageInfo.to_dict()` gives back exactly the object `qemu-img info --output=json` prints.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
from typing import Any, Dict, List, Optional, Union

from ._lib import Error, Limits, Options, check, encode, lib, take_string
from .image import OPEN_FORCE_SHARE, OPEN_ISOLATED

UNSET = -1


class _Snapshot(ctypes.Structure):
    _fields_ = [("id", ctypes.c_char_p), ("name", ctypes.c_char_p), ("vm_state_size", ctypes.c_uint64),
                ("date_sec", ctypes.c_uint32), ("date_nsec", ctypes.c_uint32), ("vm_clock_nsec", ctypes.c_uint64),
                ("icount", ctypes.c_uint64)]


class _Bitmap(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("granularity", ctypes.c_uint64), ("flags", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    pass


class _Extent(ctypes.Structure):
    """instar_info_extent_t."""
    _fields_ = [("filename", ctypes.c_char_p), ("format", ctypes.c_char_p), ("virtual_size", ctypes.c_int64),
                ("cluster_size", ctypes.c_int64), ("compressed", ctypes.c_int32)]


class _LuksSlot(ctypes.Structure):
    """instar_info_luks_slot_t."""
    _fields_ = [("active", ctypes.c_int32), ("iters", ctypes.c_int64), ("stripes", ctypes.c_int64),
                ("key_offset", ctypes.c_int64)]


_Info._fields_ = [
    ("filename", ctypes.c_char_p), ("format", ctypes.c_char_p), ("virtual_size", ctypes.c_int64),
    ("actual_size", ctypes.c_int64), ("cluster_size", ctypes.c_int64), ("dirty_flag", ctypes.c_int32),
    ("encrypted", ctypes.c_int32), ("compressed", ctypes.c_int32), ("backing_filename", ctypes.c_char_p),
    ("full_backing_filename", ctypes.c_char_p), ("backing_format", ctypes.c_char_p),
    ("snapshot_count", ctypes.c_uint32), ("snapshots", ctypes.POINTER(_Snapshot)),
    ("specific_type", ctypes.c_char_p), ("compat", ctypes.c_char_p), ("compression_type", ctypes.c_char_p),
    ("lazy_refcounts", ctypes.c_int32), ("refcount_bits", ctypes.c_int32), ("corrupt", ctypes.c_int32),
    ("extended_l2", ctypes.c_int32), ("data_file", ctypes.c_char_p), ("data_file_raw", ctypes.c_int32),
    ("encrypt_format", ctypes.c_char_p), ("bitmap_count", ctypes.c_uint32), ("bitmaps", ctypes.POINTER(_Bitmap)),
    ("has_bitmaps", ctypes.c_int32), ("backing", ctypes.POINTER(_Info)), ("format_specific_json", ctypes.c_char_p),
    ("vmdk_cid", ctypes.c_int64), ("vmdk_parent_cid", ctypes.c_int64), ("vmdk_create_type", ctypes.c_char_p),
    ("extent_count", ctypes.c_uint32), ("extents", ctypes.POINTER(_Extent)),
    ("luks_cipher_alg", ctypes.c_char_p), ("luks_cipher_mode", ctypes.c_char_p), ("luks_ivgen_alg", ctypes.c_char_p),
    ("luks_ivgen_hash_alg", ctypes.c_char_p), ("luks_hash_alg", ctypes.c_char_p), ("luks_uuid", ctypes.c_char_p),
    ("luks_payload_offset", ctypes.c_int64), ("luks_master_key_iters", ctypes.c_int64),
    ("luks_slot_count", ctypes.c_uint32), ("luks_slots", ctypes.POINTER(_LuksSlot)),
]


class _InfoOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("backing_chain", ctypes.c_int32), ("key_secret", ctypes.c_char_p), ("limits", ctypes.POINTER(Limits)),
                ("backing_key_secret", ctypes.c_char_p)]


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_info_ready", False):
        return L
    opts, err = ctypes.POINTER(_InfoOptions), ctypes.POINTER(Error)
    L.instar_info.argtypes = [ctypes.c_char_p, opts, ctypes.POINTER(ctypes.POINTER(_Info)), err]
    L.instar_info_free.argtypes = [ctypes.POINTER(_Info)]
    L.instar_info_free.restype = None
    for name in ("instar_info_json", "instar_info_human"):
        getattr(L, name).argtypes = [ctypes.c_char_p, opts, ctypes.POINTER(ctypes.c_void_p), err]
    setattr(L, "_info_ready", True)
    return L


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


@dataclasses.dataclass
class Snapshot:
    """One internal snapshot (QAPI SnapshotInfo)."""
    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_sec: int
    vm_clock_nsec: int
    icount: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """The object qemu-img prints for this snapshot."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


@dataclasses.dataclass
class ImageInfo:
    """One image as `qemu-img info` reports it (QAPI ImageInfo). None means qemu-img omits the key."""
    filename: str
    format: str
    virtual_size: int
    dirty_flag: Optional[bool] = None
    actual_size: Optional[int] = None
    cluster_size: Optional[int] = None
    encrypted: Optional[bool] = None
    compressed: Optional[bool] = None
    backing_filename: Optional[str] = None
    full_backing_filename: Optional[str] = None
    backing_filename_format: Optional[str] = None
    snapshots: Optional[List[Snapshot]] = None
    format_specific: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object qemu-img prints for this image (as Python values)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "snapshots":
                v = [s.to_dict() for s in v]
            out[_key(f.name)] = v
        return out


def _s(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else b.decode("utf-8", "surrogateescape")


def _tri(v: int) -> Optional[bool]:
    return None if v == UNSET else bool(v)


BITMAP_IN_USE = 1 << 0
BITMAP_AUTO = 1 << 1


def _qcow2_specific(n: Any) -> Optional[Dict[str, Any]]:
    """qcow2's "format-specific" member built from the struct's typed fields, in qemu-img's key order; None when
    they cannot carry all of it (an encrypted image's "encrypt" details), where the library's text is read."""
    if _s(n.specific_type) != "qcow2" or n.encrypt_format is not None or n.compat is None \
            or n.compression_type is None or n.refcount_bits < 0:
        return None
    data: Dict[str, Any] = {"compat": _s(n.compat), "compression-type": _s(n.compression_type)}
    if n.lazy_refcounts != UNSET:
        data["lazy-refcounts"] = bool(n.lazy_refcounts)
    if n.has_bitmaps:
        bitmaps = []
        for k in range(n.bitmap_count):
            b = n.bitmaps[k]
            flags = [name for bit, name in ((BITMAP_IN_USE, "in-use"), (BITMAP_AUTO, "auto")) if b.flags & bit]
            bitmaps.append({"flags": flags, "name": _s(b.name) or "", "granularity": b.granularity})
        data["bitmaps"] = bitmaps
    data["refcount-bits"] = n.refcount_bits
    if n.data_file is not None:
        data["data-file"] = _s(n.data_file)
    for key, value in (("data-file-raw", n.data_file_raw), ("corrupt", n.corrupt), ("extended-l2", n.extended_l2)):
        if value != UNSET:
            data[key] = bool(value)
    return {"type": "qcow2", "data": data}


def _format_specific(n: Any) -> Optional[Dict[str, Any]]:
    """The "format-specific" member: from the typed fields where they hold it all (qcow2), else the library's
    compact JSON of it (luks slots, qcow2 encryption details)."""
    typed = _qcow2_specific(n)
    if typed is not None:
        return typed
    return None if n.format_specific_json is None else dict(json.loads(n.format_specific_json))


def _convert(node: Any) -> ImageInfo:
    n = node.contents
    snaps = None
    if n.snapshot_count:
        snaps = []
        for k in range(n.snapshot_count):
            s = n.snapshots[k]
            snaps.append(Snapshot(_s(s.id) or "", _s(s.name) or "", s.vm_state_size, s.date_sec, s.date_nsec,
                                  s.vm_clock_nsec // 1000000000, s.vm_clock_nsec % 1000000000,
                                  None if s.icount == 2 ** 64 - 1 else s.icount))
    return ImageInfo(
        filename=_s(n.filename) or "", format=_s(n.format) or "", virtual_size=n.virtual_size,
        dirty_flag=_tri(n.dirty_flag), actual_size=None if n.actual_size < 0 else n.actual_size,
        cluster_size=None if n.cluster_size < 0 else n.cluster_size, encrypted=_tri(n.encrypted),
        compressed=_tri(n.compressed), backing_filename=_s(n.backing_filename),
        full_backing_filename=_s(n.full_backing_filename), backing_filename_format=_s(n.backing_format),
        snapshots=snaps,
        format_specific=_format_specific(n))


def _options(format: Optional[str], force_share: bool, backing_chain: bool,
             key_secret: Optional[str] = None, isolated: bool = False,
             backing_key_secret: Optional[str] = None) -> _InfoOptions:
    flags = (OPEN_FORCE_SHARE if force_share else 0) | (OPEN_ISOLATED if isolated else 0)
    o = _InfoOptions(ctypes.sizeof(_InfoOptions), flags, encode(format), 1 if backing_chain else 0,
                     encode(key_secret))
    o.backing_key_secret = encode(backing_key_secret)
    return o


def info(path: str, format: Optional[str] = None, force_share: bool = False, backing_chain: bool = False,
         key_secret: Optional[str] = None, isolated: bool = False,
         backing_key_secret: Optional[str] = None) -> Union[ImageInfo, List[ImageInfo]]:
    """What `qemu-img info` reports: an ImageInfo, or with backing_chain a list of them, top image first.
    `key_secret` is the passphrase of an encrypted image (info itself reads only metadata),
    `backing_key_secret` that of the encrypted images below it. With `isolated` the image is parsed in a
    confined helper process (docs/isolated.md)."""
    L = _setup()
    opts = _options(format, force_share, backing_chain, key_secret, isolated, backing_key_secret)
    err = Error()
    out = ctypes.POINTER(_Info)()
    check(L.instar_info(encode(path), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(err)), err)
    try:
        chain = []
        node = out
        while node:
            chain.append(_convert(node))
            node = node.contents.backing
    finally:
        L.instar_info_free(out)
    return chain if backing_chain else chain[0]


def _text(fn: str, path: str, format: Optional[str], force_share: bool, backing_chain: bool,
          key_secret: Optional[str] = None, isolated: bool = False, backing_key_secret: Optional[str] = None) -> str:
    L = _setup()
    opts = _options(format, force_share, backing_chain, key_secret, isolated, backing_key_secret)
    err = Error()
    out = ctypes.c_void_p()
    check(getattr(L, fn)(encode(path), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(err)), err)
    return take_string(out)


def info_json(path: str, format: Optional[str] = None, force_share: bool = False, backing_chain: bool = False,
              key_secret: Optional[str] = None, isolated: bool = False, backing_key_secret: Optional[str] = None) -> str:
    """The exact text of `qemu-img info --output=json` (an array with backing_chain)."""
    return _text("instar_info_json", path, format, force_share, backing_chain, key_secret, isolated,
                 backing_key_secret)


def info_human(path: str, format: Optional[str] = None, force_share: bool = False, backing_chain: bool = False,
               key_secret: Optional[str] = None, isolated: bool = False,
               backing_key_secret: Optional[str] = None) -> str:
    """The exact text of human `qemu-img info`."""
    return _text("instar_info_human", path, format, force_share, backing_chain, key_secret, isolated,
                 backing_key_secret)
