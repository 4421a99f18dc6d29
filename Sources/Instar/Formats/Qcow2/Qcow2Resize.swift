import Glibc

/// Changing the virtual size of a qcow2 image as qemu 7.2's qcow2_co_truncate does. Growing makes the L1
/// table exactly as large as the new size needs; shrinking drops every cluster past the new end (entries
/// become unallocated, the host clusters are freed and punched), clears the L1 entries past the end, drops
/// refcount blocks that count nothing but themselves and cuts the file after its last used cluster.
extension Qcow2Format: ImageResizable {
    public func resize(to newSize: UInt64, preallocation: ResizePreallocation, backing: GuestReader?) throws {
        guard newSize % 512 == 0 else {
            throw InstarError(.invalid, "The new size must be a multiple of 512", errno: EINVAL)
        }
        // v2 snapshots need not record their disk size, so a resize could not be undone by loading one.
        if header.nbSnapshots != 0 && header.version < 3 {
            throw InstarError(.unsupported, "Can't resize a v2 image which has snapshots", errno: ENOTSUP)
        }
        try checkBitmapsResizable()
        let w = try writeSide()
        try w.prepare()
        try w.truncate(to: newSize, preallocation: preallocation, backing: backing)
        forgetDecompressed()
        try resizeBitmaps(to: virtualSize)
    }
}

extension Qcow2Writer {
    /// qcow2_co_truncate for an image opened read/write.
    func truncate(to newSize: UInt64, preallocation: ResizePreallocation, backing: GuestReader?) throws {
        let oldLength = format.virtualSize
        let newL1 = header.l1EntriesNeeded(for: newSize)
        if newSize < oldLength {
            if preallocation != .off {
                throw InstarError(.invalid, "Preallocation can't be used for shrinking an image", errno: EINVAL)
            }
            try shrink(from: oldLength, to: newSize, newL1: newL1)
            if hasDataFile { try format.dataFile.truncate(to: newSize) }
        } else {
            do {
                try growL1Exactly(newL1)
            } catch let e as InstarError {
                throw e.prepending("Failed to grow the L1 table: ")
            }
            // A raw data file must stay a valid image of the guest: growth maps the new area at least as
            // with metadata preallocation.
            let mode: ResizePreallocation = hasDataFile && header.dataFileRaw && preallocation == .off
                ? .metadata : preallocation
            // Set when the grown area already reads as zeroes over a longer backing file.
            var zeroed = false
            if (mode == .falloc || mode == .full) && !hasDataFile {
                zeroed = try preallocateFile(from: oldLength, to: newSize, mode: mode, backing: backing)
            } else if mode != .off && newSize > oldLength {
                try preallocate(from: oldLength, to: newSize, mode: mode, backing: backing)
            }
            if hasDataFile && mode == .off {
                // qcow2_co_truncate without preallocation resizes the external data file to the new size too.
                try format.dataFile.truncate(to: newSize)
            }
            // bdrv_co_truncate: a backing file longer than the old size would show through the new area, so
            // it is zeroed (BDRV_REQ_ZERO_WRITE).
            if let backing, !zeroed, newSize > oldLength, backing.virtualSize > oldLength {
                try zeroGrownArea(from: oldLength, to: newSize, backing: backing)
            }
        }
        // Growing: the header's size changes last, once the tables cover the new size. Shrinking: as in qemu, the
        // header goes first and the cached tables after it (a crash in between leaves tables that still name
        // clusters past the new end, which are counted and harmless).
        let shrinking = newSize < oldLength
        if !shrinking {
            try flushAll()
            try file.sync()
        }
        var be = newSize.bigEndian
        try withUnsafeBytes(of: &be) { try file.write($0, at: 24) }   // qcow2.txt: bytes 24-31 size
        try file.sync()
        if shrinking { try flushAll() }
        header.size = newSize
        format.header.size = newSize
        format.refcounts.invalidate()
    }

    // MARK: Growing

    /// The zero-write part of qcow2_co_truncate: zero flags from the first subcluster boundary on (the last,
    /// partial cluster included), explicit zeroes for the unaligned head.
    private func zeroGrownArea(from oldLength: UInt64, to newSize: UInt64, backing: GuestReader) throws {
        let zeroStart = try oldLength.alignedUp(subclusterSize)
        let savedSize = format.header.size
        // The zero write covers the new area, which the image must already span.
        format.header.size = newSize
        defer { format.header.size = savedSize }
        if newSize > zeroStart {
            // The zero flag needs version 3.
            if header.version < 3 {
                throw InstarError(.unsupported, "Failed to zero out new clusters: Operation not supported",
                                  errno: ENOTSUP)
            }
            do {
                try writeZeroes(at: zeroStart, length: newSize - zeroStart, mayUnmap: false, backing: backing)
            } catch let e as InstarError {
                throw e.prepending("Failed to zero out new clusters: ")
            }
        }
        if zeroStart > oldLength {
            let len = min(zeroStart, newSize) - oldLength
            let zeros = [UInt8](repeating: 0, count: Int(len))
            do {
                try zeros.withUnsafeBytes { try write($0, at: oldLength, backing: backing) }
            } catch let e as InstarError {
                throw e.prepending("Failed to zero out the new area: ")
            }
        }
    }

    /// qcow2_grow_l1_table with an exact size: the new table takes exactly `entries` * 8 bytes (the file may
    /// end inside its last cluster), the header switches to it, then the old table is freed.
    func growL1Exactly(_ entries: UInt64) throws {
        let old = UInt64(mapper.l1.count)
        if entries <= old { return }
        guard entries <= UInt64(Int32.max) / 8, entries * 8 <= Qcow2.maxL1Bytes else {
            throw InstarError(.range, strerrorString(EFBIG), errno: EFBIG)
        }
        let bytes = entries * 8
        var table = mapper.l1
        table.append(contentsOf: [UInt64](repeating: 0, count: Int(entries - old)))
        let newOffset = try allocateClusters(bytes.divCeil(clusterSize))
        try flushRefcounts()
        try file.write(Qcow2Writer.encodeBE64(table), at: newOffset)
        try file.sync()
        // qcow2.txt: header bytes 36-39 l1_size, 40-47 l1_table_offset, written at once.
        var h = [UInt8](repeating: 0, count: 12)
        for k in 0..<4 { h[k] = UInt8(truncatingIfNeeded: entries >> UInt64(24 - 8 * k)) }
        for k in 0..<8 { h[4 + k] = UInt8(truncatingIfNeeded: newOffset >> UInt64(56 - 8 * k)) }
        try file.write(h, at: 36)
        try file.sync()
        let oldOffset = header.l1TableOffset
        header.l1TableOffset = newOffset
        header.l1Size = UInt32(entries)
        format.header.l1TableOffset = newOffset
        format.header.l1Size = UInt32(entries)
        mapper.l1 = table
        if old > 0 { try freeRange(oldOffset, old * 8) }
    }

    /// preallocate_co: every cluster of [start, end) that a write could not use in place gets a new host cluster
    /// (L2 table first, then a contiguous run of clusters per table), with qemu's copy-on-write of the parts of
    /// its first and last cluster outside the range (guest data, backing data or zeroes, encrypted as written),
    /// and the file grows to cover the host offset of `end`. The subcluster bitmaps stay as they were.
    func preallocate(from start: UInt64, to end: UInt64, mode: ResizePreallocation, backing: GuestReader?) throws {
        let tableShift = clusterBits + UInt64(header.l2Bits)
        // qemu's cluster_needs_new_alloc, negated: a standard cluster this image owns alone.
        func keeps(_ entry: UInt64) -> Bool { hasHostCluster(entry) && entry & Qcow2.l2Copied != 0 }
        var pos = start.alignedDown(clusterSize)
        var lastEnd: UInt64 = 0
        while pos < end {
            let l1Index = pos >> tableShift
            let stop = min(try end.alignedUp(clusterSize), (l1Index + 1) << tableShift)
            let (_, l2) = try writableL2(l1Index: l1Index)
            while pos < stop {
                let first = (pos >> clusterBits) & (l2Entries - 1)
                let (entry, _) = entryPair(l2.table, first)
                if keeps(entry) {
                    lastEnd = (entry & Qcow2.l2OffsetMask) + min(end, pos + clusterSize) - pos
                    pos += clusterSize
                    continue
                }
                // A run of clusters needing new ones gets one contiguous allocation.
                var n: UInt64 = 1
                while pos + n * clusterSize < stop {
                    let (e, _) = entryPair(l2.table, first + n)
                    if keeps(e) { break }
                    n += 1
                }
                // With an external data file the clusters live at their guest offsets and have no refcounts.
                let host = hasDataFile ? pos : try allocateClusters(n)
                try copyOnWrite(l2: l2.table, first: first, clusters: n, guest: pos, from: max(start, pos),
                                to: min(end, pos + n * clusterSize), host: host, backing: backing)
                if !hasDataFile { try setL2DependsOnRefcount() }
                for k in 0..<n {
                    let (old, bitmap) = entryPair(l2.table, first + k)
                    setEntryPair(l2, first + k, (host + k * clusterSize) | Qcow2.l2Copied, bitmap)
                    l2DependsOnFlush = true
                    if old != 0 && !hasDataFile { try freeEntry(old) }
                }
                lastEnd = host + min(end, pos + n * clusterSize) - pos
                pos += n * clusterSize
            }
        }
        let m: HostFileCreate.Preallocation = mode == .full ? .full : mode == .falloc ? .falloc : .off
        let target = hasDataFile ? format.dataFile : file
        if lastEnd > (try target.size()) { try HostFileCreate.grow(target, to: lastEnd, preallocation: m) }
    }

    /// qemu's perform_cow for a preallocation of guest [from, to) into new host clusters at `host` (the run of
    /// `clusters` clusters starting at guest `guest`): the head of the first cluster before `from` and the tail of
    /// the last one after `to` are read as the guest sees them now and written to the new clusters. With extended
    /// L2 entries the regions stop at the subclusters a write would touch (calculate_l2_meta).
    private func copyOnWrite(l2 table: [UInt64], first: UInt64, clusters n: UInt64, guest: UInt64, from: UInt64,
                             to: UInt64, host: UInt64, backing: GuestReader?) throws {
        let subBits = UInt64(subclusterSize.trailingZeroBitCount)
        let perCluster = clusterSize >> subBits
        // Head: [headFrom, from) within the first cluster.
        let (e0, b0) = entryPair(table, first)
        let startIn = from - guest
        var headFrom: UInt64 = 0
        if extended && e0 & Qcow2.l2Compressed == 0 {
            let sc = startIn >> subBits
            if hasHostCluster(e0) {
                let alloc = UInt32(truncatingIfNeeded: b0)
                headFrom = min(sc, UInt64(alloc.trailingZeroBitCount)) << subBits
            } else {
                headFrom = sc << subBits
            }
        }
        // Tail: [to, tailTo) within the last cluster.
        let lastGuest = guest + (n - 1) * clusterSize
        let (e1, b1) = entryPair(table, first + n - 1)
        let endIn = to - lastGuest
        var tailTo = try endIn.alignedUp(clusterSize)
        if extended && e1 & Qcow2.l2Compressed == 0 && endIn > 0 {
            let sc = (endIn - 1) >> subBits
            if hasHostCluster(e1) {
                let alloc = UInt32(truncatingIfNeeded: b1)
                tailTo -= min(perCluster - sc - 1, UInt64(alloc.leadingZeroBitCount)) << subBits
            } else {
                tailTo = try endIn.alignedUp(subclusterSize)
            }
        }
        var regions: [(guest: UInt64, host: UInt64, bytes: [UInt8])] = []
        if startIn > headFrom {
            var b = [UInt8](repeating: 0, count: Int(startIn - headFrom))
            try b.withUnsafeMutableBytes { try format.read(into: $0, at: guest + headFrom, backing: backing) }
            regions.append((guest + headFrom, host + headFrom, b))
        }
        if tailTo > endIn {
            var b = [UInt8](repeating: 0, count: Int(tailTo - endIn))
            try b.withUnsafeMutableBytes { try format.read(into: $0, at: to, backing: backing) }
            regions.append((to, host + (n - 1) * clusterSize + endIn, b))
        }
        for r in regions {
            try r.bytes.withUnsafeBytes { try writeGuestData($0, host: r.host, guest: r.guest) }
        }
    }

    /// The falloc/full branch of qcow2_co_truncate for an image without an external data file: one refcount area
    /// at the end of the used clusters, sized exactly for the new data clusters and the L2 tables they may need
    /// (so that the refcount table always moves there), the data clusters right after it, the file grown over
    /// them with the requested preallocation, and then L2 entries for all of them. A partial first cluster is
    /// copied into its new host cluster (the copy-on-write of qcow2_alloc_cluster_link_l2) and its old one freed.
    /// Over a backing file longer than the old size the grown file's zeroes stand for the zero
    /// write, so with extended L2 entries every new subcluster is marked allocated; returns whether it did so.
    private func preallocateFile(from oldLength: UInt64, to newSize: UInt64, mode: ResizePreallocation,
                                 backing: GuestReader?) throws -> Bool {
        let hideBacking = (backing?.virtualSize ?? 0) > oldLength
        let fileLength = try file.size()
        let oldFileClusters: UInt64
        if let last = try lastUsedCluster(below: fileLength) {
            oldFileClusters = last + 1
        } else {
            oldFileClusters = fileLength.divCeil(clusterSize)
        }
        let firstGuest = oldLength.alignedDown(clusterSize)
        let dataClusters = (try newSize.alignedUp(clusterSize) - firstGuest) >> clusterBits
        // An overestimate: the L2 tables may land anywhere, the area only has to be able to count them.
        let l2Tables = dataClusters.divCeil(l2Entries) + 1
        let start: UInt64
        do {
            start = try refcountArea(startCluster: oldFileClusters, additional: try dataClusters.adding(l2Tables),
                                     exact: true)
        } catch let e as InstarError {
            throw e.prepending("Failed to resize refcount structures: ")
        }
        let got = try allocateAt(start << clusterBits, maxClusters: dataClusters)
        guard got == dataClusters else {
            throw InstarError(.io, "Failed to allocate data clusters: \(strerrorString(EIO))", errno: EIO)
        }
        let hostStart = start << clusterBits
        let newFileSize = try (start + dataClusters).multiplied(by: clusterSize)
        do {
            // file-posix refuses to preallocate while shrinking the file.
            guard newFileSize >= fileLength else {
                throw InstarError(.unsupported, "Cannot use preallocation for shrinking files", errno: ENOTSUP)
            }
            try HostFileCreate.grow(file, to: newFileSize, preallocation: mode == .full ? .full : .falloc)
        } catch let e as InstarError {
            try freeRange(hostStart, dataClusters << clusterBits)
            throw e.prepending("Failed to resize underlying file: ")
        }
        // The head of a partial first cluster, read before its mapping changes.
        let headBytes = oldLength - firstGuest
        if headBytes > 0 && dataClusters > 0 {
            var head = [UInt8](repeating: 0, count: Int(headBytes))
            try head.withUnsafeMutableBytes { try format.read(into: $0, at: firstGuest, backing: backing) }
            // No external data file on this path: the guest data file is the image file.
            try head.withUnsafeBytes { try writeGuestData($0, host: hostStart, guest: firstGuest) }
            try syncData()
        }
        let tableShift = clusterBits + UInt64(header.l2Bits)
        var guest = firstGuest
        var host = hostStart
        var left = dataClusters
        while left > 0 {
            let first = (guest >> clusterBits) & (l2Entries - 1)
            let n = min(left, l2Entries - first)
            let (_, l2) = try writableL2(l1Index: guest >> tableShift)
            try setL2DependsOnRefcount()
            // The grown file's zeroes are stable before an L2 entry names them.
            l2DependsOnFlush = true
            for k in 0..<n {
                let (old, bitmap) = entryPair(l2.table, first + k)
                // All subclusters allocated, none zero (qcow2_alloc_cluster_link_l2 for a write of whole clusters).
                let newBitmap = hideBacking && extended ? UInt64(0xffff_ffff) : bitmap
                setEntryPair(l2, first + k, (host + k * clusterSize) | Qcow2.l2Copied, newBitmap)
                if old != 0 { try freeEntry(old) }
            }
            guest += n * clusterSize
            host += n * clusterSize
            left -= n
        }
        return hideBacking
    }

    // MARK: Shrinking

    /// The shrink half of qcow2_co_truncate. Every cluster it frees is discarded (QCOW2_DISCARD_ALWAYS) in the
    /// same batches as qemu's, because the batches decide which file system blocks a punch frees: the data
    /// clusters past the end in one batch of merged ranges, each dropped L2 table on its own, the dropped
    /// refcount blocks in one last batch.
    private func shrink(from oldLength: UInt64, to newSize: UInt64, newL1: UInt64) throws {
        let start = try newSize.alignedUp(clusterSize)
        if start < oldLength {
            do {
                try dropClusters(from: start, to: oldLength)
            } catch let e as InstarError {
                pendingDiscards = []
                throw e.prepending("Failed to discard cropped clusters: ")
            }
            processDiscards()
        }
        do {
            try shrinkL1(newL1)
        } catch let e as InstarError {
            throw e.prepending("Failed to reduce the number of L2 tables: ")
        }
        do {
            try dropUnusedRefBlocks()
        } catch let e as InstarError {
            pendingDiscards = []
            throw e.prepending("Failed to discard unused refblocks: ")
        }
        processDiscards()
        let fileSize = try file.size()
        guard let last = try lastUsedCluster(below: fileSize) else {
            throw InstarError(.io, "Failed to find the last cluster: \(strerrorString(EIO))", errno: EIO)
        }
        let end = (last + 1) << clusterBits
        // A failure here leaves only unused space behind; qemu merely warns.
        if end < fileSize { try? file.truncate(to: end) }
    }

    /// qcow2_cluster_discard with full_discard: the entries of [start, end) become unallocated and the host
    /// clusters left unreferenced are queued for discarding. As in qemu, every L1 entry of the range gets a
    /// writable L2 table first (allocated, or copied when shared).
    private func dropClusters(from start: UInt64, to end: UInt64) throws {
        let tableShift = clusterBits + UInt64(header.l2Bits)
        var pos = start
        while pos < end {
            let l1Index = pos >> tableShift
            let stop = min(end, (l1Index + 1) << tableShift)
            let (_, l2) = try writableL2(l1Index: l1Index)
            while pos < stop {
                let index = (pos >> clusterBits) & (l2Entries - 1)
                let (entry, bitmap) = entryPair(l2.table, index)
                pos += clusterSize
                if entry == 0 && bitmap == 0 { continue }
                setEntryPair(l2, index, 0, 0)
                try freeGuestEntry(entry, discard: true)
            }
        }
    }

    /// qcow2_shrink_l1_table: the entries past `entries` are zeroed on disk (the table keeps its size), then
    /// the L2 tables they named are freed one by one, each discarded at once. A freed table leaves the cache
    /// unwritten, as qemu drops a table whose cluster loses its last reference.
    private func shrinkL1(_ entries: UInt64) throws {
        let size = UInt64(mapper.l1.count)
        if entries >= size { return }
        let zeroes = [UInt8](repeating: 0, count: Int((size - entries) * 8))
        try file.write(zeroes, at: header.l1TableOffset + entries * 8)
        try file.sync()
        var i = size
        while i > entries {
            i -= 1
            let off = mapper.l1[Int(i)] & Qcow2.l1OffsetMask
            mapper.l1[Int(i)] = 0
            if off == 0 { continue }
            try freeRange(off, clusterSize, discard: true)
            if try refcount(ofCluster: off >> clusterBits) == 0 { l2Cache.remove(at: off) }
            processDiscards()
        }
    }

    /// qcow2_shrink_reftable: refcount blocks that count nothing (besides their own cluster) leave the table,
    /// which is written whole; each one's own reference, kept in the block that covers it, drops to zero
    /// (qcow2_discard_refcount_block) and its cluster is queued for discarding.
    private func dropUnusedRefBlocks() throws {
        var table = reftable
        for i in 0..<reftable.count {
            let off = reftable[i] & Qcow2.reftableOffsetMask
            if off == 0 { table[i] = 0; continue }
            var block = try refBlock(at: off).table
            let own = off >> clusterBits
            if own >> refBlockBits == UInt64(i) {
                Qcow2Writer.setEntry(&block, index: own & refIndexMask, order: refOrder, value: 0)
            }
            if block.allSatisfy({ $0 == 0 }) { table[i] = 0 }
        }
        try file.write(Qcow2Writer.encodeBE64(table), at: header.refcountTableOffset)
        try file.sync()
        var failure: InstarError?
        for i in 0..<reftable.count where reftable[i] != 0 && table[i] == 0 {
            let off = reftable[i] & Qcow2.reftableOffsetMask
            if failure == nil {
                do { try releaseRefBlock(at: off) } catch let e as InstarError { failure = e }
            }
            reftable[i] = 0
        }
        format.refcounts.invalidate()
        if let failure { throw failure }
    }

    /// qcow2_discard_refcount_block for the refcount block at `off`, already out of the table.
    private func releaseRefBlock(at off: UInt64) throws {
        let cluster = off >> clusterBits
        let t = cluster >> refBlockBits
        guard t < UInt64(reftable.count), reftable[Int(t)] & Qcow2.reftableOffsetMask != 0 else {
            throw InstarError(.io, "Refblock at \(hex(off)) is not covered by the refcount structures", errno: EIO)
        }
        let covering = reftable[Int(t)] & Qcow2.reftableOffsetMask
        let e = try refBlock(at: covering)
        let index = cluster & refIndexMask
        let count = Qcow2RefcountReader.entry(e.table, index: index, order: refOrder)
        guard count == 1 else {
            throw InstarError(.invalid, strerrorString(EINVAL), errno: EINVAL)
        }
        Qcow2Writer.setEntry(&e.table, index: index, order: refOrder, value: 0)
        rbCache.markDirty(e)
        freeHint = min(freeHint, cluster)
        rbCache.remove(at: off)
        queueDiscard(off, clusterSize)
    }

    /// qcow2_get_last_cluster: the last cluster below `size` bytes with a nonzero refcount.
    private func lastUsedCluster(below size: UInt64) throws -> UInt64? {
        var i = size.divCeil(clusterSize)
        while i > 0 {
            i -= 1
            if try refcount(ofCluster: i) > 0 { return i }
        }
        return nil
    }
}
