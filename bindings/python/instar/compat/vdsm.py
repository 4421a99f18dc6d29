"""A drop-in for VDSM's ``vdsm.storage.qemuimg``, answered by libinstar's calls instead of a qemu-img process.

Switch VDSM over with one line (where it imports the module)::

    from instar.compat import vdsm as qemuimg      # was: from vdsm.storage import qemuimg

The public names, arguments, return values and exceptions are VDSM's:

- ``info``, ``measure``, ``check``, ``map`` return what VDSM returns (qemu-img's JSON objects as dicts with
  qemu-img's keys; ``check`` gives ``{"offset": image-end-offset}``), ``amend`` and ``resize`` return None;
- ``create``, ``rebase``, ``compare``, ``bitmap_add``, ``bitmap_remove``, ``bitmap_merge`` and ``bitmap_update``
  return a :class:`Command`; ``convert`` and ``commit`` a :class:`ProgressCommand` (with ``progress``). Nothing runs
  until ``run()``; ``abort()`` may be called from any thread: it cancels the library call through its cancellation
  token (no signal, no process), and ``run()`` then raises :class:`ActionStopped`;
- a failure raises :class:`Error` with VDSM's attributes ``cmd`` (the qemu-img command line VDSM would have run),
  ``rc`` (qemu-img's exit status for that failure), ``out`` and ``err`` (bytes; ``err`` is the message qemu-img
  prints on stderr). When VDSM itself is importable, :class:`Error` derives from ``vdsm.common.cmdutils.Error`` and
  :class:`ActionStopped` is ``vdsm.common.exception.ActionStopped``, so VDSM's ``except`` clauses catch them.

``trusted_image=False`` (``info``): VDSM runs qemu-img under prlimit (30 s of CPU, 1 GiB of address space) because
qemu's parsers were not hardened. libinstar bounds every size and count it reads from an image before allocating
and rejects hostile images with an error (never a crash of the host process), whatever ``trusted_image`` says;
with ``trusted_image=False`` the call also runs under the library's CPU limit of 30 s and its memory budget of
256 MiB for image metadata (``instar.limits``, the counterpart of the 1 GiB of address space: the metadata is what
a hostile header can make grow), and fails as qemu-img killed by prlimit would (a ``cmdutils.Error``).

Differences from running qemu-img: the operations do not change the process's working directory (VDSM runs some
commands in the image's folder; this only matters for relative image paths, which VDSM does not use), and
``Command.run()`` returns what qemu-img prints on stdout for ``create`` (its "Formatting ..." line) and ``compare``
(its progress records and verdict), and b"" for the others, which print nothing without -p.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import struct
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

import instar
from instar import limits
from instar.compat._info import info_dicts

_log = logging.getLogger("storage.qemuimg")

_QEMU_IMG = "qemu-img"
# The CPU time VDSM gives `qemu-img info` of an untrusted image (its prlimit --cpu=30).
UNTRUSTED_CPU_SECONDS = 30
# The memory budget for the metadata of an untrusted image (the counterpart of prlimit --as=1GiB).
UNTRUSTED_MEMORY_BYTES = 256 << 20


class FORMAT:
    """The image formats VDSM names."""
    QCOW2 = "qcow2"
    QCOW = "qcow"
    QED = "qed"
    RAW = "raw"
    VMDK = "vmdk"


_QCOW2_COMPAT_SUPPORTED = ("0.10", "1.1")


class PREALLOCATION:
    """The preallocation modes VDSM passes to qemu-img."""
    OFF = "off"
    METADATA = "metadata"
    FALLOC = "falloc"
    FULL = "full"


def _optional(module: str, name: str) -> Any:
    """`module.name` when that module is importable (VDSM installed), else None."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


if TYPE_CHECKING:
    _ErrorBase = Exception
    _StoppedBase = Exception
else:
    _ErrorBase = _optional("vdsm.common.cmdutils", "Error") or Exception
    _StoppedBase = Exception


class Error(_ErrorBase):
    """A failed operation, as VDSM's ``cmdutils.Error``: ``cmd`` (list of str), ``rc`` (int), ``out`` and ``err``
    (bytes)."""
    msg = "Command {self.cmd} failed with rc={self.rc} out={self.out!r} err={self.err!r}"

    def __init__(self, cmd: Sequence[str], rc: int, out: bytes, err: bytes) -> None:
        Exception.__init__(self, cmd, rc, out, err)
        self.cmd = list(cmd)
        self.rc = rc
        self.out = out
        self.err = err

    def __str__(self) -> str:
        return self.msg.format(self=self)


class InvalidOutput(Error):
    """VDSM's InvalidOutput: the answer lacks a field VDSM needs (``cmd``, ``out``, ``reason``)."""
    msg = "Commmand {self.cmd} returned invalid output: {self.out}: {self.reason}"

    def __init__(self, cmd: Sequence[str], out: bytes, reason: str) -> None:
        Error.__init__(self, cmd, 0, out, b"")
        self.reason = reason


class _ActionStopped(_StoppedBase):
    """The operation was aborted (VDSM's ``exception.ActionStopped``, code 443)."""
    code = 443
    msg = "Action was stopped"

    def __str__(self) -> str:
        return self.msg


ActionStopped: Any = _optional("vdsm.common.exception", "ActionStopped") or _ActionStopped


class InvalidConfiguration(ValueError):
    """The configured irs:qcow2_compat is not supported (VDSM's exception.InvalidConfiguration)."""


def supports_compat(compat: Optional[str]) -> bool:
    """Whether `compat` is a qcow2 compat level VDSM supports ("0.10", "1.1")."""
    return compat in _QCOW2_COMPAT_SUPPORTED


def default_qcow2_compat() -> str:
    """VDSM's configured irs:qcow2_compat when VDSM is installed, else its default, "1.1"."""
    config = _optional("vdsm.config", "config")
    value = "1.1" if config is None else str(config.get("irs", "qcow2_compat"))
    if value not in _QCOW2_COMPAT_SUPPORTED:
        raise InvalidConfiguration("Unsupported value for irs:qcow2_compat: %r (supported: %r)"
                                   % (value, _QCOW2_COMPAT_SUPPORTED))
    return value


def _validate_qcow2_compat(value: Optional[str]) -> str:
    if value is None:
        return default_qcow2_compat()
    if value not in _QCOW2_COMPAT_SUPPORTED:
        raise ValueError("Invalid compat version %r" % value)
    return value


def _get_preallocation(value: str, format: Optional[str]) -> str:
    if value not in (PREALLOCATION.OFF, PREALLOCATION.FALLOC, PREALLOCATION.FULL, PREALLOCATION.METADATA):
        raise ValueError("Invalid preallocation type %r" % value)
    if value == PREALLOCATION.METADATA and format not in (FORMAT.QCOW2, FORMAT.QCOW):
        raise ValueError("Unsupported preallocation mode %r for format %r" % (value, format))
    return value


# ---- errors -------------------------------------------------------------------------------------------------

def _stderr(e: instar.InstarError, warning: bytes = b"") -> bytes:
    """What qemu-img prints on stderr for the failure `e`: "qemu-img: " before the message, and before each
    further line that is a warning of its own ("warning: ..."; other further lines belong to the first message
    and carry no prefix), after the probing warning `warning` when there is one."""
    lines = e.message.split("\n")
    text = "".join("%s%s\n" % ("qemu-img: " if k == 0 or line.startswith("warning: ") else "", line)
                   for k, line in enumerate(lines))
    return warning + text.encode("utf-8", "surrogateescape")


_RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be "
    "restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


def _probe_warning(path: str, format: Optional[str]) -> bytes:
    """The warning qemu-img prints before anything else when it opens `path` for writing without a format and
    probing finds raw (b"" otherwise)."""
    if format:
        return b""
    try:
        probed = instar.info(path, force_share=True)
    except instar.InstarError:
        return b""
    if isinstance(probed, list) or probed.format != "raw":
        return b""
    return (_RAW_PROBE_WARNING % path).encode("utf-8", "surrogateescape")


def _error(cmd: Sequence[str], e: instar.InstarError, rc: int = 1, out: bytes = b"", warning: bytes = b"") -> Error:
    return Error(cmd, rc, out, _stderr(e, warning))


def _call(cmd: Sequence[str], fn: Callable[..., Any], *args: Any, _writes: Optional[str] = None,
          _format: Optional[str] = None, **kw: Any) -> Any:
    """fn(*args, **kw), an InstarError turned into the Error VDSM would have raised (qemu-img's status 1).
    `_writes` names the image the call opens for writing with the format `_format` (None: probed)."""
    try:
        return fn(*args, **kw)
    except instar.Cancelled:
        raise
    except instar.InstarError as e:
        warning = b"" if _writes is None else _probe_warning(_writes, _format)
        raise _error(cmd, e, warning=warning) from e


# ---- operations ---------------------------------------------------------------------------------------------

_CREATED, _RUNNING, _TERMINATED, _ABORTING, _ABORTED = "created", "running", "terminated", "aborting", "aborted"


class Command:
    """An operation run by :meth:`run` (once), abortable from any thread with :meth:`abort`, like VDSM's
    ``storage.operation.Command``; the work is a library call instead of a process."""

    def __init__(self, cmd: Sequence[str], work: Callable[[instar.Cancel, Callable[[float], None]], bytes],
                 cwd: Optional[str] = None) -> None:
        self._cmd = list(cmd)
        self._cwd = cwd
        self._work = work
        self._lock = threading.Lock()
        self._state = _CREATED
        self._cancel = instar.Cancel()

    def _progress(self, percent: float) -> None:
        pass

    def run(self) -> bytes:
        """Runs the operation; returns what qemu-img prints on stdout (see the module's notes).

        Raises RuntimeError when run twice, ActionStopped when aborted, Error when the operation failed."""
        with self._lock:
            if self._state == _ABORTED:
                raise ActionStopped()
            if self._state != _CREATED:
                raise RuntimeError("Attempt to run an operation twice")
            self._state = _RUNNING
        failure: Optional[BaseException] = None
        out = b""
        try:
            out = self._work(self._cancel, self._progress)
        except instar.Cancelled as e:
            failure = e
        except BaseException as e:  # handed on below, after the state is settled
            failure = e
        with self._lock:
            if self._state == _ABORTING:
                self._state = _ABORTED
                raise ActionStopped()
            self._state = _TERMINATED
        if isinstance(failure, instar.Cancelled):
            raise _error(self._cmd, failure)
        if failure is not None:
            raise failure
        return out

    def watch(self) -> Any:
        """VDSM's Command.watch(): runs the operation; yields nothing (there is no process output to stream)."""
        self.run()
        return iter(())

    def abort(self) -> None:
        """Asks the operation to stop; safe from any thread and more than once. Returns at once: the thread in
        run() gets ActionStopped when the library call has stopped. An operation not started yet never runs."""
        with self._lock:
            if self._state == _CREATED:
                self._state = _ABORTED
            elif self._state in (_RUNNING, _ABORTING):
                self._state = _ABORTING
                self._cancel.cancel()

    def __repr__(self) -> str:
        return "<Command %s %s, cwd=%s at %#x>" % (self._cmd, self._state, self._cwd, id(self))


class ProgressCommand(Command):
    """A :class:`Command` that reports ``progress`` (0.0 to 100.0) while it runs, as VDSM's ProgressCommand."""

    def __init__(self, cmd: Sequence[str], work: Callable[[instar.Cancel, Callable[[float], None]], bytes],
                 cwd: Optional[str] = None) -> None:
        super().__init__(cmd, work, cwd)
        self._progress_value = 0.0

    def _progress(self, percent: float) -> None:
        # qemu-img -p prints two decimals, which is what VDSM reads back
        self._progress_value = round(float(percent), 2)

    def run(self) -> None:  # type: ignore[override]
        """Runs the operation (VDSM's ProgressCommand.run() returns nothing); raises as Command.run()."""
        super().run()

    @property
    def progress(self) -> float:
        """The operation's progress, 0.0 to 100.0; safe to read from any thread."""
        return self._progress_value


class _ProgressText:
    """The records `qemu-img -p` prints on stdout for a run of progress reports: a value is printed when it moved
    more than `min_skip` from the last one printed, or is 0 or 100."""

    def __init__(self, min_skip: float) -> None:
        self._min_skip = min_skip
        self._last: Optional[float] = None
        self._records: List[bytes] = []

    def report(self, percent: float) -> None:
        last = 0.0 if self._last is None else self._last
        if (self._last is None or percent > last + self._min_skip or percent < last - self._min_skip
                or percent in (0.0, 100.0)):
            self._last = percent
            self._records.append(b"    (%3.2f/100%%)\r" % percent)

    def text(self, message: str = "", common_share: float = 100.0) -> bytes:
        """The records and then `message`; a leading "Warning: Image size mismatch!" line of `message` goes
        where qemu-img prints it, after the records of the part both images have (`common_share` percent)."""
        warning = "Warning: Image size mismatch!\n"
        if not message.startswith(warning):
            return b"".join(self._records) + message.encode("utf-8")
        before = [r for r in self._records if float(r.strip()[1:].split(b"/")[0]) <= common_share]
        after = self._records[len(before):]
        return (b"".join(before) + warning.encode() + b"".join(after) +
                message[len(warning):].encode("utf-8"))


def _common_share(img1: str, img2: str, fmt1: Optional[str], fmt2: Optional[str]) -> float:
    """The share (percent) of the larger image that both images cover, as qemu-img compare's progress counts
    it."""
    try:
        sizes = [instar.info(p, format=f or None, force_share=True) for p, f in ((img1, fmt1), (img2, fmt2))]
    except instar.InstarError:
        return 100.0
    a, b = (x.virtual_size if not isinstance(x, list) else 0 for x in sizes)
    return 100.0 if max(a, b) == 0 else float(_single(min(a, b) / max(a, b) * 100))


def _single(v: float) -> float:
    """`v` rounded to single precision, the float qemu's progress counter keeps."""
    return float(struct.unpack("f", struct.pack("f", v))[0])


def _cwd_for(backing: Optional[str], image: str) -> Optional[str]:
    return None if backing is None or os.path.isabs(backing) else os.path.dirname(image)


# ---- the module's functions ---------------------------------------------------------------------------------

def info(image: str, format: Optional[str] = None, unsafe: bool = False, trusted_image: bool = True,
         backing_chain: bool = False) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """What ``qemu-img info --output json`` reports, as the dict VDSM returns (with backing_chain a list, top
    image first). ``unsafe`` is -U (force share). See the module's notes for ``trusted_image``."""
    cmd = [_QEMU_IMG, "info", "--output", "json"]
    if format:
        cmd += ["-f", format]
    if unsafe:
        cmd.append("-U")
    if backing_chain:
        cmd.append("--backing-chain")
    cmd.append(image)
    budget = contextlib.nullcontext() if trusted_image else limits(cpu=UNTRUSTED_CPU_SECONDS,
                                                                    memory=UNTRUSTED_MEMORY_BYTES)
    with budget:
        dicts: List[Dict[str, Any]] = _call(cmd, info_dicts, image, format=format or None, force_share=unsafe,
                                            backing_chain=backing_chain)
    for d in dicts:
        for key in ("virtual-size", "format"):
            if key not in d:
                raise InvalidOutput(cmd, b"", "Missing field: %r" % key)
    return dicts if backing_chain else dicts[0]


def measure(image: str, format: Optional[str] = None, output_format: Optional[str] = None, backing: bool = True,
            is_block: bool = False) -> Dict[str, Any]:
    """What ``qemu-img measure --output json`` reports for `image` converted to `output_format` (raw when None):
    {"required", "fully-allocated"[, "bitmaps"]}. ``backing=False`` (which needs `format`) measures a qcow2 image
    without its backing chain; ``is_block`` says the image is a block device (the same call reads both)."""
    if not format and not backing:
        raise ValueError("backing=False requires specifying image format")
    node: Dict[str, Any] = {"file": {"driver": "host_device" if is_block else "file", "filename": image}}
    if format:
        node["driver"] = format
        if format == FORMAT.QCOW2 and not backing:
            node["backing"] = None
    cmd = [_QEMU_IMG, "measure", "--output", "json"]
    if output_format:
        cmd += ["-O", output_format]
    cmd.append("json:" + _json_text(node))
    # the same json: pseudo-filename VDSM hands qemu-img, so the library opens the image (and its backing chain,
    # or not with "backing": null) exactly as qemu-img does, and names it alike in errors
    result: Dict[str, Any] = _call(cmd, instar.measure, cmd[-1], out_fmt=output_format or "raw")
    return result


def _json_text(node: Dict[str, Any]) -> str:
    """The json: filename VDSM builds (json.dumps spelling), written without parsing anything."""
    return json.dumps(node)


def create(image: str, size: Optional[int] = None, format: Optional[str] = None, qcow2Compat: Optional[str] = None,
           backing: Optional[str] = None, backingFormat: Optional[str] = None, preallocation: Optional[str] = None,
           unsafe: bool = False) -> Command:
    """A Command creating `image` like ``qemu-img create``: qcow2 images get ``compat`` (`qcow2Compat`, else the
    configured default), `backing`/`backingFormat` are -b/-F, `unsafe` is -u (the backing file is not opened)."""
    cmd = [_QEMU_IMG, "create"]
    opts: Dict[str, str] = {}
    if format:
        cmd += ["-f", format]
        if format == FORMAT.QCOW2:
            qcow2Compat = _validate_qcow2_compat(qcow2Compat)
            cmd += ["-o", "compat=" + qcow2Compat]
            opts["compat"] = qcow2Compat
    if backing:
        cmd += ["-b", backing]
    if backingFormat:
        cmd += ["-F", backingFormat]
    if preallocation:
        value = _get_preallocation(preallocation, format)
        cmd += ["-o", "preallocation=" + value]
        opts["preallocation"] = value
    if unsafe:
        cmd.append("-u")
    cmd.append(image)
    if size is not None:
        cmd.append(str(size))

    def work(cancel: instar.Cancel, progress: Callable[[float], None]) -> bytes:
        try:
            line = instar.create_formatting(image, format or "raw", None if size is None else int(size),
                                            backing_file=backing or None, backing_format=backingFormat or None,
                                            no_backing_open=unsafe, **opts)
        except instar.InstarError as e:
            out = getattr(e, "output", None) or ""
            raise _error(cmd, e, out=out.encode("utf-8", "surrogateescape")) from e
        return line.encode("utf-8", "surrogateescape")
    return Command(cmd, work, cwd=_cwd_for(backing, image))


def check(image: str, format: Optional[str] = None) -> Dict[str, int]:
    """``qemu-img check``: {"offset": the image's end offset}. Leaked clusters (qemu-img's status 3) are only
    logged; corruption (2), check errors (1) or an image format without checks (63) raise Error."""
    cmd = [_QEMU_IMG, "check", "--output", "json"]
    if format:
        cmd += ["-f", format]
    cmd.append(image)
    try:
        r, report, messages = instar.check_report(image, format=format or None)
    except instar.Unsupported as e:
        raise _error(cmd, e, rc=63) from e
    except instar.InstarError as e:
        raise _error(cmd, e) from e
    if r.exit_code not in (0, 3):
        raise Error(cmd, r.exit_code, report.encode("utf-8"), messages.encode("utf-8", "surrogateescape"))
    if r.leaks:
        _log.warning("%d leaked clusters found on the image", r.leaks)
    if r.image_end_offset is None:
        raise InvalidOutput(cmd, b"", "unable to parse qemu-img check output")
    return {"offset": r.image_end_offset}


def convert(srcImage: str, dstImage: str, srcFormat: Optional[str] = None, dstFormat: Optional[str] = None,
            dstQcow2Compat: Optional[str] = None, backing: Optional[str] = None, backingFormat: Optional[str] = None,
            preallocation: Optional[str] = None, compressed: bool = False, unordered_writes: bool = False,
            create: bool = True, bitmaps: bool = False, target_is_zero: bool = False) -> ProgressCommand:
    """A ProgressCommand converting like VDSM's ``qemu-img convert -p -t none -T none``. With ``create=False``
    the target exists (-n) and `backing` is -B; `target_is_zero` (-n without backing) skips zeroing it."""
    cmd = [_QEMU_IMG, "convert", "-p", "-t", "none", "-T", "none"]
    options: List[str] = []
    if srcFormat:
        cmd += ["-f", srcFormat]
    if dstFormat:
        cmd += ["-O", dstFormat]
        if create:
            if dstFormat == FORMAT.QCOW2:
                options.append("compat=" + _validate_qcow2_compat(dstQcow2Compat))
            if preallocation:
                options.append("preallocation=" + _get_preallocation(preallocation, dstFormat))
    backing_arg: Optional[str] = None
    if backing:
        if create:
            options.append("backing_file=" + str(backing))
            if backingFormat:
                options.append("backing_fmt=" + str(backingFormat))
        else:
            cmd += ["-B", backing]
            backing_arg = backing
    zero = False
    if create:
        if options:
            cmd += ["-o", ",".join(options)]
    else:
        cmd.append("-n")
        if backing is None and target_is_zero:
            cmd.append("--target-is-zero")
            zero = True
    if compressed:
        cmd.append("-c")
    if unordered_writes:
        cmd.append("-W")
    if bitmaps:
        cmd.append("--bitmaps")
    cmd += [srcImage, dstImage]

    def work(cancel: instar.Cancel, progress: Callable[[float], None]) -> bytes:
        _call(cmd, instar.convert, srcImage, dstImage, source_format=srcFormat or None, fmt=dstFormat or None,
              no_create=not create, target_is_zero=zero, source_cache="none", target_cache="none",
              options=",".join(options) or None, compress=compressed, backing_file=backing_arg,
              unordered_writes=unordered_writes, bitmaps=bitmaps, progress=progress, cancel=cancel)
        return b""
    return ProgressCommand(cmd, work, cwd=_cwd_for(backing, srcImage))


def commit(top: str, topFormat: str, base: Optional[str] = None) -> ProgressCommand:
    """A ProgressCommand committing `top` into `base` (or its backing file) like ``qemu-img commit -p -t none``;
    without `base` the top is left as it is (-d)."""
    cmd = [_QEMU_IMG, "commit", "-p", "-t", "none"]
    if base:
        cmd += ["-b", base]
    else:
        cmd.append("-d")
    cmd += ["-f", topFormat, top]

    def work(cancel: instar.Cancel, progress: Callable[[float], None]) -> bytes:
        _call(cmd, instar.commit, top, base=base or None, drop=not base, fmt=topFormat, cache="none",
              progress=progress, cancel=cancel)
        return b""
    return ProgressCommand(cmd, work, cwd=os.path.dirname(top))


def map(image: str) -> List[Dict[str, Any]]:
    """The extents ``qemu-img map --output json`` reports, as a list of dicts with qemu-img's keys."""
    cmd = [_QEMU_IMG, "map", "--output", "json", image]
    result: List[Dict[str, Any]] = _call(cmd, instar.map, image)
    return result


def amend(image: str, compat: str) -> None:
    """Changes a qcow2 image's compat level (``qemu-img amend -o compat=...``)."""
    if compat not in _QCOW2_COMPAT_SUPPORTED:
        raise ValueError("Invalid compat version %r" % compat)
    cmd = [_QEMU_IMG, "amend", "-o", "compat=" + compat, image]
    _call(cmd, instar.amend, image, "compat=" + compat, _writes=image)


def resize(image: str, newSize: Union[int, str], format: Optional[str] = None) -> None:
    """Sets the image's virtual size (``qemu-img resize [-f FORMAT] IMAGE SIZE``); growing only, as qemu-img
    without --shrink."""
    cmd = [_QEMU_IMG, "resize"]
    if format:
        cmd += ["-f", format]
    cmd += [image, str(newSize)]
    _call(cmd, instar.resize, image, newSize, fmt=format or None, _writes=image, _format=format)


def rebase(image: str, backing: str, format: Optional[str] = None, backingFormat: Optional[str] = None,
           unsafe: bool = False) -> Command:
    """A Command rebasing `image` onto `backing` like ``qemu-img rebase -t none -T none [-u]``."""
    cmd = [_QEMU_IMG, "rebase", "-t", "none", "-T", "none"]
    if unsafe:
        cmd.append("-u")
    if format:
        cmd += ["-f", format]
    if backingFormat:
        cmd += ["-F", backingFormat]
    cmd += ["-b", backing, image]

    def work(cancel: instar.Cancel, progress: Callable[[float], None]) -> bytes:
        _call(cmd, instar.rebase, image, backing, backing_format=backingFormat or None, unsafe=unsafe,
              fmt=format or None, cache="none", source_cache="none", progress=progress, cancel=cancel,
              _writes=image, _format=format)
        return b""
    return Command(cmd, work, cwd=_cwd_for(backing, image))


def compare(img1: str, img2: str, img1_format: Optional[str] = None, img2_format: Optional[str] = None,
            strict: bool = False) -> Command:
    """A Command comparing two images like ``qemu-img compare``: run() returns qemu-img's verdict line when
    they are identical and raises Error with rc 1 (and the verdict in ``out``) when they differ."""
    cmd = [_QEMU_IMG, "compare", "-p"]
    if img1_format:
        cmd += ["-f", img1_format]
    if img2_format:
        cmd += ["-F", img2_format]
    if strict:
        cmd.append("-s")
    cmd += [img1, img2]

    def work(cancel: instar.Cancel, progress: Callable[[float], None]) -> bytes:
        printed = _ProgressText(2.0)

        def report(percent: float) -> None:
            printed.report(percent)
            progress(percent)
        try:
            r = instar.compare_result(img1, img2, format1=img1_format or None, format2=img2_format or None,
                                      strict=strict, progress=report, cancel=cancel)
        except instar.Cancelled:
            raise
        except instar.InstarError as e:
            raise _error(cmd, e, rc=2, out=printed.text() + b"\n") from e
        out = printed.text(r.message, _common_share(img1, img2, img1_format, img2_format)) + b"\n"
        if not r.identical:
            raise Error(cmd, 1, out, b"")
        return out
    return Command(cmd, work, cwd=os.path.dirname(img1))


def _bitmap_command(cmd: List[str], image: str, name: str, *actions: Any, **kw: Any) -> Command:
    def work(cancel: instar.Cancel, progress: Callable[[float], None]) -> bytes:
        _call(cmd, instar.bitmap, image, name, *actions, _writes=image, **kw)
        return b""
    return Command(cmd, work, cwd=os.path.dirname(image))


def bitmap_add(image: str, bitmap: str, enable: bool = True, granularity: Optional[int] = None) -> Command:
    """A Command adding the persistent dirty bitmap `bitmap` to a qcow2 image (enabled unless `enable` is false;
    `granularity` in bytes, qemu's default when None)."""
    cmd = [_QEMU_IMG, "bitmap", "--add", "--enable" if enable else "--disable", image, bitmap]
    if granularity:
        cmd += ["-g", str(granularity)]
    actions = ("add",) if enable else ("add", "disable")
    return _bitmap_command(cmd, image, bitmap, *actions, granularity=int(granularity or 0))


def bitmap_remove(image: str, bitmap: str) -> Command:
    """A Command removing the bitmap `bitmap` from `image`."""
    return _bitmap_command([_QEMU_IMG, "bitmap", "--remove", image, bitmap], image, bitmap, "remove")


def bitmap_merge(src_image: str, src_bitmap: str, src_fmt: str, dst_image: str, dst_bitmap: str) -> Command:
    """A Command merging `src_bitmap` of `src_image` (format `src_fmt`) into `dst_bitmap` of `dst_image`."""
    cmd = [_QEMU_IMG, "bitmap", "--merge", src_bitmap, "-F", src_fmt, "-b", src_image, dst_image, dst_bitmap]
    c = _bitmap_command(cmd, dst_image, dst_bitmap, ("merge", src_bitmap), source=src_image, source_fmt=src_fmt)
    c._cwd = os.path.dirname(src_image)
    return c


def bitmap_update(image: str, bitmap: str, enable: bool) -> Command:
    """A Command enabling or disabling the bitmap `bitmap` of `image`."""
    cmd = [_QEMU_IMG, "bitmap", "--enable" if enable else "--disable", image, bitmap]
    return _bitmap_command(cmd, image, bitmap, "enable" if enable else "disable")


def bitmaps_supported() -> bool:
    """Whether the bitmap operations work: always, libinstar has them (VDSM asks qemu-img for version >= 5.1)."""
    return True


def target_is_zero_supported() -> bool:
    """Whether convert honours target_is_zero: always (qemu-img's --target-is-zero)."""
    return True


__all__ = [
    "FORMAT", "PREALLOCATION", "Error", "InvalidOutput", "ActionStopped", "InvalidConfiguration", "Command",
    "ProgressCommand", "supports_compat", "default_qcow2_compat", "info", "measure", "create", "check", "convert",
    "commit", "map", "amend", "resize", "rebase", "compare", "bitmap_add", "bitmap_remove", "bitmap_merge",
    "bitmap_update", "bitmaps_supported", "target_is_zero_supported",
]
