"""instar_open / instar_read / instar_write / instar_write_zeroes / instar_discard / instar_flush / instar_close."""
import ctypes

from ._lib import Error, check, encode, lib

OPEN_READ_WRITE = 1 << 0
OPEN_FORCE_SHARE = 1 << 1
OPEN_NO_BACKING = 1 << 2
OPEN_NO_CACHE = 1 << 3

ZERO_MAY_UNMAP = 1 << 0


class OpenOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("format", ctypes.c_char_p),
                ("key_secret", ctypes.c_char_p)]


def _setup():
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
    L._image_ready = True
    return L


class Image:
    """An open image chain. Use as a context manager or call close().
    `key_secret` is the passphrase of an encrypted image (what qemu's encrypt.key-secret names)."""

    def __init__(self, path, format=None, flags=0, key_secret=None):
        self._h = None
        L = _setup()
        opts = OpenOptions(ctypes.sizeof(OpenOptions), flags, encode(format), encode(key_secret))
        err = Error()
        h = ctypes.c_void_p()
        check(L.instar_open(encode(path), ctypes.byref(opts), ctypes.byref(h), ctypes.byref(err)), err)
        self._h = h

    @property
    def size(self):
        err = Error()
        v = ctypes.c_uint64()
        check(lib().instar_get_size(self._h, ctypes.byref(v), ctypes.byref(err)), err)
        return v.value

    def read(self, offset, count):
        buf = ctypes.create_string_buffer(count)
        err = Error()
        check(lib().instar_read(self._h, buf, count, offset, ctypes.byref(err)), err)
        return buf.raw

    def write(self, offset, data):
        """Writes bytes at guest `offset` (image opened with OPEN_READ_WRITE)."""
        data = bytes(data)
        err = Error()
        check(lib().instar_write(self._h, data, len(data), offset, ctypes.byref(err)), err)

    def write_zeroes(self, offset, count, may_unmap=False):
        """Makes `count` bytes at `offset` read as zeroes; `may_unmap` lets the storage go."""
        err = Error()
        flags = ZERO_MAY_UNMAP if may_unmap else 0
        check(lib().instar_write_zeroes(self._h, count, offset, flags, ctypes.byref(err)), err)

    def discard(self, offset, count):
        """Releases whole clusters within the range."""
        err = Error()
        check(lib().instar_discard(self._h, count, offset, ctypes.byref(err)), err)

    def flush(self):
        err = Error()
        check(lib().instar_flush(self._h, ctypes.byref(err)), err)

    def close(self):
        if self._h:
            lib().instar_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
