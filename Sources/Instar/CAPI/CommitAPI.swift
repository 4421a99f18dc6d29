import CInstar
import Glibc

/// The defaults of instar_commit_options_t, the values of INSTAR_COMMIT_OPTIONS_INIT.
func commitOptionsDefaults() -> instar_commit_options_t {
    instar_commit_options_t(struct_size: UInt32(MemoryLayout<instar_commit_options_t>.size),
                            flags: 0, format: nil, base: nil, cache: nil, rate_limit: 0,
                            progress: nil, progress_data: nil, key_secret: nil, limits: nil,
                            backing_key_secret: nil)
}

@_cdecl("instar_commit_options_init")
public func instar_commit_options_init(_ opts: UnsafeMutablePointer<instar_commit_options_t>?) {
    legacyInitOptions(opts, frozenSize: 64, commitOptionsDefaults())
}

@_cdecl("instar_commit_options_init_sized")
public func instar_commit_options_init_sized(_ opts: UnsafeMutablePointer<instar_commit_options_t>?,
                                             _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, commitOptionsDefaults())
}

@_cdecl("instar_commit")
public func instar_commit(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_commit_options_t>?,
                          _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let name = try cString(filename, "filename")
        let defaults = commitOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        var options = CommitOperation.Options()
        options.format = optionalString(o.format)
        options.base = optionalString(o.base)
        options.drop = o.flags & UInt32(INSTAR_COMMIT_NO_EMPTY) != 0 || options.base != nil
        let cacheName = optionalString(o.cache) ?? "writeback"
        guard let mode = CacheMode(qemuName: cacheName) else {
            throw InstarError.invalid("Invalid cache option: \(cacheName)")
        }
        options.cache = mode
        guard o.rate_limit >= 0 else {
            throw InstarError.invalid("Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n"
                + "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        }
        options.rateLimit = UInt64(o.rate_limit)
        options.open.keySecret = optionalString(o.key_secret)
        options.open.backingKeySecret = optionalString(o.backing_key_secret)
        options.progress = progressCallback(o.progress, o.progress_data)
        try CommitOperation.run(name, options: options)
    }
}
