import Glibc

/// Apple's UDIF layout as qemu 7.2's block/dmg.c reads it. All fields are big-endian.
enum Dmg {
    /// qemu's DMG_LENGTHS_MAX: the largest stored length of one chunk (64 MiB), so a chunk's buffers stay bounded.
    static let lengthsMax: UInt64 = 64 * 1024 * 1024
    /// qemu's DMG_SECTORCOUNTS_MAX: the most sectors one decompressed chunk may stand for.
    static let sectorCountsMax: UInt64 = lengthsMax / 512
    /// qemu's cap on the XML property list it reads (16 MiB).
    static let plistMax: UInt64 = 16 * 1024 * 1024
    /// instar's bound on the chunk table held in memory (36 bytes a chunk, 144 MiB at most); qemu has none.
    static let maxChunks = 4 << 20

    // Chunk types (UDIF block types).
    static let typeZero: UInt32 = 0  // UDZE: zeroes
    static let typeRaw: UInt32 = 1  // UDRW: stored as is
    static let typeIgnore: UInt32 = 2  // UDIG: reads as zeroes
    static let typeADC: UInt32 = 0x8000_0004  // UDCO: Apple Data Compression, unknown to qemu
    static let typeZlib: UInt32 = 0x8000_0005  // UDZO
    static let typeBzip2: UInt32 = 0x8000_0006  // UDBZ
    static let typeLzfse: UInt32 = 0x8000_0007  // ULFO
    static let typeComment: UInt32 = 0x7FFF_FFFE  // UDCM
    static let typeLast: UInt32 = 0xFFFF_FFFF  // UDLE: the terminator

    /// "koly", the UDIF trailer's magic.
    static let kolyMagic: [UInt8] = Array("koly".utf8)
    /// "mish", a block table's magic.
    static let mishMagic: UInt32 = 0x6D69_7368
    /// A block table shorter than this is skipped (qemu's test on its size).
    static let mishMinimum: UInt32 = 244
    /// Where a block table's chunk entries start, and the size of one.
    static let mishChunksAt = 204
    static let chunkEntrySize = 40

    // koly trailer offsets (UDIFResourceFile).
    static let kolyDataForkOffset: UInt64 = 0x18
    static let kolyRsrcForkOffset: UInt64 = 0x28
    static let kolyRsrcForkLength: UInt64 = 0x30
    static let kolyXMLOffset: UInt64 = 0xD8
    static let kolyXMLLength: UInt64 = 0xE0
    static let kolySectorCount: UInt64 = 0x1EC

    /// qemu's open failures that carry only an errno ("Could not open 'X': Invalid argument").
    static func invalid() -> InstarError { InstarError(.invalid, strerrorString(EINVAL), errno: EINVAL) }
    static func ioError() -> InstarError { InstarError(.io, strerrorString(EIO), errno: EIO) }

    static func u64(_ file: HostFile, at offset: UInt64) throws -> UInt64 {
        try ByteReader(file.readBytes(at: offset, count: 8)).u64be(at: 0)
    }

    static func u32(_ file: HostFile, at offset: UInt64) throws -> UInt32 {
        try ByteReader(file.readBytes(at: offset, count: 4)).u32be(at: 0)
    }

    /// Finds the koly trailer as dmg_find_koly_offset does: the node length (whole sectors) must be at least 512,
    /// and "koly" must start in the last 515 bytes that end 512 bytes before the node's end at the latest (the
    /// end of the second-last sector and the start of the last), since a file's odd tail is rounded up.
    static func findKoly(_ file: HostFile) throws -> UInt64 {
        let length = try file.nodeLength()
        guard length >= 512 else {
            throw InstarError(.invalid, "dmg file must be at least 512 bytes long", errno: EINVAL)
        }
        let start: UInt64 = length > 511 + 512 ? length - 511 - 512 : 0
        let window = Int(min(length, 515))
        let buf = try file.readBytes(at: start, count: window)
        var i = 0
        while i + 3 < window {
            if buf[i] == kolyMagic[0] && buf[i + 1] == kolyMagic[1] && buf[i + 2] == kolyMagic[2]
                && buf[i + 3] == kolyMagic[3] {
                return start + UInt64(i)
            }
            i += 1
        }
        throw InstarError(.invalid, "Could not locate UDIF trailer in dmg file", errno: EINVAL)
    }
}

/// The fields of the koly trailer that locate everything else, checked as dmg_open checks them.
struct DmgTrailer {
    var kolyOffset: UInt64
    var dataForkOffset: UInt64
    var rsrcForkOffset: UInt64
    var rsrcForkLength: UInt64
    var xmlOffset: UInt64
    var xmlLength: UInt64
    /// The guest size in sectors (below 2^63).
    var sectorCount: UInt64

    init(file: HostFile) throws {
        let koly = try Dmg.findKoly(file)
        kolyOffset = koly
        // Every field lies within the 515 bytes searched plus 512: koly + 0x1f4 cannot overflow a file offset.
        dataForkOffset = try Dmg.u64(file, at: koly + Dmg.kolyDataForkOffset)
        guard dataForkOffset <= koly else { throw Dmg.invalid() }
        rsrcForkOffset = try Dmg.u64(file, at: koly + Dmg.kolyRsrcForkOffset)
        rsrcForkLength = try Dmg.u64(file, at: koly + Dmg.kolyRsrcForkLength)
        guard rsrcForkOffset < koly, rsrcForkLength <= koly - rsrcForkOffset else { throw Dmg.invalid() }
        xmlOffset = try Dmg.u64(file, at: koly + Dmg.kolyXMLOffset)
        xmlLength = try Dmg.u64(file, at: koly + Dmg.kolyXMLLength)
        guard xmlOffset < koly, xmlLength <= koly - xmlOffset else { throw Dmg.invalid() }
        sectorCount = try Dmg.u64(file, at: koly + Dmg.kolySectorCount)
        // qemu keeps the count in a signed 64-bit field and refuses a negative one.
        guard sectorCount <= UInt64(Int64.max) else { throw Dmg.invalid() }
    }
}
