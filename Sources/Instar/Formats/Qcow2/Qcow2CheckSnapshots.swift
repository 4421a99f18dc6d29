import Glibc

/// One snapshot table entry as qemu keeps it in memory (QCowSnapshot): enough to write the table again.
struct Qcow2SnapshotEntry {
    var l1TableOffset: UInt64
    var l1Size: UInt32
    var vmStateSize: UInt64
    var dateSec: UInt32
    var dateNsec: UInt32
    var vmClockNsec: UInt64
    var icount: UInt64
    var diskSize: UInt64
    /// Size of all extra data as stored (possibly capped when check drops an oversized one).
    var extraDataSize: UInt32
    /// Extra data past the 24 bytes qemu knows.
    var unknownExtra: [UInt8]
    var id: [UInt8]
    var name: [UInt8]
}

/// The snapshot table as a list of entries (qemu's qcow2_do_read_snapshots and qcow2_write_snapshots).
enum Qcow2SnapshotTable {
    // qcow2.txt "Snapshots": a 40-byte fixed header; known extra data is 24 bytes (VM state size, disk size,
    // icount).
    static let knownExtraBytes: UInt32 = 24

    // qemu's BDRV_MAX_LENGTH: INT64_MAX rounded down to 1 GiB; a request reaching past it fails with EIO.
    static let maxRequestEnd: UInt64 = UInt64(Int64.max) & ~((1 << 30) - 1)

    /// bdrv_pread of table bytes: past the end of the file they read as zeroes; past qemu's request limit the
    /// read fails as qemu's does.
    static func readTable(_ file: HostFile, at offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset <= maxRequestEnd, UInt64(count) <= maxRequestEnd - offset else {
            throw InstarError(.io, "Failed to read snapshot table: \(strerrorString(EIO))", errno: EIO)
        }
        do {
            return try file.readBytes(at: offset, count: count)
        } catch let e as InstarError {
            let err = e.errnoValue != 0 ? e.errnoValue : EIO
            throw InstarError(.io, "Failed to read snapshot table: \(strerrorString(err))", errno: err)
        }
    }

    struct ReadResult {
        var entries: [Qcow2SnapshotEntry] = []
        /// Bytes from the table start to the end of the last entry read.
        var size: UInt64 = 0
        /// Entries dropped off the end because the table is too big (repair only).
        var reduced = 0
        /// Entries whose oversized extra data was cut (repair only).
        var extraDropped = 0
    }

    /// Reads `count` entries at `offset`. With `repair`, oversized extra data is cut and a too-long table is
    /// shortened instead of failing. Bytes past the end of the file read as zeroes, as qemu's reads do.
    /// `report` receives the repair messages as they happen (qemu prints them while reading).
    static func read(file: HostFile, offset start: UInt64, count: Int, diskSize: UInt64,
                     repair: Bool, report: (String) -> Void = { _ in }) throws -> ReadResult {
        var r = ReadResult()
        var offset = start
        var tableLength: UInt64 = 0
        for i in 0..<count {
            let entryStart = offset
            tableLength = try tableLength.alignedUp(8)
            offset = try offset.alignedUp(8)
            let h = ByteReader(try readTable(file, at: offset, count: Int(Qcow2.snapshotHeaderSize)), what: "snapshot table")
            offset = try offset.adding(Qcow2.snapshotHeaderSize)
            // qcow2.txt: bytes 0-7 l1_table_offset, 8-11 l1_size, 12-13 id_str_size, 14-15 name_size,
            // 16-19 date_sec, 20-23 date_nsec, 24-31 vm_clock_nsec, 32-35 vm_state_size, 36-39 extra_data_size.
            var e = Qcow2SnapshotEntry(
                l1TableOffset: try h.u64be(at: 0), l1Size: try h.u32be(at: 8),
                vmStateSize: UInt64(try h.u32be(at: 32)), dateSec: try h.u32be(at: 16),
                dateNsec: try h.u32be(at: 20), vmClockNsec: try h.u64be(at: 24), icount: UInt64.max,
                diskSize: diskSize, extraDataSize: try h.u32be(at: 36), unknownExtra: [], id: [], name: [])
            let idSize = UInt64(try h.u16be(at: 12))
            let nameSize = UInt64(try h.u16be(at: 14))
            var truncateUnknown = false
            if e.extraDataSize > Qcow2.maxSnapshotExtraData {
                if !repair {
                    throw InstarError(.invalid, "Too much extra metadata in snapshot table entry \(i)\nYou can "
                        + "force-remove this extra metadata with qemu-img check -r all", errno: EFBIG)
                }
                report("Discarding too much extra metadata in snapshot table entry \(i) "
                    + "(\(e.extraDataSize) > \(Qcow2.maxSnapshotExtraData))")
                r.extraDropped += 1
                truncateUnknown = true
            }
            let kept = UInt64(min(e.extraDataSize, UInt32(Qcow2.maxSnapshotExtraData)))
            try CallBudget.reserve(MemoryLayout<Qcow2SnapshotEntry>.stride + Int(kept + idSize + nameSize),
                                   what: "the snapshot table")
            let known = min(knownExtraBytes, e.extraDataSize)
            let extra = ByteReader(try readTable(file, at: offset, count: Int(known)),
                                   what: "snapshot table")
            offset = try offset.adding(UInt64(known))
            if e.extraDataSize >= 8 { e.vmStateSize = try extra.u64be(at: 0) }
            if e.extraDataSize >= 16 { e.diskSize = try extra.u64be(at: 8) }
            if e.extraDataSize >= 24 { e.icount = try extra.u64be(at: 16) }
            if e.extraDataSize > knownExtraBytes {
                let extraEnd = try offset.adding(UInt64(e.extraDataSize - knownExtraBytes))
                if truncateUnknown { e.extraDataSize = UInt32(Qcow2.maxSnapshotExtraData) }
                e.unknownExtra = try readTable(file, at: offset, count: Int(e.extraDataSize - knownExtraBytes))
                offset = extraEnd
            }
            e.id = Array(try readTable(file, at: offset, count: Int(idSize))
                .prefix { $0 != 0 })
            offset = try offset.adding(idSize)
            e.name = Array(try readTable(file, at: offset, count: Int(nameSize))
                .prefix { $0 != 0 })
            offset = try offset.adding(nameSize)
            tableLength += Qcow2.snapshotHeaderSize + UInt64(e.extraDataSize) + idSize + nameSize
            if tableLength > Qcow2.maxSnapshotTableBytes || offset - start > UInt64(Int32.max) {
                if !repair {
                    throw InstarError(.invalid, "Snapshot table is too big\nYou can force-remove all \(count - i) "
                        + "overhanging snapshots with qemu-img check -r all", errno: EFBIG)
                }
                report("Discarding \(count - i) overhanging snapshots (snapshot table is too big)")
                r.reduced += count - i
                offset = entryStart
                break
            }
            r.entries.append(e)
        }
        r.size = offset - start
        return r
    }
}

extension Qcow2Writer {
    /// qcow2_write_snapshots: the table is written anew in v3 form (at least 24 bytes of extra data) into
    /// fresh clusters, the header switched to it, and the old table freed (and discarded, as qemu passes
    /// snapshot discards down by default).
    /// `report` receives the line qemu prints when freeing the old table fails. With `incompatibleFeatures`
    /// (version 3 only) the header write switching to the new table carries those bits too (bytes 60-79 are
    /// contiguous), sparing a snapshot update a header write and sync of its own for the dirty bit.
    func writeSnapshotTable(_ entries: [Qcow2SnapshotEntry], oldSize: UInt64,
                            report: (String) -> Void = { _ in },
                            overlapCheck: (UInt64, UInt64) throws -> Void = { _, _ in },
                            crashPrefix: String? = nil, syncFirst: Bool = true,
                            incompatibleFeatures: UInt64? = nil) throws {
        var size: UInt64 = 0
        for e in entries {
            size = try size.alignedUp(8)
            size += Qcow2.snapshotHeaderSize + UInt64(max(Qcow2SnapshotTable.knownExtraBytes, e.extraDataSize))
                + UInt64(e.id.count) + UInt64(e.name.count)
            guard size <= Qcow2.maxSnapshotTableBytes else {
                throw InstarError(.range, "File too large", errno: EFBIG)
            }
        }
        let clusters = size.divCeil(clusterSize)
        let tableOffset = clusters == 0 ? 0 : try allocateClusters(clusters)
        // The cache write-backs sync the file when they write; otherwise it is synced here.
        let written = l2Cache.hasDirty || rbCache.hasDirty
        try flushAll()
        // Without `syncFirst` the caller has nothing unsynced outside the caches (qemu skips a flush when
        // nothing was written since the last one).
        if !written && syncFirst { try file.sync() }
        // qcow2_write_snapshots: the new clusters must be free of metadata (qcow2_pre_write_overlap_check).
        if tableOffset != 0 { try overlapCheck(tableOffset, size) }
        var offset = tableOffset
        func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - $0))) } }
        for e in entries {
            offset = try offset.alignedUp(8)
            var h = be(e.l1TableOffset, 8) + be(UInt64(e.l1Size), 4)
            h += be(UInt64(e.id.count), 2) + be(UInt64(e.name.count), 2)
            h += be(UInt64(e.dateSec), 4) + be(UInt64(e.dateNsec), 4) + be(e.vmClockNsec, 8)
            // A VM state too big for 32 bits reads as disk-only to older readers.
            h += be(e.vmStateSize <= UInt64(UInt32.max) ? e.vmStateSize : 0, 4)
            h += be(UInt64(max(Qcow2SnapshotTable.knownExtraBytes, e.extraDataSize)), 4)
            try file.write(h, at: offset)
            offset += Qcow2.snapshotHeaderSize
            try file.write(be(e.vmStateSize, 8) + be(e.diskSize, 8) + be(e.icount, 8), at: offset)
            offset += UInt64(Qcow2SnapshotTable.knownExtraBytes)
            if !e.unknownExtra.isEmpty {
                try file.write(e.unknownExtra, at: offset)
                offset += UInt64(e.unknownExtra.count)
            }
            if !e.id.isEmpty { try file.write(e.id, at: offset) }
            offset += UInt64(e.id.count)
            if !e.name.isEmpty { try file.write(e.name, at: offset) }
            offset += UInt64(e.name.count)
        }
        if size > 0 || syncFirst { try file.sync() }
        if let p = crashPrefix { CrashPoint.hit(p + ":table-before-header") }
        // qcow2.txt: header bytes 60-63 nb_snapshots, 64-71 snapshots_offset (72-79 incompatible_features),
        // written at once.
        let features = header.version >= 3 ? incompatibleFeatures : nil
        try file.write(be(UInt64(entries.count), 4) + be(tableOffset, 8) + (features.map { be($0, 8) } ?? []),
                       at: 60)
        try file.sync()
        if let f = features {
            header.incompatibleFeatures = f
            format.header.incompatibleFeatures = f
            markedDirty = f & Qcow2.incompatDirty != 0
        }
        if let p = crashPrefix { CrashPoint.hit(p + ":header-written") }
        let oldOffset = header.snapshotsOffset
        header.nbSnapshots = UInt32(entries.count)
        header.snapshotsOffset = tableOffset
        format.header.nbSnapshots = header.nbSnapshots
        format.header.snapshotsOffset = tableOffset
        if oldSize > 0 {
            // qcow2_free_clusters: a failure only leaks the old table; qemu says so and goes on.
            do {
                try freeRange(oldOffset, oldSize)
            } catch {
                let e = (error as? InstarError)?.errnoValue ?? EINVAL
                report("qcow2_free_clusters failed: \(strerrorString(e != 0 ? e : EINVAL))")
                return
            }
            // (in an unordered update the caller's flush writes the refcounts)
            if !unordered { try flushAll() }
            let first = oldOffset >> clusterBits
            let last = (oldOffset + oldSize - 1) >> clusterBits
            for c in first...last where try refcount(ofCluster: c) == 0 {
                try file.punchHole(at: c << clusterBits, length: clusterSize)
            }
        }
    }
}

extension Qcow2Checker {
    /// qcow2_check_read_snapshot_table: the open for check left the snapshot table alone; here it is read
    /// leniently. With `-r all` an oversized count or table is cut (the header's count is rewritten at once, so the
    /// refcount check sees the shortened table) and oversized extra data is dropped; v3 entries without the 16
    /// bytes of extra data every v3 entry needs count as corruptions. A table that cannot be read at all fails the
    /// check.
    func checkReadSnapshotTable(_ sres: inout CheckResult) throws -> Qcow2SnapshotTable.ReadResult {
        let repair = fix.contains(.errors)
        var count = UInt64(header.nbSnapshots)
        var reduced = 0
        if count > Qcow2.maxSnapshots && repair {
            say("Discarding \(count - Qcow2.maxSnapshots) overhanging snapshots")
            reduced += Int(count - Qcow2.maxSnapshots)
            count = Qcow2.maxSnapshots
        }
        do {
            try header.validateTable(offset: header.snapshotsOffset, entries: count,
                                     entryBytes: Qcow2.snapshotHeaderSize,
                                     maxBytes: Qcow2.snapshotHeaderSize * Qcow2.maxSnapshots, name: "snapshot table")
        } catch let e as InstarError {
            sres.checkErrors += 1
            errorReport("ERROR \(e.message)")
            if count > Qcow2.maxSnapshots {
                say("You can force-remove all \(count - Qcow2.maxSnapshots) overhanging snapshots with qemu-img "
                    + "check -r all")
            }
            throw Qcow2CheckAbort(errno: count > Qcow2.maxSnapshots ? EFBIG : EINVAL)
        }

        var table: Qcow2SnapshotTable.ReadResult
        do {
            table = try Qcow2SnapshotTable.read(file: file, offset: header.snapshotsOffset, count: Int(count),
                                                diskSize: header.size / 512 * 512, repair: repair,
                                                report: { say($0) })
        } catch let e as InstarError {
            sres.checkErrors += 1
            errorReport("ERROR failed to read the snapshot table: \(e.message)")
            throw Qcow2CheckAbort(errno: e.errnoValue != 0 ? e.errnoValue : EIO)
        }
        reduced += table.reduced
        sres.corruptions += Int64(reduced + table.extraDropped)
        if reduced != 0 {
            // qcow2.txt: header bytes 60-63 nb_snapshots.
            var field = [UInt8](repeating: 0, count: 4)
            field.putU32be(UInt32(table.entries.count), at: 0)
            do {
                try file.write(field, at: 60)
                try file.sync()
            } catch let e as InstarError {
                sres.checkErrors += 1
                say("ERROR failed to update the snapshot count in the image header: \(strerrorString(e.errnoValue != 0 ? e.errnoValue : EIO))")
                throw Qcow2CheckAbort(errno: e.errnoValue != 0 ? e.errnoValue : EIO)
            }
            header.nbSnapshots = UInt32(table.entries.count)
            sres.corruptionsFixed += Int64(reduced)
            sres.corruptions -= Int64(reduced)
        }
        // qcow2.txt: in v3 every entry carries at least the 64-bit VM state size and the disk size.
        if header.version >= 3 {
            for (i, e) in table.entries.enumerated() where e.extraDataSize < 16 {
                sres.corruptions += 1
                say("\(repair ? "Repairing" : "ERROR") snapshot table entry \(i) is incomplete")
            }
        }
        snapshots = table.entries.map {
            Qcow2CheckSnapshot(id: Qcow2Snapshots.cString($0.id), name: Qcow2Snapshots.cString($0.name),
                               l1Offset: $0.l1TableOffset, l1Size: $0.l1Size)
        }
        snapshotsSize = Int64(table.size)
        return table
    }

    /// qcow2_check_fix_snapshot_table: with `-r all`, a table with corruptions left is written anew (complete v3
    /// entries, extra data cut to size) after the refcounts were made sound.
    func checkFixSnapshotTable(_ sres: inout CheckResult, table: Qcow2SnapshotTable.ReadResult) throws {
        guard sres.corruptions != 0 && fix.contains(.errors) else { return }
        do {
            // qcow2_write_snapshots allocates through the refcount cache and flushes it.
            try flushRefblocks()
            let w = try format.writeSide()
            // A rebuilt refcount structure moved the refcount table since the writer last looked.
            w.header.refcountTableOffset = header.refcountTableOffset
            w.header.refcountTableClusters = header.refcountTableClusters
            w.header.nbSnapshots = header.nbSnapshots
            w.header.snapshotsOffset = header.snapshotsOffset
            w.reftable = reftable
            try w.writeSnapshotTable(table.entries, oldSize: table.size, report: { say($0) },
                                     overlapCheck: { offset, size in
                guard self.writeAllowed(ignore: 0, offset: Int64(bitPattern: offset), size: Int64(bitPattern: size)) else {
                    throw InstarError(.corrupt, "Preventing invalid write on metadata", errno: EIO)
                }
            })
        } catch {
            let e = (error as? InstarError)?.errnoValue ?? EIO
            sres.checkErrors += 1
            say("ERROR failed to update snapshot table: \(strerrorString(e != 0 ? e : EIO))")
            throw Qcow2CheckAbort(errno: e != 0 ? e : EIO)
        }
        sres.corruptionsFixed += sres.corruptions
        sres.corruptions = 0
    }
}
