"""Loading libinstar.so and the structs every call shares (instar_error_t, option headers)."""
import ctypes
import ctypes.util
import os

_lib = None


def lib():
    """The loaded libinstar.so: $INSTAR_LIBRARY, else the system's."""
    global _lib
    if _lib is None:
        path = os.environ.get("INSTAR_LIBRARY") or ctypes.util.find_library("instar") or "libinstar.so"
        _lib = ctypes.CDLL(path)
        _lib.instar_version.restype = ctypes.c_char_p
        _lib.instar_strerror.restype = ctypes.c_char_p
        _lib.instar_strerror.argtypes = [ctypes.c_int]
        _lib.instar_string_free.argtypes = [ctypes.c_void_p]
        _lib.instar_string_free.restype = None
    return _lib


class Error(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int32), ("errno_value", ctypes.c_int32), ("message", ctypes.c_char * 1024)]


class InstarError(Exception):
    """A failed libinstar call: `code` is the INSTAR_E_* value, `message` what qemu-img would print."""

    def __init__(self, code, message, errno_value=0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.errno = errno_value


def check(rc, err):
    if rc != 0:
        raise InstarError(rc, err.message.decode("utf-8", "replace"), err.errno_value)


def take_string(ptr):
    """Copies a library-allocated char* into a Python str and frees it."""
    try:
        return ctypes.string_at(ptr).decode("utf-8")
    finally:
        lib().instar_string_free(ptr)


def encode(s):
    return None if s is None else s.encode("utf-8")
