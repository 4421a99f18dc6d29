"""Builds bochs and cloop images byte by byte, as qemu 7.2's block/bochs.c and block/cloop.c read them (qemu-img
cannot create either format). Tests check every image with qemu-img first, so a builder mistake shows as qemu
disagreeing with the intended guest bytes, not as an instar failure."""
import struct
import zlib

SECTOR = 512

# bochs: a 512-byte little-endian header.
BOCHS_MAGIC = b"Bochs Virtual HD Image"
BOCHS_V1 = 0x00010000
BOCHS_V2 = 0x00020000


def guest_pattern(size, seed=1):
    """Guest bytes with a distinct, non-zero pattern per sector, and some all-zero sectors."""
    out = bytearray(size)
    for s in range(size // SECTOR):
        if (s * 7 + seed) % 5 == 0:
            continue  # left zero: bochs stores no bit for it, cloop compresses it well
        word = struct.pack("<IHH", s, seed, 0xA55A) * (SECTOR // 8)
        out[s * SECTOR:(s + 1) * SECTOR] = word
    return bytes(out)


def bochs_header(*, version=BOCHS_V2, header=512, catalog, bitmap, extent, disk, magic=BOCHS_MAGIC,
                 type_=b"Redolog", subtype=b"Growing"):
    h = bytearray(512)
    h[0:len(magic)] = magic
    h[32:32 + len(type_)] = type_
    h[48:48 + len(subtype)] = subtype
    struct.pack_into("<IIIII", h, 64, version, header, catalog, bitmap, extent)
    if version == BOCHS_V1:
        struct.pack_into("<Q", h, 84, disk)
    else:
        struct.pack_into("<IQ", h, 84, 0, disk)
    return h


def bochs_image(guest, *, extent=4096, version=BOCHS_V2, stored=None, reverse=False, catalog=None,
                bitmap=None, disk=None, header=512, **header_fields):
    """A growing redolog holding `guest`. `stored(sector)` decides which sectors get their bitmap bit set (by
    default the non-zero ones); extents with no stored sector stay unallocated (0xffffffff). `reverse` lays the
    extents out in the file in reverse guest order. The remaining keywords override header fields."""
    size = len(guest)
    n_ext = -(-size // extent)
    per = extent // SECTOR
    if stored is None:
        stored = lambda s: guest[s * SECTOR:(s + 1) * SECTOR].strip(b"\0") != b""
    if bitmap is None:
        bitmap = max(1, per // 8)
    bitmap_blocks = 1 + (bitmap - 1) // SECTOR
    cat = [0xFFFFFFFF] * n_ext
    used = [e for e in range(n_ext) if any(stored(s) for s in range(e * per, min((e + 1) * per, size // SECTOR)))]
    order = list(reversed(used)) if reverse else used
    blobs = []
    for i, e in enumerate(order):
        cat[e] = i
        bits = bytearray(bitmap_blocks * SECTOR)
        data = bytearray(extent)
        for k in range(per):
            s = e * per + k
            if s < size // SECTOR and stored(s):
                bits[k // 8] |= 1 << (k % 8)
                data[k * SECTOR:(k + 1) * SECTOR] = guest[s * SECTOR:(s + 1) * SECTOR]
        blobs.append(bytes(bits) + bytes(data))
    n_cat = n_ext if catalog is None else catalog
    cat += [0xFFFFFFFF] * max(0, n_cat - len(cat))
    h = bochs_header(version=version, header=header, catalog=n_cat, bitmap=bitmap, extent=extent,
                     disk=size if disk is None else disk, **header_fields)
    body = bytearray(h)
    body += bytes(max(0, header - len(body)))
    body = body[:header]
    body += struct.pack(f"<{len(cat)}I", *cat)[:n_cat * 4]
    for b in blobs:
        body += b
    return bytes(body)


# cloop V2.0: the preamble qemu's cloop_probe looks for, padded to 128 bytes.
CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
               b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")


def cloop_image(guest, *, block_size=65536, level=9, chunks=None, offsets=None, n_blocks=None,
                magic=CLOOP_MAGIC, table_entries=None):
    """A cloop image of `guest` (padded with zeroes to whole blocks): the preamble, block size and block count
    (big-endian u32 at 128), the n_blocks + 1 big-endian u64 offsets at 136, then one zlib stream per block.
    `chunks` replaces the compressed blocks, `offsets` the table, `n_blocks` the stored count and
    `table_entries` truncates the table to that many entries."""
    if len(guest) % block_size:
        guest = guest + bytes(block_size - len(guest) % block_size)
    n = len(guest) // block_size
    if chunks is None:
        chunks = [zlib.compress(guest[i * block_size:(i + 1) * block_size], level) for i in range(n)]
    entries = len(chunks) + 1
    if offsets is None:
        pos = 136 + 8 * entries
        offsets = [pos]
        for c in chunks:
            pos += len(c)
            offsets.append(pos)
    if table_entries is not None:
        offsets = offsets[:table_entries]
    pre = bytearray(128)
    pre[:len(magic)] = magic
    body = bytes(pre) + struct.pack(">II", block_size, len(chunks) if n_blocks is None else n_blocks)
    body += struct.pack(f">{len(offsets)}Q", *offsets)
    body += b"".join(chunks)
    return body


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


# --- The checks both test files run (qemu-img against instar on the same image). ---

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

from conftest import INSTAR, assert_same, normalize, qemu, run  # noqa: E402

AS_LIMIT = 1 << 30
CPU_LIMIT = 60
TIMEOUT = 600

# Commands that describe or copy an image (read-only opens).
READ_COMMANDS = [
    ["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"], ["check"], ["check", "--output=json"],
    ["measure", "-O", "qcow2"], ["measure", "-O", "raw"], ["snapshot", "-l"],
]

# Everything that opens the image read/write or makes an image of the format: qemu refuses each.
def write_commands(img, fmt):
    return [
        ["resize", img, "+1M"], ["resize", "-f", fmt, img, "2M"], ["amend", "-o", "size=2M", img],
        ["amend", "-f", fmt, "-o", "size=2M", img], ["amend", "-o", "help", "-f", fmt], ["commit", img],
        ["snapshot", "-c", "s", img], ["snapshot", "-a", "s", img], ["snapshot", "-d", "s", img],
        ["bitmap", "--add", img, "b"], ["rebase", "-u", "-b", "", img], ["rebase", "-b", "", img],
        ["check", "-r", "all", img], ["check", "-r", "leaks", img], ["bench", "-w", "-c", "1", img],
        ["create", "-f", fmt, "new", "1M"], ["create", "-f", fmt, "-o", "help"],
        ["convert", "-O", fmt, img, "new"], ["dd", f"if={img}", "of=new", "-O", fmt],
        ["measure", "-O", fmt, img], ["measure", "-O", fmt, "--size", "1M"],
    ]


def qemu_reads(tmp, img, expected, fmt):
    """qemu-img takes the hand-made image as intended: probed as `fmt`, the guest bytes as `expected`."""
    d = json.loads(qemu("info", "--output=json", img).out)
    assert d["format"] == fmt and d["virtual-size"] == len(expected), d
    out = os.path.join(tmp, "qemu-check.raw")
    r = qemu("convert", "-O", "raw", img, out)
    assert r.rc == 0, r
    with open(out, "rb") as f:
        assert f.read() == expected
    os.unlink(out)


def same_reads(tmp, img, fmt):
    """info (human, JSON, with and without -f), map, check, measure, snapshot -l, compare and convert to raw and
    qcow2: instar answers as qemu-img does and writes the same files."""
    name = os.path.basename(img)
    for args in READ_COMMANDS:
        assert_same(*args, name, cwd=tmp)
        assert_same(*args[:1], "-f", fmt, *args[1:], name, cwd=tmp)
    assert_same("info", "--output=json", "-U", name, cwd=tmp)
    raw = os.path.join(tmp, "ref.raw")
    r = qemu("convert", "-O", "raw", img, raw)
    assert r.rc == 0, r
    for args in (["compare", name, "ref.raw"], ["compare", "-f", fmt, "-F", "raw", name, "ref.raw"],
                 ["compare", name, name], ["compare", "-s", name, "ref.raw"]):
        assert_same(*args, cwd=tmp)
    for target, extra in (("raw", []), ("qcow2", []), ("qcow2", ["-c"])):
        outs = []
        for who, tool in (("q", qemu), ("i", None)):
            dst = os.path.join(tmp, f"out-{who}.{target}")
            argv = ["convert", "-O", target, *extra, name, dst]
            res = qemu(*argv, cwd=tmp) if tool else run([INSTAR, *argv], cwd=tmp)
            outs.append((res.rc, res.out, res.err.replace(dst, "DST")))
            with open(dst, "rb") as f:
                outs[-1] += (hashlib.sha256(f.read()).hexdigest(),)
            os.unlink(dst)
        assert outs[0] == outs[1], (target, extra, outs)
    os.unlink(raw)


def same_refusals(tmp, img, fmt):
    """Every writer and creator fails as qemu-img's does (message, exit code) and leaves the image unchanged."""
    name = os.path.basename(img)
    with open(img, "rb") as f:
        before = f.read()
    for args in write_commands(name, fmt):
        assert_same(*args, cwd=tmp)
        assert not os.path.exists(os.path.join(tmp, "new")), args
        with open(img, "rb") as f:
            assert f.read() == before, args


def python_info(img, fmt, expected):
    """The C API (through the Python binding) names the format, reads the guest bytes and refuses writes."""
    import instar
    from instar.image import OPEN_READ_WRITE, Image
    i = instar.info(img)
    assert (i.format, i.virtual_size) == (fmt, len(expected))
    assert json.loads(instar.info_json(img))["format"] == fmt
    with Image(img) as im:
        assert im.size == len(expected)
        for off, n in ((0, len(expected)), (len(expected) // 3, 1000), (max(0, len(expected) - 700), 700)):
            n = min(n, len(expected) - off)
            if n > 0:
                assert im.read(off, n) == expected[off:off + n], (off, n)
        if expected:
            try:
                im.write(0, b"x" * 512)
                raise AssertionError("write accepted")
            except instar.InstarError as e:
                assert "read-only" in str(e), e
    try:
        Image(img, flags=OPEN_READ_WRITE)
        raise AssertionError("read/write open accepted")
    except instar.InstarError as e:
        assert str(e) == f"Could not open '{img}': Image is read-only", e


def _limited(argv, cwd, out):
    if os.path.exists(out):
        os.unlink(out)
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return ("timeout",)
    digest = None
    if p.returncode == 0 and os.path.exists(out):
        with open(out, "rb") as f:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            digest = h.hexdigest()
    if os.path.exists(out):
        os.unlink(out)
    return (p.returncode, normalize(p.stdout.decode("utf-8", "replace")),
            normalize(p.stderr.decode("utf-8", "replace")), digest)


def same_hostile(tmp, img, fmt, copy=True):
    """A damaged image: with and without -f, info / info JSON / map JSON / check / snapshot -l / measure (and,
    with `copy`, convert -O raw and compare) under a 1 GiB address-space limit for instar: never killed, and
    exactly qemu-img's output, error message and exit code."""
    name = os.path.basename(img)
    out = os.path.join(tmp, "hostile-out.raw")
    cmds = [["info"], ["info", "--output=json"], ["map", "--output=json"], ["check"], ["snapshot", "-l"],
            ["measure", "-O", "qcow2"]]
    if copy:
        cmds += [["convert", "-O", "raw"], ["compare"]]
    for fargs in ([], ["-f", fmt]):
        for c in cmds:
            if c[0] == "convert":
                argv = [*c, *fargs, name, out]
            elif c[0] == "compare":
                argv = ["compare", *fargs, "-F", fmt, name, name] if fargs else ["compare", name, name]
            else:
                argv = [*c, *fargs, name]
            q = _limited(["prlimit", f"--cpu={CPU_LIMIT}", "--", "qemu-img", *argv], tmp, out)
            i = _limited(["prlimit", f"--as={AS_LIMIT}", f"--cpu={CPU_LIMIT}", "--", INSTAR, *argv], tmp, out)
            assert i[0] != "timeout" and i[0] >= 0, (argv, i)
            if c[0] == "convert" and q[0] == 1 and q[2].count("\n") > 1:
                # qemu's convert runs several requests at once and prints each one's failure; instar stops at
                # the first, which is qemu's first line.
                assert i[:2] == q[:2] and i[2] == q[2].splitlines(True)[0], f"{argv}\n qemu: {q}\n instar: {i}"
                continue
            assert i == q, f"{argv}\n qemu: {q}\n instar: {i}"


def _mask_node(text):
    """qemu's generated node names end in two random digits."""
    import re
    return re.sub(r"'#block(\d+)\d\d'", r"'#block\1NN'", text)


def same_commit_refusals(tmp, img, fmt):
    """Committing into the image, or into a qcow2 above it, fails as qemu's does: qemu reopens the base and
    every node below it read/write, which these drivers cannot do. Nothing changes in any file."""
    name = os.path.basename(img)
    r = qemu("create", "-q", "-f", "qcow2", "-b", name, "-F", fmt, "mid.qcow2", cwd=tmp)
    assert r.rc == 0, r
    r = qemu("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", cwd=tmp)
    assert r.rc == 0, r
    r = run(["qemu-io", "-c", "write -P 9 0 4096", os.path.join(tmp, "top.qcow2")])
    assert r.rc == 0, r
    files = [img, os.path.join(tmp, "mid.qcow2"), os.path.join(tmp, "top.qcow2")]

    def contents():
        return [open(f, "rb").read() for f in files]
    before = contents()
    for args in (["commit", "mid.qcow2"], ["commit", "-p", "mid.qcow2"], ["commit", "top.qcow2"],
                 ["commit", "-b", "mid.qcow2", "top.qcow2"], ["commit", "-b", name, "top.qcow2"],
                 ["commit", "-d", "-b", name, "top.qcow2"], ["commit", "-b", "nothere", "top.qcow2"]):
        q = qemu(*args, cwd=tmp)
        i = run([INSTAR, *args], cwd=tmp)
        assert (i.rc, i.out, _mask_node(i.err)) == (q.rc, q.out, _mask_node(q.err)), (args, q, i)
        assert contents() == before, args
    for args in (["info", "--backing-chain", "top.qcow2"], ["convert", "-O", "raw", "top.qcow2", "top.raw"],
                 ["compare", "top.qcow2", name], ["map", "--output=json", "top.qcow2"]):
        assert_same(*args, cwd=tmp)


def same_open_options(tmp, img, fmt):
    """--image-opts and json: names: the driver takes no options of its own (qemu names the first unknown one),
    the generic ones pass, and the file may sit under a raw window."""
    name = os.path.basename(img)
    file = f'"file":{{"driver":"file","filename":"{name}"}}'
    for args in (["info", "--image-opts", f"driver={fmt},file.filename={name}"],
                 ["info", "--image-opts", f"driver={fmt},file.filename={name},foo=1"],
                 ["info", "--image-opts", f"driver={fmt},file.filename={name},read-only=on,cache.direct=off"],
                 ["info", "--image-opts", f"driver={fmt},file.driver=raw,file.file.filename={name}"],
                 ["info", "--output=json", f'json:{{"driver":"{fmt}",{file}}}'],
                 ["info", "-U", f'json:{{"driver":"{fmt}","bar":1,{file}}}'],
                 ["info", "-f", "raw", name],
                 ["map", "--output=json", "--image-opts", f"driver={fmt},file.filename={name}"]):
        assert_same(*args, cwd=tmp)
