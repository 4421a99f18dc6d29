"""Loading libinstar.so, the error classes, and the structs every call shares (instar_error_t).

The library is looked for, in this order:

1. the path in the environment variable ``INSTAR_LIBRARY``;
2. the copy inside the package (``instar/_native/libinstar.so``, what ``make wheel`` bundles);
3. the dynamic linker's cache (``ldconfig -p``);
4. ``$(pkg-config --variable=libdir instar)/libinstar.so`` (what ``make install`` writes).

When none loads, :class:`LibraryNotFoundError` names every place tried and why it failed. The library is loaded
with :class:`ctypes.CDLL`, so every call into it releases the GIL: other Python threads run meanwhile.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import shutil
import subprocess
import threading
from typing import Dict, Iterator, List, Optional, Tuple, Type

LIBRARY_NAME = "libinstar.so"
ENV_VAR = "INSTAR_LIBRARY"
PACKAGE_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native", LIBRARY_NAME)

_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[str] = None
_load_lock = threading.Lock()


class LibraryNotFoundError(ImportError):
    """libinstar.so could not be found or loaded; `tried` lists (place, reason) for each place looked at."""

    def __init__(self, tried: List[Tuple[str, str]]) -> None:
        self.tried = tried
        lines = ["%s could not be loaded; tried, in order:" % LIBRARY_NAME]
        lines += ["  %d. %s: %s" % (i + 1, where, why) for i, (where, why) in enumerate(tried)]
        lines.append("Set %s to the library's path, install the wheel that bundles it (make wheel), or run "
                     "make install." % ENV_VAR)
        super().__init__("\n".join(lines))


def _which(name: str) -> Optional[str]:
    """`name` on $PATH, else in the system binary folders (ldconfig lives in /sbin, often not on a user's PATH)."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(("/usr/sbin", "/sbin"))
    return shutil.which(name, path=path)


def _from_ldconfig() -> Tuple[Optional[str], str]:
    """The path `ldconfig -p` lists for libinstar.so, or None and why not."""
    exe = _which("ldconfig")
    if exe is None:
        return None, "ldconfig not found"
    try:
        out = subprocess.run([exe, "-p"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60,
                             check=False).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError) as e:
        return None, "could not run %s: %s" % (exe, e)
    for line in out.splitlines():
        name, sep, path = line.strip().partition(" => ")
        if sep and name.split(" ", 1)[0] == LIBRARY_NAME:
            return path.strip(), ""
    return None, "%s not in the linker cache" % LIBRARY_NAME


def _from_pkg_config() -> Tuple[Optional[str], str]:
    """libinstar.so in the libdir `pkg-config --variable=libdir instar` names, or None and why not."""
    exe = _which("pkg-config")
    if exe is None:
        return None, "pkg-config not found"
    try:
        r = subprocess.run([exe, "--variable=libdir", "instar"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return None, "could not run %s: %s" % (exe, e)
    libdir = r.stdout.decode("utf-8", "replace").strip()
    if r.returncode != 0 or not libdir:
        why = r.stderr.decode("utf-8", "replace").strip().splitlines()
        return None, "no instar.pc (%s)" % (why[0] if why else "exit status %d" % r.returncode)
    return os.path.join(libdir, LIBRARY_NAME), ""


def _try_load(path: str) -> Tuple[Optional[ctypes.CDLL], str]:
    if not os.path.exists(path):
        return None, "%s: no such file" % path
    try:
        return ctypes.CDLL(path), ""
    except OSError as e:
        return None, str(e)


def locate() -> Tuple[ctypes.CDLL, str]:
    """Finds and loads libinstar.so in the documented order; returns (library, path) or raises
    LibraryNotFoundError."""
    tried: List[Tuple[str, str]] = []
    env = os.environ.get(ENV_VAR)
    if env:
        handle, why = _try_load(env)
        if handle is not None:
            return handle, env
        # An explicit choice that fails is reported, not silently replaced by another copy.
        raise LibraryNotFoundError([("$%s=%s" % (ENV_VAR, env), why)])
    tried.append(("$%s" % ENV_VAR, "not set"))
    handle, why = _try_load(PACKAGE_LIBRARY)
    if handle is not None:
        return handle, PACKAGE_LIBRARY
    tried.append(("the copy inside the package", why))
    for place, finder in (("ldconfig -p", _from_ldconfig), ("pkg-config --variable=libdir instar", _from_pkg_config)):
        path, why = finder()
        if path is not None:
            handle, why = _try_load(path)
            if handle is not None:
                return handle, path
        tried.append((place, why))
    raise LibraryNotFoundError(tried)


def lib() -> ctypes.CDLL:
    """The loaded libinstar.so (found once, see the module's docstring)."""
    global _lib, _lib_path
    if _lib is None:
        with _load_lock:
            if _lib is None:
                handle, path = locate()
                handle.instar_version.restype = ctypes.c_char_p
                handle.instar_version.argtypes = []
                handle.instar_strerror.restype = ctypes.c_char_p
                handle.instar_strerror.argtypes = [ctypes.c_int]
                handle.instar_string_free.argtypes = [ctypes.c_void_p]
                handle.instar_string_free.restype = None
                _lib_path = path
                _lib = handle
    return _lib


def library_path() -> str:
    """The path libinstar.so was loaded from (loading it if needed)."""
    lib()
    assert _lib_path is not None
    return _lib_path


class Error(ctypes.Structure):
    """instar_error_t."""
    _fields_ = [("code", ctypes.c_int32), ("errno_value", ctypes.c_int32), ("message", ctypes.c_char * 1024)]


class Limits(ctypes.Structure):
    """instar_limits_t: the time and memory limits of one call."""
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("timeout_ms", ctypes.c_int64),
                ("cpu_ms", ctypes.c_int64), ("memory_bytes", ctypes.c_int64)]


_limits: "contextvars.ContextVar[Optional[Limits]]" = contextvars.ContextVar("instar_limits", default=None)


class Options(ctypes.Structure):
    """Base of the option structs, which have a ``limits`` member: a struct made inside a :func:`limits` block
    points at that block's limits."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        current = _limits.get()
        if current is not None:
            self.limits = ctypes.pointer(current)  # the pointer object keeps `current` alive with the struct


def _ms(seconds: Optional[float], name: str) -> int:
    if seconds is None:
        return 0
    if not seconds > 0:
        raise ValueError(f"{name} must be a positive number of seconds")
    return max(1, int(seconds * 1000))


@contextlib.contextmanager
def limits(timeout: Optional[float] = None, cpu: Optional[float] = None,
           memory: Optional[int] = None) -> Iterator[None]:
    """Every instar call made in the block (on this thread or asyncio task) stops with :class:`LimitReached`
    once it has run for ``timeout`` seconds, once a thread working for it used ``cpu`` seconds of CPU time, or
    before the metadata it holds for its images (tables, caches, bitmaps, decompression buffers) would pass
    ``memory`` bytes. Each call's clock and memory count start with the call. An image being written is left as a
    crash at that point would leave it (``qemu-img check`` finds leaks at most)."""
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
        raise ValueError("memory must be a positive number of bytes")
    token = _limits.set(Limits(ctypes.sizeof(Limits), 0, _ms(timeout, "timeout"), _ms(cpu, "cpu"), memory or 0))
    try:
        yield
    finally:
        _limits.reset(token)


# ---- errors -----------------------------------------------------------------------------------------------

E_INVALID = -1
E_IO = -2
E_NOT_FOUND = -3
E_CORRUPT = -4
E_UNSUPPORTED = -5
E_LOCKED = -6
E_NOMEM = -7
E_CANCELLED = -8
E_PERMISSION = -9
E_ENCRYPTED = -10
E_CHAIN = -11
E_RANGE = -12
E_LIMIT = -13
E_ISOLATION = -15


class InstarError(Exception):
    """A failed libinstar call: `code` is the INSTAR_E_* value, `message` what qemu-img would print, `errno` the
    system error behind it (0 when none).

    Constructing ``InstarError(code, message)`` gives the subclass for `code` (``NotFound`` for -3, ...), so
    ``except instar.NotFound`` and ``except instar.InstarError`` both catch what the library raises.
    """
    code_value: int = 0

    def __new__(cls, code: int = 0, message: str = "", errno_value: int = 0) -> "InstarError":
        if cls is InstarError:
            cls = ERROR_CLASSES.get(code, InstarError)
        return super().__new__(cls)

    def __init__(self, code: int = 0, message: str = "", errno_value: int = 0) -> None:
        if isinstance(code, str) and not message:  # NotFound("text"): the class gives the code
            code, message = self.code_value, code
        super().__init__(message)
        self.code: int = code
        self.message: str = message
        self.errno: int = errno_value

    def __reduce__(self) -> Tuple[Type["InstarError"], Tuple[int, str, int]]:
        return (InstarError, (self.code, self.message, self.errno))


class Invalid(InstarError):
    """INSTAR_E_INVALID: a bad argument or option."""
    code_value = E_INVALID


class IO(InstarError):
    """INSTAR_E_IO: an I/O system call failed (see `errno`)."""
    code_value = E_IO


class NotFound(InstarError):
    """INSTAR_E_NOT_FOUND: a file, snapshot or bitmap not found."""
    code_value = E_NOT_FOUND


class Corrupt(InstarError):
    """INSTAR_E_CORRUPT: the image is malformed or hostile; nothing was written."""
    code_value = E_CORRUPT


class Unsupported(InstarError):
    """INSTAR_E_UNSUPPORTED: a feature or format that is not supported."""
    code_value = E_UNSUPPORTED


class Locked(InstarError):
    """INSTAR_E_LOCKED: another process holds a conflicting image lock."""
    code_value = E_LOCKED


class NoMemory(InstarError):
    """INSTAR_E_NOMEM: an allocation failed or a header asked for too much memory."""
    code_value = E_NOMEM


class Cancelled(InstarError):
    """INSTAR_E_CANCELLED: the progress callback (or a Cancel token) asked to stop."""
    code_value = E_CANCELLED


class Permission(InstarError):
    """INSTAR_E_PERMISSION: permission denied, or the image is read-only."""
    code_value = E_PERMISSION


class Encrypted(InstarError):
    """INSTAR_E_ENCRYPTED: the image is encrypted and no usable secret was given."""
    code_value = E_ENCRYPTED


class Chain(InstarError):
    """INSTAR_E_CHAIN: the backing chain is broken, loops or is too deep."""
    code_value = E_CHAIN


class OutOfRange(InstarError):
    """INSTAR_E_RANGE: an offset or size is out of range."""
    code_value = E_RANGE


class LimitReached(InstarError):
    """INSTAR_E_LIMIT: the call reached a limit of its :func:`limits` block (time, CPU, memory)."""
    code_value = E_LIMIT


class IsolationFailed(InstarError):
    """INSTAR_E_ISOLATION: the isolated helper could not start, crashed or broke its confinement."""
    code_value = E_ISOLATION


ERROR_CLASSES: Dict[int, Type[InstarError]] = {
    c.code_value: c for c in (Invalid, IO, NotFound, Corrupt, Unsupported, Locked, NoMemory, Cancelled, Permission,
                              Encrypted, Chain, OutOfRange, LimitReached,
                              IsolationFailed)}


def check(rc: int, err: Error) -> None:
    """Raises the InstarError subclass for `rc` (with the message and errno in `err`) unless rc is 0."""
    if rc != 0:
        raise InstarError(rc, err.message.decode("utf-8", "replace"), err.errno_value)


def take_string(ptr: ctypes.c_void_p) -> str:
    """Copies a library-allocated char* into a Python str and frees it."""
    try:
        return str(ctypes.string_at(ptr).decode("utf-8"))
    finally:
        lib().instar_string_free(ptr)


def encode(s: Optional[str]) -> Optional[bytes]:
    """A str argument as the UTF-8 bytes a `const char *` takes (None stays NULL)."""
    return None if s is None else s.encode("utf-8")
