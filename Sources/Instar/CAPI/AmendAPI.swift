import CInstar
import Glibc

/// The defaults of instar_amend_options_t, the values of INSTAR_AMEND_OPTIONS_INIT.
func amendOptionsDefaults() -> instar_amend_options_t {
    instar_amend_options_t(struct_size: UInt32(MemoryLayout<instar_amend_options_t>.size),
                           open_flags: 0, format: nil, options: nil, force: 0, progress: nil,
                           progress_data: nil, key_secret: nil, new_secret: nil, old_secret: nil,
                           limits: nil)
}

@_cdecl("instar_amend_options_init")
public func instar_amend_options_init(_ opts: UnsafeMutablePointer<instar_amend_options_t>?) {
    legacyInitOptions(opts, frozenSize: 56, amendOptionsDefaults())
}

@_cdecl("instar_amend_options_init_sized")
public func instar_amend_options_init_sized(_ opts: UnsafeMutablePointer<instar_amend_options_t>?,
                                            _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, amendOptionsDefaults())
}

@_cdecl("instar_amend")
public func instar_amend(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_amend_options_t>?,
                         _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let name = try cString(filename, "filename")
        let defaults = amendOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        guard let list = optionalString(o.options), !list.isEmpty else {
            throw InstarError.invalid("Must specify options (-o)")
        }
        var options = AmendOperation.Options()
        options.format = optionalString(o.format)
        options.open.direct = o.open_flags & UInt32(INSTAR_OPEN_NO_CACHE) != 0
        options.open.keySecret = optionalString(o.key_secret)
        options.force = o.force != 0
        options.newSecret = optionalString(o.new_secret)
        options.oldSecret = optionalString(o.old_secret)
        if let report = progressCallback(o.progress, o.progress_data) {
            var meter = ProgressMeter(minSkip: 1.0, report: report)
            options.progress = { try meter.advance(Float($0), max: 0) }
        }
        if CreateOptionValues.wantsHelp(list) { throw InstarError.invalid("Option help is not available here") }
        try AmendOperation.run(name, optionList: list, options: options)
    }
}
