"""Drop-in for ``oslo_utils.imageutils`` (oslo.utils 10.2.0): ``QemuImgInfo`` and ``format_inspector``.

Switch an oslo.utils user (Glance, Nova, Cinder) over with one line::

    from instar.compat.oslo import QemuImgInfo, format_inspector   # was: from oslo_utils.imageutils import ...

``QemuImgInfo(cmd_output, format='json')`` reads ``qemu-img info --output=json`` text as oslo's does;
``QemuImgInfo.from_path(path)`` fills the same properties straight from the library (``instar_info``), with no
qemu-img process and no JSON text.
"""
from __future__ import annotations

import ctypes
import importlib
import json
from typing import Any, Dict, List, Optional, Union

from ..._lib import Error, check, encode

# instar.info the module (the package's `info` name is the function).
_infomod = importlib.import_module("instar.info")

__all__ = ["QemuImgInfo"]


class QemuImgInfo:
    """What ``qemu-img info`` says of an image, under oslo.utils' property names: ``image``, ``backing_file``,
    ``backing_file_format``, ``file_format``, ``virtual_size``, ``cluster_size``, ``disk_size``, ``snapshots``,
    ``encrypted`` ('yes' or None) and ``format_specific``."""

    image: Optional[str]
    backing_file: Optional[str]
    backing_file_format: Optional[str]
    file_format: Optional[str]
    virtual_size: Optional[int]
    cluster_size: Optional[int]
    disk_size: Optional[int]
    snapshots: List[Dict[str, Any]]
    encrypted: Optional[str]
    format_specific: Optional[Dict[str, Any]]

    def __init__(self, cmd_output: Union[str, bytes, bytearray, None] = None, format: str = "json") -> None:
        if format != "json":
            raise ValueError("Unsupported format: %s. Only 'json' is supported" % format)
        if isinstance(cmd_output, (bytes, bytearray)):
            cmd_output = cmd_output.decode()
        self._fill(json.loads(cmd_output or "{}"))

    def _fill(self, d: Dict[str, Any]) -> None:
        fill_from_json_dict(self, d)

    @classmethod
    def from_path(cls, path: str, format: Optional[str] = None, force_share: bool = False) -> "QemuImgInfo":
        """The info of the image at `path` (format probed unless given), from the library's structs.
        Raises the ``instar.InstarError`` subclass of the failure (``NotFound``, ``Corrupt``, ...)."""
        # The instar_info_t fields straight into the properties (instar.info's dataclasses are skipped: this is
        # the call Glance and Nova make per image, so it stays lean).
        L = _infomod._setup()
        opts = _infomod._options(format, force_share, False)
        err = Error()
        out = ctypes.POINTER(_infomod._Info)()
        check(L.instar_info(encode(path), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(err)), err)
        self = cls.__new__(cls)
        try:
            n = out.contents
            self.image = _infomod._s(n.filename)
            self.file_format = _infomod._s(n.format)
            self.virtual_size = n.virtual_size
            self.cluster_size = None if n.cluster_size < 0 else n.cluster_size
            self.disk_size = None if n.actual_size < 0 else n.actual_size
            self.backing_file = _infomod._s(n.backing_filename)
            self.backing_file_format = _infomod._s(n.backing_format)
            self.encrypted = "yes" if n.encrypted == 1 else None
            self.format_specific = None if n.format_specific_json is None else json.loads(n.format_specific_json)
            self.snapshots = []
            if n.snapshot_count:
                snaps = _infomod._convert(out).snapshots or []
                self.snapshots = [snap.to_dict() for snap in snaps]
        finally:
            L.instar_info_free(out)
        return self

    def __str__(self) -> str:
        lines = [
            "image: %s" % self.image,
            "file_format: %s" % self.file_format,
            "virtual_size: %s" % self.virtual_size,
            "disk_size: %s" % self.disk_size,
            "cluster_size: %s" % self.cluster_size,
            "backing_file: %s" % self.backing_file,
            "backing_file_format: %s" % self.backing_file_format,
        ]
        if self.snapshots:
            lines.append("snapshots: %s" % self.snapshots)
        if self.encrypted:
            lines.append("encrypted: %s" % self.encrypted)
        if self.format_specific:
            lines.append("format_specific: %s" % self.format_specific)
        return "\n".join(lines)


def fill_from_json_dict(info: Any, d: Dict[str, Any]) -> None:
    """Sets oslo's QemuImgInfo properties on `info` (ours or oslo's own) from the dict of
    `qemu-img info --output=json`, as oslo's JSON parsing sets them."""
    info.image = d.get("filename")
    info.backing_file = d.get("backing-filename")
    info.backing_file_format = d.get("backing-filename-format")
    info.file_format = d.get("format")
    info.virtual_size = d.get("virtual-size")
    info.cluster_size = d.get("cluster-size")
    info.disk_size = d.get("actual-size")
    info.snapshots = d.get("snapshots", [])
    info.encrypted = "yes" if d.get("encrypted") else None
    info.format_specific = d.get("format-specific")
