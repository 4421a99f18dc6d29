import Glibc

/// Persistent bitmap contents (qcow2.txt "Bitmaps": a bitmap table of cluster offsets, then data clusters in
/// qemu's serialized bit order), read from a source and stored into an image opened writable the way qemu's
/// qcow2_store_persistent_dirty_bitmaps lays them out: per bitmap its dirty data clusters then its table, then
/// one directory, then the header with the bitmaps extension and the autoclear bit.
enum Qcow2BitmapData {
    // qcow2.txt / qemu's block/qcow2-bitmap.c limits.
    static let maxTableEntries: UInt64 = 0x800_0000      // BME_MAX_TABLE_SIZE
    static let maxPhysBytes: UInt64 = 0x2000_0000        // BME_MAX_PHYS_SIZE
    // qcow2.txt: bitmap table entry bits 9-55 host offset, bit 0 "all ones" when the offset is 0; the rest
    // reserved.
    static let entryOffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let entryAllOnes: UInt64 = 1
    static let entryReservedMask: UInt64 = 0xff00_0000_0000_01fe

    /// The serialized length of a bitmap over `size` guest bytes: one bit per granule, in whole 64-bit words
    /// (qemu's hbitmap serialization unit).
    static func serializedBytes(size: UInt64, granularityBits: UInt8) throws -> UInt64 {
        let bits = size.divCeil(UInt64(1) << UInt64(granularityBits))
        // check_constraints_on_bitmap: the data may take at most BME_MAX_PHYS_SIZE bytes.
        guard bits <= maxPhysBytes else {
            throw InstarError.invalid("Too much space will be occupied by the bitmap. Use larger granularity")
        }
        return bits.divCeil(64) * 8
    }
}

extension Qcow2Format: PersistentBitmapStore {
    /// qcow2 keeps persistent bitmaps from version 3 on (qcow2_supports_persistent_dirty_bitmap).
    public var persistentBitmapStore: PersistentBitmapStore? { header.version >= 3 ? self : nil }

    public var persistentBitmaps: [PersistentBitmap] {
        bitmaps.map {
            PersistentBitmap(name: $0.name, granularity: UInt64(1) << UInt64($0.granularityBits),
                             enabled: $0.flags & Qcow2BitmapEntry.flagAuto != 0,
                             inconsistent: $0.flags & Qcow2BitmapEntry.flagInUse != 0)
        }
    }

    /// qemu's bitmap_table_load + load_bitmap_data: every table entry is checked, clusters of all zeroes or
    /// all ones are expanded, data clusters copied; bits past the bitmap's end are dropped.
    public func readBitmap(named name: String) throws -> [UInt8] {
        guard let e = bitmaps.first(where: { $0.name == name }) else {
            throw InstarError(.notFound, "Dirty bitmap '\(name)' not found", errno: ENOENT)
        }
        let failed = InstarError(.invalid, "Could not read bitmap '\(name)' from image: Invalid argument", errno: EINVAL)
        let cs = header.clusterSize
        let total = try Qcow2BitmapData.serializedBytes(size: virtualSize, granularityBits: e.granularityBits)
        let tableSize = total.divCeil(cs)
        guard UInt64(e.tableSize) == tableSize, tableSize <= Qcow2BitmapData.maxTableEntries else { throw failed }
        var out = [UInt8](repeating: 0, count: try checkedInt(total))
        if tableSize == 0 { return out }
        let raw = try file.readExactly(at: e.tableOffset, count: try checkedInt(tableSize * 8), what: "bitmap table")
        let table = Qcow2Mapper.decodeBE64(raw, count: Int(tableSize))
        let bitCount = virtualSize.divCeil(UInt64(1) << UInt64(e.granularityBits))
        // bitmap_table_load checks every entry (check_table_entry) before any data is read.
        for entry in table {
            let offset = entry & Qcow2BitmapData.entryOffsetMask
            if entry & Qcow2BitmapData.entryReservedMask != 0
                || (offset != 0 && (entry & Qcow2BitmapData.entryAllOnes != 0 || offset & (cs - 1) != 0)) {
                throw InstarError(.invalid, "Could not read bitmap_table table from image for bitmap '\(name)': "
                                  + "Invalid argument", errno: EINVAL)
            }
        }
        for (k, entry) in table.enumerated() {
            let offset = entry & Qcow2BitmapData.entryOffsetMask
            let start = UInt64(k) * cs
            let end = min(start + cs, total)
            if offset == 0 {
                if entry & Qcow2BitmapData.entryAllOnes != 0 {
                    for i in Int(start)..<Int(end) { out[i] = 0xff }
                }
                continue
            }
            let data = try file.readExactly(at: offset, count: Int(end - start), what: "bitmap data")
            out.replaceSubrange(Int(start)..<Int(end), with: data)
        }
        // Only granules inside the image carry meaning: clear the padding bits of the last word.
        let usedBytes = Int(bitCount / 8)
        if usedBytes < out.count {
            let keep = bitCount % 8
            out[usedBytes] &= UInt8(truncatingIfNeeded: (UInt16(1) << UInt16(keep)) - 1)
            for i in (usedBytes + 1)..<out.count { out[i] = 0 }
        }
        return out
    }

    /// qmp_block_dirty_bitmap_add (persistent) followed by a merge: the bitmap is kept in memory and written
    /// when the image is closed.
    public func addBitmap(_ bitmap: PersistentBitmap, bits: [UInt8]) throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        guard header.version >= 3 else {
            throw InstarError.unsupported("Cannot store dirty bitmaps in qcow2 v2 files")
        }
        if bitmaps.contains(where: { $0.name == bitmap.name })
            || pendingBitmaps.contains(where: { $0.bitmap.name == bitmap.name }) {
            throw InstarError.invalid("Bitmap already exists: \(bitmap.name)")
        }
        guard isPowerOfTwo(bitmap.granularity) else { throw InstarError.invalid("Granularity must be power of 2") }
        let bitsLog = UInt8(bitmap.granularity.trailingZeroBitCount)
        guard bitsLog >= Qcow2Bitmaps.minGranularityBits, bitsLog <= Qcow2Bitmaps.maxGranularityBits else {
            throw InstarError.invalid("Granularity must be between 512 and 2147483648")
        }
        let nameBytes = bitmap.name.utf8.count
        guard nameBytes > 0, nameBytes <= Qcow2Bitmaps.maxNameLength else {
            throw InstarError.invalid("Bitmap name is too long")
        }
        guard UInt64(bits.count) == (try Qcow2BitmapData.serializedBytes(size: virtualSize, granularityBits: bitsLog)) else {
            throw InstarError.invalid("Bitmaps are incompatible and can't be merged")
        }
        guard bitmaps.count + pendingBitmaps.count < Int(Qcow2.maxBitmaps) else {
            throw InstarError.invalid("Maximum number of persistent bitmaps is already reached")
        }
        // qemu keeps a node's bitmaps newest first, and stores them in that order.
        pendingBitmaps.insert((bitmap: bitmap, bits: bits), at: 0)
    }

    /// Writes the bitmaps added since the open (called from close, before the caches are written back).
    func storePendingBitmaps() throws {
        guard !pendingBitmaps.isEmpty else { return }
        let pending = pendingBitmaps
        pendingBitmaps = []
        let w = try writeSide()
        try w.prepare()
        try w.storeBitmaps(pending)
    }
}

extension Qcow2Writer {
    /// qcow2_store_persistent_dirty_bitmaps for an image without bitmaps yet: store_bitmap for each (data
    /// clusters holding a dirty bit, then the table), bitmap_list_store (the directory), a cache flush, then
    /// the header with the extension and the autoclear bit.
    func storeBitmaps(_ list: [(bitmap: PersistentBitmap, bits: [UInt8])]) throws {
        var entries: [Qcow2BitmapEntry] = []
        for (bm, bits) in list {
            let gbits = UInt8(bm.granularity.trailingZeroBitCount)
            let total = UInt64(bits.count)
            let tableSize = total.divCeil(clusterSize)
            guard tableSize <= Qcow2BitmapData.maxTableEntries,
                  tableSize * clusterSize <= Qcow2BitmapData.maxPhysBytes else {
                throw InstarError.invalid("Bitmap '\(bm.name)' is too big")
            }
            var table = [UInt64](repeating: 0, count: Int(tableSize))
            for k in 0..<Int(tableSize) {
                let start = k * Int(clusterSize)
                let end = min(start + Int(clusterSize), bits.count)
                let chunk = bits[start..<end]
                if !chunk.contains(where: { $0 != 0 }) { continue }
                let off = try allocateClusters(1)
                table[k] = off
                var buf = Array(chunk)
                buf.append(contentsOf: [UInt8](repeating: 0, count: Int(clusterSize) - buf.count))
                try file.write(buf, at: off)
            }
            var tableOffset: UInt64 = 0
            if tableSize > 0 {
                tableOffset = try allocateClusters((tableSize * 8).divCeil(clusterSize))
                try writePadded(Qcow2Writer.encodeBE64(table), at: tableOffset)
            }
            entries.append(Qcow2BitmapEntry(name: bm.name, granularityBits: gbits,
                                            flags: bm.enabled ? Qcow2BitmapEntry.flagAuto : 0,
                                            tableOffset: tableOffset, tableSize: UInt32(tableSize)))
        }
        // qcow2.txt "Bitmap directory": per entry 24 bytes, the name, padding to 8 bytes.
        var dir: [UInt8] = []
        for e in entries {
            var d = [UInt8](repeating: 0, count: Qcow2Bitmaps.entryHeaderBytes)
            func put(_ at: Int, _ v: UInt64, _ n: Int) {
                for i in 0..<n { d[at + i] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - i))) }
            }
            put(0, e.tableOffset, 8)
            put(8, UInt64(e.tableSize), 4)
            put(12, UInt64(e.flags), 4)
            d[16] = 1   // type: dirty tracking bitmap
            d[17] = e.granularityBits
            put(18, UInt64(e.name.utf8.count), 2)
            d += Array(e.name.utf8)
            d += [UInt8](repeating: 0, count: (8 - d.count % 8) % 8)
            dir += d
        }
        guard UInt64(dir.count) <= Qcow2.maxBitmapDirectoryBytes else {
            throw InstarError.invalid("Bitmap directory is too large")
        }
        let dirOffset = try allocateClusters(UInt64(dir.count).divCeil(clusterSize))
        try writePadded(dir, at: dirOffset)
        try flushAll()
        try file.sync()
        header.autoclearFeatures |= Qcow2.autoclearBitmaps
        bitmapsExtension = Qcow2BitmapsExtension(count: UInt32(entries.count), directorySize: UInt64(dir.count),
                                                 directoryOffset: dirOffset)
        try rewriteHeader()
    }

    /// Tables and the directory take part of a cluster. Under O_DIRECT qemu's file layer writes whole blocks of
    /// its request alignment (512 bytes here), so the file may end past their last byte: do the same.
    private func writePadded(_ bytes: [UInt8], at offset: UInt64) throws {
        var b = bytes
        if file.direct { b += [UInt8](repeating: 0, count: (512 - b.count % 512) % 512) }
        try file.write(b, at: offset)
    }
}
