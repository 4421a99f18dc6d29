/// Creation options as qemu-img takes them with `-o`: parsed against the merged option table of a format and
/// the host-file layer (qemu_opts_do_parse over qemu_opts_append), with qemu's messages.
public struct CreateOptionValues {
    /// The merged table, format options first, in declaration order.
    public let specs: [CreateOptionSpec]
    /// Values as given, in order; a later value of the same name wins, as qemu_opt_find takes the last.
    private(set) var entries: [(name: String, text: String)] = []

    public init(specs: [CreateOptionSpec]) { self.specs = specs }

    public func spec(_ name: String) -> CreateOptionSpec? { specs.first { $0.name == name } }

    /// The text given for `name`, if any (the last one given).
    public func text(_ name: String) -> String? { entries.last { $0.name == name }?.text }

    public func isSet(_ name: String) -> Bool { text(name) != nil }

    /// Sets `name` (which must be in the table) to `text`, validating it like qemu_opt_set.
    public mutating func set(_ name: String, _ text: String) throws {
        guard let spec = spec(name) else { throw InstarError.invalid("Invalid parameter '\(name)'") }
        _ = try Self.validate(spec, text)
        entries.append((name, text))
    }

    /// Parses an `-o` string ("a=1,b=2", ",," escapes a comma, "x" means x=on and "nox" x=off).
    public mutating func parse(_ list: String) throws {
        for (name, value) in try Self.split(list) {
            try set(name, value)
        }
    }

    /// Splits an option list into (name, value) pairs the way qemu's opts_do_parse does.
    static func split(_ list: String) throws -> [(String, String)] {
        var result: [(String, String)] = []
        let chars = Array(list)
        var i = 0
        while i < chars.count {
            // The name runs to '=' or ','.
            var name = ""
            while i < chars.count, chars[i] != "=", chars[i] != "," {
                name.append(chars[i])
                i += 1
            }
            var value: String
            if i < chars.count, chars[i] == "=" {
                i += 1
                value = ""
                while i < chars.count {
                    if chars[i] == "," {
                        if i + 1 < chars.count, chars[i + 1] == "," {
                            value.append(",")
                            i += 2
                            continue
                        }
                        break
                    }
                    value.append(chars[i])
                    i += 1
                }
            } else if name.hasPrefix("no") {
                name = String(name.dropFirst(2))
                value = "off"
            } else {
                value = "on"
            }
            if i < chars.count, chars[i] == "," { i += 1 }
            result.append((name, value))
        }
        return result
    }

    /// Splits an option list like qemu's option parser (for lists that are not creation options).
    public static func splitList(_ list: String) throws -> [(String, String)] { try split(list) }

    /// True when the list asks for help ("help" or "?" as an option name), as qemu's has_help_option.
    public static func wantsHelp(_ list: String) -> Bool {
        ((try? split(list)) ?? []).contains { ($0.0 == "help" || $0.0 == "?") }
    }

    /// qemu's is_valid_option_list: not empty and no trailing lone comma.
    public static func isValidList(_ list: String) -> Bool {
        if list.isEmpty { return false }
        var commas = 0
        for c in list.reversed() {
            if c == "," { commas += 1 } else { break }
        }
        return commas % 2 == 0
    }

    @discardableResult
    static func validate(_ spec: CreateOptionSpec, _ text: String) throws -> UInt64? {
        switch spec.kind {
        case .string:
            return nil
        case .bool:
            guard parseBool(text) != nil else {
                throw InstarError.invalid("Parameter '\(spec.name)' expects 'on' or 'off'")
            }
            return nil
        case .number:
            // qemu's parse_option_number (qemu_strtou64: a minus sign wraps, overflow has its own message).
            switch QemuStrtol.unsigned(text) {
            case .unsignedValue(let v): return v
            case .range: throw InstarError.invalid("Value '\(text)' is too large for parameter '\(spec.name)'")
            default: throw InstarError.invalid("Parameter '\(spec.name)' expects a number")
            }
        case .size:
            switch SizeParse.parse(text) {
            case .success(let v):
                return v
            case .failure(.range):
                // qemu's parse_option_size: a well-formed size past 2^64 has a message of its own.
                throw InstarError.invalid("Value '\(text)' is out of range for parameter '\(spec.name)'")
            case .failure:
                throw InstarError.invalid("Parameter '\(spec.name)' expects a non-negative number below 2^64\n"
                    + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                    + "and exabytes, respectively.")
            }
        }
    }

    static func parseBool(_ s: String) -> Bool? {
        switch s {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: return nil
        }
    }

    static func parseNumber(_ s: String) -> UInt64? {
        if case .unsignedValue(let v) = QemuStrtol.unsigned(s) { return v }
        return nil
    }

    // Typed getters over the given value or the spec default.

    public func string(_ name: String) -> String? { text(name) ?? spec(name)?.defaultValue }

    public func bool(_ name: String, default d: Bool = false) -> Bool {
        guard let t = string(name), let b = Self.parseBool(t) else { return d }
        return b
    }

    public func size(_ name: String) -> UInt64? {
        guard let t = string(name) else { return nil }
        if case .success(let v) = SizeParse.parse(t) { return v }
        return nil
    }

    public func number(_ name: String) -> UInt64? {
        guard let t = string(name) else { return nil }
        return Self.parseNumber(t)
    }

    /// The option part of qemu's `Formatting '...', fmt=F ` line (qemu_opts_print): declaration order, set
    /// values or defaults, sizes and numbers that were set as integers.
    public func formattingLine() -> String {
        var parts: [String] = []
        for spec in specs {
            if let t = text(spec.name) {
                switch spec.kind {
                case .size, .number:
                    let v = (try? Self.validate(spec, t)) ?? nil
                    // qemu_opts_print shows the parsed value as a signed 64-bit number.
                    parts.append("\(spec.name)=\(v.map { String(Int64(bitPattern: $0)) } ?? t)")
                default:
                    parts.append("\(spec.name)=\(t)")
                }
            } else if let d = spec.defaultValue {
                parts.append("\(spec.name)=\(d)")
            }
        }
        return parts.joined(separator: " ")
    }

    /// The lines of `-o help` (qemu_opts_print_help): sorted by name, "  name=<type>" padded to 24 columns.
    public static func helpLines(_ specs: [CreateOptionSpec]) -> [String] {
        specs.sorted { $0.name < $1.name }.map { s in
            var left = "  \(s.name)=<\(s.kind.helpName)>"
            while left.count < 24 { left.append(" ") }
            return "\(left) - \(s.help)"
        }
    }
}

/// The host-file (file-posix) layer's own create options, appended after the format's.
public enum HostFileCreate {
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size"),
        CreateOptionSpec("nocow", .bool, "Turn off copy-on-write (valid only on btrfs)"),
        CreateOptionSpec("preallocation", .string, "Preallocation mode (allowed values: off, falloc, full)"),
        CreateOptionSpec("extent_size_hint", .size, "Extent size hint for the image file, 0 to disable"),
    ]

    /// Preallocation modes of the host-file layer.
    public enum Preallocation: String { case off, falloc, full }

    /// Creates (or truncates) `path` and gives it `size` bytes the way file-posix does: ftruncate for off,
    /// posix_fallocate for falloc, written zeroes for full. Returns the open file, still locked, so a caller
    /// that writes nothing more can flush it (nothing is flushed here: a format's create writes its header
    /// next and flushes once at the end); nil when a protocol's own create made the node, which is not opened.
    @discardableResult
    public static func create(_ path: String, size: UInt64, preallocation: Preallocation,
                              options: CreateOptionValues? = nil, secrets: [String: String] = [:]) throws -> HostFile? {
        if let address = try ProtocolAddress.fromPlainName(path),
           let create = ProtocolRegistry.descriptor(named: address.driver)?.create {
            // The protocol's own create makes the whole node (qemu does not open it afterwards).
            try create(address.options(secrets: secrets), size, options)
            return nil
        }
        let file = try createEmpty(path)
        try grow(file, to: size, preallocation: preallocation)
        return file
    }

    /// A name a protocol driver claims (rbd:) is created by that driver with `size` bytes and opened, as
    /// qemu's bdrv_create_file hands the options to the protocol's create; nil for host files and for a driver
    /// without a create hook, which `createEmpty` opens as the existing device (qemu's create fallback).
    static func createProtocolNode(_ path: String, size: UInt64, options: CreateOptionValues? = nil) throws -> HostFile? {
        guard let address = try ProtocolAddress.fromPlainName(path),
              let create = ProtocolRegistry.descriptor(named: address.driver)?.create else { return nil }
        try create(address.options, size, options)
        return try HostFile.open(address: address, name: path, writable: true)
    }

    /// Creates (or truncates) `path` to an empty file with file-posix's messages, as a format's create does
    /// through the protocol layer before writing its header.
    public static func createEmpty(_ path: String, options: CreateOptionValues? = nil) throws -> HostFile {
        if let node = try createProtocolNode(path, size: 0, options: options) { return node }
        let file: HostFile
        do {
            file = try HostFile.open(path, writable: true, create: true)
        } catch let e as InstarError {
            // file-posix's create reports the open(O_CREAT) failure as "Could not create".
            var m = e.message
            let prefix = "Could not open '\(path)'"
            if m.hasPrefix(prefix) { m = "Could not create '\(path)'" + m.dropFirst(prefix.count) }
            if let d = ProtocolRegistry.descriptor(forPlainName: path) {
                m = "Protocol driver '\(d.name)' does not support image creation, and opening the image failed: " + m
            }
            throw InstarError(e.code, m, errno: e.errnoValue)
        }
        if !file.isHostFile {
            // A protocol that creates by opening the existing device (qemu's bdrv_co_create_opts_simple): its
            // length stays (a truncate that is not exact may not shrink it) and the first sector is zeroed.
            do {
                try file.punchHole(at: 0, length: min(try file.size(), 512))
            } catch let e as InstarError {
                throw InstarError(e.code, "Failed to clear the new image's first sector: \(strerrorString(e.errnoValue))",
                                  errno: e.errnoValue)
            }
            return file
        }
        // file-posix's create locks before it truncates: it writes and resizes, and shares everything but
        // resizing, so an image another process uses is refused, not emptied.
        try ImageLock.acquire(file, perm: [.write, .resize], shared: [.consistentRead, .write, .writeUnchanged])
        do {
            try file.truncate(to: 0)
        } catch let e as InstarError {
            throw InstarError(e.code, "Could not truncate file: \(strerrorString(e.errnoValue))", errno: e.errnoValue)
        }
        return file
    }

    /// Grows an open file to `size` with the given preallocation (file-posix raw_regular_truncate).
    public static func grow(_ file: HostFile, to size: UInt64, preallocation: Preallocation) throws {
        let current = try file.size()
        if size <= current { return }
        guard size <= UInt64(Int64.max) else { throw InstarError(.range, "Could not resize file: File too large", errno: 27) }
        switch preallocation {
        case .off:
            try resize(file, size)
            // file-posix allocates the first block of a file it grows from empty, so that its allocation (and
            // the request alignment) can be probed later; `qemu-img map` shows it as data.
            if current == 0 {
                let first = size < 4096 ? 512 : 4096
                try file.write([UInt8](repeating: 0, count: Int(min(UInt64(first), size))), at: 0)
            }
        case .falloc:
            do {
                try file.allocate(at: current, length: size - current)
            } catch let e as InstarError {
                throw InstarError(e.code, "Could not preallocate new data: \(strerrorString(e.errnoValue))", errno: e.errnoValue)
            }
        case .full:
            try resize(file, size)
            try file.writeZeroes(at: current, length: size - current)
        }
    }

    static func resize(_ file: HostFile, _ size: UInt64) throws {
        do {
            try file.truncate(to: size)
        } catch let e as InstarError where file.isHostFile {
            throw InstarError(e.errnoValue == 27 ? .range : e.code, "Could not resize file: \(strerrorString(e.errnoValue))", errno: e.errnoValue)
        }
    }
}
