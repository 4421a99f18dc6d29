import Glibc

/// Creating Parallels images as qemu 7.2's parallels_co_create does: the extended signature, sizes rounded up to
/// sectors, a header sector, then the BAT area up to a whole number of clusters as zeroed (allocated) space.
public enum ParallelsCreate {
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size"),
        CreateOptionSpec("cluster_size", .size, "Parallels image cluster size", default: "1048576"),
    ]

    public static let creator = FormatCreator(name: "parallels", options: options, create: create)

    static let maxImageFactor: UInt64 = 1 << 32

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        // The protocol layer creates the (empty) file first, with its own options.
        if o.text("preallocation") == "metadata" { try HostFileCreate.create(r.filename, size: 0, preallocation: .off) }
        try HostFileCreate.create(r.filename, size: 0, preallocation: try RawCreate.preallocation(o.text("preallocation")))
        // qemu rounds both up to a sector silently (in 64 bits, wrapping).
        let total = ((o.size("size") ?? 0) &+ 511) & ~511
        let cl = ((o.size("cluster_size") ?? 1 << 20) &+ 511) & ~511
        if Int64(bitPattern: cl) >= Int64.max / Int64(maxImageFactor) {
            throw InstarError(.invalid, "Cluster size is too large", errno: EINVAL)
        }
        if Int64(bitPattern: total) >= Int64(maxImageFactor) * Int64(cl) {
            throw InstarError(.range, "Image size is too large for this cluster size", errno: E2BIG)
        }
        let batEntries = UInt32(truncatingIfNeeded: total.divCeil(cl))
        let batEnd = UInt32(truncatingIfNeeded: 64 &+ 4 &* UInt64(batEntries))
        var batSectors = UInt32(truncatingIfNeeded: UInt64(batEnd).divCeil(cl))
        batSectors = UInt32(truncatingIfNeeded: (UInt64(batSectors) * cl) >> 9)

        var h = [UInt8](repeating: 0, count: 512)
        for (i, c) in ParallelsFormat.magicExt.enumerated() { h[i] = c }
        h.putU32le(ParallelsFormat.version, at: 16)
        h.putU32le(16, at: 20)
        h.putU32le(UInt32(truncatingIfNeeded: total / 512 / 16 / 32), at: 24)
        h.putU32le(UInt32(truncatingIfNeeded: cl >> 9), at: 28)
        h.putU32le(batEntries, at: 32)
        h.putU64le(total.divCeil(512), at: 36)
        h.putU32le(batSectors, at: 48)

        let file = try HostFile.open(r.filename, writable: true)
        try ImageLock.acquireForOpen(file, writable: true, forceShare: false)
        do {
            try file.write(h, at: 0)
            if batSectors > 1 {
                try file.allocate(at: 512, length: UInt64(batSectors - 1) * 512)
            }
        } catch let e as InstarError {
            throw InstarError(e.code, "Failed to create Parallels image: \(strerrorString(e.errnoValue))",
                              errno: e.errnoValue)
        }
        // On disk before create returns (qemu's close flushes it).
        try file.sync()
    }
}
