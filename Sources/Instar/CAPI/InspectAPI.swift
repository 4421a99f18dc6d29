import CInstar
import Glibc

// instar_inspect: the format from content and the violations of a safety policy (Inspect/Inspect.swift).
// The report and its strings are separate malloc'd blocks owned by the report; instar_inspect_report_free frees
// them all.

/// The library's defaults, as a full struct.
private func defaultPolicy() -> instar_inspect_policy_t {
    instar_inspect_policy_t(struct_size: UInt32(MemoryLayout<instar_inspect_policy_t>.size),
                            preset: InspectPreset.glance.rawValue, fatal: 0, max_virtual_size: 0, max_vmdk_extents: 0,
                            flags: 0, declared_format: nil)
}

@_cdecl("instar_inspect_policy_init_sized")
public func instar_inspect_policy_init_sized(_ policy: UnsafeMutablePointer<instar_inspect_policy_t>?,
                                             _ structSize: UInt32) -> Int32 {
    initOptions(policy, size: structSize, defaultPolicy())
}

/// The engine's policy from a caller's struct (only the bytes its struct_size declares).
func inspectPolicy(_ p: UnsafePointer<instar_inspect_policy_t>?) throws -> InspectPolicy {
    let o = try readOptions(p, defaults: defaultPolicy())
    guard let preset = InspectPreset(rawValue: o.preset) else {
        throw InstarError.invalid("unknown inspect preset \(o.preset)")
    }
    guard o.flags == 0 else { throw InstarError.invalid("unknown inspect policy flags") }
    var policy = InspectPolicy()
    policy.preset = preset
    if o.fatal != 0 { policy.fatal = o.fatal & ~(UInt64(1) << 63) }
    policy.maxVirtualSize = o.max_virtual_size
    if o.max_vmdk_extents == UInt32.max {
        policy.maxVmdkExtents = 0
    } else if o.max_vmdk_extents != 0 {
        policy.maxVmdkExtents = o.max_vmdk_extents
    }
    policy.declaredFormat = optionalString(o.declared_format)
    return policy
}

private let presetNames: [UnsafePointer<CChar>] = InspectPreset.allCases.map { UnsafePointer(strdup($0.name)!) }
private let codeNames: [UnsafePointer<CChar>] = InspectCode.allCases.map { UnsafePointer(strdup($0.name)!) }

@_cdecl("instar_inspect_code_name")
public func instar_inspect_code_name(_ code: UInt32) -> UnsafePointer<CChar>? {
    Int(code) < codeNames.count ? codeNames[Int(code)] : nil
}

/// A malloc'd report for `rep`.
func makeInspectReport(_ rep: InspectReport, preset: InspectPreset) -> UnsafeMutablePointer<instar_inspect_report_t>? {
    guard let raw = calloc(1, MemoryLayout<instar_inspect_report_t>.size) else { return nil }
    let out = raw.assumingMemoryBound(to: instar_inspect_report_t.self)
    out.pointee.struct_size = UInt32(MemoryLayout<instar_inspect_report_t>.size)
    out.pointee.fatal = rep.isFatal ? 1 : 0
    out.pointee.format = mallocString(rep.format)
    out.pointee.formats = mallocString(rep.formats.joined(separator: ","))
    out.pointee.virtual_size = rep.virtualSize.map { Int64(clamping: $0) } ?? -1
    out.pointee.preset = presetNames[Int(preset.rawValue)]
    if !rep.violations.isEmpty {
        let bytes = MemoryLayout<instar_inspect_violation_t>.stride * rep.violations.count
        guard let arr = calloc(1, bytes) else {
            instar_inspect_report_free(out)
            return nil
        }
        let v = arr.assumingMemoryBound(to: instar_inspect_violation_t.self)
        out.pointee.violations = v
        for (i, x) in rep.violations.enumerated() {
            v[i].code = x.code.rawValue
            v[i].fatal = x.fatal ? 1 : 0
            v[i].offset = x.offset
            v[i].field = mallocString(x.field)
            v[i].message = mallocString(x.message)
            out.pointee.count = UInt32(i + 1)
        }
    }
    return out
}

@_cdecl("instar_inspect")
public func instar_inspect(_ path: UnsafePointer<CChar>?, _ policy: UnsafePointer<instar_inspect_policy_t>?,
                           _ report: UnsafeMutablePointer<UnsafeMutablePointer<instar_inspect_report_t>?>?,
                           _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let report else { throw InstarError.invalid("report must not be NULL") }
        report.pointee = nil
        let name = try cString(path, "path")
        let p = try inspectPolicy(policy)
        let rep = try Inspect.run(path: name, policy: p)
        guard let out = makeInspectReport(rep, preset: p.preset) else { throw InstarError(.noMemory, "out of memory") }
        report.pointee = out
        if let first = rep.violations.first(where: { $0.fatal }) {
            throw InstarError(.policy, first.message)
        }
    }
}

@_cdecl("instar_inspect_report_free")
public func instar_inspect_report_free(_ report: UnsafeMutablePointer<instar_inspect_report_t>?) {
    guard let r = report else { return }
    free(r.pointee.format)
    free(r.pointee.formats)
    if let v = r.pointee.violations {
        for i in 0..<Int(r.pointee.count) {
            free(v[i].field)
            free(v[i].message)
        }
        free(v)
    }
    free(r)
}
