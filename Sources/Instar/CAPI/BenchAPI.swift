import CInstar
import Glibc

/// The defaults of instar_bench_options_t, the values of INSTAR_BENCH_OPTIONS_INIT.
func benchOptionsDefaults() -> instar_bench_options_t {
    instar_bench_options_t(struct_size: UInt32(MemoryLayout<instar_bench_options_t>.size), flags: 0,
                           format: nil, cache: nil, count: 75000, depth: 64, offset: 0,
                           buffer_size: 4096, step: 0, pattern: 0, flush_interval: 0, progress: nil,
                           progress_data: nil, key_secret: nil, limits: nil)
}

@_cdecl("instar_bench_options_init")
public func instar_bench_options_init(_ opts: UnsafeMutablePointer<instar_bench_options_t>?) {
    legacyInitOptions(opts, frozenSize: 80, benchOptionsDefaults())
}

@_cdecl("instar_bench_options_init_sized")
public func instar_bench_options_init_sized(_ opts: UnsafeMutablePointer<instar_bench_options_t>?,
                                            _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, benchOptionsDefaults())
}

@_cdecl("instar_bench")
public func instar_bench(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_bench_options_t>?,
                         _ result: UnsafeMutablePointer<instar_bench_result_t>?,
                         _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let name = try cString(filename, "filename")
        guard let result else { throw InstarError.invalid("result must not be NULL") }
        let defaults = benchOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        var options = BenchOperation.Options()
        options.format = optionalString(o.format)
        if let c = optionalString(o.cache) {
            guard let mode = CacheMode(qemuName: c) else { throw InstarError.invalid("Invalid cache mode") }
            options.cache = mode
        }
        guard o.count >= 0 else { throw InstarError.invalid("Invalid request count specified") }
        guard o.depth >= 0 else { throw InstarError.invalid("Invalid queue depth specified") }
        guard o.offset >= 0 else { throw InstarError.invalid("Invalid offset specified") }
        guard o.buffer_size >= 0 else { throw InstarError.invalid("Invalid buffer size specified") }
        guard o.step >= 0 else { throw InstarError.invalid("Invalid step_size specified") }
        guard o.pattern >= 0 && o.pattern <= 0xff else { throw InstarError.invalid("Invalid pattern byte specified") }
        guard o.flush_interval >= 0 else { throw InstarError.invalid("Invalid flush interval specified") }
        options.count = Int(o.count)
        options.depth = Int(o.depth)
        options.offset = o.offset
        options.bufferSize = Int(o.buffer_size)
        options.step = Int(o.step)
        options.pattern = UInt8(o.pattern)
        options.flushInterval = Int(o.flush_interval)
        options.write = o.flags & UInt32(INSTAR_BENCH_WRITE) != 0
        options.drainOnFlush = o.flags & UInt32(INSTAR_BENCH_NO_DRAIN) == 0
        options.open.forceShare = o.flags & UInt32(INSTAR_BENCH_FORCE_SHARE) != 0
        options.nativeAIO = o.flags & UInt32(INSTAR_BENCH_NATIVE_AIO) != 0
        options.open.keySecret = optionalString(o.key_secret)
        options.progress = progressCallback(o.progress, o.progress_data)
        try BenchOperation.checkOptions(options)
        let layer = try BenchOperation.open(name, options)
        defer { try? layer.close() }
        let r = try BenchOperation.run(layer, options)
        let declared = Int(result.pointee.struct_size)
        var full = instar_bench_result_t()
        full.struct_size = UInt32(MemoryLayout<instar_bench_result_t>.size)
        full.requests = r.requests
        full.bytes = r.bytes
        full.seconds = r.seconds
        let n = declared == 0 ? MemoryLayout<instar_bench_result_t>.size
            : min(declared, MemoryLayout<instar_bench_result_t>.size)
        withUnsafeBytes(of: &full) { src in
            UnsafeMutableRawPointer(result).copyMemory(from: src.baseAddress!, byteCount: n)
        }
        if declared != 0 { result.pointee.struct_size = UInt32(declared) }
    }
}
