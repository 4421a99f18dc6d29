"""Python binding for libinstar (see include/instar.h): qemu-img's operations as library calls.

The library is found through $INSTAR_LIBRARY, the copy inside the package, ``ldconfig -p``, then
``pkg-config --variable=libdir instar`` (see ``instar._lib``). Failures raise an ``InstarError`` subclass per
INSTAR_E_* code (``NotFound``, ``Locked``, ``Corrupt``, ...), each with ``.code``, ``.message`` (qemu-img's
message) and ``.errno``. Library calls release the GIL; long operations take ``progress=`` and ``cancel=``.
"""
from ._lib import InstarError, lib
from .check import check, check_json
from .check import check_chain_json
from .create import create, measure
from .image import OPEN_FORCE_SHARE, OPEN_NO_BACKING, OPEN_NO_CACHE, OPEN_READ_WRITE, ZERO_MAY_UNMAP, Image
from .info import ImageInfo, Snapshot, info, info_human, info_json


def version() -> str:
    """The library's version string."""
    return str(lib().instar_version().decode())
from .ops import compare, convert, map  # noqa: E402,F401
from .resize import amend, resize  # noqa: E402,F401
from .commit import commit  # noqa: E402,F401
from .rebase import rebase  # noqa: E402,F401
from .bitmapdd import bitmap, dd  # noqa: E402,F401
from .bitmapdd import bench  # noqa: E402,F401
from .snapshot import snapshot_apply, snapshot_create, snapshot_delete, snapshot_list  # noqa: E402,F401
from ._lib import (Chain, Corrupt, Cancelled, Encrypted, Invalid, IO, LibraryNotFoundError, Locked,  # noqa: E402,F401
                   NoMemory, NotFound, OutOfRange, Permission, Unsupported, ERROR_CLASSES, library_path)
from .progress import Cancel  # noqa: E402,F401
from .results import BenchResult, CheckResult, CompareResult, MapEntry, MeasureResult  # noqa: E402,F401
from .ops import compare_result, map_entries  # noqa: E402,F401
from .create import measure_result  # noqa: E402,F401
from .check import check_result  # noqa: E402,F401
from .bitmapdd import bench_result  # noqa: E402,F401
from .create import create_formatting  # noqa: E402,F401
from .check import check_report  # noqa: E402,F401
from .ops import compare_status  # noqa: E402,F401
from ._lib import LimitReached, limits  # noqa: E402,F401
from .policy import InspectPolicy, InspectReport, PolicyViolation, Violation, inspect  # noqa: E402,F401
from .image import (STATUS_ALLOCATED, STATUS_DATA, STATUS_EOF, STATUS_ZERO, BlockStatus)  # noqa: E402,F401

# The public names (mypy --strict and `from instar import *` take them from here).
__all__ = [
    "InstarError", "Invalid", "IO", "NotFound", "Corrupt", "Unsupported", "Locked", "NoMemory", "Cancelled",
    "Permission", "Encrypted", "Chain", "OutOfRange", "LimitReached", "limits",
    "ERROR_CLASSES", "LibraryNotFoundError", "lib", "library_path",
    "version", "Image", "OPEN_READ_WRITE", "OPEN_FORCE_SHARE", "OPEN_NO_BACKING", "OPEN_NO_CACHE", "ZERO_MAY_UNMAP",
    "ImageInfo", "Snapshot", "info", "info_json", "info_human", "check", "check_json", "check_result", "CheckResult",
    "create", "measure", "measure_result", "MeasureResult", "map", "map_entries", "MapEntry", "compare",
    "compare_result", "CompareResult", "convert", "resize", "amend", "commit", "rebase", "bitmap", "dd", "bench",
    "bench_result", "BenchResult", "Cancel", "check_chain_json", "snapshot_list", "snapshot_create",
    "snapshot_apply", "snapshot_delete",
    "create_formatting", "check_report",
    "compare_status",
    "inspect", "InspectPolicy", "InspectReport", "PolicyViolation", "Violation",
    "BlockStatus", "STATUS_ALLOCATED", "STATUS_DATA", "STATUS_ZERO", "STATUS_EOF",
]

# Isolated mode (docs/isolated.md): info/check/map take isolated=True.
from ._lib import IsolationFailed  # noqa: E402,F401
from .image import OPEN_ISOLATED  # noqa: E402,F401
__all__ += ["IsolationFailed", "OPEN_ISOLATED"]

# qemu's --object for library callers (TLS credentials, secrets).
from .objects import object_add, object_del  # noqa: E402,F401
__all__ += ["object_add", "object_del"]
