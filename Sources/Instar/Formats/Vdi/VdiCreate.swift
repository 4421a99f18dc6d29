import Glibc

/// Creating VDI images as qemu 7.2's vdi_co_do_create does (Debian's build: 1 MiB blocks, static images
/// allowed): the header with two random UUIDs, the block map, and for a static image the whole data area (as a
/// hole: the file is only extended).
public enum VdiCreate {
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size"),
        CreateOptionSpec("static", .bool, "VDI static (pre-allocated) image", default: "off"),
    ]

    public static let creator = FormatCreator(name: "vdi", options: options, create: create)

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        let isStatic = o.bool("static")
        // The protocol layer's own options (file-posix preallocation) apply to the empty file it creates.
        if o.text("preallocation") == "metadata" { try HostFileCreate.create(r.filename, size: 0, preallocation: .off) }
        try HostFileCreate.create(r.filename, size: 0, preallocation: try RawCreate.preallocation(o.text("preallocation")))
        let bytes = try (o.size("size") ?? 0).alignedUp(512)
        if bytes > VdiFormat.maxDiskSize {
            throw InstarError(.unsupported, "Unsupported VDI image size (size is 0x" + String(bytes, radix: 16)
                              + ", max supported is 0x" + String(VdiFormat.maxDiskSize, radix: 16) + ")",
                              errno: ENOTSUP)
        }
        let blockSize = UInt64(VdiFormat.blockSize)
        let blocks = bytes.divCeil(blockSize)
        let bmapSize = (blocks * 4 + 511) & ~511
        var h = [UInt8](repeating: 0, count: 512)
        for (i, c) in VdiFormat.text.utf8.enumerated() { h[i] = c }
        h.putU32le(VdiFormat.signature, at: 0x40)
        h.putU32le(VdiFormat.version11, at: 0x44)
        h.putU32le(0x180, at: 0x48)
        h.putU32le(isStatic ? VdiFormat.typeStatic : VdiFormat.typeDynamic, at: 0x4C)
        h.putU32le(0x200, at: 0x154)
        h.putU32le(UInt32(truncatingIfNeeded: 0x200 + bmapSize), at: 0x158)
        h.putU32le(512, at: 0x168)
        h.putU64le(bytes, at: 0x170)
        h.putU32le(VdiFormat.blockSize, at: 0x178)
        h.putU32le(UInt32(blocks), at: 0x180)
        if isStatic { h.putU32le(UInt32(blocks), at: 0x184) }
        for field in [0x188, 0x198] { putRandomUUID(&h, at: field) }

        let file = try HostFile.open(r.filename, writable: true)
        try ImageLock.acquireForOpen(file, writable: true, forceShare: false)
        try file.write(h, at: 0)
        // The block map, in 1 MiB pieces.
        var offset: UInt64 = 512
        var block: UInt64 = 0
        let perChunk: UInt64 = 1 << 18
        while block * 4 < bmapSize {
            let n = min(perChunk, bmapSize / 4 - block)
            var chunk = [UInt8](repeating: 0, count: Int(n * 4))
            for i in 0..<Int(n) {
                let b = block + UInt64(i)
                let v: UInt32 = b >= blocks ? 0 : isStatic ? UInt32(b) : VdiFormat.unallocated
                chunk.putU32le(v, at: i * 4)
            }
            try file.write(chunk, at: offset)
            offset += n * 4
            block += n
        }
        if isStatic {
            try file.truncate(to: offset + blocks * blockSize)
        }
        // On disk before create returns (qemu's close flushes it).
        try file.sync()
    }

    /// qemu_uuid_generate (version 4), stored with its first three fields byte-swapped as vdi stores them.
    static func putRandomUUID(_ h: inout [UInt8], at o: Int) {
        var g = SystemRandomNumberGenerator()
        var u = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
        u[6] = (u[6] & 0x0F) | 0x40
        u[8] = (u[8] & 0x3F) | 0x80
        let swapped = [u[3], u[2], u[1], u[0], u[5], u[4], u[7], u[6]] + u[8...]
        for (i, b) in swapped.enumerated() { h[o + i] = b }
    }
}
