"""instar_inspect: an image's format from its content alone and every violation of a safety policy.

``inspect(path, preset="glance")`` returns an :class:`InspectReport`: the detected format, every format that
matched, the virtual size and the list of :class:`Violation` (code name, field, offset, message, fatal). The
policy's preset chooses which codes are fatal (docs/inspect.md): ``glance`` (the default, oslo.utils'
format_inspector verdicts plus Glance's declared-format match), ``nova``, ``cinder``, ``vdsm``, ``pve``.
With ``raise_on_fatal=True`` a fatal violation raises :class:`PolicyViolation` (carrying the report).
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import Any, Dict, Iterable, List, Optional

from ._lib import ERROR_CLASSES, Error, InstarError, encode, lib

E_POLICY = -14

CODES = ["format-mismatch", "multiple-formats", "malformed", "backing-file", "protocol-name", "unsafe-path",
         "data-file", "vmdk-extents", "vmdk-extent-path", "vmdk-device", "vmdk-descriptor", "vmdk-footer",
         "unknown-features", "unsupported-version", "encrypted", "virtual-size", "partitions", "banned-format"]
PRESETS = {"glance": 0, "oslo": 0, "default": 0, "vdsm": 1, "nova": 2, "cinder": 3, "pve": 4}
FATAL_NONE = 1 << 63


class PolicyViolation(InstarError):
    """INSTAR_E_POLICY: the image violates the policy; `.report` is the InspectReport when raised by inspect()."""
    code_value = E_POLICY
    report: Optional["InspectReport"] = None


ERROR_CLASSES.setdefault(E_POLICY, PolicyViolation)


class _Policy(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("preset", ctypes.c_uint32), ("fatal", ctypes.c_uint64),
                ("max_virtual_size", ctypes.c_uint64), ("max_vmdk_extents", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("declared_format", ctypes.c_char_p)]


class _Violation(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint32), ("fatal", ctypes.c_int32), ("offset", ctypes.c_uint64),
                ("field", ctypes.c_char_p), ("message", ctypes.c_char_p)]


class _Report(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("fatal", ctypes.c_int32), ("format", ctypes.c_char_p),
                ("formats", ctypes.c_char_p), ("virtual_size", ctypes.c_int64), ("count", ctypes.c_uint32),
                ("violations", ctypes.POINTER(_Violation)), ("preset", ctypes.c_char_p)]


@dataclasses.dataclass(frozen=True)
class Violation:
    """One violation: `code` its name (``CODES``), `field` what ("qcow2.backing_file"), `offset` where."""
    code: str
    field: str
    offset: int
    message: str
    fatal: bool


@dataclasses.dataclass(frozen=True)
class InspectReport:
    """What instar_inspect found. `virtual_size` is None when it does not fit in 64 bits."""
    format: str
    formats: List[str]
    virtual_size: Optional[int]
    fatal: bool
    preset: str
    violations: List[Violation]

    @property
    def fatal_violations(self) -> List[Violation]:
        return [v for v in self.violations if v.fatal]

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class InspectPolicy:
    """A policy: a preset, and optionally the fatal codes instead of the preset's, limits, the declared format."""
    preset: str = "glance"
    fatal: Optional[Iterable[str]] = None
    max_virtual_size: int = 0
    max_vmdk_extents: Optional[int] = None
    declared_format: Optional[str] = None


def _setup() -> ctypes.CDLL:
    L = lib()
    if not getattr(L, "_inspect_ready", False):
        L.instar_inspect.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Policy), ctypes.POINTER(ctypes.POINTER(_Report)),
                                     ctypes.POINTER(Error)]
        L.instar_inspect.restype = ctypes.c_int
        L.instar_inspect_report_free.argtypes = [ctypes.POINTER(_Report)]
        L.instar_inspect_report_free.restype = None
        L.instar_inspect_policy_init_sized.argtypes = [ctypes.POINTER(_Policy), ctypes.c_uint32]
        L.instar_inspect_policy_init_sized.restype = ctypes.c_int
        setattr(L, "_inspect_ready", True)
    return L


def fatal_mask(codes: Iterable[str]) -> int:
    """The fatal mask of code names (an empty list: nothing fatal)."""
    mask = 0
    for c in codes:
        if c not in CODES:
            raise ValueError("unknown violation code %r (one of %s)" % (c, ", ".join(CODES)))
        mask |= 1 << CODES.index(c)
    return mask or FATAL_NONE


def inspect(path: str, policy: Optional[InspectPolicy] = None, preset: Optional[str] = None,
            declared_format: Optional[str] = None, max_virtual_size: Optional[int] = None,
            max_vmdk_extents: Optional[int] = None, fatal: Optional[Iterable[str]] = None,
            raise_on_fatal: bool = False) -> InspectReport:
    """Inspects `path` (keyword arguments override `policy`'s fields)."""
    p = dataclasses.replace(policy) if policy is not None else InspectPolicy()
    if preset is not None:
        p.preset = preset
    if declared_format is not None:
        p.declared_format = declared_format
    if max_virtual_size is not None:
        p.max_virtual_size = max_virtual_size
    if max_vmdk_extents is not None:
        p.max_vmdk_extents = max_vmdk_extents
    if fatal is not None:
        p.fatal = fatal
    if p.preset not in PRESETS:
        raise ValueError("unknown preset %r (one of %s)" % (p.preset, ", ".join(sorted(PRESETS))))
    L = _setup()
    c = _Policy()
    L.instar_inspect_policy_init_sized(ctypes.byref(c), ctypes.sizeof(_Policy))
    c.preset = PRESETS[p.preset]
    if p.fatal is not None:
        c.fatal = fatal_mask(p.fatal)
    c.max_virtual_size = max(0, min(int(p.max_virtual_size), (1 << 64) - 1))
    if p.max_vmdk_extents is not None:
        c.max_vmdk_extents = 0xFFFFFFFF if p.max_vmdk_extents == 0 else max(1, min(p.max_vmdk_extents, 0xFFFFFFFE))
    c.declared_format = encode(p.declared_format)
    out = ctypes.POINTER(_Report)()
    err = Error()
    rc = L.instar_inspect(encode(path), ctypes.byref(c), ctypes.byref(out), ctypes.byref(err))
    if not out:
        raise InstarError(rc, err.message.decode("utf-8", "replace"), err.errno_value)
    try:
        r = out.contents
        violations = []
        for i in range(r.count):
            v = r.violations[i]
            violations.append(Violation(code=CODES[v.code] if v.code < len(CODES) else str(v.code),
                                        field=(v.field or b"").decode("utf-8", "replace"), offset=int(v.offset),
                                        message=(v.message or b"").decode("utf-8", "replace"), fatal=bool(v.fatal)))
        formats = (r.formats or b"").decode()
        report = InspectReport(format=(r.format or b"").decode(), formats=formats.split(",") if formats else [],
                               virtual_size=None if r.virtual_size < 0 else int(r.virtual_size),
                               fatal=bool(r.fatal), preset=(r.preset or b"").decode(), violations=violations)
    finally:
        L.instar_inspect_report_free(out)
    if rc == E_POLICY and raise_on_fatal:
        e = PolicyViolation(rc, err.message.decode("utf-8", "replace"), 0)
        e.report = report
        raise e
    return report


__all__ = ["inspect", "InspectReport", "InspectPolicy", "Violation", "PolicyViolation", "CODES", "PRESETS"]
