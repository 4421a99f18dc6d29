import CInstar
import Glibc

/// The defaults of instar_rebase_options_t, the values of INSTAR_REBASE_OPTIONS_INIT.
func rebaseOptionsDefaults() -> instar_rebase_options_t {
    instar_rebase_options_t(struct_size: UInt32(MemoryLayout<instar_rebase_options_t>.size),
                            flags: 0, format: nil, backing_file: nil, backing_format: nil,
                            cache: nil, source_cache: nil, progress: nil, progress_data: nil,
                            key_secret: nil, warning: nil, warning_data: nil, limits: nil)
}

@_cdecl("instar_rebase_options_init")
public func instar_rebase_options_init(_ opts: UnsafeMutablePointer<instar_rebase_options_t>?) {
    legacyInitOptions(opts, frozenSize: 88, rebaseOptionsDefaults())
}

@_cdecl("instar_rebase_options_init_sized")
public func instar_rebase_options_init_sized(_ opts: UnsafeMutablePointer<instar_rebase_options_t>?,
                                             _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, rebaseOptionsDefaults())
}

@_cdecl("instar_rebase")
public func instar_rebase(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_rebase_options_t>?,
                          _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let name = try cString(filename, "filename")
        let defaults = rebaseOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        var options = RebaseOperation.Options()
        options.unsafe = o.flags & UInt32(INSTAR_REBASE_UNSAFE) != 0
        options.forceShare = o.flags & UInt32(INSTAR_REBASE_FORCE_SHARE) != 0
        options.format = optionalString(o.format)
        options.backingFile = optionalString(o.backing_file)
        options.backingFormat = optionalString(o.backing_format)
        options.cache = optionalString(o.cache) ?? "writeback"
        options.sourceCache = optionalString(o.source_cache) ?? "writeback"
        options.open.keySecret = optionalString(o.key_secret)
        options.progress = progressCallback(o.progress, o.progress_data)
        options.warn = warningCallback(o.warning, o.warning_data)
        if !options.unsafe && options.backingFile == nil {
            throw InstarError.invalid("Must specify backing file (-b) or use unsafe mode (-u)")
        }
        try RebaseOperation.run(name, options: options)
    }
}
