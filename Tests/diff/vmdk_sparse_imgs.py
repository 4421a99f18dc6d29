"""vmdk extents qemu-img cannot create, built byte by byte: COWD sparse extents (VMDK3, the vmfsSparse type) and
ESXi seSparse extents, each behind a text descriptor file naming it.

COWD extent (block/vmdk.c's VMDK3Header, all little-endian after the "COWD" magic):
    0 magic "COWD" | 4 version | 8 flags | 12 disk_sectors | 16 granularity (sectors per grain)
    20 l1dir_offset (sector) | 24 l1dir_size (entries) | 28 file_sectors | 32 cylinders | 36 heads
    40 sectors_per_track
  The grain directory holds l1dir_size 32-bit sector offsets of grain tables; every grain table has 4096 32-bit
  entries, each the sector of a grain (0: unallocated).

seSparse extent: a 512-byte const header at sector 0 (26 64-bit fields and zero padding), a 512-byte volatile
header at the sector the const header names, a grain directory of 64-bit entries (0: no table,
0x1000000000000000 | n: grain table n at grain_tables_offset + n * 64 sectors) and grain tables of 4096 64-bit
entries: 0 unallocated, 0x1... scsi-unmapped and 0x2... zero (both read as zeroes), 0x3... allocated with the
grain index g stored as (g & 0xfff) << 48 | g >> 12 and its data at grains_offset + g * 8 sectors.
"""
import os
import struct

SECTOR = 512
COWD_GTES = 4096
SE_GTES = 4096
SE_GRAIN_SECTORS = 8
SE_GT_SECTORS = SE_GTES * 8 // SECTOR  # 64

SE_CONST_FIELDS = ["magic", "version", "capacity", "grain_size", "grain_table_size", "flags", "reserved1",
                   "reserved2", "reserved3", "reserved4", "volatile_header_offset", "volatile_header_size",
                   "journal_header_offset", "journal_header_size", "journal_offset", "journal_size",
                   "grain_dir_offset", "grain_dir_size", "grain_tables_offset", "grain_tables_size",
                   "free_bitmap_offset", "free_bitmap_size", "backmap_offset", "backmap_size", "grains_offset",
                   "grains_size"]
SE_VOLATILE_FIELDS = ["magic", "free_gt_number", "next_txn_seq_number", "replay_journal"]

DESC_HEAD = "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID={parent:08x}\n"


def pattern(tag, n):
    """`n` bytes that tell where they came from (tag and position)."""
    unit = bytes((tag + i) & 0xFF for i in range(251))
    return (unit * (n // len(unit) + 1))[:n]


def write_descriptor(d, name, create_type, extents, cid=0x1234ABCD, parent_cid=0xFFFFFFFF, parent_hint=None,
                     extra=""):
    """A descriptor file `name` in `d` naming `extents` [(access, sectors, type, file)]."""
    text = DESC_HEAD.format(cid=cid, parent=parent_cid) + f'createType="{create_type}"\n'
    if parent_hint is not None:
        text += f'parentFileNameHint="{parent_hint}"\n'
    text += "\n# Extent description\n"
    for access, sectors, typ, fname in extents:
        text += f'{access} {sectors} {typ} "{fname}"\n'
    text += "\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n" + extra
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write(text)
    return p


class Cowd:
    """A COWD extent: `grains` maps a grain index to its bytes (granularity * 512 of them, or fewer, padded);
    `header` overrides header fields; `gd_entries` / `gt_entries` override table entries after layout;
    `all_tables` lays out every grain table (qemu writes only through existing ones)."""

    def __init__(self, sectors, granularity=1, grains=None, header=None, gd_entries=None, gt_entries=None,
                 l1_size=None, truncate_to=None, all_tables=False):
        self.sectors, self.granularity = sectors, granularity
        self.all_tables = all_tables
        self.grains = grains or {}
        self.header = header or {}
        self.gd_entries = gd_entries or {}
        self.gt_entries = gt_entries or {}
        self.l1_size = l1_size
        self.truncate_to = truncate_to

    def build(self):
        g = self.granularity
        span = COWD_GTES * g  # sectors per grain table
        l1 = self.l1_size if self.l1_size is not None else max(1, -(-self.sectors // span))
        gd_sector = 4
        gd_sectors = max(1, -(-l1 * 4 // SECTOR))
        next_sector = gd_sector + gd_sectors
        tables = {}
        wanted = sorted(self.grains)
        if self.all_tables:
            wanted = sorted(set(wanted) | {t * COWD_GTES for t in range(l1)})
        for idx in wanted:
            t = idx // COWD_GTES
            if t not in tables:
                tables[t] = next_sector
                next_sector += COWD_GTES * 4 // SECTOR
        grain_at = {}
        for idx in sorted(self.grains):
            grain_at[idx] = next_sector
            next_sector += g
        size = next_sector * SECTOR
        buf = bytearray(size)
        fields = {"version": 1, "flags": 3, "disk_sectors": self.sectors, "granularity": g,
                  "l1dir_offset": gd_sector, "l1dir_size": l1, "file_sectors": next_sector, "cylinders": 0,
                  "heads": 0, "sectors_per_track": 0}
        fields.update(self.header)
        buf[0:4] = b"COWD"
        order = ["version", "flags", "disk_sectors", "granularity", "l1dir_offset", "l1dir_size", "file_sectors",
                 "cylinders", "heads", "sectors_per_track"]
        for i, k in enumerate(order):
            struct.pack_into("<I", buf, 4 + 4 * i, fields[k] & 0xFFFFFFFF)
        gd = {t: s for t, s in tables.items()}
        gd.update(self.gd_entries)
        for t, s in gd.items():
            if gd_sector * SECTOR + t * 4 + 4 <= len(buf):
                struct.pack_into("<I", buf, gd_sector * SECTOR + t * 4, s & 0xFFFFFFFF)
        entries = {}
        for idx, s in grain_at.items():
            entries[idx] = s
        entries.update(self.gt_entries)
        for idx, value in entries.items():
            t = idx // COWD_GTES
            if t in tables:
                struct.pack_into("<I", buf, tables[t] * SECTOR + (idx % COWD_GTES) * 4, value & 0xFFFFFFFF)
        for idx, data in self.grains.items():
            off = grain_at[idx] * SECTOR
            buf[off:off + len(data)] = data[:g * SECTOR]
        if self.truncate_to is not None:
            del buf[self.truncate_to:]
        return bytes(buf)


def se_allocated(index):
    """seSparse's grain table entry for grain number `index` of the grains area."""
    return (0x3 << 60) | ((index & 0xFFF) << 48) | (index >> 12)


SE_ZERO = 0x2 << 60
SE_UNMAPPED = 0x1 << 60


class SeSparse:
    """A seSparse extent of `sectors`: `grains` maps a guest grain index (4 KiB grains) to its bytes, `zero` and
    `unmapped` list guest grains whose entry says zero or scsi-unmapped. `const` / `volatile` override header
    fields; `gd_entries` / `gt_entries` override table entries after layout."""

    def __init__(self, sectors, grains=None, zero=(), unmapped=(), const=None, volatile=None, gd_entries=None,
                 gt_entries=None, shuffle=True, const_pad=None, volatile_pad=None, gd_sectors=None,
                 truncate_to=None):
        self.sectors = sectors
        self.grains = grains or {}
        self.zero, self.unmapped = list(zero), list(unmapped)
        self.const, self.volatile = const or {}, volatile or {}
        self.gd_entries, self.gt_entries = gd_entries or {}, gt_entries or {}
        self.shuffle = shuffle
        self.const_pad, self.volatile_pad = const_pad, volatile_pad
        self.gd_sectors = gd_sectors
        self.truncate_to = truncate_to

    def build(self):
        span = SE_GTES * SE_GRAIN_SECTORS  # 16 MiB of guest per grain table
        l1 = max(1, -(-self.sectors // span))
        gd_sectors = self.gd_sectors if self.gd_sectors is not None else max(1, -(-l1 * 8 // SECTOR))
        vol, jh, jr = 1, 2, 3
        gd = 8
        used = sorted({i // SE_GTES for i in list(self.grains) + self.zero + self.unmapped})
        # Grain tables are numbered in an order unlike the guest's (the last used table first), so the
        # directory's table numbers are really followed.
        order = list(reversed(used)) if self.shuffle else used
        table_no = {t: n for n, t in enumerate(order)}
        gts = -(-(gd + gd_sectors) // 64) * 64
        gts_size = max(1, len(used)) * SE_GT_SECTORS
        grains_off = gts + gts_size
        # Grains stored in reverse guest order as well.
        gidx = sorted(self.grains, reverse=self.shuffle)
        grain_no = {g: n for n, g in enumerate(gidx)}
        size = (grains_off + len(gidx) * SE_GRAIN_SECTORS) * SECTOR
        buf = bytearray(size)
        fields = {"magic": 0xCAFEBABE, "version": 0x0000000200000001, "capacity": self.sectors, "grain_size": 8,
                  "grain_table_size": 64, "flags": 0, "reserved1": 0, "reserved2": 0, "reserved3": 0,
                  "reserved4": 0, "volatile_header_offset": vol, "volatile_header_size": 1,
                  "journal_header_offset": jh, "journal_header_size": 1, "journal_offset": jr,
                  "journal_size": 5, "grain_dir_offset": gd, "grain_dir_size": gd_sectors,
                  "grain_tables_offset": gts, "grain_tables_size": gts_size, "free_bitmap_offset": 0,
                  "free_bitmap_size": 0, "backmap_offset": 0, "backmap_size": 0, "grains_offset": grains_off,
                  "grains_size": len(gidx) * SE_GRAIN_SECTORS}
        fields.update(self.const)
        for i, k in enumerate(SE_CONST_FIELDS):
            struct.pack_into("<Q", buf, 8 * i, fields[k] & 0xFFFFFFFFFFFFFFFF)
        if self.const_pad:
            off, data = self.const_pad
            buf[off:off + len(data)] = data
        vfields = {"magic": 0xCAFECAFE, "free_gt_number": len(used), "next_txn_seq_number": 1, "replay_journal": 0}
        vfields.update(self.volatile)
        for i, k in enumerate(SE_VOLATILE_FIELDS):
            struct.pack_into("<Q", buf, vol * SECTOR + 8 * i, vfields[k] & 0xFFFFFFFFFFFFFFFF)
        if self.volatile_pad:
            off, data = self.volatile_pad
            buf[vol * SECTOR + off:vol * SECTOR + off + len(data)] = data
        gde = {t: (0x1 << 60) | table_no[t] for t in used}
        gde.update(self.gd_entries)
        for t, v in gde.items():
            if gd * SECTOR + t * 8 + 8 <= len(buf):
                struct.pack_into("<Q", buf, gd * SECTOR + t * 8, v & 0xFFFFFFFFFFFFFFFF)
        entries = {g: se_allocated(grain_no[g]) for g in self.grains}
        entries.update({g: SE_ZERO for g in self.zero})
        entries.update({g: SE_UNMAPPED for g in self.unmapped})
        entries.update(self.gt_entries)
        for g, v in entries.items():
            t = g // SE_GTES
            if t in table_no:
                off = (gts + table_no[t] * SE_GT_SECTORS) * SECTOR + (g % SE_GTES) * 8
                struct.pack_into("<Q", buf, off, v & 0xFFFFFFFFFFFFFFFF)
        for g, data in self.grains.items():
            off = (grains_off + grain_no[g] * SE_GRAIN_SECTORS) * SECTOR
            buf[off:off + len(data)] = data[:SE_GRAIN_SECTORS * SECTOR]
        if self.truncate_to is not None:
            del buf[self.truncate_to:]
        return bytes(buf)


def write_file(d, name, data):
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def cowd_image(d, extent, name="img.vmdk", ext_name="img-delta.vmdk", desc_sectors=None, **kw):
    """A vmfsSparse descriptor `name` with one VMFSSPARSE extent `ext_name` built from `extent` (a Cowd)."""
    write_file(d, ext_name, extent.build())
    sectors = extent.sectors if desc_sectors is None else desc_sectors
    return write_descriptor(d, name, "vmfsSparse", [("RW", sectors, "VMFSSPARSE", ext_name)], **kw)


def se_image(d, extent, name="img.vmdk", ext_name="img-sesparse.vmdk", desc_sectors=None, **kw):
    """A seSparse descriptor `name` with one SESPARSE extent `ext_name` built from `extent` (a SeSparse)."""
    write_file(d, ext_name, extent.build())
    sectors = extent.sectors if desc_sectors is None else desc_sectors
    return write_descriptor(d, name, "seSparse", [("RW", sectors, "SESPARSE", ext_name)], **kw)


def expected_raw(sectors, grains, grain_bytes, zero=()):
    """The guest bytes the grains describe (unallocated and zero grains read as zeroes)."""
    out = bytearray(sectors * SECTOR)
    for g, data in grains.items():
        off = g * grain_bytes
        chunk = data[:grain_bytes]
        end = min(len(out), off + len(chunk))
        if off < len(out):
            out[off:end] = chunk[:end - off]
    return bytes(out)
