"""Makes damaged qcow2 images for the hostile-input tests, at test time, from small valid images that the real
qemu-img/qemu-io create. Nothing binary is committed: every variant is a few byte edits of a fresh image.

`VARIANTS` maps a stable name to a builder `fn(ctx, dir) -> top image path`; `Context` holds the bytes of the
valid base images (made once per session) and knows where their tables live.
"""
import json
import os
import struct
import subprocess
import zlib

MIB = 1 << 20
CLUSTER = 65536

# qcow2 header fields: name -> (offset, struct format).
FIELDS = {
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"), "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"), "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, ">B"),
}


def get(data, field):
    off, fmt = FIELDS[field]
    return struct.unpack_from(fmt, data, off)[0]


def put(data, field, value):
    off, fmt = FIELDS[field]
    struct.pack_into(fmt, data, off, value)


def u64(data, off):
    return struct.unpack_from(">Q", data, off)[0]


def set_u64(data, off, v):
    struct.pack_into(">Q", data, off, v & 0xFFFFFFFFFFFFFFFF)


def sh(*argv, cwd=None):
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{argv}: {p.stderr}")
    return p.stdout


class Context:
    """The valid images every variant starts from, made once in `root`."""

    def __init__(self, root):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.bytes = {}
        b = self.make("base", ["create", "-q", "-f", "qcow2", "{p}", "4M"],
                      ["write -P 0xaa 0 128k", "write -P 0x55 1M 64k", "write -z 2M 64k"])
        self.make("v2", ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "{p}", "4M"],
                  ["write -P 0xaa 0 128k", "write -P 0x55 1M 64k"])
        self.make("empty", ["create", "-q", "-f", "qcow2", "{p}", "4M"], [])
        self.make("snap", ["create", "-q", "-f", "qcow2", "{p}", "4M"], ["write -P 0x11 0 64k"])
        sh("qemu-img", "snapshot", "-c", "s1", self.path("snap"))
        self.bytes["snap"] = self.read("snap")
        self.make("ext2", ["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "{p}", "4M"],
                  ["write -P 0x22 0 64k"])
        # Compressed clusters: convert a patterned raw image with -c (patterns compress well).
        raw = self.path("pattern.raw")
        sh("qemu-img", "create", "-q", "-f", "raw", raw, "1M")
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 256k", "-c", "write -P 0x44 512k 128k", raw)
        for kind in ("zlib", "zstd"):
            sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={kind}", raw, self.path(kind))
            self.bytes[kind] = self.read(kind)
        self.base = b

    def path(self, name):
        return os.path.join(self.root, name + ("" if name.endswith(".raw") else ".qcow2"))

    def read(self, name):
        with open(self.path(name), "rb") as f:
            return f.read()

    def make(self, name, create, writes):
        p = self.path(name)
        sh("qemu-img", *[a.replace("{p}", p) for a in create])
        if writes:
            args = []
            for w in writes:
                args += ["-c", w]
            sh("qemu-io", "-f", "qcow2", *args, p)
        self.bytes[name] = self.read(name)
        return self.bytes[name]

    def copy(self, name):
        return bytearray(self.bytes[name])

    def l2_offset(self, data, index=0):
        """Host offset of the L2 table that L1[index] names."""
        return u64(data, get(data, "l1_table_offset") + 8 * index) & 0x00FFFFFFFFFFFE00

    def first_extension_offset(self, data):
        return get(data, "header_length") if get(data, "version") >= 3 else 72


def build(root, names):
    """Builds the named variants under `root` (one directory each, sharing one base context); name -> image."""
    ctx = Context(os.path.join(root, "_base"))
    out = {}
    for name in names:
        d = os.path.join(root, name)
        os.makedirs(d)
        out[name] = VARIANTS[name](ctx, d)
    return out


def write(dir, name, data):
    p = os.path.join(dir, name)
    with open(p, "wb") as f:
        f.write(bytes(data))
    return p


VARIANTS = {}


def variant(name):
    def deco(fn):
        assert name not in VARIANTS, name
        VARIANTS[name] = fn
        return fn
    return deco


# ---- truncations ---------------------------------------------------------------------------------------

def _truncate(src, length):
    def fn(ctx, d):
        return write(d, "t.qcow2", ctx.copy(src)[:length])
    return fn


for n in sorted(set(list(range(0, 113, 4)) + [1, 3, 5, 7, 9, 21, 25, 33, 71, 73, 99, 101, 103, 105, 111, 113,
                                              200, 511, 512, 4095])):
    VARIANTS[f"trunc-header-{n}"] = _truncate("base", n)
for n in (20, 40, 64, 71, 72, 73):
    VARIANTS[f"trunc-v2-header-{n}"] = _truncate("v2", n)


def _truncate_past(src, where, extra):
    def fn(ctx, d):
        data = ctx.copy(src)
        off = {"l1": lambda: get(data, "l1_table_offset"),
               "refcount": lambda: get(data, "refcount_table_offset"),
               "l2": lambda: ctx.l2_offset(data),
               "snapshots": lambda: get(data, "snapshots_offset"),
               "data": lambda: u64(data, ctx.l2_offset(data)) & 0x00FFFFFFFFFFFE00,
               "compressed": lambda: _compressed_host_offset(data, 0)}[where]()
        return write(d, "t.qcow2", data[:off + extra])
    return fn


for where, src in (("l1", "base"), ("refcount", "base"), ("l2", "base"), ("data", "base"),
                   ("snapshots", "snap"), ("compressed", "zlib")):
    for extra in (0, 1, 8, 100):
        VARIANTS[f"trunc-past-{where}-{extra}"] = _truncate_past(src, where, extra)
VARIANTS["trunc-past-compressed-zstd-8"] = _truncate_past("zstd", "compressed", 8)


# ---- header fields out of range ------------------------------------------------------------------------

def _field(field, value, src="base"):
    def fn(ctx, d):
        data = ctx.copy(src)
        put(data, field, value)
        return write(d, "f.qcow2", data)
    return fn


U32MAX, U64MAX = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
HEADER_CASES = {
    "magic": [0x514649FC],
    "version": [0, 1, 2, 4, 5, U32MAX],
    "cluster_bits": [0, 8, 9, 21, 22, 63, 255, U32MAX],
    "size": [0, 4 * MIB + 1, 4 * MIB - 512, 1 << 40, 1 << 55, 1 << 62, 1 << 63, U64MAX],
    "crypt_method": [1, 2, 3, 4, U32MAX],
    "l1_size": [0, 1, 8192, 0x02000000, 0x7FFFFFFF, U32MAX],
    "l1_table_offset": [0, 8, 0x30008, 0x30200, 1 << 40, 1 << 62, U64MAX, 0x80000 - 8],
    "refcount_table_offset": [0, 8, 0x10200, 1 << 40, U64MAX],
    "refcount_table_clusters": [0, 2, 0x10000, 0x1000000, U32MAX],
    "nb_snapshots": [1, 2, 65536, 65537, U32MAX],
    "snapshots_offset": [8, 0x10000, 1 << 40, U64MAX],
    "incompatible_features": [1, 2, 4, 8, 16, 32, 1 << 63, U64MAX],
    "compatible_features": [1, U64MAX],
    "autoclear_features": [1, 2, U64MAX],
    "refcount_order": [0, 6, 7, 8, 63, 255, U32MAX],
    "header_length": [0, 4, 71, 72, 100, 103, 104, 105, 113, 120, 4096, 65536, 65537, U32MAX],
    "compression_type": [1, 2, 255],
    "backing_file_offset": [8, 100, 0xFFF0, 1 << 40, U64MAX],
    "backing_file_size": [1, 1023, 1024, U32MAX],
}
for field, values in HEADER_CASES.items():
    for v in values:
        VARIANTS[f"field-{field}-{v:#x}"] = _field(field, v)
for field, v in (("version", 3), ("cluster_bits", 8), ("cluster_bits", 30), ("l1_size", 0), ("nb_snapshots", U32MAX),
                 ("backing_file_offset", 1 << 40), ("crypt_method", 3), ("header_length", 0)):
    VARIANTS[f"v2-field-{field}-{v:#x}"] = _field(field, v, "v2")
for field, values in (("nb_snapshots", [0, 2, 1000, 65536, U32MAX]), ("snapshots_offset", [0, 8, 1 << 40, U64MAX])):
    for v in values:
        VARIANTS[f"snap-field-{field}-{v:#x}"] = _field(field, v, "snap")


@variant("size-1tib-consistent")
def _size_1tib(ctx, d):
    """A huge but consistent image: 1 TiB with an L1 table big enough (the L1 cluster holds zeroes past the
    original entries), so qemu accepts it; operations must go by block status, not by reading every byte."""
    data = ctx.copy("base")
    put(data, "size", 1 << 40)
    put(data, "l1_size", 2048)
    return write(d, "f.qcow2", data)


@variant("size-huge-l1-max")
def _size_huge(ctx, d):
    data = ctx.copy("base")
    put(data, "size", 1 << 61)
    put(data, "l1_size", 0x02000000)
    return write(d, "f.qcow2", data)


# ---- header extensions ----------------------------------------------------------------------------------

def _ext(kind):
    def fn(ctx, d):
        data = ctx.copy("base")
        e = ctx.first_extension_offset(data)
        if kind == "len-max":
            struct.pack_into(">I", data, e + 4, U32MAX)
        elif kind == "len-past-cluster":
            struct.pack_into(">I", data, e + 4, CLUSTER - e)
        elif kind == "len-just-past":
            struct.pack_into(">I", data, e + 4, CLUSTER - e - 8 + 1)
        elif kind == "no-end":
            # Unknown extensions all the way to the end of the header cluster, never an end marker.
            o = e
            while o + 8 <= CLUSTER:
                struct.pack_into(">II", data, o, 0x12345678, 0)
                o += 8
        elif kind == "garbage":
            data[e:CLUSTER] = bytes((i * 7 + 3) & 0xFF for i in range(CLUSTER - e))
        else:
            magic, payload = {
                "backing-format-long": (0xE2792ACA, b"q" * 2000),
                "backing-format-unknown": (0xE2792ACA, b"nosuchfmt"),
                "data-file-no-bit": (0x44415441, b"/nonexistent/data"),
                "bitmaps-bogus": (0x23852875, b"\xff" * 24),
                "crypto-bogus": (0x0537BE77, b"\xff" * 16),
                "feature-table-huge": (0x6803F857, b"\x00" * 48 * 100),
                "unknown-big": (0x0BADF00D, b"\x01" * 30000),
            }[kind]
            rec = struct.pack(">II", magic, len(payload)) + payload
            rec += b"\0" * (-len(rec) % 8) + struct.pack(">II", 0, 0)
            data[e:e + len(rec)] = rec
        return write(d, "x.qcow2", data)
    return fn


for kind in ("len-max", "len-past-cluster", "len-just-past", "no-end", "garbage", "backing-format-long",
             "backing-format-unknown", "data-file-no-bit", "bitmaps-bogus", "crypto-bogus", "feature-table-huge",
             "unknown-big"):
    VARIANTS[f"ext-{kind}"] = _ext(kind)


@variant("ext-data-file-bit-missing-ext")
def _data_file_bit(ctx, d):
    data = ctx.copy("base")
    put(data, "incompatible_features", 4)
    return write(d, "x.qcow2", data)


@variant("ext-data-file-dangling")
def _data_file_dangling(ctx, d):
    p = os.path.join(d, "x.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=" + os.path.join(d, "x.data"), p, "4M")
    os.unlink(os.path.join(d, "x.data"))
    return p


# ---- snapshot table -------------------------------------------------------------------------------------

def _snap_entry(kind):
    def fn(ctx, d):
        data = ctx.copy("snap")
        s = get(data, "snapshots_offset")
        # Entry: l1_table_offset u64, l1_size u32, id_str_size u16, name_size u16, date_sec, date_nsec u32,
        # vm_clock_nsec u64, vm_state_size u32, extra_data_size u32.
        if kind == "l1-size-huge":
            struct.pack_into(">I", data, s + 8, U32MAX)
        elif kind == "l1-offset-unaligned":
            set_u64(data, s, 0x30008)
        elif kind == "l1-offset-past-eof":
            set_u64(data, s, 1 << 50)
        elif kind == "id-size-huge":
            struct.pack_into(">H", data, s + 12, 0xFFFF)
        elif kind == "name-size-huge":
            struct.pack_into(">H", data, s + 14, 0xFFFF)
        elif kind == "extra-size-huge":
            struct.pack_into(">I", data, s + 36, U32MAX)
        elif kind == "extra-size-medium":
            struct.pack_into(">I", data, s + 36, 1 << 20)
        elif kind == "name-not-utf8":
            # Overwrite the name bytes (after the 40-byte fixed part, extra data and the id).
            extra = struct.unpack_from(">I", data, s + 36)[0]
            id_len = struct.unpack_from(">H", data, s + 12)[0]
            n = s + 40 + extra + id_len
            data[n:n + 2] = b"\xff\xfe"
        return write(d, "s.qcow2", data)
    return fn


for kind in ("l1-size-huge", "l1-offset-unaligned", "l1-offset-past-eof", "id-size-huge", "name-size-huge",
             "extra-size-huge", "extra-size-medium", "name-not-utf8"):
    VARIANTS[f"snap-entry-{kind}"] = _snap_entry(kind)


# ---- L1 / L2 pointers -----------------------------------------------------------------------------------

COPIED = 1 << 63


def _l1(value):
    def fn(ctx, d):
        data = ctx.copy("base")
        set_u64(data, get(data, "l1_table_offset"), value)
        return write(d, "l.qcow2", data)
    return fn


for label, v in (("past-eof", COPIED | (1 << 40)), ("unaligned", COPIED | 0x40200), ("header", COPIED | 0),
                 ("header-no-copied", 0x200), ("into-l1", COPIED | 0x30000), ("into-refcount", COPIED | 0x10000),
                 ("reserved-bits", COPIED | 0x40000 | 0xFF), ("max-offset", COPIED | 0x00FFFFFFFFFF0000),
                 ("all-ones", U64MAX)):
    VARIANTS[f"l1-{label}"] = _l1(v)


def _l2(value, index=0, src="base"):
    def fn(ctx, d):
        data = ctx.copy(src)
        set_u64(data, ctx.l2_offset(data) + 8 * index, value)
        return write(d, "l.qcow2", data)
    return fn


for label, v in (("past-eof", COPIED | (1 << 40)), ("unaligned", COPIED | 0x50200), ("header", COPIED | 0),
                 ("into-l1", COPIED | 0x30000), ("into-l2-itself", COPIED | 0x40000),
                 ("reserved-bits", COPIED | 0x50000 | 0x1FE), ("zero-flag-unaligned", 0x50201),
                 ("zero-flag-past-eof", (1 << 40) | 1), ("max-offset", COPIED | 0x00FFFFFFFFFF0000),
                 ("compressed-bogus", (1 << 62) | 0x3FFFFFFFFFFFFFFF), ("all-ones", U64MAX)):
    VARIANTS[f"l2-{label}"] = _l2(v)
VARIANTS["l2-past-eof-v2"] = _l2(COPIED | (1 << 40), src="v2")
VARIANTS["l2-zero-flag-v2"] = _l2(0x1, src="v2")


@variant("l2-extended-bitmap-bogus")
def _ext_l2(ctx, d):
    data = ctx.copy("ext2")
    l2 = ctx.l2_offset(data)
    # Extended L2 entries are 16 bytes; the second word is the subcluster bitmap. Set alloc and zero together.
    set_u64(data, l2 + 8, U64MAX)
    return write(d, "l.qcow2", data)


@variant("l2-all-clusters-same")
def _l2_same(ctx, d):
    """Every L2 entry names the same data cluster (allowed by reading, a refcount error for check)."""
    data = ctx.copy("base")
    l2 = ctx.l2_offset(data)
    first = u64(data, l2)
    for i in range(CLUSTER // 8):
        set_u64(data, l2 + 8 * i, first)
    return write(d, "l.qcow2", data)


# ---- compressed clusters --------------------------------------------------------------------------------

def _compressed_entry(data, index):
    l1 = get(data, "l1_table_offset")
    l2 = u64(data, l1) & 0x00FFFFFFFFFFFE00
    return l2 + 8 * index, u64(data, l2 + 8 * index)


def _compressed_host_offset(data, index):
    bits = get(data, "cluster_bits")
    x = 62 - (bits - 8)
    return _compressed_entry(data, index)[1] & ((1 << x) - 1)


def _compressed(kind, src):
    def fn(ctx, d):
        data = ctx.copy(src)
        bits = get(data, "cluster_bits")
        x = 62 - (bits - 8)
        where, entry = _compressed_entry(data, 0)
        assert entry & (1 << 62), "expected a compressed cluster"
        host = entry & ((1 << x) - 1)
        if kind == "garbage":
            data[host:host + 64] = bytes((i * 37 + 11) & 0xFF for i in range(64))
        elif kind == "zeroed":
            data[host:host + 32] = b"\0" * 32
        elif kind == "sectors-max":
            set_u64(data, where, (1 << 62) | (((1 << (62 - x)) - 1) << x) | host)
        elif kind == "past-eof":
            set_u64(data, where, (1 << 62) | (entry & ~((1 << x) - 1) & ((1 << 62) - 1)) | (1 << 40))
        elif kind == "offset-max":
            set_u64(data, where, (1 << 62) | ((1 << x) - 1))
        elif kind == "into-header":
            set_u64(data, where, (1 << 62) | (entry & ~((1 << x) - 1) & ((1 << 62) - 1)))
        elif kind == "expands-too-much":
            # A valid stream that inflates to more than one cluster.
            if src == "zlib":
                c = zlib.compressobj(9, zlib.DEFLATED, -15)
                blob = c.compress(b"\x5a" * (4 * CLUSTER)) + c.flush()
            else:
                blob = _zstd_frame(b"\x5a" * (4 * CLUSTER))
                if blob is None:
                    blob = b"\x28\xb5\x2f\xfd" + b"\xff" * 60
            data[host:host + len(blob)] = blob
        elif kind == "short-stream":
            # A valid stream that inflates to less than one cluster.
            if src == "zlib":
                c = zlib.compressobj(9, zlib.DEFLATED, -15)
                blob = c.compress(b"\x5a" * 100) + c.flush()
            else:
                blob = _zstd_frame(b"\x5a" * 100) or (b"\x28\xb5\x2f\xfd" + b"\0" * 8)
            data[host:host + len(blob)] = blob
        elif kind == "frame-size-lie" and src == "zstd":
            # Frame header claims a huge content size.
            data[host + 4:host + 14] = b"\xe0" + b"\xff" * 9
        return write(d, "c.qcow2", data)
    return fn


def _zstd_frame(payload):
    try:
        p = subprocess.run(["zstd", "-q", "-c", "--no-check"], input=payload, capture_output=True)
        return p.stdout if p.returncode == 0 else None
    except FileNotFoundError:
        return None


for src in ("zlib", "zstd"):
    for kind in ("garbage", "zeroed", "sectors-max", "past-eof", "offset-max", "into-header", "expands-too-much",
                 "short-stream") + (("frame-size-lie",) if src == "zstd" else ()):
        VARIANTS[f"compressed-{src}-{kind}"] = _compressed(kind, src)


# ---- backing chains -------------------------------------------------------------------------------------

def _with_backing(ctx, d, name, backing, fmt="qcow2"):
    """An empty 4 MiB qcow2 naming `backing` (str or bytes) and, if given, a backing-format extension. The
    name is written by hand (at 32 KiB into the header cluster) so that names qemu-img rebase refuses (json:
    without a format, unknown formats, loops) can be stored too."""
    data = ctx.copy("empty")
    raw = backing.encode() if isinstance(backing, str) else backing
    assert len(raw) <= 4096
    put(data, "backing_file_offset", 0x8000)
    put(data, "backing_file_size", len(raw))
    data[0x8000:0x8000 + len(raw)] = raw
    e = ctx.first_extension_offset(data)
    rec = b""
    if fmt is not None:
        f = fmt.encode()
        rec = struct.pack(">II", 0xE2792ACA, len(f)) + f
        rec += b"\0" * (-len(rec) % 8)
    rec += struct.pack(">II", 0, 0)
    data[e:e + len(rec)] = rec
    return write(d, name, data)


@variant("backing-self")
def _self(ctx, d):
    return _with_backing(ctx, d, "a.qcow2", "a.qcow2")


@variant("backing-self-absolute")
def _self_abs(ctx, d):
    return _with_backing(ctx, d, "a.qcow2", os.path.join(d, "a.qcow2"))


@variant("backing-self-dotslash")
def _self_dot(ctx, d):
    return _with_backing(ctx, d, "a.qcow2", "./a.qcow2")


@variant("backing-loop-a-b-a")
def _loop(ctx, d):
    _with_backing(ctx, d, "b.qcow2", "a.qcow2")
    return _with_backing(ctx, d, "a.qcow2", "b.qcow2")


@variant("backing-loop-a-b-c-b")
def _loop3(ctx, d):
    _with_backing(ctx, d, "c.qcow2", "b.qcow2")
    _with_backing(ctx, d, "b.qcow2", "c.qcow2")
    return _with_backing(ctx, d, "a.qcow2", "b.qcow2")


@variant("backing-loop-no-format")
def _loop_nofmt(ctx, d):
    _with_backing(ctx, d, "b.qcow2", "a.qcow2", fmt=None)
    return _with_backing(ctx, d, "a.qcow2", "b.qcow2", fmt=None)


@variant("backing-loop-json")
def _loop_json(ctx, d):
    a = os.path.join(d, "a.qcow2")
    spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": a}})
    return _with_backing(ctx, d, "a.qcow2", "json:" + spec, fmt=None)


@variant("backing-missing")
def _missing(ctx, d):
    return _with_backing(ctx, d, "a.qcow2", "does-not-exist.qcow2")


@variant("backing-absolute")
def _absolute(ctx, d):
    base = write(d, "base.qcow2", ctx.copy("base"))
    return _with_backing(ctx, d, "a.qcow2", base)


@variant("backing-json")
def _json(ctx, d):
    base = write(d, "base.qcow2", ctx.copy("base"))
    spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": base}})
    return _with_backing(ctx, d, "a.qcow2", "json:" + spec, fmt=None)


@variant("backing-json-malformed")
def _json_bad(ctx, d):
    return _with_backing(ctx, d, "a.qcow2", 'json:{"driver": "qcow2", "file": {', fmt=None)


@variant("backing-json-bad-driver")
def _json_baddrv(ctx, d):
    return _with_backing(ctx, d, "a.qcow2", 'json:{"driver": "nosuch", "file": "x"}', fmt=None)


@variant("backing-format-unknown")
def _bad_fmt(ctx, d):
    write(d, "base.qcow2", ctx.copy("base"))
    return _with_backing(ctx, d, "a.qcow2", "base.qcow2", fmt="nosuchformat")


@variant("backing-format-mismatch")
def _mismatch(ctx, d):
    write(d, "base.qcow2", ctx.copy("base"))
    return _with_backing(ctx, d, "a.qcow2", "base.qcow2", fmt="raw")


@variant("backing-bigger-than-top")
def _bigger(ctx, d):
    b = os.path.join(d, "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", b, "64M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 60M 64k", b)
    return _with_backing(ctx, d, "a.qcow2", "base.qcow2")


@variant("backing-name-1023")
def _name1023(ctx, d):
    return _with_backing(ctx, d, "a.qcow2", "n" * 1023)


@variant("backing-name-with-nul")
def _name_nul(ctx, d):
    p = _with_backing(ctx, d, "a.qcow2", "abcdefgh")
    data = bytearray(open(p, "rb").read())
    off = get(data, "backing_file_offset")
    data[off + 3] = 0
    return write(d, "a.qcow2", data)


@variant("backing-name-not-utf8")
def _name_utf8(ctx, d):
    p = _with_backing(ctx, d, "a.qcow2", "abcdefgh")
    data = bytearray(open(p, "rb").read())
    off = get(data, "backing_file_offset")
    data[off + 2:off + 4] = b"\xff\xfe"
    return write(d, "a.qcow2", data)


@variant("backing-name-empty")
def _name_empty(ctx, d):
    p = _with_backing(ctx, d, "a.qcow2", "abcdefgh")
    data = bytearray(open(p, "rb").read())
    put(data, "backing_file_size", 0)
    return write(d, "a.qcow2", data)


def _chain(depth):
    def fn(ctx, d):
        # One template link made by qemu-img, then copies with the backing name patched (same length), so a
        # deep chain costs no qemu-img runs per link.
        first = os.path.join(d, "c0000.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", first, "4M")
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", first)
        tpl = _with_backing(ctx, d, "c0001.qcow2", "c0000.qcow2")
        data = bytearray(open(tpl, "rb").read())
        off = get(data, "backing_file_offset")
        data[off:off + 11] = b"c0000.qcow2"
        for i in range(1, depth):
            data[off:off + 11] = b"c%04d.qcow2" % (i - 1)
            write(d, "c%04d.qcow2" % i, data)
        return os.path.join(d, "c%04d.qcow2" % (depth - 1))
    return fn


# instar refuses chains deeper than its limit (256 images) on purpose; test_hostile.py checks that refusal for
# the 300-deep chain and parity for the 200-deep one.
VARIANTS["chain-depth-300"] = _chain(300)
VARIANTS["chain-depth-200"] = _chain(200)
VARIANTS["chain-depth-20"] = _chain(20)


# ---- not qcow2 at all, or barely ------------------------------------------------------------------------

@variant("magic-only")
def _magic_only(ctx, d):
    return write(d, "m.qcow2", b"QFI\xfb")


@variant("magic-version-only")
def _magic_version(ctx, d):
    return write(d, "m.qcow2", b"QFI\xfb\0\0\0\3")


@variant("header-all-ones")
def _all_ones(ctx, d):
    return write(d, "m.qcow2", b"QFI\xfb\0\0\0\3" + b"\xff" * 504)


@variant("header-zeros")
def _zeros(ctx, d):
    return write(d, "m.qcow2", b"QFI\xfb\0\0\0\3" + b"\0" * 504)


# ---- vpc (VHD): footer, dynamic header and BAT fields -------------------------------------------------------
# A qemu-made 8 MiB dynamic image with data in two blocks: footer at 0 (and at the end), dynamic header at 512,
# BAT at 1536. Edits to the footer refresh its checksum in both copies (unless the checksum is the point).

import threading  # noqa: E402

_VPC_LOCK = threading.Lock()


def _vpc_base(ctx):
    with _VPC_LOCK:
        if "vpc" not in ctx.bytes:
            p = os.path.join(ctx.root, "vpc-base.vhd")
            sh("qemu-img", "create", "-q", "-f", "vpc", p, "8M")
            sh("qemu-io", "-f", "vpc", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0xa5 3M 1M", p)
            with open(p, "rb") as f:
                ctx.bytes["vpc"] = f.read()
    return bytearray(ctx.bytes["vpc"])


def _vpc_footers(data):
    return [o for o in (0, len(data) - 512) if data[o:o + 8] == b"conectix"]


def _vpc_fix_checksum(data, off):
    data[off + 64:off + 68] = b"\0\0\0\0"
    struct.pack_into(">I", data, off + 64, ~sum(data[off:off + 512]) & 0xFFFFFFFF)


def _vpc_footer(off, fmt, value):
    def fn(ctx, d):
        data = _vpc_base(ctx)
        for f in _vpc_footers(data):
            struct.pack_into(fmt, data, f + off, value)
            _vpc_fix_checksum(data, f)
        return write(d, "v.vhd", data)
    return fn


def _vpc_header(off, fmt, value, extend_to=None, bat_fill=None):
    def fn(ctx, d):
        data = _vpc_base(ctx)
        struct.pack_into(fmt, data, 512 + off, value)
        p = write(d, "v.vhd", data)
        if extend_to is not None:
            with open(p, "r+b") as f:
                if bat_fill is not None:
                    # The table (at 1536) filled with one entry value up to `extend_to`.
                    f.seek(1536)
                    left, chunk = extend_to - 1536, bat_fill * (1 << 18)
                    while left > 0:
                        f.write(chunk[:left])
                        left -= min(left, len(chunk))
                f.truncate(extend_to)
        return p
    return fn


def _vpc_bat(index, value):
    def fn(ctx, d):
        data = _vpc_base(ctx)
        struct.pack_into(">I", data, 1536 + 4 * index, value)
        return write(d, "v.vhd", data)
    return fn


@variant("vpc-footer-checksum")
def _vpc_footer_checksum(ctx, d):
    data = _vpc_base(ctx)
    data[64] ^= 0x40
    return write(d, "v.vhd", data)


@variant("vpc-dynheader-checksum")
def _vpc_dynheader_checksum(ctx, d):
    data = _vpc_base(ctx)
    data[512 + 36] ^= 0x40
    return write(d, "v.vhd", data)


@variant("vpc-tiny")
def _vpc_tiny(ctx, d):
    return write(d, "v.vhd", _vpc_base(ctx)[:100])


@variant("vpc-footer-only")
def _vpc_footer_only(ctx, d):
    return write(d, "v.vhd", _vpc_base(ctx)[:512])


for _v in (0, 1 << 40, 1 << 62, 0xFFFFFFFFFFFFFFFF, 0x7FFFFFFFFFFFFE00):
    VARIANTS[f"vpc-data-offset-{_v:#x}"] = _vpc_footer(16, ">Q", _v)
for _v in (1 << 40, 1 << 50, 0xFFFFFFFFFFFFFFFF):
    VARIANTS[f"vpc-win-current-size-{_v:#x}"] = (
        lambda v: lambda ctx, d: _vpc_win(ctx, d, v))(_v)
VARIANTS["vpc-geometry-max"] = _vpc_footer(56, ">I", (65535 << 16) | (16 << 8) | 255)
VARIANTS["vpc-geometry-zero"] = _vpc_footer(56, ">I", 0)
VARIANTS["vpc-type-fixed-at-start"] = _vpc_footer(60, ">I", 2)
VARIANTS["vpc-type-differencing"] = _vpc_footer(60, ">I", 4)
for _v in (0, 1, 256, 511, 0x3000, 0x80000000, 0xFFFFFFFF):
    VARIANTS[f"vpc-block-size-{_v:#x}"] = _vpc_header(32, ">I", _v)
for _v in (0, 1, 3, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x1FFFFFFF, 0x20000000):
    VARIANTS[f"vpc-max-table-entries-{_v:#x}"] = _vpc_header(28, ">I", _v)
for _v in (0, 512, 1 << 40, 1 << 63, 0xFFFFFFFFFFFFFFFF, 0x7FFFFFFFFFFFFE00):
    VARIANTS[f"vpc-table-offset-{_v:#x}"] = _vpc_header(16, ">Q", _v)
for _v in (0, 1, 3, 0x10000000, 0xFFFFFFFE, 0x7FFFFFFF):
    VARIANTS[f"vpc-bat0-{_v:#x}"] = _vpc_bat(0, _v)
VARIANTS["vpc-bat3-0x4"] = _vpc_bat(3, 4)


def _vpc_win(ctx, d, size):
    data = _vpc_base(ctx)
    for f in _vpc_footers(data):
        data[f + 28:f + 32] = b"win "
        struct.pack_into(">Q", data, f + 48, size)
        _vpc_fix_checksum(data, f)
    return write(d, "v.vhd", data)


@variant("vpc-big-table-small-blocks")
def _vpc_big_table(ctx, d):
    """A Hyper-V image of 4 GiB in 512-byte blocks: 8 Mi BAT entries (32 MiB of table, all unallocated)."""
    data = _vpc_base(ctx)[:1536]
    for f in _vpc_footers(data):
        data[f + 28:f + 32] = b"win "
        struct.pack_into(">Q", data, f + 48, 4 << 30)
        _vpc_fix_checksum(data, f)
    struct.pack_into(">I", data, 512 + 28, 8 << 20)
    struct.pack_into(">I", data, 512 + 32, 512)
    p = write(d, "v.vhd", data)
    with open(p, "ab") as f:
        chunk = b"\xff" * (1 << 20)
        for _ in range(32):
            f.write(chunk)
        f.write(bytes(data[:512]))
    return p


# A table of 2^29 - 256 entries in a sparse file of 2 GiB: qemu reads it all; instar scans it in bounded chunks.
VARIANTS["vpc-max-table-entries-sparse-2g"] = _vpc_header(28, ">I", 0x1FFFFF00, extend_to=1536 + 0x1FFFFF00 * 4 + 512)
