import Glibc

/// `amend -o refcount_bits=N` (qemu's qcow2_change_refcount_order): every refcount of the old structure is
/// walked and copied into refcount blocks of the new width. A first series of walks allocates the new blocks
/// and the new refcount table through the old structure (so the new structure counts itself), repeating until a
/// walk allocates nothing more; a last walk fills the new blocks and writes them. Then the header switches to
/// the new table and the old blocks and table are freed through the new structure.
extension Qcow2Writer {
    private enum RefcountWalkPass { case allocate, write }

    /// The new structure being built: its refcount table, and the block being filled.
    private struct NewRefcounts {
        let order: UInt64
        let blockEntries: UInt64
        var table: [UInt64] = []
        var block: [UInt8]
        var allocated = false
    }

    /// Replaces the refcount structure by one whose entries are 2^`newOrder` bits wide. `status` receives
    /// qemu's (offset, total work) pairs for the amend progress.
    func changeRefcountOrder(_ newOrder: UInt64, status: (Int64, Int64) throws -> Void) throws {
        guard newOrder <= 6 else { throw InstarError(.invalid, "Invalid refcount order \(newOrder)", errno: EINVAL) }
        try flushAll()
        var new = NewRefcounts(order: newOrder, blockEntries: (clusterSize * 8) >> newOrder,
                               block: [UInt8](repeating: 0, count: Int(clusterSize)))
        var tableOffset: UInt64 = 0
        var tableClusters: UInt64 = 0
        do {
            var walk: Int64 = 0
            repeat {
                new.allocated = false
                let totalWalks = max(walk + 2, 3)
                try walkRefcounts(.allocate, &new, walkIndex: walk, totalWalks: totalWalks, status: status)
                walk += 1
                if new.allocated {
                    if tableOffset != 0 { try releaseUnreferenced(tableOffset, clusters: tableClusters) }
                    tableClusters = (UInt64(new.table.count) * 8).divCeil(clusterSize)
                    tableOffset = try allocateClusters(tableClusters)
                }
            } while new.allocated
            try walkRefcounts(.write, &new, walkIndex: walk, totalWalks: walk + 1, status: status)

            var bytes = Qcow2Writer.encodeBE64(new.table)
            bytes.append(contentsOf: [UInt8](repeating: 0, count: Int(tableClusters * clusterSize) - bytes.count))
            try file.write(bytes, at: tableOffset)
            // The old structure counts everything new; it reaches the disk before the header names the new one.
            try flushRefcounts()
            try file.sync()
        } catch {
            // As qemu: what was allocated for the new structure is given back through the old one.
            try? flushAll()
            for off in new.table where off != 0 { try? releaseUnreferenced(off, clusters: 1) }
            if tableOffset != 0 { try? releaseUnreferenced(tableOffset, clusters: tableClusters) }
            try? flushRefcounts()
            throw error
        }

        let oldTable = reftable
        let oldTableOffset = header.refcountTableOffset
        let oldTableClusters = UInt64(header.refcountTableClusters)
        header.refcountOrder = UInt32(newOrder)
        header.refcountTableOffset = tableOffset
        header.refcountTableClusters = UInt32(tableClusters)
        try rewriteHeader(what: "qcow2")

        reftable = new.table + [UInt64](repeating: 0, count: Int(tableClusters * clusterSize / 8) - new.table.count)
        refOrder = newOrder
        refBlockBits = clusterBits + 3 - newOrder
        refIndexMask = (1 << refBlockBits) - 1
        refMax = newOrder == 6 ? UInt64.max : (UInt64(1) << (UInt64(1) << newOrder)) - 1
        // Cached blocks are in the old width; all are clean after the flush above.
        for key in Array(rbCache.entries.keys) { rbCache.remove(at: key) }
        format.refcounts.invalidate()

        for entry in oldTable {
            let off = entry & Qcow2.reftableOffsetMask
            if off != 0 { try releaseUnreferenced(off, clusters: 1) }
        }
        try releaseUnreferenced(oldTableOffset, clusters: oldTableClusters)
        try flushRefcounts()
    }

    /// Drops the reference to `clusters` clusters from `offset` that no L2 table names (refcount structures),
    /// so they may be reused at once (qemu lowers free_cluster_index when a refcount reaches zero).
    private func releaseUnreferenced(_ offset: UInt64, clusters: UInt64) throws {
        let first = offset >> clusterBits
        for c in first..<(first + clusters) {
            try changeRefcount(ofCluster: c, by: -1)
            if pendingFree.remove(c) != nil { freeHint = min(freeHint, c) }
        }
    }

    /// walk_over_reftable: every entry of the current refcount structure, in order, is copied into the new
    /// block being filled; each completed new block is handed to `pass`.
    private func walkRefcounts(_ pass: RefcountWalkPass, _ new: inout NewRefcounts, walkIndex: Int64,
                               totalWalks: Int64, status: (Int64, Int64) throws -> Void) throws {
        let newBits = UInt64(1) << new.order
        let oldEntries = UInt64(1) << refBlockBits
        var newIndex: UInt64 = 0
        var filled: UInt64 = 0
        var empty = true
        if pass == .write { new.block = [UInt8](repeating: 0, count: Int(clusterSize)) }

        func finishBlock() throws {
            switch pass {
            case .allocate:
                if !empty && newIndex >= UInt64(new.table.count) {
                    let perCluster = clusterSize / 8
                    let size = (newIndex + 1).divCeil(perCluster) * perCluster
                    guard size * 8 <= Qcow2.maxRefcountTableBytes else {
                        throw InstarError(.unsupported, "This operation would make the refcount table grow beyond the "
                            + "maximum size supported by QEMU, aborting", errno: ENOTSUP)
                    }
                    new.table += [UInt64](repeating: 0, count: Int(size) - new.table.count)
                }
                if !empty && new.table[Int(newIndex)] == 0 {
                    new.table[Int(newIndex)] = try allocateClusters(1)
                    new.allocated = true
                }
            case .write:
                if newIndex < UInt64(new.table.count) && new.table[Int(newIndex)] != 0 {
                    try file.write(new.block, at: new.table[Int(newIndex)])
                }
                new.block = [UInt8](repeating: 0, count: Int(clusterSize))
            }
            newIndex += 1
            filled = 0
            empty = true
        }

        var t = 0
        // The table may grow while the first walk allocates; its current length is read every time.
        while t < reftable.count {
            try status(walkIndex * Int64(reftable.count) + Int64(t), totalWalks * Int64(reftable.count))
            let off = reftable[t] & Qcow2.reftableOffsetMask
            if off != 0 {
                if off & (clusterSize - 1) != 0 {
                    throw InstarError(.corrupt, "Image is corrupt (unaligned refblock offset)", errno: EIO)
                }
                let block = try refBlock(at: off).table
                for i in 0..<oldEntries {
                    if filled >= new.blockEntries { try finishBlock() }
                    let rc = Qcow2RefcountReader.entry(block, index: i, order: refOrder)
                    if newBits < 64 && rc >> newBits != 0 {
                        let offset = ((UInt64(t) << refBlockBits) + i) << clusterBits
                        throw InstarError(.invalid, "Cannot decrease refcount entry width to \(newBits) bits: Cluster "
                            + "at offset \(hex(offset)) has a refcount of \(rc)", errno: EINVAL)
                    }
                    if pass == .write && rc != 0 {
                        Qcow2Writer.setEntry(&new.block, index: filled, order: new.order, value: rc)
                    }
                    filled += 1
                    empty = empty && rc == 0
                }
            } else {
                // No block: all zero; whole new blocks are skipped at once.
                var left = oldEntries
                while left > 0 {
                    if filled >= new.blockEntries { try finishBlock() }
                    let take = min(left, new.blockEntries - filled)
                    filled += take
                    left -= take
                }
            }
            try trimCaches()
            t += 1
        }
        if filled > 0 { try finishBlock() }
        try status((walkIndex + 1) * Int64(reftable.count), totalWalks * Int64(reftable.count))
    }
}
