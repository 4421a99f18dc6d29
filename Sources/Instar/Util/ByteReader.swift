/// A bounds-checked view of untrusted bytes. Every accessor throws `.corrupt` when it would read past the end,
/// so parsers never index a buffer with a computed offset directly.
public struct ByteReader {
    public let bytes: [UInt8]
    /// What the bytes are, for error messages ("qcow2 header").
    public let what: String

    public init(_ bytes: [UInt8], what: String = "image data") {
        self.bytes = bytes
        self.what = what
    }

    public var count: Int { bytes.count }

    @inline(__always)
    private func check(_ offset: Int, _ size: Int) throws {
        guard offset >= 0, size >= 0, offset <= bytes.count, size <= bytes.count - offset else {
            throw InstarError.corrupt("\(what) is truncated")
        }
    }

    public func u8(at offset: Int) throws -> UInt8 {
        try check(offset, 1)
        return bytes[offset]
    }

    public func u16be(at o: Int) throws -> UInt16 {
        try check(o, 2)
        return UInt16(bytes[o]) << 8 | UInt16(bytes[o + 1])
    }

    public func u32be(at o: Int) throws -> UInt32 {
        try check(o, 4)
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[o + i]) }
        return v
    }

    public func u64be(at o: Int) throws -> UInt64 {
        try check(o, 8)
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(bytes[o + i]) }
        return v
    }

    public func u16le(at o: Int) throws -> UInt16 {
        try check(o, 2)
        return UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8
    }

    public func u32le(at o: Int) throws -> UInt32 {
        try check(o, 4)
        var v: UInt32 = 0
        for i in (0..<4).reversed() { v = v << 8 | UInt32(bytes[o + i]) }
        return v
    }

    public func u64le(at o: Int) throws -> UInt64 {
        try check(o, 8)
        var v: UInt64 = 0
        for i in (0..<8).reversed() { v = v << 8 | UInt64(bytes[o + i]) }
        return v
    }

    public func slice(at o: Int, count n: Int) throws -> [UInt8] {
        try check(o, n)
        return Array(bytes[o..<(o + n)])
    }

    /// Bytes at `o` up to `n` long, decoded as UTF-8 (invalid sequences repaired), stopping at a NUL.
    public func string(at o: Int, count n: Int) throws -> String {
        var s = try slice(at: o, count: n)
        if let nul = s.firstIndex(of: 0) { s.removeSubrange(nul...) }
        return String(decoding: s, as: UTF8.self)
    }
}

/// Big-endian and little-endian stores into a byte array, for writing metadata.
extension Array where Element == UInt8 {
    public mutating func putU16be(_ v: UInt16, at o: Int) { self[o] = UInt8(v >> 8); self[o + 1] = UInt8(v & 0xff) }
    public mutating func putU32be(_ v: UInt32, at o: Int) { for i in 0..<4 { self[o + i] = UInt8((v >> (24 - 8 * UInt32(i))) & 0xff) } }
    public mutating func putU64be(_ v: UInt64, at o: Int) { for i in 0..<8 { self[o + i] = UInt8((v >> (56 - 8 * UInt64(i))) & 0xff) } }
    public mutating func putU16le(_ v: UInt16, at o: Int) { self[o] = UInt8(v & 0xff); self[o + 1] = UInt8(v >> 8) }
    public mutating func putU32le(_ v: UInt32, at o: Int) { for i in 0..<4 { self[o + i] = UInt8((v >> (8 * UInt32(i))) & 0xff) } }
    public mutating func putU64le(_ v: UInt64, at o: Int) { for i in 0..<8 { self[o + i] = UInt8((v >> (8 * UInt64(i))) & 0xff) } }
}
