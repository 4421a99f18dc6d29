// instar_inspect: the format of a file from its content alone and every violation of a safety policy, in one
// report. The detection and the checks oslo.utils makes come from StreamInspect.swift (its stream model, so the
// verdicts are oslo.utils' own); the checks it does not make (backing and data-file names, vmdk extents,
// encryption, a virtual size limit, the declared format) read the header fields directly, bounded.

/// Violation codes (instar.h INSTAR_INSPECT_*): bit numbers in a policy's fatal mask.
public enum InspectCode: UInt32, CaseIterable {
    case formatMismatch = 0
    case multipleFormats = 1
    case malformed = 2
    case backingFile = 3
    case protocolName = 4
    case unsafePath = 5
    case dataFile = 6
    case vmdkExtents = 7
    case vmdkExtentPath = 8
    case vmdkDevice = 9
    case vmdkDescriptor = 10
    case vmdkFooter = 11
    case unknownFeatures = 12
    case unsupportedVersion = 13
    case encrypted = 14
    case virtualSize = 15
    case partitions = 16
    case bannedFormat = 17

    public var bit: UInt64 { 1 << UInt64(rawValue) }

    /// The name the CLI's JSON and the Python binding use.
    public var name: String {
        switch self {
        case .formatMismatch: return "format-mismatch"
        case .multipleFormats: return "multiple-formats"
        case .malformed: return "malformed"
        case .backingFile: return "backing-file"
        case .protocolName: return "protocol-name"
        case .unsafePath: return "unsafe-path"
        case .dataFile: return "data-file"
        case .vmdkExtents: return "vmdk-extents"
        case .vmdkExtentPath: return "vmdk-extent-path"
        case .vmdkDevice: return "vmdk-device"
        case .vmdkDescriptor: return "vmdk-descriptor"
        case .vmdkFooter: return "vmdk-footer"
        case .unknownFeatures: return "unknown-features"
        case .unsupportedVersion: return "unsupported-version"
        case .encrypted: return "encrypted"
        case .virtualSize: return "virtual-size"
        case .partitions: return "partitions"
        case .bannedFormat: return "banned-format"
        }
    }

    public static func named(_ s: String) -> InspectCode? { allCases.first { $0.name == s } }

    public static func mask(_ codes: [InspectCode]) -> UInt64 { codes.reduce(0) { $0 | $1.bit } }
}

/// The platforms whose refusals a preset reproduces (instar.h INSTAR_INSPECT_PRESET_*; docs/inspect.md).
public enum InspectPreset: UInt32, CaseIterable {
    case glance = 0
    case vdsm = 1
    case nova = 2
    case cinder = 3
    case pve = 4

    public var name: String {
        switch self {
        case .glance: return "glance"
        case .vdsm: return "vdsm"
        case .nova: return "nova"
        case .cinder: return "cinder"
        case .pve: return "pve"
        }
    }

    public static func named(_ s: String) -> InspectPreset? {
        if s == "oslo" || s == "default" { return .glance }
        return allCases.first { $0.name == s }
    }

    /// What oslo.utils' safety_check() and detect_file_format() refuse, plus Glance's declared-format match.
    static let osloFatal = InspectCode.mask([.formatMismatch, .multipleFormats, .malformed, .backingFile, .dataFile,
                                             .vmdkExtentPath, .vmdkDescriptor, .vmdkFooter, .unknownFeatures,
                                             .unsupportedVersion, .partitions, .bannedFormat, .vmdkExtents,
                                             .virtualSize])

    public var fatal: UInt64 {
        switch self {
        case .glance:
            return Self.osloFatal
        case .nova:
            return Self.osloFatal | InspectCode.mask([.protocolName, .unsafePath, .vmdkDevice])
        case .cinder:
            return Self.osloFatal | InspectCode.mask([.protocolName, .unsafePath, .vmdkDevice, .encrypted])
        case .vdsm:
            return Self.osloFatal | InspectCode.mask([.protocolName, .unsafePath, .vmdkDevice])
        case .pve:
            return InspectCode.mask([.formatMismatch, .malformed, .backingFile, .protocolName, .dataFile, .vmdkExtents,
                                     .virtualSize])
        }
    }

    /// The most vmdk extents accepted (0: no limit).
    public var maxVmdkExtents: UInt32 { self == .pve ? 1 : 0 }
}

public struct InspectPolicy {
    public var preset: InspectPreset = .glance
    /// nil: the preset's.
    public var fatal: UInt64?
    public var maxVirtualSize: UInt64 = 0
    /// nil: the preset's; 0 no limit.
    public var maxVmdkExtents: UInt32?
    public var declaredFormat: String?

    public init() {}

    public var fatalMask: UInt64 { fatal ?? preset.fatal }
    var vmdkExtentLimit: UInt32 { maxVmdkExtents ?? preset.maxVmdkExtents }
}

public struct InspectViolation {
    public var code: InspectCode
    public var field: String
    public var offset: UInt64
    public var message: String
    public var fatal = false
}

public struct InspectReport {
    /// The detected format ("raw" when nothing matched; the first in oslo.utils' order when several did).
    public var format: String
    public var formats: [String]
    /// nil when it does not fit in 64 bits.
    public var virtualSize: UInt64?
    public var violations: [InspectViolation]

    public var isFatal: Bool { violations.contains { $0.fatal } }
}

public enum Inspect {
    /// Inspects `path` under `policy`.
    public static func run(path: String, policy: InspectPolicy) throws -> InspectReport {
        let file = try HostFile.open(path)
        let detection = try StreamDetect.run(file)
        let matches = detection.matches
        var violations: [InspectViolation] = []
        var format = "raw"
        var size: UInt64? = detection.fileSize
        if let first = matches.first {
            format = first.name
            size = first.virtualSize
        }
        if matches.count > 1 {
            let names = matches.map { $0.name }.sorted().joined(separator: ",")
            violations.append(InspectViolation(code: .multipleFormats, field: "format", offset: 0,
                                               message: "Multiple formats detected: \(names)"))
        }
        for m in matches {
            switch m.safetyCheck() {
            case .formatError(let text):
                violations.append(InspectViolation(code: .malformed, field: m.name, offset: 0, message: text))
            case .checked(let findings):
                for f in findings {
                    violations.append(InspectViolation(code: f.code, field: f.field, offset: f.offset, message: f.message))
                }
            }
            violations += extraChecks(m, file: file, policy: policy, path: path)
        }
        if let declared = policy.declaredFormat, !declared.isEmpty, !declaredMatches(declared, format, matches) {
            violations.insert(InspectViolation(code: .formatMismatch, field: "format", offset: 0,
                                               message: "Image content is \(format), not the declared \(declared)"), at: 0)
        }
        if policy.maxVirtualSize != 0 {
            if size.map({ $0 > policy.maxVirtualSize }) ?? true {
                let shown = size.map { String($0) } ?? "beyond 2^64"
                violations.append(InspectViolation(code: .virtualSize, field: "virtual_size", offset: 0,
                                                   message: "Virtual size \(shown) is above the limit \(policy.maxVirtualSize)"))
            }
        }
        let mask = policy.fatalMask
        for i in violations.indices { violations[i].fatal = mask & violations[i].code.bit != 0 }
        return InspectReport(format: format, formats: matches.map { $0.name }, virtualSize: size, violations: violations)
    }

    /// Whether the declared format names what the content is: qemu's "vpc" is oslo's "vhd", and a partitioned
    /// disk (gpt/mbr) is declared "raw". Content that matches several formats (a polyglot) matches a declared format
    /// that is one of them: the multiple-formats violation is what refuses it, as oslo.utils' detect_file_format()
    /// refuses it before Glance or Nova compare the declared format.
    static func declaredMatches(_ declared: String, _ format: String, _ matches: [StreamInspector]) -> Bool {
        let d = declared == "vpc" ? "vhd" : declared
        let names = matches.isEmpty ? [format] : matches.map { $0.name }
        return names.contains(d) || (d == "raw" && names.contains("gpt"))
    }

    // MARK: checks oslo.utils does not make

    static func extraChecks(_ m: StreamInspector, file: HostFile, policy: InspectPolicy, path: String) -> [InspectViolation] {
        switch m.name {
        case "qcow2": return (try? qcow2Extras(file)) ?? []
        case "vmdk":
            guard let v = m as? VmdkStream, let text = v.descText else { return [] }
            return vmdkExtras(text, at: v.region("descriptor")?.offset ?? 0, limit: policy.vmdkExtentLimit)
        case "qed": return (try? qedExtras(file)) ?? []
        case "luks":
            return [InspectViolation(code: .encrypted, field: "luks", offset: 0, message: "Image is LUKS encrypted")]
        default: return []
        }
    }

    /// What is wrong with a file name an image refers to (backing file, data file, vmdk extent): a protocol or
    /// json: prefix (qemu would open something else than a file), an absolute path, a ".." component.
    static func nameFindings(_ name: String, what: String, field: String, offset: UInt64) -> [InspectViolation] {
        var out: [InspectViolation] = []
        let bytes = Array(name.utf8)
        if name.hasPrefix("json:") {
            out.append(InspectViolation(code: .protocolName, field: field, offset: offset,
                                        message: "\(what) is a json: specification"))
        } else if let colon = bytes.firstIndex(of: 0x3a), !bytes[0..<colon].contains(0x2f) {
            out.append(InspectViolation(code: .protocolName, field: field, offset: offset,
                                        message: "\(what) names a protocol: '\(String(decoding: bytes[0..<colon], as: UTF8.self))'"))
        }
        if bytes.first == 0x2f {
            out.append(InspectViolation(code: .unsafePath, field: field, offset: offset, message: "\(what) is an absolute path"))
        }
        if bytes.split(separator: 0x2f).contains(where: { Array($0) == [0x2e, 0x2e] }) {
            out.append(InspectViolation(code: .unsafePath, field: field, offset: offset, message: "\(what) contains '..'"))
        }
        return out
    }

    static func printable(_ b: ArraySlice<UInt8>) -> String {
        String(decoding: b.map { (0x20...0x7e).contains($0) ? $0 : 0x3f }, as: UTF8.self)
    }

    /// qcow2: the backing file name, the external data file name (header extension), encryption.
    static func qcow2Extras(_ file: HostFile) throws -> [InspectViolation] {
        var out: [InspectViolation] = []
        let h = try file.readBytes(at: 0, count: 112)
        let version = h.probeU32be(4) ?? 0
        if let off = h.probeU64be(8), off != 0, let len = h.probeU32be(16), len > 0 {
            let n = Int(min(len, 1023))
            if off <= UInt64(Int64.max) - 1024 {
                let name = printable(try file.readBytes(at: off, count: n)[...])
                out += nameFindings(name, what: "Backing file '\(name)'", field: "qcow2.backing_file", offset: off)
            }
        }
        if let crypt = h.probeU32be(32), crypt != 0 {
            let kind = crypt == 1 ? "AES" : crypt == 2 ? "LUKS" : "method \(crypt)"
            out.append(InspectViolation(code: .encrypted, field: "qcow2.crypt_method", offset: 32,
                                        message: "Image is encrypted (\(kind))"))
        }
        // Header extensions: after the header, within the first cluster.
        let clusterBits = h.probeU32be(20) ?? 16
        guard (9...21).contains(clusterBits) else { return out }
        let cluster = 1 << Int(clusterBits)
        let headerLength = version >= 3 ? Int(h.probeU32be(100) ?? 104) : 72
        guard headerLength >= 72, headerLength < cluster else { return out }
        let c = try file.readBytes(at: 0, count: cluster)
        var at = headerLength
        var steps = 0
        while at + 8 <= cluster && steps < 1024 {
            steps += 1
            guard let type = c.probeU32be(at), let len = c.probeU32be(at + 4) else { break }
            if type == 0 { break }
            let start = at + 8
            guard Int(len) <= cluster - start else { break }
            if type == 0x4441_5441 {   // external data file name
                let name = printable(c[start..<(start + Int(len))])
                out += nameFindings(name, what: "Data file '\(name)'", field: "qcow2.data_file", offset: UInt64(start))
            }
            at = start + (Int(len) + 7) / 8 * 8
        }
        return out
    }

    /// qed: the backing file (feature bit 0) and its name.
    static func qedExtras(_ file: HostFile) throws -> [InspectViolation] {
        let h = try file.readBytes(at: 0, count: 64)
        guard let features = h.probeU64le(16), features & 1 != 0 else { return [] }
        let off = UInt64(h.probeU32le(56) ?? 0), len = Int(min(h.probeU32le(60) ?? 0, 1023))
        let name = printable(try file.readBytes(at: off, count: len)[...])
        return [InspectViolation(code: .backingFile, field: "qed.backing_filename_offset", offset: 56,
                                 message: "Image has a backing file")]
            + nameFindings(name, what: "Backing file '\(name)'", field: "qed.backing_file", offset: off)
    }

    /// vmdk: the extents of the descriptor (count, paths, devices, protocols) and a parent hint.
    static func vmdkExtras(_ text: [UInt8], at descAt: UInt64, limit: UInt32) -> [InspectViolation] {
        var out: [InspectViolation] = []
        var extents = 0
        let access: [[UInt8]] = [Array("RW".utf8), Array("RDONLY".utf8), Array("NOACCESS".utf8)]
        for raw in text.split(separator: 0x0a) {
            let line = VmdkProbe.strip(raw)
            let upper = line.map { (0x61...0x7a).contains($0) ? $0 - 0x20 : $0 }
            let words = upper.split(separator: 0x20)
            guard let first = words.first, access.contains(Array(first)) else { continue }
            extents += 1
            // ACCESS SECTORS TYPE "NAME" [OFFSET]
            guard let q1 = line.firstIndex(of: 0x22) else { continue }
            let rest = line[(q1 + 1)...]
            guard let q2 = rest.firstIndex(of: 0x22) else { continue }
            let name = printable(line[(q1 + 1)..<q2])
            let type = words.count > 2 ? String(decoding: words[2], as: UTF8.self) : ""
            let field = "vmdk.extent[\(extents - 1)]"
            if name.hasPrefix("/dev/") {
                out.append(InspectViolation(code: .vmdkDevice, field: field, offset: descAt,
                                            message: "\(type) extent '\(name)' names a device"))
            }
            out += nameFindings(name, what: "Extent '\(name)'", field: field, offset: descAt)
        }
        if limit != 0 && extents > Int(limit) {
            out.append(InspectViolation(code: .vmdkExtents, field: "vmdk.extents", offset: descAt,
                                        message: "\(extents) extents (at most \(limit) accepted)"))
        }
        // qemu takes the text after `parentFileNameHint="` (the first occurrence, case as written) up to the next
        // quote as the parent, opened as a vmdk backing file, whatever parentCID says.
        let key = Array("parentFileNameHint".utf8)
        if let at = VmdkProbe.find(key, in: text) {
            let start = at + key.count + 2
            if start <= text.count, let end = VmdkProbe.find([0x22], in: text, from: start) {
                let name = printable(text[start..<end])
                out.append(InspectViolation(code: .backingFile, field: "vmdk.parentFileNameHint", offset: descAt &+ UInt64(at),
                                            message: "Image has a parent file '\(name)'"))
                out += nameFindings(name, what: "Parent '\(name)'", field: "vmdk.parentFileNameHint",
                                    offset: descAt &+ UInt64(at))
            }
        }
        return out
    }
}
