import Glibc

/// The 48-byte big-endian header of a qcow (version 1) image, as qemu 7.2's block/qcow.c lays it out.
struct QcowHeader {
    static let size = 48
    static let magic: UInt32 = 0x5146_49FB
    static let version: UInt32 = 1
    static let cryptNone: UInt32 = 0
    static let cryptAES: UInt32 = 1
    /// An L2 entry with this bit holds a compressed cluster: its offset below bit 63 - cluster_bits and its
    /// compressed length in the bits above.
    static let compressedFlag: UInt64 = 1 << 63
    /// qemu's limit on the stored backing file name (it keeps names in a 1024-byte buffer).
    static let maxBackingNameLength: UInt32 = 1023

    var magic: UInt32 = magic
    var version: UInt32 = version
    var backingFileOffset: UInt64 = 0
    var backingFileSize: UInt32 = 0
    var mtime: UInt32 = 0
    var size: UInt64
    var clusterBits: UInt8
    var l2Bits: UInt8
    var cryptMethod: UInt32 = cryptNone
    var l1TableOffset: UInt64

    init(size: UInt64, clusterBits: UInt8, l2Bits: UInt8, l1TableOffset: UInt64) {
        self.size = size
        self.clusterBits = clusterBits
        self.l2Bits = l2Bits
        self.l1TableOffset = l1TableOffset
    }

    init(bytes: [UInt8]) throws {
        let r = ByteReader(bytes)
        magic = try r.u32be(at: 0)
        version = try r.u32be(at: 4)
        backingFileOffset = try r.u64be(at: 8)
        backingFileSize = try r.u32be(at: 16)
        mtime = try r.u32be(at: 20)
        size = try r.u64be(at: 24)
        clusterBits = try r.u8(at: 32)
        l2Bits = try r.u8(at: 33)
        cryptMethod = try r.u32be(at: 36)
        l1TableOffset = try r.u64be(at: 40)
    }

    var bytes: [UInt8] {
        var b = [UInt8](repeating: 0, count: QcowHeader.size)
        b.putU32be(magic, at: 0)
        b.putU32be(version, at: 4)
        b.putU64be(backingFileOffset, at: 8)
        b.putU32be(backingFileSize, at: 16)
        b.putU32be(mtime, at: 20)
        b.putU64be(size, at: 24)
        b[32] = clusterBits
        b[33] = l2Bits
        b.putU32be(cryptMethod, at: 36)
        b.putU64be(l1TableOffset, at: 40)
        return b
    }

    /// qemu's L1 size for these geometry fields: nil when qemu finds the image too large ("Image too large").
    static func l1Size(size: UInt64, clusterBits: UInt8, l2Bits: UInt8) -> UInt64? {
        let shift = UInt64(clusterBits) + UInt64(l2Bits)
        guard shift < 63 else { return nil }
        let span = UInt64(1) << shift
        guard size <= UInt64.max - span else { return nil }
        let n = (size + span - 1) >> shift
        guard n <= UInt64(Int32.max) / 8 else { return nil }
        return n
    }
}
