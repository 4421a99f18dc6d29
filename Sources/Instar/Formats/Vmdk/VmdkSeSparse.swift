import Glibc

/// The const header of an ESXi seSparse extent: sector 0 of the extent file, 26 little-endian 64-bit fields
/// and 304 bytes of padding (qemu's VMDKSESparseConstHeader). Sizes and offsets count 512-byte sectors.
struct SeSparseConstHeader {
    static let magicValue: UInt64 = 0xCAFE_BABE
    /// The only version qemu reads (2.1).
    static let supportedVersion: UInt64 = 0x0000_0002_0000_0001
    /// Grains of 8 sectors (4 KiB) and grain tables of 64 sectors (4096 entries) are all qemu knows.
    static let supportedGrainSize: UInt64 = 8
    static let supportedGrainTableSize: UInt64 = 64
    static let fieldsSize = 26 * 8

    var magic: UInt64
    var version: UInt64
    var capacity: UInt64
    var grainSize: UInt64
    var grainTableSize: UInt64
    var flags: UInt64
    var reserved: [UInt64]
    var volatileHeaderOffset: UInt64
    var grainDirOffset: UInt64
    var grainDirSize: UInt64
    var grainTablesOffset: UInt64
    var grainsOffset: UInt64
    /// The padding after the fields is all zero.
    var paddingIsZero: Bool

    /// `b` is the header's 512 bytes.
    init(_ b: [UInt8]) throws {
        let r = ByteReader(b)
        func field(_ i: Int) throws -> UInt64 { try r.u64le(at: i * 8) }
        magic = try field(0)
        version = try field(1)
        capacity = try field(2)
        grainSize = try field(3)
        grainTableSize = try field(4)
        flags = try field(5)
        reserved = try (6...9).map { try field($0) }
        volatileHeaderOffset = try field(10)
        // 11: volatile header size; 12-15: journal header and journal offsets and sizes (qemu reads no journal).
        grainDirOffset = try field(16)
        grainDirSize = try field(17)
        grainTablesOffset = try field(18)
        // 19: grain tables size; 20-23: free bitmap and backmap offsets and sizes.
        grainsOffset = try field(24)
        // 25: grains size.
        paddingIsZero = b.count >= 512 && b[SeSparseConstHeader.fieldsSize..<512].allSatisfy { $0 == 0 }
    }

    /// check_se_sparse_const_header's checks, in its order and with its messages.
    func validate() throws {
        if magic != SeSparseConstHeader.magicValue {
            throw InstarError(.invalid, "Bad const header magic: 0x\(hex16(magic))", errno: EINVAL)
        }
        if version != SeSparseConstHeader.supportedVersion {
            throw InstarError(.unsupported, "Unsupported version: 0x\(hex16(version))", errno: ENOTSUP)
        }
        if grainSize != SeSparseConstHeader.supportedGrainSize {
            throw InstarError(.unsupported, "Unsupported grain size: \(grainSize)", errno: ENOTSUP)
        }
        if grainTableSize != SeSparseConstHeader.supportedGrainTableSize {
            throw InstarError(.unsupported, "Unsupported grain table size: \(grainTableSize)", errno: ENOTSUP)
        }
        if flags != 0 {
            throw InstarError(.unsupported, "Unsupported flags: 0x\(hex16(flags))", errno: ENOTSUP)
        }
        if reserved.contains(where: { $0 != 0 }) {
            let words = reserved.map { "0x" + hex16($0) }.joined(separator: " ")
            throw InstarError(.unsupported, "Unsupported reserved bits: \(words)", errno: ENOTSUP)
        }
        if !paddingIsZero {
            throw InstarError(.unsupported, "Unsupported non-zero const header padding", errno: ENOTSUP)
        }
    }
}

/// The volatile header of a seSparse extent: 4 little-endian 64-bit fields and 480 bytes of padding
/// (qemu's VMDKSESparseVolatileHeader), at the sector the const header names.
struct SeSparseVolatileHeader {
    static let magicValue: UInt64 = 0xCAFE_CAFE

    var magic: UInt64
    var replayJournal: UInt64
    var paddingIsZero: Bool

    /// `b` is the header's 512 bytes.
    init(_ b: [UInt8]) throws {
        let r = ByteReader(b)
        magic = try r.u64le(at: 0)
        // 8: free grain table number, 16: next transaction sequence number (neither is needed to read).
        replayJournal = try r.u64le(at: 24)
        paddingIsZero = b.count >= 512 && b[32..<512].allSatisfy { $0 == 0 }
    }

    /// check_se_sparse_volatile_header's checks: a journal left to replay means writes were interrupted.
    func validate() throws {
        if magic != SeSparseVolatileHeader.magicValue {
            throw InstarError(.invalid, "Bad volatile header magic: 0x\(hex16(magic))", errno: EINVAL)
        }
        if replayJournal != 0 {
            throw InstarError(.unsupported, "Image is dirty, Replaying journal not supported", errno: ENOTSUP)
        }
        if !paddingIsZero {
            throw InstarError(.unsupported, "Unsupported non-zero volatile header padding", errno: ENOTSUP)
        }
    }
}

/// A 64-bit number as 16 lowercase hex digits (printf's %016" PRIx64).
private func hex16(_ v: UInt64) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 16 - s.count)) + s
}
