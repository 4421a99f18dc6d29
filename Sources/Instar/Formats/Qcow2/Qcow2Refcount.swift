import Glibc

/// Reads reference counts (qcow2.txt "Reference counts"): a refcount table of cluster-aligned refcount block
/// offsets; each block is one cluster of `refcount_bits`-wide entries (1..64 bits, big-endian; sub-byte widths
/// packed from the least significant bit of each byte, as qemu reads them).
final class Qcow2RefcountReader {
    let header: Qcow2Header
    let file: HostFile
    /// log2 of entries per refcount block.
    let blockBits: UInt64
    private var table: [UInt64]?
    private let blocks: Qcow2TableCache<[UInt8]>
    /// Told of a corruption event (an unaligned refblock offset) before the lookup throws it.
    var onCorruption: ((String) -> Void)?

    init(header: Qcow2Header, file: HostFile) {
        self.header = header
        self.file = file
        blockBits = UInt64(header.clusterBits) + 3 - UInt64(header.refcountOrder)
        blocks = Qcow2TableCache(capacity: Int(max(4, (1 << 20) / header.clusterSize)), entryBytes: Int(header.clusterSize),
                                 what: "the refcount block cache")
    }

    /// Forgets what was read, after a writer changed the refcounts.
    func invalidate() {
        table = nil
        blocks.removeAll()
    }

    /// Refcount width in bits.
    var bits: UInt64 { 1 << UInt64(header.refcountOrder) }

    /// The refcount table (bounded to 8 MiB by header validation), read on first use.
    func refcountTable() throws -> [UInt64] {
        if let t = table { return t }
        let count = Int(header.refcountTableClusters) * Int(header.clusterSize / 8)
        let bytes = try file.readMetadata(at: header.refcountTableOffset, count: count * 8, what: "the refcount table")
        let t = Qcow2Mapper.decodeBE64(bytes, count: count)
        table = t
        return t
    }

    /// The refcount of host cluster `cluster` (0 where no refcount block covers it).
    func refcount(ofCluster cluster: UInt64) throws -> UInt64 {
        let t = try refcountTable()
        let tableIndex = cluster >> blockBits
        guard tableIndex < UInt64(t.count) else { return 0 }
        let blockOffset = t[Int(tableIndex)] & Qcow2.reftableOffsetMask
        if blockOffset == 0 { return 0 }
        if blockOffset & (header.clusterSize - 1) != 0 {
            let what = "Refblock offset \(hex(blockOffset)) unaligned (reftable index: \(hex(tableIndex)))"
            onCorruption?(what)
            throw InstarError(.corrupt, what, errno: EIO)
        }
        let block = try blocks.table(at: blockOffset) { try file.readBytes(at: blockOffset, count: Int(header.clusterSize)) }
        let index = cluster & ((1 << blockBits) - 1)
        return Qcow2RefcountReader.entry(block, index: index, order: UInt64(header.refcountOrder))
    }

    /// Entry `index` of a refcount block of width 2^order bits.
    static func entry(_ block: [UInt8], index: UInt64, order: UInt64) -> UInt64 {
        let width = UInt64(1) << order
        if width < 8 {
            let perByte = 8 / width
            let byte = Int(index / perByte)
            guard byte < block.count else { return 0 }
            let shift = (index % perByte) * width
            return (UInt64(block[byte]) >> shift) & ((1 << width) - 1)
        }
        let bytes = Int(width / 8)
        let start = Int(index) * bytes
        guard start >= 0, start + bytes <= block.count else { return 0 }
        var v: UInt64 = 0
        for i in 0..<bytes { v = v << 8 | UInt64(block[start + i]) }
        return v
    }

    /// qemu's qcow2_detect_metadata_preallocation: more clusters have a refcount than the file has allocated
    /// (with a margin), so L2 entries point at clusters that were never written.
    func looksMetadataPreallocated() throws -> Bool {
        let fileLength = try file.size()
        // A node that cannot report its allocation (rbd, nbd) counts as not preallocated, as qemu takes the error.
        guard let allocated = try? file.allocatedSize() else { return false }
        let realClusters = allocated / header.clusterSize
        let threshold = max(realClusters * 10 / 9, realClusters + 2)
        let endCluster = fileLength.divCeil(header.clusterSize)
        var used: UInt64 = 0
        var i: UInt64 = 0
        let t = try refcountTable()
        while i < endCluster && used <= threshold {
            // Clusters no refcount block covers have refcount 0: skip them a block at a time, so a file made
            // huge by one far write (a hostile refcount table entry) is not walked cluster by cluster.
            let tableIndex = i >> blockBits
            guard tableIndex < UInt64(t.count) else { break }
            if t[Int(tableIndex)] & Qcow2.reftableOffsetMask == 0 {
                i = (tableIndex + 1) << blockBits   // tableIndex < 2^20 (8 MiB table), blockBits <= 24
                continue
            }
            if try refcount(ofCluster: i) != 0 { used += 1 }
            i += 1
        }
        return used > threshold
    }
}
