import CInstar
import Glibc

/// The defaults of instar_map_options_t, the values of INSTAR_MAP_OPTIONS_INIT.
func mapOptionsDefaults() -> instar_map_options_t {
    instar_map_options_t(struct_size: UInt32(MemoryLayout<instar_map_options_t>.size), open_flags: 0,
                         format: nil, start_offset: 0, max_length: -1, key_secret: nil, limits: nil,
                         backing_key_secret: nil)
}

@_cdecl("instar_map_options_init")
public func instar_map_options_init(_ opts: UnsafeMutablePointer<instar_map_options_t>?) {
    legacyInitOptions(opts, frozenSize: 40, mapOptionsDefaults())
}

@_cdecl("instar_map_options_init_sized")
public func instar_map_options_init_sized(_ opts: UnsafeMutablePointer<instar_map_options_t>?,
                                          _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, mapOptionsDefaults())
}

/// Opens `name` read-only for an operation, with qemu-img's "Could not open 'NAME': " prefix on failure.
func openForOperation(_ name: String, format: String?, flags: UInt32, noShareWrite: Bool = false,
                      keySecret: UnsafePointer<CChar>? = nil,
                      backingKeySecret: UnsafePointer<CChar>? = nil) throws -> ImageLayer {
    let spec = try ImageOpener.parseSpec(name, format: format)
    var options = openOptions(flags: flags, keySecret: keySecret, backingKeySecret: backingKeySecret)
    options.noShareWrite = noShareWrite
    do {
        return try ImageOpener.open(spec, options: options, writable: false,
                                    openBacking: flags & UInt32(INSTAR_OPEN_NO_BACKING) == 0)
    } catch let e as InstarError {
        throw e.prepending("Could not open '\(name)': ")
    }
}

@_cdecl("instar_map")
public func instar_map(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_map_options_t>?,
                       _ out: UnsafeMutablePointer<UnsafeMutablePointer<instar_map_t>?>?,
                       _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let out else { throw InstarError.invalid("out must not be NULL") }
        out.pointee = nil
        let name = try cString(filename, "filename")
        let defaults = mapOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        let entries: [MapEntry]
        if o.open_flags & UInt32(INSTAR_OPEN_ISOLATED) != 0 {
            guard o.start_offset <= UInt64(Int64.max) else {
                throw InstarError(.range, "Invalid start offset specified. Must be between 0 and \(Int64.max).")
            }
            let walk = try IsolatedMode.mapWalk(name, format: optionalString(o.format), imageOpts: false,
                                                open: openOptions(flags: o.open_flags, keySecret: o.key_secret,
                                                                  backingKeySecret: o.backing_key_secret),
                                                start: o.start_offset,
                                                maxLength: o.max_length < 0 ? nil : UInt64(o.max_length),
                                                humanCoalescing: false,
                                                openBacking: o.open_flags & UInt32(INSTAR_OPEN_NO_BACKING) == 0)
            if let e = walk.error { throw e }
            entries = walk.entries
        } else {
        let image = try openForOperation(name, format: optionalString(o.format), flags: o.open_flags,
                                         keySecret: o.key_secret, backingKeySecret: o.backing_key_secret)
        defer { try? image.close() }
        guard o.start_offset <= UInt64(Int64.max) else {
            throw InstarError(.range, "Invalid start offset specified. Must be between 0 and \(Int64.max).")
        }
        entries = try MapOperation.entries(image, start: o.start_offset,
                                           maxLength: o.max_length < 0 ? nil : UInt64(o.max_length))
        }
        guard let map = calloc(1, MemoryLayout<instar_map_t>.size)?.assumingMemoryBound(to: instar_map_t.self),
              let array = calloc(max(1, entries.count), MemoryLayout<instar_map_entry_t>.size)?
                  .assumingMemoryBound(to: instar_map_entry_t.self) else {
            throw InstarError(.noMemory, "Cannot allocate memory")
        }
        for (i, e) in entries.enumerated() {
            array[i] = instar_map_entry_t(start: e.start, length: e.length, depth: Int32(clamping: e.depth),
                                          present: e.present ? 1 : 0, zero: e.zero ? 1 : 0, data: e.data ? 1 : 0,
                                          has_offset: e.offset == nil ? 0 : 1, offset: e.offset ?? 0,
                                          filename: e.offset == nil ? nil : mallocString(e.filename))
        }
        map.pointee.count = UInt64(entries.count)
        map.pointee.entries = array
        out.pointee = map
    }
}

@_cdecl("instar_map_free")
public func instar_map_free(_ map: UnsafeMutablePointer<instar_map_t>?) {
    guard let map else { return }
    if let entries = map.pointee.entries {
        for i in 0..<Int(map.pointee.count) {
            free(UnsafeMutableRawPointer(mutating: entries[i].filename))
        }
        free(entries)
    }
    free(map)
}
