import Glibc

/// The life of persistent bitmaps in an image opened read/write, as qemu's block/qcow2-bitmap.c leads it:
/// at open every bitmap is marked in use on disk (so that a crash leaves them inconsistent rather than wrong),
/// writes set bits in the enabled ones, a resize resizes them, and at close they are stored again: per bitmap
/// its dirty data clusters then its table, then one new directory, then the header with the bitmaps extension
/// and the autoclear bit, and only then are the old directory and tables freed.
enum Qcow2BitmapData {
    // qcow2.txt / qemu's block/qcow2-bitmap.c limits.
    static let maxTableEntries: UInt64 = 0x800_0000      // BME_MAX_TABLE_SIZE
    static let maxPhysBytes: UInt64 = 0x2000_0000        // BME_MAX_PHYS_SIZE
    // qcow2.txt: bitmap table entry bits 9-55 host offset, bit 0 "all ones" when the offset is 0; the rest
    // reserved.
    static let entryOffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let entryAllOnes: UInt64 = 1
    static let entryReservedMask: UInt64 = 0xff00_0000_0000_01fe

    /// qcow2-bitmap.c check_table_entry: no reserved bit, and a data offset is cluster aligned and not combined
    /// with the "all ones" flag.
    static func entryValid(_ entry: UInt64, clusterSize: UInt64) -> Bool {
        if entry & entryReservedMask != 0 { return false }
        let offset = entry & entryOffsetMask
        return offset == 0 || (entry & entryAllOnes == 0 && offset & (clusterSize - 1) == 0)
    }
    /// The largest bitmap `readBitmap` returns whole (a deliberate limit; see there).
    static let maxCopiedBytes: UInt64 = 256 << 20

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

    /// The bits of a bitmap loaded at open (all zeroes and all ones clusters expanded, bits past the image's
    /// end cleared).
    public func readBitmap(named name: String) throws -> [UInt8] {
        guard let bm = liveBitmaps.first(where: { $0.name == name }) else {
            throw InstarError(.notFound, "Dirty bitmap '\(name)' not found", errno: ENOENT)
        }
        guard !bm.inconsistent else {
            throw InstarError(.invalid, "Bitmap '\(name)' is inconsistent and cannot be used", errno: EINVAL)
        }
        // The whole bitmap is handed over in memory: bound it (qemu allows up to 512 MiB of bits, which only a
        // multi-terabyte image at 512-byte granularity reaches).
        guard bm.serializedBytes <= Qcow2BitmapData.maxCopiedBytes else {
            throw InstarError(.unsupported, "Bitmap '\(name)' is too large to copy "
                              + "(\(bm.serializedBytes >> 20) MiB of bits, at most \(Qcow2BitmapData.maxCopiedBytes >> 20) MiB)",
                              errno: ENOMEM)
        }
        return try bm.allBytes()
    }

    /// qmp_block_dirty_bitmap_add (persistent) followed by a merge: the bitmap is kept in memory and written
    /// when the image is closed.
    public func addBitmap(_ bitmap: PersistentBitmap, bits: [UInt8]) throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        guard header.version >= 3 else {
            throw InstarError.unsupported("Cannot store dirty bitmaps in qcow2 v2 files")
        }
        if liveBitmaps.contains(where: { $0.name == bitmap.name })
            || addedBitmaps.contains(where: { $0.name == bitmap.name }) {
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
        guard liveBitmaps.count + addedBitmaps.count < Int(Qcow2.maxBitmaps) else {
            throw InstarError.invalid("Maximum number of persistent bitmaps is already reached")
        }
        // qemu keeps a node's bitmaps newest first, and stores new ones in that order.
        addedBitmaps.insert(Qcow2LiveBitmap(adding: bitmap.name, granularityBits: bitsLog, enabled: bitmap.enabled,
                                            bits: bits, size: virtualSize, clusterSize: header.clusterSize,
                                            file: file), at: 0)
    }

    /// The rest of qcow2_do_open for a writable image: the header loses the bitmaps extension qemu ignored and
    /// the autoclear bits it does not know, and the bitmaps about to change are marked in use on disk
    /// (update_ext_header_and_dir_in_place: the autoclear bit dropped, the directory rewritten in place with
    /// the in-use flags, the autoclear bit set again). A read-only open changes nothing.
    func prepareBitmapsForWriting() throws {
        guard writable else { return }
        let updateHeader = extensions.ignoredBitmaps
            || (header.version >= 3 && header.autoclearFeatures & ~Qcow2.autoclearKnown != 0)
        if header.version >= 3 { header.autoclearFeatures &= Qcow2.autoclearKnown }
        let marking = liveBitmaps.filter { !$0.inconsistent }
        if let ext = extensions.bitmaps, !marking.isEmpty {
            header.autoclearFeatures &= ~Qcow2.autoclearBitmaps
            try writeHeaderCluster(header, bitmaps: ext)
            let entries = liveBitmaps.compactMap { bm -> Qcow2BitmapEntry? in
                guard var e = bm.stored else { return nil }
                e.flags |= Qcow2BitmapEntry.flagInUse
                return e
            }
            try writeAligned(Qcow2Bitmaps.encodeDirectory(entries), at: ext.directoryOffset)
            try file.sync()
            header.autoclearFeatures |= Qcow2.autoclearBitmaps
            try writeHeaderCluster(header, bitmaps: ext)
        } else if updateHeader {
            try writeHeaderCluster(header, bitmaps: extensions.bitmaps)
        }
    }

    /// bdrv_set_dirty after a guest write, zero write or discard: the enabled bitmaps take the range.
    func markBitmapsDirty(offset: UInt64, length: UInt64) throws {
        for list in [liveBitmaps, addedBitmaps] {
            for bm in list where bm.enabled && !bm.inconsistent { try bm.setDirty(offset: offset, length: length) }
        }
    }

    /// qcow2_truncate_bitmaps_check: every bitmap must be usable for the image to change size.
    func checkBitmapsResizable() throws {
        if let bm = liveBitmaps.first(where: { $0.inconsistent }) {
            throw InstarError(.unsupported, "Bitmap '\(bm.name)' is inconsistent and cannot be used\n"
                              + "Try block-dirty-bitmap-remove to delete this bitmap from disk", errno: ENOTSUP)
        }
    }

    /// bdrv_dirty_bitmap_truncate: the bitmaps follow the new size.
    func resizeBitmaps(to newSize: UInt64) throws {
        for bm in liveBitmaps + addedBitmaps { try bm.truncate(to: newSize) }
    }

    /// qcow2_store_persistent_dirty_bitmaps at close.
    func storeBitmaps() throws {
        // After a corruption was signalled qemu writes nothing more.
        guard writable, !corruptionSignalled else { return }
        // qemu stores every bitmap but those already inconsistent at open; with none of those it writes nothing.
        guard liveBitmaps.contains(where: { !$0.inconsistent }) || !addedBitmaps.isEmpty else { return }
        let w = try writeSide()
        try w.prepare()
        try w.storeBitmaps()
        liveBitmaps = []
        addedBitmaps = []
    }

    /// Writes bitmap metadata as qemu's file layer does under O_DIRECT: a request that does not cover whole
    /// blocks of its alignment (512 bytes here) becomes a read-modify-write of those blocks, so the bytes around
    /// it keep what the file held (zeroes past its end) and the file may grow to the block's end.
    func writeAligned(_ bytes: [UInt8], at offset: UInt64) throws {
        let align: UInt64 = 512
        let end = try offset.adding(UInt64(bytes.count))
        guard file.direct, offset % align != 0 || end % align != 0 else {
            try file.write(bytes, at: offset)
            return
        }
        let start = offset / align * align
        var block = [UInt8](repeating: 0, count: Int(try end.alignedUp(align) - start))
        try block.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: start) }
        let from = Int(offset - start)
        block.replaceSubrange(from..<(from + bytes.count), with: bytes)
        try file.write(block, at: start)
    }
}

extension Qcow2Bitmaps {
    /// The directory (qcow2.txt "Bitmap directory"): per entry 24 bytes, the name, padding to 8 bytes.
    static func encodeDirectory(_ entries: [Qcow2BitmapEntry]) -> [UInt8] {
        var dir: [UInt8] = []
        for e in entries {
            var d = [UInt8](repeating: 0, count: entryHeaderBytes)
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
        return dir
    }
}

extension Qcow2Writer {
    /// qcow2_store_persistent_dirty_bitmaps: store_bitmap for each bitmap to keep (its data clusters holding a
    /// set bit, then its table), a new directory that also lists the bitmaps left inconsistent, a cache flush,
    /// the header with the extension and the autoclear bit; then the old directory and the old tables and data
    /// are freed (the data clusters discarded from the file).
    func storeBitmaps() throws {
        // Clusters freed so far are free for qemu at once; here they wait for their L2 tables to be written.
        try flushAll()
        var entries: [Qcow2BitmapEntry] = []
        var dropped: [Qcow2LiveBitmap] = []
        for bm in format.liveBitmaps + format.addedBitmaps {
            if bm.inconsistent, let e = bm.stored {
                entries.append(e)
                continue
            }
            let (tableOffset, tableSize) = try storeBitmap(bm)
            entries.append(Qcow2BitmapEntry(name: bm.name, granularityBits: bm.granularityBits,
                                            flags: bm.enabled ? Qcow2BitmapEntry.flagAuto : 0,
                                            tableOffset: tableOffset, tableSize: tableSize))
            if bm.stored != nil { dropped.append(bm) }
        }
        let dir = Qcow2Bitmaps.encodeDirectory(entries)
        guard UInt64(dir.count) <= Qcow2.maxBitmapDirectoryBytes else {
            throw InstarError.invalid("Bitmap directory is too large")
        }
        let dirOffset = try allocateClusters(UInt64(dir.count).divCeil(clusterSize))
        try format.writeAligned(dir, at: dirOffset)
        try flushAll()
        try file.sync()
        let old = format.extensions.bitmaps
        header.autoclearFeatures |= Qcow2.autoclearBitmaps
        bitmapsExtension = Qcow2BitmapsExtension(count: UInt32(entries.count), directorySize: UInt64(dir.count),
                                                 directoryOffset: dirOffset)
        try rewriteHeader()
        format.extensions.bitmaps = bitmapsExtension
        // The new directory is in place: what the old one named can go.
        if let old { try freeRange(old.directoryOffset, old.directorySize) }
        for bm in dropped {
            guard let e = bm.stored else { continue }
            for entry in bm.diskTable {
                let offset = entry & Qcow2BitmapData.entryOffsetMask
                if offset != 0 { try freeRange(offset, clusterSize, discard: true) }
            }
            try freeRange(e.tableOffset, UInt64(e.tableSize) * 8)
        }
        processDiscards()
    }

    /// store_bitmap: one cluster for each chunk holding a set bit, then the table.
    private func storeBitmap(_ bm: Qcow2LiveBitmap) throws -> (UInt64, UInt32) {
        let tableSize = UInt64(bm.chunkCount)
        guard tableSize <= Qcow2BitmapData.maxTableEntries,
              tableSize * clusterSize <= Qcow2BitmapData.maxPhysBytes else {
            throw InstarError.invalid("Bitmap '\(bm.name)' is too big")
        }
        var table = [UInt64](repeating: 0, count: Int(tableSize))
        for k in 0..<Int(tableSize) {
            var chunk = try bm.chunk(k)
            if !chunk.contains(where: { $0 != 0 }) { continue }
            let off = try allocateClusters(1)
            table[k] = off
            chunk.append(contentsOf: [UInt8](repeating: 0, count: Int(clusterSize) - chunk.count))
            try file.write(chunk, at: off)
        }
        var tableOffset: UInt64 = 0
        if tableSize > 0 {
            tableOffset = try allocateClusters((tableSize * 8).divCeil(clusterSize))
            try format.writeAligned(Qcow2Writer.encodeBE64(table), at: tableOffset)
        }
        return (tableOffset, UInt32(tableSize))
    }
}
