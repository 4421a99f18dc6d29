"""Drop-in for ``oslo_utils.imageutils.format_inspector`` (oslo.utils 10.2.0), answering from instar's probes.

The stream model is oslo.utils': an inspector is fed the file once, chunk by chunk (``eat_chunk``), keeps only
the regions of the file it needs (``CaptureRegion``), and then tells ``format_match``, ``virtual_size`` and, in
``safety_check()``, whether the image is safe to hand to qemu. The regions, the wrapper that runs every
inspector over one stream (``InspectWrapper``) and ``detect_file_format`` are plumbing; every header, table and
descriptor is read by the library (``instar_probe``, Sources/Instar/Inspect), never parsed here.
"""
from __future__ import annotations

import abc
import logging
import uuid
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Type, Union

from ..._lib import InstarError
from ...probe import (V_BACKING_FILE, V_DATA_FILE, V_UNKNOWN_FEATURES, V_UNSUPPORTED_VERSION, ProbeResult,
                      probe)

LOG = logging.getLogger(__name__)

Ki = 1024
Mi = 1024 * Ki

Data = Union[bytes, bytearray]

__all__ = [
    "CaptureRegion", "EndCaptureRegion", "SafetyCheck", "ImageFormatError", "SafetyViolation", "SafetyCheckFailed",
    "FileInspector", "ContainerFileInspector", "RawFileInspector", "QcowInspector", "QEDInspector", "VHDInspector",
    "VHDXInspector", "VMDKInspector", "VDIInspector", "ISOInspector", "GPTInspector", "LUKSInspector",
    "InspectWrapper", "ALL_FORMATS", "get_inspector", "detect_file_format",
]


def _chunks(source: Any, size: int = 512) -> Iterator[bytes]:
    while True:
        chunk = source.read(size)
        if not chunk:
            return
        yield chunk


class CaptureRegion:
    """`length` bytes of the stream at `offset`, gathered from the chunks that cover them. With `min_length`,
    the region counts as complete once it holds that much."""

    def __init__(self, offset: int, length: int, min_length: Optional[int] = None) -> None:
        self.offset = offset
        self.length = length
        self.data: Data = b""
        self.min_length = min_length

    @property
    def complete(self) -> bool:
        if self.min_length is not None:
            return len(self.data) >= self.min_length
        return len(self.data) == self.length

    def capture(self, chunk: bytes, current_position: int) -> bytes:
        """Takes what it wants of `chunk`, which ends at `current_position` in the stream."""
        start = current_position - len(chunk)
        if start <= self.offset <= current_position or self.offset <= start <= self.offset + self.length:
            skip = self.offset - start if start < self.offset else 0
            self.data = (self.data + chunk[skip:])[:self.length]
        return b""


class EndCaptureRegion(CaptureRegion):
    """The last `offset` bytes of the stream; complete once ``finish()`` says the stream ended."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset, offset)
        self._complete = False

    def capture(self, chunk: bytes, current_position: int) -> bytes:
        self.data = (self.data + chunk)[-self.length:]
        self.offset = current_position - len(self.data)
        return b""

    @property
    def complete(self) -> bool:
        return self._complete and len(self.data) == self.length

    def finish(self) -> None:
        self._complete = True


class ImageFormatError(Exception):
    """The stream cannot be inspected: it is not the format asked for, or its structures are malformed."""


class SafetyViolation(Exception):
    """One safety check failed."""


class SafetyCheckFailed(Exception):
    """One or more safety checks failed; `failures` maps each check's name to its SafetyViolation."""

    def __init__(self, failures: Dict[str, Any]) -> None:
        super().__init__("Safety checks failed: %s" % ",".join(failures.keys()))
        self.failures = failures


class SafetyCheck:
    """A named check: `target_fn()` returns when the image passes and raises SafetyViolation otherwise."""

    def __init__(self, name: str, target_fn: Callable[[], None], description: Optional[str] = None) -> None:
        self.name = name
        self.target_fn = target_fn
        self.description = description

    def __call__(self) -> None:
        try:
            self.target_fn()
        except (SafetyViolation, SafetyCheckFailed):
            raise
        except Exception as e:
            LOG.error("Failed to run safety check %s on %s inspector: %s", self.name, self, e)
            raise SafetyViolation("Unexpected error")

    @classmethod
    def null(cls) -> "SafetyCheck":
        """A check that always passes, for formats with nothing to check."""
        return cls("null", lambda: None, "This file format has no meaningful safety check")

    @classmethod
    def banned(cls) -> "SafetyCheck":
        """A check that always fails, for formats recognised only to be refused."""
        def refuse() -> None:
            raise SafetyViolation("This file format is not allowed")
        return cls("banned", refuse, "This file format is not allowed")


def _probe(format: str, part: str, regions: List[Tuple[int, Data]], **kw: Any) -> ProbeResult:
    """instar_probe, with a malformed structure raised as ImageFormatError."""
    try:
        return probe(format, part, regions, **kw)
    except InstarError as e:
        raise ImageFormatError(e.message) from None


class FileInspector(abc.ABC):
    """Inspects one stream fed in chunks; subclasses declare the regions they need and their safety checks."""

    NAME = ""

    def __init__(self, tracing: bool = False, params: Optional[Dict[str, str]] = None) -> None:
        self._total_count = 0
        self._tracing = tracing
        self._capture_regions: Dict[str, CaptureRegion] = {}
        self._safety_checks: Dict[str, SafetyCheck] = {}
        self._finished = False
        self._params = params or {}
        self._probe_cache: Dict[str, Tuple[bytes, ProbeResult]] = {}
        self._initialize()
        if not self._safety_checks:
            raise RuntimeError("All inspectors must define at least one safety check")

    def _trace(self, *args: Any, **kwargs: Any) -> None:
        if self._tracing:
            LOG.debug(*args, **kwargs)

    @abc.abstractmethod
    def _initialize(self) -> None:
        """Declares the first regions and the safety checks."""

    def _probe_region(self, name: str, part: str = "header", **kw: Any) -> Optional[ProbeResult]:
        """The library's reading of region `name` (cached while its bytes stay the same), None without it."""
        if not self.has_region(name):
            return None
        region = self.region(name)
        data = bytes(region.data)
        cached = self._probe_cache.get(name + "/" + part)
        if cached is not None and cached[0] == data:
            return cached[1]
        result = _probe(self.NAME, part, [(region.offset, data)], **kw)
        self._probe_cache[name + "/" + part] = (data, result)
        return result

    def _matches(self, name: str, part: str = "header") -> bool:
        """Whether the library reads region `name` as this format (a malformed structure is no match)."""
        try:
            r = self._probe_region(name, part)
        except ImageFormatError:
            return False
        return r is not None and bool(r.match)

    def finish(self) -> None:
        """The whole stream has been read: end regions are complete now."""
        self._finished = True
        for region in self._capture_regions.values():
            if isinstance(region, EndCaptureRegion):
                region.finish()

    def _capture(self, chunk: bytes, only: Optional[List[str]] = None) -> None:
        if self._finished:
            raise RuntimeError("Inspector has been marked finished, no more data processing allowed")
        for name, region in self._capture_regions.items():
            if only and name not in only:
                continue
            if isinstance(region, EndCaptureRegion) or not region.complete:
                region.capture(chunk, self._total_count)

    def eat_chunk(self, chunk: bytes) -> None:
        """Feeds the next chunk of the stream."""
        before = set(self._capture_regions.values())
        done_before = {r for r in before if r.complete}
        self._total_count += len(chunk)
        self._capture(chunk)
        self.post_process()
        added = set(self._capture_regions.values()) - before
        if added:
            self._capture(chunk, only=[self.region_name(r) for r in added])
        for region in [r for r in self._capture_regions.values() if r.complete and r not in done_before]:
            self.region_complete(self.region_name(region))

    def post_process(self) -> None:
        """Runs after each chunk; may declare new regions (they see the current chunk too)."""

    def region(self, name: str) -> CaptureRegion:
        return self._capture_regions[name]

    def region_name(self, region: CaptureRegion) -> str:
        for name, r in self._capture_regions.items():
            if r is region:
                return name
        raise ValueError("No such region")

    def new_region(self, name: str, region: CaptureRegion) -> None:
        if self.has_region(name):
            raise ImageFormatError("Inspector re-added region %s" % name)
        self._capture_regions[name] = region

    def has_region(self, name: str) -> bool:
        return name in self._capture_regions

    def delete_region(self, name: str) -> None:
        del self._capture_regions[name]

    def region_complete(self, region_name: str) -> None:
        """Called once when a region becomes complete."""

    def add_safety_check(self, check: SafetyCheck) -> None:
        if not isinstance(check, SafetyCheck):
            raise RuntimeError("Unable to add safety check of type %s" % type(check).__name__)
        if check.name in self._safety_checks:
            raise RuntimeError("Duplicate check of name %s" % check.name)
        self._safety_checks[check.name] = check

    @property
    @abc.abstractmethod
    def format_match(self) -> bool:
        """Whether the stream is this format."""

    @property
    def virtual_size(self) -> int:
        """The guest size, or the bytes seen for formats that do not store one."""
        return self._total_count

    @property
    def actual_size(self) -> int:
        """The bytes seen so far (the file's size once it has all been read)."""
        return self._total_count

    @property
    def complete(self) -> bool:
        return all(r.complete for r in self._capture_regions.values())

    def __str__(self) -> str:
        return self.NAME

    @property
    def context_info(self) -> Dict[str, int]:
        """Bytes held per region."""
        return {name: len(r.data) for name, r in self._capture_regions.items()}

    @classmethod
    def from_file(cls, filename: str) -> "FileInspector":
        """Reads as much of `filename` as the inspector needs; ImageFormatError unless it is this format."""
        inspector = cls()
        with open(filename, "rb") as f:
            for chunk in _chunks(f):
                inspector.eat_chunk(chunk)
                if inspector.complete:
                    break
        inspector.finish()
        if not inspector.complete or not inspector.format_match:
            raise ImageFormatError("File is not in requested format")
        return inspector

    def safety_check(self) -> None:
        """Runs every safety check: SafetyCheckFailed with all failures, ImageFormatError when it cannot."""
        if not self.complete:
            raise ImageFormatError("Incomplete file cannot be safety checked")
        if not self.format_match:
            raise ImageFormatError("Unable to safety check format %s because content does not match" % self)
        failures: Dict[str, Any] = {}
        for check in self._safety_checks.values():
            try:
                check()
            except SafetyViolation as exc:
                exc.check = check  # type: ignore[attr-defined]
                failures[check.name] = exc
                LOG.warning("Safety check %s on %s failed because %s", check.name, self, exc)
            except SafetyCheckFailed as exc:
                for name, failure in exc.failures.items():
                    failures["inner_" + name] = failure
                    LOG.warning("Inner safety check %s on %s failed because %s", name, self, failure)
        if failures:
            raise SafetyCheckFailed(failures)


class ContainerFileInspector(FileInspector):
    """A format wrapping another (LUKS): adds an `inner_safety` check running the inner format's checks."""

    def __init__(self, tracing: bool = False, params: Optional[Dict[str, str]] = None) -> None:
        self._inner_format: Optional[FileInspector] = None
        super().__init__(tracing=tracing, params=params)
        self.add_safety_check(SafetyCheck("inner_safety", self.check_inner_safety))

    @property
    def inner_format(self) -> Optional[FileInspector]:
        return self._inner_format

    def check_inner_safety(self) -> None:
        if self._inner_format is not None:
            self._inner_format.safety_check()


class RawFileInspector(FileInspector):
    NAME = "raw"

    def _initialize(self) -> None:
        self.add_safety_check(SafetyCheck.null())

    @property
    def format_match(self) -> bool:
        return True


class QcowInspector(FileInspector):
    """qcow2 (and refused qcow v1 / unknown versions): the header's magic, size, backing file, data file and
    incompatible feature bits, read by instar's qcow2 header probe."""

    NAME = "qcow2"
    BF_OFFSET = 0x08
    BF_OFFSET_LEN = 8
    I_FEATURES = 0x48
    I_FEATURES_LEN = 8
    I_FEATURES_DATAFILE_BIT = 3
    I_FEATURES_MAX_BIT = 4

    def _initialize(self) -> None:
        self._header: Optional[ProbeResult] = None
        self.new_region("header", CaptureRegion(0, 512))
        self.add_safety_check(SafetyCheck("backing_file", self.check_backing_file))
        self.add_safety_check(SafetyCheck("data_file", self.check_data_file))
        self.add_safety_check(SafetyCheck("unknown_features", self.check_unknown_features))

    def _read_header(self) -> ProbeResult:
        region = self.region("header")
        return _probe(self.NAME, "header", [(0, region.data)], qcow2_known_features=self.I_FEATURES_MAX_BIT)

    def region_complete(self, region_name: str) -> None:
        if region_name == "header":
            self._header = self._read_header()

    @property
    def virtual_size(self) -> int:
        h = self._header
        return (h.virtual_size or 0) if h is not None and h.match else 0

    @property
    def format_match(self) -> bool:
        return self.region("header").complete and self._header is not None and bool(self._header.match)

    def _violation(self, bit: int, default: str) -> None:
        h = self._read_header()
        if h.violations & bit:
            raise SafetyViolation(default)

    def check_backing_file(self) -> None:
        self._violation(V_BACKING_FILE, "Image has a backing file")

    def check_data_file(self) -> None:
        self._violation(V_DATA_FILE, "Image has data_file set")

    def check_unknown_features(self) -> None:
        self._violation(V_UNSUPPORTED_VERSION, "Unsupported qcow2 version")
        self._violation(V_UNKNOWN_FEATURES, "Unknown QCOW2 features found")


class QEDInspector(FileInspector):
    """QED: recognised to be refused."""

    NAME = "qed"

    def _initialize(self) -> None:
        self.new_region("header", CaptureRegion(0, 512))
        self.add_safety_check(SafetyCheck.banned())

    @property
    def format_match(self) -> bool:
        if not self.region("header").complete:
            return False
        return self._matches("header")


class VHDInspector(FileInspector):
    """VHD (vpc), dynamic: the footer copy at offset 0 ("conectix") and its current size."""

    NAME = "vhd"

    def _initialize(self) -> None:
        self.new_region("header", CaptureRegion(0, 512))
        self.add_safety_check(SafetyCheck.null())

    @property
    def format_match(self) -> bool:
        return self._matches("header")

    @property
    def virtual_size(self) -> int:
        if not self.region("header").complete:
            return 0
        r = self._probe_region("header")
        return (r.virtual_size or 0) if r is not None and r.match else 0


class VHDXInspector(FileInspector):
    """VHDX: the identifier, the region table at 192 KiB, the metadata table it points to and the virtual disk
    size item, each located and read by instar's vhdx probe."""

    NAME = "vhdx"
    METAREGION = "8B7CA206-4790-4B9A-B8FE-575F050F886E"
    VIRTUAL_DISK_SIZE = "2FA54224-CD1B-4876-B211-5DBED83BF4B8"
    VHDX_METADATA_TABLE_MAX_SIZE = 32 * 2048

    def _initialize(self) -> None:
        self.new_region("ident", CaptureRegion(0, 32))
        self.new_region("header", CaptureRegion(192 * Ki, 64 * Ki))
        self.add_safety_check(SafetyCheck.null())

    def post_process(self) -> None:
        if self.region("header").complete and not self.has_region("metadata"):
            region = self._find_meta_region()
            if region:
                self.new_region("metadata", region)
        elif self.has_region("metadata") and not self.has_region("vds"):
            region = self._find_meta_entry(self.VIRTUAL_DISK_SIZE)
            if region:
                self.new_region("vds", region)

    @property
    def format_match(self) -> bool:
        return self._matches("ident", "ident")

    @staticmethod
    def _guid(buf: Data) -> str:
        """A GUID as stored (mixed-endian) in its usual upper-case text form."""
        return str(uuid.UUID(bytes_le=bytes(buf))).upper()

    def _find_meta_region(self) -> Optional[CaptureRegion]:
        r = self._probe_region("header", "header")
        if r is None or not r.match or r.need is None:
            return None
        return CaptureRegion(r.need[0], self.VHDX_METADATA_TABLE_MAX_SIZE)

    def _find_meta_entry(self, desired_guid: str) -> Optional[CaptureRegion]:
        meta = self.region("metadata")
        if len(meta.data) < 32:
            return None
        r = _probe(self.NAME, "metadata", [(meta.offset, meta.data)], vhdx_item=uuid.UUID(desired_guid).bytes_le)
        if not r.match or r.need is None:
            return None
        meta.length = len(meta.data)
        return CaptureRegion(r.need[0], r.need[1])

    @property
    def virtual_size(self) -> int:
        if not self.has_region("vds") or not self.region("vds").complete:
            return 0
        r = self._probe_region("vds", "item")
        return (r.virtual_size or 0) if r is not None else 0


class VMDKInspector(FileInspector):
    """VMDK, monolithicSparse and streamOptimized only: the sparse header, the descriptor it points to and, for
    a grain directory at the end, the footer; instar's vmdk probe reads and judges each."""

    NAME = "vmdk"
    DESC_OFFSET = 0x200
    DESC_MAX_SIZE = (1 << 20) - 1
    GD_AT_END = 0xFFFFFFFFFFFFFFFF
    MIN_SPARSE_HEADER = 64
    MARKER_EOS = 0
    MARKER_FOOTER = 3

    def _initialize(self) -> None:
        self.desc_text: Optional[str] = None
        self.vmdktype = "formatnotfound"
        self._descriptor: Optional[ProbeResult] = None
        self.new_region("header", CaptureRegion(0, 512, min_length=self.MIN_SPARSE_HEADER))
        self.new_region("descriptor", CaptureRegion(0, self.DESC_MAX_SIZE, min_length=4))
        self.add_safety_check(SafetyCheck("descriptor", self.check_descriptor))

    def post_process(self) -> None:
        if not self.has_region("header") or not self.region("header").complete:
            return
        h = self._probe_region("header")
        if h is None:
            return
        if h.text:
            self.delete_region("header")
            return
        if h.footer and not self.has_region("footer"):
            self.new_region("footer", EndCaptureRegion(1536))
            self.add_safety_check(SafetyCheck("footer", self.check_footer))
        if self.region("descriptor").offset == 0 and h.need is not None:
            self.delete_region("descriptor")
            self.new_region("descriptor", CaptureRegion(h.need[0], h.need[1]))

    def region_complete(self, region_name: str) -> None:
        if region_name == "descriptor":
            self._parse_descriptor()

    def _parse_descriptor(self) -> None:
        region = self.region("descriptor")
        r = _probe(self.NAME, "descriptor", [(region.offset, region.data)])
        if not r.match:
            LOG.error("VMDK descriptor failed to decode as ASCII")
            return
        text = bytes(region.data).split(b"\x00", 1)[0]
        self.desc_text = text.decode("ascii").lower()
        self.vmdktype = r.subformat
        self._descriptor = r

    @property
    def format_match(self) -> bool:
        if self.has_region("header"):
            # The signature alone decides, as in oslo.utils (a bad version is a format error in post_process).
            return bool(_probe(self.NAME, "header", [(0, self.region("header").data[:4])]).match)
        return self.vmdktype != "formatnotfound"

    @property
    def virtual_size(self) -> int:
        if not self.desc_text:
            return 0
        if self.vmdktype not in ("monolithicsparse", "streamoptimized"):
            LOG.warning("Unsupported VMDK format %r", self.vmdktype)
            return 0
        try:
            r = self._probe_region("header")
        except ImageFormatError:
            return 0
        # Capacity in sectors x 512, as big as the header says (beyond 64 bits too: a size check must see it).
        return r.sectors * 512 if r is not None else 0

    def check_descriptor(self) -> None:
        r = self._descriptor
        if not self.desc_text or r is None:
            raise SafetyViolation("No descriptor found")
        if r.violations:
            LOG.error("VMDK descriptor refused: %s", r.message)
            raise SafetyViolation(r.message)

    def check_footer(self) -> None:
        header, footer = self.region("header"), self.region("footer")
        r = _probe(self.NAME, "footer", [(0, header.data), (footer.offset, footer.data)])
        if r.violations:
            raise SafetyViolation(r.message)


class VDIInspector(FileInspector):
    """VirtualBox VDI: signature and disk size from the 512-byte header."""

    NAME = "vdi"

    def _initialize(self) -> None:
        self.new_region("header", CaptureRegion(0, 512))
        self.add_safety_check(SafetyCheck.null())

    @property
    def format_match(self) -> bool:
        if not self.region("header").complete:
            return False
        return self._matches("header")

    @property
    def virtual_size(self) -> int:
        if not self.format_match:
            return 0
        r = self._probe_region("header")
        return (r.virtual_size or 0) if r is not None else 0


class ISOInspector(FileInspector):
    """ISO 9660 / UDF: the 32 KiB system area, then the volume descriptor giving the volume size."""

    NAME = "iso"

    def _initialize(self) -> None:
        self.new_region("system_area", CaptureRegion(0, 32 * Ki))
        self.new_region("header", CaptureRegion(32 * Ki, 2 * Ki))
        self.add_safety_check(SafetyCheck.null())

    @property
    def format_match(self) -> bool:
        if not self.complete:
            return False
        return self._matches("header")

    @property
    def virtual_size(self) -> int:
        if not self.format_match:
            return 0
        r = self._probe_region("header")
        return (r.virtual_size or 0) if r is not None else 0


class GPTInspector(FileInspector):
    """A partitioned disk (MBR, protective MBR of GPT): accepted only with a plain partition table."""

    NAME = "gpt"
    MBR_SIGNATURE = 0xAA55
    MBR_PTE_START = 446
    MEDIA_TYPE_FDISK = 0xF8

    def _initialize(self) -> None:
        self.new_region("mbr", CaptureRegion(0, 512))
        self.add_safety_check(SafetyCheck("mbr", self.check_mbr_partitions))

    @property
    def format_match(self) -> bool:
        if not self.region("mbr").complete:
            return False
        return self._matches("mbr", "mbr")

    def check_mbr_partitions(self) -> None:
        region = self.region("mbr")
        r = _probe(self.NAME, "mbr", [(0, region.data)])
        if r.violations:
            raise SafetyViolation(r.message)


class LUKSInspector(ContainerFileInspector):
    """LUKS: the header's magic, version and payload offset, read by instar's LUKS probe; with
    ``params={'luks_passphrase': ...}`` the first active key slot's material and the first payload sector are
    captured to detect the inner format."""

    NAME = "luks"

    def _initialize(self) -> None:
        self._passphrase = self._params.get("luks_passphrase")
        self._iter_limit = int(self._params.get("luks_iter_limit", 12000000))
        self._master_key: Optional[bytes] = None
        self._key_material_captured = False
        self._active_slot = -1
        self.new_region("header", CaptureRegion(0, 592))
        self.add_safety_check(SafetyCheck("version", self.check_version))
        self.add_safety_check(SafetyCheck("passphrase", self.check_passphrase))

    @property
    def format_match(self) -> bool:
        return self._matches("header")

    @property
    def header_items(self) -> Dict[str, Any]:
        """The LUKS1 header fields by name (raw values as stored)."""
        import struct
        names = ["magic", "version", "cipher_alg", "cipher_mode", "hash", "payload_offset", "key_bytes",
                 "mk_digest", "mk_digest_salt", "mk_digest_iter"]
        return dict(zip(names, struct.unpack(">6sH32s32s32sII20s32sI", self.region("header").data[:168])))

    def check_version(self) -> None:
        r = _probe(self.NAME, "header", [(0, self.region("header").data)])
        if r.violations & V_UNSUPPORTED_VERSION:
            raise SafetyViolation(r.message)

    def check_passphrase(self) -> None:
        if self._passphrase is not None and not self.inner_format:
            raise SafetyViolation("Passphrase is incorrect")
        elif not self._passphrase:
            LOG.info("LUKS passphrase not provided, skipping decryption/detection")

    def post_process(self) -> None:
        if not self.region("header").complete or self._passphrase is None:
            return
        r = self._probe_region("header")
        if r is None:
            return
        if not self._key_material_captured and r.key_slot is not None and r.need is not None:
            self.new_region("key_material", CaptureRegion(r.need[0], r.need[1]))
            self._key_material_captured = True
            self._active_slot = r.key_slot
        if (self.has_region("key_material") and self.region("key_material").complete
                and not self.has_region("encrypted_block")):
            self.new_region("encrypted_block", CaptureRegion(r.payload_offset * 512, 512))

    def region_complete(self, region_name: str) -> None:
        if region_name == "encrypted_block":
            first = self._decrypt_first_block()
            wrapper = InspectWrapper(_BytesReader(first))
            wrapper.read(1024)
            wrapper.close()
            self._inner_format = wrapper.format

    def _decrypt_first_block(self) -> bytes:
        """The payload's first sector, decrypted by the library with the passphrase (first active key slot)."""
        if self._passphrase is None or not self.has_region("key_material") \
                or not self.region("key_material").complete:
            raise ValueError("Key material not available")
        if not self.has_region("encrypted_block") or not self.region("encrypted_block").complete:
            raise ValueError("Encrypted block not found or complete")
        km, block = self.region("key_material"), self.region("encrypted_block")
        try:
            r = probe(self.NAME, "payload", [(0, self.region("header").data), (km.offset, km.data),
                                             (block.offset, block.data)],
                      luks_passphrase=self._passphrase, luks_iter_limit=self._iter_limit)
        except InstarError as e:
            LOG.error("Could not recover master key for LUKS decryption: %s", e.message)
            raise ValueError("Could not recover master key for LUKS decryption")
        return r.payload

    @property
    def virtual_size(self) -> int:
        r = self._probe_region("header")
        payload = r.payload_offset if r is not None else 0
        return super().virtual_size - payload * 512


class _BytesReader:
    """A minimal readable stream over bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, size: int) -> bytes:
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk


class InspectWrapper:
    """A readable stream (file-like or iterator) that runs every inspector (or `allowed_formats`) over the data
    it passes on. ``format`` then names the one that matched (raw when none did); with `expected_format`, a
    mismatch of that format aborts the read with ImageFormatError."""

    def __init__(self, source: Any, expected_format: Optional[str] = None,
                 allowed_formats: Optional[List[str]] = None, tracing: bool = False,
                 params: Optional[Dict[str, str]] = None) -> None:
        self._source = source
        self._expected_format = expected_format
        self._errored_inspectors: Set[FileInspector] = set()
        self._inspectors = {cls(tracing=tracing, params=params) for name, cls in ALL_FORMATS.items()
                            if not allowed_formats or name in allowed_formats}
        self._finished = False

    def __iter__(self) -> "InspectWrapper":
        return self

    def _process_chunk(self, chunk: bytes) -> None:
        for inspector in [i for i in self._inspectors if i not in self._errored_inspectors]:
            try:
                inspector.eat_chunk(chunk)
            except Exception as e:
                if inspector.NAME == self._expected_format:
                    raise
                if not self._expected_format:
                    LOG.debug("Format inspector for %s does not match, excluding from consideration (%s)",
                              inspector.NAME, e)
                self._errored_inspectors.add(inspector)
            else:
                if (inspector.NAME == self._expected_format and inspector.complete
                        and not inspector.format_match):
                    raise ImageFormatError("Content does not match expected format %r" % inspector.NAME)

    def __next__(self) -> bytes:
        try:
            chunk: bytes = next(self._source)
        except StopIteration:
            self._finish()
            raise
        self._process_chunk(chunk)
        return chunk

    def read(self, size: int) -> bytes:
        chunk: bytes = self._source.read(size)
        self._process_chunk(chunk)
        return chunk

    def _finish(self) -> None:
        for inspector in self._inspectors:
            inspector.finish()
        self._finished = True

    def close(self) -> None:
        if hasattr(self._source, "close"):
            self._source.close()
        self._finish()

    @property
    def formats(self) -> Optional[List[FileInspector]]:
        """Every format that matched (raw alone when none did), or None before a decision."""
        non_raw = {i for i in self._inspectors if i.NAME != "raw"}
        complete = all(i.complete for i in non_raw)
        if not complete and not self._finished:
            return None
        matches = [i for i in non_raw if i.format_match]
        if not matches:
            return [x for x in self._inspectors if str(x) == "raw"]
        return matches

    @property
    def format(self) -> Optional[FileInspector]:
        """The one format that matched; ImageFormatError for several, or for none when raw is not allowed."""
        matches = self.formats
        if matches is None:
            return None
        if len(matches) > 1:
            raise ImageFormatError("Multiple formats detected: %s" % ",".join(str(i) for i in matches))
        if not matches:
            raise ImageFormatError("Content does not match any allowed format")
        return matches[0]


ALL_FORMATS: Dict[str, Type[FileInspector]] = {
    "raw": RawFileInspector,
    "qcow2": QcowInspector,
    "vhd": VHDInspector,
    "vhdx": VHDXInspector,
    "vmdk": VMDKInspector,
    "vdi": VDIInspector,
    "qed": QEDInspector,
    "iso": ISOInspector,
    "gpt": GPTInspector,
    "luks": LUKSInspector,
}


def get_inspector(format_name: str) -> Optional[Type[FileInspector]]:
    """The inspector class of `format_name` (raw, qcow2, ...), or None."""
    return ALL_FORMATS.get(format_name)


def detect_file_format(filename: str, tracing: bool = False,
                       params: Optional[Dict[str, str]] = None) -> Optional[FileInspector]:
    """Reads `filename` once through every inspector and returns the one that matched (raw when none did);
    ImageFormatError when several did."""
    with open(filename, "rb") as f:
        wrapper = InspectWrapper(f, tracing=tracing, params=params)
        try:
            for _ in _chunks(wrapper, 4096):
                if wrapper.format:
                    return wrapper.format
        finally:
            wrapper.close()
        return wrapper.format
