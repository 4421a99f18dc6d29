import Glibc

extension Qcow2Format {
    /// qcow2_update_header: the whole first cluster is written again from `h` (header fields, then the backing
    /// format, data file, encryption, feature-name and bitmaps extensions, then the extensions qemu does not
    /// know, then the backing file name).
    func writeHeaderCluster(_ h: Qcow2Header, bitmaps: Qcow2BitmapsExtension?) throws {
        let cs = Int(h.clusterSize)
        var b = [UInt8](repeating: 0, count: cs)
        func put(_ at: Int, _ v: UInt64, _ n: Int) {
            for i in 0..<n where at + i < b.count { b[at + i] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - i))) }
        }
        put(0, UInt64(Qcow2.magic), 4)
        put(4, UInt64(h.version), 4)
        put(20, UInt64(h.clusterBits), 4)
        put(24, h.size, 8)
        put(32, UInt64(h.cryptMethod), 4)
        put(36, UInt64(h.l1Size), 4)
        put(40, h.l1TableOffset, 8)
        put(48, h.refcountTableOffset, 8)
        put(56, UInt64(h.refcountTableClusters), 4)
        put(60, UInt64(h.nbSnapshots), 4)
        put(64, h.snapshotsOffset, 8)
        var pos = 72
        if h.version >= 3 {
            put(72, h.incompatibleFeatures, 8)
            put(80, h.compatibleFeatures, 8)
            put(88, h.autoclearFeatures, 8)
            put(96, UInt64(h.refcountOrder), 4)
            put(100, UInt64(112 + unknownHeaderFields.count), 4)
            b[104] = h.compressionType
            pos = 112
        }
        // qemu keeps the header fields it does not know (read from bytes 112 up to header_length) right after the
        // fields it writes, a version 2 header included.
        let extra = unknownHeaderFields
        guard pos + extra.count + 8 <= cs else { throw Self.headerFull }
        for (i, x) in extra.enumerated() { b[pos + i] = x }
        pos += extra.count
        func ext(_ magic: UInt32, _ data: [UInt8]) throws {
            let padded = (data.count + 7) & ~7
            guard pos + 8 + padded + 8 <= cs else { throw Self.headerFull }
            put(pos, UInt64(magic), 4)
            put(pos + 4, UInt64(data.count), 4)
            for (i, x) in data.enumerated() { b[pos + 8 + i] = x }
            pos += 8 + padded
        }
        let ext0 = extensions
        if let f = backingReference?.format { try ext(0xe279_2aca, Array(f.utf8)) }
        if let d = ext0.dataFile { try ext(0x4441_5441, Array(d.utf8)) }
        if let c = ext0.crypto {
            var d = [UInt8](repeating: 0, count: 16)
            for i in 0..<8 { d[i] = UInt8(truncatingIfNeeded: c.offset >> UInt64(56 - 8 * i)) }
            for i in 0..<8 { d[8 + i] = UInt8(truncatingIfNeeded: c.length >> UInt64(56 - 8 * i)) }
            try ext(0x0537_be77, d)
        }
        // qemu 7.2 leaves the feature-name table out when clusters are 4 KiB or smaller (as Qcow2Builder does).
        if h.version >= 3 && h.clusterSize > 4096 {
            try ext(0x6803_f857, Qcow2Extensions.featureNameTable())
        }
        if let bm = bitmaps {
            var d = [UInt8](repeating: 0, count: Int(Qcow2Extensions.bitmapsExtensionBytes))
            for i in 0..<4 { d[i] = UInt8(truncatingIfNeeded: bm.count >> UInt32(24 - 8 * i)) }
            for i in 0..<8 { d[8 + i] = UInt8(truncatingIfNeeded: bm.directorySize >> UInt64(56 - 8 * i)) }
            for i in 0..<8 { d[16 + i] = UInt8(truncatingIfNeeded: bm.directoryOffset >> UInt64(56 - 8 * i)) }
            try ext(Qcow2.extBitmaps, d)
        }
        for u in ext0.unknown { try ext(u.type, u.data) }
        pos += 8
        if let name = backingReference?.filename {
            let bytes = Array(name.utf8)
            guard bytes.count <= 1023 else { throw InstarError.invalid("Backing file name too long") }
            guard pos + bytes.count <= cs else { throw Self.headerFull }
            put(8, UInt64(pos), 8)
            put(16, UInt64(bytes.count), 4)
            for (i, c) in bytes.enumerated() { b[pos + i] = c }
        }
        try file.write(b, at: 0)
        try file.sync()
        header = h
    }

    /// qcow2_update_header's -ENOSPC: the header, its extensions and the backing file name must fit in the first
    /// cluster.
    static let headerFull = InstarError(.io, "No space left on device", errno: ENOSPC)
}
