import Glibc

/// VirtualBox's VDI (version 1.1), as qemu 7.2's block/vdi.c handles it: a 512-byte header, a block map of
/// little-endian u32 entries (block numbers in the data area; 0xffffffff never allocated, 0xfffffffe
/// discarded: both read as zeroes), 1 MiB blocks appended in allocation order. Static images have every block
/// allocated at creation. No backing files, no resize.
public final class VdiFormat: ImageFormat {
    public static let descriptor = FormatDescriptor(
        name: "vdi",
        probe: { header, _ in
            guard header.count >= 512, let sig = try? ByteReader(header).u32le(at: 0x40),
                  sig == VdiFormat.signature else { return 0 }
            return 100
        },
        open: { try VdiFormat(request: $0) })
        // qemu's driver has no options of its own: any fails the open, after the backing chain.
        .knowing { _ in false }

    static let signature: UInt32 = 0xBEDA_107F
    static let version11: UInt32 = 0x0001_0001
    static let typeDynamic: UInt32 = 1
    static let typeStatic: UInt32 = 2
    static let blockSize: UInt32 = 1 << 20
    static let unallocated: UInt32 = 0xFFFF_FFFF
    static let discarded: UInt32 = 0xFFFF_FFFE
    /// qemu's VDI_BLOCKS_IN_IMAGE_MAX: a block map below 2 GiB.
    static let maxBlocks: UInt32 = UInt32((UInt64(Int32.max) + 1 - 512) / 4)
    static let maxDiskSize: UInt64 = UInt64(maxBlocks) * UInt64(blockSize)
    /// instar's bound on the block map held in memory (32 TiB of guest data at 1 MiB blocks).
    static let maxMapBlocks: UInt32 = 32 << 20
    static let text = "<<< QEMU VM Virtual Disk Image >>>\n"

    static func isAllocated(_ e: UInt32) -> Bool { e < discarded }

    public let formatName = "vdi"
    let file: HostFile
    let writable: Bool
    /// The 512 header bytes as read; fields are patched in place when written back.
    var headerBytes: [UInt8]
    let imageType: UInt32
    let offsetBmap: UInt64
    let offsetData: UInt64
    let diskSize: UInt64
    let blockSize: UInt64
    let blocksInImage: UInt32
    var blocksAllocated: UInt32
    var bmap: [UInt32]

    public var hostFiles: [HostFile] { [file] }
    public var virtualSize: UInt64 { diskSize }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }

    init(request: OpenRequest) throws {
        let f = request.file
        file = f
        writable = request.writable
        var h = [UInt8](repeating: 0, count: 512)
        try h.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: 0) }
        headerBytes = h
        let r = ByteReader(h)
        let sig = try r.u32le(at: 0x40)
        let version = try r.u32le(at: 0x44)
        let type = try r.u32le(at: 0x4C)
        let bmapOffset = try r.u32le(at: 0x154)
        let dataOffset = try r.u32le(at: 0x158)
        let sectorSize = try r.u32le(at: 0x168)
        var size = try r.u64le(at: 0x170)
        let bsize = try r.u32le(at: 0x178)
        let blocks = try r.u32le(at: 0x180)
        let allocated = try r.u32le(at: 0x184)
        let link = try r.slice(at: 0x1A8, count: 16)
        let parent = try r.slice(at: 0x1B8, count: 16)

        if size > VdiFormat.maxDiskSize {
            throw InstarError(.unsupported, "Unsupported VDI image size (size is 0x" + String(size, radix: 16)
                              + ", max supported is 0x" + String(VdiFormat.maxDiskSize, radix: 16) + ")",
                              errno: ENOTSUP)
        }
        // Odd sizes (VBoxManage convertfromraw) are rounded up to a sector.
        size = (size + 511) & ~511
        func unsupported(_ what: String) -> InstarError {
            InstarError(.unsupported, "unsupported VDI image (\(what))", errno: ENOTSUP)
        }
        if sig != VdiFormat.signature {
            throw InstarError(.invalid, "Image not in VDI format (bad signature " + hex8(sig) + ")", errno: EINVAL)
        } else if version != VdiFormat.version11 {
            throw unsupported("version \(version >> 16).\(version & 0xffff)")
        } else if bmapOffset % 512 != 0 {
            throw unsupported("unaligned block map offset 0x" + String(bmapOffset, radix: 16))
        } else if dataOffset % 512 != 0 {
            throw unsupported("unaligned data offset 0x" + String(dataOffset, radix: 16))
        } else if sectorSize != 512 {
            throw unsupported("sector size \(sectorSize) is not 512")
        } else if bsize != VdiFormat.blockSize {
            throw unsupported("block size \(bsize) is not \(VdiFormat.blockSize)")
        } else if size > UInt64(blocks) * UInt64(bsize) {
            throw unsupported("disk size \(size), image bitmap has room for \(UInt64(blocks) * UInt64(bsize))")
        } else if link.contains(where: { $0 != 0 }) {
            throw unsupported("non-NULL link UUID")
        } else if parent.contains(where: { $0 != 0 }) {
            throw unsupported("non-NULL parent UUID")
        } else if blocks > VdiFormat.maxBlocks {
            throw unsupported("too many blocks \(blocks), max is \(VdiFormat.maxBlocks)")
        }
        guard blocks <= VdiFormat.maxMapBlocks else {
            throw InstarError(.unsupported, "VDI block map of \(blocks) entries is larger than instar supports",
                              errno: ENOTSUP)
        }
        imageType = type
        offsetBmap = UInt64(bmapOffset)
        offsetData = UInt64(dataOffset)
        diskSize = size
        blockSize = UInt64(bsize)
        blocksInImage = blocks
        blocksAllocated = allocated
        // The map is read in whole sectors.
        let mapSectors = (UInt64(blocks) * 4 + 511) / 512
        try CallBudget.reserve(count: mapSectors, of: 512, what: "the block map")
        var m = [UInt32](repeating: 0, count: Int(mapSectors * 128))
        try m.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: UInt64(bmapOffset)) }
        for i in m.indices { m[i] = UInt32(littleEndian: m[i]) }
        bmap = m
    }

    func entry(_ index: UInt64) throws -> UInt32 {
        guard index < UInt64(bmap.count) else { throw InstarError(.invalid, strerrorString(EINVAL), errno: EINVAL) }
        return bmap[Int(index)]
    }

    func dataOffset(_ e: UInt32) -> UInt64 { offsetData + UInt64(e) * blockSize }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let into = pos % blockSize
            let n = Int(min(UInt64(buffer.count - done), blockSize - into))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            let e = try entry(pos / blockSize)
            if VdiFormat.isAllocated(e) {
                try file.readZeroPadded(into: part, at: dataOffset(e) + into)
            } else {
                part.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += n
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        let into = offset % blockSize
        let n = max(1, min(blockSize - into, length))
        let e = try entry(offset / blockSize)
        if !VdiFormat.isAllocated(e) {
            return BlockStatus(length: n, allocated: true, data: false, zero: true)
        }
        let (f, o) = file.hostLocation(dataOffset(e) + into)
        return BlockStatus(length: n, allocated: true, data: true, zero: false, hostOffset: o, hostFile: f.path,
                           recurse: imageType == VdiFormat.typeStatic)
    }

    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: blockSize, dirty: false)
    }

    // MARK: writing

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        var done = 0
        var first: UInt64?
        var last: UInt64 = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let index = pos / blockSize
            let into = pos % blockSize
            let n = Int(min(UInt64(buffer.count - done), blockSize - into))
            let part = UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)])
            let e = try entry(index)
            if VdiFormat.isAllocated(e) {
                try file.write(part, at: dataOffset(e) + into)
            } else {
                // A new block at the end of the data area, written whole (zeroes around the data).
                let new = blocksAllocated
                guard VdiFormat.isAllocated(new) else {
                    throw InstarError(.io, "VDI block count overflow", errno: EFBIG)
                }
                var block = [UInt8](repeating: 0, count: Int(blockSize))
                block.withUnsafeMutableBytes { b in
                    UnsafeMutableRawBufferPointer(rebasing: b[Int(into)..<(Int(into) + n)]).copyMemory(from: part)
                }
                // The map in memory names the block only once its data is written: a failed write leaves the
                // block unallocated for the requests that follow, and no map write refers to it.
                try file.write(block, at: dataOffset(new))
                bmap[Int(index)] = new
                blocksAllocated = new + 1
                if first == nil { first = index }
                last = index
            }
            done += n
        }
        if let f = first {
            // The header (blocks allocated), then the block map sectors that changed.
            headerBytes.putU32le(blocksAllocated, at: 0x184)
            var s0 = f / 128
            let s1 = last / 128
            // qemu writes the header, then the map sectors: a process killed in between leaves a count that
            // disagrees with the map. When the map follows the header (as qemu creates it) and the sectors up
            // to the last changed one are few, both go in one write, with the same resulting bytes.
            let together = offsetBmap == 512 && s1 < 2048 && offsetData >= 512 + (s1 + 1) * 512
            if together {
                s0 = 0
            } else {
                try file.write(headerBytes, at: 0)
            }
            var bytes = [UInt8](repeating: 0, count: Int(s1 - s0 + 1) * 512)
            for i in 0..<Int((s1 - s0 + 1) * 128) {
                bytes.putU32le(bmap[Int(s0 * 128) + i], at: i * 4)
            }
            if together {
                try file.write(headerBytes + bytes, at: 0)
            } else {
                try file.write(bytes, at: offsetBmap + s0 * 512)
            }
        }
    }

    /// vdi has no zero writes of its own: the block layer writes buffers of zeroes, which allocate.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        let chunk = [UInt8](repeating: 0, count: Int(min(length, 1 << 20)))
        var done: UInt64 = 0
        while done < length {
            let n = min(length - done, UInt64(chunk.count))
            try chunk.withUnsafeBytes {
                try write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)]), at: offset + done, backing: backing)
            }
            done += n
        }
    }

    public func flush() throws {
        if writable { try file.sync() }
    }

    public func close() throws {
        if writable { try file.sync() }
    }
}

private func hex8(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 8 - s.count)) + s
}

/// vdi_co_check: the block map against itself and the header's count; repairs are not supported.
extension VdiFormat: ImageCheckable {
    public func check(repair: CheckRepair, report: (CheckMessage) -> Void) throws -> CheckResult {
        if !repair.isEmpty { throw CheckNotSupported() }
        var result = CheckResult()
        var seen = [UInt32](repeating: VdiFormat.unallocated, count: Int(blocksInImage))
        var allocated: UInt32 = 0
        for block in 0..<Int(blocksInImage) {
            let e = bmap[block]
            guard VdiFormat.isAllocated(e) else { continue }
            if e < blocksInImage {
                allocated += 1
                if !VdiFormat.isAllocated(seen[Int(e)]) {
                    seen[Int(e)] = e
                } else {
                    report(CheckMessage("ERROR: block index \(seen[Int(e)]) also used by \(e)"))
                    result.corruptions += 1
                }
            } else {
                report(CheckMessage("ERROR: block index \(block) too large, is \(e)"))
                result.corruptions += 1
            }
        }
        if allocated != blocksAllocated {
            report(CheckMessage("ERROR: allocated blocks mismatch, is \(allocated), should be \(blocksAllocated)"))
            result.corruptions += 1
        }
        return result
    }
}

/// vdi_make_empty does nothing (and succeeds).
extension VdiFormat: ImageEmptiable {
    public func makeEmpty() throws {}
}
