import Glibc

/// qcow2's side of `qemu-img bitmap` (block/qcow2-bitmap.c): bitmaps added, removed, cleared, enabled or
/// disabled, and merged into, on an image opened read/write. Changes to bits stay in memory until close, as
/// in qemu; only a removal rewrites the directory at once (qcow2_co_remove_persistent_dirty_bitmap).
extension Qcow2Format: PersistentBitmapEditing {
    private func liveBitmap(_ name: String) throws -> Qcow2LiveBitmap {
        if let bm = liveBitmaps.first(where: { $0.name == name }) ?? addedBitmaps.first(where: { $0.name == name }) {
            return bm
        }
        throw InstarError(.notFound, "Dirty bitmap '\(name)' not found", errno: ENOENT)
    }

    public var editableBitmaps: [PersistentBitmap] {
        (liveBitmaps + addedBitmaps).map {
            PersistentBitmap(name: $0.name, granularity: UInt64(1) << UInt64($0.granularityBits),
                             enabled: $0.enabled, inconsistent: $0.inconsistent)
        }
    }

    public func bitmapCoveredSize(named name: String) throws -> UInt64 { try liveBitmap(name).size }

    /// qcow2_co_can_store_new_dirty_bitmap with check_constraints_on_bitmap.
    public func checkNewPersistentBitmap(name: String, granularity: UInt32, nodeName: String) throws {
        if liveBitmaps.contains(where: { $0.name == name }) || addedBitmaps.contains(where: { $0.name == name }) {
            throw InstarError.invalid("Bitmap already exists: \(name)")
        }
        func fail(_ m: String) -> InstarError {
            InstarError.invalid("Can't make bitmap '\(name)' persistent in '\(nodeName)': \(m)")
        }
        if header.version < 3 { throw fail("Cannot store dirty bitmaps in qcow2 v2 files") }
        let bits = UInt64(granularity.trailingZeroBitCount)
        if bits > UInt64(Qcow2Bitmaps.maxGranularityBits) {
            throw fail("Granularity exceeds maximum (\(UInt64(1) << UInt64(Qcow2Bitmaps.maxGranularityBits)) bytes)")
        }
        if bits < UInt64(Qcow2Bitmaps.minGranularityBits) {
            throw fail("Granularity is under minimum (\(UInt64(1) << UInt64(Qcow2Bitmaps.minGranularityBits)) bytes)")
        }
        let bytesNeeded = virtualSize.divCeil(UInt64(granularity)).divCeil(8)
        let (tableLimit, over) = Qcow2BitmapData.maxTableEntries.multipliedReportingOverflow(by: header.clusterSize)
        if bytesNeeded > Qcow2BitmapData.maxPhysBytes || (!over && bytesNeeded > tableLimit) {
            throw fail("Too much space will be occupied by the bitmap. Use larger granularity")
        }
        if name.utf8.count > Qcow2Bitmaps.maxNameLength {
            throw fail("Name length exceeds maximum (\(Qcow2Bitmaps.maxNameLength) characters)")
        }
        let all = liveBitmaps.map(\.name) + addedBitmaps.map(\.name) + [name]
        if all.count > Int(Qcow2.maxBitmaps) {
            throw fail("Maximum number of persistent bitmaps is already reached")
        }
        let dirBytes = all.reduce(UInt64(0)) { $0 + UInt64((Qcow2Bitmaps.entryHeaderBytes + $1.utf8.count + 7) & ~7) }
        if dirBytes > Qcow2.maxBitmapDirectoryBytes { throw fail("Not enough space in the bitmap directory") }
    }

    public func createPersistentBitmap(name: String, granularity: UInt32, enabled: Bool) throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        // bdrv_create_dirty_bitmap: a bitmap node list holds the newest first.
        addedBitmaps.insert(Qcow2LiveBitmap(adding: name, granularityBits: UInt8(granularity.trailingZeroBitCount),
                                            enabled: enabled, bits: [], size: virtualSize,
                                            clusterSize: header.clusterSize, file: file), at: 0)
    }

    public func removePersistentBitmap(named name: String) throws {
        if let i = addedBitmaps.firstIndex(where: { $0.name == name }) {
            // Not on disk yet: qemu finds nothing to remove there and only releases it.
            addedBitmaps.remove(at: i)
            return
        }
        guard let i = liveBitmaps.firstIndex(where: { $0.name == name }) else {
            throw InstarError(.notFound, "Dirty bitmap '\(name)' not found", errno: ENOENT)
        }
        let bm = liveBitmaps[i]
        if extensions.bitmaps != nil {
            let w = try writeSide()
            try w.prepare()
            let rest = liveBitmaps.enumerated().filter { $0.offset != i }.map(\.element)
            try w.removeStoredBitmap(bm, keeping: rest)
        }
        liveBitmaps.remove(at: i)
    }

    public func clearPersistentBitmap(named name: String) throws { try liveBitmap(name).clearAll() }

    public func setPersistentBitmapEnabled(named name: String, _ enabled: Bool) throws {
        try liveBitmap(name).enabled = enabled
    }

    public func forEachDirtyRange(ofBitmap name: String, _ body: (UInt64, UInt64) throws -> Void) throws {
        try liveBitmap(name).forEachDirtyRange(body)
    }

    public func setBitmapDirty(named name: String, offset: UInt64, length: UInt64) throws {
        try liveBitmap(name).setDirty(offset: offset, length: length)
    }
}

extension Qcow2LiveBitmap {
    /// The runs of set bits, as guest byte ranges clipped to the image (one chunk held at a time).
    func forEachDirtyRange(_ body: (UInt64, UInt64) throws -> Void) throws {
        let g = UInt64(granularityBits)
        let bitsPerChunk = clusterSizeBytes * 8
        var runStart: UInt64? = nil
        func emit(_ endBit: UInt64) throws {
            guard let s = runStart else { return }
            runStart = nil
            let from = s << g
            let to = min(endBit << g, size)
            if to > from { try body(from, to - from) }
        }
        for k in 0..<chunkCount {
            let c = try chunk(k)
            let base = UInt64(k) * bitsPerChunk
            for (i, byte) in c.enumerated() {
                let bit0 = base + UInt64(i) * 8
                if bit0 >= bitCount { break }
                if byte == 0 {
                    try emit(bit0)
                    continue
                }
                if byte == 0xff {
                    if runStart == nil { runStart = bit0 }
                    continue
                }
                for b in 0..<8 {
                    let bit = bit0 + UInt64(b)
                    if byte & (UInt8(1) << UInt8(b)) != 0 {
                        if runStart == nil { runStart = bit }
                    } else {
                        try emit(bit)
                    }
                }
            }
        }
        try emit(bitCount)
    }
}

extension Qcow2Writer {
    /// qcow2_co_remove_persistent_dirty_bitmap: a new directory without the bitmap (or none at all), the caches
    /// flushed, the header rewritten and synced; then the old directory, and the bitmap's data clusters and
    /// table, are freed.
    func removeStoredBitmap(_ bm: Qcow2LiveBitmap, keeping rest: [Qcow2LiveBitmap]) throws {
        // The directory on disk: every loaded bitmap, marked in use by the writable open.
        let entries = rest.compactMap { b -> Qcow2BitmapEntry? in
            guard var e = b.stored else { return nil }
            e.flags |= Qcow2BitmapEntry.flagInUse
            return e
        }
        let old = bitmapsExtension
        if entries.isEmpty {
            header.autoclearFeatures &= ~Qcow2.autoclearBitmaps
            bitmapsExtension = nil
        } else {
            let dir = Qcow2Bitmaps.encodeDirectory(entries)
            let dirOffset = try allocateClusters(UInt64(dir.count).divCeil(clusterSize))
            try format.writeAligned(dir, at: dirOffset)
            try flushAll()
            try file.sync()
            header.autoclearFeatures |= Qcow2.autoclearBitmaps
            bitmapsExtension = Qcow2BitmapsExtension(count: UInt32(entries.count), directorySize: UInt64(dir.count),
                                                     directoryOffset: dirOffset)
        }
        try rewriteHeader()
        try file.sync()
        format.header.autoclearFeatures = header.autoclearFeatures
        format.extensions.bitmaps = bitmapsExtension
        if let old { try freeRange(old.directoryOffset, old.directorySize) }
        // free_bitmap_clusters: the table is read again; a table with a bad entry frees nothing.
        if let e = bm.stored {
            var table = bm.diskTable
            if bm.inconsistent {
                let bytes = try checkedInt(try UInt64(e.tableSize).multiplied(by: 8))
                var raw = [UInt8](repeating: 0, count: bytes)
                try raw.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: e.tableOffset) }
                table = Qcow2Mapper.decodeBE64(raw, count: Int(e.tableSize))
                if table.contains(where: { !Qcow2BitmapData.entryValid($0, clusterSize: clusterSize) }) { return }
            }
            for entry in table {
                let offset = entry & Qcow2BitmapData.entryOffsetMask
                if offset != 0 { try freeRange(offset, clusterSize, discard: true) }
            }
            try freeRange(e.tableOffset, UInt64(e.tableSize) * 8)
        }
        processDiscards()
    }
}
