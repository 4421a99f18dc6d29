import CInstar
import Glibc

/// The defaults of instar_measure_options_t, the values of INSTAR_MEASURE_OPTIONS_INIT.
func measureOptionsDefaults() -> instar_measure_options_t {
    instar_measure_options_t(struct_size: UInt32(MemoryLayout<instar_measure_options_t>.size),
                             open_flags: 0, source_format: nil, output_format: nil, options: nil, size: -1,
                             key_secret: nil, limits: nil)
}

@_cdecl("instar_measure_options_init")
public func instar_measure_options_init(_ opts: UnsafeMutablePointer<instar_measure_options_t>?) {
    legacyInitOptions(opts, frozenSize: 48, measureOptionsDefaults())
}

@_cdecl("instar_measure_options_init_sized")
public func instar_measure_options_init_sized(_ opts: UnsafeMutablePointer<instar_measure_options_t>?,
                                              _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, measureOptionsDefaults())
}

@_cdecl("instar_measure")
public func instar_measure(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_measure_options_t>?,
                           _ result: UnsafeMutablePointer<instar_measure_result_t>?,
                           _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let result else { throw InstarError.invalid("result must not be NULL") }
        let defaults = measureOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        var p = Measure.Parameters()
        p.filename = optionalString(filename)
        p.sourceFormat = optionalString(o.source_format)
        p.outputFormat = optionalString(o.output_format) ?? "raw"
        let keySecret = optionalString(o.key_secret)
        p.keySecret = keySecret
        p.options = optionList(optionalString(o.options), keySecret: keySecret, secrets: &p.secrets,
                               format: p.outputFormat)
        p.size = o.size >= 0 ? UInt64(o.size) : nil
        p.forceShare = o.open_flags & UInt32(INSTAR_OPEN_FORCE_SHARE) != 0
        let r = o.open_flags & UInt32(INSTAR_OPEN_ISOLATED) != 0 ? try IsolatedMode.measure(p) : try Measure.measure(p)
        // Fill only what the caller's struct has room for.
        let declared = Int(result.pointee.struct_size)
        var out = instar_measure_result_t(struct_size: UInt32(MemoryLayout<instar_measure_result_t>.size),
                                          has_bitmaps: r.bitmaps == nil ? 0 : 1, required: r.required,
                                          fully_allocated: r.fullyAllocated, bitmaps: r.bitmaps ?? 0)
        let n = declared >= 4 ? min(declared, MemoryLayout<instar_measure_result_t>.size) : MemoryLayout<instar_measure_result_t>.size
        withUnsafeBytes(of: &out) { src in
            UnsafeMutableRawPointer(result).copyMemory(from: src.baseAddress!, byteCount: n)
        }
        UnsafeMutableRawPointer(result).storeBytes(of: UInt32(declared >= 4 ? declared : n), as: UInt32.self)
    }
}
