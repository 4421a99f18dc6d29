"""Progress callables and cancellation for the long operations (convert, commit, rebase, amend, compare, dd,
bench).

A long operation takes ``progress`` (a callable given the percentage done, 0.0 to 100.0; a true return cancels)
and ``cancel`` (a :class:`Cancel` token). The library calls back from the thread that runs the operation, with
the GIL released in between, so another thread can call ``token.cancel()`` at any time: the next progress
callback then returns nonzero and the operation fails with :class:`instar.Cancelled`.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable, Optional

PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_double, ctypes.c_void_p)

ProgressCallable = Callable[[float], object]


class Cancel:
    """A cancellation token, safe to share between threads. Pass it as ``cancel=`` to a long operation and call
    :meth:`cancel` from anywhere: the operation stops at its next progress report with :class:`instar.Cancelled`.
    A token stays cancelled; use a new one for the next operation."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Asks every operation using this token to stop."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._event.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until cancelled or `timeout` seconds passed; returns whether it is cancelled."""
        return self._event.wait(timeout)

    def __repr__(self) -> str:
        return "<instar.Cancel %s>" % ("cancelled" if self.cancelled else "active")


def make_progress(callback: Optional[ProgressCallable], cancel: Optional[Cancel] = None) -> Any:
    """The C instar_progress_fn for a Python callable and/or a Cancel token (a NULL pointer for neither).
    A true return of the callable, an exception in it, or a cancelled token stops the operation. Keep the
    returned object alive for the whole call."""
    if callback is None and cancel is None:
        return PROGRESS_FN(0)  # a NULL function pointer

    def fn(percent: float, _data: Optional[int]) -> int:
        if cancel is not None and cancel.cancelled:
            return 1
        if callback is not None:
            try:
                if callback(percent):
                    return 1
            except Exception:
                return 1
        return 1 if cancel is not None and cancel.cancelled else 0
    return PROGRESS_FN(fn)


WARNING_FN = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)

WarningCallable = Callable[[str], object]


def make_warning(callback: Optional[WarningCallable]) -> Any:
    """The C instar_warning_fn for a Python callable given each warning's text (a NULL pointer for None). An
    exception in the callable is dropped: a warning cannot stop the operation. Keep the returned object alive for
    the whole call."""
    if callback is None:
        return WARNING_FN(0)
    report = callback

    def fn(message: Optional[bytes], _data: Optional[int]) -> None:
        try:
            report((message or b"").decode("utf-8", "replace"))
        except Exception:
            pass
    return WARNING_FN(fn)
