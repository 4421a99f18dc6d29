import Glibc

/// `qemu-img convert`: copies the guest contents of one or more sources (concatenated) into a target written
/// through the `ImageFormat` write API, following qemu-img's chunking so holes, zero writes and progress steps
/// come out the same.

/// qemu's cache modes (bdrv_parse_cache_mode).
public enum CacheMode: String {
    case none, writeback, writethrough, directsync, unsafe

    /// Parses a -t/-T argument ("off" is qemu's alias of "none"); nil when qemu rejects it.
    public init?(qemuName: String) {
        if qemuName == "off" { self = .none; return }
        self.init(rawValue: qemuName)
    }

    /// O_DIRECT on the image files.
    public var direct: Bool { self == .none || self == .directsync }
    /// Every write is followed by a flush.
    public var writethrough: Bool { self == .writethrough || self == .directsync }
    /// Flushes are real (everything but unsafe).
    public var flushes: Bool { self != .unsafe }
}

public struct ConvertOptions {
    /// -O; only formats the registry can create as targets ("raw" for now).
    public var targetFormat = "raw"
    /// -n: the target exists and is opened, not created.
    public var noCreate = false
    /// --target-is-zero (with -n): the target reads as zeroes already.
    public var targetIsZero = false
    /// -t.
    public var targetCache = CacheMode.unsafe
    /// -S in bytes: zero runs at least this long are left unwritten; 0 writes every byte.
    public var sparseSize: UInt64 = 4096
    /// -c.
    public var compress = false
    /// Removes a target this call created when the copy fails or is cancelled.
    public var removeTargetOnFailure = true
    /// Each progress value qemu-img -p would print (from 0 to 100 inclusive); throw to cancel.
    public var progress: ((Double) throws -> Void)?

    public init() {}
}

public enum ConvertOperation {
    static let sectorSize: UInt64 = 512
    /// qemu-img's IO_BUF_SIZE: the copy chunk (2 MiB).
    static let bufferSectors: UInt64 = 4096
    /// MAX_BUF_SECTORS: the largest -S qemu accepts (16 MiB).
    public static let maxSparseBytes: UInt64 = 32768 * 512
    /// BDRV_REQUEST_MAX_SECTORS.
    static let requestMaxSectors: UInt64 = UInt64(Int32.max) >> 9

    /// Checks -S as qemu does; returns the error message for a bad value.
    public static func sparseSizeError(_ bytes: UInt64) -> String? {
        if bytes % sectorSize != 0 || bytes / sectorSize > maxSparseBytes / sectorSize {
            return "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                + "\(maxSparseBytes). Select 0 to disable sparse detection (fully allocates output)."
        }
        return nil
    }

    /// Creates a raw target of `size` bytes as qemu's file driver does with preallocation=off: truncate, then
    /// write the first block so its allocation can be probed later.
    public static func createRawTarget(_ path: String, size: UInt64) throws {
        let file: HostFile
        do {
            file = try HostFile.open(path, writable: true, create: true, truncate: true)
        } catch let e as InstarError {
            var m = e.message
            let prefix = "Could not open '\(path)'"
            if m.hasPrefix(prefix) { m = "Could not create '\(path)'" + m.dropFirst(prefix.count) }
            throw InstarError(e.code, m, errno: e.errnoValue)
        }
        try file.truncate(to: size)
        if size > 0 {
            let first = size < 4096 ? 512 : 4096
            try file.write([UInt8](repeating: 0, count: first), at: 0)
        }
    }

    /// Opens the target for writing with the cache mode's flags.
    public static func openTarget(_ path: String, format: String, cache: CacheMode) throws -> ImageLayer {
        var options = ImageOpenOptions()
        options.direct = cache.direct
        return try ImageOpener.open(ImageSpec(filename: path, format: format), options: options, writable: true,
                                    openBacking: false)
    }

    /// One stretch of the source as convert_iteration_sectors() classifies it.
    struct Segment {
        var sector: UInt64
        var count: UInt64
        var status: Status
    }

    enum Status { case data, zero }

    /// Copies `sources` (concatenated) into `target`. `targetCreated` says whether the call created it (zero
    /// init: zero ranges are then left as holes).
    public static func copy(sources: [ImageLayer], into target: ImageLayer, targetCreated: Bool,
                            options: ConvertOptions) throws {
        var sourceSectors: [UInt64] = []
        var alignment: [UInt64] = []
        for s in sources {
            sourceSectors.append(s.virtualSize.divCeil(sectorSize))
            let cluster = (try? s.format.formatInfo().clusterSize) ?? nil
            alignment.append(max(1, (cluster ?? 0) / sectorSize))
        }
        let totalSectors = sourceSectors.reduce(0, +)
        let minSparse = options.sparseSize / sectorSize
        let hasZeroInit = (targetCreated && minSparse > 0) || options.targetIsZero
        let writeAlignment = max(pow2floor(minSparse), 1)
        let targetFormat = target.format

        if target.virtualSize.divCeil(sectorSize) < totalSectors {
            throw InstarError.invalid("output file is smaller than input file")
        }

        // Classify the whole source first: progress counts only the sectors that will be read or written.
        var segments: [Segment] = []
        var allocated: UInt64 = 0
        var sector: UInt64 = 0
        var sourceIndex = 0
        var sourceStart: UInt64 = 0
        while sector < totalSectors {
            while sector >= sourceStart + sourceSectors[sourceIndex] {
                sourceStart += sourceSectors[sourceIndex]
                sourceIndex += 1
            }
            let src = sources[sourceIndex]
            let n = min(totalSectors - sector, requestMaxSectors)
            let offset = (sector - sourceStart) * sectorSize
            let st = try StepError.wrap(.blockStatus, at: offset, operand: sourceIndex) {
                try ChainStatus.aboveStatus(src, at: offset, length: n * sectorSize)
            }
            var count = st.length.divCeil(sectorSize)
            let tail = (sector - sourceStart + count) % alignment[sourceIndex]
            if count > tail { count -= tail }
            let status: Status = st.zero ? .zero : .data
            if status == .data || minSparse == 0 { allocated += count }
            if status == .data {
                var left = count
                var at = sector
                while left > 0 {
                    let k = min(left, bufferSectors)
                    segments.append(Segment(sector: at, count: k, status: .data))
                    at += k
                    left -= k
                }
            } else {
                segments.append(Segment(sector: sector, count: count, status: .zero))
            }
            sector += count
        }

        // The caller reports the initial 0% (qemu-img prints it before opening the images).
        var meter = ProgressMeter(minSkip: 1.0, report: options.progress)

        let bufferBytes = Int(bufferSectors * sectorSize)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferBytes, alignment: HostFile.directAlignment)
        defer { buffer.deallocate() }
        var done: UInt64 = 0
        sourceIndex = 0
        sourceStart = 0
        for seg in segments {
            var segSector = seg.sector
            var left = seg.count
            while left > 0 {
                // -S 0 writes zero stretches as data, one buffer at a time.
                let n = seg.status == .zero && minSparse == 0 ? min(left, bufferSectors) : left
                while segSector >= sourceStart + sourceSectors[sourceIndex] {
                    sourceStart += sourceSectors[sourceIndex]
                    sourceIndex += 1
                }
                if seg.status == .data || minSparse == 0 {
                    done += n
                    try meter.set(done: done, total: allocated)
                }
                // Data and -S 0 zero stretches are at most one buffer long; other zero stretches are not read.
                let bytes = Int(min(n, bufferSectors) * sectorSize)
                let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<bytes])
                // qemu-img names the failed chunk by its start in the concatenated source.
                let chunkStart = segSector * sectorSize
                if seg.status == .data {
                    let source = sources[sourceIndex]
                    try StepError.wrap(.read, at: chunkStart, operand: sourceIndex) {
                        try source.read(into: chunk, at: (segSector - sourceStart) * sectorSize)
                    }
                    try StepError.wrap(.write, at: chunkStart) {
                        try writeData(chunk, sector: segSector, to: targetFormat, minSparse: minSparse,
                                      alignment: writeAlignment, hasZeroInit: hasZeroInit, cache: options.targetCache)
                    }
                } else if minSparse == 0 {
                    chunk.initializeMemory(as: UInt8.self, repeating: 0)
                    try StepError.wrap(.write, at: chunkStart) {
                        try writeData(chunk, sector: segSector, to: targetFormat, minSparse: 0,
                                      alignment: writeAlignment, hasZeroInit: hasZeroInit, cache: options.targetCache)
                    }
                } else if !hasZeroInit {
                    try StepError.wrap(.write, at: chunkStart) {
                        try targetFormat.writeZeroes(at: chunkStart, length: n * sectorSize, mayUnmap: true,
                                                     backing: nil)
                        if options.targetCache.writethrough { try targetFormat.flush() }
                    }
                }
                segSector += n
                left -= n
            }
        }
        if options.targetCache.flushes { try targetFormat.flush() }
        try meter.advance(100, max: 0)
    }

    /// convert_co_write() for a data buffer: runs of zero sectors at least `minSparse` long become zero writes
    /// (or nothing with zero init); the rest is written.
    static func writeData(_ buf: UnsafeMutableRawBufferPointer, sector: UInt64, to target: ImageFormat,
                          minSparse: UInt64, alignment: UInt64, hasZeroInit: Bool, cache: CacheMode) throws {
        let total = UInt64(buf.count) / sectorSize
        var i: UInt64 = 0
        while i < total {
            var n = total - i
            var isData = true
            if minSparse > 0 {
                let r = allocatedSectorsMin(buf, from: i, count: n, min: minSparse, sector: sector + i,
                                            alignment: alignment)
                isData = r.allocated
                n = r.count
            }
            let byteRange = Int(i * sectorSize)..<Int((i + n) * sectorSize)
            if isData {
                try target.write(UnsafeRawBufferPointer(rebasing: buf[byteRange]), at: (sector + i) * sectorSize,
                                 backing: nil)
            } else if !hasZeroInit {
                try target.writeZeroes(at: (sector + i) * sectorSize, length: n * sectorSize, mayUnmap: true,
                                       backing: nil)
            }
            if cache.writethrough { try target.flush() }
            i += n
        }
    }

    /// True when the 512-byte sector `index` of `buf` is all zeroes (memcmp against itself shifted: word-wise
    /// in glibc, no per-byte loop here).
    @inline(__always)
    static func sectorIsZero(_ buf: UnsafeMutableRawBufferPointer, _ index: UInt64) -> Bool {
        guard let base = buf.baseAddress else { return true }
        let p = base + Int(index * sectorSize)
        return isZero(UnsafeRawPointer(p), Int(sectorSize))
    }

    /// Whether `count` bytes at `p` are all zero.
    public static func isZero(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
        if count == 0 { return true }
        if p.load(as: UInt8.self) != 0 { return false }
        return memcmp(p, p + 1, count - 1) == 0
    }

    /// qemu-img's is_allocated_sectors(): the run of sectors from `from` with the same zero state, its end
    /// aligned to `alignment` where that saves a read-modify-write.
    static func allocatedSectors(_ buf: UnsafeMutableRawBufferPointer, from: UInt64, count n: UInt64, sector: UInt64,
                                 alignment: UInt64) -> (allocated: Bool, count: UInt64) {
        if n == 0 { return (false, 0) }
        var isZero = sectorIsZero(buf, from)
        var i: UInt64 = 1
        while i < n {
            if isZero != sectorIsZero(buf, from + i) { break }
            i += 1
        }
        if i == n { return (!isZero, i) }
        let tail = (sector + i) & (alignment - 1)
        if tail != 0 {
            if isZero && i <= tail { isZero = false }
            if !isZero {
                i = min(i + alignment - tail, n)
            } else {
                i -= tail
            }
        }
        return (!isZero, i)
    }

    /// qemu-img's is_allocated_sectors_min(): after data, zero runs shorter than `min` sectors stay data.
    static func allocatedSectorsMin(_ buf: UnsafeMutableRawBufferPointer, from: UInt64, count: UInt64, min: UInt64,
                                    sector: UInt64, alignment: UInt64) -> (allocated: Bool, count: UInt64) {
        let minRun = Swift.min(min, count)
        let first = allocatedSectors(buf, from: from, count: count, sector: sector, alignment: alignment)
        if !first.allocated { return first }
        var used = first.count
        var checked = used
        var n = count - first.count
        var at = from + first.count
        var sec = sector + first.count
        while n > 0 {
            let r = allocatedSectors(buf, from: at, count: n, sector: sec, alignment: alignment)
            at += r.count
            n -= r.count
            sec += r.count
            checked += r.count
            if r.allocated {
                used = checked
            } else if r.count >= minRun {
                break
            }
        }
        return (true, used)
    }

    static func pow2floor(_ v: UInt64) -> UInt64 {
        if v == 0 { return 0 }
        return UInt64(1) << UInt64(63 - v.leadingZeroBitCount)
    }
}
