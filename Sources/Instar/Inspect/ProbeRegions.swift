// Probes read image structures from bytes a caller captured while streaming the file (oslo.utils' format
// inspector model): a list of (offset, bytes) regions, never the disk. Every field access is bounded by the
// regions; a field outside them is "not available", which a probe reports rather than guesses.

/// One captured range of the file.
struct ProbeRegion {
    var offset: UInt64
    var bytes: [UInt8]

    /// The offset one past the last byte, or nil when it would overflow.
    var end: UInt64? {
        let (e, o) = offset.addingReportingOverflow(UInt64(bytes.count))
        return o ? nil : e
    }
}

/// The captured regions of one file, looked up by absolute offset.
struct ProbeRegions {
    var regions: [ProbeRegion]

    /// `count` bytes at `offset` when one region holds them all, else nil.
    func bytes(at offset: UInt64, count: Int) -> [UInt8]? {
        guard count >= 0 else { return nil }
        for r in regions {
            guard let end = r.end, offset >= r.offset else { continue }
            let (want, o) = offset.addingReportingOverflow(UInt64(count))
            guard !o, want <= end else { continue }
            let start = Int(offset - r.offset)
            return Array(r.bytes[start..<(start + count)])
        }
        return nil
    }

    /// The region at index `i` (the caller's order), or nil.
    func region(_ i: Int) -> ProbeRegion? { i >= 0 && i < regions.count ? regions[i] : nil }
}

/// Bounded little/big-endian reads from a byte array: nil past the end, never a trap.
extension Array where Element == UInt8 {
    func probeU16le(_ o: Int) -> UInt16? { try? ByteReader(self).u16le(at: o) }
    func probeU32le(_ o: Int) -> UInt32? { try? ByteReader(self).u32le(at: o) }
    func probeU64le(_ o: Int) -> UInt64? { try? ByteReader(self).u64le(at: o) }
    func probeU16be(_ o: Int) -> UInt16? { try? ByteReader(self).u16be(at: o) }
    func probeU32be(_ o: Int) -> UInt32? { try? ByteReader(self).u32be(at: o) }
    func probeU64be(_ o: Int) -> UInt64? { try? ByteReader(self).u64be(at: o) }
    func probeU8(_ o: Int) -> UInt8? { o >= 0 && o < count ? self[o] : nil }

    /// Whether the array starts with `prefix`.
    func probeStarts(with prefix: [UInt8]) -> Bool { count >= prefix.count && Array(self[0..<prefix.count]) == prefix }
}
