import CInstar
import Glibc

/// The defaults of instar_convert_options_t, the values of INSTAR_CONVERT_OPTIONS_INIT.
func convertOptionsDefaults() -> instar_convert_options_t {
    instar_convert_options_t(struct_size: UInt32(MemoryLayout<instar_convert_options_t>.size),
                             flags: 0, source_format: nil, target_format: nil, source_cache: nil,
                             target_cache: nil, sparse_size: -1, progress: nil, progress_data: nil,
                             options: nil, backing_file: nil, backing_format: nil, snapshot: nil,
                             coroutines: 8, rate_limit: 0, key_secret: nil, target_key_secret: nil, limits: nil,
                             backing_key_secret: nil, open_flags: 0)
}

@_cdecl("instar_convert_options_init")
public func instar_convert_options_init(_ opts: UnsafeMutablePointer<instar_convert_options_t>?) {
    legacyInitOptions(opts, frozenSize: 128, convertOptionsDefaults())
}

@_cdecl("instar_convert_options_init_sized")
public func instar_convert_options_init_sized(_ opts: UnsafeMutablePointer<instar_convert_options_t>?,
                                              _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, convertOptionsDefaults())
}

@_cdecl("instar_convert")
public func instar_convert(_ source: UnsafePointer<CChar>?, _ target: UnsafePointer<CChar>?,
                           _ opts: UnsafePointer<instar_convert_options_t>?,
                           _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let src = try cString(source, "source")
        let dst = try cString(target, "target")
        let defaults = convertOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        var options = ConvertOptions()
        options.noCreate = o.flags & UInt32(INSTAR_CONVERT_NO_CREATE) != 0
        options.targetIsZero = o.flags & UInt32(INSTAR_CONVERT_TARGET_IS_ZERO) != 0
        options.compress = o.flags & UInt32(INSTAR_CONVERT_COMPRESS) != 0
        options.unorderedWrites = o.flags & UInt32(INSTAR_CONVERT_UNORDERED_WRITES) != 0
        options.bitmaps = o.flags & UInt32(INSTAR_CONVERT_BITMAPS) != 0
        options.skipBrokenBitmaps = o.flags & UInt32(INSTAR_CONVERT_SKIP_BROKEN_BITMAPS) != 0
        options.copyRange = o.flags & UInt32(INSTAR_CONVERT_COPY_RANGE) != 0
        options.salvage = o.flags & UInt32(INSTAR_CONVERT_SALVAGE) != 0
        if options.copyRange && options.salvage {
            throw InstarError.invalid("Cannot use copy offloading in salvaging mode")
        }
        if options.copyRange && o.sparse_size >= 0 {
            throw InstarError.invalid("Cannot enable copy offloading when -S is used")
        }
        options.targetFormat = optionalString(o.target_format) ?? "raw"
        options.createOptions = optionList(optionalString(o.options), keySecret: optionalString(o.target_key_secret),
                                           secrets: &options.secrets, format: options.targetFormat)
        options.targetKeySecret = optionalString(o.target_key_secret)
        options.backingFile = optionalString(o.backing_file)
        options.backingFormat = optionalString(o.backing_format)
        if options.skipBrokenBitmaps && !options.bitmaps {
            throw InstarError.invalid("Use of --skip-broken-bitmaps requires --bitmaps")
        }
        if options.noCreate && options.createOptions != nil {
            throw InstarError.invalid("-o has no effect when skipping image creation")
        }
        if options.targetIsZero && !options.noCreate {
            throw InstarError.invalid("--target-is-zero requires use of -n flag")
        }
        if let list = options.createOptions, !CreateOptionValues.isValidList(list) {
            throw InstarError.invalid("Invalid option list: \(list)")
        }
        guard o.coroutines >= 1 && o.coroutines <= 16 else {
            throw InstarError.invalid("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
        }
        options.coroutines = Int(o.coroutines)
        guard o.rate_limit >= 0 else { throw InstarError.invalid("Invalid rate limit specified") }
        options.rateLimit = UInt64(o.rate_limit)
        if o.sparse_size >= 0 {
            if let msg = ConvertOperation.sparseSizeError(UInt64(o.sparse_size)) { throw InstarError.invalid(msg) }
            options.sparseSize = UInt64(o.sparse_size)
        }
        let snapshot = try optionalString(o.snapshot).map { try ConvertOperation.SnapshotSelector(parsing: $0) }
        let sourceCacheName = optionalString(o.source_cache) ?? "writeback"
        guard let sourceCache = CacheMode(qemuName: sourceCacheName) else {
            throw InstarError.invalid("Invalid source cache option: \(sourceCacheName)")
        }
        options.targetCacheName = optionalString(o.target_cache) ?? "unsafe"
        options.progress = progressCallback(o.progress, o.progress_data)
        var meter = ProgressMeter(minSkip: 1.0, report: options.progress)
        try meter.advance(0, max: 100)

        var flags: UInt32 = sourceCache.direct ? UInt32(INSTAR_OPEN_NO_CACHE) : 0
        if o.flags & UInt32(INSTAR_CONVERT_FORCE_SHARE) != 0 { flags |= UInt32(INSTAR_OPEN_FORCE_SHARE) }
        flags |= o.open_flags & (UInt32(INSTAR_OPEN_FORCE_SHARE) | UInt32(INSTAR_OPEN_NO_CACHE))
        let image: ImageLayer
        var isolated: IsolatedSources?
        defer { isolated?.close() }
        if o.open_flags & UInt32(INSTAR_OPEN_ISOLATED) != 0 {
            // The source is parsed in the helper (the snapshot loaded there too); the target is written here.
            let s = try IsolatedMode.openSources([src], format: optionalString(o.source_format), commandLine: false,
                                                 flags: flags, keySecret: optionalString(o.key_secret),
                                                 backingKeySecret: optionalString(o.backing_key_secret),
                                                 snapshot: snapshot)
            isolated = s
            guard let top = s.layers.first else { throw InstarError(.isolation, "The isolated helper opened no source") }
            image = top
        } else {
            image = try openForOperation(src, format: optionalString(o.source_format), flags: flags,
                                         noShareWrite: true, keySecret: o.key_secret,
                                         backingKeySecret: o.backing_key_secret)
            if let sel = snapshot { try ConvertOperation.loadSnapshot(sel, sources: [image]) }
        }
        defer { try? image.close() }
        do {
            try ConvertOperation.convert(sources: [image], target: dst, options: options)
        } catch let e as ConvertStopped {
            throw InstarError.invalid(e.message)
        }
    }
}
