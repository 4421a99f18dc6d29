"""`dd` against qemu-img 7.2 (every plain case: exit code, messages, the output file byte for byte), and
Proxmox's extensions (pve-qemu's qemu-img dd patches: osize=, isize=, stdin/stdout for raw, -n, -l), which have
no reference binary here, against what the patches document and do.
"""
import os
import shutil
import subprocess

import pytest

from conftest import INSTAR, instar, qemu, qemu_io, qimg, run


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dd"))
    q = os.path.join(d, "in.qcow2")
    qimg("create", "-q", "-f", "qcow2", q, "10M")
    qemu_io("-f", "qcow2", "-c", "write -P 7 0 1M", "-c", "write -P 9 5M 100k", "-c", "write -P 3 9M 1000", q)
    raw = os.path.join(d, "in.raw")
    qimg("convert", "-O", "raw", q, raw)
    odd = os.path.join(d, "odd.raw")
    with open(odd, "wb") as f:
        f.write(bytes(range(256)) * 4000 + b"tail")
    base = os.path.join(d, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 4M", base)
    top = os.path.join(d, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", "write -P 2 1M 512k", top)
    return d


def dd_same(src, tmp, args, out_name="o.img"):
    """Runs `dd ARGS` in a copy of the source folder per tool; messages and the output file must match."""
    res = {}
    for tool in ("q", "i"):
        d = os.path.join(tmp, tool)
        shutil.copytree(src, d)
        r = qemu("dd", *args, cwd=d) if tool == "q" else instar("dd", *args, cwd=d)
        o = os.path.join(d, out_name)
        res[tool] = (r.rc, r.out, r.err, open(o, "rb").read() if os.path.exists(o) else None)
    assert res["i"][:3] == res["q"][:3], (res["q"][:3], res["i"][:3])
    assert res["i"][3] == res["q"][3], "output files differ"
    return res["q"]


CASES = [
    ["if=in.qcow2", "of=o.img"],
    ["-O", "qcow2", "if=in.qcow2", "of=o.img"],
    ["-O", "qcow2", "bs=64k", "if=in.qcow2", "of=o.img"],
    ["-O", "qcow2", "bs=1000", "count=3000", "if=in.qcow2", "of=o.img"],
    ["-f", "raw", "-O", "qcow2", "bs=4k", "skip=100", "if=in.raw", "of=o.img"],
    ["bs=4k", "skip=10000", "if=in.raw", "of=o.img"],
    ["bs=4k", "count=0", "if=in.raw", "of=o.img"],
    ["bs=4k", "count=99999999", "if=in.raw", "of=o.img"],
    ["bs=1M", "skip=3", "count=2", "if=in.raw", "of=o.img"],
    ["bs=7", "count=1000", "skip=3", "if=odd.raw", "of=o.img"],
    ["bs=4096", "if=odd.raw", "of=o.img"],
    ["-O", "qcow2", "bs=333", "if=odd.raw", "of=o.img"],
    ["bs=64k", "if=top.qcow2", "of=o.img"],
    ["-O", "qcow2", "bs=256k", "if=top.qcow2", "of=o.img"],
    ["-U", "if=in.qcow2", "of=o.img"],
    ["--image-opts", "bs=1M", "if=driver=qcow2,file.filename=in.qcow2", "of=o.img"],
    ["--image-opts", "-f", "qcow2", "if=driver=qcow2,file.filename=in.qcow2", "of=o.img"],
    ["-f", "raw", "bs=1M", "if=in.qcow2", "of=o.img"],
    ["-f", "qcow2", "if=in.raw", "of=o.img"],
    ["--object", "secret,id=s,data=x", "bs=1M", "if=in.raw", "of=o.img"],
    ["bs=0", "if=in.raw", "of=o.img"],
    ["bs=3G", "if=in.raw", "of=o.img"],
    ["bs=x", "if=in.raw", "of=o.img"],
    ["count=-1", "if=in.raw", "of=o.img"],
    ["skip=1Q", "if=in.raw", "of=o.img"],
    ["foo=1", "if=in.raw", "of=o.img"],
    ["foo", "if=in.raw", "of=o.img"],
    ["if=in.raw"],
    ["of=o.img"],
    [],
    ["-O", "bogus", "if=in.raw", "of=o.img"],
    ["if=missing", "of=o.img"],
    ["if=in.raw", "of=/nonexistent/o.img"],
    ["--bogus", "if=in.raw", "of=o.img"],
    ["-O"],
]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a) or "none")
def test_dd(src, tmp, args):
    dd_same(src, tmp, args)


# ---- Proxmox extensions (no reference binary: the patches' documented behaviour) -----------------------

def pve(args, cwd, stdin=None, env=None):
    p = subprocess.run([INSTAR, "dd", *args], cwd=cwd, input=stdin, capture_output=True, env=env)
    return p.returncode, p.stdout, p.stderr.decode()


def test_pve_stdout(src, tmp):
    """Without of= (raw output) the image streams to stdout."""
    data = open(os.path.join(src, "in.raw"), "rb").read()
    rc, out, err = pve(["-O", "raw", "osize=10M", "bs=64k", "if=in.qcow2"], src)
    assert (rc, err) == (0, "") and out == data
    rc, out, err = pve(["-O", "qcow2", "osize=1M", "if=in.raw"], src)
    assert rc == 1 and err == "instar: Output format must be raw when writing to stdout\n" and out == b""


def test_pve_stdin(src, tmp):
    """Without if= (-f raw) the input is read from stdin; osize= gives the created output's size."""
    data = open(os.path.join(src, "in.raw"), "rb").read()
    rc, _, err = pve(["-f", "raw", "osize=10M", "bs=64k", "of=o.raw"], tmp, stdin=data)
    assert (rc, err) == (0, "")
    assert open(os.path.join(tmp, "o.raw"), "rb").read() == data
    rc, _, err = pve(["-f", "raw", "-O", "qcow2", "osize=10M", "bs=1M", "of=o.qcow2"], tmp, stdin=data)
    assert (rc, err) == (0, "")
    assert run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", os.path.join(src, "in.raw"),
                os.path.join(tmp, "o.qcow2")]).rc == 0
    assert run(["qemu-img", "check", os.path.join(tmp, "o.qcow2")]).rc == 0
    # Input format not raw, or no size for the output.
    rc, _, err = pve(["osize=1M", "of=x.raw"], tmp, stdin=b"")
    assert rc == 1 and err == "instar: Input format must be raw when readin from stdin\n"
    rc, _, err = pve(["-f", "raw", "of=x.raw", "isize=0"], tmp, stdin=b"")
    assert rc == 1 and err == "instar: Output size must be known when reading from stdin\n"
    # count= sizes the output when neither osize= nor an input file does (a raw file is created in whole
    # sectors, as qemu-img create makes it).
    rc, _, err = pve(["-f", "raw", "bs=1000", "count=3", "of=c.raw", "isize=0"], tmp, stdin=b"a" * 3000)
    assert (rc, err) == (0, "") and open(os.path.join(tmp, "c.raw"), "rb").read() == b"a" * 3000 + bytes(72)


def test_pve_isize(src, tmp):
    """A short stdin is an error ("Input ended unexpectedly") unless isize=0 says the end is expected;
    isize=N reads N bytes into a larger output, the rest of which stays zero."""
    data = open(os.path.join(src, "in.raw"), "rb").read()[:1000000]
    rc, _, err = pve(["-f", "raw", "osize=10M", "bs=64k", "of=a.raw"], tmp, stdin=data)
    assert rc == 1 and err == "instar: Input ended unexpectedly\n"
    for args in (["isize=0"], ["isize=1000000"]):
        rc, _, err = pve(["-f", "raw", "osize=2M", "bs=64k", "of=b.raw", *args], tmp, stdin=data)
        assert (rc, err) == (0, "")
        got = open(os.path.join(tmp, "b.raw"), "rb").read()
        assert len(got) == 2 << 20 and got[:1000000] == data and got[1000000:] == bytes(len(got) - 1000000)


def test_pve_no_create(src, tmp):
    """-n writes into an existing target (its size and format kept) instead of creating one."""
    t = os.path.join(tmp, "t.qcow2")
    qimg("create", "-q", "-f", "qcow2", t, "20M")
    rc, _, err = pve(["-n", "-O", "qcow2", "bs=1M", f"if={src}/in.raw", f"of={t}"], tmp)
    assert (rc, err) == (0, "")
    assert run(["qemu-img", "info", t]).out.count("20 MiB") == 1
    c = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", os.path.join(src, "in.raw"), t])
    assert c.rc == 0, c
    rc, _, err = pve(["-n", "bs=1M", f"if={src}/in.raw", "of=missing.raw"], tmp)
    assert rc == 1 and err.startswith("instar: Could not open 'missing.raw': ")


def test_pve_snapshot(src, tmp):
    """-l reads an internal snapshot of the input (by id or name, or snapshot.name=/snapshot.id=)."""
    sn = os.path.join(tmp, "sn.qcow2")
    shutil.copyfile(os.path.join(src, "in.qcow2"), sn)
    qimg("snapshot", "-c", "s1", sn)
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 2M", sn)
    want = open(os.path.join(src, "in.raw"), "rb").read()
    for sel in ("s1", "1", "snapshot.name=s1", "snapshot.id=1"):
        rc, _, err = pve(["-l", sel, f"if={sn}", "of=o.raw", "bs=1M"], tmp)
        assert (rc, err) == (0, ""), sel
        assert open(os.path.join(tmp, "o.raw"), "rb").read() == want
    rc, _, err = pve(["-l", "nope", f"if={sn}", "of=o.raw"], tmp)
    assert rc == 1 and err.startswith("instar: Failed to load snapshot: ")
    rc, _, err = pve(["-l", "snapshot.bogus=1", f"if={sn}", "of=o.raw"], tmp)
    assert rc == 1 and "Failed in parsing snapshot param 'snapshot.bogus=1'" in err


def test_pve_env_selects_streams(src, tmp):
    """Plain qemu-img's "Must specify both input and output files" stays unless INSTAR_PVE=1 (or a Proxmox
    extension) asks for streams."""
    rc, _, err = pve(["if=in.raw"], src)
    assert rc == 1 and err == "instar: Must specify both input and output files\n"
    env = dict(os.environ, INSTAR_PVE="1")
    data = open(os.path.join(src, "in.raw"), "rb").read()
    rc, out, err = pve(["-f", "raw", "bs=1M", "if=in.raw"], src, env=env)
    assert (rc, err) == (0, "") and out == data


def test_dd_encrypted_input(src, tmp):
    """A LUKS-encrypted qcow2 input through --object secret and --image-opts; without the key both refuse."""
    e = os.path.join(src, "e.qcow2")
    if not os.path.exists(e):
        qimg("create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw", "-o",
             "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", e, "4M")
        run(["qemu-io", "--object", "secret,id=s,data=pw", "--image-opts",
             f"driver=qcow2,file.filename={e},encrypt.key-secret=s", "-c", "write -P 5 0 1M"])
    dd_same(src, tmp, ["--object", "secret,id=s,data=pw", "--image-opts", "bs=64k",
                       "if=driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s", "of=o.img"])
    shutil.rmtree(os.path.join(tmp, "q"))
    shutil.rmtree(os.path.join(tmp, "i"))
    dd_same(src, tmp, ["if=e.qcow2", "of=o.img"])
