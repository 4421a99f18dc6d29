import Glibc

/// The QED header (docs/interop/qed_spec.txt): 64 little-endian bytes at the start of the file, followed in the
/// header clusters by the backing file name.
struct QedHeader: Equatable {
    static let magic: UInt32 = 0x0044_4551 // "QED\0" read as a little-endian u32
    static let size = 64
    static let featureBackingFile: UInt64 = 0x01
    static let featureNeedCheck: UInt64 = 0x02
    static let featureBackingRaw: UInt64 = 0x04
    static let knownFeatures: UInt64 = 0x07
    static let minClusterSize: UInt32 = 4096
    static let maxClusterSize: UInt32 = 64 << 20
    static let defaultClusterSize: UInt32 = 65536
    static let minTableSize: UInt32 = 1
    static let maxTableSize: UInt32 = 16
    static let defaultTableSize: UInt32 = 4
    /// qemu's bs->backing_file buffer: names of this many bytes or more are refused.
    static let backingNameBuffer = 4096
    /// instar's bound on one L1/L2 table in memory (qemu allows up to 1 GiB: 64 MiB clusters, 16 per table).
    static let maxTableBytes: UInt64 = 128 << 20

    var magic: UInt32 = magic
    var clusterSize: UInt32
    var tableSize: UInt32
    var headerSize: UInt32 = 1
    var features: UInt64 = 0
    var compatFeatures: UInt64 = 0
    var autoclearFeatures: UInt64 = 0
    var l1TableOffset: UInt64
    var imageSize: UInt64
    var backingNameOffset: UInt32 = 0
    var backingNameSize: UInt32 = 0

    init(clusterSize: UInt32, tableSize: UInt32, l1TableOffset: UInt64, imageSize: UInt64) {
        self.clusterSize = clusterSize
        self.tableSize = tableSize
        self.l1TableOffset = l1TableOffset
        self.imageSize = imageSize
    }

    init(bytes: [UInt8]) throws {
        let r = ByteReader(bytes)
        magic = try r.u32le(at: 0)
        clusterSize = try r.u32le(at: 4)
        tableSize = try r.u32le(at: 8)
        headerSize = try r.u32le(at: 12)
        features = try r.u64le(at: 16)
        compatFeatures = try r.u64le(at: 24)
        autoclearFeatures = try r.u64le(at: 32)
        l1TableOffset = try r.u64le(at: 40)
        imageSize = try r.u64le(at: 48)
        backingNameOffset = try r.u32le(at: 56)
        backingNameSize = try r.u32le(at: 60)
    }

    var bytes: [UInt8] {
        var b = [UInt8](repeating: 0, count: QedHeader.size)
        b.putU32le(magic, at: 0)
        b.putU32le(clusterSize, at: 4)
        b.putU32le(tableSize, at: 8)
        b.putU32le(headerSize, at: 12)
        b.putU64le(features, at: 16)
        b.putU64le(compatFeatures, at: 24)
        b.putU64le(autoclearFeatures, at: 32)
        b.putU64le(l1TableOffset, at: 40)
        b.putU64le(imageSize, at: 48)
        b.putU32le(backingNameOffset, at: 56)
        b.putU32le(backingNameSize, at: 60)
        return b
    }

    static func clusterSizeValid(_ v: UInt32) -> Bool {
        v >= minClusterSize && v <= maxClusterSize && v & (v &- 1) == 0
    }

    static func tableSizeValid(_ v: UInt32) -> Bool {
        v >= minTableSize && v <= maxTableSize && v & (v &- 1) == 0
    }

    /// qemu's qed_max_image_size, in its 64-bit arithmetic (a product past 2^64 wraps, to 0 for these powers
    /// of two, and then no size is valid).
    static func maxImageSize(clusterSize: UInt32, tableSize: UInt32) -> UInt64 {
        let entries = UInt64(tableSize &* clusterSize) / 8
        return entries &* UInt64(clusterSize) &* entries
    }

    static func imageSizeValid(_ size: UInt64, clusterSize: UInt32, tableSize: UInt32) -> Bool {
        size % 512 == 0 && size <= maxImageSize(clusterSize: clusterSize, tableSize: tableSize)
    }
}
