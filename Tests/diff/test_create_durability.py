"""create is durable: every file a create wrote is flushed (fdatasync/fsync) after its last write, before the
create returns, for each format and the multi-file layouts (vmdk extents, qcow2 data files), from the CLI and
from the C API. Both programs run under strace; the log is read for the guarantee, not for a count of calls,
and qemu-img must give it for the same case too, so the test shows parity with the reference (only raw without
full preallocation is flushed by instar and not by qemu-img, which syncs nothing there: checked as such).
"""
import os
import shutil
import sys
import time

import pytest

from conftest import INSTAR, LIBINSTAR, QEMU_CPU_RACE, QEMU_RETRY_SECONDS, ROOT, qimg, run
import sync_trace

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

SECRET = ["--object", "secret,id=s0,data=pw"]

# (id, create arguments before the file name, file name, size or None, qemu-img flushes what it writes)
CASES = [
    ("raw", ["-f", "raw"], "t.raw", "16M", False),
    ("raw-falloc", ["-f", "raw", "-o", "preallocation=falloc"], "t.raw", "16M", False),
    ("raw-full", ["-f", "raw", "-o", "preallocation=full"], "t.raw", "4M", True),
    ("qcow2", ["-f", "qcow2"], "t.qcow2", "16M", True),
    ("qcow2-backing", ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"], "t.qcow2", None, True),
    ("qcow2-metadata", ["-f", "qcow2", "-o", "preallocation=metadata"], "t.qcow2", "16M", True),
    ("qcow2-falloc", ["-f", "qcow2", "-o", "preallocation=falloc"], "t.qcow2", "16M", True),
    ("qcow2-full", ["-f", "qcow2", "-o", "preallocation=full"], "t.qcow2", "4M", True),
    ("qcow2-data-file", ["-f", "qcow2", "-o", "data_file=t.data"], "t.qcow2", "16M", True),
    ("qcow2-data-file-raw-full", ["-f", "qcow2", "-o", "data_file=t.data,data_file_raw=on,preallocation=full"],
     "t.qcow2", "4M", True),
    ("qcow2-luks", [*SECRET, "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"],
     "t.qcow2", "16M", True),
    ("qcow", ["-f", "qcow"], "t.qcow", "16M", True),
    ("qed", ["-f", "qed", "-b", "base.qcow2", "-F", "qcow2"], "t.qed", None, True),
    ("vmdk", ["-f", "vmdk"], "t.vmdk", "16M", True),
    ("vmdk-split-sparse", ["-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"], "t.vmdk", "5G", True),
    ("vmdk-flat", ["-f", "vmdk", "-o", "subformat=monolithicFlat"], "t.vmdk", "16M", True),
    ("vmdk-split-flat", ["-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"], "t.vmdk", "5G", True),
    ("vmdk-stream", ["-f", "vmdk", "-o", "subformat=streamOptimized"], "t.vmdk", "16M", True),
    ("vpc", ["-f", "vpc"], "t.vpc", "16M", True),
    ("vpc-fixed", ["-f", "vpc", "-o", "subformat=fixed"], "t.vpc", "4M", True),
    ("vhdx", ["-f", "vhdx"], "t.vhdx", "16M", True),
    ("vdi-static", ["-f", "vdi", "-o", "static=on"], "t.vdi", "4M", True),
    ("parallels", ["-f", "parallels"], "t.par", "16M", True),
    ("luks", [*SECRET, "-f", "luks", "-o", "key-secret=s0,iter-time=10"], "t.luks", "16M", True),
]


def traced(argv, folder, log):
    """Runs argv under strace in `folder`; returns (result, files it changed there with their sync state). A qemu
    tool losing its CPU-clock race (LUKS creation) is run again until conftest's deadline, as run() does."""
    deadline = time.monotonic() + QEMU_RETRY_SECONDS
    while True:
        r = run([*sync_trace.strace_argv(log), *argv], cwd=folder)
        if r.rc == 0 or QEMU_CPU_RACE not in r.err or time.monotonic() > deadline:
            return r, sync_trace.analyse(log, folder)


def prepare(tmp, tool):
    """A folder of its own per program, with the backing file the cases name."""
    folder = os.path.join(tmp, tool)
    os.mkdir(folder)
    qimg("create", "-q", "-f", "qcow2", os.path.join(folder, "base.qcow2"), "16M")
    return folder


def names(files):
    return sorted(os.path.basename(p) for p, e in files.items() if e["changes"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_create_flushes_every_file_it_wrote(tmp, case):
    _, opts, name, size, qemu_flushes = case
    tail = [name] + ([size] if size else [])
    q, qfiles = traced(["qemu-img", "create", "-q", *opts, *tail], prepare(tmp, "q"), os.path.join(tmp, "q.log"))
    i, ifiles = traced([INSTAR, "create", "-q", *opts, *tail], prepare(tmp, "i"), os.path.join(tmp, "i.log"))
    assert q.rc == 0 and i.rc == 0, (q, i)
    # The same files written (every extent, the data file), and every one flushed after its last change.
    assert names(ifiles) == names(qfiles), (qfiles, ifiles)
    assert names(ifiles), ifiles
    assert sync_trace.unsynced(ifiles) == [], ifiles
    if qemu_flushes:
        assert sync_trace.unsynced(qfiles) == [], qfiles
    else:
        # qemu-img's file-posix create makes no flush without full preallocation; instar makes one anyway.
        assert [os.path.basename(p) for p in sync_trace.unsynced(qfiles)] == [name], qfiles


def test_c_api_create_flushes_every_file(tmp):
    """instar_create (through the Python binding) runs the same engine: a qcow2 image with an external data file
    has both files flushed, as qemu-img create flushes both."""
    q, qfiles = traced(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "t.qcow2", "16M"],
                       prepare(tmp, "q"), os.path.join(tmp, "q.log"))
    code = ("import instar; instar.create('t.qcow2', 'qcow2', 16 << 20, data_file='t.data'); "
            "instar.create('t.vmdk', 'vmdk', 5 << 30, subformat='twoGbMaxExtentFlat')")
    env = dict(os.environ, INSTAR_LIBRARY=LIBINSTAR, PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.path.join(ROOT, "bindings", "python"))
    folder = prepare(tmp, "i")
    log = os.path.join(tmp, "i.log")
    r = run([*sync_trace.strace_argv(log), sys.executable, "-c", code], cwd=folder, env=env)
    assert r.rc == 0 and q.rc == 0, (q, r)
    ifiles = sync_trace.analyse(log, folder)
    assert sync_trace.unsynced(qfiles) == [] and names(qfiles) == ["t.data", "t.qcow2"], qfiles
    assert names(ifiles) == ["t-f001.vmdk", "t-f002.vmdk", "t-f003.vmdk", "t.data", "t.qcow2", "t.vmdk"], ifiles
    assert sync_trace.unsynced(ifiles) == [], ifiles


def test_trace_reader_orders_by_completion(tmp):
    """The log reader itself: a flush counts only for changes finished before it began, a failed flush counts for
    nothing, and creating a file is a change to it (so a file created and never written must be flushed too)."""
    d = os.path.realpath(tmp)
    log = os.path.join(tmp, "x.log")
    with open(log, "w") as f:
        f.write(f'1 openat(AT_FDCWD</>, "a", O_RDWR|O_CREAT|O_CLOEXEC, 0644) = 3<{d}/a>\n'
                f'1 openat(AT_FDCWD</>, "b", O_RDWR|O_CREAT|O_CLOEXEC, 0644) = 4<{d}/b>\n'
                f'1 openat(AT_FDCWD</>, "c", O_RDWR|O_CREAT|O_CLOEXEC, 0644) = 5<{d}/c>\n'
                f'2 pwrite64(3<{d}/a>, "x", 1, 0 <unfinished ...>\n'
                f'1 fdatasync(3<{d}/a>) = 0\n'
                f'2 <... pwrite64 resumed>) = 1\n'
                f'1 pwrite64(4<{d}/b>, "x", 1, 0) = 1\n'
                f'1 fdatasync(4<{d}/b>) = -1 EIO (Input/output error)\n'
                f'1 ftruncate(5<{d}/c>, 512) = 0\n'
                f'2 fsync(5<{d}/c> <unfinished ...>\n'
                f'2 <... fsync resumed>) = 0\n'
                f'1 write(1</dev/pts/0>, "x", 1) = 1\n')
    files = sync_trace.analyse(log, tmp)
    assert [os.path.basename(p) for p in sync_trace.unsynced(files)] == ["a", "b"], files
    assert sorted(os.path.basename(p) for p in files) == ["a", "b", "c"], files
