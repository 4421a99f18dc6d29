import Glibc

/// Guest-to-host mapping through the L1 and L2 tables (qcow2.txt "Cluster mapping"), with qemu's cluster and
/// subcluster types (block/qcow2.h QCow2SubclusterType) and its run-length rules (qcow2_get_host_offset).

/// A small least-recently-used cache of metadata tables keyed by their host offset. Each new entry while the
/// cache grows reserves `entryBytes` of the call's memory budget (a full cache reuses the room of its victim).
final class Qcow2TableCache<Table> {
    private var entries: [UInt64: (table: Table, stamp: UInt64)] = [:]
    private var clock: UInt64 = 0
    let capacity: Int
    private let entryBytes: Int
    private let what: String

    init(capacity: Int, entryBytes: Int = 0, what: String = "a table cache") {
        self.capacity = max(1, capacity)
        self.entryBytes = entryBytes
        self.what = what
    }

    /// The table at `offset`, loaded with `load` on a miss (evicting the least recently used one when full).
    func table(at offset: UInt64, load: () throws -> Table) throws -> Table {
        clock &+= 1
        if let hit = entries[offset] {
            entries[offset] = (hit.table, clock)
            return hit.table
        }
        if entries.count < capacity { try CallBudget.reserve(entryBytes, what: what) }
        let t = try load()
        if entries.count >= capacity, let victim = entries.min(by: { $0.value.stamp < $1.value.stamp })?.key {
            entries.removeValue(forKey: victim)
        }
        entries[offset] = (t, clock)
        return t
    }

    func removeAll() { entries.removeAll() }
}

/// How one (sub)cluster reads.
enum Qcow2SubclusterKind: Equatable {
    /// Data at a host offset.
    case normal
    /// Reads as zeroes, no host cluster.
    case zeroPlain
    /// Reads as zeroes, a host cluster is preallocated.
    case zeroAlloc
    /// Not allocated here (backing file or zeroes).
    case unallocatedPlain
    /// Not allocated here, though the cluster has a host cluster (extended L2).
    case unallocatedAlloc
    /// Compressed: the whole cluster is one compressed stream.
    case compressed
}

/// A run of guest bytes of one kind.
struct Qcow2Extent: Equatable {
    var kind: Qcow2SubclusterKind
    /// Bytes from the queried guest offset.
    var length: UInt64
    /// Host offset of the queried guest offset for normal/zeroAlloc/unallocatedAlloc; the raw L2 entry for
    /// compressed clusters; 0 otherwise.
    var hostOffset: UInt64
}

/// The L1 table and the L2 lookup of the active image.
final class Qcow2Mapper {
    let header: Qcow2Header
    let file: HostFile
    /// The active L1 table; the writer replaces entries (and the whole table when it grows).
    var l1: [UInt64]
    let hasDataFile: Bool
    /// Set while the image is open for writing: L2 tables then come from the writer's write-back cache, so
    /// reads see entries that are not on disk yet.
    var l2Provider: ((UInt64) throws -> [UInt64])?
    /// Told of each corruption event a lookup finds, before the lookup throws it.
    var onCorruption: ((String) -> Void)?
    /// Decoded L2 tables: plain entries, or (entry, bitmap) pairs with extended L2.
    let cache: Qcow2TableCache<[UInt64]>
    private let clusterBits: UInt64
    private let clusterSize: UInt64
    private let l2Entries: UInt64
    private let subclusterBits: UInt64

    /// L2 cache budget: qemu's default is enough to map 8 GiB with 64 KiB clusters (1 MiB); we allow a few MiB.
    static let cacheBytes: UInt64 = 4 << 20

    init(header: Qcow2Header, file: HostFile, l1: [UInt64]) {
        self.header = header
        self.file = file
        self.l1 = l1
        hasDataFile = header.hasDataFile
        clusterBits = UInt64(header.clusterBits)
        clusterSize = header.clusterSize
        l2Entries = 1 << header.l2Bits
        subclusterBits = clusterBits - UInt64(header.subclustersPerCluster.trailingZeroBitCount)
        cache = Qcow2TableCache(capacity: Int(max(4, Qcow2Mapper.cacheBytes / header.clusterSize)),
                                entryBytes: Int(header.clusterSize), what: "the L2 table cache")
    }

    /// Reads the L1 table the header names (already validated: bounded and aligned).
    static func readL1(header: Qcow2Header, file: HostFile) throws -> [UInt64] {
        let count = Int(header.l1Size)
        if count == 0 { return [] }
        let bytes = try file.readMetadata(at: header.l1TableOffset, count: count * 8, what: "the L1 table")
        return decodeBE64(bytes, count: count)
    }

    /// Big-endian u64 array decoding without per-element bounds checks on untrusted indices.
    static func decodeBE64(_ bytes: [UInt8], count: Int) -> [UInt64] {
        let n = min(count, bytes.count / 8)
        var out = [UInt64](repeating: 0, count: n)
        bytes.withUnsafeBytes { src in
            out.withUnsafeMutableBufferPointer { dst in
                for i in 0..<n {
                    dst[i] = UInt64(bigEndian: src.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
                }
            }
        }
        return out
    }

    private func l2Table(at offset: UInt64) throws -> [UInt64] {
        if let provider = l2Provider { return try provider(offset) }
        return try cache.table(at: offset) {
            let bytes = try file.readBytes(at: offset, count: Int(clusterSize))
            return Qcow2Mapper.decodeBE64(bytes, count: Int(clusterSize / 8))
        }
    }

    /// qemu's qcow2_get_cluster_type folded with qcow2_get_subcluster_type; nil for an invalid entry.
    func subclusterKind(entry: UInt64, bitmap: UInt64, index sc: UInt64) -> Qcow2SubclusterKind? {
        let hostCluster = entry & Qcow2.l2OffsetMask
        if entry & Qcow2.l2Compressed != 0 { return .compressed }
        let extended = header.extendedL2
        // With an external data file, offset 0 is a real cluster, told apart by the copied flag.
        let allocatedHost = hostCluster != 0 || (hasDataFile && entry & Qcow2.l2Copied != 0)
        if !extended {
            if entry & Qcow2.l2Zero != 0 { return allocatedHost && hostCluster != 0 ? .zeroAlloc : .zeroPlain }
            return allocatedHost ? .normal : .unallocatedPlain
        }
        let allocBit = UInt64(1) << sc
        let zeroBit = UInt64(1) << (sc + 32)
        if allocatedHost {
            if (bitmap >> 32) & bitmap & 0xffff_ffff != 0 { return nil }
            if bitmap & zeroBit != 0 { return .zeroAlloc }
            if bitmap & allocBit != 0 { return .normal }
            return .unallocatedAlloc
        }
        if bitmap & 0xffff_ffff != 0 { return nil }
        return bitmap & zeroBit != 0 ? .zeroPlain : .unallocatedPlain
    }

    /// How many subclusters from `from` share the kind (qemu's qcow2_get_subcluster_range_type).
    private func rangeCount(kind: Qcow2SubclusterKind, bitmap: UInt64, from sc: UInt64) -> UInt64 {
        let per = header.subclustersPerCluster
        if !header.extendedL2 || kind == .compressed { return per - sc }
        let below = sc == 0 ? 0 : (UInt64(1) << sc) - 1
        let alloc = UInt32(truncatingIfNeeded: bitmap)
        let zero = UInt32(truncatingIfNeeded: bitmap >> 32)
        switch kind {
        case .normal:
            return UInt64((~(alloc | UInt32(below))).trailingZeroBitCount) - sc
        case .zeroPlain, .zeroAlloc:
            return UInt64((~(zero | UInt32(below))).trailingZeroBitCount) - sc
        default:
            let v = (alloc | zero) & ~UInt32(below)
            return UInt64(v.trailingZeroBitCount) - sc
        }
    }

    /// The kind of the guest byte at `offset` and how many bytes (at most `maxBytes`) from there share it with
    /// contiguous host offsets, never past the L2 table that maps `offset`.
    func lookup(_ offset: UInt64, maxBytes: UInt64) throws -> Qcow2Extent {
        let inCluster = offset & (clusterSize - 1)
        let l2Index = (offset >> clusterBits) & (l2Entries - 1)
        let available = (l2Entries - l2Index) << clusterBits
        let needed = min(maxBytes.addingReportingOverflow(inCluster).partialValue, available)
        let l1Index = offset >> (clusterBits + header.l2Bits)
        guard l1Index < UInt64(l1.count) else {
            return Qcow2Extent(kind: .unallocatedPlain, length: needed - inCluster, hostOffset: 0)
        }
        let l2Offset = l1[Int(l1Index)] & Qcow2.l1OffsetMask
        if l2Offset == 0 { return Qcow2Extent(kind: .unallocatedPlain, length: needed - inCluster, hostOffset: 0) }
        if l2Offset & (clusterSize - 1) != 0 {
            throw corruption("L2 table offset \(hex(l2Offset)) unaligned (L1 index: \(hex(l1Index)))")
        }
        let table = try l2Table(at: l2Offset)
        let stride = header.extendedL2 ? 2 : 1
        func entryAt(_ i: UInt64) -> (UInt64, UInt64) {
            let base = Int(i) * stride
            guard base + stride <= table.count else { return (0, 0) }
            return (table[base], stride == 2 ? table[base + 1] : 0)
        }
        let sc = inCluster >> subclusterBits
        let (entry, bitmap) = entryAt(l2Index)
        guard let kind = subclusterKind(entry: entry, bitmap: bitmap, index: sc) else {
            throw corruption("Invalid cluster entry found  (L2 offset: \(hex(l2Offset)), L2 index: \(hex(l2Index)))")
        }
        if header.version < 3 && (kind == .zeroPlain || kind == .zeroAlloc) {
            throw corruption("Zero cluster entry found in pre-v3 image (L2 offset: \(hex(l2Offset)), L2 index: \(hex(l2Index)))")
        }
        var host: UInt64 = 0
        switch kind {
        case .compressed:
            if hasDataFile {
                throw corruption("Compressed cluster entry found in image with external data file (L2 offset: \(hex(l2Offset)), L2 index: \(hex(l2Index)))")
            }
            host = entry
        case .normal, .zeroAlloc, .unallocatedAlloc:
            let hostCluster = entry & Qcow2.l2OffsetMask
            if hostCluster & (clusterSize - 1) != 0 {
                throw corruption("Cluster allocation offset \(hex(hostCluster)) unaligned (L2 offset: \(hex(l2Offset)), L2 index: \(hex(l2Index)))")
            }
            host = hostCluster + inCluster
            if hasDataFile && host != offset {
                throw corruption("External data file host cluster offset \(hex(hostCluster)) does not match guest cluster offset: \(hex(offset - inCluster)), L2 index: \(hex(l2Index)))")
            }
        default:
            break
        }
        // Count the run (qemu's count_contiguous_subclusters).
        let clustersNeeded = (needed + clusterSize - 1) >> clusterBits
        let per = header.subclustersPerCluster
        var count: UInt64 = 0
        var expectedHost = entry & Qcow2.l2OffsetMask
        let checkHost = kind == .normal || kind == .zeroAlloc || kind == .unallocatedAlloc
        var i: UInt64 = 0
        while i < clustersNeeded {
            let first = i == 0 ? sc : 0
            let (e, b) = entryAt(l2Index + i)
            guard let k = subclusterKind(entry: e, bitmap: b, index: first) else {
                throw corruption("Invalid cluster entry found  (L2 offset: \(hex(l2Offset)), L2 index: \(hex(l2Index + i)))")
            }
            if i == 0 {
                if k == .compressed { count = per - first; break }
            } else if k != kind {
                break
            } else if checkHost {
                expectedHost += clusterSize
                if expectedHost != e & Qcow2.l2OffsetMask { break }
            }
            let n = rangeCount(kind: k, bitmap: b, from: first)
            count += n
            if first + n < per { break }
            i += 1
        }
        var bytes = (count + sc) << subclusterBits
        if bytes > needed { bytes = needed }
        return Qcow2Extent(kind: kind, length: bytes - inCluster, hostOffset: host)
    }

    /// A corruption event (qcow2_signal_corruption): `onCorruption` hears of it, the request fails with EIO.
    private func corruption(_ what: String) -> InstarError {
        onCorruption?(what)
        return InstarError(.corrupt, what, errno: EIO)
    }
}

/// qemu's "%#" PRIx64: "0x1f", and "0" for zero.
func hex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }
