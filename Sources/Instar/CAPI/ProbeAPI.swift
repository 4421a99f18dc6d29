import CInstar
import Glibc

// instar_probe: one structure of an image read from regions the caller captured (Inspect/).

/// The defaults of instar_probe_options_t, the values of INSTAR_PROBE_OPTIONS_INIT.
func probeOptionsDefaults() -> instar_probe_options_t {
    instar_probe_options_t(struct_size: UInt32(MemoryLayout<instar_probe_options_t>.size), flags: 0,
                           format: nil, part: nil, qcow2_known_features: 0, vhdx_item: nil,
                           luks_passphrase: nil, luks_iter_limit: 0, limits: nil)
}

@_cdecl("instar_probe_options_init")
public func instar_probe_options_init(_ opts: UnsafeMutablePointer<instar_probe_options_t>?) {
    legacyInitOptions(opts, frozenSize: 56, probeOptionsDefaults())
}

@_cdecl("instar_probe_options_init_sized")
public func instar_probe_options_init_sized(_ opts: UnsafeMutablePointer<instar_probe_options_t>?,
                                            _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, probeOptionsDefaults())
}

/// Copies `s` into a fixed char array of a C struct, NUL-terminated and truncated to fit.
private func fillChars<T>(_ field: inout T, _ s: String) {
    withUnsafeMutableBytes(of: &field) { buf in
        let bytes = Array(s.utf8.prefix(buf.count - 1))
        for (i, c) in bytes.enumerated() { buf[i] = c }
        buf[bytes.count] = 0
    }
}

/// Upper bounds on what a caller may hand in: a probe never looks further than a VMDK descriptor (1 MiB).
private let maxProbeRegions: UInt32 = 64
private let maxProbeRegionBytes: UInt64 = 16 << 20

@_cdecl("instar_probe")
public func instar_probe(_ regions: UnsafePointer<instar_probe_region_t>?, _ count: UInt32,
                         _ opts: UnsafePointer<instar_probe_options_t>?,
                         _ result: UnsafeMutablePointer<instar_probe_result_t>?,
                         _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let result else { throw InstarError.invalid("result must not be NULL") }
        guard count == 0 || regions != nil else { throw InstarError.invalid("regions must not be NULL") }
        guard count <= maxProbeRegions else { throw InstarError.invalid("too many regions (at most 64)") }
        let defaults = probeOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        let format = try cString(o.format, "format")
        let part = optionalString(o.part) ?? "header"
        var list: [ProbeRegion] = []
        for i in 0..<Int(count) {
            guard let reg = regions?[i] else { continue }
            guard reg.length <= maxProbeRegionBytes else { throw InstarError.invalid("a region is larger than 16 MiB") }
            guard reg.length == 0 || reg.data != nil else { throw InstarError.invalid("a region's data is NULL") }
            var bytes: [UInt8] = []
            if let data = reg.data, reg.length > 0 {
                bytes = Array(UnsafeRawBufferPointer(start: data, count: Int(reg.length)))
            }
            list.append(ProbeRegion(offset: reg.offset, bytes: bytes))
        }
        var options = ProbeOptions()
        if o.qcow2_known_features != 0 { options.qcow2KnownFeatures = o.qcow2_known_features }
        if let item = o.vhdx_item { options.vhdxItem = Array(UnsafeRawBufferPointer(start: item, count: 16)) }
        options.luksPassphrase = optionalString(o.luks_passphrase).map { Array($0.utf8) }
        options.luksIterLimit = o.luks_iter_limit
        let rep = try Probe.run(format: format, part: part, regions: ProbeRegions(regions: list), options: options)

        let declared = Int(result.pointee.struct_size)
        var full = instar_probe_result_t()
        full.struct_size = UInt32(MemoryLayout<instar_probe_result_t>.size)
        full.match = rep.match.map { $0 ? 1 : 0 } ?? -1
        full.virtual_size = rep.virtualSize.map { Int64(clamping: $0) } ?? -1
        full.version = Int32(clamping: rep.version ?? -1)
        full.violations = rep.violations.rawValue
        full.need_offset = rep.need?.offset ?? 0
        full.need_length = rep.need?.length ?? 0
        full.footer = rep.footer ? 1 : 0
        full.text = rep.text ? 1 : 0
        full.payload_offset = rep.payloadOffset
        full.key_slot = Int32(clamping: rep.keySlot ?? -1)
        full.sectors = rep.sectors
        fillChars(&full.subformat, rep.subformat)
        fillChars(&full.message, rep.message)
        withUnsafeMutableBytes(of: &full.payload) { buf in
            for (i, b) in rep.payload.prefix(buf.count).enumerated() { buf[i] = b }
        }
        let n = declared == 0 ? MemoryLayout<instar_probe_result_t>.size
            : min(declared, MemoryLayout<instar_probe_result_t>.size)
        withUnsafeBytes(of: &full) { src in
            guard let base = src.baseAddress else { return }
            UnsafeMutableRawPointer(result).copyMemory(from: base, byteCount: n)
        }
        if declared != 0 { result.pointee.struct_size = UInt32(declared) }
    }
}
