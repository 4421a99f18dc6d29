/// qcow2 header extensions (qcow2.txt "Header extensions"): a list of {type, length, data padded to 8} between
/// the header and the backing file name. Parsed with qemu's checks and messages (qcow2_read_extensions).

/// One entry of the feature name table extension (qcow2.txt: 48 bytes: type, bit, name[46]).
struct Qcow2FeatureName: Equatable {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    var type: UInt8
    var bit: UInt8
    var name: String
}

/// The bitmaps extension (qcow2.txt "Bitmaps extension", 24 bytes).
struct Qcow2BitmapsExtension: Equatable {
    var count: UInt32
    var directorySize: UInt64
    var directoryOffset: UInt64
}

/// The full-disk-encryption header extension (qcow2.txt: offset and length of the LUKS header).
struct Qcow2CryptoExtension: Equatable {
    var offset: UInt64
    var length: UInt64
}

/// Everything the extensions say.
struct Qcow2Extensions {
    /// The feature-name table qemu 7.2 writes (qcow2.txt: header extension 0x6803f857, 48-byte entries of
    /// type, bit number and a NUL-padded name). qemu leaves it out of images with clusters of 4 KiB or less.
    static func featureNameTable() -> [UInt8] {
        let features: [(UInt8, UInt8, String)] = [
            (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
            (0, 3, "compression type"), (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"), (2, 1, "raw external data"),
        ]
        var table: [UInt8] = []
        for (type, bit, name) in features {
            var entry = [UInt8](repeating: 0, count: 48)
            entry[0] = type
            entry[1] = bit
            for (i, b) in name.utf8.enumerated() where i < 46 { entry[2 + i] = b }
            table += entry
        }
        return table
    }

    var backingFormat: String?
    var featureNames: [Qcow2FeatureName] = []
    var bitmaps: Qcow2BitmapsExtension?
    var crypto: Qcow2CryptoExtension?
    var dataFile: String?
    /// A bitmaps extension was found without the autoclear bit that vouches for it (always so in a v2 image): a
    /// program unaware of bitmaps wrote the image, so qemu ignores the bitmaps, warns, and drops the extension
    /// on a writable open.
    var ignoredBitmaps = false
    /// How many such bitmaps extensions there were: qemu warns once for each.
    var ignoredBitmapsExtensions = 0
    /// Extensions qemu does not know, in file order: qemu keeps them when it writes the header again.
    var unknown: [(type: UInt32, data: [UInt8])] = []

    /// Bytes of one extension header (type + length).
    static let entryHeaderBytes: UInt64 = 8
    // qcow2.txt: the backing format name is shorter than 1024 bytes (qemu's bs->backing_format).
    static let maxBackingFormatLength: UInt32 = 1023
    static let featureEntryBytes = 48
    static let bitmapsExtensionBytes: UInt32 = 24
    static let cryptoExtensionBytes: UInt32 = 16

    /// Reads the extensions from the first cluster (`area`, starting at file offset 0). With `lenient`, only the
    /// feature table is wanted, as when qemu reports unknown incompatible features: the walk ends quietly at the
    /// first extension qemu would refuse (keeping the tables seen so far), and at that point of qemu's open no
    /// encryption method is known yet, so a crypto header extension ends it too.
    static func parse(area: [UInt8], header: Qcow2Header, lenient: Bool = false) throws -> Qcow2Extensions {
        var ext = Qcow2Extensions()
        let r = ByteReader(area, what: "qcow2 header extension")
        var offset = UInt64(header.headerLength)
        let end = min(header.extensionsEnd, UInt64(area.count))
        while offset < end {
            guard offset + entryHeaderBytes <= UInt64(area.count) else {
                if lenient { return ext }
                throw InstarError.invalid("Header extension too large")
            }
            let type = try r.u32be(at: Int(offset))
            let len = try r.u32be(at: Int(offset) + 4)
            offset += entryHeaderBytes
            guard offset <= end, UInt64(len) <= end - offset else {
                if lenient { return ext }
                throw InstarError.invalid("Header extension too large")
            }
            let data = try r.slice(at: Int(offset), count: Int(len))
            let dr = ByteReader(data, what: "qcow2 header extension")
            switch type {
            case Qcow2.extEnd:
                return ext
            case Qcow2.extBackingFormat:
                guard len < maxBackingFormatLength + 1 else {
                    if lenient { return ext }
                    throw InstarError.invalid("ERROR: ext_backing_format: len=\(len) too large (>=1024)")
                }
                ext.backingFormat = try dr.string(at: 0, count: Int(len))
            case Qcow2.extFeatureTable:
                // qemu keeps the last table it reads, zero padded, and walks it up to the first entry whose
                // name starts with a NUL; a short last entry reads as zero past the extension's end.
                ext.featureNames = []
                let padded = data + [UInt8](repeating: 0, count: 2 * featureEntryBytes)
                let pr = ByteReader(padded, what: "qcow2 header extension")
                var i = 0
                while i + featureEntryBytes <= padded.count {
                    let name = try pr.slice(at: i + 2, count: 46)
                    guard let first = name.first, first != 0 else { break }
                    let bytes = name.prefix { $0 != 0 }
                    ext.featureNames.append(Qcow2FeatureName(type: try pr.u8(at: i), bit: try pr.u8(at: i + 1),
                                                             name: String(decoding: bytes, as: UTF8.self)))
                    i += featureEntryBytes
                }
            case Qcow2.extBitmaps:
                guard len == bitmapsExtensionBytes else {
                    if lenient { return ext }
                    throw InstarError.invalid("bitmaps_ext: Invalid extension length")
                }
                // Without the autoclear bit a program unaware of bitmaps changed the image: qemu ignores them.
                guard header.autoclearFeatures & Qcow2.autoclearBitmaps != 0 else {
                    ext.ignoredBitmaps = true
                    ext.ignoredBitmapsExtensions += 1
                    break
                }
                let count = try dr.u32be(at: 0)
                let reserved = try dr.u32be(at: 4)
                let dirSizeField = try dr.u64be(at: 8)
                let dirOffsetField = try dr.u64be(at: 16)
                if lenient {
                    // qemu's checks of the extension, which end its walk when they fail.
                    if reserved != 0 || count > Qcow2.maxBitmaps || count == 0 || dirOffsetField % header.clusterSize != 0
                        || dirSizeField > Qcow2.maxBitmapDirectoryBytes {
                        return ext
                    }
                    break
                }
                guard reserved == 0 else { throw InstarError.invalid("bitmaps_ext: Reserved field is not zero") }
                let dirSize = try dr.u64be(at: 8)
                let dirOffset = try dr.u64be(at: 16)
                guard count <= Qcow2.maxBitmaps else {
                    throw InstarError.invalid("bitmaps_ext: Image has \(count) bitmaps, exceeding the QEMU supported maximum of \(Qcow2.maxBitmaps)")
                }
                guard count != 0 else { throw InstarError.invalid("found bitmaps extension with zero bitmaps") }
                guard dirOffset % header.clusterSize == 0 else {
                    throw InstarError.invalid("bitmaps_ext: invalid bitmap directory offset")
                }
                guard dirSize <= Qcow2.maxBitmapDirectoryBytes else {
                    throw InstarError.invalid("bitmaps_ext: bitmap directory size (\(dirSize)) exceeds the maximum supported size (\(Qcow2.maxBitmapDirectoryBytes))")
                }
                ext.bitmaps = Qcow2BitmapsExtension(count: count, directorySize: dirSize, directoryOffset: dirOffset)
            case Qcow2.extCryptoHeader:
                if lenient { return ext }
                guard header.cryptMethod == Qcow2.cryptLUKS else {
                    throw InstarError.invalid("CRYPTO header extension only expected with LUKS encryption method")
                }
                guard len == cryptoExtensionBytes else {
                    throw InstarError.invalid("CRYPTO header extension size \(len), but expected size \(cryptoExtensionBytes)")
                }
                let off = try dr.u64be(at: 0)
                guard off % header.clusterSize == 0 else {
                    throw InstarError.invalid("Encryption header offset '\(off)' is not a multiple of cluster size '\(header.clusterSize)'")
                }
                ext.crypto = Qcow2CryptoExtension(offset: off, length: try dr.u64be(at: 8))
            case Qcow2.extDataFile:
                ext.dataFile = try dr.string(at: 0, count: Int(len))
            default:
                // Unknown extensions are preserved by qemu on rewrite (qcow2_update_header).
                ext.unknown.append((type: type, data: data))
            }
            offset += (UInt64(len) + 7) & ~7
        }
        return ext
    }

    /// qemu's report_unsupported_feature: named features from the table, then the unnamed remainder.
    static func unsupportedFeatureMessage(_ mask: UInt64, table: [Qcow2FeatureName]) -> String {
        var remaining = mask
        var parts: [String] = []
        for f in table where f.type == 0 {
            // qemu shifts 1ULL by the stored bit number; x86 takes the count modulo 64.
            let bit = UInt64(1) << UInt64(f.bit & 63)
            if remaining & bit != 0 {
                parts.append(String(f.name.prefix(46)))
                remaining &= ~bit
            }
        }
        if remaining != 0 { parts.append("Unknown incompatible feature: " + String(remaining, radix: 16)) }
        return "Unsupported qcow2 feature(s): " + parts.joined(separator: ", ")
    }
}
