"""qemu-img create parity: the Formatting line, messages and exit codes, and byte-identical images."""
import filecmp
import os

import pytest

from conftest import both, qimg, qemu_io


def run_pair(tmp, opts, size, name="img"):
    """Runs qemu-img and instar create with the same arguments on two files; returns (q, i, qpath, ipath)."""
    qpath, ipath = os.path.join(tmp, "q_" + name), os.path.join(tmp, "i_" + name)
    from conftest import qemu, instar
    q = qemu("create", *opts, "q_" + name, *([size] if size is not None else []), cwd=tmp)
    i = instar("create", *opts, "i_" + name, *([size] if size is not None else []), cwd=tmp)
    norm = lambda s: s.replace("q_" + name, "X").replace("i_" + name, "X")
    assert (i.rc, norm(i.out), norm(i.err)) == (q.rc, norm(q.out), norm(q.err)), f"{opts} {size}\n{q}\n{i}"
    return q, i, qpath, ipath


BYTE_CASES = [
    (["-f", "qcow2"], "64M"),
    (["-f", "qcow2"], "0"),
    (["-f", "qcow2"], "100000"),
    (["-f", "qcow2"], "1.5G"),
    (["-f", "qcow2", "-o", "compat=0.10"], "1G"),
    (["-f", "qcow2", "-o", "compat=v2"], "10M"),
    (["-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on"], "10M"),
    (["-f", "qcow2", "-o", "cluster_size=512"], "10M"),
    (["-f", "qcow2", "-o", "cluster_size=4k"], "10M"),
    (["-f", "qcow2", "-o", "cluster_size=8k"], "10M"),
    (["-f", "qcow2", "-o", "cluster_size=2M"], "10G"),
    (["-f", "qcow2", "-o", "extended_l2=on"], "1G"),
    (["-f", "qcow2", "-o", "refcount_bits=1"], "10M"),
    (["-f", "qcow2", "-o", "refcount_bits=64"], "10M"),
    (["-f", "qcow2", "-o", "compression_type=zstd"], "10M"),
    (["-f", "qcow2", "-o", "preallocation=metadata"], "3M"),
    (["-f", "qcow2", "-o", "preallocation=metadata"], "3G"),
    (["-f", "qcow2", "-o", "preallocation=metadata,cluster_size=512"], "20M"),
    (["-f", "qcow2", "-o", "preallocation=metadata,cluster_size=512,refcount_bits=64"], "50M"),
    (["-f", "qcow2", "-o", "preallocation=metadata,extended_l2=on"], "1G"),
    (["-f", "qcow2", "-o", "preallocation=metadata,refcount_bits=4"], "10M"),
    (["-f", "qcow2", "-o", "preallocation=falloc"], "3M"),
    (["-f", "qcow2", "-o", "preallocation=falloc"], "2100M"),
    (["-f", "qcow2", "-o", "preallocation=falloc,cluster_size=4k"], "100M"),
    (["-f", "qcow2", "-o", "preallocation=falloc,cluster_size=512,refcount_bits=64"], "30M"),
    (["-f", "qcow2", "-o", "preallocation=full"], "3M"),
    (["-f", "qcow2", "-o", "preallocation=full,extended_l2=on"], "5M"),
    (["-f", "qcow2", "-o", "data_file=df.raw"], "1M"),
    (["-f", "qcow2", "-o", "data_file=df.raw,data_file_raw=on"], "1M"),
    (["-f", "qcow2", "-o", "data_file=df.raw,preallocation=full"], "2M"),
    (["-f", "qcow2", "-o", "nocow=on"], "1M"),
    (["-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2"], "1M"),
    (["-f", "qcow2", "-b", "base.raw", "-F", "raw"], "1M"),
    (["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"], None),
    (["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "compat=0.10"], "20M"),
    (["-f", "qcow2", "-b", "base.raw", "-F", "raw"], None),
    (["-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "cluster_size=512"], "1M"),
    (["-q", "-f", "qcow2"], "1M"),
    (["-f", "raw"], "1.5G"),
    (["-f", "raw"], "100000"),
    ([], "1M"),
    (["-f", "raw", "-o", "preallocation=falloc"], "1M"),
    (["-f", "raw", "-o", "preallocation=full"], "1M"),
    (["-f", "raw", "-o", "preallocation=off,nocow=on,extent_size_hint=1M"], "1M"),
    (["-f", "raw", "-o", "preallocation=metadata"], "1M"),
]


@pytest.mark.parametrize("opts,size", BYTE_CASES)
def test_create_bytes(tmp, opts, size):
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "base.qcow2"), "10M")
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "base.raw"), "5M")
    opts = [o.replace("df.raw", "q_df.raw") for o in opts]
    q, i, qp, ip = run_pair(tmp, opts, size)
    if os.path.exists(qp):
        assert filecmp.cmp(qp, ip, shallow=False), f"{opts} {size}: images differ"
        # Allocation matters too (falloc/full vs sparse). st_blocks also counts the filesystem's own extent-tree
        # blocks, which differ by a block or two with the write pattern, so allow 64 KiB of slack.
        assert abs(os.stat(qp).st_blocks - os.stat(ip).st_blocks) <= 128


MESSAGE_CASES = [
    (["-f", "qcow2", "-o", "cluster_size=1000"], "1M"),
    (["-f", "qcow2", "-o", "extended_l2=on,cluster_size=8k"], "1M"),
    (["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on"], "1M"),
    (["-f", "qcow2", "-o", "compat=0.10,extended_l2=on"], "1M"),
    (["-f", "qcow2", "-o", "compat=0.10,refcount_bits=8"], "1M"),
    (["-f", "qcow2", "-o", "compat=0.10,data_file=x"], "1M"),
    (["-f", "qcow2", "-o", "compat=0.10,compression_type=zstd"], "1M"),
    (["-f", "qcow2", "-o", "refcount_bits=3"], "1M"),
    (["-f", "qcow2", "-o", "refcount_bits=128"], "1M"),
    (["-f", "qcow2", "-o", "refcount_bits=x"], "1M"),
    # qemu's number parsing: a minus sign wraps (and the Formatting line shows it signed), leading blanks pass,
    # overflow has its own message.
    (["-f", "qcow2", "-o", "refcount_bits=-1"], "1M"),
    (["-f", "qcow2", "-o", "refcount_bits= 16"], "1M"),
    (["-f", "qcow2", "-o", "refcount_bits=99999999999999999999"], "1M"),
    (["-f", "qcow2", "-o", "cluster_size=18446744073709551615"], "1M"),
    (["-f", "qcow2", "-o", "lazy_refcounts=maybe"], "1M"),
    (["-f", "qcow2", "-o", "lazy_refcounts=yes"], "1M"),
    (["-f", "qcow2", "-o", "preallocation=bad"], "1M"),
    (["-f", "qcow2", "-o", "preallocation=bad,compat=v9"], "1M"),
    (["-f", "qcow2", "-o", "compression_type=lz"], "1M"),
    (["-f", "qcow2", "-o", "data_file_raw=on"], "1M"),
    (["-f", "qcow2", "-o", "cluster_size=1.5"], "1M"),
    # A well-formed size past 2^64 has its own message (parse_option_size's ERANGE).
    (["-f", "qcow2", "-o", "cluster_size=16E"], "1M"),
    (["-f", "qcow2", "-o", "cluster_size=99999999999999999999"], "1M"),
    (["-f", "raw", "-o", "extent_size_hint=20E"], "1M"),
    (["-f", "qcow2", "-o", "foo=1"], "1M"),
    (["-f", "qcow2", "-o", "nocow"], "1M"),
    (["-f", "qcow2", "-o", "size=1k"], "2M"),
    (["-f", "qcow2", "-o", "size=1M,"], None),
    (["-f", "qcow2", "-o", ""], "1M"),
    (["-f", "qcow2"], None),
    (["-f", "qcow2"], "1x"),
    (["-f", "qcow2"], "1k5"),
    (["-f", "qcow2"], "8E"),
    (["-f", "qcow2"], "1E"),
    (["-f", "qcow2", "-o", "cluster_size=512"], "100T"),
    (["-f", "raw"], "1P"),
    (["-f", "raw", "-o", "preallocation=bad"], "1M"),
    (["-f", "raw", "-o", "extent_size_hint=1x"], "1M"),
    (["-f", "foo"], "1M"),
    (["-f", "qcow2", "-b", "base.raw"], "1M"),
    (["-f", "qcow2", "-u", "-b", "base.qcow2"], "1M"),
    (["-f", "qcow2", "-b", "base.qcow2"], None),
    (["-f", "qcow2", "-b", "nonexist", "-F", "qcow2"], None),
    (["-f", "qcow2", "-u", "-b", "nonexist", "-F", "raw"], None),
    (["-f", "qcow2", "-o", "backing_fmt=raw"], "1M"),
    (["-f", "qcow2", "-o", "preallocation=metadata", "-b", "base.raw", "-F", "raw"], "1M"),
    (["-f", "qcow2", "-o", "help"], None),
    (["-f", "qcow2", "-o", "?"], None),
    (["-f", "raw", "-o", "help"], None),
    (["-f", "qcow2", "-o", "help"], "1M"),
    (["-f", "raw", "-o", "help"], "1M"),
    (["-f", "qcow2", "-o", "help,size=1M"], "1M"),
]

for s in ["1b", "1B", "1.5k", "1.5K", "512", "1e", "1T", "0x100", "1.1k", "1.0000001K", "2m", "3g"]:
    MESSAGE_CASES.append((["-f", "raw"], s))


@pytest.mark.parametrize("opts,size", MESSAGE_CASES)
def test_create_messages(tmp, opts, size):
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "base.qcow2"), "10M")
    qimg("create", "-q", "-f", "raw", os.path.join(tmp, "base.raw"), "5M")
    run_pair(tmp, opts, size)


def test_create_usage_errors(tmp):
    for args in [["create"], ["create", "-f", "qcow2"], ["create", "a", "1M", "extra"]]:
        q, i = both(*args, cwd=tmp)
        assert i == q, args


def test_create_overwrites(tmp):
    for p in ("q_img", "i_img"):
        with open(os.path.join(tmp, p), "wb") as f:
            f.write(b"x" * (3 << 20))
    q, i, qp, ip = run_pair(tmp, ["-f", "qcow2"], "1M")
    assert filecmp.cmp(qp, ip, shallow=False)


def test_python_create(tmp):
    import instar
    q = os.path.join(tmp, "q.qcow2")
    i = os.path.join(tmp, "i.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,preallocation=metadata", q, "10M")
    instar.create(i, "qcow2", 10 << 20, cluster_size=4096, preallocation="metadata")
    assert filecmp.cmp(q, i, shallow=False)
    with pytest.raises(instar.InstarError) as e:
        instar.create(i, "qcow2", 1 << 20, cluster_size=1000)
    assert "Cluster size must be a power of two" in e.value.message
