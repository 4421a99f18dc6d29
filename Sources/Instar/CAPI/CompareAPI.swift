import CInstar
import Glibc

@_cdecl("instar_compare_options_init")
public func instar_compare_options_init(_ opts: UnsafeMutablePointer<instar_compare_options_t>?) {
    opts?.pointee = instar_compare_options_t(struct_size: UInt32(MemoryLayout<instar_compare_options_t>.size),
                                             open_flags: 0, format1: nil, format2: nil, strict: 0, progress: nil,
                                             progress_data: nil, key_secret1: nil, key_secret2: nil)
}

/// Wraps a C progress callback: a nonzero return cancels the operation.
func progressCallback(_ fn: instar_progress_fn?, _ data: UnsafeMutableRawPointer?) -> ((Double) throws -> Void)? {
    guard let fn else { return nil }
    return { percent in
        if fn(percent, data) != 0 { throw InstarError(.cancelled, "Operation cancelled") }
    }
}

@_cdecl("instar_compare")
public func instar_compare(_ filename1: UnsafePointer<CChar>?, _ filename2: UnsafePointer<CChar>?,
                           _ opts: UnsafePointer<instar_compare_options_t>?,
                           _ result: UnsafeMutablePointer<instar_compare_result_t>?,
                           _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let result else { throw InstarError.invalid("result must not be NULL") }
        let name1 = try cString(filename1, "filename1")
        let name2 = try cString(filename2, "filename2")
        var defaults = instar_compare_options_t()
        instar_compare_options_init(&defaults)
        let o = try readOptions(opts, defaults: defaults)
        let a = try openForOperation(name1, format: optionalString(o.format1), flags: o.open_flags,
                                     keySecret: o.key_secret1)
        defer { try? a.close() }
        let b = try openForOperation(name2, format: optionalString(o.format2), flags: o.open_flags,
                                     keySecret: o.key_secret2)
        defer { try? b.close() }
        let r = try CompareOperation.compare(a, b, strict: o.strict != 0,
                                             progress: progressCallback(o.progress, o.progress_data))
        // Only the caller's declared part of the result struct is written.
        let declared = Int(result.pointee.struct_size)
        var full = instar_compare_result_t()
        full.struct_size = UInt32(MemoryLayout<instar_compare_result_t>.size)
        full.identical = r.identical ? 1 : 0
        full.size_mismatch = r.sizeMismatch ? 1 : 0
        full.mismatch_offset = r.mismatchOffset.map { Int64(clamping: $0) } ?? -1
        withUnsafeMutableBytes(of: &full.message) { buf in
            let bytes = Array(r.message.utf8.prefix(buf.count - 1))
            for (i, c) in bytes.enumerated() { buf[i] = c }
            buf[bytes.count] = 0
        }
        let n = declared == 0 ? MemoryLayout<instar_compare_result_t>.size
            : min(declared, MemoryLayout<instar_compare_result_t>.size)
        withUnsafeBytes(of: &full) { src in
            UnsafeMutableRawPointer(result).copyMemory(from: src.baseAddress!, byteCount: n)
        }
        if declared != 0 { result.pointee.struct_size = UInt32(declared) }
    }
}
