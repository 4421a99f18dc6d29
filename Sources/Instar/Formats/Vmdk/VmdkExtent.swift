import CZlib
import Glibc

/// One extent of a vmdk image: a flat range of a file, or a hosted sparse extent ("KDMV", VMDK4, including
/// streamOptimized), a COWD sparse extent (VMDK3, vmfsSparse) or a seSparse extent, with qemu's lookups.
final class VmdkExtent {
    enum Kind { case flat, vmdk4, cowd, seSparse }

    static let magicVMDK3: UInt32 = 0x434F_5744 // "COWD"
    static let magicVMDK4: UInt32 = 0x4B44_4D56 // "KDMV"
    static let flagRGD: UInt32 = 1 << 1
    static let flagZeroGrain: UInt32 = 1 << 2
    static let flagCompress: UInt32 = 1 << 16
    static let flagMarker: UInt32 = 1 << 17
    static let gdAtEnd = UInt64.max
    static let gteZeroed: UInt32 = 1
    /// qemu's VMDK_EXTENT_MAX_SECTORS: a sparse extent never allocates at or past 2^32 sectors.
    static let maxSectors: UInt64 = 1 << 32

    let file: HostFile
    /// The extent lives in the image's own file (monolithic sparse), not a file the descriptor names.
    let isImageFile: Bool
    let kind: Kind
    /// The extent type named in the descriptor ("SPARSE", "FLAT", ...), nil for a monolithic image.
    var typeName: String?
    let sectors: UInt64
    /// First guest sector of this extent.
    let startSector: UInt64
    var flatStartOffset: UInt64 = 0
    var compressed = false
    var hasMarker = false
    var hasZeroGrain = false
    var version: UInt32 = 0

    // Sparse layout (qemu's L1 = grain directory, L2 = grain table).
    let l1TableOffset: UInt64
    let l1BackupOffset: UInt64
    let l1Size: UInt32
    /// The entries read from the file (32-bit; seSparse uses 64-bit ones in `l1Wide`); entries the file does
    /// not hold (past its end) read as 0, as qemu's zero-padded read gives them.
    var l1: [UInt32] = []
    var l1Wide: [UInt64] = []
    var l1Backup: [UInt32] = []
    let l2Size: UInt32
    let l1EntrySectors: UInt32
    let clusterSectors: UInt64
    var nextClusterSector: UInt64
    var seL2TablesOffset: UInt64 = 0
    var seClustersOffset: UInt64 = 0

    /// Grain tables by sector offset, at most `l2CacheSize` of them.
    private var l2Cache: [UInt64: [UInt8]] = [:]
    private var l2Order: [UInt64] = []
    static let l2CacheSize = 16

    var endSector: UInt64 { startSector + sectors }
    var isFlat: Bool { kind == .flat }
    var clusterBytes: UInt64 { clusterSectors * 512 }
    var entrySize: Int { kind == .seSparse ? 8 : 4 }

    /// vmdk_add_extent's checks and fields.
    init(file: HostFile, isImageFile: Bool, kind: Kind, sectors: UInt64, startSector: UInt64, l1Offset: UInt64,
         l1BackupOffset: UInt64, l1Size: UInt32, l2Size: UInt32, clusterSectors: UInt64) throws {
        if clusterSectors > 0x200000 {
            throw InstarError(.invalid, "Invalid granularity, image may be corrupt", errno: EFBIG)
        }
        if l1Size > 32 * 1024 * 1024 {
            throw InstarError(.invalid, "L1 size too big", errno: EFBIG)
        }
        self.file = file
        self.isImageFile = isImageFile
        self.kind = kind
        self.sectors = sectors
        self.startSector = startSector
        self.l1TableOffset = l1Offset
        self.l1BackupOffset = l1BackupOffset
        self.l1Size = l1Size
        self.l2Size = l2Size
        self.l1EntrySectors = UInt32(truncatingIfNeeded: UInt64(l2Size) &* clusterSectors)
        self.clusterSectors = kind == .flat ? sectors : clusterSectors
        let fileSectors = (try file.size()).divCeil(512)
        if kind != .flat && clusterSectors > 0 {
            // ROUND_UP for a power of two, as qemu computes it whatever the granularity.
            nextClusterSector = (fileSectors &+ clusterSectors &- 1) & (0 &- clusterSectors)
        } else {
            nextClusterSector = fileSectors
        }
        if sectors > UInt64(Int64.max) || startSector > UInt64(Int64.max) - sectors {
            throw InstarError(.range, "Could not refresh total sector count: File too large", errno: EFBIG)
        }
    }

    /// vmdk_init_tables: reads the grain directory (and its redundant copy).
    func readTables() throws {
        let bytes = try UInt64(l1Size).multiplied(by: UInt64(entrySize))
        let fileSize = try file.size()
        func load(_ offset: UInt64, what: String) throws -> [UInt8] {
            // bdrv_pread refuses a range outside 0...BDRV_MAX_LENGTH (a wrapped, negative offset too) with EIO.
            guard offset <= VmdkFormat.maxLength, bytes <= VmdkFormat.maxLength - offset else {
                throw InstarError(.io, "Could not \(what) from extent '\(file.path)': Input/output error", errno: EIO)
            }
            // Only the part inside the file is read; the rest reads as zero entries.
            let inFile = offset >= fileSize ? 0 : min(bytes, fileSize - offset)
            return try file.readMetadata(at: offset, count: Int(inFile),
                                         what: offset == l1TableOffset ? "the grain directory of extent '\(file.path)'"
                                            : "the backup grain directory of extent '\(file.path)'")
        }
        let raw = try load(l1TableOffset, what: "read l1 table")
        let r = ByteReader(raw)
        if kind == .seSparse {
            l1Wide = try (0..<(raw.count / 8)).map { try r.u64le(at: $0 * 8) }
        } else {
            l1 = try (0..<(raw.count / 4)).map { try r.u32le(at: $0 * 4) }
        }
        if l1BackupOffset != 0 {
            let rawB = try load(l1BackupOffset, what: "read l1 backup table")
            let rb = ByteReader(rawB)
            l1Backup = try (0..<(rawB.count / 4)).map { try rb.u32le(at: $0 * 4) }
        }
    }

    enum Lookup: Equatable {
        case error, unallocated, zeroed
        /// Host byte offset of the grain (or, flat, of the extent's start).
        case allocated(UInt64)
    }

    /// Where the grain table entry of a guest offset lives.
    struct TableSlot {
        var l1Index: Int
        var l2Offset: UInt64 // sectors
        var l2Index: Int
    }

    /// get_cluster_offset without allocation. `offset` is a guest byte offset inside this extent.
    func lookup(_ offset: UInt64) throws -> (Lookup, TableSlot?) {
        if kind == .flat { return (.allocated(flatStartOffset), nil) }
        // A COWD header may give a zero granularity (qemu would divide by zero).
        if l1EntrySectors == 0 || clusterSectors == 0 || l2Size == 0 { return (.error, nil) }
        let rel = offset - startSector * 512
        let l1Index = (rel >> 9) / UInt64(l1EntrySectors)
        guard l1Index < UInt64(l1Size) else { return (.error, nil) }
        let l2SizeBytes = UInt64(l2Size) * UInt64(entrySize)
        var l2Offset: UInt64
        if kind == .seSparse {
            let e = Int(l1Index) < l1Wide.count ? l1Wide[Int(l1Index)] : 0
            if e == 0 {
                l2Offset = 0
            } else if e & 0xFFFF_FFFF_0000_0000 != 0x1000_0000_0000_0000 {
                return (.error, nil)
            } else {
                // Grain table n of the tables area; qemu adds in 64 bits (wrapping) and then requires a 32-bit
                // sector number, as the grain table cache keeps.
                let sum = seL2TablesOffset &+ (e & 0xFFFF_FFFF) * l2SizeBytes / 512
                if sum > 0xFFFF_FFFF { return (.error, nil) }
                l2Offset = sum
            }
        } else {
            l2Offset = UInt64(Int(l1Index) < l1.count ? l1[Int(l1Index)] : 0)
        }
        if l2Offset == 0 { return (.unallocated, nil) }
        let table = try grainTable(at: l2Offset, bytes: Int(l2SizeBytes))
        let l2Index = Int(((rel >> 9) / clusterSectors) % UInt64(l2Size))
        let slot = TableSlot(l1Index: Int(l1Index), l2Offset: l2Offset, l2Index: l2Index)
        let r = ByteReader(table)
        var zeroed = false
        var clusterSector: UInt64
        if kind == .seSparse {
            let e = try r.u64le(at: l2Index * 8)
            switch e & 0xF000_0000_0000_0000 {
            case 0:
                if e != 0 { return (.error, slot) }
                clusterSector = 0
            case 0x1000_0000_0000_0000, 0x2000_0000_0000_0000:
                zeroed = true
                clusterSector = e
            case 0x3000_0000_0000_0000:
                // The grain number's low 12 bits sit in bits 48-59, the rest in bits 0-47.
                let idx = ((e & 0x0FFF_0000_0000_0000) >> 48) | ((e & 0x0000_FFFF_FFFF_FFFF) << 12)
                // qemu computes this in 64 bits without a check; a sector past what a file can hold fails below.
                clusterSector = seClustersOffset &+ idx &* clusterSectors
            default:
                return (.error, slot)
            }
        } else {
            clusterSector = UInt64(try r.u32le(at: l2Index * 4))
            if hasZeroGrain && clusterSector == UInt64(VmdkExtent.gteZeroed) { zeroed = true }
        }
        if clusterSector == 0 || zeroed { return (zeroed ? .zeroed : .unallocated, slot) }
        // qemu shifts in 64 bits, wrapping; a byte offset no file can have fails when it is read.
        return (.allocated(clusterSector &<< 9), slot)
    }

    /// When the grain directory entry covering guest sector `sector` is 0 (no grain table), every grain up to
    /// the end of that entry's span, or of the extent, looks up as unallocated: returns that end sector, so a
    /// walk over the grains (check) can pass them in one step. nil when there is a table or no lookup is sound.
    func missingTableEnd(forSector sector: UInt64) -> UInt64? {
        guard kind != .flat, l1EntrySectors != 0, clusterSectors != 0, l2Size != 0,
              sector >= startSector, sector < endSector else { return nil }
        let l1Index = (sector - startSector) / UInt64(l1EntrySectors)
        guard l1Index < UInt64(l1Size) else { return nil }
        let i = Int(l1Index)
        let entry = kind == .seSparse ? (i < l1Wide.count ? l1Wide[i] : 0) : UInt64(i < l1.count ? l1[i] : 0)
        guard entry == 0 else { return nil }
        let (span, o1) = (l1Index + 1).multipliedReportingOverflow(by: UInt64(l1EntrySectors))
        let (end, o2) = startSector.addingReportingOverflow(span)
        return o1 || o2 ? endSector : min(end, endSector)
    }

    private func grainTable(at sector: UInt64, bytes: Int) throws -> [UInt8] {
        if let t = l2Cache[sector] { return t }
        guard sector <= UInt64(Int64.max) >> 9 else { throw InstarError(.io, "Input/output error", errno: EIO) }
        if l2Order.count < VmdkExtent.l2CacheSize {
            try CallBudget.reserve(bytes, what: "the grain table cache of extent '\(file.path)'")
        }
        let t = try file.readBytes(at: sector << 9, count: bytes)
        if l2Order.count >= VmdkExtent.l2CacheSize {
            let old = l2Order.removeFirst()
            l2Cache[old] = nil
        }
        l2Cache[sector] = t
        l2Order.append(sector)
        return t
    }

    /// Updates a cached grain table entry after it was written to the file.
    func updateCachedEntry(_ slot: TableSlot, _ value: UInt32) {
        guard var t = l2Cache[slot.l2Offset], slot.l2Index * 4 + 4 <= t.count else { return }
        t.putU32le(value, at: slot.l2Index * 4)
        l2Cache[slot.l2Offset] = t
    }

    /// The offset of `offset` inside its grain (vmdk_find_offset_in_cluster).
    func offsetInCluster(_ offset: UInt64) -> UInt64 {
        clusterBytes == 0 ? 0 : (offset - startSector * 512) % clusterBytes
    }

    /// Bytes from `offset` (whose lookup gave `first`) up to `limit` whose grains all stand the same way: all
    /// unallocated, all zeroed, or allocated uncompressed grains that follow each other in the file.
    func runLength(from offset: UInt64, first: Lookup, limit: UInt64) throws -> UInt64 {
        let inCluster = offsetInCluster(offset)
        var n = min(clusterBytes - inCluster, limit)
        if kind == .flat || (compressed && first != .unallocated && first != .zeroed) { return n }
        let extentEnd = endSector * 512
        var pos = offset - inCluster + clusterBytes
        var expected: UInt64? = nil
        if case .allocated(let h) = first { expected = h &+ clusterBytes }
        // At most one grain table's worth of lookups per call beyond the tables skipped whole.
        var steps = 0
        while n < limit && pos < extentEnd && steps < 4096 {
            steps += 1
            let (l, slot) = try lookup(pos)
            if l == .unallocated && first == .unallocated && slot == nil {
                // No grain table: the whole directory entry is unallocated.
                let span = UInt64(l1EntrySectors) * 512
                let rel = pos - startSector * 512
                let next = min(extentEnd, startSector * 512 + (rel / span + 1) * span)
                n = min(limit, n + (next - pos))
                pos = next
                continue
            }
            switch (first, l) {
            case (.unallocated, .unallocated), (.zeroed, .zeroed): break
            case (.allocated, .allocated(let h)) where h == expected: expected = h &+ clusterBytes
            default: return n
            }
            n = min(limit, n + min(clusterBytes, extentEnd - pos))
            pos += clusterBytes
        }
        return n
    }

    /// vmdk_read_extent: `count` bytes from the grain at `clusterOffset`, `inCluster` bytes in.
    func readGrain(into buffer: UnsafeMutableRawBufferPointer, clusterOffset: UInt64, inCluster: UInt64) throws {
        if !compressed {
            // bdrv_co_preadv refuses a request outside 0...BDRV_MAX_LENGTH (a wrapped, negative offset too).
            let at = clusterOffset &+ inCluster
            guard at <= VmdkFormat.maxLength, UInt64(buffer.count) <= VmdkFormat.maxLength - at else {
                throw VmdkFormat.ioError()
            }
            try file.readZeroPadded(into: buffer, at: at)
            return
        }
        try inflateGrain(into: buffer, clusterOffset: clusterOffset, inCluster: inCluster)
    }

    /// Bytes of compressed input read, and of output inflated, per step of `inflateGrain`.
    static let inflateStep = 1 << 20

    /// A compressed grain as qemu's vmdk_read_extent reads it (2 grains of bytes from `clusterOffset`, zeroes
    /// past the end of the file; a marker's length field says how many are zlib data; `uncompress` into one
    /// grain, which must succeed, then the asked-for window must lie inside what came out), but streamed: the
    /// input is read and the output inflated a step at a time, keeping only the window the caller asked for. A
    /// hostile header may give grains of up to 1 GiB (qemu's limit), and qemu's three grain-sized buffers of
    /// such a grain would be 3 GiB.
    private func inflateGrain(into buffer: UnsafeMutableRawBufferPointer, clusterOffset: UInt64,
                              inCluster: UInt64) throws {
        let cb = Int(clusterBytes)
        let step = VmdkExtent.inflateStep
        try CallBudget.reserve(step * 2, what: "the decompression buffers of a compressed grain")
        defer { CallBudget.release(step * 2) }
        var dataStart = 0
        var dataLen = cb
        if hasMarker {
            var marker = [UInt8](repeating: 0, count: 12)
            try marker.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: clusterOffset) }
            dataStart = 12
            dataLen = Int(try ByteReader(marker).u32le(at: 8))
        }
        guard dataLen != 0, dataLen <= cb * 2 else { throw VmdkExtent.invalid() }
        // uncompress's input: the data, cut at the end of the 2-grain buffer.
        var inputLeft = min(dataLen, cb * 2 - dataStart)
        var inputAt = clusterOffset &+ UInt64(dataStart)
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: step, alignment: 16)
        defer { input.deallocate() }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: step, alignment: 16)
        defer { scratch.deallocate() }
        guard let inBase = input.baseAddress, let outBase = scratch.baseAddress else { throw VmdkExtent.invalid() }
        var strm = z_stream()
        guard inflateInit_(&strm, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw InstarError(.noMemory, "Cannot allocate memory", errno: ENOMEM)
        }
        defer { inflateEnd(&strm) }
        // The window of the grain the caller wants, and the grain bytes that have come out so far.
        let want = (from: Int(inCluster), to: Int(inCluster) + buffer.count)
        var produced = 0
        var outLeft = cb
        var rc: Int32 = Z_OK
        // zlib's uncompress loop, with the output buffer a window that moves along the grain.
        repeat {
            if strm.avail_out == 0 {
                let n = min(outLeft, step)
                strm.next_out = outBase.assumingMemoryBound(to: Bytef.self)
                strm.avail_out = uInt(n)
                outLeft -= n
            }
            if strm.avail_in == 0 {
                let n = min(inputLeft, step)
                try file.readZeroPadded(into: UnsafeMutableRawBufferPointer(rebasing: input[0..<n]), at: inputAt)
                strm.next_in = inBase.assumingMemoryBound(to: Bytef.self)
                strm.avail_in = uInt(n)
                inputLeft -= n
                inputAt = inputAt &+ UInt64(n)
            }
            let before = Int(strm.total_out)
            rc = CZlib.inflate(&strm, Z_NO_FLUSH)
            let n = Int(strm.total_out) - before
            if n > 0 {
                // Bytes [produced, produced + n) of the grain, the last n written before next_out.
                let lo = max(produced, want.from)
                let hi = min(produced + n, want.to)
                if lo < hi, let dst = buffer.baseAddress, let end = strm.next_out {
                    let src = UnsafeRawPointer(end) - n + (lo - produced)
                    memcpy(dst + (lo - want.from), src, hi - lo)
                }
                produced += n
            }
        } while rc == Z_OK
        guard rc == Z_STREAM_END else { throw VmdkExtent.invalid() }
        guard want.to <= produced else { throw VmdkExtent.invalid() }
    }

    static func invalid() -> InstarError { InstarError(.invalid, "Invalid argument", errno: EINVAL) }
}

/// The fixed header of a VMDK4 sparse extent after its magic (qemu's VMDK4Header).
struct Vmdk4Header {
    var version: UInt32
    var flags: UInt32
    var capacity: UInt64
    var granularity: UInt64
    var descOffset: UInt64
    var descSize: UInt64
    var numGTEsPerGT: UInt32
    var rgdOffset: UInt64
    var gdOffset: UInt64
    var grainOffset: UInt64
    var compressAlgorithm: UInt16

    /// `b` holds the 75 header bytes that follow the magic.
    init(_ b: [UInt8]) throws {
        let r = ByteReader(b)
        version = try r.u32le(at: 0)
        flags = try r.u32le(at: 4)
        capacity = try r.u64le(at: 8)
        granularity = try r.u64le(at: 16)
        descOffset = try r.u64le(at: 24)
        descSize = try r.u64le(at: 32)
        numGTEsPerGT = try r.u32le(at: 40)
        rgdOffset = try r.u64le(at: 44)
        gdOffset = try r.u64le(at: 52)
        grainOffset = try r.u64le(at: 60)
        compressAlgorithm = try r.u16le(at: 73)
    }
    static let size = 75
}
