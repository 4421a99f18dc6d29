"""instar_rebase through C (Tests/capi/rebase_test.c, as C99 and C++) and through the Python binding: the files
it leaves are the ones `qemu-img rebase` leaves, its errors are qemu-img's messages, and a cancelled rebase
leaves the image reading what it read before."""
import os
import shutil

import pytest

from conftest import LIBINSTAR, ROOT, qemu, qemu_io, qimg, run

import instar

SOURCE = os.path.join(ROOT, "Tests", "capi", "rebase_test.c")
HEADER_DIR = os.path.join(ROOT, "include")
LIBDIR = os.path.dirname(LIBINSTAR)
COMPILERS = {
    "c99": ["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"],
    "c++": ["c++", "-x", "c++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic"],
}


def chain(d, top="top.qcow2"):
    if not os.path.exists(os.path.join(d, "base.qcow2")):
        qimg("create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=d)
        qemu_io("-f", "qcow2", "-c", "write -P 1 0 6M", "base.qcow2", cwd=d)
        qimg("create", "-q", "-f", "qcow2", "new.qcow2", "8M", cwd=d)
        qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 3M 2M", "new.qcow2", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "8M", cwd=d)
    qemu_io("-f", "qcow2", "-c", "write -P 3 512k 64k", "-c", "write -P 4 7M 4k", top, cwd=d)


def same_file(a, b):
    with open(a, "rb") as x, open(b, "rb") as y:
        return x.read() == y.read()


@pytest.mark.parametrize("kind", sorted(COMPILERS))
def test_c_program(tmp, kind):
    exe = os.path.join(tmp, "rebase_" + kind.replace("+", "x"))
    r = run([*COMPILERS[kind], SOURCE, "-I" + HEADER_DIR, "-L" + LIBDIR, "-linstar", "-Wl,-rpath," + LIBDIR,
             "-o", exe])
    assert r.rc == 0, r
    work, ref = os.path.join(tmp, "work"), os.path.join(tmp, "ref")
    os.makedirs(work)
    for name in ("top.qcow2", "top2.qcow2", "top3.qcow2"):
        chain(work, name)
    shutil.copytree(work, ref)
    shutil.copyfile(os.path.join(work, "top3.qcow2"), os.path.join(work, "orig3.qcow2"))
    r = run([exe, work])
    assert r.rc == 0 and r.err == "", r
    lines = r.out.splitlines()
    # The reference: qemu-img on the same files, and its progress records.
    q1 = qemu("rebase", "-p", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2", cwd=ref)
    q2 = qemu("rebase", "-u", "-b", "", "top2.qcow2", cwd=ref)
    assert q1.rc == 0 and q2.rc == 0
    # run() reads text with universal newlines: qemu's "\r" after each record arrives as "\n".
    records = [x for x in q1.out.splitlines() if x.strip()]
    assert lines[0] == f"safe rc=0 calls={len(records)} last=100.00"
    assert same_file(os.path.join(work, "top.qcow2"), os.path.join(ref, "top.qcow2"))
    assert lines[1] == "unsafe rc=0"
    assert same_file(os.path.join(work, "top2.qcow2"), os.path.join(ref, "top2.qcow2"))
    assert lines[2] == "cancel rc=-8 code=-8 msg=Operation cancelled"
    c = run(["qemu-img", "check", "top3.qcow2"], cwd=work)
    assert c.rc == 0, c
    assert run(["qemu-img", "compare", "orig3.qcow2", "top3.qcow2"], cwd=work).rc == 0
    assert "backing file: base.qcow2" in run(["qemu-img", "info", "top3.qcow2"], cwd=work).out
    nob = qemu("rebase", "top.qcow2", cwd=ref).err.splitlines()[0].replace("instar: ", "")
    assert lines[3] == f"nob rc=-1 msg={nob}"
    miss = qemu("rebase", "-b", "nothere.qcow2", "-F", "qcow2", os.path.join(ref, "top.qcow2")).err.strip()
    miss = miss.replace(ref, work)
    assert lines[4] == f"missing-backing rc=-3 msg={miss.replace('instar: ', '')}"
    assert lines[5] == "missing-image rc=-3"
    nofmt = qemu("rebase", "-u", "-b", "nothere.qcow2", "top.qcow2", cwd=ref).err.strip()
    assert lines[6] == f"nofmt rc=-1 msg={nofmt.replace('instar: ', '')}"
    assert lines[7] == "null rc=-1"


MODES = {
    "safe": (dict(backing_file="new.qcow2", backing_format="qcow2"), ["-b", "new.qcow2", "-F", "qcow2"]),
    "standalone": (dict(backing_file=""), ["-b", ""]),
    "unsafe": (dict(backing_file="new.qcow2", backing_format="qcow2", unsafe=True),
               ["-u", "-b", "new.qcow2", "-F", "qcow2"]),
    "unsafe_remove": (dict(unsafe=True), ["-u"]),
    "cache": (dict(backing_file="new.qcow2", backing_format="qcow2", cache="none", source_cache="writethrough",
                   fmt="qcow2", force_share=True), ["-t", "none", "-T", "writethrough", "-f", "qcow2", "-U",
                                                    "-b", "new.qcow2", "-F", "qcow2"]),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_python_matches_qemu(tmp, mode):
    kwargs, args = MODES[mode]
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    chain(src)
    qd, idir = os.path.join(tmp, "q"), os.path.join(tmp, "i")
    shutil.copytree(src, qd)
    shutil.copytree(src, idir)
    assert qemu("rebase", "-p", *args, "top.qcow2", cwd=qd).rc == 0
    seen = []
    cwd = os.getcwd()
    os.chdir(idir)
    try:
        instar.rebase("top.qcow2", progress=lambda p: seen.append(p), **kwargs)
    finally:
        os.chdir(cwd)
    assert same_file(os.path.join(qd, "top.qcow2"), os.path.join(idir, "top.qcow2"))
    q = qemu("rebase", "-p", *args, "top.qcow2", cwd=os.path.join(tmp, "src"))
    assert ["    (%3.2f/100%%)" % p for p in seen] == [x for x in q.out.splitlines() if x.strip()]


def test_python_errors(tmp):
    chain(tmp)
    with pytest.raises(instar.InstarError) as e:
        instar.rebase(os.path.join(tmp, "top.qcow2"), backing_file="new.qcow2")
    q = qemu("rebase", "-b", "new.qcow2", os.path.join(tmp, "top.qcow2"))
    assert e.value.message.replace("qemu-img", "instar") in q.err
    with pytest.raises(instar.InstarError):
        instar.rebase(os.path.join(tmp, "top.qcow2"))
    before = open(os.path.join(tmp, "top.qcow2"), "rb").read()
    with pytest.raises(instar.InstarError):
        instar.rebase(os.path.join(tmp, "top.qcow2"), backing_file="", progress=lambda p: p > 10)
    assert run(["qemu-img", "check", os.path.join(tmp, "top.qcow2")]).rc == 0
    assert "backing file: base.qcow2" in run(["qemu-img", "info", os.path.join(tmp, "top.qcow2")]).out
    assert open(os.path.join(tmp, "top.qcow2"), "rb").read()[:512] == before[:512]
