/// The qcow2 header (docs/interop/qcow2.txt "Header"), decoded and validated in one place. Every check and its
/// message follow qemu's qcow2_do_open so that `instar info` fails the same way qemu-img does on a bad image.

/// On-disk constants of qcow2, each with its place in the spec.
enum Qcow2 {
    // qcow2.txt: header bytes 0-3 magic "QFI\xfb".
    static let magic: UInt32 = 0x5146_49fb
    // qcow2.txt: the fixed part of a version 2 header is 72 bytes; version 3 adds fields up to byte 103.
    static let v2HeaderLength: UInt32 = 72
    static let v3MinHeaderLength: UInt32 = 104
    // qcow2.txt: header byte 104 compression_type, present when header_length > 104.
    static let compressionTypeOffset = 104
    /// How many header bytes we decode (qemu's QCowHeader including its padding).
    static let decodedHeaderBytes = 112
    // qemu MIN_CLUSTER_BITS / MAX_CLUSTER_BITS: cluster sizes 512 B .. 2 MiB.
    static let minClusterBits: UInt32 = 9
    static let maxClusterBits: UInt32 = 21
    // qcow2.txt: crypt_method 0 none, 1 AES-CBC, 2 LUKS.
    static let cryptNone: UInt32 = 0
    static let cryptAES: UInt32 = 1
    static let cryptLUKS: UInt32 = 2

    // qcow2.txt: incompatible feature bits.
    static let incompatDirty: UInt64 = 1 << 0
    static let incompatCorrupt: UInt64 = 1 << 1
    static let incompatDataFile: UInt64 = 1 << 2
    static let incompatCompression: UInt64 = 1 << 3
    static let incompatExtendedL2: UInt64 = 1 << 4
    static let incompatKnownMask: UInt64 = 0x1f
    // qcow2.txt: compatible feature bit 0 lazy refcounts.
    static let compatLazyRefcounts: UInt64 = 1 << 0
    // qcow2.txt: autoclear bit 0 bitmaps extension consistent, bit 1 raw external data.
    static let autoclearBitmaps: UInt64 = 1 << 0
    static let autoclearDataFileRaw: UInt64 = 1 << 1
    /// The autoclear bits qemu 7.2 knows (QCOW2_AUTOCLEAR_MASK); a writable open clears the others.
    static let autoclearKnown: UInt64 = autoclearBitmaps | autoclearDataFileRaw

    // qcow2.txt: compression_type 0 zlib, 1 zstd.
    static let compressionZlib: UInt8 = 0
    static let compressionZstd: UInt8 = 1

    // qcow2.txt: L1 entry bits 9-55 hold the L2 table offset; L2 entry bits 9-55 the cluster offset.
    static let l1OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let l2OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    // qcow2.txt: L2 entry bit 62 compressed, bit 63 copied (refcount 1), bit 0 reads as zeroes (v3).
    static let l2Compressed: UInt64 = 1 << 62
    static let l2Copied: UInt64 = 1 << 63
    static let l2Zero: UInt64 = 1 << 0
    // qcow2.txt: refcount table entry bits 9-63 hold the refcount block offset.
    static let reftableOffsetMask: UInt64 = 0xffff_ffff_ffff_fe00
    // qcow2.txt "Extended L2 Entries": 32 subclusters per cluster.
    static let subclustersPerCluster: UInt64 = 32
    // qcow2.txt: compressed cluster sizes count 512-byte sectors.
    static let compressedSectorSize: UInt64 = 512

    // qemu limits (block/qcow2.h).
    static let maxRefcountTableBytes: UInt64 = 8 << 20    // QCOW_MAX_REFTABLE_SIZE
    static let maxL1Bytes: UInt64 = 32 << 20              // QCOW_MAX_L1_SIZE
    static let maxSnapshots: UInt64 = 65536               // QCOW_MAX_SNAPSHOTS
    static let snapshotHeaderSize: UInt64 = 40            // sizeof(QCowSnapshotHeader)
    static let maxSnapshotExtraData: UInt32 = 1024        // QCOW_MAX_SNAPSHOT_EXTRA_DATA
    static let maxSnapshotTableBytes: UInt64 = 64 << 20   // QCOW_MAX_SNAPSHOTS_SIZE
    static let maxBackingNameLength: UInt32 = 1023
    static let maxBitmaps: UInt32 = 65535                 // QCOW2_MAX_BITMAPS
    static let maxBitmapDirectoryBytes: UInt64 = 1024 * 65535

    // qcow2.txt "Header extensions": type magics.
    static let extEnd: UInt32 = 0
    static let extBackingFormat: UInt32 = 0xe279_2aca
    static let extFeatureTable: UInt32 = 0x6803_f857
    static let extBitmaps: UInt32 = 0x2385_2875
    static let extCryptoHeader: UInt32 = 0x0537_be77
    static let extDataFile: UInt32 = 0x4441_5441
}

/// The validated header fields. Construction throws qemu's message for anything qemu refuses to open.
struct Qcow2Header: Equatable {
    var version: UInt32
    var backingFileOffset: UInt64
    var backingFileSize: UInt32
    var clusterBits: UInt32
    /// Guest size as stored (bytes).
    var size: UInt64
    var cryptMethod: UInt32
    var l1Size: UInt32
    var l1TableOffset: UInt64
    var refcountTableOffset: UInt64
    var refcountTableClusters: UInt32
    var nbSnapshots: UInt32
    var snapshotsOffset: UInt64
    var incompatibleFeatures: UInt64
    var compatibleFeatures: UInt64
    var autoclearFeatures: UInt64
    var refcountOrder: UInt32
    var headerLength: UInt32
    var compressionType: UInt8

    var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    var extendedL2: Bool { incompatibleFeatures & Qcow2.incompatExtendedL2 != 0 }
    var hasDataFile: Bool { incompatibleFeatures & Qcow2.incompatDataFile != 0 }
    var dataFileRaw: Bool { autoclearFeatures & Qcow2.autoclearDataFileRaw != 0 }
    /// Bytes per L2 entry: 8, or 16 with extended L2 (entry + subcluster bitmap).
    var l2EntryBytes: UInt64 { extendedL2 ? 16 : 8 }
    /// log2 of entries per L2 table.
    var l2Bits: UInt64 { UInt64(clusterBits) - (extendedL2 ? 4 : 3) }
    var subclustersPerCluster: UInt64 { extendedL2 ? Qcow2.subclustersPerCluster : 1 }
    var subclusterSize: UInt64 { clusterSize / subclustersPerCluster }
    /// Where the header extensions end: at the backing file name, else at the end of the first cluster.
    var extensionsEnd: UInt64 { backingFileOffset != 0 ? backingFileOffset : clusterSize }

    /// Decodes the first bytes of the image (at least `Qcow2.decodedHeaderBytes`, zero padded past end of file)
    /// and runs the checks qemu makes before it looks at extensions. Unknown incompatible features are reported
    /// by the caller, which needs the feature name table.
    init(bytes: [UInt8]) throws {
        let r = ByteReader(bytes, what: "qcow2 header")
        // qcow2.txt: header bytes 0-3 magic, 4-7 version.
        guard try r.u32be(at: 0) == Qcow2.magic else { throw InstarError.invalid("Image is not in qcow2 format") }
        version = try r.u32be(at: 4)
        guard version == 2 || version == 3 else {
            throw InstarError.unsupported("Unsupported qcow2 version \(version)")
        }
        backingFileOffset = try r.u64be(at: 8)   // qcow2.txt: bytes 8-15 backing_file_offset
        backingFileSize = try r.u32be(at: 16)    // qcow2.txt: bytes 16-19 backing_file_size
        clusterBits = try r.u32be(at: 20)        // qcow2.txt: bytes 20-23 cluster_bits
        size = try r.u64be(at: 24)               // qcow2.txt: bytes 24-31 size
        cryptMethod = try r.u32be(at: 32)        // qcow2.txt: bytes 32-35 crypt_method
        l1Size = try r.u32be(at: 36)             // qcow2.txt: bytes 36-39 l1_size
        l1TableOffset = try r.u64be(at: 40)      // qcow2.txt: bytes 40-47 l1_table_offset
        refcountTableOffset = try r.u64be(at: 48)    // qcow2.txt: bytes 48-55 refcount_table_offset
        refcountTableClusters = try r.u32be(at: 56)  // qcow2.txt: bytes 56-59 refcount_table_clusters
        nbSnapshots = try r.u32be(at: 60)        // qcow2.txt: bytes 60-63 nb_snapshots
        snapshotsOffset = try r.u64be(at: 64)    // qcow2.txt: bytes 64-71 snapshots_offset

        guard clusterBits >= Qcow2.minClusterBits, clusterBits <= Qcow2.maxClusterBits else {
            throw InstarError.invalid("Unsupported cluster size: 2^\(clusterBits)")
        }
        let clusterSize = UInt64(1) << UInt64(clusterBits)

        if version == 2 {
            // Version 2 has none of the later fields: qemu assumes these values.
            incompatibleFeatures = 0
            compatibleFeatures = 0
            autoclearFeatures = 0
            refcountOrder = 4
            headerLength = Qcow2.v2HeaderLength
        } else {
            incompatibleFeatures = try r.u64be(at: 72)   // qcow2.txt: bytes 72-79
            compatibleFeatures = try r.u64be(at: 80)     // qcow2.txt: bytes 80-87
            autoclearFeatures = try r.u64be(at: 88)      // qcow2.txt: bytes 88-95
            refcountOrder = try r.u32be(at: 96)          // qcow2.txt: bytes 96-99
            headerLength = try r.u32be(at: 100)          // qcow2.txt: bytes 100-103
            guard headerLength >= Qcow2.v3MinHeaderLength else { throw InstarError.invalid("qcow2 header too short") }
        }
        guard UInt64(headerLength) <= clusterSize else { throw InstarError.invalid("qcow2 header exceeds cluster size") }
        guard backingFileOffset <= clusterSize else { throw InstarError.invalid("Invalid backing file offset") }

        // qcow2.txt: byte 104 compression_type, only when the header is long enough to hold it.
        compressionType = headerLength > UInt32(Qcow2.compressionTypeOffset)
            ? try r.u8(at: Qcow2.compressionTypeOffset) : Qcow2.compressionZlib
        switch compressionType {
        case Qcow2.compressionZlib:
            if incompatibleFeatures & Qcow2.incompatCompression != 0 {
                throw InstarError.invalid("qcow2: Compression type incompatible feature bit must not be set")
            }
        case Qcow2.compressionZstd:
            if incompatibleFeatures & Qcow2.incompatCompression == 0 {
                throw InstarError.invalid("qcow2: Compression type incompatible feature bit must be set")
            }
        default:
            throw InstarError.unsupported("qcow2: unknown compression type: \(compressionType)")
        }
    }

    /// The checks qemu makes after the feature bits: subcluster size, refcount width, tables, L1 size. An open
    /// for check (`forCheck`) leaves the snapshot table to the check itself, as qemu's BDRV_O_CHECK open does.
    func validateLayout(forCheck: Bool = false) throws {
        guard refcountOrder <= 6 else {
            throw InstarError.invalid("Reference count entry width too large; may not exceed 64 bits")
        }
        if extendedL2 && subclusterSize < 512 {
            throw InstarError.invalid("Unsupported subcluster size: \(subclusterSize)")
        }
        // qcow2_do_open lets an open for check through: the check rebuilds the structure.
        guard refcountTableClusters != 0 || forCheck else {
            throw InstarError.invalid("Image does not contain a reference count table")
        }
        try validateTable(offset: refcountTableOffset, entries: UInt64(refcountTableClusters), entryBytes: clusterSize,
                          maxBytes: Qcow2.maxRefcountTableBytes, name: "Reference count table")
        if !forCheck {
            try validateTable(offset: snapshotsOffset, entries: UInt64(nbSnapshots),
                              entryBytes: Qcow2.snapshotHeaderSize,
                              maxBytes: Qcow2.snapshotHeaderSize * Qcow2.maxSnapshots, name: "Snapshot table")
        }
        try validateTable(offset: l1TableOffset, entries: UInt64(l1Size), entryBytes: 8, maxBytes: Qcow2.maxL1Bytes,
                          name: "Active L1 table")
        let neededL1 = l1EntriesNeeded(for: size)
        guard neededL1 <= UInt64(Int32.max) else {
            throw InstarError(.unsupported, "Image is too big", errno: 27 /* EFBIG */)
        }
        guard UInt64(l1Size) >= neededL1 else { throw InstarError.invalid("L1 table is too small") }
    }

    /// L1 entries needed to map `bytes` of guest data (qemu's size_to_l1).
    func l1EntriesNeeded(for bytes: UInt64) -> UInt64 {
        let shift = UInt64(clusterBits) + l2Bits
        let whole = bytes >> shift
        return whole + (bytes & ((1 << shift) - 1) != 0 ? 1 : 0)
    }

    /// qemu's qcow2_validate_table: bounded size, no overflow, cluster aligned.
    func validateTable(offset: UInt64, entries: UInt64, entryBytes: UInt64, maxBytes: UInt64,
                               name: String) throws {
        guard entries <= maxBytes / entryBytes else { throw InstarError.invalid("\(name) too large") }
        let bytes = entries * entryBytes
        guard offset <= UInt64(Int64.max) - bytes, offset % clusterSize == 0 else {
            throw InstarError.invalid("\(name) offset invalid")
        }
    }
}
