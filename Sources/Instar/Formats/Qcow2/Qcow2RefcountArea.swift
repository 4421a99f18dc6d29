import Glibc

/// The layout of qemu's qcow2_refcount_area: new refcount structures that cover themselves, written past the
/// end of everything in use. Refcount blocks missing from the table (from the one covering the area on) come
/// first, then the new refcount table; every cluster of the new structures gets refcount 1. Both the create-time
/// builder and the writer of an open image lay the area out with this one computation.
struct Qcow2RefcountArea {
    /// Refcount blocks the area must provide: enough for the clusters before it, itself and the additional
    /// clusters the caller will place after it.
    let blockCount: UInt64
    /// Entries of the new refcount table (whole clusters of them) and the clusters it takes.
    let tableEntries: UInt64
    let tableClusters: UInt64
    /// First cluster of the area, and the refcount table index whose block covers it.
    let startCluster: UInt64
    let areaIndex: UInt64
    let refBlockBits: UInt64

    /// A refcount block of the area: an existing one, or a new one at its place in the area, and the entries of
    /// it [setFrom, setTo) that count the new structures.
    struct Block {
        var index: UInt64
        var offset: UInt64
        var isNew: Bool
        var setFrom: UInt64
        var setTo: UInt64
    }

    /// Sizes the area at `startCluster` for `additional` clusters beyond it. Without `exact`, the table gets 50 %
    /// spare entries (and the size computation its generous margin) so that it need not grow again soon.
    init(startCluster: UInt64, additional: UInt64, exact: Bool, clusterBits: UInt64, refcountOrder: UInt64) throws {
        let clusterSize = UInt64(1) << clusterBits
        let clusters = try startCluster.adding(additional)
        let total = Qcow2Create.refcountMetadataSize(clusters: clusters, clusterSize: clusterSize,
                                                     refcountOrder: refcountOrder, generous: !exact).blocks
        let perTableCluster = clusterSize / 8
        // The table must stay within what an open accepts (QCOW_MAX_REFTABLE_SIZE).
        let maxEntries = Qcow2.maxRefcountTableBytes / 8
        guard total <= maxEntries else { throw InstarError(.range, strerrorString(EFBIG), errno: EFBIG) }
        let entries = try (exact ? total : total + total.divCeil(2)).alignedUp(perTableCluster)
        guard entries <= maxEntries else { throw InstarError(.range, strerrorString(EFBIG), errno: EFBIG) }
        blockCount = total
        tableEntries = max(entries, perTableCluster)
        tableClusters = tableEntries / perTableCluster
        self.startCluster = startCluster
        refBlockBits = clusterBits + 3 - refcountOrder
        areaIndex = startCluster >> refBlockBits
    }

    /// Fills `table` (already sized `tableEntries` and holding the old entries) with the new blocks and returns
    /// where the table goes (its first cluster), the cluster after the area, and the blocks to update in order.
    func place(in table: inout [UInt64], clusterBits: UInt64) -> (tableCluster: UInt64, endCluster: UInt64,
                                                                   blocks: [Block]) {
        var missing: UInt64 = 0
        var i = areaIndex
        while i < blockCount {
            if i < UInt64(table.count), table[Int(i)] & Qcow2.reftableOffsetMask == 0 { missing += 1 }
            i += 1
        }
        let tableCluster = startCluster + missing
        let end = tableCluster + tableClusters
        let perBlock = UInt64(1) << refBlockBits
        var next = startCluster
        var blocks: [Block] = []
        i = areaIndex
        while i < blockCount && i < UInt64(table.count) {
            var offset = table[Int(i)] & Qcow2.reftableOffsetMask
            let isNew = offset == 0
            if isNew {
                offset = next << clusterBits
                table[Int(i)] = offset
                next += 1
            }
            let firstCovered = i << refBlockBits
            var from: UInt64 = 0
            var to: UInt64 = 0
            if firstCovered < end {
                from = startCluster > firstCovered ? startCluster - firstCovered : 0
                to = min(end - firstCovered, perBlock)
            }
            blocks.append(Block(index: i, offset: offset, isNew: isNew, setFrom: from, setTo: max(from, to)))
            i += 1
        }
        return (tableCluster, end, blocks)
    }
}
