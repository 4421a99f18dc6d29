"""The one call the drop-ins make most: instar_info, turned straight into the dict `qemu-img info --output=json`
prints (qemu-img's keys), without the dataclass step of :func:`instar.info`. The drop-ins answer info per call,
often on every volume of a host, so this path keeps Python's share of the call small: the options and error
structs are made once per thread and reused, and the fields are read once each.
"""
from __future__ import annotations

import ctypes
import json
import sys
import threading
from typing import Any, Dict, List, Optional

from instar import _lib

_info = sys.modules["instar.info"]  # the submodule (the package's `instar.info` name is its function)
_Info = _info._Info
_InfoOptions = _info._InfoOptions
_ICOUNT_UNSET = 2 ** 64 - 1
_FLAG_FORCE_SHARE = 1 << 1

_tls = threading.local()


def _s(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else b.decode("utf-8", "surrogateescape")


def _node(n: Any) -> Dict[str, Any]:
    d: Dict[str, Any] = {"virtual-size": n.virtual_size, "filename": _s(n.filename) or "",
                         "format": _s(n.format) or ""}
    if n.cluster_size >= 0:
        d["cluster-size"] = n.cluster_size
    if n.actual_size >= 0:
        d["actual-size"] = n.actual_size
    if n.dirty_flag >= 0:
        d["dirty-flag"] = bool(n.dirty_flag)
    if n.encrypted >= 0:
        d["encrypted"] = bool(n.encrypted)
    if n.compressed >= 0:
        d["compressed"] = bool(n.compressed)
    if n.backing_filename is not None:
        d["backing-filename"] = _s(n.backing_filename)
    if n.full_backing_filename is not None:
        d["full-backing-filename"] = _s(n.full_backing_filename)
    if n.backing_format is not None:
        d["backing-filename-format"] = _s(n.backing_format)
    if n.snapshot_count:
        snaps = []
        for k in range(n.snapshot_count):
            s = n.snapshots[k]
            snap = {"id": _s(s.id) or "", "name": _s(s.name) or "", "vm-state-size": s.vm_state_size,
                    "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec // 1000000000, "vm-clock-nsec": s.vm_clock_nsec % 1000000000}
            if s.icount != _ICOUNT_UNSET:
                snap["icount"] = s.icount
            snaps.append(snap)
        d["snapshots"] = snaps
    if n.format_specific_json is not None:
        # the library's copy of the "format-specific" member (qemu's nested QAPI object: luks slots, bitmaps...)
        d["format-specific"] = json.loads(n.format_specific_json)
    return d


def info_dicts(path: str, format: Optional[str] = None, force_share: bool = False,
               backing_chain: bool = False) -> List[Dict[str, Any]]:
    """What `qemu-img info --output=json [--backing-chain]` reports, one dict per image, top first (one dict
    without backing_chain). Raises the InstarError subclass of the failure."""
    L = _info._setup()
    opts = getattr(_tls, "opts", None)
    if opts is None:
        opts = _tls.opts = _InfoOptions()
        _tls.err = _lib.Error()
    opts.struct_size = ctypes.sizeof(_InfoOptions)
    opts.open_flags = _FLAG_FORCE_SHARE if force_share else 0
    opts.format = None if format is None else format.encode("utf-8")
    opts.backing_chain = 1 if backing_chain else 0
    opts.key_secret = None
    err = _tls.err
    out = ctypes.POINTER(_Info)()
    _lib.check(L.instar_info(path.encode("utf-8", "surrogateescape"), ctypes.byref(opts), ctypes.byref(out),
                             ctypes.byref(err)), err)
    try:
        nodes = []
        node = out
        while node:
            nodes.append(_node(node.contents))
            node = node.contents.backing
        return nodes
    finally:
        L.instar_info_free(out)
