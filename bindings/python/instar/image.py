"""instar_open / instar_read / instar_write / instar_write_zeroes / instar_discard / instar_flush / instar_close."""
from __future__ import annotations

import ctypes
from typing import Optional, Union

from ._lib import Error, Limits, Options, check, encode, lib

OPEN_READ_WRITE = 1 << 0
OPEN_FORCE_SHARE = 1 << 1
OPEN_NO_BACKING = 1 << 2
OPEN_NO_CACHE = 1 << 3
#: parse the image in a confined helper process (info, check, map; docs/isolated.md)
OPEN_ISOLATED = 1 << 4

ZERO_MAY_UNMAP = 1 << 0

STATUS_ALLOCATED = 1 << 0
STATUS_DATA = 1 << 1
STATUS_ZERO = 1 << 2
STATUS_EOF = 1 << 3


class OpenOptions(Options):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("key_secret", ctypes.c_char_p), ("limits", ctypes.POINTER(Limits)),
                ("backing_key_secret", ctypes.c_char_p)]


class _BlockStatus(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("length", ctypes.c_uint64),
                ("depth", ctypes.c_int32), ("reserved", ctypes.c_int32)]


class BlockStatus:
    """The status of a guest range (instar_block_status): `length` bytes share `flags` (STATUS_* bits)."""

    def __init__(self, length: int, flags: int, depth: int) -> None:
        self.length, self.flags, self.depth = length, flags, depth

    @property
    def allocated(self) -> bool:
        return bool(self.flags & STATUS_ALLOCATED)

    @property
    def data(self) -> bool:
        return bool(self.flags & STATUS_DATA)

    @property
    def zero(self) -> bool:
        return bool(self.flags & STATUS_ZERO)

    @property
    def eof(self) -> bool:
        return bool(self.flags & STATUS_EOF)

    def __repr__(self) -> str:
        return "BlockStatus(length=%d, flags=%#x, depth=%d)" % (self.length, self.flags, self.depth)


def _setup() -> ctypes.CDLL:
    L = lib()
    if getattr(L, "_image_ready", False):
        return L
    L.instar_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(OpenOptions), ctypes.POINTER(ctypes.c_void_p),
                              ctypes.POINTER(Error)]
    L.instar_close.argtypes = [ctypes.c_void_p]
    L.instar_close.restype = None
    L.instar_get_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(Error)]
    L.instar_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                              ctypes.POINTER(Error)]
    L.instar_write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64,
                               ctypes.POINTER(Error)]
    L.instar_write_zeroes.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32,
                                      ctypes.POINTER(Error)]
    L.instar_discard.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(Error)]
    L.instar_flush.argtypes = [ctypes.c_void_p, ctypes.POINTER(Error)]
    L.instar_block_status.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                                      ctypes.POINTER(_BlockStatus), ctypes.POINTER(Error)]
    setattr(L, "_image_ready", True)
    return L


class Image:
    """An open image chain (instar_open). Use as a context manager (``with Image(path) as img:``) or call close().
    `format` forces the format (probed when None), `flags` are OPEN_* bits (OPEN_READ_WRITE to write),
    `key_secret` is the passphrase of an encrypted image (what qemu's encrypt.key-secret names),
    `backing_key_secret` that of the encrypted images below it (its backing file and theirs)."""

    def __init__(self, path: str, format: Optional[str] = None, flags: int = 0,
                 key_secret: Optional[str] = None, backing_key_secret: Optional[str] = None) -> None:
        self._h = None
        L = _setup()
        opts = OpenOptions(ctypes.sizeof(OpenOptions), flags, encode(format), encode(key_secret))
        opts.backing_key_secret = encode(backing_key_secret)
        err = Error()
        h = ctypes.c_void_p()
        check(L.instar_open(encode(path), ctypes.byref(opts), ctypes.byref(h), ctypes.byref(err)), err)
        self._h = h
        self.path = path

    def _handle(self) -> ctypes.c_void_p:
        if not self._h:
            raise ValueError("I/O operation on a closed instar.Image")
        return self._h

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return not self._h

    @property
    def size(self) -> int:
        """The virtual size in bytes."""
        err = Error()
        v = ctypes.c_uint64()
        check(lib().instar_get_size(self._handle(), ctypes.byref(v), ctypes.byref(err)), err)
        return v.value

    def read(self, offset: int, count: int) -> bytes:
        """Reads `count` guest bytes at `offset` (unallocated ranges read as zeroes, or from the backing file)."""
        buf = ctypes.create_string_buffer(count)
        err = Error()
        check(lib().instar_read(self._handle(), buf, count, offset, ctypes.byref(err)), err)
        return buf.raw

    def write(self, offset: int, data: Union[bytes, bytearray, memoryview]) -> None:
        """Writes bytes at guest `offset` (image opened with OPEN_READ_WRITE)."""
        data = bytes(data)
        err = Error()
        check(lib().instar_write(self._handle(), data, len(data), offset, ctypes.byref(err)), err)

    def write_zeroes(self, offset: int, count: int, may_unmap: bool = False) -> None:
        """Makes `count` bytes at `offset` read as zeroes; `may_unmap` lets the storage go."""
        err = Error()
        flags = ZERO_MAY_UNMAP if may_unmap else 0
        check(lib().instar_write_zeroes(self._handle(), count, offset, flags, ctypes.byref(err)), err)

    def discard(self, offset: int, count: int) -> None:
        """Releases whole clusters within the range."""
        err = Error()
        check(lib().instar_discard(self._handle(), count, offset, ctypes.byref(err)), err)

    def flush(self) -> None:
        """Writes cached metadata back and syncs the image files."""
        err = Error()
        check(lib().instar_flush(self._handle(), ctypes.byref(err)), err)

    def block_status(self, offset: int, count: int) -> BlockStatus:
        """The status of the range at `offset` (at most `count` bytes) across the backing chain, as qemu-nbd
        reports base:allocation; call again from offset + length for the rest."""
        st = _BlockStatus(ctypes.sizeof(_BlockStatus))
        err = Error()
        check(lib().instar_block_status(self._handle(), offset, count, ctypes.byref(st), ctypes.byref(err)), err)
        return BlockStatus(st.length, st.flags, st.depth)

    def close(self) -> None:
        """Closes the image (and its backing chain); later calls do nothing."""
        if self._h:
            lib().instar_close(self._h)
            self._h = None

    def __enter__(self) -> "Image":
        self._handle()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_h", None):
            self.close()

    def __repr__(self) -> str:
        return "<instar.Image %r%s>" % (getattr(self, "path", None), " closed" if self.closed else "")
