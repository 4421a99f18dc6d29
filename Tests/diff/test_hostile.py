"""Hostile images: hundreds of damaged qcow2 variants (see hostile_images.py), each run through instar's info,
info --output=json, map --output=json, convert -O raw and compare, under a 1 GiB address-space limit and a
timeout, next to the real qemu-img on the same file; and, on copies, through the writers resize, amend and
check -r all (for those only the first rule below is checked).

What must hold for every variant and command:
  * instar is never killed by a signal (Swift trap, SIGSEGV, OOM abort) and never times out;
  * where qemu-img rejects the input, instar rejects it too, with qemu-img's exit code (1; compare: 2, 3 or 4)
    and a short "instar: ..." error on stderr (no more lines than qemu-img prints);
  * where qemu-img accepts it, `info` / `info --output=json` / `map --output=json` print the same, convert
    produces the same bytes and compare answers the same.

All variants run once per session in a few worker threads; the parametrised tests only look at the results.
"""
import concurrent.futures
import hashlib
import os
import shutil
import signal
import subprocess

import pytest

from conftest import INSTAR, normalize
import hostile_images as H

# A hang is judged by CPU time, which a loaded machine does not stretch: each run gets CPU_LIMIT seconds of CPU
# (SIGXCPU past it, reported as a death). The wall-clock TIMEOUT only catches a run that blocks without spinning,
# so it is generous enough for a machine running other work beside the suite.
CPU_LIMIT = 20
TIMEOUT = 600
AS_LIMIT = 1 << 30
WORKERS = 3
COMMANDS = {
    "info": lambda x, out: ["info", x],
    "info-json": lambda x, out: ["info", "--output=json", x],
    "map-json": lambda x, out: ["map", "--output=json", x],
    "convert": lambda x, out: ["convert", "-O", "raw", x, out],
    "compare": lambda x, out: ["compare", x, x],
    "snapshot-list": lambda x, out: ["snapshot", "-l", x],
}
# Commands that open the image writable, run on a fresh copy per tool. Only the first rule (no crash, no hang)
# is checked for them: on damaged images qemu's writers mark images corrupt and name internal nodes.
WRITE_COMMANDS = {
    "resize": lambda x: ["resize", x, "+1M"],
    "amend": lambda x: ["amend", "-o", "lazy_refcounts=on", x],
    "check-repair": lambda x: ["check", "-r", "all", x],
    "commit": lambda x: ["commit", x],
    "bitmap": lambda x: ["bitmap", "--add", "--merge", "hostile", "--clear", x, "hostile"],
    "snapshot-create": lambda x: ["snapshot", "-c", "new", x],
    "snapshot-apply": lambda x: ["snapshot", "-a", "s1", x],
    "snapshot-delete": lambda x: ["snapshot", "-d", "s1", x],
}


class Run:
    def __init__(self, rc=None, out="", err="", timed_out=False, digest=None):
        self.rc, self.out, self.err, self.timed_out, self.digest = rc, out, err, timed_out, digest

    def __repr__(self):
        return (f"Run(rc={self.rc}, timed_out={self.timed_out}, out={self.out[:600]!r}, "
                f"err={self.err[:600]!r}, digest={self.digest})")


def _digest(path):
    """A hash of a file's contents that treats holes and written zeroes alike and skips holes cheaply (a
    converted 1 TiB image is almost all hole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(str(size).encode())
        # Visit the 1 MiB blocks that hold any data (holes read as zeroes), on a fixed grid so that where the
        # writer left holes does not matter.
        block, pos = 1 << 20, 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            b = pos - pos % block
            while b < end:
                chunk = os.pread(fd, block, b)
                if chunk.strip(b"\0"):
                    h.update(str(b).encode() + b":" + chunk)
                b += block
            pos = max(end, b)
    return h.hexdigest()


def _run(argv, cwd, out_path):
    if os.path.exists(out_path):
        os.unlink(out_path)
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return Run(timed_out=True, out=(e.stdout or b"").decode("utf-8", "replace"),
                   err=(e.stderr or b"").decode("utf-8", "replace"))
    digest = _digest(out_path) if p.returncode == 0 and os.path.exists(out_path) else None
    if os.path.exists(out_path):
        os.unlink(out_path)
    return Run(p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"),
               digest=digest)


def _one(ctx, root, name):
    d = os.path.join(root, name)
    os.makedirs(d)
    try:
        image = H.VARIANTS[name](ctx, d)
    except Exception as e:  # a generator bug must show up as a failure of this variant, not of the session
        return {"setup-error": repr(e)}
    res = {}
    out = os.path.join(d, "out.raw")
    for cmd, args in COMMANDS.items():
        # qemu-img recurses through backing loops until it runs out of file descriptors; a modest fd limit makes
        # that end in a second (a 300-deep chain still fits). It gets no address-space limit: its threads need more.
        q = _run(["prlimit", "--nofile=1024", f"--cpu={CPU_LIMIT}", "--", "qemu-img", *args(image, out)], d, out)
        q.out, q.err = normalize(q.out), normalize(q.err)
        i = _run(["prlimit", f"--as={AS_LIMIT}", f"--cpu={CPU_LIMIT}", "--", INSTAR, *args(image, out)], d, out)
        res[cmd] = (q, i)
    for cmd, args in WRITE_COMMANDS.items():
        runs = []
        for who, argv0 in (("q", ["prlimit", "--nofile=1024", f"--cpu={CPU_LIMIT}", "--", "qemu-img"]),
                           ("i", ["prlimit", f"--as={AS_LIMIT}", f"--cpu={CPU_LIMIT}", "--", INSTAR])):
            if who == "q" and name not in DELIBERATE:
                # Only instar's writers are judged here (rule 1), but for the deliberate differences, where
                # qemu-img's answer is part of the check: the other qemu-img writer runs would go unread.
                runs.append(Run())
                continue
            copy = os.path.join(os.path.dirname(image), f"w-{who}-{os.path.basename(image)}")
            shutil.copyfile(image, copy)
            runs.append(_run([*argv0, *args(copy)], d, out))
            os.unlink(copy)
        res["write:" + cmd] = tuple(runs)
    # A deep chain leaves hundreds of files; drop them as soon as the variant is done.
    if len(os.listdir(d)) > 20:
        shutil.rmtree(d, ignore_errors=True)
    return res


@pytest.fixture(scope="session")
def results(request, tmp_path_factory):
    # Only the variants the selected tests look at (so `-k name` stays quick).
    wanted = {item.callspec.params["name"] for item in request.session.items
              if hasattr(item, "callspec") and "name" in item.callspec.params}
    if any(item.name == "test_chain_deeper_than_limit" for item in request.session.items):
        wanted.add(DEEP_CHAIN)
    root = str(tmp_path_factory.mktemp("hostile"))
    ctx = H.Context(os.path.join(root, "_base"))
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(_one, ctx, root, name) for name in H.VARIANTS if name in wanted}
        return {name: f.result() for name, f in futures.items()}


NAMES = sorted(H.VARIANTS)

# Deliberate differences from qemu-img: variant -> the test that checks instar's own behaviour instead.
# qemu-img 7.2 follows a backing chain of any depth (until it runs out of file descriptors); instar refuses
# chains deeper than ImageOpener.maxChainDepth with a clear error.
DEEP_CHAIN = "chain-depth-300"
CHAIN_LIMIT = 256
DELIBERATE = {DEEP_CHAIN}


def _get(results, name):
    r = results[name]
    assert "setup-error" not in r, f"could not build variant {name}: {r['setup-error']}"
    return r


@pytest.mark.parametrize("name", NAMES)
def test_never_crashes(results, name):
    """No signal, no timeout, no Swift runtime message, whatever the bytes."""
    for cmd, (q, i) in _get(results, name).items():
        assert not i.timed_out, f"{name}: instar {cmd} timed out after {TIMEOUT}s: {i}"
        assert i.rc != -signal.SIGXCPU, f"{name}: instar {cmd} used over {CPU_LIMIT}s of CPU: {i}"
        assert i.rc is not None and 0 <= i.rc < 128, f"{name}: instar {cmd} died: {i}"
        for marker in ("Fatal error", "Swift runtime failure", "Stack dump", "Illegal instruction", "Segmentation"):
            assert marker not in i.err, f"{name}: instar {cmd} trapped: {i}"


@pytest.mark.parametrize("name", NAMES)
def test_rejects_where_qemu_rejects(results, name):
    """Where qemu-img fails, instar fails with the same exit code and a short, prefixed message."""
    for cmd, (q, i) in _get(results, name).items():
        if cmd.startswith("write:"):
            continue
        # A qemu-img that hangs or dies (qemu 7.2 segfaults on LUKS without its header extension) decides
        # nothing; instar must still only fail cleanly, which test_never_crashes checks.
        if q.timed_out or q.rc < 0 or q.rc == 0 or (cmd == "compare" and q.rc == 1):
            continue
        # qemu-img's own code: 1, or for compare 2 (error), 3 (allocation status failed), 4 (read failed).
        assert i.rc == q.rc, f"{name}: {cmd}: qemu-img rc {q.rc}, instar rc {i.rc}\n qemu: {q}\n instar: {i}"
        lines = i.err.strip("\n").split("\n")
        # The error line may be followed by qemu's hint lines ("You can force-remove ... with check -r all").
        assert i.err.strip() and any(line.startswith("instar: ") for line in lines), \
            f"{name}: {cmd}: no clear error: {i}"
        qlines = len(q.err.strip("\n").split("\n"))
        assert len(lines) <= max(1, qlines), f"{name}: {cmd}: error too long: {i}"


@pytest.mark.parametrize("name", NAMES)
def test_same_result_where_qemu_accepts(results, name):
    """Where qemu-img succeeds, instar succeeds with the same output (and the same converted bytes)."""
    for cmd, (q, i) in _get(results, name).items():
        if cmd.startswith("write:") or (q.rc != 0 and not (cmd == "compare" and q.rc == 1)):
            continue
        if name in DELIBERATE and cmd in ("map-json", "convert", "compare", "snapshot-list"):
            continue  # see test_chain_deeper_than_limit
        assert i.rc == q.rc, f"{name}: {cmd}: qemu-img rc {q.rc}, instar rc {i.rc}\n qemu: {q}\n instar: {i}"
        if cmd in ("info", "info-json", "map-json", "compare", "snapshot-list"):
            assert i.out == q.out, f"{name}: {cmd} output differs\n qemu: {q}\n instar: {i}"
        if cmd == "convert":
            assert i.digest == q.digest, f"{name}: convert output differs\n qemu: {q}\n instar: {i}"


def test_variant_count():
    """The generator really produces a broad set (guards against an accidental empty parametrisation)."""
    assert len(H.VARIANTS) >= 250


def test_chain_deeper_than_limit(results):
    """A chain deeper than instar's limit: `info` does not open backing files and matches qemu-img; the commands
    that open the whole chain fail with one clear line (exit 1, compare's open-error code 2). qemu-img accepts
    this chain, so here only instar's own behaviour is checked."""
    r = _get(results, DEEP_CHAIN)
    for cmd, (q, i) in r.items():
        if cmd in ("info", "info-json"):
            assert (i.rc, i.out) == (q.rc, q.out), f"{cmd}: qemu: {q}\n instar: {i}"
            continue
        if cmd == "write:bitmap":
            # bitmap opens the image without its backing chain (BDRV_O_NO_BACKING), as qemu-img does.
            assert (i.rc, q.rc) == (0, 0), f"{cmd}: qemu: {q}\n instar: {i}"
            continue
        if cmd in ("write:snapshot-apply", "write:snapshot-delete"):
            # The chain has no snapshot s1: qemu-img opens it and fails to find it; instar stops at the open.
            assert q.rc == 1 and "snapshot" in q.err, q
        else:
            assert q.rc == 0, f"{cmd}: qemu-img no longer accepts the deep chain: {q}"
        assert i.rc == (2 if cmd == "compare" else 1), f"{cmd}: {i}"
        top = i.err.split("'")[1] if "'" in i.err else ""
        assert top.endswith("c0299.qcow2"), f"{cmd}: {i}"
        assert i.err == f"instar: Could not open '{top}': Backing chain is deeper than {CHAIN_LIMIT} images\n", \
            f"{cmd}: {i}"


VPC_NAMES = [n for n in NAMES if n.startswith("vpc-")]


@pytest.mark.parametrize("name", VPC_NAMES)
def test_vpc_same_messages(results, name):
    """The damaged vpc images fail (or open) with qemu-img's own message, byte for byte."""
    for cmd in ("info", "info-json", "map-json", "convert"):
        q, i = _get(results, name)[cmd]
        if q.timed_out or q.rc is None or q.rc < 0:
            continue
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), f"{name}: {cmd}\n qemu: {q}\n instar: {i}"
