import Glibc

/// Bochs "growing" redolog images, read-only, as qemu 7.2's block/bochs.c reads them: a 512-byte little-endian
/// header ("Bochs Virtual HD Image" / "Redolog" / "Growing", version 1 or 2), a catalog of u32 extent numbers
/// at the header's `header` offset (0xffffffff: not allocated), then the extents in catalog order, each a
/// sector bitmap (one bit per 512-byte sector, set: the sector is stored) followed by the extent's sectors.
/// Unstored sectors read as zeroes. qemu cannot create, write or check these images, and neither does instar.
public final class BochsFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "bochs", probe: { header, _ in probe(header) },
                                 open: { try BochsFormat(request: $0) })
        d.reopenable = false
        d.runtimeOptions = []
        return d
    }()

    static let headerSize = 512
    static let version2: UInt32 = 0x0002_0000
    static let version1: UInt32 = 0x0001_0000
    static let unallocated: UInt32 = 0xFFFF_FFFF
    /// qemu's bound on catalog entries (the largest image bximage makes, ~8 TB).
    static let maxCatalog: UInt32 = 0x10_0000
    static let maxExtent: UInt32 = 0x80_0000
    /// qemu's BDRV_MAX_LENGTH: a read of the file ending past it fails with EIO.
    static let maxRequestEnd: UInt64 = UInt64(Int64.max) & ~((UInt64(1) << 30) - 1)

    /// Whether `buf` holds the NUL-terminated `text` at `offset` (C strcmp on a fixed header field).
    static func cString(_ buf: [UInt8], _ text: String, at offset: Int) -> Bool {
        let bytes = Array(text.utf8) + [0]
        guard offset >= 0, buf.count >= offset + bytes.count else { return false }
        return buf[offset..<(offset + bytes.count)].elementsEqual(bytes)
    }

    /// The header names a growing redolog of a version qemu reads.
    static func isBochsHeader(_ buf: [UInt8]) -> Bool {
        guard buf.count >= headerSize, cString(buf, "Bochs Virtual HD Image", at: 0),
              cString(buf, "Redolog", at: 32), cString(buf, "Growing", at: 48),
              let version = try? ByteReader(buf).u32le(at: 64) else { return false }
        return version == version2 || version == version1
    }

    /// bochs_probe: 100 for a growing redolog header, else 0.
    static func probe(_ buf: [UInt8]) -> Int { isBochsHeader(buf) ? 100 : 0 }

    public let formatName = "bochs"
    let file: HostFile
    let diskSize: UInt64
    let catalog: [UInt32]
    /// u32 arithmetic, as qemu keeps it: the catalog offset plus its length in bytes.
    let dataOffset: UInt32
    let bitmapBlocks: UInt32
    let extentBlocks: UInt32
    let extentSize: UInt32

    public var hostFiles: [HostFile] { [file] }
    public var virtualSize: UInt64 { diskSize }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }
    public var hasZeroInit: Bool { false }

    init(request: OpenRequest) throws {
        // No write support: qemu refuses a read/write open before reading anything.
        if request.writable { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        let f = request.file
        file = f
        let h = try f.readBytes(at: 0, count: BochsFormat.headerSize)
        guard BochsFormat.isBochsHeader(h) else {
            throw InstarError(.invalid, "Image not in Bochs format", errno: EINVAL)
        }
        let r = ByteReader(h)
        let version = try r.u32le(at: 64)
        let catalogOffset = try r.u32le(at: 68)
        let catalogSize = try r.u32le(at: 72)
        let bitmapSize = try r.u32le(at: 76)
        let extent = try r.u32le(at: 80)
        let disk = try r.u64le(at: version == BochsFormat.version1 ? 84 : 88)
        let sectors = disk / 512
        diskSize = sectors * 512

        guard catalogSize <= BochsFormat.maxCatalog else {
            throw InstarError(.range, "Catalog size is too large", errno: EFBIG)
        }
        try CallBudget.reserve(count: UInt64(catalogSize), of: 4, what: "the catalog")
        var cat = [UInt32](repeating: 0, count: Int(catalogSize))
        try cat.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: UInt64(catalogOffset)) }
        for i in cat.indices { cat[i] = UInt32(littleEndian: cat[i]) }
        catalog = cat
        dataOffset = catalogOffset &+ catalogSize &* 4
        bitmapBlocks = 1 &+ (bitmapSize &- 1) / 512
        extentBlocks = 1 &+ (extent &- 1) / 512
        extentSize = extent
        if extent < 512 {
            throw InstarError(.invalid, "Extent size must be at least 512", errno: EINVAL)
        } else if extent & (extent - 1) != 0 {
            throw InstarError(.invalid, "Extent size \(extent) is not a power of two", errno: EINVAL)
        } else if extent > BochsFormat.maxExtent {
            throw InstarError(.invalid, "Extent size \(extent) is too large", errno: EINVAL)
        }
        let sectorsPerExtent = UInt64(extent / 512)
        let needed = sectors / sectorsPerExtent + (sectors % sectorsPerExtent == 0 ? 0 : 1)
        guard UInt64(catalogSize) >= needed else {
            throw InstarError(.invalid, "Catalog size is too small for this disk size", errno: EINVAL)
        }
    }

    static func ioError() -> InstarError { InstarError(.io, strerrorString(EIO), errno: EIO) }

    /// Where extent `index`'s sector bitmap starts in the file, nil when the extent is not allocated. The sum
    /// wraps at 64 bits as qemu's does; a read that lands past BDRV_MAX_LENGTH fails later with EIO.
    func bitmapOffset(extent index: Int) -> UInt64? {
        let e = catalog[index]
        if e == BochsFormat.unallocated { return nil }
        let perExtent = UInt64(extentBlocks &+ bitmapBlocks)
        return UInt64(dataOffset) &+ (512 &* UInt64(e) &* perExtent)
    }

    /// Reads the file as qemu's block layer does: past the end reads as zeroes, a request ending past
    /// BDRV_MAX_LENGTH fails with EIO.
    func readFile(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard offset <= BochsFormat.maxRequestEnd, UInt64(buffer.count) <= BochsFormat.maxRequestEnd - offset else {
            throw BochsFormat.ioError()
        }
        try file.readZeroPadded(into: buffer, at: offset)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        guard buffer.count > 0 else { return }
        guard offset <= diskSize, UInt64(buffer.count) <= diskSize - offset else { throw BochsFormat.ioError() }
        let ext = UInt64(extentSize)
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let index = pos / ext
            let into = pos % ext
            let n = Int(min(UInt64(buffer.count - done), ext - into))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            guard index < UInt64(catalog.count) else { throw BochsFormat.ioError() }
            if let bitmapAt = bitmapOffset(extent: Int(index)) {
                try readExtent(into: part, bitmapAt: bitmapAt, at: into)
            } else {
                part.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += n
        }
    }

    /// Reads `buffer.count` bytes at `into` within one allocated extent: sectors whose bitmap bit is set come
    /// from the file, the others read as zeroes.
    private func readExtent(into buffer: UnsafeMutableRawBufferPointer, bitmapAt: UInt64, at into: UInt64) throws {
        let first = into / 512
        let last = (into + UInt64(buffer.count) - 1) / 512
        // The bitmap bytes covering these sectors (at most extent/4096 + 1 bytes).
        let firstByte = first / 8
        var bits = [UInt8](repeating: 0, count: Int(last / 8 - firstByte + 1))
        try bits.withUnsafeMutableBytes { try readFile(into: $0, at: bitmapAt &+ firstByte) }
        let dataStart = bitmapAt &+ 512 &* UInt64(bitmapBlocks)
        var sector = first
        while sector <= last {
            let bit = sector - firstByte * 8
            let set = (bits[Int(bit / 8)] >> (bit % 8)) & 1 == 1
            // A run of sectors with the same bit.
            var end = sector + 1
            while end <= last {
                let b = end - firstByte * 8
                if ((bits[Int(b / 8)] >> (b % 8)) & 1 == 1) != set { break }
                end += 1
            }
            let lo = max(sector * 512, into) - into
            let hi = min(end * 512, into + UInt64(buffer.count)) - into
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(lo)..<Int(hi)])
            if set {
                try readFile(into: part, at: dataStart &+ (into + lo))
            } else {
                part.initializeMemory(as: UInt8.self, repeating: 0)
            }
            sector = end
        }
    }

    /// qemu's driver reports no block status: the whole image is data, allocated, stored nowhere it can name.
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        BlockStatus(length: max(1, length), allocated: true, data: true, zero: false)
    }

    /// qemu's driver has no get_info: neither cluster size nor dirty flag.
    public func formatInfo() throws -> FormatInfo { FormatInfo(clusterSize: nil, dirty: nil) }
}
