import CInstar
import Glibc

@_cdecl("instar_convert_options_init")
public func instar_convert_options_init(_ opts: UnsafeMutablePointer<instar_convert_options_t>?) {
    opts?.pointee = instar_convert_options_t(struct_size: UInt32(MemoryLayout<instar_convert_options_t>.size),
                                             flags: 0, source_format: nil, target_format: nil, source_cache: nil,
                                             target_cache: nil, sparse_size: -1, progress: nil, progress_data: nil)
}

@_cdecl("instar_convert")
public func instar_convert(_ source: UnsafePointer<CChar>?, _ target: UnsafePointer<CChar>?,
                           _ opts: UnsafePointer<instar_convert_options_t>?,
                           _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let src = try cString(source, "source")
        let dst = try cString(target, "target")
        var defaults = instar_convert_options_t()
        instar_convert_options_init(&defaults)
        let o = try readOptions(opts, defaults: defaults)
        var options = ConvertOptions()
        options.noCreate = o.flags & UInt32(INSTAR_CONVERT_NO_CREATE) != 0
        options.targetIsZero = o.flags & UInt32(INSTAR_CONVERT_TARGET_IS_ZERO) != 0
        options.compress = o.flags & UInt32(INSTAR_CONVERT_COMPRESS) != 0
        options.targetFormat = optionalString(o.target_format) ?? "raw"
        if options.targetIsZero && !options.noCreate {
            throw InstarError.invalid("--target-is-zero requires use of -n flag")
        }
        if o.sparse_size >= 0 {
            if let msg = ConvertOperation.sparseSizeError(UInt64(o.sparse_size)) { throw InstarError.invalid(msg) }
            options.sparseSize = UInt64(o.sparse_size)
        }
        let sourceCacheName = optionalString(o.source_cache) ?? "writeback"
        guard let sourceCache = CacheMode(qemuName: sourceCacheName) else {
            throw InstarError.invalid("Invalid source cache option: \(sourceCacheName)")
        }
        let targetCacheName = optionalString(o.target_cache) ?? "unsafe"
        guard let targetCache = CacheMode(qemuName: targetCacheName) else {
            throw InstarError.invalid("Invalid cache option: \(targetCacheName)")
        }
        options.targetCache = targetCache
        options.progress = progressCallback(o.progress, o.progress_data)
        var meter = ProgressMeter(minSkip: 1.0, report: options.progress)
        try meter.advance(0, max: 100)

        var flags: UInt32 = sourceCache.direct ? UInt32(INSTAR_OPEN_NO_CACHE) : 0
        if o.flags & UInt32(INSTAR_CONVERT_FORCE_SHARE) != 0 { flags |= UInt32(INSTAR_OPEN_FORCE_SHARE) }
        let image = try openForOperation(src, format: optionalString(o.source_format), flags: flags, noShareWrite: true)
        defer { try? image.close() }
        guard FormatRegistry.descriptor(named: options.targetFormat) != nil else {
            throw InstarError.invalid("Unknown file format '\(options.targetFormat)'")
        }
        guard options.targetFormat == "raw" else {
            throw InstarError.unsupported("Format driver '\(options.targetFormat)' does not support image creation")
        }
        if options.compress { throw InstarError.unsupported("Compression not supported for this file format") }
        var created = false
        if !options.noCreate {
            do {
                try ConvertOperation.createRawTarget(dst, size: image.virtualSize.divCeil(512) * 512)
            } catch let e as InstarError {
                throw e.prepending("\(dst): error while converting \(options.targetFormat): ")
            }
            created = true
        }
        do {
            let t: ImageLayer
            do {
                t = try ConvertOperation.openTarget(dst, format: options.targetFormat, cache: targetCache)
            } catch let e as InstarError {
                throw e.prepending("Could not open '\(dst)': ")
            }
            defer { try? t.close() }
            try ConvertOperation.copy(sources: [image], into: t, targetCreated: created, options: options)
        } catch {
            if created && options.removeTargetOnFailure { unlink(dst) }
            throw error
        }
    }
}
