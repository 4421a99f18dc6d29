import CInstar
import Glibc

// Shared plumbing of the C ABI: error structs, option structs read by struct_size, string ownership and a
// catch-all so no Swift error ever crosses the boundary.

/// Fills an optional instar_error_t and returns the code, for `return fail(err, error)`.
@discardableResult
func fillError(_ err: UnsafeMutablePointer<instar_error_t>?, _ error: Error) -> Int32 {
    let e = (error as? InstarError) ?? (error as? StepError)?.instarError ?? InstarError(.io, "\(error)")
    guard let err else { return e.code.rawValue }
    err.pointee.code = e.code.rawValue
    err.pointee.errno_value = e.errnoValue
    withUnsafeMutableBytes(of: &err.pointee.message) { buf in
        let bytes = Array(e.message.utf8.prefix(buf.count - 1))
        for (i, b) in bytes.enumerated() { buf[i] = b }
        buf[bytes.count] = 0
    }
    return e.code.rawValue
}

/// Clears an optional instar_error_t for a successful call.
func clearError(_ err: UnsafeMutablePointer<instar_error_t>?) {
    guard let err else { return }
    err.pointee.code = 0
    err.pointee.errno_value = 0
    withUnsafeMutableBytes(of: &err.pointee.message) { $0[0] = 0 }
}

/// Runs `body`, turning any thrown error into an INSTAR_E_* code in `err`.
func capiCall(_ err: UnsafeMutablePointer<instar_error_t>?, _ body: () throws -> Void) -> Int32 {
    do {
        try CallBudget.callScope(body)
        clearError(err)
        return 0
    } catch {
        return fillError(err, error)
    }
}

/// Reads a caller's option struct whose first member is `uint32_t struct_size`: only the bytes the caller
/// declared are taken, the rest keep `defaults`. A NULL pointer gives the defaults.
func readOptions<T>(_ ptr: UnsafePointer<T>?, defaults: T) throws -> T {
    try readDeclared(ptr, defaults: defaults)
}

/// The part of a caller's struct its struct_size declares, over `defaults` (readOptions' work).
private func readDeclared<T>(_ ptr: UnsafePointer<T>?, defaults: T) throws -> T {
    guard let ptr else { return defaults }
    let declared = Int(UnsafeRawPointer(ptr).load(as: UInt32.self))
    guard declared >= MemoryLayout<UInt32>.size else {
        throw InstarError.invalid("struct_size of the options struct is too small")
    }
    var result = defaults
    let n = min(declared, MemoryLayout<T>.size)
    withUnsafeMutableBytes(of: &result) { dst in
        dst.copyMemory(from: UnsafeRawBufferPointer(start: UnsafeRawPointer(ptr), count: n))
    }
    // struct_size itself stays ours.
    withUnsafeMutableBytes(of: &result) { $0.storeBytes(of: UInt32(MemoryLayout<T>.size), as: UInt32.self) }
    return result
}

/// Fills the first `size` bytes of a caller's option struct with `defaults` (the caller's version of the struct
/// may be older and smaller than the library's, never larger than what it declares), and sets its struct_size to
/// the bytes written. A size above the library's struct is the library's size: fields the library does not know
/// stay as the caller had them.
func initOptions<T>(_ ptr: UnsafeMutablePointer<T>?, size: UInt32, _ defaults: T) -> Int32 {
    guard let ptr, Int(size) >= MemoryLayout<UInt32>.size else { return InstarError.Code.invalid.rawValue }
    let n = min(Int(size), MemoryLayout<T>.size)
    withUnsafeBytes(of: defaults) { src in
        UnsafeMutableRawPointer(ptr).copyMemory(from: src.baseAddress!, byteCount: n)
    }
    UnsafeMutableRawPointer(ptr).storeBytes(of: UInt32(n), as: UInt32.self)
    return 0
}

/// The unsized instar_*_options_init of 0.1.0, kept for programs built before the _sized functions: it writes
/// no more than the struct as it was in 0.1.0's header (`frozenSize`), so a later, larger struct never
/// overflows such a caller. Programs built with a newer header reach the _sized function through the macro.
func legacyInitOptions<T>(_ ptr: UnsafeMutablePointer<T>?, frozenSize: Int, _ defaults: T) {
    _ = initOptions(ptr, size: UInt32(min(frozenSize, MemoryLayout<T>.size)), defaults)
}

/// An options struct with a `limits` member (instar_limits_t *).
protocol CallLimitedOptions {
    var limits: UnsafePointer<instar_limits_t>! { get }
}

extension instar_open_options_t: CallLimitedOptions {}
extension instar_info_options_t: CallLimitedOptions {}
extension instar_map_options_t: CallLimitedOptions {}
extension instar_compare_options_t: CallLimitedOptions {}
extension instar_convert_options_t: CallLimitedOptions {}
extension instar_create_options_t: CallLimitedOptions {}
extension instar_measure_options_t: CallLimitedOptions {}
extension instar_check_options_t: CallLimitedOptions {}
extension instar_resize_options_t: CallLimitedOptions {}
extension instar_amend_options_t: CallLimitedOptions {}
extension instar_commit_options_t: CallLimitedOptions {}
extension instar_rebase_options_t: CallLimitedOptions {}
extension instar_bitmap_options_t: CallLimitedOptions {}
extension instar_dd_options_t: CallLimitedOptions {}
extension instar_bench_options_t: CallLimitedOptions {}
extension instar_snapshot_options_t: CallLimitedOptions {}
extension instar_probe_options_t: CallLimitedOptions {}

/// readOptions for a struct with limits: the limits it points to hold for the rest of the C API call.
func readOptions<T: CallLimitedOptions>(_ ptr: UnsafePointer<T>?, defaults: T) throws -> T {
    let o = try readDeclared(ptr, defaults: defaults)
    if let lp = o.limits {
        let none = instar_limits_t(struct_size: UInt32(MemoryLayout<instar_limits_t>.size), flags: 0, timeout_ms: 0,
                                   cpu_ms: 0, memory_bytes: 0)
        let l = try readDeclared(lp, defaults: none)
        CallBudget.installForCall(CallBudget.make(timeoutMs: l.timeout_ms, cpuMs: l.cpu_ms,
                                                  memoryBytes: l.memory_bytes))
    }
    return o
}

/// A C string argument, or .invalid when NULL.
func cString(_ p: UnsafePointer<CChar>?, _ what: String) throws -> String {
    guard let p else { throw InstarError.invalid("\(what) must not be NULL") }
    return String(cString: p)
}

/// An optional C string.
func optionalString(_ p: UnsafePointer<CChar>?) -> String? { p.map { String(cString: $0) } }

/// A malloc'd copy of a Swift string, for strings the caller frees with instar_string_free (or that a
/// result struct owns).
func mallocString(_ s: String) -> UnsafeMutablePointer<CChar> {
    strdup(s) ?? { let p = malloc(1)!.assumingMemoryBound(to: CChar.self); p[0] = 0; return p }()
}

func mallocString(_ s: String?) -> UnsafePointer<CChar>? {
    guard let s else { return nil }
    return UnsafePointer(mallocString(s))
}

@_cdecl("instar_version")
public func instar_version() -> UnsafePointer<CChar> {
    versionCString
}

private let versionCString: UnsafePointer<CChar> = UnsafePointer(strdup(Instar.version)!)

private let errorNames: [Int32: UnsafePointer<CChar>] = {
    let names: [(Int32, String)] = [
        (0, "success"), (-1, "invalid argument"), (-2, "I/O error"), (-3, "not found"), (-4, "corrupt image"),
        (-5, "not supported"), (-6, "image is locked"), (-7, "out of memory"), (-8, "cancelled"),
        (-9, "permission denied"), (-10, "encrypted image"), (-11, "bad backing chain"), (-12, "out of range"),
        (-13, "limit reached"), (-14, "policy violation"),
        (-15, "isolated helper failed"),
    ]
    var d: [Int32: UnsafePointer<CChar>] = [:]
    for (c, n) in names { d[c] = UnsafePointer(strdup(n)!) }
    return d
}()

private let unknownErrorName: UnsafePointer<CChar> = UnsafePointer(strdup("unknown error")!)

@_cdecl("instar_strerror")
public func instar_strerror(_ code: Int32) -> UnsafePointer<CChar> {
    errorNames[code] ?? unknownErrorName
}

@_cdecl("instar_string_free")
public func instar_string_free(_ s: UnsafeMutablePointer<CChar>?) {
    free(s)
}
