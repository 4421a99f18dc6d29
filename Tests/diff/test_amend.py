"""amend: differential tests against qemu-img 7.2 (messages, exit codes, progress, resulting images)."""
import os
import shutil

import pytest

from conftest import check_clean, info_json as info, instar, qemu, qemu_io, qimg


def image(tmp, opts="", size="4M", writes=(), zeroes=(), name="src.qcow2"):
    path = os.path.join(tmp, name)
    qimg("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, size)
    for off, ln, pat in writes:
        qemu_io("-f", "qcow2", "-c", f"write -P {pat} {off} {ln}", path)
    for off, ln in zeroes:
        qemu_io("-f", "qcow2", "-c", f"write -z {off} {ln}", path)
    return path


def same_amend(tmp, src, args, byte_equal=True, clean=True):
    a = os.path.join(tmp, "q.qcow2")
    b = os.path.join(tmp, "i.qcow2")
    shutil.copyfile(src, a)
    shutil.copyfile(src, b)
    q = qemu("amend", *[x.replace("IMG", "q.qcow2") for x in args], cwd=tmp)
    i = instar("amend", *[x.replace("IMG", "i.qcow2") for x in args], cwd=tmp)
    assert (i.rc, i.out, i.err.replace("i.qcow2", "q.qcow2")) == (q.rc, q.out, q.err), (q, i)
    if clean:
        check_clean(b)
    else:
        # qemu's own result is not clean: instar's must be damaged the same way.
        ca, cb = qemu("check", "--output=json", a), qemu("check", "--output=json", b)
        assert (ca.rc, ca.out.replace("q.qcow2", ""), ca.err) == (cb.rc, cb.out.replace("i.qcow2", ""), cb.err)
    assert info(a) == info(b)
    r = qemu("compare", "-f", "qcow2", "-F", "qcow2", a, b)
    assert r.rc == 0, r
    if byte_equal:
        assert open(a, "rb").read() == open(b, "rb").read()
    return q


DATA = [(0, 65536, 1), (1024 * 1024, 256 * 1024, 2), (4 * 1024 * 1024 - 4096, 4096, 3)]
ZEROES = [(2 * 1024 * 1024, 128 * 1024), (3 * 1024 * 1024, 64 * 1024)]

CASES = [
    ("", ["-o", "compat=0.10", "IMG"]),
    ("", ["-p", "-o", "compat=0.10", "IMG"]),
    ("cluster_size=4096", ["-o", "compat=v2", "IMG"]),
    ("compat=0.10", ["-o", "compat=1.1", "IMG"]),
    ("compat=0.10", ["-p", "-o", "compat=v3", "IMG"]),
    ("compat=0.10,cluster_size=2M", ["-o", "compat=1.1", "IMG"]),
    ("", ["-o", "lazy_refcounts=on", "IMG"]),
    ("lazy_refcounts=on", ["-o", "lazy_refcounts=off", "IMG"]),
    ("lazy_refcounts=on", ["-o", "compat=0.10", "IMG"]),
    ("compat=0.10", ["-o", "compat=1.1,lazy_refcounts=on", "IMG"]),
    ("compat=0.10", ["-o", "lazy_refcounts=on", "IMG"]),
    ("", ["-o", "size=8M", "IMG"]),
    ("", ["-o", "size=2M", "IMG"]),
    ("", ["-o", "size=0", "IMG"]),
    ("", ["-o", "size=1000", "IMG"]),
    ("", ["-o", "size=8M,compat=0.10", "IMG"]),
    ("", ["-o", "refcount_bits=16", "IMG"]),
    ("", ["-o", "refcount_bits=3", "IMG"]),
    ("", ["-o", "refcount_bits=1", "IMG"]),
    ("", ["-p", "-o", "refcount_bits=64", "IMG"]),
    ("refcount_bits=64", ["-o", "refcount_bits=2", "IMG"]),
    # (qemu's refcount-width change is slow on 64k clusters at 1-4 bits: 4096 and 16384 keep it to a second; the
    # 64k and 512 byte cluster widths are covered by test_refcount_bits.)
    ("cluster_size=4096,refcount_bits=1", ["-o", "refcount_bits=8", "IMG"]),
    ("compat=0.10", ["-p", "-o", "compat=1.1,refcount_bits=4", "IMG"]),
    ("cluster_size=16384,refcount_bits=4", ["-p", "-o", "refcount_bits=16,compat=0.10", "IMG"]),
    ("lazy_refcounts=on", ["-o", "refcount_bits=32", "IMG"]),
    ("", ["-o", "compat=0.10,refcount_bits=8", "IMG"]),
    ("refcount_bits=8", ["-o", "compat=0.10", "IMG"]),
    ("cluster_size=16384,extended_l2=on", ["-o", "compat=0.10", "IMG"]),
    ("compression_type=zstd", ["-o", "compat=0.10", "IMG"]),
    ("", ["-o", "compat=bad", "IMG"]),
    ("", ["-o", "cluster_size=4k", "IMG"]),
    ("", ["-o", "foo=1", "IMG"]),
    ("", ["-o", "lazy_refcounts=maybe", "IMG"]),
    ("", ["-o", "size=1x", "IMG"]),
    ("", ["-o", "refcount_bits=x", "IMG"]),
    ("", ["-o", "data_file=x", "IMG"]),
    ("", ["-o", "data_file_raw=on", "IMG"]),
    ("", ["-o", "data_file_raw=off", "IMG"]),
    ("", ["-o", "encrypt.state=active", "IMG"]),
    ("", ["-o", "backing_file=x.qcow2", "IMG"]),
    ("", ["IMG"]),
    ("", ["-o", "", "IMG"]),
    ("", ["-o", "compat=1.1"]),
    ("", ["-o", "help", "IMG"]),
    ("", ["-f", "qcow2", "-o", "help"]),
    ("", ["-f", "raw", "-o", "help"]),
    ("", ["-f", "nosuch", "-o", "help"]),
    ("", ["-f", "raw", "-o", "size=1M", "IMG"]),
    ("", ["-q", "-p", "-o", "compat=0.10", "IMG"]),
    ("", ["-t", "bogus", "-o", "compat=0.10", "IMG"]),
]


@pytest.mark.parametrize("opts,args", CASES, ids=[f"{o}|{' '.join(a)}" for o, a in CASES])
def test_amend(tmp, opts, args):
    src = image(tmp, opts, writes=DATA, zeroes=ZEROES if "compat=0.10" not in opts else ())
    same_amend(tmp, src, args)


@pytest.mark.parametrize("args", [["-o", "compat=0.10", "IMG"], ["-p", "-o", "compat=0.10", "IMG"]])
def test_downgrade_with_backing(tmp, args):
    base = image(tmp, writes=[(0, 4 * 1024 * 1024, 9)], name="base.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 1M 192k", "-c", "write -P 2 3M 64k",
            "-c", "write -z 3M 64k", top)
    same_amend(tmp, top, args)


def test_backing_unchanged(tmp):
    image(tmp, name="base.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "4M")
    same_amend(tmp, top, ["-o", "backing_file=base.qcow2,backing_fmt=qcow2", "IMG"])
    same_amend(tmp, top, ["-o", "backing_file=base.qcow2", "IMG"])
    same_amend(tmp, top, ["-o", "backing_fmt=raw", "IMG"])


def test_snapshots(tmp):
    src = image(tmp, writes=DATA)
    qimg("snapshot", "-c", "s1", src)
    same_amend(tmp, src, ["-o", "compat=0.10", "IMG"])
    same_amend(tmp, src, ["-o", "lazy_refcounts=on", "IMG"])
    same_amend(tmp, src, ["-o", "size=8M", "IMG"])


REFCOUNT_LAYOUTS = [
    # (create options, image size, extra qemu-io commands)
    ("cluster_size=512", "4M", []),
    ("cluster_size=512,refcount_bits=1", "16M", ["write -P 7 8M 2M"]),
    ("cluster_size=1024,refcount_bits=64", "8M", ["write -P 7 5M 1M"]),
    ("cluster_size=65536", "64M", ["write -P 7 40M 4M"]),
]


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("layout", range(len(REFCOUNT_LAYOUTS)))
def test_refcount_bits(tmp, layout, bits):
    opts, size, cmds = REFCOUNT_LAYOUTS[layout]
    src = image(tmp, opts, size=size, writes=DATA, zeroes=ZEROES)
    args = ["-f", "qcow2", "-c", "write -c -P 4 3M 64k"]
    for c in cmds:
        args += ["-c", c]
    qemu_io(*args, src)
    same_amend(tmp, src, ["-p", "-o", f"refcount_bits={bits}", "IMG"])


@pytest.mark.parametrize("bits", [1, 2, 8, 64])
def test_refcount_bits_snapshots(tmp, bits):
    src = image(tmp, "cluster_size=4096", writes=DATA, zeroes=ZEROES)
    qemu_io("-f", "qcow2", "-c", "write -c -P 4 3M 64k", src)
    qimg("snapshot", "-c", "s1", src)
    qemu_io("-f", "qcow2", "-c", "write -P 5 1M 64k", src)
    qimg("snapshot", "-c", "s2", src)
    # 1 bit cannot hold the refcount 2 of shared clusters: qemu's error, image left as qemu leaves it.
    same_amend(tmp, src, ["-o", f"refcount_bits={bits}", "IMG"])


def strip_snapshot_extra(path, keep):
    """Rewrites the snapshot table in place with only `keep` bytes of extra data per entry (as v2 writers
    other than qemu leave it)."""
    import struct
    with open(path, "r+b") as f:
        nb, off = struct.unpack(">IQ", f.read(72)[60:72])
        pos, entries = off, []
        for _ in range(nb):
            pos = (pos + 7) & ~7
            f.seek(pos)
            h = bytearray(f.read(40))
            ids, ns = struct.unpack(">HH", h[12:16])
            ex = struct.unpack(">I", h[36:40])[0]
            extra, idb, name = f.read(ex), f.read(ids), f.read(ns)
            entries.append((h, extra, idb, name))
            pos += 40 + ex + ids + ns
        out = bytearray()
        for h, extra, idb, name in entries:
            out += bytes(-len(out) % 8)
            h[36:40] = struct.pack(">I", keep)
            out += h + extra[:keep] + idb + name
        out += bytes(max(0, pos - off - len(out)))
        f.seek(off)
        f.write(out)


@pytest.mark.parametrize("keep", [0, 8, 16])
def test_upgrade_snapshots_without_extra_data(tmp, keep):
    src = image(tmp, "compat=0.10", writes=DATA)
    qimg("snapshot", "-c", "s1", src)
    qemu_io("-f", "qcow2", "-c", "write -P 7 0 64k", src)
    qimg("snapshot", "-c", "second", src)
    strip_snapshot_extra(src, keep)
    same_amend(tmp, src, ["-p", "-o", "compat=1.1", "IMG"])


@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("args", [["-o", "compat=0.10", "IMG"], ["-p", "-o", "compat=0.10,refcount_bits=16", "IMG"]])
def test_downgrade_zero_clusters_in_snapshots(tmp, backing, args):
    if backing:
        image(tmp, writes=[(0, 4 * 1024 * 1024, 9)], name="base.qcow2")
        src = os.path.join(tmp, "src.qcow2")
        qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", src, "4M")
    else:
        # 16k clusters: qemu's change from 4-bit refcounts takes seconds at 64k (the zeroes stay cluster-aligned).
        src = image(tmp, "cluster_size=16384,refcount_bits=4" if "refcount_bits=16" in " ".join(args) else "")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 1M 192k", "-c", "write -z 3M 64k", src)
    qimg("snapshot", "-c", "s1", src)
    qemu_io("-f", "qcow2", "-c", "write -z 2M 64k", "-c", "write -P 3 1M 64k", src)
    qimg("snapshot", "-c", "s2", src)
    same_amend(tmp, src, args)
    # A zeroed cluster still shared with the snapshots: qemu writes zeroes into it and marks it copied.
    qemu_io("-f", "qcow2", "-c", "write -z 0 64k", src)
    same_amend(tmp, src, args, clean=False)
