// VHDX as oslo.utils inspects it: the "vhdxfile" identifier, the region table at 192 KiB (its metadata region
// entry), the metadata table at the start of that region (an item by GUID, the virtual disk size by default),
// and the item's bytes. Tables are bounded at 2047 entries, an item at 64 KiB.

enum VhdxProbe {
    static let regionTableOffset: UInt64 = 192 * 1024
    static let regionSignature: UInt32 = 0x6967_6572        // "regi"
    static let maxEntries: UInt32 = 2048
    static let metadataTableBytes: UInt64 = 32 * 2048
    static let maxItemBytes: UInt32 = 32 * 2048
    // GUIDs as stored (first three groups little-endian).
    static let metadataRegion = guid(0x8B7C_A206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E])
    static let virtualDiskSize = guid(0x2FA5_4224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8])

    static func guid(_ a: UInt32, _ b: UInt16, _ c: UInt16, _ d: [UInt8]) -> [UInt8] {
        var g = [UInt8](repeating: 0, count: 8)
        g.putU32le(a, at: 0)
        g.putU16le(b, at: 4)
        g.putU16le(c, at: 6)
        return g + d
    }

    /// The region table (regions[0], captured at 192 KiB): where the metadata region starts.
    static func regionTable(_ r: ProbeRegions) throws -> ProbeReport {
        var rep = ProbeReport()
        guard let table = r.region(0) else { rep.need = (regionTableOffset, 64 * 1024); return rep }
        let t = table.bytes
        guard let sig = t.probeU32le(0), let count = t.probeU32le(8) else {
            rep.need = (table.offset, 16)
            return rep
        }
        guard sig == regionSignature else {
            throw InstarError.corrupt("Region signature not found at \(String(table.offset, radix: 16))")
        }
        guard count < maxEntries else { throw InstarError.corrupt("Region count is \(count) (limit 2047)") }
        for i in 0..<Int(count) {
            let at = 16 + 32 * i
            guard at + 32 <= t.count else { throw InstarError.corrupt("vhdx region table is truncated") }
            if Array(t[at..<(at + 16)]) == metadataRegion, let offset = t.probeU64le(at + 16) {
                rep.match = true
                rep.need = (offset, metadataTableBytes)
                return rep
            }
        }
        rep.match = false
        return rep
    }

    /// The metadata table (regions[0], captured at the metadata region's offset): where the item is.
    static func metadataTable(_ r: ProbeRegions, item: [UInt8]?) throws -> ProbeReport {
        var rep = ProbeReport()
        guard let table = r.region(0), table.bytes.count >= 32 else { return rep }   // not enough yet
        let t = table.bytes
        guard t.probeStarts(with: Array("metadata".utf8)) else {
            let shown = t[0..<8].map { (0x20...0x7e).contains($0) ? String(UnicodeScalar($0)) : "\\x" + VmdkProbe.hex2($0) }
            throw InstarError.corrupt("Invalid signature for metadata region: b'\(shown.joined())'")
        }
        let count = Int(t.probeU16le(10) ?? 0)
        guard t.count >= 32 + count * 32 else { return rep }   // not enough yet
        guard count < Int(maxEntries) else { throw InstarError.corrupt("Metadata item count is \(count) (limit 2047)") }
        let want = item ?? virtualDiskSize
        for i in 0..<count {
            let at = 32 + 32 * i
            if Array(t[at..<(at + 16)]) == want, let itemOffset = t.probeU32le(at + 16),
               let itemLength = t.probeU32le(at + 20) {
                rep.match = true
                let (abs, o) = table.offset.addingReportingOverflow(UInt64(itemOffset))
                guard !o else { throw InstarError.corrupt("vhdx metadata item offset is out of range") }
                rep.need = (abs, UInt64(min(itemLength, maxItemBytes)))
                return rep
            }
        }
        rep.match = false
        return rep
    }

    /// The virtual disk size item's bytes (regions[0]).
    static func item(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        guard let size = Probe.first(r).probeU64le(0) else { return rep }
        rep.match = true
        rep.virtualSize = size
        return rep
    }
}
