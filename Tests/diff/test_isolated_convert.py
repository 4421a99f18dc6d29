"""Isolated mode as the reading side of convert (`instar convert --isolated`, INSTAR_OPEN_ISOLATED in
instar_convert_options_t.open_flags, `convert(..., isolated=True)`; docs/isolated.md): the source is parsed in the
confined helper and streamed back, the target written by the caller. The result must be the in-process
convert's, byte for byte, and qemu-img's guest contents; hostile sources fail as they do in process; a helper
that crashes, hangs or sends garbage in the middle of the copy fails the call, and the caller lives on."""
import hashlib
import os

import pytest

from conftest import INSTAR, instar, qemu, qemu_io, qimg, run
import hostile_images as H

import instar as lib

SECRET = ["--object", "secret,id=s,data=pw"]
LUKS_OPTS = "driver=luks,key-secret=s,file.filename=enc.luks"


def _digest(path):
    if not os.path.exists(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A qcow2 chain (data in both layers, a zero cluster, a snapshot), and the same guest contents as a
    compressed qcow2, a vmdk, a vhdx and a LUKS image (passphrase "pw")."""
    d = str(tmp_path_factory.mktemp("isoconv"))
    qimg("create", "-f", "qcow2", "base.qcow2", "24M", cwd=d)
    qemu_io("-c", "write -P 1 0 1M", "-c", "write -P 2 8M 64k", "-c", "write -P 7 20M 3M", "base.qcow2", cwd=d)
    qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    qemu_io("-c", "write -P 3 512k 1M", "-c", "write -z 21M 1M", "-c", "write -P 0 4M 64k", "top.qcow2", cwd=d)
    qimg("snapshot", "-c", "snap1", "top.qcow2", cwd=d)
    qemu_io("-c", "write -P 9 12M 128k", "top.qcow2", cwd=d)
    qimg("convert", "-c", "-O", "qcow2", "top.qcow2", "comp.qcow2", cwd=d)
    qimg("convert", "-O", "vmdk", "top.qcow2", "disk.vmdk", cwd=d)
    qimg("convert", "-O", "vhdx", "top.qcow2", "disk.vhdx", cwd=d)
    qimg("convert", *SECRET, "-O", "luks", "-o", "key-secret=s,iter-time=10", "top.qcow2", "enc.luks", cwd=d)
    return d


def _both(d, args, src, out_base, setup=None):
    """`instar convert ARGS SRC OUT` in process and with --isolated: same exit code, stdout and stderr (target
    names aside) and byte-equal targets. Returns (in-process result, its target, isolated target)."""
    outs = []
    for tag, extra in (("plain", []), ("iso", ["--isolated"])):
        dst = os.path.join(d, f"{out_base}.{tag}")
        if os.path.exists(dst):
            os.unlink(dst)
        if setup:
            setup(dst)
        r = run([INSTAR, "convert", *extra, *args, *src, dst], cwd=d)
        outs.append((r, dst))
    (p, pd), (s, sd) = outs
    assert (s.rc, s.out, s.err.replace(sd, pd)) == (p.rc, p.out, p.err), (p, s)
    assert _digest(sd) == _digest(pd), (args, src)
    return p, pd, sd


CASES = [
    # (name, source arguments, convert options)
    ("chain-raw", ["top.qcow2"], ["-O", "raw"]),
    ("chain-qcow2", ["top.qcow2"], ["-O", "qcow2"]),
    ("chain-S0", ["top.qcow2"], ["-O", "raw", "-S", "0"]),
    ("chain-B", ["top.qcow2"], ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"]),
    ("chain-c", ["top.qcow2"], ["-O", "qcow2", "-c", "-p"]),
    ("chain-snapshot", ["top.qcow2"], ["-O", "raw", "-l", "snap1"]),
    ("vhdx-concat-qcow2", ["disk.vhdx", "base.qcow2"], ["-O", "qcow2"]),
    ("compressed-raw", ["comp.qcow2"], ["-O", "raw"]),
    ("compressed-qcow2", ["comp.qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"]),
    ("vmdk-raw", ["disk.vmdk"], ["-O", "raw"]),
    ("vmdk-qcow2", ["disk.vmdk"], ["-f", "vmdk", "-O", "qcow2"]),
    ("vhdx-raw", ["disk.vhdx"], ["-O", "raw"]),
    ("luks-raw", ["--image-opts", LUKS_OPTS], [*SECRET, "-O", "raw"]),
    ("luks-qcow2", ["--image-opts", LUKS_OPTS], [*SECRET, "-O", "qcow2"]),
]


@pytest.mark.parametrize("name,src,args", CASES, ids=[c[0] for c in CASES])
def test_isolated_convert_equals_in_process_and_qemu(images, name, src, args):
    p, plain, iso = _both(images, args, src, name)
    q_dst = os.path.join(images, name + ".qemu")
    q = qemu("convert", *args, *src, q_dst, cwd=images)
    assert (p.rc, p.out, p.err.replace(plain, q_dst)) == (q.rc, q.out, q.err), (q, p)
    assert p.rc == 0, p
    fmt = args[args.index("-O") + 1]
    c = qemu("compare", "-f", fmt, "-F", fmt, iso, q_dst, cwd=images)
    assert (c.rc, c.out) == (0, "Images are identical.\n"), c
    if "-S" in args:
        # Sparseness too: the same allocation of the target file.
        assert qemu("map", "--output=json", "-f", fmt, iso).out == qemu("map", "--output=json", "-f", fmt, plain).out


def test_isolated_convert_into_existing_target(images):
    """-n and --target-is-zero: the target exists (created here), the source is read through the helper."""
    def setup(dst):
        qimg("create", "-q", "-f", "qcow2", dst, "24M")
    for extra in ([], ["--target-is-zero"]):
        p, plain, iso = _both(images, ["-n", *extra, "-O", "qcow2"], ["top.qcow2"], "existing" + "".join(extra),
                              setup=setup)
        assert p.rc == 0, p
        c = qemu("compare", iso, "top.qcow2", cwd=images)
        assert c.rc == 0, c


def test_python_and_c_api(images):
    """convert(..., isolated=True): the C API's open_flags, with a key_secret and -B."""
    src = os.path.join(images, "top.qcow2")
    out = {}
    for tag, iso in (("plain", False), ("iso", True)):
        dst = os.path.join(images, f"py-{tag}.qcow2")
        lib.convert(src, dst, fmt="qcow2", backing_file="base.qcow2", backing_format="qcow2", isolated=iso)
        out[tag] = _digest(dst)
        enc = os.path.join(images, f"py-enc-{tag}.raw")
        lib.convert(os.path.join(images, "enc.luks"), enc, key_secret="pw", isolated=iso)
        out[tag + "-enc"] = _digest(enc)
    assert out["plain"] == out["iso"] and out["plain-enc"] == out["iso-enc"], out
    # A wrong passphrase fails as in process, with the same error.
    errs = []
    for iso in (False, True):
        with pytest.raises(lib.InstarError) as e:
            lib.convert(os.path.join(images, "enc.luks"), os.path.join(images, "bad.raw"), key_secret="no",
                        isolated=iso)
        errs.append((type(e.value), e.value.code, e.value.message))
    assert errs[0] == errs[1], errs
    assert not os.path.exists(os.path.join(images, "bad.raw"))


# Hostile sources that fail at open and in the middle of the copy (bad compressed clusters, tables and data past
# the end of the file, a huge size, a backing name outside the directory).
HOSTILE = ["compressed-zlib-zeroed", "l2-compressed-bogus", "trunc-past-data-8", "l1-past-eof",
           "field-size-0xffffffffffffffff", "backing-absolute", "vpc-bat0-0xfffffffe"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return H.build(str(tmp_path_factory.mktemp("isoconv-hostile")), HOSTILE)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_source_same_as_in_process(hostile, name):
    image = hostile[name]
    d = os.path.dirname(image)
    res = []
    for extra in ([], ["--isolated"]):
        dst = os.path.join(d, "out.raw")
        if os.path.exists(dst):
            os.unlink(dst)
        r = run(["prlimit", "--as=%d" % (1 << 30), "--cpu=20", "--", INSTAR, "convert", *extra, "-O", "raw", image,
                 dst], cwd=d)
        res.append((r, _digest(dst)))
    assert res[0] == res[1], res
    q = qemu("convert", "-O", "raw", image, os.path.join(d, "q.raw"), cwd=d)
    assert (res[1][0].rc == 0) == (q.rc == 0), (q, res[1])


@pytest.mark.parametrize("hook,error,words", [
    ("abort-read:3", lib.IsolationFailed, "crashed (signal 6"),
    ("garbage-read:2", lib.IsolationFailed, "malformed"),
    ("hang-read:2", lib.LimitReached, "did not finish within 1000 ms"),
])
def test_helper_failing_mid_stream(images, monkeypatch, hook, error, words):
    """A helper that crashes, sends garbage or hangs after the copy has started: the call fails (INSTAR_E_ISOLATION,
    INSTAR_E_LIMIT past the deadline), the target the call created is removed as after any failed library convert,
    the CLI leaves its partial target as qemu-img does, and the next isolated convert works."""
    src = os.path.join(images, "top.qcow2")
    dst = os.path.join(images, "broken.raw")
    monkeypatch.setenv("INSTAR_ISOLATE_TEST", hook)
    if hook.startswith("hang"):
        # Each request's deadline (the opening and the first read answer well within it).
        monkeypatch.setenv("INSTAR_ISOLATE_TIMEOUT_MS", "1000")
    with pytest.raises(error) as e:
        lib.convert(src, dst, isolated=True)
    assert words in e.value.message and "error while reading at byte" in e.value.message, e.value.message
    assert not os.path.exists(dst)
    r = instar("convert", "--isolated", "-O", "raw", src, dst, cwd=images)
    assert r.rc == 1 and r.out == "" and words in r.err and r.err.startswith("instar: error while reading"), r
    monkeypatch.delenv("INSTAR_ISOLATE_TEST")
    lib.convert(src, dst, isolated=True)
    assert qemu("compare", "-F", "raw", src, dst).rc == 0


def test_plain_range_the_caller_cannot_read(images, monkeypatch):
    """The helper names a plain range in a file the caller does not hold: the caller asks again for the bytes,
    and the result is the in-process convert's."""
    src = os.path.join(images, "top.qcow2")
    monkeypatch.setenv("INSTAR_ISOLATE_TEST", "unreadable-plain-read:1")
    p, plain, iso = _both(images, ["-O", "raw"], [src], "unreadable-plain")
    assert p.rc == 0, p
