import Glibc

/// `qemu-img bench` (qemu-img.c img_bench): `count` requests of `bufferSize` bytes, reads or writes, offsets
/// stepping by `step` from `offset` (wrapping at the image's size), `depth` of them in flight, with an optional
/// flush every `flushInterval` requests. The queue depth is real: `depth` threads each keep one request going
/// (formats that are not `ConcurrentGuestIO` get their requests one at a time).
public enum BenchOperation {
    /// The most threads a run starts, whatever the queue depth asked for.
    static let maxThreads = 256
    public struct Options {
        public var format: String?
        public var imageOpts = false
        public var open = ImageOpenOptions()
        /// -t (nil: qemu-img bench's default, writeback).
        public var cache: CacheMode?
        /// -n / -i native: needs O_DIRECT.
        public var nativeAIO = false
        public var count = 75000
        public var depth = 64
        public var offset: Int64 = 0
        public var bufferSize = 4096
        public var step = 0
        public var pattern: UInt8 = 0
        public var flushInterval = 0
        public var drainOnFlush = true
        public var write = false
        /// -q (qemu-img bench prints the same either way).
        public var quiet = false
        public var warn: ((String) -> Void)?
        /// Called with the percentage of requests completed (about every 1%); a throw stops the run.
        public var progress: ((Double) throws -> Void)?
        public init() {}
    }

    public struct Result: Equatable {
        public var requests: UInt64
        public var bytes: UInt64
        public var seconds: Double
    }

    /// The checks img_bench makes after parsing, before it opens the image.
    public static func checkOptions(_ o: Options) throws {
        if !o.write && o.flushInterval != 0 {
            throw InstarError.invalid("--flush-interval is only available in write tests")
        }
        if o.flushInterval != 0 && o.flushInterval < o.depth {
            throw InstarError.invalid("Flush interval can't be smaller than depth")
        }
    }

    /// Opens the image as img_bench does (read/write only for -w).
    public static func open(_ name: String, _ o: Options) throws -> ImageLayer {
        if o.imageOpts && o.format != nil {
            throw InstarError.invalid("--image-opts and --format are mutually exclusive")
        }
        var open = o.open
        if let c = o.cache {
            open.direct = c.direct
            open.noFlush = !c.flushes
        }
        do {
            if o.nativeAIO && !open.direct {
                throw InstarError.invalid("aio=native was specified, but it requires cache.direct=on, which was not "
                                          + "specified.")
            }
            let spec = try ImageOpener.commandLineSpec(name, format: o.format, imageOpts: o.imageOpts, warn: o.warn)
            let layer = try ImageOpener.open(spec, options: open, writable: o.write)
            if o.write && spec.format == nil && layer.format.formatName == "raw" {
                o.warn?(ResizeOperation.probedRawWarning(ResizeOperation.probedFileName(spec, layer)))
            }
            return layer
        } catch let e as InstarError {
            throw e.prepending("Could not open '\(name)': ")
        }
    }

    /// qemu-img's first output line(s).
    public static func headerLines(_ o: Options) -> String {
        var s = "Sending \(o.count) \(o.write ? "write" : "read") requests, \(o.bufferSize) bytes each, \(o.depth) "
            + "in parallel (starting at offset \(o.offset), step size \(o.step == 0 ? o.bufferSize : o.step))\n"
        if o.flushInterval != 0 { s += "Sending flush every \(o.flushInterval) requests\n" }
        return s
    }

    /// Runs the requests on an open image.
    public static func run(_ layer: ImageLayer, _ o: Options) throws -> Result {
        guard o.depth >= 1 else { throw InstarError.invalid("Invalid queue depth specified") }
        let state = BenchState(layer: layer, options: o)
        let start = monotonicSeconds()
        // A format that takes one request at a time gets them in issue order from one thread, so that its
        // allocations follow the offsets as qemu's do.
        // One thread per request in flight, up to a bound a caller's depth cannot push past (each holds a buffer).
        state.runThreads(state.concurrent ? min(o.depth, max(1, o.count), BenchOperation.maxThreads) : 1)
        let seconds = monotonicSeconds() - start
        if let e = state.failure { throw e }
        return Result(requests: UInt64(o.count), bytes: UInt64(o.count) * UInt64(o.bufferSize), seconds: seconds)
    }

    static func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// The shared queue of one bench run: request numbers are handed out under a mutex; a flush (after each
/// `flushInterval` completions) either waits for the requests in flight and holds back new ones (drain) or
/// runs beside them.
final class BenchState {
    let layer: ImageLayer
    let o: BenchOperation.Options
    let size: UInt64
    let concurrent: Bool
    /// Guards the counters below; its condition wakes workers held back by a draining flush.
    let state = ConditionLock()
    /// Serialises the I/O of a format that is not `ConcurrentGuestIO`.
    let ioLock = ConditionLock()
    var issued = 0
    var completed = 0
    var inFlight = 0
    var flushing = false
    var nextOffset: UInt64
    var failure: InstarError?
    var lastReported = -1

    init(layer: ImageLayer, options: BenchOperation.Options) {
        self.layer = layer
        o = options
        size = layer.virtualSize
        concurrent = layer.format is ConcurrentGuestIO
        nextOffset = UInt64(max(0, options.offset))
    }

    func runThreads(_ n: Int) {
        var threads: [pthread_t] = []
        for _ in 1..<max(1, n) {
            var tid = pthread_t()
            let me = Unmanaged.passRetained(self).toOpaque()
            let rc = pthread_create(&tid, nil, { arg in
                guard let arg else { return nil }
                Unmanaged<BenchState>.fromOpaque(arg).takeRetainedValue().worker()
                return nil
            }, me)
            if rc == 0 {
                threads.append(tid)
            } else {
                Unmanaged<BenchState>.fromOpaque(me).release()
            }
        }
        worker()
        for t in threads { pthread_join(t, nil) }
    }

    private func io(_ buf: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        // blk_aio_* refuse a request past the end of the image.
        let (end, over) = offset.addingReportingOverflow(UInt64(buf.count))
        if over || end > size { throw InstarError(.io, "Failed request: Input/output error", errno: EIO) }
        if !concurrent { ioLock.lock() }
        defer { if !concurrent { ioLock.unlock() } }
        do {
            if o.write {
                try layer.format.write(UnsafeRawBufferPointer(buf), at: offset, backing: layer.backing)
            } else {
                try layer.read(into: buf, at: offset)
            }
        } catch let e as InstarError {
            throw InstarError(.io, "Failed request: \(String(cString: strerror(e.errnoValue != 0 ? e.errnoValue : EIO)))",
                              errno: e.errnoValue)
        }
    }

    private func flush() throws {
        if !concurrent { ioLock.lock() }
        defer { if !concurrent { ioLock.unlock() } }
        do {
            try layer.format.flush()
        } catch let e as InstarError {
            throw InstarError(.io, "Failed flush request: \(String(cString: strerror(e.errnoValue != 0 ? e.errnoValue : EIO)))",
                              errno: e.errnoValue)
        }
    }

    func worker() {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, o.bufferSize), alignment: 4096)
        defer { buf.deallocate() }
        memset(buf.baseAddress!, Int32(o.pattern), buf.count)
        let req = UnsafeMutableRawBufferPointer(rebasing: buf[0..<o.bufferSize])
        let step = UInt64(o.step == 0 ? o.bufferSize : o.step)
        state.lock()
        while true {
            while flushing && failure == nil { state.wait() }
            if failure != nil || issued >= o.count { break }
            let offset = nextOffset
            issued += 1
            inFlight += 1
            nextOffset = size == 0 ? 0 : (nextOffset &+ step) % size
            state.unlock()
            var err: InstarError?
            do { try io(req, at: offset) } catch let e as InstarError { err = e } catch {
                err = InstarError(.io, "Failed request: Input/output error", errno: EIO)
            }
            state.lock()
            inFlight -= 1
            completed += 1
            if let err, failure == nil { failure = err }
            if failure == nil, let p = o.progress, o.count > 0 {
                let pct = completed * 100 / o.count
                if pct != lastReported {
                    lastReported = pct
                    do { try p(Double(pct)) } catch let e as InstarError { failure = e } catch {
                        failure = InstarError(.cancelled, "Operation cancelled")
                    }
                }
            }
            if failure == nil && o.flushInterval > 0 && completed % o.flushInterval == 0 {
                if o.drainOnFlush {
                    // Hold back new requests, wait for those in flight, flush, go on.
                    flushing = true
                    while inFlight > 0 && failure == nil { state.wait() }
                    state.unlock()
                    var ferr: InstarError?
                    do { try flush() } catch let e as InstarError { ferr = e } catch {}
                    state.lock()
                    if let ferr, failure == nil { failure = ferr }
                    flushing = false
                } else {
                    state.unlock()
                    var ferr: InstarError?
                    do { try flush() } catch let e as InstarError { ferr = e } catch {}
                    state.lock()
                    if let ferr, failure == nil { failure = ferr }
                }
            }
            state.broadcast()
        }
        state.broadcast()
        state.unlock()
    }
}
