"""Images for the map/compare/convert differential tests, made with qemu-img/qemu-io at test time."""
import os
import random

from conftest import qemu_io, qimg

MiB = 1 << 20


def sparse_raw(d, name="s.raw", size=3 * MiB + 1000):
    """A sparse raw file with data at odd offsets, an explicit zero run and a partial last sector."""
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.truncate(size)
        f.seek(5000)
        f.write(os.urandom(3000))
        f.seek(MiB + 17)
        f.write(os.urandom(100000))
        f.seek(2 * MiB)
        f.write(b"\0" * 70000)
        f.seek(size - 100)
        f.write(b"z" * 100)
    return p


def qcow2_image(d, name="q.qcow2", size="4M", opts=None):
    """A qcow2 with data at odd offsets, zero writes, a discard and compressed clusters."""
    p = os.path.join(d, name)
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qimg(*args, p, size)
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 1000 70000", "-c", "write -z 196608 131072",
            "-c", "write -P 0x22 1M 512k", "-c", "discard 1280k 64k", p)
    c = os.path.join(d, "c_" + name)
    qimg("convert", "-c", "-O", "qcow2", p, c)
    return p, c


def chain(d):
    """raw base <- qcow2 mid <- qcow2 top (extended_l2, larger than its base)."""
    base = os.path.join(d, "base.raw")
    with open(base, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(4096)
        f.write(os.urandom(8192))
        f.seek(MiB + 333)
        f.write(os.urandom(5000))
    mid = os.path.join(d, "mid.qcow2")
    top = os.path.join(d, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "3M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 64k 64k", "-c", "write -z 1M 4096", mid)
    qimg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2", top, "5M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x44 8k 4k", "-c", "write -P 0x55 2560k 100k", "-c", "write -z 128k 8k",
            top)
    return base, mid, top


def qemu_io_script(ops):
    """qemu-io commands for (kind, offset, length, arg) operations: ("write", off, n, pattern), ("zero", off, n,
    may_unmap), ("discard", off, n, None)."""
    lines = []
    for kind, off, n, arg in ops:
        if kind == "write":
            lines.append(f"write -P {arg} {off} {n}")
        elif kind == "zero":
            lines.append(f"write -z {'-u ' if arg else ''}{off} {n}")
        else:
            lines.append(f"discard {off} {n}")
    return "\n".join(lines) + "\n"


def apply_ops(img, ops, flush_every=0):
    """The same operations through an open instar.Image, flushing every `flush_every` operations."""
    for i, (kind, off, n, arg) in enumerate(ops):
        if kind == "write":
            img.write(off, bytes([arg]) * n)
        elif kind == "zero":
            img.write_zeroes(off, n, may_unmap=arg)
        else:
            img.discard(off, n)
        if flush_every and i % flush_every == flush_every - 1:
            img.flush()


def make_ops(seed, size, cluster, count=120, big=False):
    """A deterministic mix of operations at odd offsets: (kind, offset, length, pattern/unmap)."""
    r = random.Random(seed)
    ops = []
    for _ in range(count):
        k = r.random()
        if big and r.random() < 0.1:
            n = r.randrange(1, 2 * MiB)
        else:
            n = r.randrange(1, 3 * cluster + 700)
        n = min(n, size)
        off = r.randrange(0, size - n + 1)
        if k < 0.65:
            ops.append(("write", off, n, r.randrange(1, 256)))
        elif k < 0.85:
            ops.append(("zero", off, n, r.random() < 0.5))
        else:
            ops.append(("discard", off, n, None))
    return ops
