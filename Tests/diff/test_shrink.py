"""`resize --shrink` of qcow2 images against qemu-img 7.2's qcow2_co_truncate: after seeded random writes, zero
writes and discards (made by qemu-io) at every cluster size and refcount width, both tools shrink copies of the same
image; the files must be byte-identical, `check` clean, and the allocated blocks identical too (qemu's discard
batches and their order decide what the file system frees)."""
import os
import random
import shutil
import subprocess

import pytest

from conftest import check_clean, qimg, qemu, instar, run
from imgs import make_ops, qemu_io_script

MiB = 1024 * 1024


def settle(path):
    """Writes the file's pages back, so that its allocated size no longer holds the file system's delayed
    allocation reservations, which depend on timing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocation(path):
    """The file's allocated ranges in file system blocks (logical start, length, unwritten), adjacent ones merged,
    from FIEMAP: the data blocks alone, without the extent-tree blocks that st_blocks also counts and that the
    file system allocates as timing has it."""
    settle(path)
    r = subprocess.run(["filefrag", "-v", path], capture_output=True, text=True)
    assert r.returncode == 0, r
    out = []
    for line in r.stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 4 or not parts[0].strip().isdigit():
            continue
        start, end = (int(x) for x in parts[1].replace(".", " ").split())
        unwritten = "unwritten" in line
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] == unwritten:
            out[-1] = (out[-1][0], out[-1][1] + end - start + 1, unwritten)
        else:
            out.append((start, end - start + 1, unwritten))
    return out


def sparse_copy(src, dst):
    """Copies with holes where the source reads as zeroes, the same way for both tools' copies."""
    r = subprocess.run(["cp", "--sparse=always", src, dst], capture_output=True, text=True)
    assert r.returncode == 0, r
    settle(dst)


def shrink_both(tmp, base, args):
    a, b = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    for p in (a, b):
        if os.path.exists(p):
            os.unlink(p)
        sparse_copy(base, p)
    q = qemu("resize", *[x if x != "X" else a for x in args], cwd=tmp)
    i = instar("resize", *[x if x != "X" else b for x in args], cwd=tmp)
    assert (i.rc, i.out, i.err.replace(b, a)) == (q.rc, q.out, q.err), (q, i)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read(), "files differ"
    check_clean(b)
    assert allocation(b) == allocation(a), "allocated blocks differ"
    return q


def random_image(tmp, seed, cluster, size, opts, count):
    base = os.path.join(tmp, "base.qcow2")
    o = f"cluster_size={cluster}" + ("," + opts if opts else "")
    qimg("create", "-q", "-f", "qcow2", "-o", o, base, str(size))
    script = qemu_io_script(make_ops(seed, size, cluster, count=count))
    r = run(["qemu-io", "-f", "qcow2", base], input=script)
    assert r.rc == 0, r
    return base


def cases():
    out = []
    for seed in range(40):
        r = random.Random(1000 + seed)
        cluster = [512, 1024, 4096, 16384, 65536, 2 * MiB][seed % 6]
        size = r.choice([1, 2, 4, 8]) * MiB
        opts = r.choice(["", "refcount_bits=1", "refcount_bits=8", "refcount_bits=64", "lazy_refcounts=on",
                         "extended_l2=on" if cluster >= 16384 else "compat=0.10"])
        new = r.randrange(1, size // 512) * 512
        out.append((seed, cluster, size, opts, new))
    return out


@pytest.mark.parametrize("seed,cluster,size,opts,new", cases(),
                         ids=lambda v: str(v) if not isinstance(v, str) else (v or "default"))
def test_shrink_after_random_writes(tmp, seed, cluster, size, opts, new):
    base = random_image(tmp, seed, cluster, size, opts, count=200)
    shrink_both(tmp, base, ["-f", "qcow2", "--shrink", "X", str(new)])


@pytest.mark.parametrize("seed", range(6))
def test_shrink_512_byte_clusters_no_leak(tmp, seed):
    # The case: tiny clusters spread the refcount blocks, and a block dropped by the shrink is counted
    # in another one, whose count must drop too.
    base = random_image(tmp, 77 + seed, 512, 8 * MiB, "", count=400)
    shrink_both(tmp, base, ["-f", "qcow2", "--shrink", "X", str((seed + 1) * 512 * 1024 + 512 * seed)])


@pytest.mark.parametrize("cluster", ["64k", "1M", "2M"])
@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("discards", [["0 1M", "9M 1M"], ["0 512k"], ["3M 2M"], []])
@pytest.mark.parametrize("new", ["5M", "1M", "9M", "512"])
def test_shrink_preallocated_after_discards(tmp, cluster, prealloc, discards, new):
    # The second case: a 1 MiB-cluster image with preallocated metadata, head and tail discarded.
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster},preallocation={prealloc}", base, "10M")
    script = "".join(f"discard {d}\n" for d in discards) + "write -P 5 2M 64k\n"
    r = run(["qemu-io", "-f", "qcow2", base], input=script)
    assert r.rc == 0, r
    shrink_both(tmp, base, ["-f", "qcow2", "--shrink", "X", new])


@pytest.mark.parametrize("seed", range(4))
def test_shrink_with_snapshot_and_compressed(tmp, seed):
    # Clusters shared with a snapshot keep their references; compressed clusters are freed by their byte range.
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "4M")
    ops = make_ops(seed, 4 * MiB, 4096, count=60)
    run(["qemu-io", "-f", "qcow2", base], input=qemu_io_script(ops))
    qimg("snapshot", "-c", "s1", base)
    src = os.path.join(tmp, "src.raw")
    with open(src, "wb") as f:
        f.write(bytes(range(256)) * 4096 * 4)
    comp = os.path.join(tmp, "comp.qcow2")
    qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, comp)
    run(["qemu-io", "-f", "qcow2", base], input=qemu_io_script(make_ops(seed + 50, 4 * MiB, 4096, count=40)))
    shrink_both(tmp, base, ["-f", "qcow2", "--shrink", "X", f"{1 + seed}M"])
    shrink_both(tmp, comp, ["-f", "qcow2", "--shrink", "X", f"{1 + seed // 2}M"])


def test_shrink_then_grow_then_shrink(tmp):
    base = random_image(tmp, 5, 4096, 8 * MiB, "", count=200)
    work = os.path.join(tmp, "work.qcow2")
    shutil.copyfile(base, work)
    for step in (["--shrink", "X", "3M"], ["X", "9M"], ["--shrink", "X", "1M"]):
        shrink_both(tmp, work, ["-f", "qcow2", *step])
        r = qemu("resize", "-f", "qcow2", *[x if x != "X" else work for x in step])
        assert r.rc == 0, r
