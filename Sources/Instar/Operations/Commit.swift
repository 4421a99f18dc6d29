import Glibc

/// `qemu-img commit`: copies what the images above a base hold into that base, then empties the top image
/// (unless told not to). qemu-img 7.2 runs this as an active commit, which is its mirror job writing into the
/// base (block/mirror.c, commit_active_start): the ranges allocated above the base are copied in chunks of the
/// mirror granularity, ranges that read as zeroes become zero writes, the base grows to the top's size when it
/// is smaller, and the backing links of every image stay as they are.
public enum CommitOperation {
    public struct Options {
        /// -f; nil probes.
        public var format: String?
        /// --image-opts.
        public var imageOpts = false
        /// --object secrets; `direct` and `noFlush` follow the cache mode (set by `run`).
        public var open = ImageOpenOptions()
        /// -t.
        public var cache: CacheMode = .writeback
        /// -b: the image of the chain to commit into (nil: the top's backing file).
        public var base: String?
        /// -d (and -b): the top image keeps its contents.
        public var drop = false
        /// -r: bytes per second, 0 for no limit.
        public var rateLimit: UInt64 = 0
        /// Receives the percentages qemu-img -p would print (already filtered as qemu's meter filters them);
        /// throwing stops the commit.
        public var progress: ((Double) throws -> Void)?
        /// Receives warnings printed while the operation goes on (the probed-raw warning).
        public var warn: ((String) -> Void)?
        public init() {}
    }

    /// The mirror job's constants (block/mirror.c): buffer size, in-flight request size.
    static let bufferBytes: UInt64 = 16 << 20
    static let maxIOBytes: UInt64 = 1 << 20

    /// Commits `name`. Errors carry qemu-img's full message (after the "qemu-img: " prefix).
    public static func run(_ name: String, options: Options) throws {
        var open = options.open
        open.direct = options.cache.direct
        open.noFlush = !options.cache.flushes
        let finder = BaseFinder(wanted: options.base)
        open.writableBacking = { overlay, stored, full in finder.isBase(overlay: overlay, stored: stored, full: full) }
        let top: ImageLayer
        do {
            top = try ResizeOperation.openForWrite(name, format: options.format, imageOpts: options.imageOpts,
                                                   open: open, warn: options.warn)
        } catch let e as InstarError where e.code == .locked {
            // qemu opens the chain read-only below the top, then reopens the base read/write: a lock the plain
            // open fails on is reported as that open's error, one only the base's write lock fails on as the
            // reopen's bare message.
            var plain = open
            plain.writableBacking = nil
            let again = try ResizeOperation.openForWrite(name, format: options.format, imageOpts: options.imageOpts,
                                                         open: plain, warn: nil)
            try? again.close()
            guard let r = e.message.firstRange(of: "Failed to get ") else { throw e }
            throw InstarError(e.code, String(e.message[r.lowerBound...]), errno: e.errnoValue)
        } catch let e as InstarError where e.message.hasSuffix(ImageOpener.reopenUnsupported) {
            // The base's reopen fails after the chain opened: qemu prints its bare message.
            guard let r = e.message.firstRange(of: "Block format ") else { throw e }
            throw InstarError(e.code, String(e.message[r.lowerBound...]), errno: e.errnoValue)
        }
        var closed = false
        defer { if !closed { try? top.close() } }
        var meter = ProgressMeter(minSkip: 1.0, report: options.progress)
        try meter.advance(0, max: 100)

        guard let base = top.chain.dropFirst().first(where: { $0.writable }) else {
            if let b = options.base {
                throw InstarError(.notFound, "Did not find '\(b)' in the backing chain of '\(name)'")
            }
            throw InstarError(.chain, "Image does not have a backing file")
        }
        // qemu reopens the base and everything below it read/write; a driver without reopen support fails that.
        if let k = top.chain.firstIndex(where: { $0 === base }) {
            for (i, layer) in top.chain.enumerated() where i >= k {
                let name = layer.format.formatName
                if FormatRegistry.descriptor(named: name)?.reopenable == false {
                    throw InstarError(.unsupported, "Block format '\(name)' used by node '\(reopenNodeName(layer: i))' "
                                      + "does not support reopening files")
                }
            }
        }
        do {
            var job = CommitJob(top: top, base: base, cache: options.cache, rateLimit: options.rateLimit)
            try job.run(meter: &meter)
        } catch let e as InstarError where e.code != .cancelled {
            let code = e.errnoValue != 0 ? e.errnoValue : EIO
            throw InstarError(e.code, "Block job failed: " + strerrorString(code), errno: code)
        }
        try meter.advance(100, max: 0)
        if !options.drop, let emptiable = top.format as? ImageEmptiable {
            do {
                try emptiable.makeEmpty()
            } catch let e as InstarError {
                let code = e.errnoValue != 0 ? e.errnoValue : EIO
                throw InstarError(e.code, "Failed to empty \(top.filename): " + strerrorString(code),
                                  errno: code)
            }
        }
        closed = true
        try top.close()
    }

    /// qemu's bdrv_find_backing_image, asked while the chain opens: the first backing file whose name matches
    /// `wanted` (made absolute against the overlay's directory, then compared by real path; names with a
    /// protocol prefix compare as written), or the top's backing file when nothing is wanted.
    final class BaseFinder {
        let wanted: String?
        private var found = false
        init(wanted: String?) { self.wanted = wanted }

        func isBase(overlay: String, stored: String, full: String) -> Bool {
            if found { return false }
            guard let want = wanted else {
                found = true
                return true
            }
            let match: Bool
            if BaseFinder.hasProtocol(want) || BaseFinder.hasProtocol(stored) {
                match = want == stored || want == full
            } else if let a = BaseFinder.realPath(ImageOpener.resolveBackingName(want, relativeTo: overlay)),
                      let b = BaseFinder.realPath(full) {
                match = a == b
            } else {
                match = false
            }
            if match { found = true }
            return match
        }

        /// path_has_protocol: a ':' before any '/'.
        static func hasProtocol(_ path: String) -> Bool {
            for c in path.utf8 {
                if c == UInt8(ascii: ":") { return true }
                if c == UInt8(ascii: "/") { return false }
            }
            return false
        }

        static func realPath(_ path: String) -> String? {
            guard !path.isEmpty, let p = realpath(path, nil) else { return nil }
            defer { free(p) }
            return String(cString: p)
        }
    }

    /// The node name qemu generates for the chain's layer `index` (top 0) in the commit's messages: its
    /// id_generate counter (the file node of each image is named first, then its format node) and two random
    /// digits.
    static func reopenNodeName(layer index: Int) -> String {
        let r = Int.random(in: 0..<100)
        return "#block" + String(2 * index + 1) + (r < 10 ? "0" : "") + String(r)
    }
}

/// qemu's token-bucket rate limit of block jobs (util/throttle's ratelimit.h with 100 ms slices).
struct JobRateLimit {
    let sliceQuota: UInt64
    let sliceNs: UInt64 = 100_000_000
    var sliceStart: UInt64 = 0
    var sliceEnd: UInt64 = 0
    var dispatched: UInt64 = 0

    init(bytesPerSecond: UInt64) {
        sliceQuota = bytesPerSecond == 0 ? 0 : max(1, UInt64(Double(bytesPerSecond) * 0.1))
    }

    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// The delay before the next request after `bytes` were sent (ratelimit_calculate_delay).
    mutating func delay(after bytes: UInt64) -> UInt64 {
        if sliceQuota == 0 { return 0 }
        let t = JobRateLimit.now()
        if sliceEnd < t {
            sliceStart = t
            sliceEnd = t + sliceNs
            dispatched = 0
        }
        dispatched &+= bytes
        if dispatched < sliceQuota { return 0 }
        let slices = Double(dispatched) / Double(sliceQuota)
        sliceEnd = sliceStart + UInt64(slices * Double(sliceNs))
        return sliceEnd > t ? sliceEnd - t : 0
    }

    static func sleep(ns: UInt64) {
        if ns == 0 { return }
        var ts = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
        var rest = timespec()
        while nanosleep(&ts, &rest) != 0 && errno == EINTR { ts = rest }
    }
}

/// The copy phase of an active commit (mirror_run with a backing-chain base): the dirty map is what the images
/// above the base allocate, rounded to the granularity; each dirty stretch is copied in requests of at most
/// 1 MiB, or zeroed/discarded in one request when the whole chain reads it as zeroes/unallocated.
struct CommitJob {
    let top: ImageLayer
    let base: ImageLayer
    let cache: CacheMode
    var limit: JobRateLimit

    init(top: ImageLayer, base: ImageLayer, cache: CacheMode, rateLimit: UInt64) {
        self.top = top
        self.base = base
        self.cache = cache
        limit = JobRateLimit(bytesPerSecond: rateLimit)
    }

    enum Method { case copy, zero, discard }

    mutating func run(meter: inout ProgressMeter) throws {
        let length = top.virtualSize
        if length == 0 { return }
        // Active commit grows a smaller base to the top's size (never shrinks it).
        if base.virtualSize < length {
            guard let resizable = base.format as? ImageResizable else {
                throw InstarError(.unsupported, "Image format driver does not support resize", errno: ENOTSUP)
            }
            try resizable.resize(to: length, preallocation: .off, backing: base.backing)
        }
        // bdrv_get_default_bitmap_granularity of the base: its cluster size within 4 KiB .. 64 KiB.
        let baseCluster = try base.format.formatInfo().clusterSize
        let granularity = baseCluster.map { min(max($0, 4096), 65536) } ?? 65536
        let dirty = try dirtyRanges(length: length, granularity: granularity)
        // The copy ends with a flush of everything it wrote: with a writeback cache, the base's files start
        // writing each stretch out as soon as it is written, so the disk works during the copy rather than
        // only in that flush (EarlyWriteback.swift; the order in which anything becomes durable is unchanged).
        // Writethrough flushes every request anyway, O_DIRECT bypasses the cache, unsafe never flushes.
        let pace = !cache.writethrough && !cache.direct && cache.flushes
        if pace { for f in base.format.hostFiles { f.beginEarlyWriteback() } }
        defer { if pace { for f in base.format.hostFiles { f.endEarlyWriteback() } } }
        var remaining: UInt64 = dirty.reduce(0) { $0 + ($1.1 - $1.0) }
        var done: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: Int(CommitOperation.maxIOBytes))
        let maxChunks = CommitOperation.bufferBytes / granularity
        for (start, end) in dirty {
            var offset = start
            while offset < end {
                let chunks = min((end - offset) / granularity, maxChunks)
                let span = chunks * granularity
                var left = Int64(chunks)
                var pos = offset
                while left > 0 && pos < length {
                    let want = UInt64(left) * granularity
                    var method = Method.copy
                    var io: UInt64
                    // A failed block status falls back to copying, but a call limit that fires inside it must
                    // stop the commit: the limit fires once, so swallowing it would let the copy run to the end.
                    let status: ChainBlockStatus?
                    do {
                        status = try ChainStatus.aboveStatus(top, at: pos, length: want)
                    } catch let e as InstarError where e.code == .limit {
                        throw e
                    } catch {
                        status = nil
                    }
                    if let s = status {
                        io = s.data ? min(s.length, CommitOperation.maxIOBytes) : s.length
                    } else {
                        io = min(want, CommitOperation.maxIOBytes)
                    }
                    io -= io % granularity
                    if io < granularity {
                        io = granularity
                    } else if let s = status, !s.data {
                        // Only requests that cover whole clusters of the base become zero writes or discards.
                        if let c = baseCluster, c > 0, pos % c != 0 || io % c != 0 {
                            method = .copy
                        } else {
                            method = s.zero ? .zero : .discard
                        }
                    }
                    io = min(io, length - pos)
                    if method == .copy, let s = status, try copyInKernel(s, at: pos, bytes: io) {
                        // copied file to file
                    } else {
                        try perform(method, at: pos, bytes: io, buffer: &buffer)
                    }
                    done += io
                    let consumed = io.divCeil(granularity) * granularity
                    remaining = remaining > consumed ? remaining - consumed : 0
                    let total = done + remaining
                    try meter.advance(Float(done) / Float(total) * 100, max: 0)
                    let accounted = method == .copy ? io : 0
                    JobRateLimit.sleep(ns: limit.delay(after: accounted))
                    pos += io
                    left -= Int64(io.divCeil(granularity))
                }
                offset += span
            }
        }
        try base.format.flush()
    }

    /// Data stored plainly in a host file, going unchanged into a base that stores guest bytes plainly, is
    /// copied by the kernel (copy_file_range): the base ends up with the same bytes as through a buffer.
    /// Returns false when the range does not qualify (or the kernel copied nothing).
    func copyInKernel(_ status: ChainBlockStatus, at offset: UInt64, bytes: UInt64) throws -> Bool {
        // A kernel copy reads without HostFile.read: the call's limits are checked here instead.
        try CallBudget.checkpoint()
        guard status.data, !status.zero, bytes <= status.length, let host = status.hostOffset,
              let name = status.hostFile else { return false }
        let chain = top.chain
        guard status.depth < chain.count,
              let src = chain[status.depth].format.hostFiles.first(where: { $0.path == name }) else { return false }
        guard let target = base.format as? PlainGuestFile,
              let (dst, dstOffset) = target.plainHostRange(at: offset, length: bytes) else {
            // A base with metadata of its own (qcow2) places the clusters as a write would and lets the kernel
            // copy the data into them.
            guard let copying = base.format as? HostCopyWritable,
                  try copying.writeCopying(from: src, at: host, length: bytes, to: offset, backing: base.backing) else {
                return false
            }
            if cache.writethrough { try base.format.flush() }
            return true
        }
        let copied = dst.copyIn(from: src, at: host, length: bytes, to: dstOffset)
        if copied == 0 { return false }
        if copied < bytes {
            // The kernel stopped part way: the rest goes through a buffer.
            var rest = [UInt8](repeating: 0, count: Int(bytes - copied))
            try rest.withUnsafeMutableBytes { raw in
                try top.read(into: raw, at: offset + copied)
                try base.format.write(UnsafeRawBufferPointer(raw), at: offset + copied, backing: base.backing)
            }
        }
        if cache.writethrough { try base.format.flush() }
        return true
    }

    func perform(_ method: Method, at offset: UInt64, bytes: UInt64, buffer: inout [UInt8]) throws {
        switch method {
        case .copy:
            try buffer.withUnsafeMutableBytes { raw in
                let slice = UnsafeMutableRawBufferPointer(rebasing: raw[0..<Int(bytes)])
                try top.read(into: slice, at: offset)
                try base.format.write(UnsafeRawBufferPointer(slice), at: offset, backing: base.backing)
            }
        case .zero:
            try base.format.writeZeroes(at: offset, length: bytes, mayUnmap: true, backing: base.backing)
        case .discard:
            try base.format.discard(at: offset, length: bytes)
        }
        if cache.writethrough { try base.format.flush() }
    }

    /// mirror_dirty_init: the ranges the images above the base allocate (bdrv_is_allocated_above down to the
    /// base's overlay), widened to the granularity and merged, in guest order.
    func dirtyRanges(length: UInt64, granularity: UInt64) throws -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        var offset: UInt64 = 0
        while offset < length {
            let (allocated, count) = try allocatedAbove(at: offset, length: length - offset)
            if allocated {
                let s = offset - offset % granularity
                let e = min(try (offset + count).alignedUp(granularity), try length.alignedUp(granularity))
                if let last = out.last, last.1 >= s {
                    out[out.count - 1].1 = max(last.1, e)
                } else {
                    out.append((s, e))
                }
            }
            offset += count
        }
        return out
    }

    /// Whether a layer above the base decides the range at `offset`, and for how many bytes that holds.
    func allocatedAbove(at offset: UInt64, length: UInt64) throws -> (Bool, UInt64) {
        var layer = top
        var bytes = length
        while layer !== base {
            guard let s = try ChainStatus.layerStatus(layer, at: offset, length: bytes) else {
                // Past the end of a shorter image above the base: its zeroes count as allocated there.
                return (true, bytes)
            }
            if s.allocated { return (true, s.length) }
            bytes = s.length
            guard let next = layer.backing else { break }
            layer = next
        }
        return (false, bytes)
    }
}
