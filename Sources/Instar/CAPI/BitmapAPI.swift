import CInstar
import Glibc

/// The defaults of instar_bitmap_options_t, the values of INSTAR_BITMAP_OPTIONS_INIT.
func bitmapOptionsDefaults() -> instar_bitmap_options_t {
    instar_bitmap_options_t(struct_size: UInt32(MemoryLayout<instar_bitmap_options_t>.size),
                            open_flags: 0, format: nil, granularity: 0, source_file: nil,
                            source_format: nil, key_secret: nil, warning: nil, warning_data: nil, limits: nil)
}

@_cdecl("instar_bitmap_options_init")
public func instar_bitmap_options_init(_ opts: UnsafeMutablePointer<instar_bitmap_options_t>?) {
    legacyInitOptions(opts, frozenSize: 64, bitmapOptionsDefaults())
}

@_cdecl("instar_bitmap_options_init_sized")
public func instar_bitmap_options_init_sized(_ opts: UnsafeMutablePointer<instar_bitmap_options_t>?,
                                             _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, bitmapOptionsDefaults())
}

@_cdecl("instar_bitmap")
public func instar_bitmap(_ filename: UnsafePointer<CChar>?, _ bitmap: UnsafePointer<CChar>?,
                          _ actions: UnsafePointer<instar_bitmap_action_t>?, _ count: UInt32,
                          _ opts: UnsafePointer<instar_bitmap_options_t>?,
                          _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let name = try cString(filename, "filename")
        let bitmapName = try cString(bitmap, "bitmap")
        let defaults = bitmapOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        guard count <= 4096 else { throw InstarError.invalid("Too many bitmap operations") }
        if count > 0 && actions == nil { throw InstarError.invalid("actions must not be NULL") }
        var list: [BitmapOperation.Action] = []
        for i in 0..<Int(count) {
            guard let a = actions?[i] else { break }
            switch Int(a.action) {
            case Int(INSTAR_BITMAP_ADD): list.append(.add)
            case Int(INSTAR_BITMAP_REMOVE): list.append(.remove)
            case Int(INSTAR_BITMAP_CLEAR): list.append(.clear)
            case Int(INSTAR_BITMAP_ENABLE): list.append(.enable)
            case Int(INSTAR_BITMAP_DISABLE): list.append(.disable)
            case Int(INSTAR_BITMAP_MERGE):
                list.append(.merge(try cString(a.merge_source, "merge_source")))
            default: throw InstarError.invalid("Unknown bitmap operation \(a.action)")
            }
        }
        var options = BitmapOperation.Options()
        options.format = optionalString(o.format)
        options.open.direct = o.open_flags & UInt32(INSTAR_OPEN_NO_CACHE) != 0
        options.open.keySecret = optionalString(o.key_secret)
        guard o.granularity >= 0 else { throw InstarError.invalid("Invalid granularity specified") }
        options.granularity = o.granularity
        options.sourceFile = optionalString(o.source_file)
        options.sourceFormat = optionalString(o.source_format)
        options.warn = warningCallback(o.warning, o.warning_data)
        try BitmapOperation.run(name, bitmap: bitmapName, actions: list, options: options)
    }
}

/// The defaults of instar_dd_options_t, the values of INSTAR_DD_OPTIONS_INIT.
func ddOptionsDefaults() -> instar_dd_options_t {
    instar_dd_options_t(struct_size: UInt32(MemoryLayout<instar_dd_options_t>.size), flags: 0,
                        input_format: nil, output_format: nil, block_size: 0, count: -1, skip: -1,
                        output_size: -1, input_size: -1, snapshot: nil, progress: nil,
                        progress_data: nil, key_secret: nil, limits: nil)
}

@_cdecl("instar_dd_options_init")
public func instar_dd_options_init(_ opts: UnsafeMutablePointer<instar_dd_options_t>?) {
    legacyInitOptions(opts, frozenSize: 96, ddOptionsDefaults())
}

@_cdecl("instar_dd_options_init_sized")
public func instar_dd_options_init_sized(_ opts: UnsafeMutablePointer<instar_dd_options_t>?,
                                         _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, ddOptionsDefaults())
}

@_cdecl("instar_dd")
public func instar_dd(_ input: UnsafePointer<CChar>?, _ output: UnsafePointer<CChar>?,
                      _ opts: UnsafePointer<instar_dd_options_t>?,
                      _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let defaults = ddOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        var options = DdOperation.Options()
        options.input = try cString(input, "input")
        options.output = try cString(output, "output")
        options.inputFormat = optionalString(o.input_format)
        options.outputFormat = optionalString(o.output_format) ?? "raw"
        options.forceShare = o.flags & UInt32(INSTAR_DD_FORCE_SHARE) != 0
        options.skipCreate = o.flags & UInt32(INSTAR_DD_NO_CREATE) != 0
        options.open.keySecret = optionalString(o.key_secret)
        options.blockSize = o.block_size == 0 ? 512 : o.block_size
        options.count = o.count >= 0 ? o.count : nil
        options.skip = o.skip >= 0 ? o.skip : nil
        options.outputSize = o.output_size >= 0 ? o.output_size : nil
        options.inputSize = o.input_size >= 0 ? o.input_size : nil
        options.snapshot = try optionalString(o.snapshot).map { try ConvertOperation.SnapshotSelector(parsing: $0) }
        options.progress = progressCallback(o.progress, o.progress_data)
        try DdOperation.run(options)
    }
}
