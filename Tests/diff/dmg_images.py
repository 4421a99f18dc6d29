"""Builds Apple UDIF (.dmg) images byte by byte for the dmg tests: qemu-img cannot create dmg, so each test
composes the data fork (chunk payloads), one or more "mish" block tables and the 512-byte "koly" trailer, with
the block tables either in a resource fork or base64 in an XML property list, as Apple's tools write them.

Layouts (Apple's UDIF, as qemu's block/dmg.c reads it; all big-endian):
  koly trailer (512 bytes): "koly", version 4, header size 512, flags, running data fork offset (16),
    data fork offset (0x18) and length (0x20), resource fork offset (0x28) and length (0x30), ...,
    XML plist offset (0xd8) and length (0xe0), ..., image variant (0x1e8), sector count (0x1ec).
  mish block: "mish", version 1, first sector (8), sector count (0x10), data offset (0x18), buffers needed,
    block descriptors, reserved, checksum (0x40..0xc8), chunk count (0xc8); chunks from 0xcc, 40 bytes each:
    type (4), comment (4), first sector (8), sector count (8), data offset (8), data length (8).
  resource fork: data offset (u32 at 0), map offset (4), data length (8), map length (12); the data is a run of
    resources, each a u32 length and its bytes.
"""
import base64
import bz2
import struct
import zlib

SECTOR = 512
UDZE, UDRW, UDIG = 0, 1, 2
UDCO, UDZO, UDBZ, ULFO = 0x80000004, 0x80000005, 0x80000006, 0x80000007
UDCM, UDLE = 0x7FFFFFFE, 0xFFFFFFFF


def mish(chunks, first_sector=0, sector_count=0, data_offset=0, count_field=None):
    """A mish block: `chunks` are (type, first sector, sector count, data offset, data length) tuples."""
    head = bytearray(0xCC)
    struct.pack_into(">4sIQQQII", head, 0, b"mish", 1, first_sector, sector_count, data_offset, 0x208, 0)
    struct.pack_into(">I", head, 0xC8, len(chunks) if count_field is None else count_field)
    body = b"".join(struct.pack(">IIQQQQ", t, 0, s, n, o, l) for (t, s, n, o, l) in chunks)
    return bytes(head) + body


def koly(sectors, data_fork=(0, 0), rsrc=(0, 0), xml=(0, 0)):
    k = bytearray(512)
    struct.pack_into(">4sIII", k, 0, b"koly", 4, 512, 1)
    struct.pack_into(">QQQQ", k, 0x18, data_fork[0], data_fork[1], rsrc[0], rsrc[1])
    struct.pack_into(">II", k, 0x38, 1, 1)
    struct.pack_into(">QQ", k, 0xD8, xml[0], xml[1])
    struct.pack_into(">IQ", k, 0x1E8, 1, sectors)
    return bytes(k)


def resource_fork(resources):
    """A resource fork holding `resources` (bytes each) in its data area, followed by a small (ignored) map."""
    data = b"".join(struct.pack(">I", len(r)) + r for r in resources)
    head = bytearray(256)
    struct.pack_into(">IIII", head, 0, 256, 256 + len(data), len(data), 30)
    return bytes(head) + data + b"\0" * 30


def plist(resources, indent="\t\t\t\t"):
    """An XML property list with a "blkx" array holding each resource as base64 <data>, as hdiutil writes it."""
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n',
             '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" '
             '"http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n',
             '<plist version="1.0">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n'
             '\t\t<array>\n']
    for n, r in enumerate(resources):
        b64 = base64.b64encode(r).decode()
        lines = "\n".join(indent + b64[i:i + 52] for i in range(0, len(b64), 52))
        parts.append(f"\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n"
                     f"\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n{lines}\n\t\t\t\t</data>\n"
                     f"\t\t\t\t<key>ID</key>\n\t\t\t\t<string>{n - 1}</string>\n\t\t\t</dict>\n")
    parts.append("\t\t</array>\n\t</dict>\n</dict>\n</plist>\n")
    return "".join(parts).encode()


def compress(kind, data):
    if kind == UDZO:
        return zlib.compress(data)
    if kind == UDBZ:
        return bz2.compress(data)
    if kind == UDRW:
        return data
    raise ValueError(kind)


class Image:
    """An image as a list of chunks: ("raw"|"zlib"|"bzip2", data) or ("zero"|"ignore", sectors) or
    ("lzfse", sectors, payload) or ("type", code, sectors, payload); `bytes(form)` lays it out."""

    KINDS = {"raw": UDRW, "zlib": UDZO, "bzip2": UDBZ}

    def __init__(self, chunks, split=1, trailing=b"", lead=b""):
        self.chunks = chunks
        self.split = split  # how many mish blocks (partitions) the chunks are spread over
        self.trailing = trailing
        self.lead = lead

    def expected(self):
        """The guest bytes every chunk stands for."""
        out = b""
        for c in self.chunks:
            if c[0] in self.KINDS:
                out += c[1] + b"\0" * (-len(c[1]) % SECTOR)
            elif c[0] in ("zero", "ignore"):
                out += b"\0" * (c[1] * SECTOR)
            elif c[0] == "lzfse":
                out += b"\0" * (c[1] * SECTOR)
            else:
                out += b"\0" * (c[2] * SECTOR)
        return out

    def layout(self, form="rsrc", mish_edit=None, koly_edit=None, sectors=None):
        data = bytearray(self.lead)
        fork_start = len(data)
        entries = []
        sector = 0
        for c in self.chunks:
            if c[0] in self.KINDS:
                t = self.KINDS[c[0]]
                padded = c[1] + b"\0" * (-len(c[1]) % SECTOR)
                payload = compress(t, padded)
                n = len(padded) // SECTOR
            elif c[0] in ("zero", "ignore"):
                t, n, payload = (UDZE if c[0] == "zero" else UDIG), c[1], b""
            elif c[0] == "lzfse":
                t, n, payload = ULFO, c[1], c[2]
            else:
                t, n, payload = c[1], c[2], c[3]
            entries.append([t, sector, n, len(data) - fork_start, len(payload)])
            data += payload
            sector += n
        total = sector
        # Spread the chunks over `split` mish blocks, each relative to its own first sector and data offset.
        per = max(1, -(-len(entries) // self.split))
        blocks = []
        for b in range(0, len(entries), per):
            group = entries[b:b + per]
            first, off0 = group[0][1], group[0][3]
            rel = [(t, s - first, n, o - off0, l) for (t, s, n, o, l) in group]
            end = group[-1][1] + group[-1][2]
            rel.append((UDLE, end - first, 0, group[-1][3] + group[-1][4] - off0, 0))
            blocks.append(mish(rel, first_sector=first, sector_count=end - first, data_offset=off0))
        if mish_edit:
            blocks = mish_edit(blocks)
        fork_len = len(data) - fork_start
        meta_at = len(data)
        if form == "rsrc":
            meta = resource_fork(blocks)
            k = koly(total if sectors is None else sectors, (fork_start, fork_len), rsrc=(meta_at, len(meta)))
        else:
            meta = plist(blocks)
            k = koly(total if sectors is None else sectors, (fork_start, fork_len), xml=(meta_at, len(meta)))
        if koly_edit:
            k = koly_edit(bytearray(k))
        return bytes(data) + meta + bytes(k) + self.trailing
