"""Reads an `strace -f -y` log for durability: which files under a folder were changed, and whether each was
synced (fdatasync/fsync that succeeded) after its last change finished.

A change is a write-like call that succeeded on a descriptor of the file (write, pwrite64, pwritev, writev,
ftruncate, fallocate, copy_file_range into it) or an open that created or truncated it. A sync counts for
the changes that finished before it started: with -f, a call another thread makes is split into an
`<unfinished ...>` line and a `<... resumed>` line, so a change ends at its resumed line and a sync begins
at its first line. Used by test_create_durability.py; `python3 sync_trace.py LOG DIR` prints the summary.
"""
import os
import re
import sys

SYSCALLS = ("openat,write,pwrite64,pwritev,pwritev2,writev,ftruncate,fallocate,copy_file_range,"
            "fdatasync,fsync,sync_file_range")
CHANGES = {"write", "pwrite64", "pwritev", "pwritev2", "writev", "ftruncate", "fallocate"}
SYNCS = {"fdatasync", "fsync"}

_CALL = re.compile(r"^(\d+)\s+([a-z_0-9]+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. ([a-z_0-9]+) resumed>(.*)$")
_RET = re.compile(r"\)\s+=\s+(-?\d+)(<[^>]*>)?")
_FD = re.compile(r"^-?\d+<([^>]*)>")
_COPY_OUT = re.compile(r"^[^,]*,[^,]*,\s*-?\d+<([^>]*)>")


def strace_argv(log):
    """The strace prefix that writes the log this module reads."""
    return ["strace", "-f", "-y", "-qq", "-e", "trace=" + SYSCALLS, "-o", log]


def _events(lines):
    """(index where the call began, index where it ended, name, args text, return value, returned fd path)."""
    pending = {}
    for i, line in enumerate(lines):
        m = _RESUMED.match(line)
        if m:
            pid, name, rest = m.groups()
            start, args = pending.pop((pid, name), (i, ""))
            r = _RET.search(rest)
            if r:
                yield start, i, name, args + rest, int(r.group(1)), (r.group(2) or "")[1:-1]
            continue
        m = _CALL.match(line)
        if not m:
            continue
        pid, name, rest = m.groups()
        if rest.endswith("<unfinished ...>"):
            pending[(pid, name)] = (i, rest)
            continue
        r = _RET.search(rest)
        if r:
            yield i, i, name, rest, int(r.group(1)), (r.group(2) or "")[1:-1]


def analyse(log, folder):
    """{path: {"changes": n, "syncs": n, "last_change": index, "synced_after": bool}} for files under `folder`."""
    folder = os.path.realpath(folder) + os.sep
    with open(log, errors="replace") as f:
        lines = f.read().splitlines()
    files = {}

    def entry(path):
        return files.setdefault(path, {"changes": 0, "syncs": 0, "last_change": -1, "last_sync": -1})

    for start, end, name, args, ret, retpath in _events(lines):
        if ret < 0:
            continue
        if name == "openat":
            flags = args.split(",")[2] if args.count(",") >= 2 else ""
            if retpath.startswith(folder) and ("O_TRUNC" in flags or "O_CREAT" in flags):
                # Creating or emptying counts as a change only when the file is new or emptied; an O_CREAT
                # open of an existing file changes nothing, but the log cannot tell, so count it.
                e = entry(retpath)
                e["changes"] += 1
                e["last_change"] = max(e["last_change"], end)
            continue
        if name == "copy_file_range":
            m = _COPY_OUT.match(args)
            path = m.group(1) if m else ""
        else:
            m = _FD.match(args)
            path = m.group(1) if m else ""
        if not path.startswith(folder):
            continue
        e = entry(path)
        if name in SYNCS:
            e["syncs"] += 1
            e["last_sync"] = max(e["last_sync"], start)
        elif name in CHANGES or name == "copy_file_range":
            e["changes"] += 1
            e["last_change"] = max(e["last_change"], end)
    for e in files.values():
        e["synced_after"] = e["last_sync"] > e["last_change"]
    return files


def unsynced(files):
    """Paths changed and not synced after their last change."""
    return sorted(p for p, e in files.items() if e["changes"] and not e["synced_after"])


if __name__ == "__main__":
    for p, e in sorted(analyse(sys.argv[1], sys.argv[2]).items()):
        print(f"{os.path.basename(p)}: changes={e['changes']} syncs={e['syncs']} synced_after={e['synced_after']}")
