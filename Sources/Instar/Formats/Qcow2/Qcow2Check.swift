import Glibc

/// `qemu-img check` for qcow2 (block/qcow2-refcount.c qcow2_check_refcounts and its helpers): every cluster the
/// metadata references is counted in memory and compared with the on-disk reference counts; OFLAG_COPIED is
/// checked against them; with repair, refcounts, copied flags and (when needed) the whole refcount structure are
/// rewritten. The messages are qemu's, word for word, and go to `report` in qemu's order.
///
/// The checker reads the header, L1 table and refcount table afresh from the file, so a second pass after a
/// repair sees what the first one wrote.
extension Qcow2Format: ImageCheckable {
    public func check(repair: CheckRepair, report: (CheckMessage) -> Void) throws -> CheckResult {
        // A repair rewrites metadata behind this image's back (the header bits, perhaps a whole new refcount
        // structure): what it read at open is read again, so that close (which stores the bitmaps) and later
        // writes start from the file. After a corruption nothing more is written, so nothing is read again.
        let result: CheckResult
        do {
            result = try withoutActuallyEscaping(report) { report in
                let checker = try Qcow2Checker(format: self, repair: repair, report: report)
                return try checker.run()
            }
        } catch {
            if !repair.isEmpty && writable && !corruptionSignalled { try? reloadAfterRepair() }
            throw error
        }
        if !repair.isEmpty && writable && !corruptionSignalled { try reloadAfterRepair() }
        return result
    }
}

/// One snapshot table entry as far as the check needs it.
struct Qcow2CheckSnapshot {
    var id: String
    var name: String
    var l1Offset: UInt64
    var l1Size: UInt32
}

final class Qcow2Checker {
    // qcow2.txt / block/qcow2.h masks.
    static let l1ReservedMask: UInt64 = 0x7f00_0000_0000_01ff
    static let l2StdReservedMask: UInt64 = 0x3f00_0000_0000_01fe
    static let reftableReservedMask: UInt64 = 0x1ff
    static let l2BitmapAllAlloc: UInt64 = 0xffff_ffff
    static let l2BitmapAllZeroes: UInt64 = 0xffff_ffff_0000_0000
    // qcow2-bitmap.c: bitmap table entries.
    /// QCOW_MAX_L1_SIZE / 8.
    static let maxL1Entries: UInt32 = UInt32(Qcow2.maxL1Bytes / 8)
    /// CHECK_FRAG_INFO: count allocation statistics (active L1 only).
    static let fragInfo = 2

    let format: Qcow2Format
    let file: HostFile
    /// The image file's length as last read by `incRefcounts` (0 until then).
    private var knownFileLength: Int64 = 0
    /// The repair mode asked for.
    let repairMode: CheckRepair
    /// The mode in force (qemu recounts with no repair after a rebuild).
    var fix: CheckRepair { fixOverride ?? repairMode }
    let report: (CheckMessage) -> Void
    var header: Qcow2Header
    let clusterBits: Int64
    let clusterSize: Int64
    let l2Entries: Int
    let l2EntryBytes: Int
    let extendedL2: Bool
    let hasDataFile: Bool
    var l1: [UInt64]
    var reftable: [UInt64]
    var snapshots: [Qcow2CheckSnapshot] = []
    var snapshotsSize: Int64 = 0
    /// log2 of refcount entries per refblock.
    let refblockBits: Int64
    var res = CheckResult()
    /// Refcount blocks read from disk, by offset (dropped when the structure is rebuilt).
    private var refblockCache: [UInt64: [UInt8]] = [:]
    /// Blocks of `refblockCache` changed by a repair and not yet written.
    private var dirtyRefblocks: Set<UInt64> = []
    /// qcow2_signal_corruption reports only the first corruption event.
    private var signalledCorruption = false

    init(format: Qcow2Format, repair: CheckRepair, report: @escaping (CheckMessage) -> Void) throws {
        self.format = format
        file = format.file
        repairMode = repair
        self.report = report
        header = try Qcow2Header(bytes: try file.readBytes(at: 0, count: Qcow2.decodedHeaderBytes))
        clusterBits = Int64(header.clusterBits)
        clusterSize = Int64(header.clusterSize)
        extendedL2 = header.extendedL2
        l2EntryBytes = Int(header.l2EntryBytes)
        l2Entries = Int(header.clusterSize) / l2EntryBytes
        hasDataFile = header.hasDataFile
        refblockBits = clusterBits + 3 - Int64(header.refcountOrder)
        l1 = try Qcow2Mapper.readL1(header: header, file: file)
        let reftableEntries = Int(header.refcountTableClusters) * Int(header.clusterSize / 8)
        reftable = Qcow2Mapper.decodeBE64(try file.readMetadata(at: header.refcountTableOffset,
                                                                count: reftableEntries * 8, what: "the refcount table"),
                                          count: reftableEntries)
    }

    func say(_ line: String) { report(CheckMessage(line)) }
    /// error_report / error_report_err: the line goes out after the program name.
    func errorReport(_ line: String) { report(CheckMessage(line, errorReport: true)) }

    /// "%" PRIx64.
    static func x(_ v: UInt64) -> String { String(v, radix: 16) }
    static func x(_ v: Int64) -> String { String(UInt64(bitPattern: v), radix: 16) }

    // MARK: - On-disk refcounts

    /// qcow2_get_refcount: the refcount the image records for a cluster.
    func diskRefcount(_ cluster: Int64) throws -> UInt64 {
        let index = UInt64(bitPattern: cluster) >> UInt64(refblockBits)
        guard index < UInt64(reftable.count) else { return 0 }
        let blockOffset = reftable[Int(index)] & Qcow2.reftableOffsetMask
        if blockOffset == 0 { return 0 }
        if Int64(bitPattern: blockOffset) & (clusterSize - 1) != 0 {
            signalCorruption("Refblock offset \(hex(blockOffset)) unaligned (reftable index: \(hex(index)))")
            throw Qcow2CheckAbort(errno: EIO)
        }
        let block = try refblock(at: blockOffset)
        let inBlock = Int(UInt64(bitPattern: cluster) & ((1 << UInt64(refblockBits)) - 1))
        return Qcow2RefcountArray.entry(block, index: inBlock, order: UInt64(header.refcountOrder))
    }

    private func refblock(at offset: UInt64) throws -> [UInt8] {
        if let b = refblockCache[offset] { return b }
        let b: [UInt8]
        do {
            b = try file.readBytes(at: offset, count: Int(clusterSize))
        } catch {
            throw Qcow2CheckAbort(errno: EIO)
        }
        if refblockCache.count >= 64 {
            try flushRefblocks()
            refblockCache.removeAll(keepingCapacity: true)
        }
        refblockCache[offset] = b
        return b
    }

    /// qcow2_signal_corruption for an event qemu calls fatal: one message, then silence. It is fatal only when
    /// the image is writable (a repair), and then the image is marked corrupt on disk.
    private func signalCorruption(_ message: String) {
        if signalledCorruption { return }
        signalledCorruption = true
        if repairMode.isEmpty {
            say("qcow2: Image is corrupt: \(message); further non-fatal corruption events will be suppressed")
            return
        }
        say("qcow2: Marking image as corrupt: \(message); further corruption events will be suppressed")
        format.corruptionSignalled = true
        var field = [UInt8](repeating: 0, count: 8)
        header.incompatibleFeatures |= Qcow2.incompatCorrupt
        field.putU64be(header.incompatibleFeatures, at: 0)
        if header.version >= 3 { try? file.write(field, at: 72) }
    }

    /// update_refcount for one cluster whose refblock exists: adds or subtracts `diff`.
    private func updateDiskRefcount(_ cluster: Int64, diff: UInt64, decrease: Bool) throws {
        let index = UInt64(bitPattern: cluster) >> UInt64(refblockBits)
        guard index < UInt64(reftable.count) else { throw Qcow2CheckAbort(errno: EINVAL) }
        let blockOffset = reftable[Int(index)] & Qcow2.reftableOffsetMask
        guard blockOffset != 0, Int64(bitPattern: blockOffset) & (clusterSize - 1) == 0 else {
            throw Qcow2CheckAbort(errno: EIO)
        }
        var block = try refblock(at: blockOffset)
        let order = UInt64(header.refcountOrder)
        let inBlock = Int(UInt64(bitPattern: cluster) & ((1 << UInt64(refblockBits)) - 1))
        let old = Qcow2RefcountArray.entry(block, index: inBlock, order: order)
        let maxValue = Qcow2RefcountArray(order: order, clusterSize: 1).maxValue
        let new: UInt64
        if decrease {
            guard diff <= old else { throw Qcow2CheckAbort(errno: EINVAL) }
            new = old - diff
        } else {
            guard diff <= maxValue - old else { throw Qcow2CheckAbort(errno: EINVAL) }
            new = old + diff
        }
        Qcow2RefcountArray.setEntry(&block, index: inBlock, order: order, value: new)
        // qemu changes refcounts in its block cache, written back (with the overlap check) when the cache is
        // flushed or emptied: `flushRefblocks`.
        refblockCache[blockOffset] = block
        dirtyRefblocks.insert(blockOffset)
        // update_refcount passes the freeing of a cluster down to the file (QCOW2_DISCARD_ALWAYS).
        if decrease && new == 0 {
            try? file.punchHole(at: UInt64(bitPattern: cluster) << UInt64(clusterBits), length: UInt64(clusterSize))
        }
    }

    /// qcow2_cache_flush for the refcount block cache: the changed blocks reach the file, each after the overlap
    /// check. Once a corruption was signalled the driver is detached and the cache never reaches the disk.
    func flushRefblocks() throws {
        defer { dirtyRefblocks.removeAll() }
        if format.corruptionSignalled { return }
        for offset in dirtyRefblocks.sorted() {
            guard let block = refblockCache[offset] else { continue }
            guard writeAllowed(ignore: Self.olRefcountBlock, offset: Int64(bitPattern: offset), size: clusterSize) else {
                throw Qcow2CheckAbort(errno: EIO)
            }
            do {
                try file.write(block, at: offset)
            } catch {
                throw Qcow2CheckAbort(errno: EIO)
            }
        }
    }

    // MARK: - Metadata overlap

    // block/qcow2.h QCow2MetadataOverlap bits; qemu's default template ("cached") checks all but inactive L2.
    static let olMainHeader = 1 << 0, olActiveL1 = 1 << 1, olActiveL2 = 1 << 2, olRefcountTable = 1 << 3
    static let olRefcountBlock = 1 << 4, olSnapshotTable = 1 << 5, olInactiveL1 = 1 << 6, olInactiveL2 = 1 << 7
    static let olBitmapDirectory = 1 << 8

    /// qcow2_check_metadata_overlap: the first metadata structure [offset, offset + size) would overwrite.
    private func metadataOverlap(ignore: Int, offset: Int64, size: Int64) -> String? {
        if size == 0 { return nil }
        let chk = ~ignore & ~Self.olInactiveL2
        if chk & Self.olMainHeader != 0 && offset < clusterSize { return "qcow2_header" }
        let start = offset & ~(clusterSize - 1)
        let length = ((offset & (clusterSize - 1)) &+ size &+ clusterSize &- 1) & ~(clusterSize - 1)
        func hits(_ o: UInt64, _ n: Int64) -> Bool {
            let o = Int64(bitPattern: o)
            return start < o &+ n && o < start &+ length
        }
        if chk & Self.olActiveL1 != 0 && header.l1Size != 0 && hits(header.l1TableOffset, Int64(header.l1Size) * 8) {
            return "active L1 table"
        }
        if chk & Self.olRefcountTable != 0 && !reftable.isEmpty
            && hits(header.refcountTableOffset, Int64(reftable.count) * 8) {
            return "refcount table"
        }
        if chk & Self.olSnapshotTable != 0 && snapshotsSize != 0 && hits(header.snapshotsOffset, snapshotsSize) {
            return "snapshot table"
        }
        if chk & Self.olInactiveL1 != 0 {
            for sn in snapshots where sn.l1Size != 0 && hits(sn.l1Offset, Int64(sn.l1Size) * 8) {
                return "inactive L1 table"
            }
        }
        if chk & Self.olActiveL2 != 0 {
            for e in l1 where e & Qcow2.l1OffsetMask != 0 && hits(e & Qcow2.l1OffsetMask, clusterSize) {
                return "active L2 table"
            }
        }
        if chk & Self.olRefcountBlock != 0 {
            for e in reftable where e & Qcow2.reftableOffsetMask != 0 && hits(e & Qcow2.reftableOffsetMask, clusterSize) {
                return "refcount block"
            }
        }
        if chk & Self.olBitmapDirectory != 0 && header.autoclearFeatures & Qcow2.autoclearBitmaps != 0,
           let b = format.extensions.bitmaps, hits(b.directoryOffset, Int64(bitPattern: b.directorySize)) {
            return "bitmap directory"
        }
        return nil
    }

    /// qcow2_pre_write_overlap_check: false (after signalling the corruption) when the write would hit metadata.
    func writeAllowed(ignore: Int, offset: Int64, size: Int64) -> Bool {
        guard let what = metadataOverlap(ignore: ignore, offset: offset, size: size) else { return true }
        signalCorruption("Preventing invalid write on metadata (overlaps with \(what))")
        return false
    }

    // MARK: - Counting references

    /// qcow2_inc_refcounts_imrt: one more reference to every cluster of [offset, offset + size).
    func incRefcounts(_ imrt: inout Qcow2RefcountArray, offset: Int64, size: Int64) throws {
        if size <= 0 { return }
        // The file only grows while a check runs (repairs append), so a region inside the length seen last
        // needs no new fstat: this runs once per L2 entry. A file opened read-only does not change under the
        // check (the image lock keeps writers out), so one fstat serves every region past its end too (a hostile
        // table can name hundreds of thousands of them).
        var fileLength = knownFileLength
        if offset &+ size > fileLength && (file.writable || fileLength == 0) {
            do {
                fileLength = Int64(try file.size())
            } catch {
                throw Qcow2CheckAbort(errno: EIO)
            }
            knownFileLength = fileLength
        }
        // The last cluster may be partly allocated; anything a whole cluster past the end is corrupt.
        if offset &+ size &- fileLength >= clusterSize {
            say("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                + "offset 0x\(Self.x(offset)) size 0x\(Self.x(size))")
            res.corruptions += 1
            return
        }
        let start = offset & ~(clusterSize - 1)
        let last = (offset &+ size &- 1) & ~(clusterSize - 1)
        var clusterOffset = start
        while clusterOffset <= last {
            let k = clusterOffset >> clusterBits
            guard k >= 0, k < Int64(Int32.max) * 2 else {
                res.checkErrors += 1
                throw Qcow2CheckAbort(errno: ENOMEM)
            }
            if k >= Int64(imrt.count) {
                do {
                    try imrt.resize(to: Int(k) + 1)
                } catch let e as Qcow2CheckAbort {
                    res.checkErrors += 1
                    throw e
                }
            }
            let refcount = imrt.get(Int(k))
            if refcount == imrt.maxValue {
                say("ERROR: overflow cluster offset=0x\(Self.x(clusterOffset))")
                say("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean "
                    + "copy if the image cannot be opened for writing")
                res.corruptions += 1
            } else {
                imrt.set(Int(k), refcount + 1)
            }
            let (next, overflow) = clusterOffset.addingReportingOverflow(clusterSize)
            if overflow { break }
            clusterOffset = next
        }
    }

    /// qemu's qcow2_get_cluster_type.
    enum ClusterType { case compressed, zeroPlain, zeroAlloc, normal, unallocated }

    func clusterType(_ entry: UInt64) -> ClusterType {
        if entry & Qcow2.l2Compressed != 0 { return .compressed }
        if entry & Qcow2.l2Zero != 0 && !extendedL2 {
            return entry & Qcow2.l2OffsetMask != 0 ? .zeroAlloc : .zeroPlain
        }
        if entry & Qcow2.l2OffsetMask == 0 {
            return hasDataFile && entry & Qcow2.l2Copied != 0 ? .normal : .unallocated
        }
        return .normal
    }

    /// A raw L2 table's 64-bit words in host order: entry `i` is word `i * l2Stride`, its subcluster bitmap
    /// (extended L2) the next one.
    private func l2Words(_ table: [UInt8]) -> [UInt64] {
        Qcow2Mapper.decodeBE64(table, count: l2Entries * l2Stride)
    }

    /// The L2 table at `offset` as `l2Words` gives it, read straight into the array and swapped in place (a
    /// hostile L1 can make check visit millions of tables). Entries past the end of the file read as zeroes, and
    /// a zero entry is one check passes over without a word, so only the entries the file holds are returned (the
    /// last one zero-padded): a table wholly past the end is empty.
    private func readL2Words(at offset: UInt64) throws -> [UInt64] {
        let capacity = l2Entries * l2Stride
        let entryBytes = l2EntryBytes
        return try [UInt64](unsafeUninitializedCapacity: capacity) { words, count in
            let raw = UnsafeMutableRawBufferPointer(words)
            let got = try file.read(into: raw, at: offset)
            let used = (got + entryBytes - 1) / entryBytes * (entryBytes / 8)
            if got < used * 8, let base = raw.baseAddress { memset(base + got, 0, used * 8 - got) }
            for k in 0..<used { words[k] = UInt64(bigEndian: words[k]) }
            count = used
        }
    }

    /// 64-bit words per L2 entry: 2 with extended L2 (entry, subcluster bitmap), else 1.
    private var l2Stride: Int { l2EntryBytes / 8 }

    /// check_refcounts_l2.
    private func checkL2(_ imrt: inout Qcow2RefcountArray, l2Offset: UInt64, flags: Int, active: Bool) throws {
        let words: [UInt64]
        do {
            words = try readL2Words(at: l2Offset)
        } catch {
            say("ERROR: I/O error in check_refcounts_l2")
            res.checkErrors += 1
            throw Qcow2CheckAbort(errno: EIO)
        }
        var nextContiguous: Int64 = 0
        let stride = l2Stride
        for i in 0..<(words.count / stride) {
            var entry = words[i * stride]
            let bitmap = stride == 2 ? words[i * stride + 1] : 0
            let type = clusterType(entry)
            if type != .compressed && entry & Self.l2StdReservedMask != 0 {
                say("ERROR found l2 entry with reserved bits set: \(Self.x(entry))")
                res.corruptions += 1
            }
            switch type {
            case .compressed:
                let d = Qcow2CompressedDescriptor(entry: entry, clusterBits: header.clusterBits)
                if entry & Qcow2.l2Copied != 0 {
                    say("ERROR: coffset=0x\(Self.x(d.hostOffset)): copied flag must never be set for compressed clusters")
                    entry &= ~Qcow2.l2Copied
                    res.corruptions += 1
                }
                if hasDataFile {
                    say("ERROR compressed cluster \(i) with data file, entry=0x\(Self.x(entry))")
                    res.corruptions += 1
                    break
                }
                if bitmap != 0 {
                    say("ERROR compressed cluster \(i) with non-zero subcluster allocation bitmap, entry=0x\(Self.x(entry))")
                    res.corruptions += 1
                    break
                }
                try incRefcounts(&imrt, offset: Int64(d.hostOffset), size: Int64(d.length))
                if flags & Self.fragInfo != 0 {
                    res.allocatedClusters += 1
                    res.compressedClusters += 1
                    // Compressed clusters share sectors with their neighbours: qemu counts them all as fragmented.
                    res.fragmentedClusters += 1
                }
            case .zeroAlloc, .normal:
                let offset = Int64(entry & Qcow2.l2OffsetMask)
                if (bitmap >> 32) & bitmap != 0 {
                    res.corruptions += 1
                    say("ERROR offset=\(Self.x(offset)): Allocated cluster has corrupted subcluster allocation bitmap")
                }
                if offset & (clusterSize - 1) != 0 {
                    res.corruptions += 1
                    let containsData = extendedL2 ? bitmap & Self.l2BitmapAllAlloc != 0 : entry & Qcow2.l2Zero == 0
                    if !containsData {
                        say("\(fix.contains(.errors) ? "Repairing" : "ERROR") offset=\(Self.x(offset)): Preallocated "
                            + "cluster is not properly aligned; L2 entry corrupted.")
                        if fix.contains(.errors) {
                            if try fixL2EntryByZero(l2Offset: l2Offset, index: i, bitmap: bitmap, active: active) {
                                continue
                            }
                        }
                    } else {
                        say("ERROR offset=\(Self.x(offset)): Data cluster is not properly aligned; L2 entry corrupted.")
                    }
                }
                if flags & Self.fragInfo != 0 {
                    res.allocatedClusters += 1
                    if nextContiguous != 0 && offset != nextContiguous { res.fragmentedClusters += 1 }
                    nextContiguous = offset &+ clusterSize
                }
                if !hasDataFile {
                    try incRefcounts(&imrt, offset: offset, size: clusterSize)
                }
            case .zeroPlain:
                break
            case .unallocated:
                if bitmap & Self.l2BitmapAllAlloc != 0 {
                    res.corruptions += 1
                    say("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                }
            }
        }
    }

    /// fix_l2_entry_by_zero: turns an entry into a plain zero cluster on disk. True when fixed.
    private func fixL2EntryByZero(l2Offset: UInt64, index: Int, bitmap: UInt64, active: Bool) throws -> Bool {
        let base = index * l2EntryBytes
        var fixed = [UInt8](repeating: 0, count: l2EntryBytes)
        if extendedL2 {
            var b = bitmap | (bitmap << 32)
            b &= Self.l2BitmapAllZeroes
            fixed.putU64be(b, at: 8)
        } else {
            fixed.putU64be(Qcow2.l2Zero, at: 0)
        }
        let entryOffset = l2Offset &+ UInt64(base)
        guard writeAllowed(ignore: active ? Self.olActiveL2 : Self.olInactiveL2, offset: Int64(bitPattern: entryOffset),
                           size: Int64(l2EntryBytes)) else {
            say("ERROR: Overlap check failed")
            res.checkErrors += 1
            throw Qcow2CheckAbort(errno: EIO)
        }
        do {
            try file.write(fixed, at: entryOffset)
        } catch {
            say("ERROR: Failed to overwrite L2 table entry: \(strerrorString(EIO))")
            res.checkErrors += 1
            return false
        }
        res.corruptions -= 1
        res.corruptionsFixed += 1
        return true
    }

    /// check_refcounts_l1.
    private func checkL1(_ imrt: inout Qcow2RefcountArray, l1Offset: UInt64, l1Size: UInt32, flags: Int,
                         active: Bool) throws {
        if l1Size == 0 { return }
        let bytes = Int64(l1Size) * 8
        try incRefcounts(&imrt, offset: Int64(bitPattern: l1Offset), size: bytes)
        let table: [UInt64]
        try CallBudget.reserve(Int(bytes), what: "an L1 table")
        defer { CallBudget.release(Int(bytes)) }
        do {
            table = Qcow2Mapper.decodeBE64(try file.readBytes(at: l1Offset, count: Int(bytes)), count: Int(l1Size))
        } catch {
            say("ERROR: I/O error in check_refcounts_l1")
            res.checkErrors += 1
            throw Qcow2CheckAbort(errno: EIO)
        }
        for entry in table where entry != 0 {
            if entry & Self.l1ReservedMask != 0 {
                say("ERROR found L1 entry with reserved bits set: \(Self.x(entry))")
                res.corruptions += 1
            }
            let l2Offset = entry & Qcow2.l1OffsetMask
            try incRefcounts(&imrt, offset: Int64(l2Offset), size: clusterSize)
            if Int64(l2Offset) & (clusterSize - 1) != 0 {
                say("ERROR l2_offset=\(Self.x(l2Offset)): Table is not cluster aligned; L1 entry corrupted")
                res.corruptions += 1
            }
            try checkL2(&imrt, l2Offset: l2Offset, flags: flags, active: active)
        }
    }

    /// qcow2_check_bitmaps_refcounts: the bitmap directory, each bitmap table and the clusters they name.
    private func checkBitmaps(_ imrt: inout Qcow2RefcountArray) throws {
        guard let ext = format.extensions.bitmaps, ext.count != 0 else { return }
        try incRefcounts(&imrt, offset: Int64(bitPattern: ext.directoryOffset), size: Int64(bitPattern: ext.directorySize))
        for bm in format.bitmaps {
            try incRefcounts(&imrt, offset: Int64(bitPattern: bm.tableOffset), size: Int64(bm.tableSize) * 8)
            if bm.tableSize == 0 { continue }
            guard UInt64(bm.tableSize) <= Qcow2BitmapData.maxTableEntries else {
                res.corruptions += 1
                throw Qcow2CheckAbort(errno: EINVAL)
            }
            let table: [UInt64]
            do {
                table = Qcow2Mapper.decodeBE64(try file.readBytes(at: bm.tableOffset, count: Int(bm.tableSize) * 8),
                                               count: Int(bm.tableSize))
            } catch {
                res.corruptions += 1
                throw Qcow2CheckAbort(errno: EIO)
            }
            // bitmap_table_load refuses the whole table when one entry is bad.
            if table.contains(where: { !Qcow2BitmapData.entryValid($0, clusterSize: UInt64(clusterSize)) }) {
                res.corruptions += 1
                throw Qcow2CheckAbort(errno: EINVAL)
            }
            for entry in table {
                let offset = entry & Qcow2BitmapData.entryOffsetMask
                if offset == 0 { continue }
                try incRefcounts(&imrt, offset: Int64(offset), size: clusterSize)
            }
        }
    }

    /// check_refblocks: each refcount block must lie inside the image and be referenced exactly once.
    private func checkRefblocks(_ imrt: inout Qcow2RefcountArray, nbClusters: inout Int, rebuild: inout Bool) throws {
        for i in 0..<reftable.count {
            // qemu's nb_clusters is the size of the in-memory array: a reference past the end grew both.
            nbClusters = max(nbClusters, imrt.count)
            let raw = reftable[i]
            let offset = raw & Qcow2.reftableOffsetMask
            let cluster = offset >> UInt64(clusterBits)
            if raw & Self.reftableReservedMask != 0 {
                say("ERROR refcount table entry \(i) has reserved bits set")
                res.corruptions += 1
                rebuild = true
                continue
            }
            if offset & UInt64(clusterSize - 1) != 0 {
                say("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                rebuild = true
                continue
            }
            if cluster >= UInt64(nbClusters) {
                res.corruptions += 1
                say("\(fix.contains(.errors) ? "Repairing" : "ERROR") refcount block \(i) is outside image")
                if fix.contains(.errors) {
                    var failure: Int32 = 0
                    if offset > UInt64(Int64.max) - UInt64(clusterSize) {
                        failure = EINVAL
                    } else {
                        do {
                            try file.truncate(to: offset + UInt64(clusterSize))
                            let size = Int64(try file.size())
                            let newClusters = Int((size + clusterSize - 1) / clusterSize)
                            do {
                                try imrt.resize(to: newClusters)
                            } catch let e as Qcow2CheckAbort {
                                res.checkErrors += 1
                                throw e
                            }
                            nbClusters = newClusters
                            if cluster >= UInt64(nbClusters) { failure = EINVAL }
                        } catch let e as InstarError where e.code != .limit {
                            // error_report_err of the failed truncate comes first.
                            errorReport(e.message)
                            failure = e.errnoValue != 0 ? e.errnoValue : EIO
                        }
                    }
                    if failure == 0 {
                        res.corruptions -= 1
                        res.corruptionsFixed += 1
                        try incRefcounts(&imrt, offset: Int64(offset), size: clusterSize)
                        continue
                    }
                    rebuild = true
                    say("ERROR could not resize image: \(strerrorString(failure))")
                }
                continue
            }
            if offset != 0 {
                try incRefcounts(&imrt, offset: Int64(offset), size: clusterSize)
                let count = imrt.get(Int(cluster))
                if count != 1 {
                    say("ERROR refcount block \(i) refcount=\(count)")
                    res.corruptions += 1
                    rebuild = true
                }
            }
        }
    }

    /// calculate_refcounts: builds the in-memory refcounts from all metadata.
    private func calculateRefcounts(_ imrt: inout Qcow2RefcountArray, nbClusters: inout Int,
                                    rebuild: inout Bool) throws {
        if imrt.count == 0 && nbClusters > 0 {
            do {
                try imrt.resize(to: nbClusters)
            } catch let e as Qcow2CheckAbort {
                res.checkErrors += 1
                throw e
            }
        }
        // The header cluster.
        try incRefcounts(&imrt, offset: 0, size: clusterSize)
        try checkL1(&imrt, l1Offset: header.l1TableOffset, l1Size: header.l1Size, flags: Self.fragInfo, active: true)

        if hasDataFile && !snapshots.isEmpty {
            say("ERROR \(snapshots.count) snapshots in image with data file")
            res.corruptions += 1
        }
        for sn in snapshots {
            if Int64(bitPattern: sn.l1Offset) & (clusterSize - 1) != 0 {
                say("ERROR snapshot \(sn.id) (\(sn.name)) l1_offset=\(hex(sn.l1Offset)): L1 table is not cluster "
                    + "aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            }
            if sn.l1Size > Self.maxL1Entries {
                say("ERROR snapshot \(sn.id) (\(sn.name)) l1_size=\(hex(UInt64(sn.l1Size))): L1 table is too large; "
                    + "snapshot table entry corrupted")
                res.corruptions += 1
                continue
            }
            try checkL1(&imrt, l1Offset: sn.l1Offset, l1Size: sn.l1Size, flags: 0, active: false)
        }
        try incRefcounts(&imrt, offset: Int64(bitPattern: header.snapshotsOffset), size: snapshotsSize)
        try incRefcounts(&imrt, offset: Int64(bitPattern: header.refcountTableOffset), size: Int64(reftable.count) * 8)
        if let c = format.extensions.crypto, c.length != 0 {
            try incRefcounts(&imrt, offset: Int64(bitPattern: c.offset), size: Int64(bitPattern: c.length))
        }
        try checkBitmaps(&imrt)
        try checkRefblocks(&imrt, nbClusters: &nbClusters, rebuild: &rebuild)
        nbClusters = max(nbClusters, imrt.count)
    }

    /// compare_refcounts: the on-disk refcount of every cluster against the computed one.
    private func compareRefcounts(_ imrt: Qcow2RefcountArray, nbClusters: Int, fix: CheckRepair,
                                  rebuild: inout Bool, highest: inout Int) {
        highest = 0
        for i in 0..<nbClusters {
            let refcount1: UInt64
            do {
                refcount1 = try diskRefcount(Int64(i))
            } catch {
                let e = (error as? Qcow2CheckAbort)?.errno ?? EIO
                say("Can't get refcount for cluster \(i): \(strerrorString(e))")
                res.checkErrors += 1
                continue
            }
            let refcount2 = imrt.get(i)
            if refcount1 > 0 || refcount2 > 0 { highest = i }
            if refcount1 == refcount2 { continue }
            var fixing: WritableKeyPath<CheckResult, Int64>?
            if refcount1 == 0 {
                rebuild = true
            } else if refcount1 > refcount2 && fix.contains(.leaks) {
                fixing = \.leaksFixed
            } else if refcount1 < refcount2 && fix.contains(.errors) {
                fixing = \.corruptionsFixed
            }
            let what = fixing != nil ? "Repairing" : refcount1 < refcount2 ? "ERROR" : "Leaked"
            say("\(what) cluster \(i) refcount=\(refcount1) reference=\(refcount2)")
            if let kp = fixing {
                let decrease = refcount1 > refcount2
                let diff = decrease ? refcount1 - refcount2 : refcount2 - refcount1
                if (try? updateDiskRefcount(Int64(i), diff: diff, decrease: decrease)) != nil {
                    res[keyPath: kp] += 1
                    continue
                }
            }
            if refcount1 < refcount2 {
                res.corruptions += 1
            } else {
                res.leaks += 1
            }
        }
    }

    /// check_oflag_copied: the copied flag of every active L1 and L2 entry must say whether the refcount is 1.
    private func checkOflagCopied() throws {
        let repair: Bool
        if fix.contains(.errors) {
            repair = true
        } else if fix.contains(.leaks) {
            // Refcounts were fixed just before; trust them only if that went cleanly.
            repair = res.checkErrors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            repair = false
        }
        for i in 0..<l1.count {
            let l1Entry = l1[i]
            let l2Offset = l1Entry & Qcow2.l1OffsetMask
            if l2Offset == 0 { continue }
            guard let refcount = try? diskRefcount(Int64(l2Offset >> UInt64(clusterBits))) else { continue }
            if (refcount == 1) != (l1Entry & Qcow2.l2Copied != 0) {
                res.corruptions += 1
                say("\(repair ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) "
                    + "l1_entry=\(Self.x(l1Entry)) refcount=\(refcount)")
                if repair {
                    let fixed = refcount == 1 ? l1Entry | Qcow2.l2Copied : l1Entry & ~Qcow2.l2Copied
                    var bytes = [UInt8](repeating: 0, count: 8)
                    bytes.putU64be(fixed, at: 0)
                    let at = header.l1TableOffset &+ UInt64(i) * 8
                    guard writeAllowed(ignore: Self.olActiveL1, offset: Int64(bitPattern: at), size: 8) else {
                        res.checkErrors += 1
                        throw Qcow2CheckAbort(errno: EIO)
                    }
                    do {
                        try file.write(bytes, at: header.l1TableOffset &+ UInt64(i) * 8)
                    } catch {
                        res.checkErrors += 1
                        throw Qcow2CheckAbort(errno: EIO)
                    }
                    l1[i] = fixed
                    res.corruptions -= 1
                    res.corruptionsFixed += 1
                }
            }
            var table: [UInt8]
            do {
                table = try file.readBytes(at: l2Offset, count: l2Entries * l2EntryBytes)
            } catch {
                say("ERROR: Could not read L2 table: \(strerrorString(EIO))")
                res.checkErrors += 1
                throw Qcow2CheckAbort(errno: EIO)
            }
            var dirty: Int64 = 0
            let words = l2Words(table)
            for j in 0..<l2Entries {
                let entry = words[j * l2Stride]
                let type = clusterType(entry)
                guard type == .normal || type == .zeroAlloc else { continue }
                let refcount: UInt64
                if hasDataFile {
                    refcount = 1
                } else {
                    guard let r = try? diskRefcount(Int64((entry & Qcow2.l2OffsetMask) >> UInt64(clusterBits))) else {
                        continue
                    }
                    refcount = r
                }
                if (refcount == 1) != (entry & Qcow2.l2Copied != 0) {
                    res.corruptions += 1
                    say("\(repair ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: l2_entry=\(Self.x(entry)) "
                        + "refcount=\(refcount)")
                    if repair {
                        table.putU64be(refcount == 1 ? entry | Qcow2.l2Copied : entry & ~Qcow2.l2Copied,
                                       at: j * l2EntryBytes)
                        dirty += 1
                    }
                }
            }
            if dirty > 0 {
                guard writeAllowed(ignore: Self.olActiveL2, offset: Int64(l2Offset), size: clusterSize) else {
                    say("ERROR: Could not write L2 table; metadata overlap check failed: \(strerrorString(EIO))")
                    res.checkErrors += 1
                    throw Qcow2CheckAbort(errno: EIO)
                }
                do {
                    try file.write(table, at: l2Offset)
                } catch {
                    say("ERROR: Could not write L2 table: \(strerrorString(EIO))")
                    res.checkErrors += 1
                    throw Qcow2CheckAbort(errno: EIO)
                }
                res.corruptions -= dirty
                res.corruptionsFixed += dirty
            }
        }
    }

    // MARK: - Rebuilding the refcount structure

    /// alloc_clusters_imrt: `count` free clusters in the in-memory table from `firstFree` on (growing it past the
    /// end of the image when needed), marked used. Returns the byte offset.
    private func allocClusters(_ imrt: inout Qcow2RefcountArray, count: Int, nbClusters: inout Int,
                               firstFree: inout Int) throws -> Int64 {
        var cluster = firstFree
        var firstGap = true
        var contiguous = 0
        while cluster < nbClusters && contiguous < count {
            if imrt.get(cluster) == 0 {
                contiguous += 1
                if firstGap {
                    firstFree = cluster
                    firstGap = false
                }
            } else if contiguous != 0 {
                contiguous = 0
            }
            cluster += 1
        }
        if contiguous < count {
            try imrt.resize(to: cluster + count - contiguous)
            nbClusters = imrt.count
        }
        cluster -= contiguous
        for i in 0..<count { imrt.set(cluster + i, 1) }
        return Int64(cluster) << clusterBits
    }

    /// rebuild_refcounts_write_refblocks: writes a refblock for every refblock-sized range of
    /// [first, end) holding a used cluster. Returns whether the on-disk reftable grew.
    private func writeRefblocks(_ imrt: inout Qcow2RefcountArray, nbClusters: inout Int, first: Int, end: Int,
                                reftable newTable: inout [UInt64]) throws -> Bool {
        var end = end
        var grown = false
        var firstFree = 0
        let perBlock = 1 << Int(refblockBits)
        var cluster = first
        while cluster < end {
            if imrt.get(cluster) == 0 {
                cluster += 1
                continue
            }
            let index = cluster >> Int(refblockBits)
            let blockStart = index << Int(refblockBits)
            var blockOffset: Int64
            if newTable.count > index && newTable[index] != 0 {
                blockOffset = Int64(newTable[index])
            } else {
                if firstFree < blockStart { firstFree = blockStart }
                do {
                    blockOffset = try allocClusters(&imrt, count: 1, nbClusters: &nbClusters, firstFree: &firstFree)
                } catch let e as Qcow2CheckAbort {
                    errorReport("ERROR allocating refblock: \(strerrorString(e.errno))")
                    throw e
                }
                let blockCluster = Int(blockOffset >> clusterBits)
                if blockCluster >= end { end = blockCluster + 1 }
                if newTable.count <= index {
                    let perCluster = Int(clusterSize) / 8
                    let entries = ((index + 1) + perCluster - 1) / perCluster * perCluster
                    newTable.append(contentsOf: repeatElement(0, count: entries - newTable.count))
                    grown = true
                }
                newTable[index] = UInt64(blockOffset)
            }
            guard writeAllowed(ignore: 0, offset: blockOffset, size: clusterSize) else {
                errorReport("ERROR writing refblock: \(strerrorString(EIO))")
                throw Qcow2CheckAbort(errno: EIO)
            }
            let sliceStart = index * Int(clusterSize)
            let slice = Array(imrt.bytes[sliceStart..<min(sliceStart + Int(clusterSize), imrt.bytes.count)])
            do {
                try file.write(slice, at: UInt64(blockOffset))
            } catch {
                errorReport("ERROR writing refblock: \(strerrorString(EIO))")
                throw Qcow2CheckAbort(errno: EIO)
            }
            cluster = blockStart + perBlock
        }
        return grown
    }

    /// rebuild_refcount_structure: a new refcount table and blocks from the in-memory refcounts, written into
    /// free clusters (usually past the end of the image). The old structure is leaked and fixed afterwards.
    private func rebuildRefcountStructure(_ imrt: inout Qcow2RefcountArray, nbClusters: inout Int) throws {
        // qcow2_cache_empty: written back first, then dropped.
        try flushRefblocks()
        refblockCache.removeAll()
        var newTable: [UInt64] = []
        do {
            _ = try writeRefblocks(&imrt, nbClusters: &nbClusters, first: 0, end: nbClusters, reftable: &newTable)
        } catch {
            res.checkErrors += 1
            throw error
        }
        var tableOffset: Int64 = -1
        var tableClusters = 0
        var changed = true
        while changed {
            var firstFree = 0
            let length = newTable.count * 8
            tableClusters = (length + Int(clusterSize) - 1) / Int(clusterSize)
            do {
                tableOffset = try allocClusters(&imrt, count: tableClusters, nbClusters: &nbClusters,
                                                firstFree: &firstFree)
            } catch let e as Qcow2CheckAbort {
                errorReport("ERROR allocating reftable: \(strerrorString(e.errno))")
                res.checkErrors += 1
                throw e
            }
            let startCluster = Int(tableOffset >> clusterBits)
            do {
                changed = try writeRefblocks(&imrt, nbClusters: &nbClusters, first: startCluster,
                                             end: startCluster + tableClusters, reftable: &newTable)
            } catch {
                res.checkErrors += 1
                throw error
            }
        }
        var bytes = [UInt8](repeating: 0, count: newTable.count * 8)
        for (i, e) in newTable.enumerated() { bytes.putU64be(e, at: i * 8) }
        guard writeAllowed(ignore: 0, offset: tableOffset, size: Int64(bytes.count)) else {
            errorReport("ERROR writing reftable: \(strerrorString(EIO))")
            throw Qcow2CheckAbort(errno: EIO)
        }
        do {
            try file.write(bytes, at: UInt64(tableOffset))
        } catch {
            errorReport("ERROR writing reftable: \(strerrorString(EIO))")
            throw Qcow2CheckAbort(errno: EIO)
        }
        // qcow2.txt: header bytes 48-55 refcount_table_offset, 56-59 refcount_table_clusters.
        var field = [UInt8](repeating: 0, count: 12)
        field.putU64be(UInt64(tableOffset), at: 0)
        field.putU32be(UInt32(tableClusters), at: 8)
        do {
            try file.write(field, at: 48)
            try file.sync()
        } catch {
            errorReport("ERROR setting reftable: \(strerrorString(EIO))")
            throw Qcow2CheckAbort(errno: EIO)
        }
        header.refcountTableOffset = UInt64(tableOffset)
        header.refcountTableClusters = UInt32(tableClusters)
        reftable = newTable
    }

    // MARK: - The check

    /// qcow2_check_refcounts.
    private func checkRefcounts() throws {
        let size: Int64
        do {
            size = Int64(try file.size())
        } catch {
            res.checkErrors += 1
            throw Qcow2CheckAbort(errno: EIO)
        }
        let nbClusters64 = (size + clusterSize - 1) / clusterSize
        guard nbClusters64 <= Int64(Int32.max) else {
            res.checkErrors += 1
            throw Qcow2CheckAbort(errno: EFBIG)
        }
        var nbClusters = Int(nbClusters64)
        let guestBytes = Int64(header.size / 512 * 512)
        res.totalClusters = (guestBytes + clusterSize - 1) / clusterSize
        var imrt = Qcow2RefcountArray(order: UInt64(header.refcountOrder), clusterSize: Int(clusterSize))
        var rebuild = false
        var highest = 0

        try calculateRefcounts(&imrt, nbClusters: &nbClusters, rebuild: &rebuild)
        // When only simple fixes are wanted the comparison runs again with fixing enabled; this pass only counts.
        let preCompare = res
        compareRefcounts(imrt, nbClusters: nbClusters, fix: [], rebuild: &rebuild, highest: &highest)

        if rebuild && fix.contains(.errors) {
            let old = res
            var freshLeaks: Int64 = 0
            say("Rebuilding refcount structure")
            try rebuildRefcountStructure(&imrt, nbClusters: &nbClusters)
            res.corruptions = 0
            res.leaks = 0
            // The new structure moved everything: count the references again.
            rebuild = false
            imrt.clear()
            let fixForRecount = repairMode
            try withRepair([]) {
                try calculateRefcounts(&imrt, nbClusters: &nbClusters, rebuild: &rebuild)
            }
            if fixForRecount.contains(.leaks) {
                // The old structure is leaked now; fix that. Leaks left over were introduced by the rebuild.
                let saved = res
                res = CheckResult()
                compareRefcounts(imrt, nbClusters: nbClusters, fix: .leaks, rebuild: &rebuild, highest: &highest)
                if rebuild { say("ERROR rebuilt refcount structure is still broken") }
                freshLeaks = res.leaks
                res = saved
            }
            if res.corruptions < old.corruptions { res.corruptionsFixed += old.corruptions - res.corruptions }
            if res.leaks < old.leaks { res.leaksFixed += old.leaks - res.leaks }
            res.leaks += freshLeaks
        } else if !fix.isEmpty {
            if rebuild {
                say("ERROR need to rebuild refcount structures")
                res.checkErrors += 1
                throw Qcow2CheckAbort(errno: EIO)
            }
            if res.leaks != 0 || res.corruptions != 0 {
                res = preCompare
                compareRefcounts(imrt, nbClusters: nbClusters, fix: fix, rebuild: &rebuild, highest: &highest)
            }
        }
        try checkOflagCopied()
        res.imageEndOffset = Int64(highest + 1) * clusterSize
    }

    /// Runs `body` with a different repair mode (calculate_refcounts is called with fix 0 after a rebuild).
    private var fixOverride: CheckRepair?
    private func withRepair(_ mode: CheckRepair, _ body: () throws -> Void) throws {
        fixOverride = mode
        defer { fixOverride = nil }
        try body()
    }

    /// qcow2_co_check_locked: the refcount check, then marking the image clean after a successful repair.
    /// qcow2_co_check_locked: the snapshot table first (read leniently), then the refcounts, then the repaired
    /// snapshot table is written; the counts of both parts add up.
    func run() throws -> CheckResult {
        var snapshotRes = CheckResult()
        let table: Qcow2SnapshotTable.ReadResult
        do {
            table = try checkReadSnapshotTable(&snapshotRes)
        } catch let e as Qcow2CheckAbort {
            throw CheckFailure(partial: snapshotRes, errnoValue: e.errno)
        }
        do {
            try checkRefcounts()
        } catch let e as Qcow2CheckAbort {
            // The image is still closed afterwards, which writes the cache back (unless it was marked corrupt).
            try? flushRefblocks()
            res.add(snapshotRes, allocation: false)
            throw CheckFailure(partial: res, errnoValue: e.errno)
        }
        do {
            try checkFixSnapshotTable(&snapshotRes, table: table)
            try flushRefblocks()
        } catch let e as Qcow2CheckAbort {
            res.add(snapshotRes, allocation: false)
            throw CheckFailure(partial: res, errnoValue: e.errno)
        }
        res.add(snapshotRes, allocation: false)
        if !fix.isEmpty && res.checkErrors == 0 && res.corruptions == 0 {
            // qcow2_mark_clean and qcow2_mark_consistent: drop the dirty and corrupt bits.
            let mask = Qcow2.incompatDirty | Qcow2.incompatCorrupt
            if header.version >= 3 && header.incompatibleFeatures & mask != 0 {
                var field = [UInt8](repeating: 0, count: 8)
                field.putU64be(header.incompatibleFeatures & ~mask, at: 0)
                do {
                    try file.write(field, at: 72)
                } catch {
                    throw CheckFailure(partial: res, errnoValue: EIO)
                }
            }
        }
        return res
    }
}
