import Glibc

/// The chunk table of a dmg image: every chunk of every "mish" block table, in the order the image lists them
/// (qemu's BDRVDMGState arrays). Chunks of types that cannot be read are left out, as qemu leaves them out, so
/// reading their sectors fails; numbers are kept with qemu's unsigned wrap-around.
struct DmgChunkTable {
    var types: [UInt32] = []
    /// First guest sector of each chunk.
    var sectors: [UInt64] = []
    /// Guest sectors each chunk stands for.
    var sectorCounts: [UInt64] = []
    /// Where each chunk's stored bytes start in the file, and how many there are.
    var offsets: [UInt64] = []
    var lengths: [UInt64] = []

    var count: Int { types.count }

    /// Whether instar reads chunks of this type. qemu 7.2 as Debian builds it lacks its dmg-bz2 module; instar
    /// decompresses bzip2 chunks (an intended difference). lzfse chunks are left out as Debian's qemu does.
    static func isKnown(_ type: UInt32) -> Bool {
        switch type {
        case Dmg.typeZero, Dmg.typeRaw, Dmg.typeIgnore, Dmg.typeZlib, Dmg.typeBzip2: return true
        default: return false
        }
    }

    /// Adds the chunks of one block table of `size` bytes, read through `fetch(offset, count)` (offsets relative
    /// to the table; every range asked for lies inside `size`). `dataForkOffset` is where the data fork starts.
    mutating func addMish(size: UInt32, dataForkOffset: UInt64,
                          fetch: (_ offset: Int, _ count: Int) throws -> [UInt8]) throws {
        // Tables too small to hold their header and one chunk, or without the magic, are skipped.
        guard size >= Dmg.mishMinimum else { return }
        let head = ByteReader(try fetch(0, Dmg.mishChunksAt))
        guard try head.u32be(at: 0) == Dmg.mishMagic else { return }
        // mish header: first sector (8), data offset of the table's chunks in the data fork (0x18).
        let firstSector = try head.u64be(at: 8)
        let inOffset = dataForkOffset &+ (try head.u64be(at: 0x18))
        // The table's own chunk count field is ignored: its size decides, as in qemu.
        let entries = (Int(size) - Dmg.mishChunksAt) / Dmg.chunkEntrySize
        let batch = 4096
        var done = 0
        while done < entries {
            let n = min(batch, entries - done)
            // types, sectors, sector counts, offsets and lengths of each chunk.
            try CallBudget.reserve(n * 36, what: "the chunk table")
            let bytes = try fetch(Dmg.mishChunksAt + done * Dmg.chunkEntrySize, n * Dmg.chunkEntrySize)
            let r = ByteReader(bytes)
            for k in 0..<n {
                let at = k * Dmg.chunkEntrySize
                let type = try r.u32be(at: at)
                guard DmgChunkTable.isKnown(type) else {
                    DmgWarnings.unknownChunk(type)
                    continue
                }
                let index = count
                let sector = (try r.u64be(at: at + 8)) &+ firstSector
                let sectorCount = try r.u64be(at: at + 0x10)
                // Zero chunks are never decompressed, so their size is free; the others fill one buffer.
                if type != Dmg.typeZero && type != Dmg.typeIgnore && sectorCount > Dmg.sectorCountsMax {
                    Diagnostics.error("sector count \(sectorCount) for chunk \(index) is larger than max "
                                      + "(\(Dmg.sectorCountsMax))")
                    throw Dmg.invalid()
                }
                let offset = (try r.u64be(at: at + 0x18)) &+ inOffset
                let length = try r.u64be(at: at + 0x20)
                if length > Dmg.lengthsMax {
                    Diagnostics.error("length \(length) for chunk \(index) is larger than max (\(Dmg.lengthsMax))")
                    throw Dmg.invalid()
                }
                guard index < Dmg.maxChunks else {
                    throw InstarError(.unsupported, "dmg image has more than \(Dmg.maxChunks) chunks, more than "
                                      + "instar supports", errno: EFBIG)
                }
                types.append(type)
                sectors.append(sector)
                sectorCounts.append(sectorCount)
                offsets.append(offset)
                lengths.append(length)
            }
            done += n
        }
    }

    /// Reads the block tables of a resource fork (dmg_read_resource_fork): a header naming where the resource
    /// data starts and how long it is, then resources each a u32 length and its bytes; the map that may follow
    /// is not read.
    mutating func readResourceFork(_ file: HostFile, begin: UInt64, length: UInt64, dataForkOffset: UInt64) throws {
        let cursor = DmgFileCursor(file: file)
        let dataOffset = try cursor.u32(at: begin)
        guard UInt64(dataOffset) <= length else { throw Dmg.invalid() }
        let dataLength = try cursor.u32(at: begin + 8)
        // qemu adds the two as 32-bit numbers: a sum that wraps passes its test.
        guard dataLength != 0, UInt64(dataOffset &+ dataLength) <= length else { throw Dmg.invalid() }
        // begin < koly and dataOffset <= length <= koly - begin: no overflow.
        var offset = begin + UInt64(dataOffset)
        let end = offset + UInt64(dataLength)
        while offset < end {
            let size = try cursor.u32(at: offset)
            guard size != 0, UInt64(size) <= end - offset else { throw Dmg.invalid() }
            let at = offset + 4
            try addMish(size: size, dataForkOffset: dataForkOffset) { o, n in
                try cursor.bytes(at: at + UInt64(o), count: n)
            }
            offset = at + UInt64(size)
        }
    }

    /// Reads the block tables of an XML property list (dmg_read_plist_xml): every `<data>...</data>` element,
    /// base64 decoded as glib decodes it, in document order. The text ends at its first NUL byte, as a C string.
    mutating func readPlist(_ file: HostFile, begin: UInt64, length: UInt64, dataForkOffset: UInt64) throws {
        guard length != 0, length <= Dmg.plistMax else { throw Dmg.invalid() }
        let text = try file.readMetadata(at: begin, count: Int(length), what: "the property list")
        let end = text.firstIndex(of: 0) ?? text.count
        let open = Array("<data>".utf8)
        let close = Array("</data>".utf8)
        var pos = 0
        while let start = DmgChunkTable.find(open, in: text, from: pos, to: end) {
            let body = start + open.count
            guard let stop = DmgChunkTable.find(close, in: text, from: body, to: end) else { throw Dmg.invalid() }
            let mish = DmgChunkTable.base64Decode(text, from: body, to: stop)
            try addMish(size: UInt32(mish.count), dataForkOffset: dataForkOffset) { o, n in
                Array(mish[o..<(o + n)])
            }
            pos = stop + close.count
        }
    }

    /// The first index at or after `from` where `needle` occurs wholly before `to`.
    static func find(_ needle: [UInt8], in text: [UInt8], from: Int, to: Int) -> Int? {
        guard let first = needle.first, to - from >= needle.count else { return nil }
        var i = from
        let last = to - needle.count
        while i <= last {
            if text[i] == first {
                var k = 1
                while k < needle.count && text[i + k] == needle[k] { k += 1 }
                if k == needle.count { return i }
            }
            i += 1
        }
        return nil
    }

    /// Base64 as glib's g_base64_decode decodes it: bytes outside the alphabet are skipped, '=' counts as a zero
    /// digit whose position drops output bytes, and a final incomplete group is dropped.
    static func base64Decode(_ text: [UInt8], from: Int, to: Int) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(max(0, to - from) / 4 * 3)
        var value: UInt32 = 0
        var digits = 0
        var last0: UInt8 = 0
        var last1: UInt8 = 0
        var i = from
        while i < to {
            let c = text[i]
            i += 1
            let rank: UInt32
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): rank = UInt32(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): rank = UInt32(c - UInt8(ascii: "a")) + 26
            case UInt8(ascii: "0")...UInt8(ascii: "9"): rank = UInt32(c - UInt8(ascii: "0")) + 52
            case UInt8(ascii: "+"): rank = 62
            case UInt8(ascii: "/"): rank = 63
            case UInt8(ascii: "="): rank = 0
            default: continue
            }
            last1 = last0
            last0 = c
            value = (value << 6) | rank
            digits += 1
            if digits == 4 {
                out.append(UInt8(truncatingIfNeeded: value >> 16))
                if last1 != UInt8(ascii: "=") { out.append(UInt8(truncatingIfNeeded: value >> 8)) }
                if last0 != UInt8(ascii: "=") { out.append(UInt8(truncatingIfNeeded: value)) }
                digits = 0
            }
        }
        return out
    }

    /// qemu's search_chunk: a binary search over the first sectors (which it trusts to be ascending), nil when
    /// no chunk holds `sector`.
    func search(_ sector: UInt64) -> Int? {
        var low = 0
        var high = count
        while low <= high {
            let mid = (low + high) / 2
            // qemu looks one past the table here; whatever it finds there ends in "not found".
            guard mid < count else { return nil }
            if sectors[mid] > sector {
                if mid == 0 { return nil }
                high = mid - 1
            } else if sectors[mid] &+ sectorCounts[mid] > sector {
                return mid
            } else {
                low = mid + 1
            }
        }
        return nil
    }

    /// qemu's is_sector_in_chunk.
    func contains(_ chunk: Int, _ sector: UInt64) -> Bool {
        chunk < count && sectors[chunk] <= sector && sectors[chunk] &+ sectorCounts[chunk] > sector
    }
}

/// qemu prints each of these warnings once per process (warn_report_once).
enum DmgWarnings {
    private static let lock: UnsafeMutablePointer<pthread_mutex_t> = {
        let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        m.initialize(to: pthread_mutex_t())
        pthread_mutex_init(m, nil)
        return m
    }()
    private static var lzfseWarned = false
    private static var unknownWarned = false

    static func unknownChunk(_ type: UInt32) {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        switch type {
        case Dmg.typeLzfse:
            if !lzfseWarned {
                lzfseWarned = true
                Diagnostics.warning("dmg-lzfse module is missing, accessing lzfse compressed blocks will result "
                                    + "in I/O errors")
            }
        case Dmg.typeComment, Dmg.typeLast:
            break
        default:
            if !unknownWarned {
                unknownWarned = true
                Diagnostics.warning("Image contains chunks of unknown type " + String(type, radix: 16)
                                    + ", accessing them will result in I/O errors")
            }
        }
    }
}

/// Small reads of a file through a 64 KiB window, for walking a resource fork of many small resources.
final class DmgFileCursor {
    let file: HostFile
    private var windowStart: UInt64 = 0
    private var window: [UInt8] = []
    private static let windowSize = 64 * 1024

    init(file: HostFile) { self.file = file }

    /// `count` bytes at `offset`; bytes past the end of the file read as zeroes.
    func bytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        if count > DmgFileCursor.windowSize { return try file.readBytes(at: offset, count: count) }
        if offset < windowStart || offset - windowStart + UInt64(count) > UInt64(window.count) {
            guard offset <= UInt64(Int64.max) - UInt64(DmgFileCursor.windowSize) else { throw Dmg.invalid() }
            window = try file.readBytes(at: offset, count: DmgFileCursor.windowSize)
            windowStart = offset
        }
        let from = Int(offset - windowStart)
        return Array(window[from..<(from + count)])
    }

    func u32(at offset: UInt64) throws -> UInt32 {
        try ByteReader(bytes(at: offset, count: 4)).u32be(at: 0)
    }
}
