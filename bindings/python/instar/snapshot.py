"""instar_snapshot_*: qemu-img snapshot -l / -c / -a / -d on internal snapshots."""
from __future__ import annotations

import ctypes
from typing import List, Optional

from ._lib import Error, Limits, Options, check, encode, lib
from .info import Snapshot, _Snapshot


class SnapshotOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("open_flags", ctypes.c_uint32), ("key_secret", ctypes.c_char_p),
                ("limits", ctypes.POINTER(Limits))]


class _SnapshotList(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("snapshots", ctypes.POINTER(_Snapshot))]


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_snapshot_ready", False):
        return L
    opts, err = ctypes.POINTER(SnapshotOptions), ctypes.POINTER(Error)
    L.instar_snapshot_list.argtypes = [ctypes.c_char_p, opts, ctypes.POINTER(ctypes.POINTER(_SnapshotList)), err]
    L.instar_snapshot_list_free.argtypes = [ctypes.POINTER(_SnapshotList)]
    L.instar_snapshot_list_free.restype = None
    for f in (L.instar_snapshot_create, L.instar_snapshot_apply, L.instar_snapshot_delete):
        f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, opts, err]
    setattr(L, "_snapshot_ready", True)
    return L


def _options(open_flags: int, key_secret: Optional[str]) -> SnapshotOptions:
    return SnapshotOptions(ctypes.sizeof(SnapshotOptions), open_flags, encode(key_secret))


def snapshot_list(path: str, open_flags: int = 0, key_secret: Optional[str] = None) -> List[Snapshot]:
    """Like `qemu-img snapshot -l PATH`: the internal snapshots in table order, as `Snapshot` objects."""
    L = _setup()
    o = _options(open_flags, key_secret)
    out = ctypes.POINTER(_SnapshotList)()
    err = Error()
    check(L.instar_snapshot_list(encode(path), ctypes.byref(o), ctypes.byref(out), ctypes.byref(err)), err)
    try:
        result: List[Snapshot] = []
        for i in range(out.contents.count):
            s = out.contents.snapshots[i]
            result.append(Snapshot(
                id=s.id.decode(), name=s.name.decode(errors="replace"), vm_state_size=s.vm_state_size,
                date_sec=s.date_sec, date_nsec=s.date_nsec, vm_clock_sec=s.vm_clock_nsec // 1_000_000_000,
                vm_clock_nsec=s.vm_clock_nsec % 1_000_000_000,
                icount=None if s.icount == (1 << 64) - 1 else s.icount))
        return result
    finally:
        L.instar_snapshot_list_free(out)


def snapshot_create(path: str, name: str, open_flags: int = 0, key_secret: Optional[str] = None) -> None:
    """Like `qemu-img snapshot -c NAME PATH`."""
    L = _setup()
    o, err = _options(open_flags, key_secret), Error()
    check(L.instar_snapshot_create(encode(path), encode(name), ctypes.byref(o), ctypes.byref(err)), err)


def snapshot_apply(path: str, id_or_name: str, open_flags: int = 0, key_secret: Optional[str] = None) -> None:
    """Like `qemu-img snapshot -a ID_OR_NAME PATH`."""
    L = _setup()
    o, err = _options(open_flags, key_secret), Error()
    check(L.instar_snapshot_apply(encode(path), encode(id_or_name), ctypes.byref(o), ctypes.byref(err)), err)


def snapshot_delete(path: str, name: str, open_flags: int = 0, key_secret: Optional[str] = None) -> None:
    """Like `qemu-img snapshot -d NAME PATH` (by name only, as qemu-img)."""
    L = _setup()
    o, err = _options(open_flags, key_secret), Error()
    check(L.instar_snapshot_delete(encode(path), encode(name), ctypes.byref(o), ctypes.byref(err)), err)
