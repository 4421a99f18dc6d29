"""Typed results: dataclasses with the fields of the C result structs of include/instar.h.

Each has ``to_dict()``, which gives the dict the older untyped functions (``instar.map``, ``instar.compare``,
``instar.measure``, ``instar.bench``) return, with qemu-img's JSON keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional


@dataclasses.dataclass(frozen=True)
class MapEntry:
    """One extent of `qemu-img map` (instar_map_entry_t). `offset` and `filename` are None when the data has no
    host offset."""
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: Optional[int] = None
    filename: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The object `qemu-img map --output=json` prints for this extent."""
        d: Dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


@dataclasses.dataclass(frozen=True)
class CompareResult:
    """What `qemu-img compare` found (instar_compare_result_t). `mismatch_offset` is None when none was
    reported; `message` is what qemu-img prints on stdout. `exit_status` is qemu-img compare's exit status and
    `error_message`, after a failure (see instar.compare_status), the line it prints on stderr."""
    identical: bool
    size_mismatch: bool
    mismatch_offset: Optional[int]
    message: str
    exit_status: int = 0
    error_message: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """identical, size_mismatch, mismatch_offset and message (what instar.compare returns)."""
        return {"identical": self.identical, "size_mismatch": self.size_mismatch,
                "mismatch_offset": self.mismatch_offset, "message": self.message}


@dataclasses.dataclass(frozen=True)
class MeasureResult:
    """What `qemu-img measure` prints (instar_measure_result_t); `bitmaps` is None when qemu-img omits it."""
    required: int
    fully_allocated: int
    bitmaps: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """The object `qemu-img measure --output=json` prints."""
        d: Dict[str, Any] = {"required": self.required, "fully-allocated": self.fully_allocated}
        if self.bitmaps is not None:
            d["bitmaps"] = self.bitmaps
        return d


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The counters of `qemu-img check` (instar_check_result_t). `exit_code` is qemu-img check's exit status:
    0 clean, 1 check errors, 2 corruptions, 3 leaks only. A count qemu-img leaves out of its report (the C
    struct's -1) is None."""
    exit_code: int
    check_errors: int
    corruptions: Optional[int] = None
    leaks: Optional[int] = None
    corruptions_fixed: Optional[int] = None
    leaks_fixed: Optional[int] = None
    image_end_offset: Optional[int] = None
    total_clusters: Optional[int] = None
    allocated_clusters: Optional[int] = None
    fragmented_clusters: Optional[int] = None
    compressed_clusters: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """The counters of `qemu-img check --output=json` (its object without "filename" and "format")."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "exit_code" and getattr(self, f.name) is not None}


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """The outcome of `qemu-img bench` (instar_bench_result_t)."""
    requests: int
    bytes: int
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
