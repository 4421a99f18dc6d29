"""The C ABI from C and C++: Tests/capi/abi_test.c calls every function of include/instar.h, built with
`cc -std=c99 -pedantic -Werror` and as C++, linked against build/lib/libinstar.so and against an installed copy
found through pkg-config. What it leaves behind (images it wrote, the texts the library returned) is compared
with what qemu-img says about the same files."""
import json
import os
import shutil

import pytest

from conftest import BUILD, LIBINSTAR, ROOT, qimg, run

SOURCE = os.path.join(ROOT, "Tests", "capi", "abi_test.c")
HEADER_DIR = os.path.join(ROOT, "include")
LIBDIR = os.path.dirname(LIBINSTAR)
CFLAGS = ["-Wall", "-Wextra", "-Werror", "-pedantic"]
COMPILERS = {
    "c99": ["cc", "-std=c99", *CFLAGS],
    "c++": ["c++", "-x", "c++", "-std=c++11", *CFLAGS],
}


def build(tmp, kind, flags):
    exe = os.path.join(tmp, "abi_" + kind.replace("+", "x"))
    r = run([*COMPILERS[kind], SOURCE, *flags, "-o", exe])
    assert r.rc == 0, r
    return exe


def run_program(exe, tmp, env=None):
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    r = run([exe, work], env=env)
    assert r.rc == 0 and r.err == "", r
    lines = r.out.splitlines()
    assert lines[-1].startswith("ok ") and lines[-1].endswith(", 0 failed"), r.out
    assert not any(line.startswith("FAIL") for line in lines)
    return work, lines


def qemu_out(*args):
    r = run(["qemu-img", *args])
    assert r.rc == 0, r
    return r.out


def expected_contents():
    """The guest bytes abi_test.c leaves in a.qcow2."""
    data = bytearray(4 << 20)
    data[0:65536] = b"\x5a" * 65536
    data[1 << 20:(1 << 20) + 4096] = b"\xa5" * 4096
    return bytes(data)


def assert_outputs_match_qemu(work):
    a, b = os.path.join(work, "a.qcow2"), os.path.join(work, "b.raw")
    # The image written through instar_write/_zeroes/discard: qemu-img finds it clean and reads the same bytes.
    assert run(["qemu-img", "check", a]).rc == 0
    raw = os.path.join(work, "a.check.raw")
    qimg("convert", "-O", "raw", a, raw)
    with open(raw, "rb") as f:
        assert f.read() == expected_contents()
    with open(b, "rb") as f:
        assert f.read() == expected_contents()
    # Texts and structs the library returned, against qemu-img on the same files.
    with open(os.path.join(work, "info.json")) as f:
        assert f.read() == qemu_out("info", "--output=json", a)
    with open(os.path.join(work, "info.txt")) as f:
        assert f.read() == qemu_out("info", a)
    with open(os.path.join(work, "check.json")) as f:
        assert f.read() == qemu_out("check", "--output=json", a)
    with open(os.path.join(work, "compare.txt")) as f:
        assert f.read() == qemu_out("compare", a, b)
    # size_text "1k": the line qemu-img create prints for the same request.
    with open(os.path.join(work, "formatting.txt")) as f:
        assert f.read() == qemu_out("create", "-f", "raw", os.path.join(work, "fmt.raw"), "1k")
    qmap = json.loads(qemu_out("map", "--output=json", a))
    with open(os.path.join(work, "map.txt")) as f:
        rows = [list(map(int, line.split())) for line in f]
    assert [[e["start"], e["length"], e["depth"], int(e["present"]), int(e["zero"]), int(e["data"]),
             e.get("offset", -1)] for e in qmap] == rows
    qm = json.loads(qemu_out("measure", "--output=json", "-O", "qcow2", a))
    with open(os.path.join(work, "measure.txt")) as f:
        assert f.read().split() == [str(qm["required"]), str(qm["fully-allocated"])]
    # Resize and amend results as qemu-img sees them.
    assert json.loads(qemu_out("info", "--output=json", "-f", "raw", os.path.join(work, "r.raw")))["virtual-size"] \
        == 2 << 20
    c = os.path.join(work, "c.qcow2")
    assert json.loads(qemu_out("info", "--output=json", c))["format-specific"]["data"]["lazy-refcounts"] is True
    assert run(["qemu-img", "check", c]).rc == 0


@pytest.mark.parametrize("kind", sorted(COMPILERS))
def test_abi_program(tmp, kind):
    exe = build(tmp, kind, ["-I" + HEADER_DIR, "-L" + LIBDIR, "-linstar", "-Wl,-rpath," + LIBDIR])
    work, lines = run_program(exe, tmp)
    assert_outputs_match_qemu(work)


def test_header_compiles_alone(tmp):
    """instar.h includes what it uses: a file holding only the include compiles as C99 and as C++."""
    src = os.path.join(tmp, "only.c")
    with open(src, "w") as f:
        f.write("#include <instar.h>\nint main(void) { return INSTAR_OK; }\n")
    for kind in COMPILERS:
        r = run([*COMPILERS[kind], "-I" + HEADER_DIR, "-fsyntax-only", src])
        assert r.rc == 0, r


def test_pkg_config_install(tmp):
    """`make install-only PREFIX=...` (the install steps of `make install`, from the existing build/) gives a
    prefix whose pkg-config file compiles and links the program."""
    if shutil.which("pkg-config") is None:
        pytest.skip("pkg-config is not installed")
    prefix = os.path.join(tmp, "prefix")
    r = run(["make", "-s", "-C", ROOT, "install-only", "PREFIX=" + prefix, "OUT=" + BUILD])
    assert r.rc == 0, r
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(prefix, "lib", "pkgconfig"))
    flags = run(["pkg-config", "--cflags", "--libs", "instar"], env=env)
    assert flags.rc == 0, flags
    assert "-I" + os.path.join(prefix, "include") in flags.out and "-linstar" in flags.out
    version = run(["pkg-config", "--modversion", "instar"], env=env)
    exe = build(tmp, "c99", flags.out.split())
    run_env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(prefix, "lib"))
    work, lines = run_program(exe, tmp, env=run_env)
    # The installed library is the one that ran, and its version is the one pkg-config reports.
    assert lines[0] == "version " + version.out.strip()
    ldd = run(["ldd", exe], env=run_env)
    assert os.path.join(prefix, "lib", "libinstar.so") in ldd.out, ldd
