import CInstar
import Glibc

/// The defaults of instar_create_options_t, the values of INSTAR_CREATE_OPTIONS_INIT.
func createOptionsDefaults() -> instar_create_options_t {
    instar_create_options_t(struct_size: UInt32(MemoryLayout<instar_create_options_t>.size), flags: 0,
                            format: nil, size: -1, backing_file: nil, backing_format: nil, options: nil,
                            key_secret: nil, size_text: nil, limits: nil)
}

@_cdecl("instar_create_options_init")
public func instar_create_options_init(_ opts: UnsafeMutablePointer<instar_create_options_t>?) {
    legacyInitOptions(opts, frozenSize: 64, createOptionsDefaults())
}

@_cdecl("instar_create_options_init_sized")
public func instar_create_options_init_sized(_ opts: UnsafeMutablePointer<instar_create_options_t>?,
                                             _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, createOptionsDefaults())
}

@_cdecl("instar_create")
public func instar_create(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_create_options_t>?,
                          _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        try Create.create(try createParameters(filename, opts))
    }
}

/// Create's parameters from the C options (what instar_create and instar_create_formatting share).
private func createParameters(_ filename: UnsafePointer<CChar>?,
                              _ opts: UnsafePointer<instar_create_options_t>?) throws -> Create.Parameters {
    let name = try cString(filename, "filename")
    let defaults = createOptionsDefaults()
    let o = try readOptions(opts, defaults: defaults)
    var p = Create.Parameters(filename: name)
    p.format = optionalString(o.format) ?? "raw"
    p.size = o.size >= 0 ? UInt64(o.size) : nil
    if let text = optionalString(o.size_text) { p.size = try SizeParse.imageSize(text) }
    p.backingFile = optionalString(o.backing_file)
    p.backingFormat = optionalString(o.backing_format)
    if let list = optionalString(o.options) {
        guard CreateOptionValues.isValidList(list) else { throw InstarError.invalid("Invalid option list: \(list)") }
        p.options = optionList(list, keySecret: optionalString(o.key_secret), secrets: &p.secrets, format: p.format)
    } else if p.format == "luks" {
        p.options = optionList(nil, keySecret: optionalString(o.key_secret), secrets: &p.secrets, format: p.format)
    }
    p.unsafeBacking = o.flags & UInt32(INSTAR_CREATE_NO_BACKING_OPEN) != 0
    return p
}

@_cdecl("instar_create_formatting")
public func instar_create_formatting(_ filename: UnsafePointer<CChar>?,
                                     _ opts: UnsafePointer<instar_create_options_t>?,
                                     _ line: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                                     _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let line else { throw InstarError.invalid("line must not be NULL") }
        line.pointee = nil
        let prepared = try Create.prepare(try createParameters(filename, opts))
        // qemu-img prints the line once the request is validated, before it creates anything: a failure of the
        // creation itself still leaves the line with the caller
        line.pointee = mallocString(prepared.formattingLine + "\n")
        try Create.run(prepared)
    }
}
