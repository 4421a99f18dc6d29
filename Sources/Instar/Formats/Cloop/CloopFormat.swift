import CZlib
import Glibc

/// cloop (compressed loop) V2.0 images, read-only, as qemu 7.2's block/cloop.c reads them: a 128-byte
/// shell-script preamble, the block size and block count (big-endian u32 at 128 and 132), then n_blocks + 1
/// big-endian u64 file offsets at 136; block i is the zlib stream between offsets i and i + 1 and inflates to
/// exactly one block. qemu cannot create, write or check these images, and neither does instar.
public final class CloopFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "cloop", probe: { header, _ in probe(header) },
                                 open: { try CloopFormat(request: $0) })
        d.reopenable = false
        d.runtimeOptions = []
        return d
    }()

    static let magic = Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
        .utf8)
    /// qemu's MAX_BLOCK_SIZE.
    static let maxBlockSize: UInt32 = 64 << 20
    static let tableOffset: UInt64 = 136
    /// Tables up to this many entries are kept in memory (32 MiB); larger ones (qemu allows 512 MiB) are read
    /// from the file two entries at a time.
    static let maxEntriesInMemory: UInt64 = 4 << 20
    /// qemu's BDRV_MAX_LENGTH: a read of the file ending past it fails with EIO.
    static let maxRequestEnd: UInt64 = UInt64(Int64.max) & ~((UInt64(1) << 30) - 1)

    /// cloop_probe: the preamble compared over what was read of it; a weak score.
    static func probe(_ buf: [UInt8]) -> Int {
        let n = min(magic.count, buf.count)
        return buf.prefix(n).elementsEqual(magic.prefix(n)) ? 2 : 0
    }

    public let formatName = "cloop"
    let file: HostFile
    let blockSize: UInt32
    let blockCount: UInt32
    let diskSize: UInt64
    /// The offsets table (n_blocks + 1 entries) when small enough to hold; nil reads it from the file.
    let table: [UInt64]?
    /// The block inflated last (qemu's current_block), kept for the next read.
    private var cachedIndex: UInt32?
    private var cached: [UInt8] = []

    public var hostFiles: [HostFile] { [file] }
    public var virtualSize: UInt64 { diskSize }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }
    public var hasZeroInit: Bool { false }

    init(request: OpenRequest) throws {
        // No write support: qemu refuses a read/write open before reading anything.
        if request.writable { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        let f = request.file
        file = f
        let r = ByteReader(try f.readBytes(at: 128, count: 8))
        let bs = try r.u32be(at: 0)
        if bs % 512 != 0 {
            throw InstarError(.invalid, "block_size \(bs) must be a multiple of 512", errno: EINVAL)
        }
        if bs == 0 { throw InstarError(.invalid, "block_size cannot be zero", errno: EINVAL) }
        if bs > CloopFormat.maxBlockSize {
            throw InstarError(.invalid, "block_size \(bs) must be \(CloopFormat.maxBlockSize >> 20) MB or less",
                              errno: EINVAL)
        }
        let n = try r.u32be(at: 4)
        let maxBlocks = (UInt32.max - 1) / 8
        if n > maxBlocks {
            throw InstarError(.invalid, "n_blocks \(n) must be \(maxBlocks) or less", errno: EINVAL)
        }
        // qemu sizes the table in 32 bits: (n + 1) * 8 wraps to 0 for the largest count it accepts, and its
        // allocator then returns nothing.
        let tableBytes = (n &+ 1) &* 8
        if tableBytes > 512 << 20 {
            throw InstarError(.invalid, "image requires too many offsets, try increasing block size", errno: EINVAL)
        }
        if tableBytes == 0 { throw InstarError(.noMemory, "Could not allocate offsets table", errno: ENOMEM) }
        blockSize = bs
        blockCount = n
        // qemu's total_sectors is a 32-bit product, which wraps for big images.
        diskSize = UInt64(n &* (bs / 512)) * 512

        // Validate the whole table as qemu does at open, a chunk at a time.
        let entries = UInt64(n) + 1
        var keep: [UInt64]? = entries <= CloopFormat.maxEntriesInMemory ? [] : nil
        if keep != nil { try CallBudget.reserve(count: entries, of: 8, what: "the offsets table") }
        keep?.reserveCapacity(Int(entries))
        let chunkEntries: UInt64 = 1 << 17
        var prev: UInt64 = 0
        var index: UInt64 = 0
        var chunk = [UInt64](repeating: 0, count: Int(chunkEntries))
        while index < entries {
            let count = Int(min(chunkEntries, entries - index))
            try chunk.withUnsafeMutableBytes { b in
                try f.readZeroPadded(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<(count * 8)]),
                                     at: CloopFormat.tableOffset + index * 8)
            }
            for k in 0..<count {
                let v = UInt64(bigEndian: chunk[k])
                let i = index + UInt64(k)
                if i > 0 {
                    if v < prev {
                        throw InstarError(.corrupt, "offsets not monotonically increasing at index \(i), "
                                          + "image file is corrupt", errno: EINVAL)
                    }
                    if v - prev > 2 * UInt64(CloopFormat.maxBlockSize) {
                        throw InstarError(.corrupt, "invalid compressed block size at index \(i), "
                                          + "image file is corrupt", errno: EINVAL)
                    }
                }
                prev = v
                keep?.append(v)
            }
            index += UInt64(count)
        }
        table = keep
    }

    static func ioError() -> InstarError { InstarError(.io, strerrorString(EIO), errno: EIO) }

    /// The file range of block `index`'s compressed stream.
    private func span(of index: UInt32) throws -> (start: UInt64, count: UInt64) {
        let lo: UInt64, hi: UInt64
        if let t = table {
            guard Int(index) + 1 < t.count else { throw CloopFormat.ioError() }
            lo = t[Int(index)]
            hi = t[Int(index) + 1]
        } else {
            guard index < blockCount else { throw CloopFormat.ioError() }
            let b = ByteReader(try file.readBytes(at: CloopFormat.tableOffset + UInt64(index) * 8, count: 16))
            lo = try b.u64be(at: 0)
            hi = try b.u64be(at: 8)
        }
        // Checked at open (the file may have changed since).
        guard hi >= lo, hi - lo <= 2 * UInt64(CloopFormat.maxBlockSize) else { throw CloopFormat.ioError() }
        return (lo, hi - lo)
    }

    /// Inflates block `index` into `cached`: the stream must end exactly at one block of output.
    private func load(_ index: UInt32) throws {
        if cachedIndex == index { return }
        cachedIndex = nil
        let (start, count) = try span(of: index)
        guard start <= CloopFormat.maxRequestEnd, count <= CloopFormat.maxRequestEnd - start else {
            throw CloopFormat.ioError()
        }
        try CallBudget.reserve(count: count, of: 1, what: "the compressed block buffer")
        defer { CallBudget.release(Int(count)) }
        var input = [UInt8](repeating: 0, count: Int(count))
        try input.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: start) }
        if cached.count != Int(blockSize) {
            // Left unwritten: inflate fills it, and a block is used only when the stream filled all of it. A
            // zero-filled 64 MiB block would be resident at once, for a stream of a few bytes that fails.
            try CallBudget.reserve(Int(blockSize), what: "the decompressed block buffer")
            cached = [UInt8](unsafeUninitializedCapacity: Int(blockSize)) { _, n in n = Int(blockSize) }
        }
        let ok = input.withUnsafeMutableBufferPointer { inp -> Bool in
            cached.withUnsafeMutableBufferPointer { out -> Bool in
                var strm = z_stream()
                strm.next_in = inp.baseAddress
                strm.avail_in = uInt(inp.count)
                strm.next_out = out.baseAddress
                strm.avail_out = uInt(out.count)
                guard inflateInit_(&strm, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                    return false
                }
                let r = inflate(&strm, Z_FINISH)
                let total = strm.total_out
                inflateEnd(&strm)
                return r == Z_STREAM_END && UInt64(total) == UInt64(out.count)
            }
        }
        guard ok else { throw CloopFormat.ioError() }
        cachedIndex = index
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        guard buffer.count > 0 else { return }
        guard offset <= diskSize, UInt64(buffer.count) <= diskSize - offset else { throw CloopFormat.ioError() }
        let bs = UInt64(blockSize)
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let index = pos / bs
            let into = Int(pos % bs)
            let n = min(buffer.count - done, Int(bs) - into)
            guard index < UInt64(blockCount) else { throw CloopFormat.ioError() }
            try load(UInt32(index))
            cached.withUnsafeBytes { src in
                UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[into..<(into + n)]))
            }
            done += n
        }
    }

    /// qemu's driver reports no block status: the whole image is data, allocated, stored nowhere it can name.
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        BlockStatus(length: max(1, length), allocated: true, data: true, zero: false)
    }

    /// qemu's driver has no get_info: neither cluster size nor dirty flag.
    public func formatInfo() throws -> FormatInfo { FormatInfo(clusterSize: nil, dirty: nil) }
}
