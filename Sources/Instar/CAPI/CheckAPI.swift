import CInstar
import Glibc

// instar_check*: `qemu-img check` through the C ABI. The per-cluster messages qemu prints to stderr are not
// returned (the library never prints); the counters and the JSON text are.

/// The defaults of instar_check_options_t, the values of INSTAR_CHECK_OPTIONS_INIT.
func checkOptionsDefaults() -> instar_check_options_t {
    instar_check_options_t(struct_size: UInt32(MemoryLayout<instar_check_options_t>.size),
                           open_flags: 0, format: nil, repair: 0, key_secret: nil, limits: nil)
}

@_cdecl("instar_check_options_init")
public func instar_check_options_init(_ opts: UnsafeMutablePointer<instar_check_options_t>?) {
    legacyInitOptions(opts, frozenSize: 32, checkOptionsDefaults())
}

@_cdecl("instar_check_options_init_sized")
public func instar_check_options_init_sized(_ opts: UnsafeMutablePointer<instar_check_options_t>?,
                                            _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, checkOptionsDefaults())
}

/// The filename and the check options a C caller passed (repair bits, format, open flags, key secret).
func checkArguments(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_check_options_t>?) throws
    -> (String, CheckOperation.Options)
{
    let name = try cString(filename, "filename")
    let defaults = checkOptionsDefaults()
    let o = try readOptions(opts, defaults: defaults)
    var options = CheckOperation.Options()
    options.format = optionalString(o.format)
    options.open = openOptions(flags: o.open_flags, keySecret: o.key_secret)
    var repair: CheckRepair = []
    if o.repair & UInt32(INSTAR_CHECK_REPAIR_LEAKS) != 0 { repair.insert(.leaks) }
    if o.repair & UInt32(INSTAR_CHECK_REPAIR_ERRORS) != 0 { repair.insert(.errors) }
    options.repair = repair
    return (name, options)
}

/// open_flags of a check options struct (0 when the caller's struct is too short to hold them).
private func readDeclaredFlags(_ opts: UnsafePointer<instar_check_options_t>) -> UInt32 {
    let declared = Int(UnsafeRawPointer(opts).load(as: UInt32.self))
    guard let at = MemoryLayout<instar_check_options_t>.offset(of: \.open_flags), declared >= at + 4 else { return 0 }
    return UnsafeRawPointer(opts).load(fromByteOffset: at, as: UInt32.self)
}

/// Runs the check the options describe and returns its report (throws for open failures, missing check
/// support and failed check passes).
func runCheck(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_check_options_t>?,
              messages: (CheckMessage) -> Void = { _ in }) throws -> ImageCheckReport
{
    let (name, options) = try checkArguments(filename, opts)
    let isolated = (opts.map { readDeclaredFlags($0) } ?? 0) & UInt32(INSTAR_OPEN_ISOLATED) != 0
    let outcome: CheckOperation.Outcome
    do {
        outcome = isolated ? try IsolatedMode.runCheck(name, options: options, messages: messages)
            : try CheckOperation.run(name, options: options, messages: messages)
    } catch let e as CheckNotSupported {
        throw InstarError(.unsupported, e.description, errno: 95 /* ENOTSUP */)
    }
    if let e = outcome.failureErrno {
        throw InstarError(.io, "Check failed: \(strerrorString(e))", errno: e)
    }
    guard let report = outcome.report else { throw InstarError(.io, "Check failed") }
    return report
}

@_cdecl("instar_check")
public func instar_check(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_check_options_t>?,
                         _ result: UnsafeMutablePointer<instar_check_result_t>?,
                         _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let result else { throw InstarError.invalid("result must not be NULL") }
        try fillCheckResult(result, try runCheck(filename, opts))
    }
}

/// Stores a report's counters in a caller's instar_check_result_t (only what its struct_size holds).
private func fillCheckResult(_ result: UnsafeMutablePointer<instar_check_result_t>, _ report: ImageCheckReport) throws {
    let declared = Int(UnsafeRawPointer(result).load(as: UInt32.self))
    guard declared >= MemoryLayout<UInt32>.size else {
        throw InstarError.invalid("struct_size of the result struct is too small")
    }
    let r = report.result
    func opt(_ v: Int64) -> Int64 { v != 0 ? v : -1 }
    let exitCode: Int32 = r.checkErrors != 0 ? 1 : r.corruptions != 0 ? 2 : r.leaks != 0 ? 3 : 0
    var out = instar_check_result_t(
        struct_size: UInt32(MemoryLayout<instar_check_result_t>.size), exit_code: exitCode,
        check_errors: r.checkErrors, corruptions: opt(r.corruptions), leaks: opt(r.leaks),
        corruptions_fixed: opt(r.corruptionsFixed), leaks_fixed: opt(r.leaksFixed),
        image_end_offset: opt(r.imageEndOffset), total_clusters: opt(r.totalClusters),
        allocated_clusters: opt(r.allocatedClusters), fragmented_clusters: opt(r.fragmentedClusters),
        compressed_clusters: opt(r.compressedClusters))
    // Fill only what the caller's version of the struct holds; struct_size stays the caller's.
    let n = min(declared, MemoryLayout<instar_check_result_t>.size)
    withUnsafeBytes(of: &out) { src in
        UnsafeMutableRawPointer(result).advanced(by: 4).copyMemory(from: src.baseAddress! + 4, byteCount: n - 4)
    }
}

@_cdecl("instar_check_report")
public func instar_check_report(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_check_options_t>?,
                                _ result: UnsafeMutablePointer<instar_check_result_t>?,
                                _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                                _ messages: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                                _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        json?.pointee = nil
        messages?.pointee = nil
        var text = ""
        let report = try runCheck(filename, opts) { m in
            text += (m.errorReport ? "qemu-img: " : "") + m.text + "\n"
        }
        if let result { try fillCheckResult(result, report) }
        json?.pointee = mallocString(report.json)
        messages?.pointee = mallocString(text)
    }
}

@_cdecl("instar_check_json")
public func instar_check_json(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_check_options_t>?,
                              _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                              _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let json else { throw InstarError.invalid("json must not be NULL") }
        json.pointee = nil
        json.pointee = mallocString(try runCheck(filename, opts).json)
    }
}

/// `check --chain --output=json` (an instar extension): every image of the backing chain checked on its own, top
/// first; *json receives the array of the per-image objects (images without a check, or whose check failed,
/// have none) and *exit_code the worst status (1 > 2 > 3 > 63 > 0).
@_cdecl("instar_check_chain_json")
public func instar_check_chain_json(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_check_options_t>?,
                                    _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                                    _ exitCode: UnsafeMutablePointer<Int32>?,
                                    _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let json else { throw InstarError.invalid("json must not be NULL") }
        json.pointee = nil
        let (name, options) = try checkArguments(filename, opts)
        let members = try CheckOperation.chainMembers(name, options: options)
        var codes: [Int32] = []
        var reports: [QObject] = []
        for (i, m) in members.enumerated() {
            var one = options
            if i > 0 { one.format = m.format }
            do {
                let outcome = try CheckOperation.run(m.filename, options: one) { _ in }
                codes.append(outcome.exitCode)
                if let r = outcome.report, outcome.failureErrno == nil { reports.append(r.qobject) }
            } catch is CheckNotSupported {
                codes.append(63)
            } catch {
                codes.append(1)
            }
        }
        exitCode?.pointee = CheckOperation.worstExitCode(codes)
        json.pointee = mallocString(QJSON.pretty(.list(reports)) + "\n")
    }
}
