"""`amend` of LUKS key slots (qemu 7.2's qcrypto_block_luks_amend_options) on standalone luks images and on
qcow2 images with encrypt.format=luks: slots added (first free or by index, --force over an active one) and
erased (by index or by the passphrase they hold), and qemu's refusals (no free slot, wrong old passphrase,
the last active slot without --force, bad option values).

New slots draw random salts and time their PBKDF2 iterations, so the files of the two tools cannot be equal:
each case amends two copies of one image, one with qemu-img and one with instar, and compares exit codes and
messages, the info JSON with the slots' iteration counts masked, and which of the passphrases open each copy
(with qemu-io reading the data written before). PBKDF2 runs with iter-time=10 so the slots stay cheap.
"""
import json
import os
import re
import shutil

import pytest

from conftest import INSTAR, info_json, instar, qemu, qemu_io, qimg, run

PASSWORDS = {"sec0": "abc", "sec1": "def", "sec2": "ghi", "sec3": "jkl", "bad": "zzz"}
OBJ = [a for k, v in PASSWORDS.items() for a in ("--object", f"secret,id={k},data={v}")]
PATTERN = "write -P 0x5a 0 64k"
CHECK = "read -P 0x5a 0 64k"


class Kind:
    def __init__(self, name, fmt, prefix):
        self.name, self.fmt, self.prefix = name, fmt, prefix

    def spec(self, path, secret="sec0"):
        key = "key-secret" if self.fmt == "luks" else "encrypt.key-secret"
        return f"driver={self.fmt},{key}={secret},file.filename={path}"

    def opts(self, text):
        """`text` with every option name given this format's prefix."""
        return ",".join(self.prefix + part for part in text.split(",")) if text else text

    def create(self, path):
        p = self.prefix
        extra = "" if self.fmt == "luks" else "encrypt.format=luks,"
        qimg("create", "-q", "-f", self.fmt, *OBJ, "-o", f"{extra}{p}key-secret=sec0,{p}iter-time=10", path, "1M")
        qemu_io(*OBJ, "--image-opts", self.spec(path), "-c", PATTERN)


KINDS = [Kind("luks", "luks", ""), Kind("qcow2", "qcow2", "encrypt.")]


def slots(path):
    d = info_json(path)
    data = d["format-specific"]["data"]
    return (data if "slots" in data else data["encrypt"])["slots"]


def masked_info(path):
    d = info_json(path)
    data = d["format-specific"]["data"]
    luks = data if "slots" in data else data["encrypt"]
    for s in luks["slots"]:
        if "iters" in s:
            s["iters"] = "*"
    return d


def opens(kind, path):
    """The secrets with which qemu-io opens the image and reads the data written at creation."""
    out = []
    for sid in ("sec0", "sec1", "sec2", "sec3"):
        r = run(["qemu-io", *OBJ, "--image-opts", kind.spec(path, sid), "-c", CHECK])
        if r.rc == 0 and "Pattern verification failed" not in r.out:
            out.append(sid)
        else:
            assert "Invalid password, cannot unlock any keyslot" in r.err, r
    return out


def normalized(r, qpath, ipath):
    err = r.err.replace(ipath, qpath).replace("qemu-img", "instar")
    # The benchmark's iteration count is timed, so it differs from run to run.
    err = re.sub(r"PBKDF iterations \d+", "PBKDF iterations N", err)
    return (r.rc, r.out.replace("qemu-img", "instar"), err)


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One image of each kind, made once (LUKS creation times two PBKDF2 benchmarks); tests work on copies."""
    d = str(tmp_path_factory.mktemp("luksamend"))
    out = {}
    for k in KINDS:
        out[k.name] = os.path.join(d, "base." + k.fmt)
        k.create(out[k.name])
    return out


@pytest.fixture
def base(kind, bases, tmp):
    p = os.path.join(tmp, "base." + kind.fmt)
    shutil.copyfile(bases[kind.name], p)
    return p


def check_clean(kind, path, secrets=None):
    """qemu-img check (with a passphrase that opens the image) finds neither leaks nor corruptions."""
    secrets = opens(kind, path) if secrets is None else secrets
    if not secrets:
        return
    sid = secrets[0]
    r = qemu("check", *OBJ, "--output=json", "--image-opts", kind.spec(path, sid))
    assert r.rc == 0, r
    d = json.loads(r.out)
    assert d.get("leaks", 0) == 0 and d.get("corruptions", 0) == 0, d


def amend_both(kind, base, tmp, options, *extra):
    """Amends a copy of `base` with each tool (`options` without the format's prefix) and checks they agree:
    exit code and messages, info JSON (iterations masked), the passphrases that open each copy, qcow2 clean.
    When qemu-img fails, both copies must be left as they were, byte for byte.
    Returns (qemu's result, qemu's copy, instar's copy)."""
    q, i = os.path.join(tmp, "q." + kind.fmt), os.path.join(tmp, "i." + kind.fmt)
    shutil.copyfile(base, q)
    shutil.copyfile(base, i)
    args = ["amend", *OBJ, *extra, "-o", kind.opts(options), "--image-opts"]
    rq = qemu(*args, kind.spec(q))
    ri = instar(*args, kind.spec(i))
    assert normalized(ri, q, i) == normalized(rq, q, i), (rq, ri)
    if rq.rc != 0:
        with open(base, "rb") as fb, open(q, "rb") as fq, open(i, "rb") as fi:
            b = fb.read()
            assert fq.read() == b and fi.read() == b
        return rq, q, i
    assert masked_info(i) == masked_info(q)
    oi = opens(kind, i)
    assert oi == opens(kind, q)
    if kind.fmt == "qcow2":
        check_clean(kind, i, oi)
    return rq, q, i


ERRORS = [
    "new-secret=sec1",                                   # state missing
    "state=foo",
    "state=active",                                      # new-secret missing
    "state=active,old-secret=sec0,new-secret=sec1",
    "state=active,new-secret=sec1,keyslot=9,iter-time=10",
    "state=active,new-secret=sec1,keyslot=-1,iter-time=10",
    "state=active,new-secret=sec1,keyslot=010,iter-time=10",
    "state=active,new-secret=sec1,keyslot=abc",
    "state=active,new-secret=sec1,keyslot=18446744073709551615",
    "state=active,new-secret=sec1,keyslot=18446744073709551616",
    "state=active,new-secret=sec1,iter-time=abc",
    "state=active,new-secret=sec1,iter-time=9223372036854775808",
    "state=active,new-secret=sec1,keyslot=0,iter-time=10",  # refuses to overwrite an active slot
    "state=active,new-secret=nosuch,iter-time=10",
    "state=inactive,new-secret=sec1",
    "state=inactive,iter-time=10",
    "state=inactive",
    "state=inactive,keyslot=3",                          # already erased
    "state=inactive,keyslot=8",
    "state=inactive,keyslot=-1",
    "state=inactive,keyslot=0",                          # the only active slot
    "state=inactive,old-secret=sec0",                    # every active slot matches
    "state=inactive,old-secret=bad",
    "state=inactive,old-secret=nosuch",
    "state=inactive,keyslot=0,old-secret=bad",
    "state=active,new-secret=sec1,iter-time=-5",         # PBKDF iterations too large to scale (with qemu's hint)
    "secret=sec0,state=active",
    "cipher-alg=aes-128,state=active",                   # creation-only option
]


@pytest.mark.parametrize("options", ERRORS)
def test_errors(kind, base, tmp, options):
    rq, q, i = amend_both(kind, base, tmp, options)
    assert rq.rc == 1, rq


ADDS = [
    "state=active,new-secret=sec1,iter-time=10",
    "state=active,new-secret=sec1,iter-time=10,keyslot=5",
    "state=active,new-secret=sec1,iter-time=10,keyslot=0x3",
    "state=active,new-secret=sec1,iter-time=10,keyslot=4294967297",   # qemu keeps it in an int: slot 1
    "state=active,new-secret=sec1,iter-time=10,keyslot= 7",
    "state=active,new-secret=sec1,iter-time=0",
    "state=active,new-secret=sec0,iter-time=10",                      # the same passphrase in a second slot
]


@pytest.mark.parametrize("options", ADDS)
def test_add_keyslot(kind, base, tmp, options):
    rq, q, i = amend_both(kind, base, tmp, options)
    assert rq.rc == 0, rq
    assert sum(s["active"] for s in slots(i)) == 2


def test_force_overwrites_active_slot(kind, base, tmp):
    rq, q, i = amend_both(kind, base, tmp, "state=active,new-secret=sec1,iter-time=10,keyslot=0", "--force")
    assert rq.rc == 0, rq
    assert opens(kind, i) == ["sec1"]


def test_progress_and_quiet(kind, base, tmp):
    rq, q, i = amend_both(kind, base, tmp, "state=active,new-secret=sec1,iter-time=10", "-p")
    assert rq.rc == 0 and "100.00/100%" in rq.out, rq
    rq, q, i = amend_both(kind, base, tmp, "state=active,new-secret=sec1,iter-time=10", "-q")
    assert rq.rc == 0 and rq.out == "", rq


@pytest.fixture(scope="module")
def threes(bases, tmp_path_factory):
    """Made on first use, once per kind (see `three`)."""
    return {"dir": str(tmp_path_factory.mktemp("three"))}


@pytest.fixture
def three(kind, bases, threes, tmp):
    """A copy of the base image with sec0 in slots 0 and 2, sec1 in slot 1 and sec2 in slot 6 (added by qemu-img)."""
    if kind.name not in threes:
        threes[kind.name] = make_three(kind, bases[kind.name], threes["dir"])
    p = os.path.join(tmp, "three." + kind.fmt)
    shutil.copyfile(threes[kind.name], p)
    return p


def make_three(kind, base, d):
    p = os.path.join(d, "three." + kind.fmt)
    shutil.copyfile(base, p)
    for o in ("state=active,new-secret=sec1,iter-time=10", "state=active,new-secret=sec0,iter-time=10",
              "state=active,new-secret=sec2,iter-time=10,keyslot=6"):
        qimg("amend", *OBJ, "-o", kind.opts(o), "--image-opts", kind.spec(p))
    assert [s["active"] for s in slots(p)] == [True, True, True, False, False, False, True, False]
    return p


ERASES = [
    ("state=inactive,keyslot=1", ()),
    ("state=inactive,keyslot=6,old-secret=sec2", ()),
    ("state=inactive,keyslot=6,old-secret=sec1", ()),    # the slot holds another passphrase
    ("state=inactive,old-secret=sec0", ()),              # both slots holding sec0
    ("state=inactive,old-secret=sec3", ()),              # no slot holds it
    ("state=inactive,keyslot=4", ()),                    # already inactive
    ("state=inactive,keyslot=4", ("--force",)),          # scrubbed anyway
    ("state=active,new-secret=sec3,iter-time=10", ()),   # first free slot is 3
    ("state=active,new-secret=sec3,iter-time=10,keyslot=6", ()),
    ("state=active,new-secret=sec3,iter-time=10,keyslot=6", ("--force",)),
]


@pytest.mark.parametrize("options,extra", ERASES, ids=[f"{o}{''.join(e)}" for o, e in ERASES])
def test_erase(kind, three, tmp, options, extra):
    amend_both(kind, three, tmp, options, *extra)


def test_erase_last_slot_needs_force(kind, base, tmp):
    rq, q, i = amend_both(kind, base, tmp, "state=inactive,keyslot=0")
    assert rq.rc == 1
    rq, q, i = amend_both(kind, base, tmp, "state=inactive,old-secret=sec0", "--force")
    assert rq.rc == 0 and opens(kind, i) == []
    rq, q, i = amend_both(kind, base, tmp, "state=inactive,keyslot=0", "--force")
    assert rq.rc == 0 and not any(s["active"] for s in slots(i))


def test_all_slots_in_use(kind, base, tmp):
    full = os.path.join(tmp, "full." + kind.fmt)
    shutil.copyfile(base, full)
    for n in range(1, 8):
        qimg("amend", *OBJ, "-o", kind.opts(f"state=active,new-secret=sec{n % 4},iter-time=10"), "--image-opts",
             kind.spec(full))
    rq, q, i = amend_both(kind, full, tmp, "state=active,new-secret=sec1,iter-time=10")
    assert rq.rc == 1 and "all keyslots are in use" in rq.err, rq
    # sec1 is in slots 1 and 5: erasing by passphrase empties both.
    rq, q, i = amend_both(kind, full, tmp, "state=inactive,old-secret=sec1")
    assert rq.rc == 0
    assert [s["active"] for s in slots(i)] == [True, False, True, True, True, False, True, True]


def test_sequence_alternating_tools(kind, base, tmp):
    """Slots added by one tool are erased or used by the other: instar's slots open in qemu and qemu's in instar."""
    p = os.path.join(tmp, "seq." + kind.fmt)
    shutil.copyfile(base, p)

    def step(tool, options, *extra):
        r = (qemu if tool == "q" else instar)("amend", *OBJ, *extra, "-o", kind.opts(options), "--image-opts",
                                             kind.spec(p, "sec0" if "sec0" in opens(kind, p) else "sec1"))
        assert r.rc == 0, r

    step("i", "state=active,new-secret=sec1,iter-time=10")
    step("q", "state=active,new-secret=sec2,iter-time=10")
    step("i", "state=inactive,old-secret=sec2")
    step("i", "state=active,new-secret=sec3,iter-time=10,keyslot=7")
    step("q", "state=inactive,keyslot=0")
    assert opens(kind, p) == ["sec1", "sec3"]
    assert [s["active"] for s in slots(p)] == [False, True, False, False, False, False, False, True]
    # instar reads the data with either passphrase.
    for sid in ("sec1", "sec3"):
        r = instar("convert", *OBJ, "-O", "raw", "--image-opts", kind.spec(p, sid), os.path.join(tmp, sid + ".raw"))
        assert r.rc == 0, r
        with open(os.path.join(tmp, sid + ".raw"), "rb") as f:
            assert f.read(65536) == b"\x5a" * 65536
    if kind.fmt == "qcow2":
        check_clean(kind, p)


def test_open_errors(kind, base, tmp):
    """Without the image's passphrase the image does not open; with a wrong one it does not unlock."""
    for spec in ([kind.spec(base, "bad")], [kind.spec(base, "nosuch")]):
        rq = qemu("amend", *OBJ, "-o", kind.opts("state=active,new-secret=sec1"), "--image-opts", *spec)
        ri = instar("amend", *OBJ, "-o", kind.opts("state=active,new-secret=sec1"), "--image-opts", *spec)
        assert (ri.rc, ri.out, ri.err) == (rq.rc, rq.out, rq.err)
    rq = qemu("amend", *OBJ, "-f", kind.fmt, "-o", kind.opts("state=active,new-secret=sec1"), base)
    ri = instar("amend", *OBJ, "-f", kind.fmt, "-o", kind.opts("state=active,new-secret=sec1"), base)
    assert (ri.rc, ri.out, ri.err) == (rq.rc, rq.out, rq.err)


def test_amend_help(kind, base):
    for args in (["-f", kind.fmt, "-o", "help"], ["-o", "help", "--image-opts", kind.spec(base)]):
        rq = qemu("amend", *OBJ, *args)
        ri = instar("amend", *OBJ, *args)
        assert (ri.rc, ri.out, ri.err) == (rq.rc, rq.out, rq.err)


QCOW2_MIXED = [
    "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,compat=0.10",
    "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,lazy_refcounts=on",
    "encrypt.state=inactive,encrypt.keyslot=0,compat=0.10",
    "encrypt.keyslot=2,compat=0.10",                     # state missing, reported after the downgrade checks
    "encrypt.format=luks,encrypt.state=inactive,encrypt.keyslot=1",
    "encrypt.key-secret=sec0,encrypt.state=inactive,encrypt.keyslot=1",
    "state=active,new-secret=sec1",
]


@pytest.mark.parametrize("options", QCOW2_MIXED)
def test_qcow2_with_other_options(bases, tmp, options):
    kind = KINDS[1]
    base = bases["qcow2"]
    q, i = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    shutil.copyfile(base, q)
    shutil.copyfile(base, i)
    rq = qemu("amend", *OBJ, "-o", options, "--image-opts", kind.spec(q))
    ri = instar("amend", *OBJ, "-o", options, "--image-opts", kind.spec(i))
    assert normalized(ri, q, i) == normalized(rq, q, i)
    assert masked_info(i) == masked_info(q)
    assert opens(kind, i) == opens(kind, q)
    check_clean(kind, i)


def test_qcow2_not_luks(tmp):
    plain, aes = os.path.join(tmp, "p.qcow2"), os.path.join(tmp, "aes.qcow2")
    qimg("create", "-q", "-f", "qcow2", plain, "1M")
    qimg("create", "-q", "-f", "qcow2", *OBJ, "-o", "encrypt.format=aes,encrypt.key-secret=sec0", aes, "1M")
    for args in (["-o", "encrypt.state=active", plain],
                 ["-o", "encrypt.state=active", "--image-opts", KINDS[1].spec(aes)]):
        rq = qemu("amend", *OBJ, *args)
        ri = instar("amend", *OBJ, *args)
        assert (ri.rc, ri.out, ri.err) == (rq.rc, rq.out, rq.err)


CRASH_POINTS = [
    ("luks-amend:key-material-written", "state=active,new-secret=sec1,iter-time=10,keyslot=1"),
    ("luks-amend:slot-disabled", "state=inactive,keyslot=1"),
    ("luks-amend:scrubbing", "state=inactive,old-secret=sec1"),
]


@pytest.mark.parametrize("point,options", CRASH_POINTS, ids=[p for p, _ in CRASH_POINTS])
def test_sigkill_mid_amend(kind, base, tmp, point, options):
    """Killed after a new slot's key material is written (header not yet), or after an erased slot was marked
    inactive (key material not yet scrubbed, or half), the image opens in qemu with exactly the passphrases of
    the slots the header marks active, and its data is intact."""
    p = os.path.join(tmp, "crash." + kind.fmt)
    shutil.copyfile(base, p)
    if "inactive" in options:
        qimg("amend", *OBJ, "-o", kind.opts("state=active,new-secret=sec1,iter-time=10,keyslot=1"), "--image-opts",
             kind.spec(p))
    before = [s["active"] for s in slots(p)]
    env = dict(os.environ, INSTAR_CRASH_AT=point)
    r = run([INSTAR, "amend", *OBJ, "-o", kind.opts(options), "--image-opts", kind.spec(p)], env=env)
    assert r.rc == -9, r
    after = [s["active"] for s in slots(p)]
    if "inactive" in options:
        assert before[1] and not after[1]
        assert opens(kind, p) == ["sec0"]
    else:
        assert after == before
        assert opens(kind, p) == ["sec0"]
    if kind.fmt == "qcow2":
        check_clean(kind, p)
    # The image is usable: qemu adds a slot to it.
    qimg("amend", *OBJ, "-o", kind.opts("state=active,new-secret=sec2,iter-time=10"), "--image-opts", kind.spec(p))
    assert opens(kind, p) == ["sec0", "sec2"]


def test_hint_ends_without_newline(kind, base, tmp):
    rq, q, i = amend_both(kind, base, tmp, "state=active,new-secret=sec1,iter-time=-5")
    assert rq.err.endswith("Failed to write to keyslot 1"), rq


def test_python_binding(kind, base, tmp):
    """instar.amend with passphrases given directly (the C API's key_secret, new_secret, old_secret): the slots it
    adds open in qemu, the ones it erases no longer do, and qemu's refusals come back as exceptions."""
    import instar as pyinstar
    p = os.path.join(tmp, "py." + kind.fmt)
    shutil.copyfile(base, p)
    pw = PASSWORDS
    pyinstar.amend(p, kind.opts("state=active,iter-time=10"), key_secret=pw["sec0"], new_secret=pw["sec1"])
    # An id named in the options is filled with the passphrase.
    pyinstar.amend(p, kind.opts("state=active,iter-time=10,keyslot=4,new-secret=mine"), fmt=kind.fmt,
                   key_secret=pw["sec0"], new_secret=pw["sec2"])
    assert opens(kind, p) == ["sec0", "sec1", "sec2"]
    assert [s["active"] for s in slots(p)] == [True, True, False, False, True, False, False, False]
    pyinstar.amend(p, kind.opts("state=inactive"), key_secret=pw["sec2"], old_secret=pw["sec0"])
    assert opens(kind, p) == ["sec1", "sec2"]
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.amend(p, kind.opts("state=inactive,keyslot=1"), key_secret=pw["sec1"], old_secret=pw["sec2"])
    assert e.value.message == "Given keyslot 1 doesn't contain the given old password for erase operation"
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.amend(p, kind.opts("state=active,iter-time=10"), key_secret=pw["sec3"], new_secret=pw["sec3"])
    assert "Invalid password, cannot unlock any keyslot" in e.value.message
    pyinstar.amend(p, kind.opts("state=inactive,keyslot=1"), key_secret=pw["sec1"], force=True)
    pyinstar.amend(p, kind.opts("state=inactive,keyslot=4"), key_secret=pw["sec2"], force=True)
    assert opens(kind, p) == []


def test_hostile_key_offset_is_not_written(bases, tmp):
    """A key offset that wraps qemu's 32-bit overlap check (so the header still opens) would send the slot's
    writes terabytes past the volume; instar refuses before writing anything, and erasing leaves it alone too."""
    import struct
    kind = KINDS[0]
    p = os.path.join(tmp, "hostile.luks")
    shutil.copyfile(bases["luks"], p)
    with open(p, "r+b") as f:
        f.seek(208 + 2 * 48 + 40)
        f.write(struct.pack(">I", 0xFFFFFFFF - 100))
    assert info_json(p)["format-specific"]["data"]["slots"][2]["key-offset"] == (0xFFFFFFFF - 100) * 512
    with open(p, "rb") as f:
        before = f.read()
    for options, extra in (("state=active,new-secret=sec1,iter-time=10,keyslot=2", ()),
                           ("state=inactive,keyslot=2", ("--force",))):
        r = instar("amend", *OBJ, *extra, "-o", options, "--image-opts", kind.spec(p))
        assert r.rc == 1 and "Keyslot 2 is overlapping with the encrypted payload" in r.err, r
        with open(p, "rb") as f:
            assert f.read() == before
    assert opens(kind, p) == ["sec0"]


def test_qcow2_progress_with_upgrade_and_refcount_change(tmp):
    """-p across an upgrade, the keyslot update (which reports nothing itself) and a refcount width change."""
    kind = KINDS[1]
    base = os.path.join(tmp, "v2.qcow2")
    qimg("create", "-q", "-f", "qcow2", *OBJ, "-o", "compat=0.10,encrypt.format=luks,encrypt.key-secret=sec0,"
         "encrypt.iter-time=10", base, "1M")
    qemu_io(*OBJ, "--image-opts", kind.spec(base), "-c", PATTERN)
    options = "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,compat=1.1,refcount_bits=8"
    q, i = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    shutil.copyfile(base, q)
    shutil.copyfile(base, i)
    rq = qemu("amend", *OBJ, "-p", "-o", options, "--image-opts", kind.spec(q))
    ri = instar("amend", *OBJ, "-p", "-o", options, "--image-opts", kind.spec(i))
    assert (ri.rc, ri.out, ri.err) == (rq.rc, rq.out, rq.err)
    assert masked_info(i) == masked_info(q)
    assert opens(kind, i) == opens(kind, q) == ["sec0", "sec1"]
    check_clean(kind, i)
