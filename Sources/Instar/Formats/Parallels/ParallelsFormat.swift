import Glibc

/// Parallels (the "WithoutFreeSpace"/"WithouFreSpacExt" expanding format) as qemu 7.2's block/parallels.c
/// handles it: a 64-byte header, a block allocation table (BAT) of little-endian u32 cluster numbers right after
/// it (0: unallocated), data clusters appended at the data end. The original signature counts BAT entries in
/// sectors, the extended one in clusters. A writer marks the header in use while the image is open and clears it
/// at close, truncating the file to the data end; an image left in use is opened read-only only (check -r
/// repairs it). The open sequence, unit quirks and messages follow qemu's.
public final class ParallelsFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "parallels", probe: { header, _ in probe(header) },
                                 open: { try ParallelsFormat(request: $0) })
        d.runtimeOptions = ["prealloc-size", "prealloc-mode"]
        // qemu's parallels driver has no reopen: commit cannot write into a parallels base.
        d.reopenable = false
        return d
    }()

    static let magic = Array("WithoutFreeSpace".utf8)
    static let magicExt = Array("WithouFreSpacExt".utf8)
    static let version: UInt32 = 2
    static let inuseMagic: UInt32 = 0x746F_6E59
    static let headerBytes: UInt64 = 64
    /// qemu's header buffers are written back in blocks of four host pages.
    static let dirtyBlock: UInt64 = 16384
    /// The memory alignment qemu rounds the header buffer to (the host page).
    static let memAlign: UInt64 = 4096
    /// qemu's BDRV_REQUEST_MAX_BYTES: a larger read fails with EIO.
    static let maxRequest: UInt64 = 0x7FFF_FE00
    /// qemu's BDRV_MAX_LENGTH.
    static let maxLength: UInt64 = 0x7FFF_FFFF_C000_0000
    /// instar's bound on the header and BAT held in memory (qemu allows up to 2 GiB).
    static let maxStoredHeader: UInt64 = 512 << 20

    static func probe(_ h: [UInt8]) -> Int {
        guard h.count >= 64 else { return 0 }
        let m = Array(h[0..<16])
        guard m == magic || m == magicExt, let v = try? ByteReader(h).u32le(at: 16), v == version else { return 0 }
        return 100
    }

    enum PreallocMode { case falloc, truncate }

    public let formatName = "parallels"
    let file: HostFile
    let writable: Bool
    let filename: String
    /// The stored part of qemu's header buffer (header and BAT): bytes past it are zeroes up to `headerSize`.
    var header: [UInt8]
    /// qemu's s->header_size: how many bytes of the file its header buffer covers.
    let headerSize: UInt64
    let batSize: UInt32
    /// Sectors per cluster ("tracks").
    let tracks: UInt64
    let clusterSize: UInt64
    /// Sectors per BAT unit: 1 for the original signature, `tracks` for the extended one.
    let offMultiplier: UInt64
    /// Where the next cluster goes, in sectors (qemu's s->data_end).
    var dataEnd: UInt64
    /// The in-use flag was set when the image was opened (qemu's header_unclean).
    var unclean: Bool
    var dirtyBlocks = Set<UInt64>()
    let totalSectors: UInt64
    var preallocSize: UInt64
    var preallocMode: PreallocMode

    public var hostFiles: [HostFile] { [file] }
    public var virtualSize: UInt64 { totalSectors &* 512 }
    public var backingReference: BackingReference? { nil }

    init(request: OpenRequest) throws {
        let f = request.file
        file = f
        writable = request.writable
        filename = request.filename
        var h = [UInt8](repeating: 0, count: 64)
        try h.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: 0) }
        let r = ByteReader(h)
        var nb = try r.u64le(at: 36)
        let m = Array(h[0..<16])
        let multiplier: UInt64
        guard try r.u32le(at: 16) == ParallelsFormat.version else { throw ParallelsFormat.notParallels() }
        let tracksField = UInt64(try r.u32le(at: 28))
        if m == ParallelsFormat.magic {
            multiplier = 1
            nb &= 0xFFFF_FFFF
        } else if m == ParallelsFormat.magicExt {
            multiplier = tracksField
        } else {
            throw ParallelsFormat.notParallels()
        }
        if tracksField == 0 {
            throw InstarError(.invalid, "Invalid image: Zero sectors per track", errno: EINVAL)
        }
        if tracksField > UInt64(Int32.max / 513) {
            throw InstarError(.range, "Invalid image: Too big cluster", errno: EFBIG)
        }
        tracks = tracksField
        offMultiplier = multiplier
        clusterSize = tracksField << 9
        let bat = try r.u32le(at: 32)
        if bat > UInt32(Int32.max) / 4 {
            throw InstarError(.range, "Catalog too large", errno: EFBIG)
        }
        batSize = bat
        let size = ParallelsFormat.headerBytes + 4 * UInt64(bat)
        var hs = (size + ParallelsFormat.memAlign - 1) & ~(ParallelsFormat.memAlign - 1)
        var de = UInt64(try r.u32le(at: 48))
        // qemu's fallback counts the BAT's end in bytes and keeps it as sectors; the comparison below mixes
        // sectors and bytes the same way.
        if de == 0 { de = (size + 511) & ~511 }
        if de < hs { hs = size }
        headerSize = hs
        if hs > ParallelsFormat.maxRequest {
            throw InstarError(.io, "Could not open '\(request.filename)': \(strerrorString(EIO))", errno: EIO)
        }
        let stored = min(hs, max(try f.size(), 64))
        guard stored <= ParallelsFormat.maxStoredHeader else {
            throw InstarError(.unsupported, "Parallels BAT of \(bat) entries is larger than instar supports",
                              errno: ENOTSUP)
        }
        try CallBudget.reserve(Int(stored), what: "the header and BAT")
        var full = [UInt8](repeating: 0, count: Int(stored))
        try full.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: 0) }
        header = full
        // The data end follows the highest cluster the BAT names (only stored entries can be non-zero).
        let storedEntries = min(UInt64(bat), (stored - min(stored, 64)) / 4)
        var i = 0
        while UInt64(i) < storedEntries {
            let e = UInt64(header.u32le(at: 64 + 4 * i))
            let off = e * multiplier
            if off >= de { de = off + tracksField }
            i += 1
        }
        dataEnd = de
        totalSectors = nb
        unclean = false
        if try r.u32le(at: 44) == ParallelsFormat.inuseMagic {
            unclean = true
            if request.writable && !request.options.check {
                throw InstarError(.permission, "parallels: Image was not closed correctly; cannot be opened read/write",
                                  errno: EACCES)
            }
        }
        // Runtime options.
        var psize: UInt64 = 128 << 20
        if let v = request.options.driverOptions["prealloc-size"] {
            switch v {
            case let .string(s):
                guard case .success(let n) = SizeParse.parse(s) else { throw RawFormat.sizeOptionError("prealloc-size") }
                psize = n
            default:
                guard let n = v.int64Value, n >= 0 else { throw RawFormat.sizeOptionError("prealloc-size") }
                psize = UInt64(n)
            }
        }
        preallocSize = max(tracksField, psize >> 9)
        preallocMode = .falloc
        if let v = request.options.driverOptions["prealloc-mode"] {
            let text: String
            if case let .string(s) = v { text = s } else { text = QJSON.compact(v) }
            switch text {
            case "falloc": preallocMode = .falloc
            case "truncate": preallocMode = .truncate
            default: throw InstarError(.invalid, "invalid parameter value: \(text)", errno: EINVAL)
            }
        }
        let extOff = try r.u64le(at: 56)
        if extOff != 0 {
            if request.writable {
                Diagnostics.warning("Format Extension ignored in RW mode")
            } else {
                try readFormatExtension(sectors: extOff)
            }
        }
        if request.writable {
            setHeaderU32(ParallelsFormat.inuseMagic, at: 44)
            try updateHeader()
        }
        // The block layer then refreshes the size: bs->total_sectors * 512 may not pass BDRV_MAX_LENGTH (qemu
        // multiplies in 64 bits, wrapping). The driver's close still runs on the failed node. instar also refuses
        // sizes whose byte count does not fit in 63 bits, which qemu opens and then fails to size.
        if nb &* 512 > ParallelsFormat.maxLength || nb > UInt64(Int64.max) / 512 {
            try? close()
            throw InstarError(.range, "Could not refresh total sector count: File too large", errno: EFBIG)
        }
    }

    static func notParallels() -> InstarError {
        InstarError(.invalid, "Image not in Parallels format", errno: EINVAL)
    }

    // MARK: header buffer

    func setHeaderU32(_ v: UInt32, at o: Int) {
        if header.count < o + 4 { header += [UInt8](repeating: 0, count: o + 4 - header.count) }
        header.putU32le(v, at: o)
    }

    func entry(_ index: UInt64) -> UInt32 {
        let o = 64 + 4 * index
        guard index < UInt64(batSize), o + 4 <= UInt64(header.count) else { return 0 }
        return header.u32le(at: Int(o))
    }

    func setEntry(_ index: UInt64, _ v: UInt32) {
        let o = Int(64 + 4 * index)
        if header.count < o + 4 {
            // Grow the stored part by whole dirty blocks, never past the header buffer.
            let want = min(headerSize, (UInt64(o + 4) + ParallelsFormat.dirtyBlock - 1) & ~(ParallelsFormat.dirtyBlock - 1))
            header += [UInt8](repeating: 0, count: Int(max(want, UInt64(o + 4))) - header.count)
        }
        header.putU32le(v, at: o)
        dirtyBlocks.insert(UInt64(o) / ParallelsFormat.dirtyBlock)
    }

    /// Header bytes [start, start + count) of qemu's buffer (zeroes past the stored part).
    func headerSlice(_ start: UInt64, _ count: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(count))
        let s = Int(start)
        let e = min(header.count, Int(start + count))
        if s < e { out.replaceSubrange(0..<(e - s), with: header[s..<e]) }
        return out
    }

    /// parallels_update_header: the first page of the header buffer, synced.
    func updateHeader() throws {
        let n = min(max(ParallelsFormat.memAlign, ParallelsFormat.headerBytes), headerSize)
        try file.write(headerSlice(0, n), at: 0)
        try file.sync()
    }

    /// The BAT blocks changed since the last flush, written from the header buffer.
    func writeDirtyBlocks() throws {
        for b in dirtyBlocks.sorted() {
            let off = b * ParallelsFormat.dirtyBlock
            guard off < headerSize else { continue }
            let n = min(ParallelsFormat.dirtyBlock, headerSize - off)
            try file.write(headerSlice(off, n), at: off)
        }
    }

    // MARK: mapping

    /// The host byte offset of BAT entry `e`.
    func hostOffset(_ e: UInt32) -> UInt64 { UInt64(e) * offMultiplier * 512 }

    /// qemu's block_status: from `pos`, the run of clusters that are unallocated, or allocated and contiguous in
    /// the file; (host offset of `pos` or nil, length), the length at most `len`.
    func run(_ pos: UInt64, _ len: UInt64) -> (UInt64?, UInt64) {
        let first = pos / clusterSize
        let into = pos % clusterSize
        // Past the BAT everything is unallocated (the header's size may outgrow its BAT).
        if first >= UInt64(batSize) { return (nil, len) }
        let e0 = entry(first)
        let start: UInt64? = e0 == 0 ? nil : hostOffset(e0) + into
        var n = min(len, clusterSize - into)
        var index = first + 1
        var expected = e0 == 0 ? 0 : hostOffset(e0) + clusterSize
        var steps = 0
        while n < len && steps < (1 << 16) {
            let e = entry(index)
            if e0 == 0 {
                if e != 0 { break }
                if index >= UInt64(batSize) {
                    n = len
                    break
                }
            } else {
                if e == 0 || hostOffset(e) != expected { break }
                expected += clusterSize
            }
            n += min(len - n, clusterSize)
            index += 1
            steps += 1
        }
        return (start, n)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        var done: UInt64 = 0
        let total = UInt64(buffer.count)
        while done < total {
            let pos = offset + done
            let (host, n) = run(pos, total - done)
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(done)..<Int(done + n)])
            if let h = host {
                try file.readZeroPadded(into: part, at: h)
            } else if let b = backing {
                try b.read(into: part, at: pos)
            } else {
                part.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += n
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        let (host, n) = run(offset, max(length, 1))
        guard let h = host else { return .unallocated(n) }
        let (f, o) = file.hostLocation(h)
        return BlockStatus(length: n, allocated: true, data: true, zero: false, hostOffset: o, hostFile: f.path)
    }

    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: nil, dirty: nil)
    }
}

extension Array where Element == UInt8 {
    fileprivate func u32le(at o: Int) -> UInt32 {
        UInt32(self[o]) | UInt32(self[o + 1]) << 8 | UInt32(self[o + 2]) << 16 | UInt32(self[o + 3]) << 24
    }
}
