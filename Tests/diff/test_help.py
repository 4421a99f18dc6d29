"""`--help`/`-h` and `--version`/`-V` against qemu-img 7.2: the same layout line for line (callers grep it), with
instar's own version beside the qemu-img version it follows, and `Supported formats:` listing what instar opens.
Also run under the name `qemu-img`, as installed drop-ins are, through the regexes callers apply."""
import os
import re

import pytest

from conftest import INSTAR, assert_same, qemu, run

VERSION_LINE = re.compile(r"^(\S+) version ([0-9.]+) \((.*)\)$")


def as_qemu_img(tmp, *args):
    """Runs instar through a link named qemu-img, as a drop-in install does."""
    link = os.path.join(tmp, "qemu-img")
    if not os.path.exists(link):
        os.symlink(INSTAR, link)
    return run([link, *args])


def real(*args):
    return run(["qemu-img", *args])


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("sub", [[], ["info"], ["convert"], ["check"], ["map"], ["create"], ["measure"], ["amend"], ["compare"]],
                         ids=lambda s: s[0] if s else "top")
def test_help_layout(tmp, flag, sub):
    q = real(*sub, flag)
    i = as_qemu_img(tmp, *sub, flag)
    assert (i.rc, i.err) == (q.rc, q.err) == (0, "")
    ql, il = q.out.split("\n"), i.out.split("\n")
    assert len(il) == len(ql)
    for n, (a, b) in enumerate(zip(ql, il)):
        if n == 0:
            ma, mb = VERSION_LINE.match(a), VERSION_LINE.match(b)
            assert ma and mb, (a, b)
            assert (mb.group(1), mb.group(2)) == (ma.group(1), ma.group(2))
            assert mb.group(3).startswith("instar ")
        elif a.startswith("Supported formats:"):
            assert b.startswith("Supported formats: ")
        else:
            assert a == b, (n, a, b)


def supported_formats(text):
    # oslo.utils' way: the words after "Supported formats:".
    line = [x for x in text.splitlines() if x.startswith("Supported formats:")]
    assert len(line) == 1
    return line[0].split(":", 1)[1].split()


def test_supported_formats_are_what_instar_opens(tmp):
    names = supported_formats(as_qemu_img(tmp, "--help").out)
    assert names == sorted(names) and len(set(names)) == len(names)
    assert {"raw", "qcow2"} <= set(names)
    # Every name is one qemu-img 7.2 knows too, and one instar accepts as a format: -f NAME never gives
    # "Unknown driver" nor "not supported by instar".
    assert set(names) <= set(supported_formats(real("--help").out))
    img = os.path.join(tmp, "x.raw")
    with open(img, "wb") as f:
        f.write(b"\0" * 65536)
    for name in names:
        r = run([INSTAR, "info", "-f", name, img])
        assert "Unknown driver" not in r.err and "not supported by instar" not in r.err, (name, r)


def test_vdsm_bitmap_probe(tmp):
    # VDSM's bitmaps_supported() looks for the bitmap command line in the help text.
    q, i = real("--help").out, as_qemu_img(tmp, "--help").out
    line = [x for x in q.splitlines() if x.startswith("  bitmap ")]
    assert line and line[0] in i.splitlines()


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(tmp, flag):
    q, i = real(flag), as_qemu_img(tmp, flag)
    assert (i.rc, i.err) == (q.rc, q.err) == (0, "")
    ql, il = q.out.split("\n"), i.out.split("\n")
    assert il[1:] == ql[1:]
    # Cinder: `qemu-img version ([0-9\.]*)`, then compared as a version (force-share needs >= 2.10).
    qv = re.search(r"qemu-img version ([0-9\.]*)", q.out).group(1)
    iv = re.search(r"qemu-img version ([0-9\.]*)", i.out).group(1)
    assert iv == qv
    assert tuple(int(x) for x in iv.split(".")) >= (2, 10)
    # os-brick and others: major.minor.micro at the start of the first line.
    assert re.match(r"qemu-img version (\d+)\.(\d+)\.(\d+)", i.out)
    assert "instar" in il[0]


@pytest.mark.parametrize("args", [[], ["--bogus"], ["-T"], ["-T", "x"], ["-x", "info"], ["-T", "enable=ev,file=t.log"], ["-T", "qcow2*", "nosuch"],
                                  ["nosuch"], ["--", "nosuch"], ["-Tx"]], ids=lambda a: " ".join(a) or "none")
def test_top_level_errors(args):
    assert_same(*args)


def test_version_under_own_name():
    # Run as instar, the line names instar and still carries the qemu-img version in the same place.
    r = run([INSTAR, "--version"])
    q = qemu("--version")
    m = VERSION_LINE.match(r.out.splitlines()[0])
    assert r.rc == 0 and m and m.group(1) == "instar"
    assert m.group(2) == VERSION_LINE.match(q.out.splitlines()[0]).group(2)
