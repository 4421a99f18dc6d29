import Glibc

/// The Parallels format extension (one cluster: a magic, an MD5 of the rest, then features; qemu 7.2 knows the
/// dirty bitmap feature). qemu reads it on read-only opens only and keeps the bitmaps as plain in-memory ones:
/// they are not persistent, so info never shows them and convert --bitmaps refuses the source. instar parses and
/// validates it the same way, so the same images open or fail with the same message; it keeps no bitmaps.
extension ParallelsFormat {
    static let extMagic: UInt64 = 0xAB23_4CEF_23DC_EA87
    static let dirtyBitmapMagic: UInt64 = 0x2038_5FAE_252C_B34A
    /// instar's bound on the extension cluster it reads into memory.
    static let maxExtensionCluster: UInt64 = 64 << 20

    func readFormatExtension(sectors: UInt64) throws {
        // qemu shifts in 64 bits (wrapping) and asserts a positive offset.
        let extOff = sectors &<< 9
        guard extOff > 0, extOff <= UInt64(Int64.max) else {
            throw InstarError(.invalid, "Invalid Format Extension offset", errno: EINVAL)
        }
        guard clusterSize <= ParallelsFormat.maxExtensionCluster else {
            throw InstarError(.unsupported, "Parallels format extension clusters of \(clusterSize) bytes are larger "
                              + "than instar supports", errno: ENOTSUP)
        }
        if extOff > ParallelsFormat.maxLength || clusterSize > ParallelsFormat.maxLength - extOff {
            throw InstarError(.io, "Failed to read Format Extension cluster: \(strerrorString(EIO))", errno: EIO)
        }
        try CallBudget.reserve(count: clusterSize, of: 1, what: "the format extension cluster")
        var cluster = [UInt8](repeating: 0, count: Int(clusterSize))
        do {
            try cluster.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: extOff) }
        } catch let e as InstarError {
            throw InstarError(e.code, "Failed to read Format Extension cluster: \(strerrorString(e.errnoValue))",
                              errno: e.errnoValue)
        }
        try parseFormatExtension(cluster)
    }

    private func extError(_ text: String) -> InstarError {
        InstarError(.invalid, text, errno: EINVAL)
    }

    private func parseFormatExtension(_ c: [UInt8]) throws {
        let r = ByteReader(c)
        let magic = try r.u64le(at: 0)
        guard magic == ParallelsFormat.extMagic else {
            throw extError("Wrong parallels Format Extension magic: 0x" + String(magic, radix: 16)
                           + ", expected: 0x" + String(ParallelsFormat.extMagic, radix: 16))
        }
        let digest = LuksHash.md5.digest([Array(c[24...])])
        guard digest == Array(c[8..<24]) else {
            throw extError("Wrong checksum in Format Extension header. Format extension is corrupted.")
        }
        var pos = 24
        var remaining = c.count - 24
        var names = Set<String>()
        while true {
            if remaining < 24 {
                throw extError("Can not read feature header, as remaining bytes (\(remaining)) in Format Extension "
                               + "is less than Feature header size (24)")
            }
            let fmagic = try r.u64le(at: pos)
            let flags = try r.u64le(at: pos + 8)
            let dataSize = try r.u32le(at: pos + 16)
            pos += 24
            remaining -= 24
            if flags != 0 { throw extError("Flags for extension feature are unsupported") }
            if UInt64(dataSize) > UInt64(remaining) {
                throw extError("Feature data_size exceedes Format Extension cluster")
            }
            switch fmagic {
            case 0:
                return
            case ParallelsFormat.dirtyBitmapMagic:
                guard pos + Int(dataSize) <= c.count else {
                    throw extError("Feature data_size exceedes Format Extension cluster")
                }
                let name = try checkBitmap(Array(c[pos..<(pos + Int(dataSize))]))
                guard !names.contains(name) else { throw extError("Bitmap already exists: \(name)") }
                names.insert(name)
            default:
                throw extError("Unknown feature: 0x" + String(fmagic, radix: 16))
            }
            // The next feature starts 8-byte aligned from the cluster's start; qemu does not take the data from
            // `remaining`, so it may read past the cluster, where instar stops.
            pos = (pos + Int(dataSize) + 7) & ~7
            if remaining >= 24 && pos + 24 > c.count {
                throw extError("Feature header lies past the Format Extension cluster")
            }
        }
    }

    /// parallels_load_bitmap's checks and reads; returns the bitmap's name (its UUID).
    private func checkBitmap(_ d: [UInt8]) throws -> String {
        guard d.count >= 32 else {
            throw extError("Too small Bitmap Feature area in Parallels Format Extension: \(d.count) bytes, expected "
                           + "at least 32 bytes")
        }
        let r = ByteReader(d)
        let size = try r.u64le(at: 0)
        let granularity = try r.u32le(at: 24) << 9
        let l1Size = try r.u32le(at: 28)
        guard size == totalSectors else {
            throw extError("Bitmap size (in sectors) \(Int64(bitPattern: size)) differs from disk size in sectors "
                           + "\(Int64(bitPattern: totalSectors))")
        }
        if UInt64(l1Size) * 8 > UInt64(d.count - 32) {
            throw extError("Bitmaps feature corrupted: l1 table exceeds extension data_size")
        }
        let name = uuidString(Array(d[8..<24]))
        // qemu asserts a power-of-two granularity of at least one sector.
        guard granularity >= 512, granularity & (granularity - 1) == 0 else {
            throw extError("Invalid bitmap granularity \(granularity)")
        }
        let bmSize = totalSectors &* 512
        // The serialized bitmap: one bit per granule, in whole 64-bit words.
        let bytes: UInt64 = bmSize == 0 ? 0 : (((bmSize - 1) / UInt64(granularity)) / 64 + 1) * 8
        let tabSize = bytes.divCeil(clusterSize)
        guard tabSize == UInt64(l1Size) else {
            throw extError("Bitmap table size \(l1Size) does not correspond to bitmap size and cluster size. "
                           + "Expected \(tabSize)")
        }
        var probe = [UInt8](repeating: 0, count: 1)
        for i in 0..<Int(l1Size) {
            let e = try r.u64le(at: 32 + 8 * i)
            if e == 0 || e == 1 { continue }
            let off = e &<< 9
            if off > ParallelsFormat.maxLength || clusterSize > ParallelsFormat.maxLength - off {
                throw extError("Failed to read bitmap data cluster: \(strerrorString(EIO))")
            }
            do {
                try probe.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: off) }
            } catch let e as InstarError {
                throw InstarError(e.code, "Failed to read bitmap data cluster: \(strerrorString(e.errnoValue))",
                                  errno: e.errnoValue)
            }
        }
        return name
    }

    private func uuidString(_ u: [UInt8]) -> String {
        let hex = u.map { b -> String in
            let s = String(b, radix: 16)
            return s.count == 1 ? "0" + s : s
        }
        return hex[0..<4].joined() + "-" + hex[4..<6].joined() + "-" + hex[6..<8].joined() + "-"
            + hex[8..<10].joined() + "-" + hex[10..<16].joined()
    }
}
