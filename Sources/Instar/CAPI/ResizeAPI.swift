import CInstar
import Glibc

/// The defaults of instar_resize_options_t, the values of INSTAR_RESIZE_OPTIONS_INIT.
func resizeOptionsDefaults() -> instar_resize_options_t {
    instar_resize_options_t(struct_size: UInt32(MemoryLayout<instar_resize_options_t>.size),
                            open_flags: 0, format: nil, preallocation: nil, flags: 0,
                            key_secret: nil, limits: nil)
}

@_cdecl("instar_resize_options_init")
public func instar_resize_options_init(_ opts: UnsafeMutablePointer<instar_resize_options_t>?) {
    legacyInitOptions(opts, frozenSize: 40, resizeOptionsDefaults())
}

@_cdecl("instar_resize_options_init_sized")
public func instar_resize_options_init_sized(_ opts: UnsafeMutablePointer<instar_resize_options_t>?,
                                             _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, resizeOptionsDefaults())
}

@_cdecl("instar_resize")
public func instar_resize(_ filename: UnsafePointer<CChar>?, _ size: Int64,
                          _ opts: UnsafePointer<instar_resize_options_t>?,
                          _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let name = try cString(filename, "filename")
        let defaults = resizeOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        var options = ResizeOperation.Options()
        options.format = optionalString(o.format)
        options.open.direct = o.open_flags & UInt32(INSTAR_OPEN_NO_CACHE) != 0
        options.open.keySecret = optionalString(o.key_secret)
        if let p = optionalString(o.preallocation) {
            guard let mode = ResizePreallocation(rawValue: p) else {
                throw InstarError.invalid("Invalid preallocation mode '\(p)'")
            }
            options.preallocation = mode
        }
        options.shrink = o.flags & UInt32(INSTAR_RESIZE_SHRINK) != 0
        try ResizeOperation.run(name, size: size, relative: o.flags & UInt32(INSTAR_RESIZE_RELATIVE) != 0,
                                options: options)
    }
}
