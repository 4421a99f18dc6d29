import Glibc

/// Constants and helpers of the VHD ("vpc") format shared by the reader and the creator.
enum Vpc {
    /// Footer type values.
    static let typeFixed: UInt32 = 2
    static let typeDynamic: UInt32 = 3
    /// An unallocated BAT entry.
    static let unallocated: UInt32 = 0xFFFF_FFFF
    /// The largest image qemu accepts, in sectors (2040 GiB).
    static let maxSectors: UInt64 = 0xFF00_0000
    /// The largest CHS geometry (65535 x 16 x 255): images at it use current_size for their size.
    static let maxGeometry: UInt64 = 65535 * 16 * 255
    /// qemu's BDRV_REQUEST_MAX_BYTES: the largest single request.
    static let maxRequestBytes: UInt64 = UInt64(Int32.max) & ~511
    /// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
    static let timestampBase: Int = 946_684_800
    /// BAT entries instar keeps in memory at most (256 MiB of table); qemu's own bound (INT_MAX / 4) would let
    /// a sparse hostile file ask for 2 GiB.
    static let maxEntriesInMemory: UInt64 = 64 << 20
    /// qemu's BDRV_MAX_LENGTH: the end of any request to the file must stay below it.
    static let maxRequestEnd: UInt64 = UInt64(Int64.max) & ~((UInt64(1) << 30) - 1)

    /// The one's complement of the byte sum ("vpc_checksum").
    static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var sum: UInt32 = 0
        for b in bytes { sum &+= UInt32(b) }
        return ~sum
    }

    static func has(_ bytes: [UInt8], _ text: String, at offset: Int = 0) -> Bool {
        let t = Array(text.utf8)
        guard offset >= 0, bytes.count >= offset + t.count else { return false }
        return bytes[offset..<(offset + t.count)].elementsEqual(t)
    }

    static func putBE(_ bytes: inout [UInt8], _ offset: Int, _ value: UInt64, width: Int) {
        for i in 0..<width { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(width - 1 - i))) }
    }
}

/// The VHD format of Virtual PC and Hyper-V, as qemu's block/vpc.c reads and writes it: a 512-byte footer
/// (copied at the start of a dynamic image), a dynamic disk header, the block allocation table, and blocks each
/// led by a sector bitmap. A fixed image is its guest bytes followed by the footer. Differencing images are not
/// supported (qemu reads them as dynamic images without their parent).
public final class VpcFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "vpc",
                                 probe: { header, _ in Vpc.has(header, "conectix") ? 100 : 0 },
                                 open: { try VpcFormat(request: $0) })
        d.runtimeOptions = ["force_size_calc"]
        return d
    }()

    public let formatName = "vpc"
    let file: HostFile
    let writable: Bool
    /// The footer as read (with its stored checksum); rewritten unchanged after each block allocation.
    let footer: [UInt8]
    /// I/O goes straight to the file (the footer says fixed), as qemu decides per request.
    let ioFixed: Bool
    public let virtualSize: UInt64
    let blockSize: UInt64
    let bitmapSize: UInt64
    let maxTableEntries: UInt64
    let batOffset: UInt64
    /// The first BAT entries (enough for the virtual size), in host byte order.
    var bat: [UInt32]
    var freeDataBlockOffset: UInt64
    /// The bitmap last written (qemu's last_bitmap_offset), so a block's bitmap is rewritten once per run.
    var lastBitmapOffset: UInt64?

    public var hostFiles: [HostFile] { [file] }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }

    init(request: OpenRequest) throws {
        file = request.file
        writable = request.writable
        var useCHSForced = false
        var useSizeForced = false
        if let v = request.options.driverOptions["force_size_calc"] {
            let text: String
            switch v {
            case let .string(s): text = s
            default: text = QJSON.compact(v)
            }
            if text == "current_size" {
                useSizeForced = true
            } else if text == "chs" {
                useCHSForced = true
            } else {
                throw InstarError(.invalid, "Invalid size calculation mode: '\(text)'", errno: EINVAL)
            }
        }
        let fileSize = try file.size()
        var f = try file.readBytes(at: 0, count: 512)
        var footerAtStart = true
        if !Vpc.has(f, "conectix") {
            // A fixed disk has its footer only at the end of the file.
            guard fileSize >= 512 else {
                throw InstarError(.invalid, "File too small for a VHD header", errno: EINVAL)
            }
            f = try file.readBytes(at: fileSize - 512, count: 512)
            let type = try ByteReader(f).u32be(at: 60)
            guard Vpc.has(f, "conectix"), type == Vpc.typeFixed else {
                throw InstarError(.invalid, "invalid VPC image", errno: EINVAL)
            }
            footerAtStart = false
        }
        let r = ByteReader(f, what: "VHD footer")
        let stored = try r.u32be(at: 64)
        var zeroed = f
        for i in 64..<68 { zeroed[i] = 0 }
        guard Vpc.checksum(zeroed) == stored else {
            throw InstarError(.invalid, "Incorrect header checksum", errno: EINVAL)
        }
        footer = f
        ioFixed = try r.u32be(at: 60) == Vpc.typeFixed

        // The size: the CHS geometry for the creators that use it (Virtual PC, old qemu), else current_size.
        let cyls = UInt64(try r.u16be(at: 56))
        let heads = UInt64(try r.u8(at: 58))
        let secs = UInt64(try r.u8(at: 59))
        var totalSectors = cyls * heads * secs
        let app = Array(f[28..<32])
        let sizeApps: [[UInt8]] = [Array("win ".utf8), Array("qem2".utf8), Array("d2v ".utf8), Array("CTXS".utf8),
                                   [0x74, 0x61, 0x70, 0x00]]
        let useCHS = !sizeApps.contains(app) || useCHSForced
        if !useCHS || totalSectors == Vpc.maxGeometry || useSizeForced {
            totalSectors = try r.u64be(at: 48) / 512
        }
        guard totalSectors <= Vpc.maxSectors else {
            // qemu's driver fails without a message of its own; the block layer names the file.
            throw InstarError(.range, "Could not open '\(request.filename)': \(strerrorString(EFBIG))", errno: EFBIG)
        }
        virtualSize = totalSectors * 512

        guard footerAtStart else {
            blockSize = 0
            bitmapSize = 0
            maxTableEntries = 0
            batOffset = 0
            bat = []
            freeDataBlockOffset = 0
            return
        }
        let dataOffset = try r.u64be(at: 16)
        guard dataOffset <= Vpc.maxRequestEnd - 1024 else {
            throw InstarError(.io, "Error reading dynamic VHD header", errno: EIO)
        }
        let h = ByteReader(try file.readBytes(at: dataOffset, count: 1024), what: "VHD dynamic header")
        guard Vpc.has(h.bytes, "cxsparse") else {
            throw InstarError(.invalid, "Invalid header magic", errno: EINVAL)
        }
        let bs = UInt64(try h.u32be(at: 32))
        guard isPowerOfTwo(bs), bs >= 512 else {
            throw InstarError(.invalid, "Invalid block size \(bs)", errno: EINVAL)
        }
        blockSize = bs
        bitmapSize = ((bs / (8 * 512)) + 511) & ~511
        let entriesRaw = try h.u32be(at: 28)
        guard virtualSize / bs <= 0xFFFF_FFFF else {
            throw InstarError(.invalid, "Too many blocks", errno: EINVAL)
        }
        // qemu keeps the count in an int: values of 2^31 and more are negative there.
        let entriesSigned = Int32(bitPattern: entriesRaw)
        let computed = UInt64(bitPattern: Int64(entriesSigned)) &* bs
        guard computed >= virtualSize else {
            throw InstarError(.invalid, "Page table too small", errno: EINVAL)
        }
        guard entriesSigned >= 0, entriesSigned <= Int32.max / 4 else {
            throw InstarError(.invalid, "Max Table Entries too large (\(entriesSigned))", errno: EINVAL)
        }
        maxTableEntries = UInt64(entriesSigned)
        let tableBytes = maxTableEntries * 4
        batOffset = try h.u64be(at: 16)
        // One read of the whole table: qemu refuses requests over BDRV_REQUEST_MAX_BYTES.
        guard tableBytes <= Vpc.maxRequestBytes, batOffset <= Vpc.maxRequestEnd,
              tableBytes <= Vpc.maxRequestEnd - batOffset else {
            throw InstarError(.io, "Error reading pagetable", errno: EIO)
        }
        // Blocks only move the end further: a table running past the end of the file is already refused.
        var free = try (batOffset + tableBytes).alignedUp(512)
        let truncated = InstarError(.invalid, "block-vpc: free_data_block_offset points after the end of file. "
                                    + "The image has been truncated.", errno: EINVAL)
        guard free <= fileSize else { throw truncated }
        let needed = min(maxTableEntries, virtualSize.divCeil(bs))
        guard needed <= Vpc.maxEntriesInMemory else {
            throw InstarError(.invalid, "Max Table Entries too large (\(entriesSigned))", errno: EINVAL)
        }
        try CallBudget.reserve(count: needed, of: 4, what: "the block allocation table")
        var table: [UInt32] = []
        table.reserveCapacity(Int(needed))
        let chunkEntries: UInt64 = 1 << 18
        var index: UInt64 = 0
        while index < maxTableEntries {
            let n = min(chunkEntries, maxTableEntries - index)
            let chunk = try file.readBytes(at: batOffset + index * 4, count: Int(n * 4))
            guard chunk.count == Int(n * 4) else { throw truncated }
            for i in 0..<Int(n) {
                let e = UInt32(chunk[4 * i]) << 24 | UInt32(chunk[4 * i + 1]) << 16 | UInt32(chunk[4 * i + 2]) << 8
                    | UInt32(chunk[4 * i + 3])
                if index + UInt64(i) < needed { table.append(e) }
                if e != Vpc.unallocated {
                    let next = UInt64(e) * 512 + bitmapSize + bs
                    if next > free {
                        free = next
                        // The end only grows: once past the end of the file, the image is refused.
                        if free > fileSize { throw truncated }
                    }
                }
            }
            index += n
        }
        guard free <= fileSize else { throw truncated }
        bat = table
        freeDataBlockOffset = free
    }

    // MARK: mapping

    /// Where guest `offset` lives in the file (get_image_offset without the write side), nil when its block is
    /// not allocated.
    private func hostOffset(_ offset: UInt64) -> UInt64? {
        let index = offset / blockSize
        guard index < UInt64(bat.count) else { return nil }
        let e = bat[Int(index)]
        if e == Vpc.unallocated { return nil }
        return UInt64(e) * 512 + bitmapSize + offset % blockSize
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        if ioFixed {
            try file.readZeroPadded(into: buffer, at: offset)
            return
        }
        var done = 0
        var pos = offset
        while done < buffer.count {
            let n = Int(min(UInt64(buffer.count - done), blockSize - pos % blockSize))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            if let host = hostOffset(pos) {
                try file.readZeroPadded(into: part, at: host)
            } else {
                part.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += n
            pos += UInt64(n)
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        if ioFixed {
            return BlockStatus(length: length, allocated: true, data: true, zero: false, hostOffset: offset,
                               hostFile: file.path, recurse: true)
        }
        if let host = hostOffset(offset) {
            // One block at most: a bitmap separates the next one.
            let n = min(length, blockSize - offset % blockSize)
            return BlockStatus(length: n, allocated: true, data: true, zero: false, hostOffset: host, hostFile: file.path)
        }
        var pos = offset
        var remaining = length
        repeat {
            let n = min(remaining, blockSize - pos % blockSize)
            pos += n
            remaining -= n
        } while remaining > 0 && hostOffset(pos) == nil
        return BlockStatus(length: pos - offset, allocated: true, data: false, zero: true)
    }

    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: ioFixed ? nil : blockSize, dirty: false)
    }

    // MARK: writing

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        guard writable else { throw InstarError(.permission, "Image is read-only") }
        if ioFixed {
            try file.write(buffer, at: offset)
            return
        }
        var done = 0
        var pos = offset
        while done < buffer.count {
            let n = Int(min(UInt64(buffer.count - done), blockSize - pos % blockSize))
            let host = try writableHostOffset(pos)
            try file.write(UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)]), at: host)
            done += n
            pos += UInt64(n)
        }
    }

    /// qemu's writes without a zero-write driver callback: the block layer writes zeroes, which allocates.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        let chunk = Int(min(length, 1 << 20))
        let zeroes = [UInt8](repeating: 0, count: chunk)
        var pos = offset
        var remaining = length
        try zeroes.withUnsafeBytes { z in
            while remaining > 0 {
                let n = Int(min(remaining, UInt64(chunk)))
                try write(UnsafeRawBufferPointer(rebasing: z[0..<n]), at: pos, backing: nil)
                pos += UInt64(n)
                remaining -= UInt64(n)
            }
        }
    }

    /// The host offset to write guest `offset` at: an allocated block has its bitmap set in full first (once
    /// per run of writes to it), an unallocated one is allocated at the end of the file.
    private func writableHostOffset(_ offset: UInt64) throws -> UInt64 {
        let index = offset / blockSize
        if let host = hostOffset(offset) {
            let bitmapOffset = UInt64(bat[Int(index)]) * 512
            if lastBitmapOffset != bitmapOffset {
                lastBitmapOffset = bitmapOffset
                try file.write([UInt8](repeating: 0xFF, count: Int(bitmapSize)), at: bitmapOffset)
                try file.sync()
            }
            return host
        }
        return try allocateBlock(index: index, offset: offset)
    }

    /// qemu's alloc_block: the block goes where the footer stands; its bitmap is written all set, the footer
    /// moves past the block, then the BAT entry points at it.
    private func allocateBlock(index: UInt64, offset: UInt64) throws -> UInt64 {
        guard offset <= virtualSize, index < UInt64(bat.count) else {
            throw InstarError(.invalid, "Invalid argument", errno: EINVAL)
        }
        let sector = freeDataBlockOffset / 512
        guard sector < UInt64(Vpc.unallocated) else {
            throw InstarError(.range, "VHD image is full: no room for another block", errno: EFBIG)
        }
        let start = freeDataBlockOffset
        let end = try start.adding(bitmapSize).adding(blockSize)
        try file.write([UInt8](repeating: 0xFF, count: Int(bitmapSize)), at: start)
        try file.sync()
        CrashPoint.hit("vpc-alloc:bitmap")
        try file.write(footer, at: end)
        try file.sync()
        CrashPoint.hit("vpc-alloc:footer")
        freeDataBlockOffset = end
        bat[Int(index)] = UInt32(sector)
        var entry = [UInt8](repeating: 0, count: 4)
        Vpc.putBE(&entry, 0, sector, width: 4)
        do {
            try file.write(entry, at: batOffset + index * 4)
            try file.sync()
            CrashPoint.hit("vpc-alloc:table")
        } catch {
            bat[Int(index)] = Vpc.unallocated
            freeDataBlockOffset = start
            throw error
        }
        return start + bitmapSize + offset % blockSize
    }

    public func flush() throws {
        if writable { try file.sync() }
    }
}
