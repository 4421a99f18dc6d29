import Glibc

/// Creating VHD images as qemu's vpc_co_create_opts does: the size rounded up to a CHS geometry (unless
/// `force_size`), a dynamic image with 2 MiB blocks and an empty BAT, or a fixed one (guest bytes + footer).
/// qemu has no measure for vpc.
public enum VpcCreate {
    public static let creator = FormatCreator(
        name: "vpc",
        options: [
            CreateOptionSpec("size", .size, "Virtual disk size"),
            CreateOptionSpec("subformat", .string,
                             "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "),
            CreateOptionSpec("force_size", .bool,
                             "Force disk size calculation to use the actual size specified, rather than using "
                                + "the nearest CHS-based calculation"),
        ],
        create: create)

    static let blockSize: UInt64 = 0x20_0000

    /// qemu's calculate_geometry: the CHS geometry for `totalSectors` (capped at the largest one).
    static func geometry(_ totalSectors: UInt64) -> (cyls: UInt64, heads: UInt64, secs: UInt64) {
        let total = min(totalSectors, Vpc.maxGeometry)
        var secs: UInt64
        var heads: UInt64
        var cylsTimesHeads: UInt64
        if total >= 65535 * 16 * 63 {
            secs = 255
            heads = 16
            cylsTimesHeads = total / secs
        } else {
            secs = 17
            cylsTimesHeads = total / secs
            heads = UInt64(UInt8(truncatingIfNeeded: cylsTimesHeads.divCeil(1024)))
            if heads < 4 { heads = 4 }
            if cylsTimesHeads >= heads * 1024 || heads > 16 {
                secs = 31
                heads = 16
                cylsTimesHeads = total / secs
            }
            if cylsTimesHeads >= heads * 1024 {
                secs = 63
                heads = 16
                cylsTimesHeads = total / secs
            }
        }
        // qemu keeps the cylinders, heads and sectors in 16 and 8 bits.
        return (UInt64(UInt16(truncatingIfNeeded: cylsTimesHeads / heads)), UInt64(UInt8(truncatingIfNeeded: heads)),
                UInt64(UInt8(truncatingIfNeeded: secs)))
    }

    /// qemu's calculate_rounded_image_size: the geometry and the sector count of an image of `size` bytes.
    static func roundedSize(_ size: UInt64, forceSize: Bool) throws
        -> (cyls: UInt64, heads: UInt64, secs: UInt64, totalSectors: UInt64)
    {
        var g: (cyls: UInt64, heads: UInt64, secs: UInt64) = (0, 0, 0)
        if forceSize {
            g = (65535, 16, 255)
        } else {
            let total = min(Vpc.maxGeometry, size / 512)
            var i: UInt64 = 0
            while total > g.cyls * g.heads * g.secs {
                g = geometry(total + i)
                i += 1
            }
        }
        let total: UInt64
        if g.cyls * g.heads * g.secs == Vpc.maxGeometry {
            total = size / 512
            guard total <= Vpc.maxSectors else {
                throw InstarError(.range, "Disk size is too large, max size is 2040 GiB", errno: EFBIG)
            }
        } else {
            total = g.cyls * g.heads * g.secs
        }
        return (g.cyls, g.heads, g.secs, total)
    }

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        // The host file is created empty first (the vpc options do not reach it), so it stays when the vpc
        // options are refused.
        try HostFileCreate.create(r.filename, size: 0, preallocation: .off)
        let fixed: Bool
        switch o.text("subformat") {
        case nil, "dynamic": fixed = false
        case "fixed": fixed = true
        case let other?:
            throw InstarError.invalid("Parameter 'subformat' does not accept value '\(other)'")
        }
        let forceSize = o.bool("force_size")
        var size = try (o.size("size") ?? 0).alignedUp(512)
        if !forceSize {
            size = try roundedSize(size, forceSize: false).totalSectors * 512
        }
        let g = try roundedSize(size, forceSize: forceSize)

        var footer = [UInt8](repeating: 0, count: 512)
        func put(_ offset: Int, _ text: String) {
            for (i, b) in text.utf8.enumerated() { footer[offset + i] = b }
        }
        put(0, "conectix")
        Vpc.putBE(&footer, 8, 2, width: 4)
        Vpc.putBE(&footer, 12, 0x0001_0000, width: 4)
        Vpc.putBE(&footer, 16, fixed ? UInt64.max : 512, width: 8)
        let now = time(nil)
        Vpc.putBE(&footer, 24, UInt64(truncatingIfNeeded: Int(now) - Vpc.timestampBase), width: 4)
        put(28, forceSize ? "qem2" : "qemu")
        Vpc.putBE(&footer, 32, 5, width: 2)
        Vpc.putBE(&footer, 34, 3, width: 2)
        put(36, "Wi2k")
        Vpc.putBE(&footer, 40, size, width: 8)
        Vpc.putBE(&footer, 48, size, width: 8)
        Vpc.putBE(&footer, 56, g.cyls, width: 2)
        footer[58] = UInt8(truncatingIfNeeded: g.heads)
        footer[59] = UInt8(truncatingIfNeeded: g.secs)
        Vpc.putBE(&footer, 60, UInt64(fixed ? Vpc.typeFixed : Vpc.typeDynamic), width: 4)
        var uuid = Gcrypt.randomBytes(16)
        uuid[6] = (uuid[6] & 0x0F) | 0x40
        uuid[8] = (uuid[8] & 0x3F) | 0x80
        for i in 0..<16 { footer[68 + i] = uuid[i] }
        Vpc.putBE(&footer, 64, UInt64(Vpc.checksum(footer)), width: 4)

        let file = try HostFile.open(r.filename, writable: true)
        if fixed {
            let total = try size.adding(512)
            try HostFileCreate.grow(file, to: total, preallocation: .off)
            do {
                try file.write(footer, at: total - 512)
            } catch let e as InstarError {
                throw InstarError(e.code, "Unable to write VHD header: \(strerrorString(e.errnoValue))",
                                  errno: e.errnoValue)
            }
            // On disk before create returns (qemu's close flushes it).
            try file.sync()
            return
        }
        do {
            let entries = g.totalSectors.divCeil(blockSize / 512)
            let tableBytes = try (entries * 4).alignedUp(512)
            try file.write(footer, at: 0)
            try file.write(footer, at: 1536 + tableBytes)
            if tableBytes > 0 {
                let ff = [UInt8](repeating: 0xFF, count: Int(min(tableBytes, 1 << 20)))
                var done: UInt64 = 0
                while done < tableBytes {
                    let n = Int(min(UInt64(ff.count), tableBytes - done))
                    try ff.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: 1536 + done) }
                    done += UInt64(n)
                }
            }
            var header = [UInt8](repeating: 0, count: 1024)
            for (i, b) in "cxsparse".utf8.enumerated() { header[i] = b }
            Vpc.putBE(&header, 8, UInt64.max, width: 8)
            Vpc.putBE(&header, 16, 1536, width: 8)
            Vpc.putBE(&header, 24, 0x0001_0000, width: 4)
            Vpc.putBE(&header, 28, entries, width: 4)
            Vpc.putBE(&header, 32, blockSize, width: 4)
            Vpc.putBE(&header, 36, UInt64(Vpc.checksum(header)), width: 4)
            try file.write(header, at: 512)
        } catch let e as InstarError {
            throw InstarError(e.code, "Unable to create or write VHD header", errno: e.errnoValue)
        }
        try file.sync()
    }
}
