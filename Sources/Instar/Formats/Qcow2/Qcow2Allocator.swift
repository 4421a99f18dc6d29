import Glibc

/// Refcount updates and cluster allocation of the writer (qemu's qcow2-refcount.c). Crash safety rests on the
/// order in which things reach the file: a refcount block is on disk before the refcount table points at it,
/// a cluster's refcount is on disk before any L2 or L1 entry points at it, and an L2 entry that dropped a
/// reference is on disk before the refcount that counted it goes down. A crash can then leak clusters but
/// never leave a reference to a cluster whose refcount is too low.
extension Qcow2Writer {
    // MARK: Refcount entries

    /// Entry `index` of a refcount block of width 2^order bits, written in place.
    static func setEntry(_ block: inout [UInt8], index: UInt64, order: UInt64, value: UInt64) {
        let width = UInt64(1) << order
        if width < 8 {
            let perByte = 8 / width
            let byte = Int(index / perByte)
            guard byte < block.count else { return }
            let shift = (index % perByte) * width
            let mask = UInt8(truncatingIfNeeded: ((1 << width) - 1) << shift)
            block[byte] = (block[byte] & ~mask) | (UInt8(truncatingIfNeeded: value << shift) & mask)
            return
        }
        let bytes = Int(width / 8)
        let start = Int(index) * bytes
        guard start >= 0, start + bytes <= block.count else { return }
        var v = value
        for i in stride(from: bytes - 1, through: 0, by: -1) {
            block[start + i] = UInt8(truncatingIfNeeded: v)
            v >>= 8
        }
    }

    /// The refcount block offset for refcount table index `t`, or nil when no block exists.
    func blockOffset(tableIndex t: UInt64) throws -> UInt64? {
        guard t < UInt64(reftable.count) else { return nil }
        let off = reftable[Int(t)] & Qcow2.reftableOffsetMask
        if off == 0 { return nil }
        if off & (clusterSize - 1) != 0 {
            throw InstarError(.corrupt, "Refblock offset \(hex(off)) unaligned (reftable index: \(hex(t)))", errno: EIO)
        }
        return off
    }

    func refBlock(at offset: UInt64) throws -> Qcow2WriteCache<[UInt8]>.Entry {
        try rbCache.entry(at: offset) { try file.readBytes(at: offset, count: Int(clusterSize)) }
    }

    /// The refcount of host cluster `cluster` as the writer sees it (cache included).
    func refcount(ofCluster cluster: UInt64) throws -> UInt64 {
        guard let off = try blockOffset(tableIndex: cluster >> refBlockBits) else { return 0 }
        let e = try refBlock(at: off)
        return Qcow2RefcountReader.entry(e.table, index: cluster & refIndexMask, order: refOrder)
    }

    /// Adds `delta` (+1 or -1) to the refcount of `cluster`, whose refcount block must exist.
    func changeRefcount(ofCluster cluster: UInt64, by delta: Int) throws {
        guard let off = try blockOffset(tableIndex: cluster >> refBlockBits) else {
            if delta < 0 {
                throw InstarError(.corrupt, "Freeing cluster \(hex(cluster << clusterBits)) with no refcount block",
                                  errno: EIO)
            }
            throw InstarError(.io, "Internal error: no refcount block for cluster \(cluster)", errno: EIO)
        }
        let e = try refBlock(at: off)
        let index = cluster & refIndexMask
        let old = Qcow2RefcountReader.entry(e.table, index: index, order: refOrder)
        let new: UInt64
        if delta > 0 {
            guard old < refMax else {
                throw InstarError(.range, "Reference count overflow on cluster \(hex(cluster << clusterBits))",
                                  errno: ERANGE)
            }
            new = old + 1
        } else {
            guard old > 0 else {
                throw InstarError(.corrupt, "Reference count underflow on cluster \(hex(cluster << clusterBits))",
                                  errno: EINVAL)
            }
            new = old - 1
        }
        Qcow2Writer.setEntry(&e.table, index: index, order: refOrder, value: new)
        rbCache.markDirty(e)
        if new == 0 {
            // qemu lowers its free-cluster index at once. The L2 entry that dropped this cluster may not be on
            // disk yet, so before the cluster is used again the L2 cache is written back (`claim`).
            pendingFree.insert(cluster)
            freeHint = min(freeHint, cluster)
        }
    }

    // MARK: Finding free clusters

    func isFree(_ cluster: UInt64) throws -> Bool {
        if cluster == 0 { return false }
        return try refcount(ofCluster: cluster) == 0
    }

    /// Makes clusters [first, first + n) safe to use: any of them freed since the last L2 write-back may still be
    /// named by an L2 table on disk, so the L2 cache is written back first.
    func claim(_ first: UInt64, _ n: UInt64) throws {
        guard !pendingFree.isEmpty else { return }
        for c in first..<(first + n) where pendingFree.contains(c) {
            try flushL2()
            return
        }
    }

    /// The first run of `n` free clusters at or after the free-cluster hint (qemu's alloc_clusters_noref).
    func findFree(_ n: UInt64) throws -> UInt64 {
        // qemu's alloc_clusters_noref: clusters still queued for discarding must not be handed out, so the queue
        // is punched first (a punch after reuse would wipe the new contents).
        if !pendingDiscards.isEmpty { processDiscards() }
        var start = freeHint
        var i = start
        while i - start < n {
            if try isFree(i) {
                i += 1
            } else {
                i += 1
                start = i
            }
            guard i < Qcow2Writer.maxHostClusters(clusterBits) else {
                throw InstarError(.unsupported, "Image file is full", errno: EFBIG)
            }
        }
        return start
    }

    /// Host offsets must fit in the 56-bit offset fields of L1/L2 entries.
    static func maxHostClusters(_ clusterBits: UInt64) -> UInt64 { (UInt64(1) << 56) >> clusterBits }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the host offset of the first
    /// (qemu's qcow2_alloc_clusters). The refcounts are changed in the cache only.
    func allocateClusters(_ n: UInt64) throws -> UInt64 {
        for _ in 0..<64 {
            let first = try findFree(n)
            // The search moves past the run whether or not it is taken, as qemu's free-cluster index does, so a
            // refcount block created for the run lands after it.
            freeHint = first + n
            var missing: UInt64?
            var t = first >> refBlockBits
            while t <= (first + n - 1) >> refBlockBits {
                if try blockOffset(tableIndex: t) == nil {
                    missing = t
                    break
                }
                t += 1
            }
            if let t = missing {
                let c = max(first, t << refBlockBits)
                try createRefBlock(forCluster: c, depth: 0)
                // qemu restarts the search at the start of the run, which is usually still free: the new block
                // then sits right after the data.
                freeHint = min(freeHint, first)
                continue
            }
            try claim(first, n)
            for c in first..<(first + n) { try changeRefcount(ofCluster: c, by: 1) }
            highestAllocated = max(highestAllocated, first + n)
            return first << clusterBits
        }
        throw InstarError(.io, "Could not allocate clusters", errno: EIO)
    }

    /// qcow2_alloc_clusters_at: takes up to `n` clusters from host offset `offset` on, as long as they are free,
    /// and returns how many it took. The free-cluster hint stays where it is. A cluster whose refcount block does
    /// not exist yet ends the run (qemu would create the block and try again).
    func allocateAt(_ offset: UInt64, maxClusters n: UInt64) throws -> UInt64 {
        let first = offset >> clusterBits
        var got: UInt64 = 0
        while got < n {
            let c = first + got
            guard c < Qcow2Writer.maxHostClusters(clusterBits), try blockOffset(tableIndex: c >> refBlockBits) != nil,
                  try isFree(c) else { break }
            got += 1
        }
        if got > 0 { try claim(first, got) }
        for c in first..<(first + got) { try changeRefcount(ofCluster: c, by: 1) }
        if got > 0 { highestAllocated = max(highestAllocated, first + got) }
        return got
    }

    /// Drops one reference to each host cluster touched by [offset, offset + length) (qcow2_free_clusters).
    /// With `discard` (a discard or unmapping zero request, whose pass-through qemu enables by default for
    /// images opened with unmap, as qemu-img convert and `qemu-io -d unmap` do), a cluster left unreferenced is
    /// queued to be punched out of the file.
    func freeRange(_ offset: UInt64, _ length: UInt64, discard: Bool = false) throws {
        if length == 0 { return }
        try setRefcountDependsOnL2()
        let first = offset >> clusterBits
        let last = (try offset.adding(length - 1)) >> clusterBits
        for c in first...last {
            try changeRefcount(ofCluster: c, by: -1)
            if discard, try refcount(ofCluster: c) == 0 { queueDiscard(c << clusterBits, clusterSize) }
        }
    }

    /// Frees whatever host storage an L2 entry references (qcow2_free_any_cluster).
    func freeEntry(_ entry: UInt64, discard: Bool = false) throws {
        if entry & Qcow2.l2Compressed != 0 {
            let d = Qcow2CompressedDescriptor(entry: entry, clusterBits: UInt32(clusterBits))
            try freeRange(d.hostOffset, d.length, discard: discard)
            return
        }
        let host = entry & Qcow2.l2OffsetMask
        if host != 0 { try freeRange(host, clusterSize, discard: discard) }
    }

    // MARK: Discard pass-through

    /// Adds a freed host range to the discard list, merging it with adjacent ones as qemu's
    /// update_refcount_discard does: one punch over a merged range can free file system blocks that separate
    /// punches of small clusters would only zero. The list keeps qemu's order (a range joins the first one it
    /// touches, in place; others it now touches fold into that one), since the order of the punches decides
    /// how the file system lays out what is left.
    func queueDiscard(_ offset: UInt64, _ length: UInt64) {
        let end = offset + length
        var target = pendingDiscards.firstIndex { d in
            max(end, d.offset + d.length) - min(offset, d.offset) <= length + d.length
        }
        if let t = target {
            let d = pendingDiscards[t]
            let newStart = min(offset, d.offset)
            pendingDiscards[t] = (newStart, max(end, d.offset + d.length) - newStart)
        } else {
            pendingDiscards.append((offset, length))
            target = pendingDiscards.count - 1
        }
        guard var t = target else { return }
        var i = 0
        while i < pendingDiscards.count {
            let d = pendingDiscards[t]
            let p = pendingDiscards[i]
            if i == t || p.offset > d.offset + d.length || d.offset > p.offset + p.length {
                i += 1
                continue
            }
            pendingDiscards[t] = (min(d.offset, p.offset), d.length + p.length)
            pendingDiscards.remove(at: i)
            if i < t { t -= 1 }
        }
    }

    /// Punches the queued ranges out of the file (qcow2_process_discards). Like qemu, a failed punch is ignored:
    /// discarding is advisory.
    func processDiscards() {
        let ranges = pendingDiscards
        pendingDiscards = []
        for d in ranges { try? file.punchHole(at: d.offset, length: d.length) }
    }

    // MARK: New refcount blocks

    /// Creates the refcount block for table index `t` (see `createRefBlock(forCluster:depth:)`).
    func createRefBlock(tableIndex t: UInt64, depth: Int) throws {
        try createRefBlock(forCluster: t << refBlockBits, depth: depth)
    }

    /// Creates the refcount block that covers cluster `c`, writes it and only then points the refcount table at
    /// it (qemu's alloc_refcount_block). The block takes the next free cluster after the caller's search, and the
    /// caller searches again afterwards, as qemu's -EAGAIN does. A table too small for the block is replaced by a
    /// larger one (`refcountArea`).
    func createRefBlock(forCluster c: UInt64, depth: Int) throws {
        guard depth < 8 else { throw InstarError(.io, "Could not allocate a refcount block", errno: EIO) }
        let t = c >> refBlockBits
        if try blockOffset(tableIndex: t) != nil { return }
        let b = try findFree(1)
        freeHint = b + 1
        try claim(b, 1)
        guard b != 0 else {
            throw InstarError(.corrupt, "Preventing invalid allocation of refcount block at offset 0", errno: EIO)
        }
        let bt = b >> refBlockBits
        var block = [UInt8](repeating: 0, count: Int(clusterSize))
        if bt == t {
            // Self-describing: the block counts its own cluster.
            Qcow2Writer.setEntry(&block, index: b & refIndexMask, order: refOrder, value: 1)
        } else if try blockOffset(tableIndex: bt) == nil {
            // Counting the new block needs a block of its own first; qemu gives up on this one and restarts.
            return try createRefBlock(forCluster: b, depth: depth + 1)
        } else {
            try changeRefcount(ofCluster: b, by: 1)
        }
        highestAllocated = max(highestAllocated, b + 1)
        let offset = b << clusterBits
        // The refcount of the new block and the block itself reach the disk before the table entry does.
        try flushRefcounts()
        try file.write(block, at: offset)
        try file.sync()
        _ = rbCache.insert(block, at: offset)
        if t < UInt64(reftable.count) {
            try writeReftableEntry(Int(t), value: offset)
            return
        }
        // The new table and the blocks describing it start at the first refcount block boundary past both the
        // cluster being counted and the new block.
        let perBlock = UInt64(1) << refBlockBits
        let blocksUsed = (max(c, b) + 1).divCeil(perBlock)
        try refcountArea(startCluster: try blocksUsed.multiplied(by: perBlock), newIndex: t, newOffset: offset)
    }

    private func writeReftableEntry(_ t: Int, value: UInt64) throws {
        guard t < reftable.count else { return }
        reftable[t] = value
        var be = value.bigEndian
        try withUnsafeBytes(of: &be) { try file.write($0, at: header.refcountTableOffset + UInt64(t) * 8) }
        try file.sync()
    }

    /// qemu's qcow2_refcount_area: builds a new refcount table at `startCluster` (past the end of everything in
    /// use) together with the refcount blocks that describe the new structures and `additional` clusters after
    /// them (`Qcow2RefcountArea`), enters block `newOffset` at `newIndex`, and switches the header to the table in
    /// one write once blocks and table are on disk. The old table is freed afterwards (not discarded: qemu's
    /// pass-discard-other is off). Returns the first cluster after the new structures.
    @discardableResult
    func refcountArea(startCluster start: UInt64, additional: UInt64 = 0, exact: Bool = false,
                      newIndex: UInt64 = 0, newOffset: UInt64? = nil) throws -> UInt64 {
        let area = try Qcow2RefcountArea(startCluster: start, additional: additional, exact: exact,
                                         clusterBits: clusterBits, refcountOrder: refOrder)
        var table = [UInt64](repeating: 0, count: Int(area.tableEntries))
        for i in 0..<min(reftable.count, table.count) { table[i] = reftable[i] }
        if let o = newOffset {
            guard newIndex < area.blockCount else {
                throw InstarError(.io, "Internal error: refcount block index outside the new table", errno: EIO)
            }
            table[Int(newIndex)] = o
        }
        let placed = area.place(in: &table, clusterBits: clusterBits)
        // Clusters freed since the last L2 write-back may lie in the area; no L2 table on disk may name them
        // once they hold refcount structures.
        try claim(start, placed.endCluster - start)
        for b in placed.blocks {
            let e: Qcow2WriteCache<[UInt8]>.Entry
            if b.isNew {
                e = rbCache.insert([UInt8](repeating: 0, count: Int(clusterSize)), at: b.offset, dirty: true)
            } else {
                e = try refBlock(at: b.offset)
            }
            guard b.setFrom < b.setTo else { continue }
            for j in b.setFrom..<b.setTo {
                Qcow2Writer.setEntry(&e.table, index: j, order: refOrder, value: 1)
            }
            rbCache.markDirty(e)
        }
        try flushRefcounts()
        let tableOffset = placed.tableCluster << clusterBits
        try file.write(Qcow2Writer.encodeBE64(table), at: tableOffset)
        try file.sync()

        // qcow2.txt: header bytes 48-55 refcount_table_offset, 56-59 refcount_table_clusters, written at once.
        var h = [UInt8](repeating: 0, count: 12)
        for k in 0..<8 { h[k] = UInt8(truncatingIfNeeded: tableOffset >> UInt64(56 - 8 * k)) }
        for k in 0..<4 { h[8 + k] = UInt8(truncatingIfNeeded: area.tableClusters >> UInt64(24 - 8 * k)) }
        try file.write(h, at: 48)
        try file.sync()

        let oldOffset = header.refcountTableOffset
        let oldClusters = UInt64(header.refcountTableClusters)
        header.refcountTableOffset = tableOffset
        header.refcountTableClusters = UInt32(area.tableClusters)
        format.header.refcountTableOffset = tableOffset
        format.header.refcountTableClusters = UInt32(area.tableClusters)
        reftable = table
        highestAllocated = max(highestAllocated, placed.endCluster)
        // The header on disk no longer names the old table and nothing else points into it, so its clusters can
        // be reused at once, as qemu does.
        for c in (oldOffset >> clusterBits)..<((oldOffset >> clusterBits) + oldClusters) {
            try changeRefcount(ofCluster: c, by: -1)
            if try refcount(ofCluster: c) == 0, pendingFree.remove(c) != nil { freeHint = min(freeHint, c) }
        }
        format.refcounts.invalidate()
        return placed.endCluster
    }
}
