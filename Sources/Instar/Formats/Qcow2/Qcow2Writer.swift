import Glibc

/// The write side of a qcow2 image opened read/write (qemu's qcow2.c / qcow2-cluster.c write paths): guest
/// writes with copy-on-write, zero writes, discards, compressed cluster writes, and the two write-back caches
/// with qemu's dependency rules between them (qcow2-cache.c).
final class Qcow2Writer {
    unowned let format: Qcow2Format
    let file: HostFile
    var header: Qcow2Header
    let mapper: Qcow2Mapper
    let clusterBits: UInt64
    let clusterSize: UInt64
    let l2Entries: UInt64
    let extended: Bool
    let subclusterSize: UInt64
    var refOrder: UInt64
    var refBlockBits: UInt64
    var refIndexMask: UInt64
    var refMax: UInt64
    let lazyRefcounts: Bool
    /// qcow2.txt "External data file": guest clusters live in the data file at their guest offset and have no
    /// refcounts.
    let hasDataFile: Bool
    var reftable: [UInt64]

    let l2Cache: Qcow2WriteCache<[UInt64]>
    let rbCache: Qcow2WriteCache<[UInt8]>
    /// qemu's cache dependencies: L2 tables may only be written once the refcount blocks are (new clusters),
    /// refcount blocks only once the L2 tables are (freed clusters), L2 tables only after a flush of the data
    /// they point at.
    var l2DependsOnRefcount = false
    var refcountDependsOnL2 = false
    var l2DependsOnFlush = false
    /// An update whose steps need no order among themselves (a snapshot update between the header write that
    /// makes it safe and the one that publishes it, see Qcow2SnapshotOps.swift): the caches are written back
    /// without syncs and without the dependencies above, and the caller ends the stretch with one flush.
    /// Only set while the caches held nothing dirty from before.
    var unordered = false
    /// Crash-test hook: the point hit between the two caches' write-backs of `flushAll` (see CrashPoint).
    var crashBetweenCaches: String?

    /// Where the next free-cluster search starts (qemu's free_cluster_index).
    var freeHint: UInt64 = 0
    /// One past the highest cluster this writer allocated.
    var highestAllocated: UInt64 = 0
    /// Clusters freed since the last L2 write-back: an L2 table on disk may still name them.
    var pendingFree: Set<UInt64> = []
    /// Host ranges freed by discard or unmapping zero requests, punched out of the file once the request is done
    /// (qemu's discard list with pass-discard-request on), kept merged.
    var pendingDiscards: [(offset: UInt64, length: UInt64)] = []
    /// Where the next compressed cluster may be packed (qemu's free_byte_offset), 0 for none.
    var freeByteOffset: UInt64 = 0
    /// Set once the header carries the dirty bit for lazy refcounts.
    var markedDirty = false
    /// The bitmaps extension the header carries (rewritten by `rewriteHeader`).
    var bitmapsExtension: Qcow2BitmapsExtension?
    private var prepared = false

    init(format: Qcow2Format) throws {
        self.format = format
        file = format.file
        header = format.header
        mapper = format.mapper
        clusterBits = UInt64(header.clusterBits)
        clusterSize = header.clusterSize
        l2Entries = 1 << header.l2Bits
        extended = header.extendedL2
        subclusterSize = header.subclusterSize
        refOrder = UInt64(header.refcountOrder)
        refBlockBits = clusterBits + 3 - refOrder
        refIndexMask = (1 << refBlockBits) - 1
        refMax = refOrder == 6 ? UInt64.max : (UInt64(1) << (UInt64(1) << refOrder)) - 1
        lazyRefcounts = header.compatibleFeatures & Qcow2.compatLazyRefcounts != 0
        hasDataFile = header.hasDataFile
        reftable = try format.refcounts.refcountTable()
        bitmapsExtension = format.extensions.bitmaps
        let tables = Int(max(16, Qcow2Mapper.cacheBytes / clusterSize))
        l2Cache = Qcow2WriteCache(capacity: tables, entryBytes: Int(clusterSize), what: "the L2 table cache")
        rbCache = Qcow2WriteCache(capacity: Int(max(16, (1 << 20) / clusterSize)), entryBytes: Int(clusterSize),
                                  what: "the refcount block cache")
        mapper.l2Provider = { [unowned self] offset in try self.l2Entry(at: offset).table }
    }

    // MARK: Caches and ordering

    func l2Entry(at offset: UInt64) throws -> Qcow2WriteCache<[UInt64]>.Entry {
        if offset & (clusterSize - 1) != 0 {
            throw InstarError(.corrupt, "L2 table offset \(hex(offset)) unaligned", errno: EIO)
        }
        return try l2Cache.entry(at: offset) {
            let bytes = try file.readBytes(at: offset, count: Int(clusterSize))
            return Qcow2Mapper.decodeBE64(bytes, count: Int(clusterSize / 8))
        }
    }

    func setL2DependsOnRefcount() throws {
        if lazyRefcounts || unordered { return }
        if refcountDependsOnL2 { try flushL2() }
        l2DependsOnRefcount = true
    }

    func setRefcountDependsOnL2() throws {
        if unordered { return }
        if l2DependsOnRefcount { try flushRefcounts() }
        refcountDependsOnL2 = true
    }

    /// Writes every dirty refcount block (after the L2 tables it waits for) and syncs (not while `unordered`).
    func flushRefcounts() throws {
        if refcountDependsOnL2 {
            refcountDependsOnL2 = false
            try flushL2()
        }
        let dirty = rbCache.dirtyEntries()
        for (off, e) in dirty {
            try file.write(e.table, at: off)
            e.dirty = false
        }
        if !dirty.isEmpty && !unordered { try file.sync() }
        l2DependsOnRefcount = false
    }

    /// Writes every dirty L2 table (after the refcounts and data it depends on) and syncs (not while
    /// `unordered`).
    func flushL2() throws {
        if l2DependsOnRefcount {
            l2DependsOnRefcount = false
            try flushRefcounts()
        } else if l2DependsOnFlush {
            try syncData()
        }
        l2DependsOnFlush = false
        let dirty = l2Cache.dirtyEntries()
        for (off, e) in dirty {
            try file.write(Qcow2Writer.encodeBE64(e.table), at: off)
            e.dirty = false
        }
        if !dirty.isEmpty && !unordered { try file.sync() }
        refcountDependsOnL2 = false
        pendingFree.removeAll()
    }

    /// Writes both caches back in an order that respects their dependencies.
    func flushAll() throws {
        if refcountDependsOnL2 {
            try flushRefcounts()
            try flushL2()
        } else {
            try flushL2()
            if let p = crashBetweenCaches { CrashPoint.hit(p) }
            try flushRefcounts()
        }
        // Freed clusters whose L2 tables are now on disk may be reused without another write-back.
        pendingFree.removeAll()
    }

    /// Keeps the caches bounded; runs between operations, when no entry is held.
    func trimCaches() throws {
        if l2Cache.overCapacity {
            if l2Cache.hasDirty { try flushL2() }
            l2Cache.trim()
        }
        if rbCache.overCapacity {
            if rbCache.hasDirty { try flushRefcounts() }
            rbCache.trim()
        }
    }

    static func encodeBE64(_ table: [UInt64]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: table.count * 8)
        out.withUnsafeMutableBytes { dst in
            for (i, v) in table.enumerated() { dst.storeBytes(of: v.bigEndian, toByteOffset: i * 8, as: UInt64.self) }
        }
        return out
    }

    // MARK: Header

    /// Checks made before the first change, and the header update qemu makes when it starts writing: with lazy
    /// refcounts, the dirty bit is set. (Unknown autoclear bits were cleared by the writable open.)
    func prepare() throws {
        try trimCaches()
        if prepared { return }
        if header.incompatibleFeatures & Qcow2.incompatCorrupt != 0 {
            throw InstarError(.permission, "qcow2: Image is corrupt; cannot be opened read/write", errno: EACCES)
        }
        if format.encrypted && format.crypt == nil {
            throw InstarError(.unsupported, "Writing encrypted qcow2 images is not supported", errno: ENOTSUP)
        }
        if lazyRefcounts && header.version >= 3 {
            header.incompatibleFeatures |= Qcow2.incompatDirty
            try writeHeaderU64(header.incompatibleFeatures, at: 72)   // qcow2.txt: bytes 72-79
            markedDirty = true
        }
        prepared = true
    }

    /// qcow2_mark_dirty around an update whose steps each leave the refcounts and the copied flags disagreeing
    /// (a snapshot's refcounts raised before the tables' copied flags are cleared): with the dirty bit on disk
    /// first, an update cut short by an I/O error or a crash leaves an image the next read/write open repairs
    /// (version 3 only; version 2 has no dirty bit). Close clears the bit once everything is written.
    /// Returns whether this call set the bit (false when it was set already, as with lazy refcounts, or v2).
    @discardableResult
    func markDirtyForUpdate() throws -> Bool {
        guard header.version >= 3, header.incompatibleFeatures & Qcow2.incompatDirty == 0 else { return false }
        header.incompatibleFeatures |= Qcow2.incompatDirty
        try writeHeaderU64(header.incompatibleFeatures, at: 72)   // qcow2.txt: bytes 72-79
        format.header.incompatibleFeatures = header.incompatibleFeatures
        markedDirty = true
        return true
    }

    func writeHeaderU64(_ v: UInt64, at offset: UInt64) throws {
        var be = v.bigEndian
        try withUnsafeBytes(of: &be) { try file.write($0, at: offset) }
        try file.sync()
    }

    /// Makes guest data stable: the data file when there is one, else the image file.
    func syncData() throws {
        try format.dataFile.sync()
    }

    /// Writes both caches back and syncs (a sync with nothing written since the last one costs nothing, see
    /// HostFile.sync).
    func flush() throws {
        try flushAll()
        if format.externalDataFile != nil { try syncData() }
        try file.sync()
        format.refcounts.invalidate()
    }

    func close() throws {
        try flush()
        if markedDirty && !format.keepDirtyAfterFailure {
            header.incompatibleFeatures &= ~Qcow2.incompatDirty
            try writeHeaderU64(header.incompatibleFeatures, at: 72)
            markedDirty = false
        }
        format.header = header
        mapper.l2Provider = nil
        mapper.cache.removeAll()
    }

    // MARK: L1 / L2

    /// The L2 table for L1 index `i`, allocated (or copied when shared) so that it may be changed in place.
    func writableL2(l1Index i: UInt64) throws -> (UInt64, Qcow2WriteCache<[UInt64]>.Entry) {
        if i >= UInt64(mapper.l1.count) { try growL1(minEntries: i + 1) }
        let e = mapper.l1[Int(i)]
        let old = e & Qcow2.l1OffsetMask
        if old != 0 && e & Qcow2.l2Copied != 0 { return (old, try l2Entry(at: old)) }
        let table: [UInt64] = old != 0 ? try l2Entry(at: old).table
                                       : [UInt64](repeating: 0, count: Int(clusterSize / 8))
        let newOffset = try allocateClusters(1)
        // The new table's refcount, then the table, then the L1 entry pointing at it.
        if !lazyRefcounts { try flushRefcounts() }
        try file.write(Qcow2Writer.encodeBE64(table), at: newOffset)
        try file.sync()
        try writeL1Entry(Int(i), value: newOffset | Qcow2.l2Copied)
        let entry = l2Cache.insert(table, at: newOffset)
        if old != 0 { try freeRange(old, clusterSize) }
        return (newOffset, entry)
    }

    func writeL1Entry(_ i: Int, value: UInt64) throws {
        mapper.l1[i] = value
        var be = value.bigEndian
        try withUnsafeBytes(of: &be) { try file.write($0, at: header.l1TableOffset + UInt64(i) * 8) }
        try file.sync()
    }

    /// Moves the L1 table to a larger one at the end of the image (qemu's qcow2_grow_l1_table): the new table is
    /// written and synced, then the header switches to it, then the old table is freed.
    func growL1(minEntries: UInt64) throws {
        var newSize = UInt64(mapper.l1.count)
        if newSize == 0 { newSize = 1 }
        while newSize < minEntries { newSize += newSize.divCeil(2) }
        guard newSize * 8 <= Qcow2.maxL1Bytes else { throw InstarError(.unsupported, "L1 table too large", errno: EFBIG) }
        let bytes = newSize * 8
        let clusters = bytes.divCeil(clusterSize)
        var table = mapper.l1
        table.append(contentsOf: [UInt64](repeating: 0, count: Int(newSize) - table.count))
        let newOffset = try allocateClusters(clusters)
        if !lazyRefcounts { try flushRefcounts() }
        var raw = Qcow2Writer.encodeBE64(table)
        raw.append(contentsOf: [UInt8](repeating: 0, count: Int(clusters * clusterSize) - raw.count))
        try file.write(raw, at: newOffset)
        try file.sync()
        // qcow2.txt: header bytes 36-39 l1_size, 40-47 l1_table_offset, written at once.
        var h = [UInt8](repeating: 0, count: 12)
        for k in 0..<4 { h[k] = UInt8(truncatingIfNeeded: newSize >> UInt64(24 - 8 * k)) }
        for k in 0..<8 { h[4 + k] = UInt8(truncatingIfNeeded: newOffset >> UInt64(56 - 8 * k)) }
        try file.write(h, at: 36)
        try file.sync()
        let oldOffset = header.l1TableOffset
        let oldBytes = UInt64(header.l1Size) * 8
        header.l1TableOffset = newOffset
        header.l1Size = UInt32(newSize)
        mapper.l1 = table
        if oldBytes > 0 { try freeRange(oldOffset, oldBytes) }
    }
}
