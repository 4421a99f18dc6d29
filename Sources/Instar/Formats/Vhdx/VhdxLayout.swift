import Glibc

/// VHDX on-disk structures (Microsoft's VHDX 1.0 specification, as qemu 7.2's block/vhdx*.c reads and writes
/// them): constants, the CRC-32C every structure carries, GUIDs, and the header, region table, metadata table,
/// BAT entry and log entry layouts. All fields are little-endian.
enum Vhdx {
    static let kiB: UInt64 = 1024
    static let miB: UInt64 = 1 << 20
    /// The header section: file identifier, two headers, two region tables, each in a 64 KiB block.
    static let headerBlockSize: UInt64 = 64 * 1024
    static let header1Offset: UInt64 = 64 * 1024
    static let header2Offset: UInt64 = 128 * 1024
    static let regionTable1Offset: UInt64 = 192 * 1024
    static let regionTable2Offset: UInt64 = 256 * 1024
    static let headerSectionEnd: UInt64 = 1 << 20
    /// The part of a header block its checksum covers.
    static let headerSize = 4096
    /// The bytes of the header structure itself (qemu writes only these).
    static let headerStructSize = 80
    static let headerSignature: UInt32 = 0x6461_6568 // "head"
    static let regionSignature: UInt32 = 0x6967_6572 // "regi"
    static let metadataSignature: UInt64 = 0x6174_6164_6174_656D // "metadata"
    static let metadataTableMaxSize = 32 * 2048
    static let maxRegionEntries: UInt32 = 2047
    static let blockSizeMin: UInt64 = 1 << 20
    static let blockSizeMax: UInt64 = 256 << 20
    static let maxImageSize: UInt64 = 64 << 40
    static let maxSectorsPerBlock: UInt64 = 1 << 23
    static let defaultLogSize: UInt64 = 1 << 20

    // Payload block states (the low 3 bits of a BAT entry).
    static let blockNotPresent: UInt64 = 0
    static let blockUndefined: UInt64 = 1
    static let blockZero: UInt64 = 2
    static let blockUnmapped: UInt64 = 3
    static let blockUnmappedV095: UInt64 = 5
    static let blockFullyPresent: UInt64 = 6
    static let blockPartiallyPresent: UInt64 = 7
    static let batStateMask: UInt64 = 7
    static let batOffsetMask: UInt64 = 0xFFFF_FFFF_FFF0_0000

    // Metadata flags.
    static let metaIsRequired: UInt32 = 4
    static let metaIsVirtualDisk: UInt32 = 2
    static let regionRequired: UInt32 = 1
    static let paramsLeaveBlocksAllocated: UInt32 = 1
    static let paramsHasParent: UInt32 = 2

    // The log.
    static let logSectorSize: UInt64 = 4096
    static let logSignature: UInt32 = 0x6567_6F6C // "loge"
    static let logDescSignature: UInt32 = 0x6373_6564 // "desc"
    static let logZeroSignature: UInt32 = 0x6F72_657A // "zero"
    static let logDataSignature: UInt32 = 0x6174_6164 // "data"

    /// A GUID as its 16 bytes on disk (data1..data3 little-endian, then data4).
    static func guid(_ d1: UInt32, _ d2: UInt16, _ d3: UInt16, _ d4: [UInt8]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 16)
        b.putU32le(d1, at: 0)
        b.putU16le(d2, at: 4)
        b.putU16le(d3, at: 6)
        for i in 0..<8 { b[8 + i] = d4[i] }
        return b
    }

    static let batGUID = guid(0x2dc27766, 0xf623, 0x4200, [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08])
    static let metadataGUID = guid(0x8b7ca206, 0x4790, 0x4b9a, [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e])
    static let fileParamGUID = guid(0xcaa16737, 0xfa36, 0x4d43, [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b])
    static let virtualSizeGUID = guid(0x2FA54224, 0xcd1b, 0x4876, [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8])
    static let page83GUID = guid(0xbeca12ab, 0xb2e6, 0x4523, [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46])
    static let physSectorGUID = guid(0xcda348c7, 0x445d, 0x4471, [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56])
    static let parentLocatorGUID = guid(0xa8d35f2d, 0xb30b, 0x454d, [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c])
    static let logicalSectorGUID = guid(0x8141bf1d, 0xa96f, 0x4709, [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f])
    static let zeroGUID = [UInt8](repeating: 0, count: 16)

    /// A random version 4 UUID's bytes, as qemu_uuid_generate makes them.
    static func newGUID() -> [UInt8] {
        var rng = SystemRandomNumberGenerator()
        var b = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
        b[6] = (b[6] & 0x0f) | 0x40
        b[8] = (b[8] & 0x3f) | 0x80
        return b
    }

    /// An error qemu reports with strerror only ("Could not open 'x': Invalid argument" once prefixed).
    static func errnoError(_ e: Int32) -> InstarError {
        let code: InstarError.Code = e == ENOTSUP ? .unsupported : (e == EIO ? .io : .invalid)
        return InstarError(code, strerrorString(e), errno: e)
    }
}

/// CRC-32C (Castagnoli), table-driven, as qemu's util/crc32c.c.
enum CRC32C {
    static let table: [UInt32] = (0..<256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }

    /// Continues a running (not yet inverted) CRC over `bytes`.
    static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var c = crc
        table.withUnsafeBufferPointer { t in
            for b in bytes { c = t[Int((c ^ UInt32(b)) & 0xff)] ^ (c >> 8) }
        }
        return c
    }

    /// The checksum of `bytes` with the 4 bytes at `crcOffset` taken as zero (the VHDX convention).
    static func checksum(_ bytes: [UInt8], zeroingAt crcOffset: Int?) -> UInt32 {
        var copy = bytes
        if let o = crcOffset, o >= 0, o + 4 <= copy.count { for i in o..<(o + 4) { copy[i] = 0 } }
        return copy.withUnsafeBytes { update(0xFFFF_FFFF, $0) } ^ 0xFFFF_FFFF
    }

    /// Whether the checksum stored at `crcOffset` matches.
    static func isValid(_ bytes: [UInt8], crcOffset: Int) -> Bool {
        guard let stored = try? ByteReader(bytes).u32le(at: crcOffset) else { return false }
        return checksum(bytes, zeroingAt: crcOffset) == stored
    }

    /// Stores the checksum of `bytes` at `crcOffset`.
    static func stamp(_ bytes: inout [UInt8], crcOffset: Int) {
        let c = checksum(bytes, zeroingAt: crcOffset)
        bytes.putU32le(c, at: crcOffset)
    }
}

/// One of the two headers (VHDXHeader).
struct VhdxHeader: Equatable {
    var signature: UInt32
    var checksum: UInt32
    var sequenceNumber: UInt64
    var fileWriteGUID: [UInt8]
    var dataWriteGUID: [UInt8]
    var logGUID: [UInt8]
    var logVersion: UInt16
    var version: UInt16
    var logLength: UInt32
    var logOffset: UInt64

    init(bytes: [UInt8]) throws {
        let r = ByteReader(bytes)
        signature = try r.u32le(at: 0)
        checksum = try r.u32le(at: 4)
        sequenceNumber = try r.u64le(at: 8)
        fileWriteGUID = try r.slice(at: 16, count: 16)
        dataWriteGUID = try r.slice(at: 32, count: 16)
        logGUID = try r.slice(at: 48, count: 16)
        logVersion = try r.u16le(at: 64)
        version = try r.u16le(at: 66)
        logLength = try r.u32le(at: 68)
        logOffset = try r.u64le(at: 72)
    }

    /// The 4 KiB block: `base` (what is on disk, or zeroes) with this header written over its start and the
    /// checksum computed over all of it.
    func encoded(over base: [UInt8]) -> [UInt8] {
        var b = base.count == Vhdx.headerSize ? base : [UInt8](repeating: 0, count: Vhdx.headerSize)
        b.putU32le(signature, at: 0)
        b.putU32le(0, at: 4)
        b.putU64le(sequenceNumber, at: 8)
        for i in 0..<16 {
            b[16 + i] = fileWriteGUID[i]
            b[32 + i] = dataWriteGUID[i]
            b[48 + i] = logGUID[i]
        }
        b.putU16le(logVersion, at: 64)
        b.putU16le(version, at: 66)
        b.putU32le(logLength, at: 68)
        b.putU64le(logOffset, at: 72)
        CRC32C.stamp(&b, crcOffset: 4)
        return b
    }
}

/// A region table entry.
struct VhdxRegion {
    var guid: [UInt8]
    var fileOffset: UInt64
    var length: UInt32
    var dataBits: UInt32
}

/// The header of a log entry (VHDXLogEntryHeader, 64 bytes).
struct VhdxLogEntryHeader {
    var signature: UInt32
    var checksum: UInt32
    var entryLength: UInt32
    var tail: UInt32
    var sequenceNumber: UInt64
    var descriptorCount: UInt32
    var logGUID: [UInt8]
    var flushedFileOffset: UInt64
    var lastFileOffset: UInt64

    init(bytes: [UInt8]) throws {
        let r = ByteReader(bytes)
        signature = try r.u32le(at: 0)
        checksum = try r.u32le(at: 4)
        entryLength = try r.u32le(at: 8)
        tail = try r.u32le(at: 12)
        sequenceNumber = try r.u64le(at: 16)
        descriptorCount = try r.u32le(at: 24)
        logGUID = try r.slice(at: 32, count: 16)
        flushedFileOffset = try r.u64le(at: 48)
        lastFileOffset = try r.u64le(at: 56)
    }
}

/// A log descriptor (32 bytes): a data descriptor ("desc") or a zero descriptor ("zero").
struct VhdxLogDescriptor {
    var signature: UInt32
    /// Data: the last 4 bytes of the sector.
    var trailingBytes: UInt32
    /// Data: the first 8 bytes of the sector (zero: the length to zero).
    var leadingBytes: UInt64
    var fileOffset: UInt64
    var sequenceNumber: UInt64

    init(bytes: [UInt8], at o: Int) throws {
        let r = ByteReader(bytes)
        signature = try r.u32le(at: o)
        trailingBytes = try r.u32le(at: o + 4)
        leadingBytes = try r.u64le(at: o + 8)
        fileOffset = try r.u64le(at: o + 16)
        sequenceNumber = try r.u64le(at: o + 24)
    }
}
