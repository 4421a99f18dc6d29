import Glibc

/// qemu's qcow2_make_empty: a version 3 image without snapshots, bitmaps, LUKS or data file is rebuilt as the
/// smallest image it can be (make_completely_empty: header, refcount table, one refcount block, the zeroed L1
/// table, the file cut after it); any other image has every cluster discarded so the backing file shows through.
extension Qcow2Format: ImageEmptiable {
    public func makeEmpty() throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        let cs = header.clusterSize
        let l1Clusters = (UInt64(header.l1Size) * 8).divCeil(cs)
        let refBlockEntries = (cs * 8) >> UInt64(header.refcountOrder)
        let hasBitmaps = (extensions.bitmaps?.count ?? 0) != 0 || !liveBitmaps.isEmpty || !addedBitmaps.isEmpty
        if header.version >= 3 && header.nbSnapshots == 0 && !hasBitmaps && 3 + l1Clusters <= refBlockEntries
            && header.cryptMethod != Qcow2.cryptLUKS && !header.hasDataFile {
            try makeCompletelyEmpty(l1Clusters: l1Clusters)
        } else {
            try writeSide().discardEverything()
            try writer?.flush()
        }
    }

    /// make_completely_empty. The dirty bit goes on first: in between, the refcounts describe nothing, and an
    /// interrupted run leaves an image that is repaired when next opened.
    private func makeCompletelyEmpty(l1Clusters: UInt64) throws {
        // qcow2_cache_empty: the caches are written back and dropped.
        if let w = writer {
            writer = nil
            try w.close()
        }
        forgetDecompressed()
        var h = header
        let cs = h.clusterSize
        // qcow2_mark_dirty.
        if h.incompatibleFeatures & Qcow2.incompatDirty == 0 {
            var be = (h.incompatibleFeatures | Qcow2.incompatDirty).bigEndian
            try withUnsafeBytes(of: &be) { try file.write($0, at: 72) }   // qcow2.txt: bytes 72-79
            try file.sync()
            h.incompatibleFeatures |= Qcow2.incompatDirty
            header = h
        }
        // From here on the image is consistent only once everything below is written: a failed step leaves
        // the dirty bit for the next read/write open to repair (qemu detaches the driver, so nothing marks the
        // image clean either).
        do {
            let l1Bytes = try l1Clusters.multiplied(by: cs)
            try file.writeZeroes(at: h.l1TableOffset, length: l1Bytes)
            try file.writeZeroes(at: cs, length: try (2 + l1Clusters).multiplied(by: cs))
            // qcow2.txt: bytes 40-47 l1_table_offset, 48-55 refcount_table_offset, 56-59 refcount_table_clusters.
            var fields = [UInt8](repeating: 0, count: 20)
            func put(_ at: Int, _ v: UInt64, _ n: Int) {
                for i in 0..<n { fields[at + i] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - i))) }
            }
            put(0, 3 * cs, 8)
            put(8, cs, 8)
            put(16, 1, 4)
            try file.write(fields, at: 40)
            try file.sync()
            h.l1TableOffset = 3 * cs
            h.refcountTableOffset = cs
            h.refcountTableClusters = 1
            header = h
            // The first refcount table entry names the refcount block in cluster 2.
            var entry = (2 * cs).bigEndian
            try withUnsafeBytes(of: &entry) { try file.write($0, at: cs) }
            try file.sync()
            // qcow2_alloc_clusters of header, table, block and L1: each cluster counted once.
            var block = [UInt8](repeating: 0, count: Int(cs))
            for c in 0..<(3 + l1Clusters) {
                Qcow2Writer.setEntry(&block, index: c, order: UInt64(h.refcountOrder), value: 1)
            }
            try file.write(block, at: 2 * cs)
            try file.sync()
        } catch {
            keepDirtyAfterFailure = true
            throw error
        }
        // qcow2_mark_clean: the header is written again whole.
        h.incompatibleFeatures &= ~Qcow2.incompatDirty
        try writeHeaderCluster(h, bitmaps: nil)
        try file.truncate(to: (3 + l1Clusters) * cs)
        mapper.l1 = [UInt64](repeating: 0, count: mapper.l1.count)
        mapper.cache.removeAll()
        refcounts = Qcow2RefcountReader(header: h, file: file)
    }
}
