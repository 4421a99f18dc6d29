import Glibc

/// Creating, reverting to and deleting internal snapshots (qemu's block/qcow2-snapshot.c and
/// qcow2_update_snapshot_refcount in qcow2-refcount.c), in qemu's order of allocations and writes so that the
/// resulting files match qemu-img's, and so that a crash between two steps leaves at worst leaked clusters:
/// a snapshot's clusters are counted (and on disk) before the table names it, and the table stops naming a
/// snapshot before its clusters are released.
extension Qcow2Format: ImageSnapshottable {
    public func listSnapshots() throws -> [SnapshotInfo] { snapshots }

    /// The table as qemu holds it after open (entries with their extra data), read strictly.
    func snapshotEntries() throws -> Qcow2SnapshotTable.ReadResult {
        let count = Int(header.nbSnapshots)
        if count == 0 { return Qcow2SnapshotTable.ReadResult() }
        return try Qcow2SnapshotTable.read(file: file, offset: header.snapshotsOffset, count: count,
                                           diskSize: virtualSize, repair: false)
    }

    /// qemu's error_report for messages printed from inside the driver (error_report_err).
    private func report(_ text: String) {
        Diagnostics.sink?(Diagnostics.Message(text + "\n", prefixed: true))
    }

    /// Text qemu prints with a bare fprintf (no program name).
    private func plainReport(_ text: String) {
        Diagnostics.sink?(Diagnostics.Message(text + "\n", prefixed: false))
    }

    /// The L1 table of a snapshot entry must be a valid table (qcow2_validate_table): the errno qemu returns.
    private func validateSnapshotL1(_ e: Qcow2SnapshotEntry) -> (String, Int32)? {
        if UInt64(e.l1Size) > Qcow2.maxL1Bytes / 8 { return ("Snapshot L1 table too large", EFBIG) }
        let bytes = UInt64(e.l1Size) * 8
        if e.l1TableOffset > UInt64(Int64.max) - bytes || e.l1TableOffset % header.clusterSize != 0 {
            return ("Snapshot L1 table offset invalid", EINVAL)
        }
        return nil
    }

    /// find_new_snapshot_id: one more than the largest id read as a number (strtoul, wrapping as unsigned long).
    private static func newSnapshotID(_ entries: [Qcow2SnapshotEntry]) -> String {
        var maxID: UInt = 0
        for e in entries {
            let v: UInt = (e.id + [0]).withUnsafeBufferPointer { b in
                b.baseAddress.map { p in p.withMemoryRebound(to: CChar.self, capacity: b.count) { strtoul($0, nil, 10) } } ?? 0
            }
            maxID = max(maxID, v)
        }
        return String(maxID &+ 1)
    }

    private func refreshSnapshots(_ entries: [Qcow2SnapshotEntry]) {
        snapshots = entries.map { e in
            SnapshotInfo(id: Qcow2Snapshots.cString(e.id), name: Qcow2Snapshots.cString(e.name),
                         vmStateSize: e.vmStateSize, dateSec: e.dateSec, dateNsec: e.dateNsec,
                         vmClockNsec: e.vmClockNsec, icount: e.icount == UInt64.max ? nil : e.icount,
                         nameBytes: e.name)
        }
    }

    /// qcow2_check_metadata_overlap with qemu's default "cached" checks: which metadata a write of `size`
    /// bytes at `offset` would hit, given the snapshot table as qemu holds it at that moment (`snapshots`, and
    /// the table's place `tableOffset`/`tableSize`). Ranges wrap as qemu's unsigned arithmetic does.
    func metadataOverlap(offset: UInt64, size: UInt64, ignoreActiveL1: Bool, snapshots: [Qcow2SnapshotEntry],
                         tableOffset: UInt64, tableSize: UInt64, reftable: [UInt64]) -> String? {
        if size == 0 { return nil }
        let cs = header.clusterSize
        let start = offset & ~(cs - 1)
        let len = ((offset & (cs - 1)) &+ size &+ cs &- 1) & ~(cs - 1)
        func hits(_ o: UInt64, _ l: UInt64) -> Bool {
            if l == 0 { return false }
            let last1 = start &+ len &- 1, last2 = o &+ l &- 1
            return !(last2 < start || last1 < o)
        }
        if start < cs { return "main header" }
        if !ignoreActiveL1 && header.l1Size != 0 && hits(header.l1TableOffset, UInt64(header.l1Size) &* 8) {
            return "active L1 table"
        }
        if hits(header.refcountTableOffset, UInt64(header.refcountTableClusters) &* cs) { return "refcount table" }
        if hits(tableOffset, tableSize) { return "snapshot table" }
        for e in snapshots where e.l1Size != 0 && hits(e.l1TableOffset, UInt64(e.l1Size) &* 8) {
            return "inactive L1 table"
        }
        for e in mapper.l1 where e & Qcow2.l1OffsetMask != 0 && hits(e & Qcow2.l1OffsetMask, cs) {
            return "active L2 table"
        }
        for e in reftable where e & Qcow2.reftableOffsetMask != 0 && hits(e & Qcow2.reftableOffsetMask, cs) {
            return "refcount block"
        }
        if header.autoclearFeatures & Qcow2.autoclearBitmaps != 0, let b = extensions.bitmaps,
           hits(b.directoryOffset, b.directorySize) {
            return "bitmap directory"
        }
        return nil
    }

    /// qcow2_pre_write_overlap_check: a write onto metadata marks the image corrupt and fails with EIO.
    func preventOverlap(offset: UInt64, size: UInt64, ignoreActiveL1: Bool = false,
                        snapshots: [Qcow2SnapshotEntry], tableOffset: UInt64, tableSize: UInt64) throws {
        let w = try writeSide()
        if let what = metadataOverlap(offset: offset, size: size, ignoreActiveL1: ignoreActiveL1,
                                      snapshots: snapshots, tableOffset: tableOffset, tableSize: tableSize,
                                      reftable: w.reftable) {
            throw w.signalSnapshotCorruption("Preventing invalid write on metadata (overlaps with \(what))")
        }
    }

    /// After a failed update that marked the image dirty: a failed host write may have left the refcounts and
    /// the copied flags disagreeing, so the dirty bit stays for the repair of the next read/write open. A refusal
    /// (a refcount that would overflow, as qemu checks before writing) leaves the image as qemu leaves it.
    private func keepDirtyAfterWriteFailure(_ error: Error) {
        if let e = error as? InstarError, e.code != .io { return }
        keepDirtyAfterFailure = true
    }

    public func createSnapshot(name: String, dateSec: UInt32, dateNsec: UInt32) throws {
        let table = try snapshotEntries()
        if UInt64(table.entries.count) >= Qcow2.maxSnapshots {
            throw InstarError(.range, strerrorString(EFBIG), errno: EFBIG)
        }
        if header.hasDataFile { throw InstarError(.unsupported, strerrorString(ENOTSUP), errno: ENOTSUP) }
        let w = try writeSide()
        try w.prepare()
        // What earlier writes left in the caches goes to the disk in its own order first: the update below is
        // written back without order.
        try w.flushAll()
        let id = Qcow2Format.newSnapshotID(table.entries)
        // qemu-img copies the name into a 256-byte buffer.
        let nameBytes = Array(name.utf8.prefix(255).prefix { $0 != 0 })
        let l1 = mapper.l1
        let l1Bytes = UInt64(l1.count) * 8
        let l1Offset = try w.allocateClusters(l1Bytes.divCeil(w.clusterSize))
        try preventOverlap(offset: l1Offset, size: l1Bytes, snapshots: table.entries,
                           tableOffset: header.snapshotsOffset, tableSize: table.size)
        // Between the raised refcounts and the cleared copied flags no order is consistent: the image is marked
        // dirty first (an 8-byte header write and flush of its own, before the first change to a flag, and not
        // at all when no flag changes, e.g. a second snapshot with no write since the first), and stays dirty
        // if a step fails (the next read/write open repairs it). From there until the header names the new snapshot nothing on disk
        // references what changes (the snapshot's L1 copy, the new table, and their refcounts) and the dirty
        // bit covers the refcounts and flags, so the copy, the refcount blocks, the L2 and L1 tables and the
        // new table are written in any order and flushed once (`unordered`), before the header write that
        // names the snapshot and clears the bit this call set. Freeing the old table after that only leaks on
        // a crash. Version 2 has no dirty bit: its steps keep qemu's order, each flushed before the next.
        let batched = header.version >= 3
        if !batched {
            if l1Bytes > 0 { try file.write(Qcow2Writer.encodeBE64(l1), at: l1Offset) }
            CrashPoint.hit("snapshot-create:l1-copied")
        }
        var setDirty = false
        var l1Written = !batched
        var entries = table.entries
        w.unordered = batched
        defer {
            w.unordered = false
            w.crashBetweenCaches = nil
        }
        do {
            try w.updateSnapshotRefcount(l1Offset: header.l1TableOffset, l1Size: l1.count, addend: 1,
                                         flush: !batched, beforeFlagChange: { setDirty = try w.markDirtyForUpdate() })
            CrashPoint.hit("snapshot-create:refcounts")
            if batched {
                l1Written = true
                if l1Bytes > 0 { try file.write(Qcow2Writer.encodeBE64(l1), at: l1Offset) }
                CrashPoint.hit("snapshot-create:l1-copied")
                w.crashBetweenCaches = "snapshot-create:tables-written"
            }
            entries.append(Qcow2SnapshotEntry(
                l1TableOffset: l1Offset, l1Size: UInt32(l1.count), vmStateSize: 0, dateSec: dateSec,
                dateNsec: dateNsec, vmClockNsec: 0, icount: 0, diskSize: virtualSize,
                extraDataSize: Qcow2SnapshotTable.knownExtraBytes, unknownExtra: [], id: Array(id.utf8),
                name: nameBytes))
            try w.writeSnapshotTable(entries, oldSize: table.size, report: plainReport, overlapCheck: { o, n in
                try self.preventOverlap(offset: o, size: n, snapshots: entries,
                                        tableOffset: self.header.snapshotsOffset, tableSize: table.size)
            }, crashPrefix: "snapshot-create", syncFirst: false,
               incompatibleFeatures: setDirty ? w.header.incompatibleFeatures & ~Qcow2.incompatDirty : nil)
        } catch {
            // qemu writes the copy before the refcounts: a failed update (a refcount overflow) leaves it written.
            if !l1Written && l1Bytes > 0 { try? file.write(Qcow2Writer.encodeBE64(l1), at: l1Offset) }
            keepDirtyAfterWriteFailure(error)
            throw error
        }
        refreshSnapshots(entries)
    }

    public func applySnapshot(idOrName: String, backing: GuestReader?) throws {
        // bdrv_snapshot_goto: loaded bitmaps block a revert before the driver is asked.
        if !liveBitmaps.isEmpty || !addedBitmaps.isEmpty {
            throw InstarError(.locked, "Device has active dirty bitmaps", errno: EBUSY)
        }
        func fail(_ err: Int32) -> InstarError {
            InstarError(err == ENOENT ? .notFound : .invalid, "Failed to load snapshot: \(strerrorString(err))",
                        errno: err)
        }
        if header.hasDataFile { throw fail(ENOTSUP) }
        let table = try snapshotEntries()
        let key = Array(idOrName.utf8)
        guard let sn = table.entries.first(where: { $0.id == key }) ?? table.entries.first(where: { $0.name == key })
        else { throw fail(ENOENT) }
        if let (msg, err) = validateSnapshotL1(sn) {
            report(msg)
            throw fail(err)
        }
        if sn.diskSize != virtualSize {
            do {
                try resize(to: sn.diskSize, preallocation: .off, backing: backing)
            } catch let e as InstarError {
                report(e.message)
                throw fail(e.errnoValue != 0 ? e.errnoValue : EINVAL)
            }
        }
        let w = try writeSide()
        try w.prepare()
        do {
            try w.growL1Exactly(UInt64(sn.l1Size))
            let current = mapper.l1
            var snL1 = [UInt64](repeating: 0, count: current.count)
            if sn.l1Size > 0 {
                let raw = try Qcow2SnapshotTable.readTable(file, at: sn.l1TableOffset, count: Int(sn.l1Size) * 8)
                let decoded = Qcow2Mapper.decodeBE64(raw, count: Int(sn.l1Size))
                // The snapshot's table may carry copied flags from when it was taken; every table it names is
                // shared once it is active too, so none may have the flag until the last pass sets it again.
                for i in 0..<min(decoded.count, snL1.count) { snL1[i] = decoded[i] & ~Qcow2.l2Copied }
            }
            try w.updateSnapshotRefcount(l1Offset: sn.l1TableOffset, l1Size: Int(sn.l1Size), addend: 1)
            CrashPoint.hit("snapshot-apply:refcounts")
            try preventOverlap(offset: header.l1TableOffset, size: UInt64(current.count) * 8, ignoreActiveL1: true,
                               snapshots: table.entries, tableOffset: header.snapshotsOffset, tableSize: table.size)
            if !current.isEmpty {
                try file.write(Qcow2Writer.encodeBE64(snL1), at: header.l1TableOffset)
                try file.sync()
            }
            CrashPoint.hit("snapshot-apply:l1-written")
            var failure: Error?
            do {
                try w.updateSnapshotRefcount(l1Offset: header.l1TableOffset, l1Size: current.count, addend: -1,
                                             flush: false)
            } catch {
                failure = error
            }
            // The table in memory follows the one on disk whatever happened to the refcounts.
            mapper.l1 = snL1
            mapper.cache.removeAll()
            forgetDecompressed()
            if let f = failure { throw f }
            try w.updateSnapshotRefcount(l1Offset: header.l1TableOffset, l1Size: snL1.count, addend: 0)
        } catch let e as InstarError {
            throw fail(e.errnoValue != 0 ? e.errnoValue : EIO)
        }
    }

    public func deleteSnapshot(id: String?, name: String?) throws {
        if header.hasDataFile { throw InstarError(.unsupported, strerrorString(ENOTSUP), errno: ENOTSUP) }
        let table = try snapshotEntries()
        let idKey = id.map { Array($0.utf8) }
        let nameKey = name.map { Array($0.utf8) }
        guard let index = table.entries.firstIndex(where: { e in
            (idKey == nil || e.id == idKey) && (nameKey == nil || e.name == nameKey)
        }), idKey != nil || nameKey != nil else {
            throw InstarError(.notFound, "Can't find the snapshot", errno: ENOENT)
        }
        let sn = table.entries[index]
        if let (msg, err) = validateSnapshotL1(sn) { throw InstarError(.invalid, msg, errno: err) }
        let w = try writeSide()
        try w.prepare()
        // What earlier writes left in the caches goes to the disk in its own order first.
        try w.flushAll()
        // Lowered refcounts and copied flags set again disagree until both are on disk, whatever the order:
        // the image is marked dirty first and stays dirty if a step fails, so the next read/write open repairs
        // it. Until the header stops naming the snapshot nothing disagrees (the new table goes to fresh
        // clusters, counted and written, then flushed, before the header names it), so the header write that
        // switches tables sets the bit (version 3). Nothing on disk reaches the snapshot's clusters after that
        // write, and the bit covers the refcounts and flags: the refcount blocks, the L2 and L1 tables and the
        // punched clusters are written in any order (`unordered`) and flushed once, before close clears the bit.
        // Version 2 has no dirty bit: its steps keep their order, each flushed before the next.
        var entries = table.entries
        entries.remove(at: index)
        w.unordered = header.version >= 3
        defer {
            w.unordered = false
            w.crashBetweenCaches = nil
        }
        do {
            do {
                try w.writeSnapshotTable(entries, oldSize: table.size, report: plainReport, overlapCheck: { o, n in
                    try self.preventOverlap(offset: o, size: n, snapshots: entries,
                                            tableOffset: self.header.snapshotsOffset, tableSize: table.size)
                }, crashPrefix: "snapshot-delete", syncFirst: false,
                   incompatibleFeatures: w.header.incompatibleFeatures | Qcow2.incompatDirty)
            } catch let e as InstarError {
                let err = e.errnoValue != 0 ? e.errnoValue : EIO
                throw InstarError(e.code, "Failed to remove snapshot from snapshot list: \(strerrorString(err))",
                                  errno: err)
            }
            refreshSnapshots(entries)
            CrashPoint.hit("snapshot-delete:table-written")
            do {
                try w.updateSnapshotRefcount(l1Offset: sn.l1TableOffset, l1Size: Int(sn.l1Size), addend: -1,
                                             flush: false)
            } catch let e as InstarError {
                let err = e.errnoValue != 0 ? e.errnoValue : EIO
                throw InstarError(e.code, "Failed to free the cluster and L1 table: \(strerrorString(err))",
                                  errno: err)
            }
            if w.unordered { w.crashBetweenCaches = "snapshot-delete:tables-written" }
            if sn.l1Size > 0 {
                // qcow2_free_clusters: a failure leaks the table; qemu says so and goes on.
                if let err = try w.releaseRefusal(sn.l1TableOffset, UInt64(sn.l1Size) * 8) {
                    plainReport("qcow2_free_clusters failed: \(strerrorString(err))")
                } else {
                    try w.freeRange(sn.l1TableOffset, UInt64(sn.l1Size) * 8, discard: true)
                }
            }
            do {
                try w.updateSnapshotRefcount(l1Offset: header.l1TableOffset, l1Size: mapper.l1.count, addend: 0)
            } catch let e as InstarError {
                let err = e.errnoValue != 0 ? e.errnoValue : EIO
                throw InstarError(e.code, "Failed to update snapshot status in disk: \(strerrorString(err))",
                                  errno: err)
            }
        } catch {
            keepDirtyAfterWriteFailure(error)
            throw error
        }
        CrashPoint.hit("snapshot-delete:refcounts")
    }
}

extension Qcow2Writer {
    /// qcow2_update_snapshot_refcount: adds `addend` (-1, 0 or +1) to the refcount of every cluster the L1 table
    /// at `l1Offset` reaches (L2 tables, data clusters, the sectors of compressed clusters) and sets the copied
    /// flag of every entry by the refcount that results. The active table is taken from memory (qemu relies on
    /// that while reverting: the disk holds the new table by then). A changed L1 table is written back unless
    /// the references are being dropped. Clusters left unreferenced are punched out of the file.
    ///
    /// With `flush` false the changes stay in the caches for the next pass (a pass dropping references and the
    /// pass setting the flags of the active table reach the disk together, so no step boundary leaves copied
    /// flags that disagree with the refcounts). References are only dropped once nothing on disk reaches them
    /// (the snapshot left the table, or the active table was replaced), so the lowered refcounts are written
    /// before the tables whose flags they change: a crash in between leaves a flag missing (a needless copy
    /// later), never a flag on a shared cluster.
    ///
    /// With `beforeFlagChange` (raising only), that is called once, before the first change that would alter a
    /// copied flag (of an L2 entry or an L1 entry) is made in the caches: what was changed before it altered no
    /// flag, so it may reach the disk in any order.
    func updateSnapshotRefcount(l1Offset: UInt64, l1Size: Int, addend: Int, flush: Bool = true,
                                beforeFlagChange: (() throws -> Void)? = nil) throws {
        var pendingNotice = addend > 0 ? beforeFlagChange : nil
        /// `changes`: whether the step about to be made alters a copied flag.
        func announce(_ changes: Bool) throws {
            guard changes, let notice = pendingNotice else { return }
            pendingNotice = nil
            try notice()
        }
        let active = l1Offset == header.l1TableOffset
        var l1: [UInt64]
        if active {
            l1 = mapper.l1
        } else {
            guard l1Size >= 0, UInt64(l1Size) <= Qcow2.maxL1Bytes / 8 else {
                throw InstarError(.range, "Snapshot L1 table too large", errno: EFBIG)
            }
            let raw = try Qcow2SnapshotTable.readTable(file, at: l1Offset, count: l1Size * 8)
            l1 = Qcow2Mapper.decodeBE64(raw, count: l1Size)
        }
        var l1Modified = false
        var failure: Error?
        do {
            for i in 0..<l1.count where l1[i] != 0 {
                let old = l1[i]
                let l2Offset = old & Qcow2.l1OffsetMask
                if l2Offset & (clusterSize - 1) != 0 {
                    throw signalSnapshotCorruption(
                        "L2 table offset \(hex(l2Offset)) unaligned (L1 index: \(hex(UInt64(i))))")
                }
                let l2 = try l2Entry(at: l2Offset)
                // The refcount block of the last data cluster seen: nothing evicts cache entries while one table
                // is walked (trimCaches runs between tables), so it stays the cached block.
                var blockIndex = UInt64.max
                var block: Qcow2WriteCache<[UInt8]>.Entry?
                for j in 0..<l2Entries {
                    let (oldEntry, bitmap) = entryPair(l2.table, j)
                    var entry = oldEntry & ~Qcow2.l2Copied
                    let offset = entry & Qcow2.l2OffsetMask
                    var count: UInt64
                    if entry & Qcow2.l2Compressed != 0 {
                        // (the flag ends clear)
                        if addend > 0 { try announce(oldEntry & Qcow2.l2Copied != 0) }
                        if addend != 0 {
                            let d = Qcow2CompressedDescriptor(entry: entry, clusterBits: UInt32(clusterBits))
                            try changeRange(d.hostOffset, d.length, addend: addend)
                        }
                        count = 2   // compressed clusters are never written in place
                    } else if offset == 0 {
                        // Unallocated, or a zero cluster without a host cluster.
                        if addend > 0 { try announce(oldEntry & Qcow2.l2Copied != 0) }
                        count = 0
                    } else {
                        if offset & (clusterSize - 1) != 0 {
                            throw signalSnapshotCorruption("Cluster allocation offset \(hex(offset)) unaligned "
                                + "(L2 offset: \(hex(l2Offset)), L2 index: \(hex(j)))")
                        }
                        let c = offset >> clusterBits
                        if c >> refBlockBits != blockIndex {
                            blockIndex = c >> refBlockBits
                            block = try blockOffset(tableIndex: blockIndex).map { try refBlock(at: $0) }
                        }
                        if addend < 0 {
                            count = try dropReference(ofCluster: c, block: block)
                        } else if addend > 0 {
                            if pendingNotice != nil {
                                // The flag ends set exactly when the raised refcount is 1.
                                let before = block.map {
                                    Qcow2RefcountReader.entry($0.table, index: c & refIndexMask, order: refOrder)
                                } ?? 0
                                try announce((before == 0) != (oldEntry & Qcow2.l2Copied != 0))
                            }
                            count = try addReference(ofCluster: c, block: block)
                        } else {
                            count = block.map {
                                Qcow2RefcountReader.entry($0.table, index: c & refIndexMask, order: refOrder)
                            } ?? 0
                        }
                    }
                    if count == 1 { entry |= Qcow2.l2Copied }
                    if entry != oldEntry {
                        if addend > 0 { try setL2DependsOnRefcount() }
                        setEntryPair(l2, j, entry, bitmap)
                    }
                }
                let l2Cluster = l2Offset >> clusterBits
                if pendingNotice != nil {
                    try announce((try refcount(ofCluster: l2Cluster) == 0) != (old & Qcow2.l2Copied != 0))
                }
                if addend != 0 { try changeRange(l2Offset, clusterSize, addend: addend) }
                let tableCount = try refcount(ofCluster: l2Cluster)
                // A table nothing references any more is dropped from the cache unwritten (qemu discards it).
                if tableCount == 0 { l2Cache.remove(at: l2Offset) }
                let newL1 = tableCount == 1 ? l2Offset | Qcow2.l2Copied : l2Offset
                if newL1 != old {
                    l1[i] = newL1
                    l1Modified = true
                }
                // The caches stay bounded however many tables the image has (write-backs keep their order);
                // they are let grow to twice their size first, so a write-back serves many tables.
                if l2Cache.entries.count > 2 * l2Cache.capacity || rbCache.entries.count > 2 * rbCache.capacity {
                    try trimCaches()
                }
            }
            if flush && unordered {
                // Written back unsynced: the caller's flush ends the stretch.
                try flushAll()
            } else if flush {
                // qemu's bdrv_flush: the caches, then the file (the cache write-backs sync it when they write).
                if addend <= 0 {
                    refcountDependsOnL2 = false
                    try flushRefcounts()
                }
                try flushAll()
                try file.sync()
            }
        } catch {
            failure = error
        }
        if flush || failure != nil { processDiscards() }
        mapper.cache.removeAll()
        if active { mapper.l1 = l1 }
        if let f = failure { throw f }
        if addend >= 0 && l1Modified {
            try file.write(Qcow2Writer.encodeBE64(l1), at: l1Offset)
            if !unordered { try file.sync() }
        }
        // An unordered stretch ends with this pass: one flush for all of it.
        if flush && unordered { try file.sync() }
    }

    /// One reference more or less on every cluster of a host range (update_refcount); references dropped to
    /// zero are punched once the pass ends, as qemu's snapshot discards are.
    private func changeRange(_ offset: UInt64, _ length: UInt64, addend: Int) throws {
        if addend < 0 {
            if let err = try releaseRefusal(offset, length) {
                throw InstarError(.corrupt, strerrorString(err), errno: err)
            }
            return try freeRange(offset, length, discard: true)
        }
        if length == 0 { return }
        let first = offset >> clusterBits
        let last = (try offset.adding(length - 1)) >> clusterBits
        for c in first...last {
            // update_refcount fails an overflow with EINVAL and takes back what that call had added.
            guard try refcount(ofCluster: c) < refMax else {
                var k = first
                while k < c {
                    try changeRefcount(ofCluster: k, by: -1)
                    k += 1
                }
                throw InstarError(.range, "Reference count overflow", errno: EINVAL)
            }
            try changeRefcount(ofCluster: c, by: 1)
        }
    }

    /// changeRange(cluster, clusterSize, -1) followed by refcount(ofCluster:) for one whole data cluster whose
    /// refcount block (nil: none) the caller looked up (the step a snapshot deletion repeats for every data
    /// cluster): the same refusals, the same cache changes and discard queue. Returns the refcount left.
    private func dropReference(ofCluster c: UInt64, block: Qcow2WriteCache<[UInt8]>.Entry?) throws -> UInt64 {
        guard let e = block else {
            let err = c >> refBlockBits >= Qcow2.maxRefcountTableBytes / 8 ? EFBIG : EINVAL
            throw InstarError(.corrupt, strerrorString(err), errno: err)
        }
        let index = c & refIndexMask
        let old = Qcow2RefcountReader.entry(e.table, index: index, order: refOrder)
        if old == 0 { throw InstarError(.corrupt, strerrorString(EINVAL), errno: EINVAL) }
        // (a write-back this may cause leaves the entry in the cache)
        try setRefcountDependsOnL2()
        let new = old - 1
        Qcow2Writer.setEntry(&e.table, index: index, order: refOrder, value: new)
        rbCache.markDirty(e)
        if new == 0 {
            pendingFree.insert(c)
            freeHint = min(freeHint, c)
            queueDiscard(c << clusterBits, clusterSize)
        }
        return new
    }

    /// changeRange(cluster, clusterSize, +1) followed by refcount(ofCluster:) for one whole data cluster whose
    /// refcount block (nil: none) the caller looked up (the step a snapshot creation repeats for every data
    /// cluster): the same errors and cache changes. Returns the new refcount.
    private func addReference(ofCluster c: UInt64, block: Qcow2WriteCache<[UInt8]>.Entry?) throws -> UInt64 {
        guard let e = block else {
            throw InstarError(.io, "Internal error: no refcount block for cluster \(c)", errno: EIO)
        }
        let index = c & refIndexMask
        let old = Qcow2RefcountReader.entry(e.table, index: index, order: refOrder)
        // update_refcount fails an overflow with EINVAL
        guard old < refMax else { throw InstarError(.range, "Reference count overflow", errno: EINVAL) }
        Qcow2Writer.setEntry(&e.table, index: index, order: refOrder, value: old + 1)
        rbCache.markDirty(e)
        return old + 1
    }

    /// qcow2_signal_corruption on a writable image: the corrupt bit goes to the header and the request fails
    /// with EIO.
    func signalSnapshotCorruption(_ message: String) -> InstarError {
        if format.corruptionSignalled { return InstarError(.corrupt, message, errno: EIO) }
        Diagnostics.sink?(Diagnostics.Message(
            "qcow2: Marking image as corrupt: \(message); further corruption events will be suppressed\n",
            prefixed: false))
        if header.version >= 3 {
            header.incompatibleFeatures |= Qcow2.incompatCorrupt
            format.header.incompatibleFeatures |= Qcow2.incompatCorrupt
            try? writeHeaderU64(header.incompatibleFeatures, at: 72)   // qcow2.txt: bytes 72-79
        }
        format.corruptionSignalled = true
        return InstarError(.corrupt, message, errno: EIO)
    }
}

extension Qcow2Writer {
    /// Why qemu's update_refcount would refuse to drop one reference on each cluster of a range, as its errno:
    /// EFBIG for a cluster beyond any refcount table qemu could hold, EINVAL for a refcount already zero (or a
    /// missing refcount block); nil when the release can go ahead.
    func releaseRefusal(_ offset: UInt64, _ length: UInt64) throws -> Int32? {
        if length == 0 { return nil }
        let first = offset >> clusterBits
        guard let end = try? offset.adding(length - 1) else { return EFBIG }
        let last = end >> clusterBits
        guard last - first < (UInt64(1) << 32) else { return EFBIG }
        var c = first
        while c <= last {
            let t = c >> refBlockBits
            guard try blockOffset(tableIndex: t) != nil else {
                return t >= Qcow2.maxRefcountTableBytes / 8 ? EFBIG : EINVAL
            }
            if try refcount(ofCluster: c) == 0 { return EINVAL }
            c += 1
        }
        return nil
    }
}
