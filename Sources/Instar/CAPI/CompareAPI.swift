import CInstar
import Glibc

/// The defaults of instar_compare_options_t, the values of INSTAR_COMPARE_OPTIONS_INIT.
func compareOptionsDefaults() -> instar_compare_options_t {
    instar_compare_options_t(struct_size: UInt32(MemoryLayout<instar_compare_options_t>.size),
                             open_flags: 0, format1: nil, format2: nil, strict: 0, progress: nil,
                             progress_data: nil, key_secret1: nil, key_secret2: nil, limits: nil,
                             backing_key_secret1: nil, backing_key_secret2: nil)
}

@_cdecl("instar_compare_options_init")
public func instar_compare_options_init(_ opts: UnsafeMutablePointer<instar_compare_options_t>?) {
    legacyInitOptions(opts, frozenSize: 64, compareOptionsDefaults())
}

@_cdecl("instar_compare_options_init_sized")
public func instar_compare_options_init_sized(_ opts: UnsafeMutablePointer<instar_compare_options_t>?,
                                              _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, compareOptionsDefaults())
}

/// Wraps a C progress callback: a nonzero return cancels the operation.
func progressCallback(_ fn: instar_progress_fn?, _ data: UnsafeMutableRawPointer?) -> ((Double) throws -> Void)? {
    guard let fn else { return nil }
    return { percent in
        if fn(percent, data) != 0 { throw InstarError(.cancelled, "Operation cancelled") }
    }
}

/// qemu-img compare's exit status and stderr line (after "qemu-img: ") for a failure at `stage`: 2 while
/// opening, else 3 for a failed block-status query or a corrupt image and 4 for a failed read (img_compare).
func compareFailure(_ error: Error, opening: Bool, names: (String, String)) -> (Int32, String) {
    if opening {
        return (2, (error as? InstarError)?.message ?? "\(error)")
    }
    if let e = error as? StepError {
        let name = e.operand == 0 ? names.0 : names.1
        switch e.step {
        case .blockStatus: return (3, "Sector allocation test failed for \(name)")
        case .read, .write:
            return (4, "Error while reading offset \(e.offset) of \(name): \(strerrorString(e.errnoValue))")
        }
    }
    if let e = error as? InstarError { return (e.code == .corrupt ? 3 : 4, e.message) }
    return (4, "\(error)")
}

/// Copies `full` into the caller's result struct, only the part its struct_size declares (0: the whole).
/// The C struct of a finished comparison (in process or isolated alike).
private func compareResultStruct(_ r: CompareResult) -> instar_compare_result_t {
    var full = instar_compare_result_t()
    full.identical = r.identical ? 1 : 0
    full.size_mismatch = r.sizeMismatch ? 1 : 0
    full.mismatch_offset = r.mismatchOffset.map { Int64(clamping: $0) } ?? -1
    storeCString(r.message, into: &full.message)
    full.exit_status = r.identical ? 0 : 1
    return full
}

private func writeCompareResult(_ full: instar_compare_result_t,
                                _ result: UnsafeMutablePointer<instar_compare_result_t>) {
    var full = full
    full.struct_size = UInt32(MemoryLayout<instar_compare_result_t>.size)
    let declared = Int(result.pointee.struct_size)
    let n = declared == 0 ? MemoryLayout<instar_compare_result_t>.size
        : min(declared, MemoryLayout<instar_compare_result_t>.size)
    withUnsafeBytes(of: &full) { src in
        UnsafeMutableRawPointer(result).copyMemory(from: src.baseAddress!, byteCount: n)
    }
    if declared != 0 { result.pointee.struct_size = UInt32(declared) }
}

/// Stores `text` NUL-terminated (truncated to fit) into a fixed char array of a C struct.
private func storeCString<T>(_ text: String, into field: inout T) {
    withUnsafeMutableBytes(of: &field) { buf in
        let bytes = Array(text.utf8.prefix(buf.count - 1))
        for (i, c) in bytes.enumerated() { buf[i] = c }
        buf[bytes.count] = 0
    }
}

/// Wraps a C warning callback for an operation's `warn` hook.
func warningCallback(_ fn: instar_warning_fn?, _ data: UnsafeMutableRawPointer?) -> ((String) -> Void)? {
    guard let fn else { return nil }
    return { text in text.withCString { fn($0, data) } }
}

@_cdecl("instar_compare")
public func instar_compare(_ filename1: UnsafePointer<CChar>?, _ filename2: UnsafePointer<CChar>?,
                           _ opts: UnsafePointer<instar_compare_options_t>?,
                           _ result: UnsafeMutablePointer<instar_compare_result_t>?,
                           _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let result else { throw InstarError.invalid("result must not be NULL") }
        var opening = true
        var names = ("", "")
        do {
            names.0 = try cString(filename1, "filename1")
            names.1 = try cString(filename2, "filename2")
            let defaults = compareOptionsDefaults()
            let o = try readOptions(opts, defaults: defaults)
            if o.open_flags & UInt32(INSTAR_OPEN_ISOLATED) != 0 {
                let outcome = try IsolatedMode.compare(
                    names, formats: (optionalString(o.format1), optionalString(o.format2)), flags: o.open_flags,
                    keys: (optionalString(o.key_secret1), optionalString(o.key_secret2)), strict: o.strict != 0,
                    backingKeys: (optionalString(o.backing_key_secret1), optionalString(o.backing_key_secret2)),
                    progress: progressCallback(o.progress, o.progress_data))
                var full = instar_compare_result_t()
                switch outcome {
                case let .result(r):
                    writeCompareResult(compareResultStruct(r), result)
                    return
                case let .failure(status, line, error):
                    full.mismatch_offset = -1
                    full.exit_status = status
                    storeCString(line, into: &full.error_message)
                    writeCompareResult(full, result)
                    throw IsolatedCompareFailure(error: error)
                }
            }
            let a = try openForOperation(names.0, format: optionalString(o.format1), flags: o.open_flags,
                                         keySecret: o.key_secret1, backingKeySecret: o.backing_key_secret1)
            defer { try? a.close() }
            let b = try openForOperation(names.1, format: optionalString(o.format2), flags: o.open_flags,
                                         keySecret: o.key_secret2, backingKeySecret: o.backing_key_secret2)
            defer { try? b.close() }
            opening = false
            let r = try CompareOperation.compare(a, b, strict: o.strict != 0,
                                                 progress: progressCallback(o.progress, o.progress_data))
            writeCompareResult(compareResultStruct(r), result)
        } catch let f as IsolatedCompareFailure {
            throw f.error  // the result struct is already filled
        } catch {
            // The failure's exit status and stderr line, as qemu-img compare reports them.
            let (status, line) = compareFailure(error, opening: opening, names: names)
            var full = instar_compare_result_t()
            full.mismatch_offset = -1
            full.exit_status = status
            storeCString(line, into: &full.error_message)
            writeCompareResult(full, result)
            throw error
        }
    }
}

/// An isolated compare's failure whose result struct is already filled.
private struct IsolatedCompareFailure: Error {
    var error: InstarError
}
