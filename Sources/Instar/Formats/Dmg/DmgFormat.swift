import CBzip2
import CZlib
import Glibc

/// Apple's UDIF disk images (.dmg), read only, as qemu 7.2's block/dmg.c reads them: a 512-byte "koly" trailer
/// near the end of the file locates the block tables ("mish"), kept in a resource fork or base64 in an XML
/// property list; each table lists chunks of guest sectors stored as zeroes, raw bytes, or zlib / bzip2 / lzfse
/// streams in the data fork. Probed by file name only (".dmg"), as qemu probes it.
///
/// Differences from Debian's qemu-img 7.2, which is built without its dmg-bz2 and dmg-lzfse modules: instar
/// decompresses bzip2 chunks (libbz2) where qemu fails their reads with I/O errors after a warning; lzfse chunks
/// fail as in qemu. qemu's "module ... not found" lines about Debian's packaging are not printed.
public final class DmgFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(
            name: "dmg",
            probe: { _, filename in
                // dmg_probe: the name ends in ".dmg" after at least one more character.
                let name = Array(filename.utf8)
                return name.count > 4 && name.suffix(4).elementsEqual(Array(".dmg".utf8)) ? 2 : 0
            },
            open: { try DmgFormat(request: $0) })
        d.readOnly = true
        return d
    }()

    public let formatName = "dmg"
    let file: HostFile
    let table: DmgChunkTable
    let sectorCount: UInt64

    /// The chunk last read (qemu's current_chunk) and its decompressed bytes; reads go through `lock`.
    private var current: Int?
    private var chunkBytes: [UInt8] = []
    private let lock: UnsafeMutablePointer<pthread_mutex_t>

    public var hostFiles: [HostFile] { [file] }
    public var virtualSize: UInt64 { sectorCount &* 512 }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }

    init(request: OpenRequest) throws {
        // The driver only ever reads (bdrv_apply_auto_read_only without auto-read-only fails a writable open).
        guard !request.writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        file = request.file
        do {
            let trailer = try DmgTrailer(file: request.file)
            var t = DmgChunkTable()
            if trailer.rsrcForkLength != 0 {
                try t.readResourceFork(request.file, begin: trailer.rsrcForkOffset, length: trailer.rsrcForkLength,
                                       dataForkOffset: trailer.dataForkOffset)
            } else if trailer.xmlLength != 0 {
                try t.readPlist(request.file, begin: trailer.xmlOffset, length: trailer.xmlLength,
                                dataForkOffset: trailer.dataForkOffset)
            } else {
                throw Dmg.invalid()
            }
            table = t
            sectorCount = trailer.sectorCount
        } catch let e as InstarError where e.errnoValue == EINVAL && e.message == strerrorString(EINVAL) {
            // dmg_open fails with only an errno; the block layer names the file (bdrv_open_driver).
            throw InstarError(e.code, "Could not open '\(request.filename)': \(e.message)", errno: EINVAL)
        }
        // The block layer's size checks after the open (refresh_total_sectors, in qemu's signed 64-bit
        // arithmetic), then bdrv_getlength's: instar refuses at the open what qemu refuses when asked the size.
        let bytes = Int64(bitPattern: sectorCount &* 512)
        if bytes > Int64.max & ~Int64((1 << 30) - 1) {
            throw InstarError(.range, "Could not refresh total sector count: \(strerrorString(EFBIG))", errno: EFBIG)
        }
        guard sectorCount <= UInt64(Int64.max) / 512 else {
            throw InstarError(.range, strerrorString(EFBIG), errno: EFBIG)
        }
        lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        lock.initialize(to: pthread_mutex_t())
        pthread_mutex_init(lock, nil)
    }

    deinit {
        pthread_mutex_destroy(lock)
        lock.deallocate()
    }

    /// The chunk holding `sector`, loaded (dmg_read_chunk): the current one if it holds it, else the one the
    /// binary search finds. A chunk that cannot be found or read fails with EIO.
    private func chunk(for sector: UInt64) throws -> Int {
        if let c = current, table.contains(c, sector) { return c }
        current = nil
        guard let c = table.search(sector) else { throw Dmg.ioError() }
        let type = table.types[c]
        // qemu reads a chunk whole; one that lies past what the block layer can address fails (BDRV_MAX_LENGTH).
        let maxLength = UInt64(Int64.max) & ~((1 << 30) - 1)
        guard table.offsets[c] <= maxLength, table.lengths[c] <= maxLength - table.offsets[c] else {
            throw Dmg.ioError()
        }
        if type == Dmg.typeZlib || type == Dmg.typeBzip2 {
            chunkBytes = []
            // Bounded at open: at most DMG_LENGTHS_MAX bytes in, DMG_SECTORCOUNTS_MAX sectors out.
            let buffers = Int(table.lengths[c]) + Int(table.sectorCounts[c]) * 512
            try CallBudget.reserve(buffers, what: "the decompression buffers of a chunk")
            defer { CallBudget.release(buffers) }
            let input: [UInt8]
            do {
                input = try file.readBytes(at: table.offsets[c], count: Int(table.lengths[c]))
            } catch {
                throw Dmg.ioError()
            }
            var output = [UInt8](repeating: 0, count: Int(table.sectorCounts[c]) * 512)
            let ok = input.withUnsafeBytes { i in
                output.withUnsafeMutableBytes { o in
                    type == Dmg.typeZlib ? DmgFormat.inflate(i, into: o) : DmgFormat.bunzip2(i, into: o)
                }
            }
            guard ok else { throw Dmg.ioError() }
            chunkBytes = output
        }
        current = c
        return c
    }

    /// zlib (with its header) filling exactly `output`, the stream ending there (qemu's inflate with Z_FINISH).
    static func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else { return false }
        var strm = z_stream()
        strm.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: UInt8.self))
        strm.avail_in = uInt(input.count)
        strm.next_out = outBase.assumingMemoryBound(to: UInt8.self)
        strm.avail_out = uInt(output.count)
        guard inflateInit_(&strm, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return false }
        let r = CZlib.inflate(&strm, Z_FINISH)
        let total = strm.total_out
        inflateEnd(&strm)
        return r == Z_STREAM_END && UInt64(total) == UInt64(output.count)
    }

    /// bzip2 filling exactly `output`, the stream ending there (qemu's dmg-bz2 module).
    static func bunzip2(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else { return false }
        var strm = bz_stream()
        guard BZ2_bzDecompressInit(&strm, 0, 0) == BZ_OK else { return false }
        strm.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: CChar.self))
        strm.avail_in = UInt32(input.count)
        strm.next_out = outBase.assumingMemoryBound(to: CChar.self)
        strm.avail_out = UInt32(output.count)
        let r = BZ2_bzDecompress(&strm)
        let total = (UInt64(strm.total_out_hi32) << 32) | UInt64(strm.total_out_lo32)
        BZ2_bzDecompressEnd(&strm)
        return r == BZ_STREAM_END && total == UInt64(output.count)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        var done = 0
        while done < buffer.count {
            let pos = try offset.adding(UInt64(done))
            let sector = pos / 512
            let c = try chunk(for: sector)
            // Guest bytes from `pos` to the chunk's end (contains() held, so first + count did not wrap).
            let inChunk = sector - table.sectors[c]
            let sectorsLeft = table.sectorCounts[c] - inChunk
            let bytesLeft = sectorsLeft > UInt64(Int.max) / 512 ? UInt64(Int.max) : sectorsLeft * 512 - pos % 512
            let n = Int(min(UInt64(buffer.count - done), bytesLeft))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            switch table.types[c] {
            case Dmg.typeRaw:
                // Sectors of a raw chunk are its stored bytes; what lies past its stored length reads as
                // zeroes (qemu leaves whatever its buffer held there: an undefined case).
                let at = inChunk * 512 + pos % 512  // below 64 MiB: raw chunks are bounded at open
                let length = table.lengths[c]
                let stored = at < length ? Int(min(UInt64(n), length - at)) : 0
                if stored > 0 {
                    do {
                        try file.readZeroPadded(into: UnsafeMutableRawBufferPointer(rebasing: part[0..<stored]),
                                                at: table.offsets[c] + at)
                    } catch {
                        throw Dmg.ioError()  // dmg_read_chunk turns any failed read into EIO
                    }
                }
                if stored < n {
                    UnsafeMutableRawBufferPointer(rebasing: part[stored..<n]).initializeMemory(as: UInt8.self,
                                                                                              repeating: 0)
                }
            case Dmg.typeZlib, Dmg.typeBzip2:
                let at = Int(inChunk * 512 + pos % 512)
                guard at + n <= chunkBytes.count else { throw Dmg.ioError() }
                chunkBytes.withUnsafeBytes { src in
                    part.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[at..<(at + n)]))
                }
            default:
                part.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += n
        }
    }

    /// dmg has no block status of its own: qemu's block layer reports every range as allocated data.
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        BlockStatus(length: max(1, length), allocated: true, data: true, zero: false)
    }

    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: nil, dirty: nil)
    }
}
