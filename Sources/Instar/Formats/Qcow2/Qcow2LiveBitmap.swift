import Glibc

/// A persistent bitmap of an open qcow2 image, as qemu holds one from open to close: the BdrvDirtyBitmap that
/// qcow2_load_dirty_bitmaps makes of each directory entry, or one that convert --bitmaps adds.
///
/// qemu reads every bitmap whole at open. Here the bits stay on disk until they change: the table read (and
/// checked) at open is kept, and only the bitmap clusters ("chunks") that a write dirtied or a resize cut are
/// held in memory. What the image shows is the same; the cost of opening an image with large bitmaps is not.
///
/// The bits are kept in qemu's serialized order (qcow2.txt "Bitmaps"): bit i covers guest bytes
/// [i << granularity_bits, (i + 1) << granularity_bits), in byte i / 8 at bit i % 8; a bitmap takes whole
/// 64-bit words, and one bitmap cluster holds 8 × cluster_size bits.
final class Qcow2LiveBitmap {
    let name: String
    let granularityBits: UInt8
    /// The "auto" flag: writes to the image set bits.
    var enabled: Bool
    /// The bitmap was marked in use on disk before this open (its writer never stored it back): qemu loads no
    /// data for it, never stores it, and refuses to resize the image.
    let inconsistent: Bool
    /// The directory entry read at open; nil for a bitmap added since.
    let stored: Qcow2BitmapEntry?
    /// The bitmap table read at open (every entry checked); empty for an inconsistent or added bitmap.
    let diskTable: [UInt64]
    /// Leading chunks whose bits may still be read from `diskTable` (a shrink drops the rest for good).
    private var diskChunks: Int
    /// Chunks changed since the open, each exactly `chunkLength(k)` bytes. Like qemu's hbitmap words, they keep
    /// whatever bits the last word holds past the bitmap's end (an all-ones entry sets them), and store them.
    private var chunks: [Int: [UInt8]] = [:]
    /// Guest bytes covered: the image's virtual size.
    private(set) var size: UInt64
    private let clusterSize: UInt64
    private let file: HostFile
    /// The image's cluster size (one bitmap chunk holds 8 × this many bits).
    var clusterSizeBytes: UInt64 { clusterSize }

    private init(name: String, granularityBits: UInt8, enabled: Bool, inconsistent: Bool, stored: Qcow2BitmapEntry?,
                 diskTable: [UInt64], size: UInt64, clusterSize: UInt64, file: HostFile) {
        self.name = name
        self.granularityBits = granularityBits
        self.enabled = enabled
        self.inconsistent = inconsistent
        self.stored = stored
        self.diskTable = diskTable
        self.diskChunks = diskTable.count
        self.size = size
        self.clusterSize = clusterSize
        self.file = file
    }

    /// A bitmap added to the image with these serialized contents (`Qcow2BitmapData.serializedBytes` long).
    convenience init(adding name: String, granularityBits: UInt8, enabled: Bool, bits: [UInt8], size: UInt64,
                     clusterSize: UInt64, file: HostFile) {
        self.init(name: name, granularityBits: granularityBits, enabled: enabled, inconsistent: false, stored: nil,
                  diskTable: [], size: size, clusterSize: clusterSize, file: file)
        let cs = Int(clusterSize)
        var k = 0
        var start = 0
        while start < bits.count {
            let end = min(start + cs, bits.count)
            if bits[start..<end].contains(where: { $0 != 0 }) { chunks[k] = Array(bits[start..<end]) }
            k += 1
            start = end
        }
    }

    // MARK: Geometry

    /// Granules (bits) the bitmap has.
    var bitCount: UInt64 { size.divCeil(UInt64(1) << UInt64(granularityBits)) }
    /// Serialized length: whole 64-bit words.
    var serializedBytes: UInt64 { bitCount.divCeil(64) * 8 }
    /// Bitmap clusters the serialized bits take (the table size).
    var chunkCount: Int { Int(serializedBytes.divCeil(clusterSize)) }
    private var bitsPerChunk: UInt64 { clusterSize * 8 }

    private func chunkLength(_ k: Int) -> Int {
        Int(min(clusterSize, serializedBytes - UInt64(k) * clusterSize))
    }

    // MARK: Reading

    /// The bytes of chunk `k` (load_bitmap_data for one table entry): held, or read through the table entry
    /// (a data cluster, all zeroes, or all ones) in whole words, as qemu deserializes them.
    func chunk(_ k: Int) throws -> [UInt8] {
        if let c = chunks[k] { return c }
        return try loadChunk(k)
    }

    private func loadChunk(_ k: Int) throws -> [UInt8] {
        let len = chunkLength(k)
        var out: [UInt8]
        let entry = k < diskChunks ? diskTable[k] : 0
        let offset = entry & Qcow2BitmapData.entryOffsetMask
        if offset != 0 {
            // qemu reads a whole cluster; past the end of the file it reads zeroes.
            out = [UInt8](repeating: 0, count: Int(clusterSize))
            try out.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: offset) }
            out.removeLast(out.count - len)
        } else if entry & Qcow2BitmapData.entryAllOnes != 0 {
            out = [UInt8](repeating: 0xff, count: len)
        } else {
            out = [UInt8](repeating: 0, count: len)
        }
        return out
    }

    /// Clears the bits [from, to) of chunk `k` (bit indexes of the whole bitmap; only those inside the chunk).
    private func clearBits(_ c: inout [UInt8], _ k: Int, from: UInt64, to: UInt64) {
        let firstBit = UInt64(k) * bitsPerChunk
        var bit = max(from, firstBit)
        let end = min(to, firstBit + UInt64(c.count) * 8)
        while bit < end {
            let local = bit - firstBit
            c[Int(local / 8)] &= ~(UInt8(1) << UInt8(local % 8))
            bit += 1
        }
    }

    /// The whole serialized bitmap, only the granules inside the image set (what a merge into another bitmap
    /// takes).
    func allBytes() throws -> [UInt8] {
        var out: [UInt8] = []
        try CallBudget.reserve(Int(serializedBytes), what: "the bitmap '\(name)'")
        out.reserveCapacity(Int(serializedBytes))
        for k in 0..<chunkCount {
            var c = try chunk(k)
            clearBits(&c, k, from: bitCount, to: UInt64.max)
            out += c
        }
        return out
    }

    // MARK: Changing

    /// bdrv_clear_dirty_bitmap: every bit clear (nothing read from disk any more).
    func clearAll() {
        diskChunks = 0
        chunks = [:]
    }

    /// bdrv_set_dirty for one request: every granule that [offset, offset + length) touches.
    func setDirty(offset: UInt64, length: UInt64) throws {
        guard length > 0, offset < size else { return }
        let g = UInt64(granularityBits)
        let first = offset >> g
        let last = (min(offset &+ length, size) - 1) >> g
        var bit = first
        while bit <= last {
            let k = Int(bit / bitsPerChunk)
            let base = UInt64(k) * bitsPerChunk
            let end = min(last, base + bitsPerChunk - 1)
            // Taken out of the dictionary while it changes, so that the bytes are not copied.
            var c = try chunks.removeValue(forKey: k) ?? loadChunk(k)
            Qcow2LiveBitmap.setBits(&c, from: Int(bit - base), through: Int(end - base))
            chunks[k] = c
            bit = end + 1
        }
    }

    private static func setBits(_ c: inout [UInt8], from a: Int, through b: Int) {
        var i = a
        while i <= b && i % 8 != 0 {
            c[i / 8] |= UInt8(1) << UInt8(i % 8)
            i += 1
        }
        while i + 7 <= b {
            c[i / 8] = 0xff
            i += 8
        }
        while i <= b {
            c[i / 8] |= UInt8(1) << UInt8(i % 8)
            i += 1
        }
    }

    /// hbitmap_truncate: the bitmap follows the image to `newSize`. Shrinking clears the granules it drops and
    /// then the words past the new end; growing adds clear words. Bits the last word held past the old end stay.
    func truncate(to newSize: UInt64) throws {
        let oldCount = chunkCount
        let oldBits = bitCount
        // The old last chunk is held first: it may grow into a whole chunk, which its table entry cannot.
        if oldCount > 0 { chunks[oldCount - 1] = try chunk(oldCount - 1) }
        size = newSize
        let newCount = chunkCount
        let newBits = bitCount
        diskChunks = min(diskChunks, newCount)
        for k in Array(chunks.keys) where k >= newCount { chunks[k] = nil }
        for k in Set([oldCount - 1, newCount - 1]) where k >= 0 && k < newCount {
            var c = try chunks.removeValue(forKey: k) ?? loadChunk(k)
            let len = chunkLength(k)
            if c.count < len { c += [UInt8](repeating: 0, count: len - c.count) }
            if c.count > len { c.removeLast(c.count - len) }
            if newBits < oldBits { clearBits(&c, k, from: newBits, to: oldBits) }
            chunks[k] = c
        }
    }

    // MARK: Loading

    /// qcow2_load_dirty_bitmaps' reading part: a bitmap in use on disk is taken as inconsistent without its
    /// data; any other has its table read and checked (bitmap_table_load) and its size matched against the
    /// image (load_bitmap_data), with qemu's messages. Data clusters are read later, when needed.
    static func load(_ entries: [Qcow2BitmapEntry], file: HostFile, clusterSize: UInt64,
                     virtualSize: UInt64) throws -> [Qcow2LiveBitmap] {
        var out: [Qcow2LiveBitmap] = []
        var tableEntries: UInt64 = 0
        for e in entries {
            // bdrv_create_dirty_bitmap refuses a second bitmap of the same name.
            if out.contains(where: { $0.name == e.name }) {
                throw InstarError.invalid("Bitmap already exists: \(e.name)")
            }
            if e.flags & Qcow2BitmapEntry.flagInUse != 0 {
                out.append(Qcow2LiveBitmap(name: e.name, granularityBits: e.granularityBits,
                                           enabled: e.flags & Qcow2BitmapEntry.flagAuto != 0, inconsistent: true,
                                           stored: e, diskTable: [], size: virtualSize, clusterSize: clusterSize,
                                           file: file))
                continue
            }
            // Every table is held while the image is open: bound their sum (qemu would hold the bitmaps
            // themselves, up to 512 MiB each).
            tableEntries += UInt64(e.tableSize)
            guard tableEntries <= maxHeldTableEntries else {
                throw InstarError(.unsupported, "Bitmap '\(e.name)': the bitmap tables of this image take more "
                                  + "than \((maxHeldTableEntries * 8) >> 20) MiB", errno: ENOMEM)
            }
            let tableFailed = InstarError(.invalid, "Could not read bitmap_table table from image for bitmap "
                                          + "'\(e.name)': Invalid argument", errno: EINVAL)
            try CallBudget.reserve(Int(e.tableSize) * 8, what: "the bitmap table of '\(e.name)'")
            var raw = [UInt8](repeating: 0, count: Int(e.tableSize) * 8)
            try raw.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: e.tableOffset) }
            let table = Qcow2Mapper.decodeBE64(raw, count: Int(e.tableSize))
            if table.contains(where: { !Qcow2BitmapData.entryValid($0, clusterSize: clusterSize) }) { throw tableFailed }
            let bm = Qcow2LiveBitmap(name: e.name, granularityBits: e.granularityBits,
                                     enabled: e.flags & Qcow2BitmapEntry.flagAuto != 0, inconsistent: false,
                                     stored: e, diskTable: table, size: virtualSize, clusterSize: clusterSize,
                                     file: file)
            guard bm.chunkCount == Int(e.tableSize) else {
                throw InstarError(.invalid, "Could not read bitmap '\(e.name)' from image: Invalid argument",
                                  errno: EINVAL)
            }
            out.append(bm)
        }
        return out
    }

    /// The most bitmap table entries all bitmaps of one image may have together (64 MiB of tables).
    static let maxHeldTableEntries: UInt64 = 1 << 23
}
