"""Fault injection on the write path (issue 14): EIO, ENOSPC and short writes at each write-type call of every
writable format's writes, resize, commit, check repair, create (each format's typical options) and qcow2's
snapshot and bitmap steps.

`Tests/fault/faultinject.c` is an LD_PRELOAD shim (built here with gcc) that counts the write-type calls
(pwrite, write, pwritev, ftruncate, fallocate, fsync, fdatasync, copy_file_range, ...) on the image files and
makes call number N fail: with EIO once (a transient error), with ENOSPC from then on (a full disk), or as a
short write cut at a 4 KiB boundary followed by ENOSPC (the disk filling up inside a write). A clean run counts
the calls K of each operation; then the operation is run with the fault at N for a sample of 1..K, the modes
taking turns (every N in every mode with FAULTINJ_FULL=1; FAULTINJ_REPORT=file appends the counts per case).

After each faulted run:
- instar exits nonzero with a message on its last line of stderr (no signal, no Swift trap), or exits as the
  clean run did and the result is exactly the clean run's;
- `qemu-img check` finds no corruption (leaks allowed) where the format has a check, and the image opens with
  qemu-img where it has none. An image left carrying its format's crash flag (qcow2's dirty bit, qed's
  need-check bit, parallels' in-use mark, a vhdx log) is first repaired as qemu requires before any read/write
  use (`check -r all`; for parallels only the in-use mark may be reported before that);
- the guest contents are what the operation promises: every sector the old or the new contents (writes), the old
  size and contents or the new ones (resize), the top's view unchanged and the base's sectors old or new (commit),
  the guest view unchanged (check repair, snapshot create/delete, bitmaps) or the snapshot's (revert), and every
  snapshot left in the table reads as it was taken.
A create has nothing to keep: a failed one may leave a partial file (qemu-img does too), so only the message and
the exit code are checked; one that exits 0 must have made the clean run's image (`info`, `check`, contents).
"""
import concurrent.futures
import json
import os
import shutil
import struct

import pytest

from compat_helpers import leak_one_cluster
from conftest import INSTAR, ROOT, qimg, qemu_io, run

MiB = 1 << 20
SEC = ("--object", "secret,id=sec0,data=fault-pass")
FULL = os.environ.get("FAULTINJ_FULL") == "1"
SAMPLE = 12          # injection points per format and operation, spread over 1..K (all of them with FAULTINJ_FULL)
MODES = ("eio", "enospc", "short")
CHECKABLE = {"qcow2", "qed", "vmdk", "vhdx", "vdi", "parallels"}  # formats qemu-img check supports


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("faultshim"))
    so = os.path.join(d, "faultinject.so")
    cc = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    assert cc, "no C compiler for the fault-injection shim"
    r = run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", so,
             os.path.join(ROOT, "Tests", "fault", "faultinject.c"), "-ldl"])
    assert r.rc == 0, r
    return so


def spec(fmt, path):
    """The --image-opts name of an image (luks with its secret)."""
    s = f"driver={fmt},file.filename={path}"
    return s + ",key-secret=sec0" if fmt == "luks" else s


def create(fmt, path, size, *extra):
    if fmt == "luks":
        qimg("create", "-q", "-f", "luks", *SEC, "-o", "key-secret=sec0,iter-time=10", path, str(size))
    else:
        qimg("create", "-q", "-f", fmt, *extra, path, str(size))


def io(fmt, path, *cmds):
    args = [a for c in cmds for a in ("-c", c)]
    qemu_io(*SEC, "--image-opts", spec(fmt, path), *args)


def vsize(fmt, path):
    r = run(["qemu-img", "info", "--output=json", *SEC, "--image-opts", spec(fmt, path)])
    assert r.rc == 0, r
    return json.loads(r.out)["virtual-size"]


def guest(fmt, path, out, snapshot=None):
    """The guest bytes of an image, read by qemu-img (None if qemu-img cannot read it)."""
    if os.path.exists(out):
        os.unlink(out)
    extra = ["-l", snapshot] if snapshot else []
    r = run(["qemu-img", "convert", "-U", *SEC, *extra, "--image-opts", spec(fmt, path), "-O", "raw", out])
    if r.rc != 0:
        return None, r.err
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data, ""


def crash_flag(fmt, path):
    """The flag by which a format says an update was cut short, qemu's cue to repair the image: qcow2's dirty
    bit (repaired by the next read/write open), qed's need-check bit (likewise), parallels' in-use mark (which
    makes qemu refuse a read/write open until `check -r all`)."""
    with open(path, "rb") as f:
        h = f.read(80)
    if fmt == "qcow2":
        return len(h) >= 80 and struct.unpack(">I", h[4:8])[0] >= 3 and struct.unpack(">Q", h[72:80])[0] & 1 != 0
    if fmt == "qed":
        return len(h) >= 24 and struct.unpack("<Q", h[16:24])[0] & 2 != 0
    if fmt == "parallels":
        return len(h) >= 48 and struct.unpack("<I", h[44:48])[0] == 0x746F6E59
    return False


def qcheck(fmt, path):
    """qemu-img check's verdict: None when there is no corruption (leaks allowed), else the reason. An image
    carrying its format's crash flag (or a vhdx log to replay) is first repaired as qemu repairs it before any
    read/write use (`check -r all`, what qemu's open runs for a dirty qcow2 or qed), then checked."""
    if fmt not in CHECKABLE:
        r = run(["qemu-img", "info", "-U", *SEC, "--image-opts", spec(fmt, path)])
        return None if r.rc == 0 else f"info fails: {r.err}"
    r = run(["qemu-img", "check", "-U", "--output=json", "-f", fmt, path])
    replay = fmt == "vhdx" and r.rc != 0 and "needs to be replayed" in r.err
    if r.rc == 2 and fmt == "parallels" and crash_flag(fmt, path):
        # The in-use mark is the one corruption qemu counts for an image left open; anything more is damage.
        d = json.loads(r.out)
        if d.get("corruptions", 0) != 1 or "not closed correctly" not in r.err:
            return f"check finds more than the in-use mark: {d} {r.err}"
    if replay or (r.rc == 2 and crash_flag(fmt, path)):
        rep = run(["qemu-img", "check", "-r", "all", "-f", fmt, path])
        if rep.rc not in (0, 3):
            return f"repair of the crash state fails: {rep}"
        r = run(["qemu-img", "check", "-U", "--output=json", "-f", fmt, path])
    if r.rc not in (0, 3):
        return f"check rc {r.rc}: {r.out} {r.err}"
    d = json.loads(r.out)
    if d.get("corruptions", 0) or d.get("check-errors", 0):
        return f"check finds corruption: {d}"
    return None


def sectors_old_or_new(got, old, new):
    """None if every 512-byte sector of `got` holds the old or the new bytes (byte by byte, for a request that
    was not sector aligned)."""
    if got is None:
        return "unreadable"
    if len(got) != len(old) or len(got) != len(new):
        return f"size {len(got)}, old {len(old)}, new {len(new)}"
    for off in range(0, len(got), 512):
        g, o, n = got[off:off + 512], old[off:off + 512], new[off:off + 512]
        if g == o or g == n:
            continue
        if all(a == b or a == c for a, b, c in zip(g, o, n)):
            continue
        return f"sector at {off} is neither old nor new"
    return None


# ---- the operations -------------------------------------------------------------------------------------
#
# Each case: setup(dir) makes the pristine files in `dir` and returns a dict of facts; argv(dir) the instar
# command; watch the substrings of the paths the shim watches; verify(dir, facts, clean) returns None when the
# faulted result keeps the operation's promise (`clean` holds the facts of the clean run's result).

WRITABLE = ["qcow2", "qcow", "qed", "vmdk", "vpc", "vhdx", "vdi", "parallels", "luks", "raw"]


def old_writes(fmt, path):
    io(fmt, path, "write -P 0x55 32k 168k", "write -P 0x66 3M 64k")


class Write:
    """`instar convert -n` of a raw source onto an existing image: new clusters, overwritten ones and zeroes."""
    name = "write"
    watch = "/img."
    clean_rc = 0

    def __init__(self, fmt):
        self.fmt = fmt

    def setup(self, d):
        img = os.path.join(d, f"img.{self.fmt}")
        create(self.fmt, img, 4 * MiB)
        old_writes(self.fmt, img)
        src = os.path.join(d, "src.raw")
        qimg("create", "-q", "-f", "raw", src, str(vsize(self.fmt, img)))
        io("raw", src, "write -P 0x11 0 64k", "write -P 0x22 1021k 70k", "write -P 0x33 2M 300k")
        return {"old": guest(self.fmt, img, os.path.join(d, "g.raw"))[0]}

    def argv(self, d):
        return ["convert", "-n", *SEC, "--image-opts", spec("raw", os.path.join(d, "src.raw")),
                "--target-image-opts", spec(self.fmt, os.path.join(d, f"img.{self.fmt}"))]

    def facts(self, d):
        return {"guest": guest(self.fmt, os.path.join(d, f"img.{self.fmt}"), os.path.join(d, "g.raw"))[0]}

    def verify(self, d, pristine, clean):
        img = os.path.join(d, f"img.{self.fmt}")
        return qcheck(self.fmt, img) or sectors_old_or_new(
            guest(self.fmt, img, os.path.join(d, "g.raw"))[0], pristine["old"], clean["guest"])


class Resize(Write):
    """`instar resize +1M`: the old size and contents, or the new size with zeroes after the old end."""
    name = "resize"

    def setup(self, d):
        img = os.path.join(d, f"img.{self.fmt}")
        create(self.fmt, img, 4 * MiB)
        old_writes(self.fmt, img)
        return {"old": guest(self.fmt, img, os.path.join(d, "g.raw"))[0]}

    def argv(self, d):
        return ["resize", *SEC, "--image-opts", spec(self.fmt, os.path.join(d, f"img.{self.fmt}")), "+1M"]

    def verify(self, d, pristine, clean):
        img = os.path.join(d, f"img.{self.fmt}")
        bad = qcheck(self.fmt, img)
        if bad:
            return bad
        got = guest(self.fmt, img, os.path.join(d, "g.raw"))[0]
        if got not in (pristine["old"], clean["guest"]):
            return "neither the old image nor the resized one" if got is not None else "unreadable"
        return None


class Commit(Write):
    """`instar commit` of a qcow2 overlay into a base of this format: the top's view never changes."""
    name = "commit"
    watch = "/base.|/top."

    def setup(self, d):
        base, top = os.path.join(d, f"base.{self.fmt}"), os.path.join(d, "top.qcow2")
        create(self.fmt, base, 4 * MiB)
        old_writes(self.fmt, base)
        qimg("create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", self.fmt, top,
             str(vsize(self.fmt, base)))
        io("qcow2", top, "write -P 0x11 0 64k", "write -P 0x22 1021k 70k", "write -z 3M 32k",
           "write -P 0x33 2M 300k")
        return {"top": guest("qcow2", top, os.path.join(d, "g.raw"))[0],
                "base": guest(self.fmt, base, os.path.join(d, "g.raw"))[0]}

    def argv(self, d):
        return ["commit", "-f", "qcow2", os.path.join(d, "top.qcow2")]

    def facts(self, d):
        return {"base": guest(self.fmt, os.path.join(d, f"base.{self.fmt}"), os.path.join(d, "g.raw"))[0]}

    def verify(self, d, pristine, clean):
        base, top = os.path.join(d, f"base.{self.fmt}"), os.path.join(d, "top.qcow2")
        bad = qcheck(self.fmt, base) or qcheck("qcow2", top)
        if bad:
            return bad
        if guest("qcow2", top, os.path.join(d, "g.raw"))[0] != pristine["top"]:
            return "the overlay's view changed"
        return sectors_old_or_new(guest(self.fmt, base, os.path.join(d, "g.raw"))[0], pristine["base"],
                                  clean["base"])


class Repair(Write):
    """`instar check -r all` of an image with leaked clusters: the guest view never changes."""
    name = "check-repair"

    def setup(self, d):
        img = os.path.join(d, f"img.{self.fmt}")
        create(self.fmt, img, 4 * MiB)
        old_writes(self.fmt, img)
        if self.fmt == "qcow2":
            for _ in range(3):
                leak_one_cluster(img)
        else:
            with open(img, "r+b") as f:
                f.truncate(os.path.getsize(img) + 256 * 1024)
        return {"old": guest(self.fmt, img, os.path.join(d, "g.raw"))[0]}

    @property
    def clean_rc(self):
        return 3 if self.fmt == "qed" else 0   # qemu's qed check reports leaks but does not repair them

    def argv(self, d):
        return ["check", "-r", "all", "-f", self.fmt, os.path.join(d, f"img.{self.fmt}")]

    def verify(self, d, pristine, clean):
        img = os.path.join(d, f"img.{self.fmt}")
        bad = qcheck(self.fmt, img)
        if bad:
            return bad
        return None if guest(self.fmt, img, os.path.join(d, "g.raw"))[0] == pristine["old"] else "guest changed"


class Qcow2Meta(Write):
    """qcow2 snapshot create/delete and bitmap add: the active view never changes, snapshots read as taken."""

    def __init__(self, name, argv_tail, bitmap=True):
        super().__init__("qcow2")
        self.name, self.tail, self.bitmap = name, argv_tail, bitmap

    def setup(self, d):
        img = os.path.join(d, "img.qcow2")
        create("qcow2", img, 4 * MiB)
        old_writes("qcow2", img)
        qimg("snapshot", "-c", "s1", img)
        io("qcow2", img, "write -P 0x77 100k 200k", "write -P 0x78 3M 4k")
        if self.bitmap:  # (a revert refuses an image with persistent bitmaps)
            qimg("bitmap", "--add", img, "b1")
        io("qcow2", img, "write -P 0x79 1M 64k")
        g = os.path.join(d, "g.raw")
        return {"old": guest("qcow2", img, g)[0], "s1": guest("qcow2", img, g, "s1")[0]}

    def argv(self, d):
        return [a.replace("{img}", os.path.join(d, "img.qcow2")) for a in self.tail]

    def verify(self, d, pristine, clean):
        img, g = os.path.join(d, "img.qcow2"), os.path.join(d, "g.raw")
        bad = qcheck("qcow2", img)
        if bad:
            return bad
        # A revert leaves the current contents or the snapshot's; anything else keeps the current contents.
        allowed = (pristine["old"], pristine["s1"]) if self.name == "snapshot-apply" else (pristine["old"],)
        if guest("qcow2", img, g)[0] not in allowed:
            return "the active view is neither the old one nor the new one"
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", img]).out)
        snaps = [s["name"] for s in info.get("snapshots", [])]
        for s in snaps:
            want = pristine["s1"] if s == "s1" else pristine["old"]
            if guest("qcow2", img, g, s)[0] != want:
                return f"snapshot {s} reads wrong"
        return None


def info_facts(fmt, path):
    """qemu-img info's JSON of an image, without what differs between two identical creates (the file name, a
    LUKS header's random UUID and its timed PBKDF2 iteration counts)."""
    r = run(["qemu-img", "info", "-U", "--output=json", *SEC, "--image-opts", spec(fmt, path)])
    if r.rc != 0:
        return f"info fails: {r.err}"

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("filename", "uuid", "iters", "master-key-iters")}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return strip(json.loads(r.out))


class Create(Write):
    """`instar create` with a format's typical options. A fault may fail the create (nonzero, a message) and
    leave a partial file, as qemu-img does; a create that exits 0 must have made the clean run's image."""
    name = "create"
    watch = "/img"
    verify_failed = False   # a failed create promises nothing about the file it leaves

    def __init__(self, fmt, label, opts, backing=False):
        super().__init__(fmt)
        self.label, self.opts, self.backing = label, opts, backing
        # A LUKS create times PBKDF2 for half a second of CPU or more, each run: fewer points there.
        self.sample = 4 if fmt == "luks" else 8

    def setup(self, d):
        if self.backing:
            create("qcow2", os.path.join(d, "base.qcow2"), 4 * MiB)
        return {}

    def argv(self, d):
        luks = [*SEC, "-o", "key-secret=sec0,iter-time=10"] if self.fmt == "luks" else []
        return ["create", "-q", "-f", self.fmt, *luks, *self.opts, os.path.join(d, f"img.{self.fmt}"), "4M"]

    def facts(self, d):
        img = os.path.join(d, f"img.{self.fmt}")
        return {"info": info_facts(self.fmt, img), "guest": guest(self.fmt, img, os.path.join(d, "g.raw"))[0]}

    def verify(self, d, pristine, clean):
        return qcheck(self.fmt, os.path.join(d, f"img.{self.fmt}"))


CREATES = [Create(f, f, []) for f in WRITABLE] + [
    Create("qcow2", "qcow2-prealloc-metadata", ["-o", "preallocation=metadata"]),
    Create("qcow2", "qcow2-overlay", ["-b", "base.qcow2", "-F", "qcow2"], backing=True),
    Create("raw", "raw-falloc", ["-o", "preallocation=falloc"]),
    Create("vmdk", "vmdk-flat", ["-o", "subformat=monolithicFlat"]),
    Create("vpc", "vpc-fixed", ["-o", "subformat=fixed"]),
]

CASES = ([Write(f) for f in WRITABLE] +
         [Resize(f) for f in ("qcow2", "qed", "luks", "raw")] +
         [Commit(f) for f in WRITABLE if f not in ("luks", "parallels")] +
         [Repair(f) for f in ("qcow2", "qed", "parallels")] +
         [Qcow2Meta("snapshot-create", ["snapshot", "-c", "s2", "{img}"]),
          Qcow2Meta("snapshot-delete", ["snapshot", "-d", "s1", "{img}"]),
          Qcow2Meta("snapshot-apply", ["snapshot", "-a", "s1", "{img}"], bitmap=False),
          Qcow2Meta("bitmap-add", ["bitmap", "--add", "{img}", "b2"])] +
         CREATES)


def faulted(shim, case, d, n, mode):
    env = dict(os.environ, LD_PRELOAD=shim, FAULTINJ_PATH=case.watch, FAULTINJ_AT=str(n), FAULTINJ_MODE=mode,
               FAULTINJ_COUNT=os.path.join(d, "count"))
    return run([INSTAR, *case.argv(d)], cwd=d, env=env, timeout=300)


def points(k, sample=SAMPLE):
    if FULL or k <= sample:
        return list(range(1, k + 1))
    step = (k - 1) / (sample - 1)
    return sorted({1 + round(i * step) for i in range(sample)})


@pytest.mark.parametrize("case", CASES, ids=[f"{c.name}-{getattr(c, 'label', c.fmt)}" for c in CASES])
def test_fault_injection(shim, case, tmp):
    pristine_dir = os.path.join(tmp, "pristine")
    os.makedirs(pristine_dir)
    pristine = case.setup(pristine_dir)

    def fresh(name):
        d = os.path.join(tmp, name)
        shutil.copytree(pristine_dir, d)
        return d

    # The clean run: it succeeds and counts the calls.
    d = fresh("clean")
    r = faulted(shim, case, d, 0, "eio")
    assert r.rc == case.clean_rc, r
    with open(os.path.join(d, "count")) as f:
        k = int(f.read())
    assert k > 0, "the shim saw no write-type call"
    clean = case.facts(d)
    assert case.verify(d, pristine, clean) is None
    shutil.rmtree(d)

    jobs = [(n, MODES[i % len(MODES)]) for i, n in enumerate(points(k, getattr(case, "sample", SAMPLE)))]
    if FULL:
        jobs = [(n, m) for n in range(1, k + 1) for m in MODES]

    def one(job):
        n, mode = job
        d = fresh(f"n{n}-{mode}")
        r = faulted(shim, case, d, n, mode)
        problems = []
        if r.rc < 0 or r.rc > 3 or "Fatal error" in r.err:
            problems.append(f"crashed: rc {r.rc}, {r.err.strip()[-300:]}")
        elif r.rc == case.clean_rc:
            # The fault was absorbed: then the result must be the clean one.
            if case.facts(d) != clean:
                problems.append("exit 0 but the result differs from the clean run")
        elif not r.err.strip().splitlines()[-1:] or not r.err.strip().splitlines()[-1].startswith("instar:"):
            problems.append(f"no message: {r.err!r}")
        bad = case.verify(d, pristine, clean) if r.rc == case.clean_rc or getattr(case, "verify_failed", True) \
            else None
        if bad:
            problems.append(bad)
        if not problems:
            shutil.rmtree(d)
        return (n, mode, r.rc, r.err.strip()[:200], problems)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(one, jobs))
    failures = [x for x in results if x[4]]
    if os.environ.get("FAULTINJ_REPORT"):
        with open(os.environ["FAULTINJ_REPORT"], "a") as f:
            label = getattr(case, "label", case.fmt)
            f.write(f"{case.name}-{label} K={k} injections={len(jobs)} failures={len(failures)}\n")
    assert not failures, "\n".join(f"N={n} {m}: rc={rc} {err!r}: {p}" for n, m, rc, err, p in failures)


def writeback_calls(log):
    """The numbers of the first early-writeback request and of the first wait among the calls the shim logged
    (a wait names a range already handed over)."""
    calls = [line.split() for line in open(log)]
    ranges = [(int(n), (off, ln)) for n, name, _fd, off, ln in calls if name == "sync_file_range"]
    seen, kick, wait = set(), None, None
    for n, rng in ranges:
        if rng in seen and wait is None:
            wait = n
        elif rng not in seen and kick is None:
            kick = n
        seen.add(rng)
    assert kick is not None and wait is not None, f"no early writeback or no wait: {ranges}"
    return kick, wait


def test_commit_early_writeback(shim, tmp):
    """A commit large enough for early writeback (the base's stretches handed to the kernel with
    sync_file_range as they are written, the oldest waited for): the base reads as qemu-img's commit makes it
    and is clean, the emptied top reads as qemu-img's, the shim sees the requests, and (qcow2 base) a failure of
    either kind of request (the first start of writeback, the first wait) fails the commit with base and top valid:
    the kernel reports a writeback error once, so instar must keep failing every later flush of that file
    rather than point metadata at data that never reached the disk."""
    for fmt in ("qcow2", "raw"):
        src = os.path.join(tmp, fmt, "src")
        os.makedirs(src)
        base, top = os.path.join(src, f"base.{fmt}"), os.path.join(src, "top.qcow2")
        qimg("create", "-q", "-f", fmt, base, "112M")
        io(fmt, base, "write -P 0x11 0 1M", "write -P 0x12 108M 1M")
        qimg("create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", fmt, top, "112M")
        io("qcow2", top, "write -P 0x5a 512k 48M", "write -P 0xa5 56M 48M", "write -z 105M 2M")
        pristine = {"top": guest("qcow2", top, os.path.join(src, "g.raw"))[0],
                    "base": guest(fmt, base, os.path.join(src, "g.raw"))[0]}

        def fresh(name):
            d = os.path.join(tmp, fmt, name)
            shutil.copytree(src, d)
            return d

        dq = fresh("q")
        assert run(["qemu-img", "commit", "-q", "top.qcow2"], cwd=dq).rc == 0
        # The clean run, logged by the shim (which counts the base's write-type calls only).
        d = fresh("clean")
        log = os.path.join(d, "log")
        env = dict(os.environ, LD_PRELOAD=shim, FAULTINJ_PATH=f"/base.{fmt}", FAULTINJ_AT="0", FAULTINJ_LOG=log)
        r = run([INSTAR, "commit", "-q", "top.qcow2"], cwd=d, env=env, timeout=300)
        assert r.rc == 0, r
        c = run(["qemu-img", "compare", "-f", fmt, "-F", fmt, os.path.join(dq, f"base.{fmt}"),
                 os.path.join(d, f"base.{fmt}")])
        assert c.rc == 0, c
        assert qcheck(fmt, os.path.join(d, f"base.{fmt}")) is None
        # (qemu's layout of a commit this size depends on the order its in-flight requests complete in: the
        # files are compared by contents, not byte for byte.)
        assert run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", os.path.join(dq, "top.qcow2"),
                    os.path.join(d, "top.qcow2")]).rc == 0
        kick, wait = writeback_calls(log)
        shutil.rmtree(d)
        # The failures matter where metadata depends on the data (a qcow2 base); a raw base has none.
        for n in ((kick, wait) if fmt == "qcow2" else ()):
            d = fresh(f"n{n}")
            env = dict(os.environ, LD_PRELOAD=shim, FAULTINJ_PATH=f"/base.{fmt}", FAULTINJ_AT=str(n),
                       FAULTINJ_MODE="eio")
            r = run([INSTAR, "commit", "-q", "top.qcow2"], cwd=d, env=env, timeout=300)
            assert r.rc == 1 and r.err.strip().splitlines()[-1].startswith("instar: "), (n, r)
            assert "Input/output error" in r.err, (n, r)
            for f, ff in ((f"base.{fmt}", fmt), ("top.qcow2", "qcow2")):
                assert qcheck(ff, os.path.join(d, f)) is None, (n, f)
            assert guest("qcow2", os.path.join(d, "top.qcow2"), os.path.join(d, "g.raw"))[0] == pristine["top"], n
            new = guest(fmt, os.path.join(dq, f"base.{fmt}"), os.path.join(d, "g.raw"))[0]
            got = guest(fmt, os.path.join(d, f"base.{fmt}"), os.path.join(d, "g.raw"))[0]
            assert sectors_old_or_new(got, pristine["base"], new) is None, n
            shutil.rmtree(d)


def test_rebase_early_writeback(shim, tmp):
    """A safe rebase writing 96 MiB of differences into a qcow2 overlay goes through early writeback too: the
    result reads as qemu-img's and is clean, and a failed wait fails the rebase before the backing link changes
    (the overlay still reads as before, through its old backing file) with the overlay valid."""
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    old, new, top = (os.path.join(src, n) for n in ("old.qcow2", "new.qcow2", "top.qcow2"))
    qimg("create", "-q", "-f", "qcow2", old, "112M")
    io("qcow2", old, "write -P 0x5a 512k 48M", "write -P 0xa5 56M 48M")
    qimg("create", "-q", "-f", "qcow2", new, "112M")
    qimg("create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", top, "112M")
    io("qcow2", top, "write -P 0x77 60M 1M")
    view = guest("qcow2", top, os.path.join(src, "g.raw"))[0]
    argv = ["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"]
    dirs = {}
    for name in ("q", "clean", "fault"):
        dirs[name] = os.path.join(tmp, name)
        shutil.copytree(src, dirs[name])
    assert run(["qemu-img", *argv], cwd=dirs["q"]).rc == 0
    log = os.path.join(tmp, "log")
    env = dict(os.environ, LD_PRELOAD=shim, FAULTINJ_PATH="/top.qcow2", FAULTINJ_AT="0", FAULTINJ_LOG=log)
    r = run([INSTAR, *argv], cwd=dirs["clean"], env=env, timeout=300)
    assert r.rc == 0, r
    c = run(["qemu-img", "compare", os.path.join(dirs["q"], "top.qcow2"), os.path.join(dirs["clean"], "top.qcow2")])
    assert c.rc == 0, c
    assert qcheck("qcow2", os.path.join(dirs["clean"], "top.qcow2")) is None
    _kick, wait = writeback_calls(log)
    env = dict(os.environ, LD_PRELOAD=shim, FAULTINJ_PATH="/top.qcow2", FAULTINJ_AT=str(wait), FAULTINJ_MODE="eio")
    r = run([INSTAR, *argv], cwd=dirs["fault"], env=env, timeout=300)
    assert r.rc == 1 and "Input/output error" in r.err, r
    f = os.path.join(dirs["fault"], "top.qcow2")
    assert qcheck("qcow2", f) is None
    assert guest("qcow2", f, os.path.join(tmp, "g.raw"))[0] == view
