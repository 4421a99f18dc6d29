"""Python ctypes binding for libinstar (see include/instar.h)."""
from ._lib import InstarError, lib
from .check import check, check_json
from .check import check_chain_json
from .create import create, measure
from .image import OPEN_FORCE_SHARE, OPEN_NO_BACKING, OPEN_NO_CACHE, OPEN_READ_WRITE, ZERO_MAY_UNMAP, Image
from .info import ImageInfo, Snapshot, info, info_human, info_json


def version():
    return lib().instar_version().decode()
from .ops import compare, convert, map  # noqa: E402,F401
from .resize import amend, resize  # noqa: E402,F401
from .commit import commit  # noqa: E402,F401
from .rebase import rebase  # noqa: E402,F401
from .bitmapdd import bitmap, dd  # noqa: E402,F401
from .bitmapdd import bench  # noqa: E402,F401
from .snapshot import snapshot_apply, snapshot_create, snapshot_delete, snapshot_list  # noqa: E402,F401
