/// The persistent dirty bitmap directory (qcow2.txt "Bitmap directory"), read for `qemu-img info`.
struct Qcow2BitmapEntry: Equatable {
    var name: String
    var granularityBits: UInt8
    var flags: UInt32
    var tableOffset: UInt64
    var tableSize: UInt32

    // qcow2.txt: flags bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible.
    static let flagInUse: UInt32 = 1 << 0
    static let flagAuto: UInt32 = 1 << 1
    static let flagExtraDataCompatible: UInt32 = 1 << 2

    /// The entry as qemu's Qcow2BitmapInfo, members in QAPI order (name, granularity, flags).
    var info: QObject {
        var flagNames: [QObject] = []
        if flags & Qcow2BitmapEntry.flagInUse != 0 { flagNames.append(.string("in-use")) }
        if flags & Qcow2BitmapEntry.flagAuto != 0 { flagNames.append(.string("auto")) }
        return .dict([("name", .string(name)), ("granularity", .int(Int64(1) << Int64(granularityBits))),
                      ("flags", .list(flagNames))])
    }
}

enum Qcow2Bitmaps {
    /// Fixed part of a directory entry (qcow2.txt: 24 bytes before extra data and name).
    static let entryHeaderBytes = 24
    // qemu's limits: granularity 2^9 .. 2^31, name <= 1023 bytes.
    static let minGranularityBits: UInt8 = 9
    static let maxGranularityBits: UInt8 = 31
    static let maxNameLength = 1023

    /// Reads and checks the directory (qemu's bitmap_list_load).
    static func read(_ ext: Qcow2BitmapsExtension, header: Qcow2Header, file: HostFile) throws -> [Qcow2BitmapEntry] {
        guard ext.directorySize > 0 else { throw InstarError.invalid("Requested bitmap directory size is zero") }
        let size = try checkedInt(ext.directorySize)
        let dir = ByteReader(try file.readMetadata(at: ext.directoryOffset, count: size,
                                                      what: "the bitmap directory"), what: "bitmap directory")
        var out: [Qcow2BitmapEntry] = []
        var pos = 0
        while pos < size {
            guard out.count < Int(ext.count) else {
                throw InstarError.invalid("More bitmaps found than specified in header extension")
            }
            guard pos + entryHeaderBytes <= size else { throw InstarError.invalid("Broken bitmap directory") }
            // qcow2.txt: 0-7 bitmap_table_offset, 8-11 bitmap_table_size, 12-15 flags, 16 type,
            // 17 granularity_bits, 18-19 name_size, 20-23 extra_data_size.
            let tableOffset = try dir.u64be(at: pos)
            let tableSize = try dir.u32be(at: pos + 8)
            let flags = try dir.u32be(at: pos + 12)
            let type = try dir.u8(at: pos + 16)
            let gran = try dir.u8(at: pos + 17)
            let nameSize = Int(try dir.u16be(at: pos + 18))
            let extraSize = try checkedInt(UInt64(try dir.u32be(at: pos + 20)))
            let entryLen = entryHeaderBytes + extraSize + nameSize
            let padded = (entryLen + 7) & ~7
            guard padded <= size - pos else { throw InstarError.invalid("Broken bitmap directory") }
            if extraSize != 0 {
                throw InstarError.invalid("Bitmap extra data is not supported")
            }
            let name = try dir.string(at: pos + entryHeaderBytes + extraSize, count: nameSize)
            let nameBytes = try dir.slice(at: pos + entryHeaderBytes + extraSize, count: nameSize)
            // qemu's check_dir_entry: a table of at most 512 MiB of clusters, and (unless the bitmap is in use)
            // large enough for the image's size at this granularity. Flag bit 2 counts as reserved.
            let phys = UInt64(tableSize) * header.clusterSize
            let length = header.size / 512 * 512
            let bad = tableSize == 0 || tableOffset == 0 || tableOffset & (header.clusterSize - 1) != 0
                || UInt64(tableSize) > Qcow2BitmapData.maxTableEntries || gran > maxGranularityBits || gran < minGranularityBits
                || flags & ~(Qcow2BitmapEntry.flagInUse | Qcow2BitmapEntry.flagAuto) != 0
                || nameSize > maxNameLength || type != 1 || phys > Qcow2BitmapData.maxPhysBytes
                || (flags & Qcow2BitmapEntry.flagInUse == 0 && length > (phys * 8) << UInt64(gran))
            if bad {
                throw InstarError.invalid("Bitmap '\(String(decoding: nameBytes, as: UTF8.self))' doesn't satisfy the constraints")
            }
            out.append(Qcow2BitmapEntry(name: name, granularityBits: gran, flags: flags, tableOffset: tableOffset,
                                        tableSize: tableSize))
            pos += padded
        }
        guard out.count == Int(ext.count) else {
            throw InstarError.invalid("Less bitmaps found than specified in header extension")
        }
        return out
    }
}
