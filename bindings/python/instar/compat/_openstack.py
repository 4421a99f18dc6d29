"""What the Nova and Cinder drop-ins share: the QemuImgInfo they return, the ProcessExecutionError they raise, and
the translation of a library failure into the error `processutils.execute` raises when qemu-img fails.

When oslo.utils / oslo.concurrency are importable (they always are beside Nova and Cinder) their own classes are
used, so ``isinstance`` checks and ``except processutils.ProcessExecutionError`` in the callers keep working; the
lookalikes below, with the same attributes, stand in only where they are missing.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Dict, List, Optional, Sequence

import instar
from instar.compat.oslo import fill_from_json_dict


def optional(module: str, name: str) -> Any:
    """`module.name` when that module is importable, else None."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


class _QemuImgInfo:
    """oslo_utils.imageutils.QemuImgInfo's attributes, for hosts without oslo.utils."""

    def __init__(self, cmd_output: Optional[str] = None, format: str = "json") -> None:
        self.image: Optional[str] = None
        self.backing_file: Optional[str] = None
        self.backing_file_format: Optional[str] = None
        self.file_format: Optional[str] = None
        self.virtual_size: Optional[int] = None
        self.cluster_size: Optional[int] = None
        self.disk_size: Optional[int] = None
        self.snapshots: List[Dict[str, Any]] = []
        self.encrypted: Optional[str] = None
        self.format_specific: Optional[Dict[str, Any]] = None

    def __str__(self) -> str:
        lines = ["image: %s" % self.image, "file_format: %s" % self.file_format,
                 "virtual_size: %s" % self.virtual_size, "disk_size: %s" % self.disk_size,
                 "cluster_size: %s" % self.cluster_size, "backing_file: %s" % self.backing_file,
                 "backing_file_format: %s" % self.backing_file_format]
        if self.snapshots:
            lines.append("snapshots: %s" % self.snapshots)
        if self.encrypted:
            lines.append("encrypted: %s" % self.encrypted)
        if self.format_specific:
            lines.append("format_specific: %s" % self.format_specific)
        return "\n".join(lines)


QemuImgInfo: Any = optional("oslo_utils.imageutils", "QemuImgInfo") or _QemuImgInfo


def qemu_img_info_from(d: Dict[str, Any]) -> Any:
    """A QemuImgInfo holding what QemuImgInfo(`qemu-img info --output=json` text) holds, filled from the dict
    of the same object (no text is made or parsed)."""
    info = QemuImgInfo()
    fill_from_json_dict(info, d)
    return info


class _ProcessExecutionError(Exception):
    """oslo_concurrency.processutils.ProcessExecutionError's attributes and text, for hosts without it."""

    def __init__(self, stdout: Optional[str] = None, stderr: Optional[str] = None, exit_code: Any = None,
                 cmd: Any = None, description: Optional[str] = None) -> None:
        super().__init__(stdout, stderr, exit_code, cmd, description)
        self.exit_code = exit_code
        self.stderr = stderr
        self.stdout = stdout
        self.cmd = cmd
        self.description = description

    def __str__(self) -> str:
        return ("%s\nCommand: %s\nExit code: %s\nStdout: %r\nStderr: %r"
                % ("Unexpected error while running command." if self.description is None else self.description,
                   self.cmd, "-" if self.exit_code is None else self.exit_code, self.stdout, self.stderr))


ProcessExecutionError: Any = (optional("oslo_concurrency.processutils", "ProcessExecutionError")
                              or _ProcessExecutionError)


def stderr_of(e: instar.InstarError) -> str:
    """What qemu-img prints on stderr for the failure `e` ("qemu-img: " before the message and before each
    further line that is a warning of its own)."""
    lines = e.message.split("\n")
    return "".join("%s%s\n" % ("qemu-img: " if k == 0 or line.startswith("warning: ") else "", line)
                   for k, line in enumerate(lines))


_mask_password = optional("oslo_utils.strutils", "mask_password")


def failed_run(cmd: Sequence[str], stderr: str, exit_code: int = 1) -> Any:
    """The ProcessExecutionError `processutils.execute(*cmd)` raises when qemu-img prints `stderr` and exits
    with `exit_code`: like execute, the command line and the output have their secrets masked
    (oslo_utils.strutils.mask_password, where it is importable: "key-secret=sec0" reads "key-secret=***")."""
    line = " ".join(cmd)
    if _mask_password is not None:
        line, stderr = _mask_password(line), _mask_password(stderr)
    return ProcessExecutionError(stdout="", stderr=stderr, exit_code=exit_code, cmd=line)


def execution_error(cmd: Sequence[str], e: instar.InstarError, exit_code: int = 1) -> Any:
    """The ProcessExecutionError `processutils.execute(*cmd)` raises when qemu-img fails as `e` says."""
    return failed_run(cmd, stderr_of(e), exit_code)


def supports_direct_io(dirpath: str) -> bool:
    """Whether files in `dirpath` open with O_DIRECT (Nova's and Cinder's test before choosing cache=none)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = os.path.join(dirpath, ".instar.directio.test")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | flag, 0o600)
    except OSError:
        return False
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return True
