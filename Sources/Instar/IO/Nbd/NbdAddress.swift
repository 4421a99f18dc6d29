import Glibc

/// Where an NBD export lives: qemu's SocketAddress for the nbd driver (inet or unix) and the export name,
/// read from the driver's options as block/nbd.c reads them (nbd_process_options, nbd_config).
struct NbdAddress: Equatable {
    enum Server: Equatable {
        case inet(host: String, port: String)
        case unix(path: String)
    }

    var server: Server
    /// The export name; nil when none was given (the server's default export, "").
    var export: String?
    /// qemu's x-dirty-bitmap: a meta context read in place of base:allocation ("qemu:dirty-bitmap:NAME").
    var dirtyBitmap: String?
    /// Inet options beyond host and port (ipv4, ipv6, to...): qemu then has no plain name for the node.
    var inetExtras = false
    /// tls-creds: the id of the --object tls-creds-x509/tls-creds-psk the connection uses, nil for plain NBD.
    var tlsCreds: String?
    /// tls-hostname: the name the server's certificate must carry (qemu's default: the inet host).
    var tlsHostname: String?
    /// reconnect-delay: seconds requests wait, after the connection drops, while the client connects again
    /// (0: they fail at once). qemu keeps it as a uint32.
    var reconnectDelay: UInt32 = 0
    /// open-timeout: seconds the open keeps trying to connect (0: one attempt).
    var openTimeout: UInt32 = 0

    /// NBD_DEFAULT_PORT.
    static let defaultPort = "10809"
    /// NBD_MAX_STRING_SIZE: the longest export or context name the protocol carries.
    static let maxStringSize = 4096

    /// Options the driver takes besides the server.* ones (nbd_runtime_opts) and the generic "filename".
    static let runtimeOptions: Set<String> = [
        "host", "port", "path", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap", "reconnect-delay",
        "open-timeout", "filename",
    ]

    /// Reads the address from the node's flattened options, with qemu's errors for a wrong set.
    init(options: [(String, QObject)]) throws {
        var legacy: [String: String] = [:]
        var server: [(String, String)] = []
        var export: String?
        var bitmap: String?
        var tlsCreds: String?
        var tlsHostname: String?
        for (k, v) in options {
            let text: String
            switch v {
            case let .string(s): text = s
            case let .int(n): text = String(n)
            case let .uint(n): text = String(n)
            case let .bool(b): text = b ? "on" : "off"
            // qemu turns a JSON number into text as it prints it ("%.17g": 2.0 is "2", 1.5 stays "1.5" and is
            // then refused where a number is expected).
            case let .double(d): text = QJSON.formatDouble(d)
            default: throw InstarError.invalid("Invalid parameter type for '\(k)', expected: string")
            }
            if k.hasPrefix("server.") {
                server.append((String(k.dropFirst(7)), text))
                continue
            }
            guard NbdAddress.runtimeOptions.contains(k) else {
                throw InstarError.invalid("Block protocol 'nbd' doesn't support the option '\(k)'")
            }
            switch k {
            case "host", "port", "path": legacy[k] = text
            case "export": export = text
            case "x-dirty-bitmap": bitmap = text
            case "tls-creds": tlsCreds = text
            case "tls-hostname": tlsHostname = text
            case "reconnect-delay": reconnectDelay = try NbdAddress.seconds(k, text)
            case "open-timeout": openTimeout = try NbdAddress.seconds(k, text)
            default: break
            }
        }
        // nbd_process_legacy_socket_options: host/port/path stand for server.*.
        if !legacy.isEmpty {
            if !server.isEmpty {
                throw InstarError.invalid("Cannot use 'server' and path/host/port at the same time")
            }
            if let path = legacy["path"] {
                if legacy["host"] != nil { throw InstarError.invalid("path and host may not be used at the same time") }
                if legacy["port"] != nil { throw InstarError.invalid("port may not be used without host") }
                server = [("type", "unix"), ("path", path)]
            } else if let host = legacy["host"] {
                server = [("type", "inet"), ("host", host), ("port", legacy["port"] ?? NbdAddress.defaultPort)]
            }
        }
        // nbd_config: the server.* options as a SocketAddress, with the QAPI visitor's errors.
        if server.isEmpty { throw InstarError.invalid("NBD server address missing") }
        func member(_ name: String) -> String? { server.last { $0.0 == name }?.1 }
        guard let type = member("type") else { throw InstarError.invalid("Parameter 'type' is missing") }
        let known: Set<String>
        switch type {
        case "inet":
            guard let host = member("host") else { throw InstarError.invalid("Parameter 'host' is missing") }
            guard let port = member("port") else { throw InstarError.invalid("Parameter 'port' is missing") }
            self.server = .inet(host: host, port: port)
            known = ["type", "host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"]
            inetExtras = server.contains { ["to", "ipv4", "ipv6"].contains($0.0) }
        case "unix":
            guard let path = member("path") else { throw InstarError.invalid("Parameter 'path' is missing") }
            self.server = .unix(path: path)
            known = ["type", "path", "abstract", "tight"]
        case "fd", "vsock":
            throw InstarError.unsupported("NBD server address type '\(type)' is not supported")
        default:
            throw InstarError.invalid("Parameter 'type' does not accept value '\(type)'")
        }
        if let extra = server.first(where: { !known.contains($0.0) }) {
            throw InstarError.invalid("Parameter 'server.\(extra.0)' is unexpected")
        }
        if let e = export, e.utf8.count > NbdAddress.maxStringSize {
            throw InstarError.invalid("export name too long to send to server")
        }
        if let b = bitmap, b.utf8.count > NbdAddress.maxStringSize {
            throw InstarError.invalid("x-dirty-bitmap query too long to send to server")
        }
        self.export = export
        self.dirtyBitmap = bitmap
        // nbd_process_options: without tls-creds the host name is unused; with them an inet host stands for it.
        if let creds = tlsCreds {
            self.tlsCreds = creds
            if tlsHostname == nil, case let .inet(host, _) = self.server { tlsHostname = host }
            self.tlsHostname = tlsHostname
        }
    }

    /// A QEMU_OPT_NUMBER option as qemu_strtou64 reads it (base 0, a leading '-' negating), kept as qemu's
    /// uint32 field keeps it; qemu's errors for text that is no number or too large a one.
    static func seconds(_ name: String, _ text: String) throws -> UInt32 {
        var body = Substring(text)
        while let c = body.first, c == " " || c == "\t" || c == "\n" { body = body.dropFirst() }
        var negative = false
        if body.hasPrefix("-") { negative = true; body = body.dropFirst() } else if body.hasPrefix("+") { body = body.dropFirst() }
        var radix = 10
        if body.hasPrefix("0x") || body.hasPrefix("0X") {
            radix = 16
            body = body.dropFirst(2)
        } else if body.hasPrefix("0") && body.count > 1 {
            radix = 8
            body = body.dropFirst()
        }
        guard !body.isEmpty, body.allSatisfy({ $0.hexDigitValue.map { $0 < radix } ?? false }) else {
            throw InstarError.invalid("Parameter '\(name)' expects a number")
        }
        guard let n = UInt64(body, radix: radix) else {
            throw InstarError.invalid("Value '\(text)' is too large for parameter '\(name)'")
        }
        let value = negative ? 0 &- n : n
        return UInt32(truncatingIfNeeded: value)
    }

    /// nbd_refresh_filename: the URL qemu shows for the node, or nil when it has none.
    var exactFilename: String? {
        switch server {
        case let .unix(path):
            if let e = export { return "nbd+unix:///\(e)?socket=\(path)" }
            return "nbd+unix://?socket=\(path)"
        case let .inet(host, port):
            if inetExtras { return nil }
            if let e = export { return "nbd://\(host):\(port)/\(e)" }
            return "nbd://\(host):\(port)"
        }
    }
}

/// qemu's parse_filename for the nbd drivers: the options a plain name stands for, in the order qemu puts them.
enum NbdName {
    static let prefixes = ["nbd:", "nbd+tcp:", "nbd+unix:"]

    static func parse(_ name: String) throws -> [(String, QObject)] {
        if find("://", in: name) != nil {
            guard let options = parseURI(name) else { throw InstarError.invalid("No valid URL specified") }
            return options
        }
        var file = name
        var options: [(String, QObject)] = []
        // ":exportname=" anywhere ends the address part; nothing after it leaves the name without options.
        if let r = find(":exportname=", in: file) {
            let export = String(file[r.upperBound...])
            if export.isEmpty { return [] }
            file = String(file[..<r.lowerBound])
            options.append(("export", .string(export)))
        }
        guard file.hasPrefix("nbd:") else {
            throw InstarError.invalid("File name string for NBD must start with 'nbd:'")
        }
        let hostSpec = String(file.dropFirst(4))
        if hostSpec.isEmpty { return options }
        if hostSpec.hasPrefix("unix:") {
            options.append(("server.type", .string("unix")))
            options.append(("server.path", .string(String(hostSpec.dropFirst(5)))))
            return options
        }
        let (host, port) = try inetParse(hostSpec)
        options.append(("server.type", .string("inet")))
        options.append(("server.host", .string(host)))
        options.append(("server.port", .string(port)))
        return options
    }

    /// inet_parse's host and port: "HOST:PORT", "[V6]:PORT" or ":PORT" (its sscanf widths: 64 and 32).
    static func inetParse(_ s: String) throws -> (String, String) {
        let u = Array(s.utf8)
        func take(_ from: Int, until stop: UInt8, max: Int) -> (String, Int)? {
            var i = from
            while i < u.count && u[i] != stop && i - from < max { i += 1 }
            if i == from { return nil }
            return (String(decoding: u[from..<i], as: UTF8.self), i)
        }
        var host = ""
        var i = 0
        if u.first == UInt8(ascii: ":") {
            i = 0
        } else if u.first == UInt8(ascii: "[") {
            guard let (h, end) = take(1, until: UInt8(ascii: "]"), max: 64), end + 1 < u.count,
                  u[end] == UInt8(ascii: "]"), u[end + 1] == UInt8(ascii: ":") else {
                throw InstarError.invalid("error parsing IPv6 address '\(s)'")
            }
            host = h
            i = end + 1
        } else {
            guard let (h, end) = take(0, until: UInt8(ascii: ":"), max: 64), end < u.count,
                  u[end] == UInt8(ascii: ":") else {
                throw InstarError.invalid("error parsing address '\(s)'")
            }
            host = h
            i = end
        }
        guard let (port, _) = take(i + 1, until: UInt8(ascii: ","), max: 32) else {
            if u.first == UInt8(ascii: ":") { throw InstarError.invalid("error parsing port in address '\(s)'") }
            if u.first == UInt8(ascii: "[") { throw InstarError.invalid("error parsing IPv6 address '\(s)'") }
            throw InstarError.invalid("error parsing address '\(s)'")
        }
        return (host, port)
    }

    /// nbd_parse_uri: nbd[+tcp]://host[:port]/export and nbd+unix:///export?socket=PATH; nil when invalid.
    static func parseURI(_ name: String) -> [(String, QObject)]? {
        guard let sep = find("://", in: name) else { return nil }
        let scheme = name[..<sep.lowerBound]
        let isUnix: Bool
        switch scheme {
        case "nbd", "nbd+tcp": isUnix = false
        case "nbd+unix": isUnix = true
        default: return nil
        }
        var rest = Substring(name[sep.upperBound...])
        var query: Substring?
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        if let h = rest.firstIndex(of: "#") { rest = rest[..<h] }
        let authority: Substring
        var path: Substring = ""
        if let slash = rest.firstIndex(of: "/") {
            authority = rest[..<slash]
            path = rest[rest.index(after: slash)...]
        } else {
            authority = rest
        }
        // The authority: [userinfo@]host[:port], host possibly a bracketed IPv6 literal.
        var hostPort = authority
        if let at = hostPort.lastIndex(of: "@") { hostPort = hostPort[hostPort.index(after: at)...] }
        var host = hostPort
        var port: Int?
        if hostPort.hasPrefix("[") {
            guard let close = hostPort.firstIndex(of: "]") else { return nil }
            host = hostPort[...close]
            let after = hostPort[hostPort.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { return nil }
                let digits = after.dropFirst()
                if !digits.isEmpty {
                    guard digits.allSatisfy({ $0.isASCII && $0.isNumber }), let p = Int(digits) else { return nil }
                    port = p
                }
            }
        } else if let colon = hostPort.lastIndex(of: ":") {
            host = hostPort[..<colon]
            let digits = hostPort[hostPort.index(after: colon)...]
            if !digits.isEmpty {
                guard digits.allSatisfy({ $0.isASCII && $0.isNumber }), let p = Int(digits) else { return nil }
                port = p
            }
        }
        var options: [(String, QObject)] = []
        let export = percentDecode(path)
        if !export.isEmpty { options.append(("export", .string(export))) }
        var params: [(String, String)] = []
        if let q = query {
            for part in q.split(whereSeparator: { $0 == "&" || $0 == ";" }) where !part.isEmpty {
                if let eq = part.firstIndex(of: "=") {
                    params.append((percentDecode(part[..<eq]), percentDecode(part[part.index(after: eq)...])))
                } else {
                    params.append((percentDecode(part), ""))
                }
            }
        }
        if params.count > 1 || (isUnix && params.isEmpty) || (!isUnix && !params.isEmpty) { return nil }
        if isUnix {
            guard host.isEmpty, port == nil || port == 0, params[0].0 == "socket" else { return nil }
            options.append(("server.type", .string("unix")))
            options.append(("server.path", .string(params[0].1)))
        } else {
            guard !host.isEmpty else { return nil }
            var h = String(host)
            if h.hasPrefix("[") && h.hasSuffix("]") { h = String(h.dropFirst().dropLast()) }
            options.append(("server.type", .string("inet")))
            options.append(("server.host", .string(h)))
            let p = port ?? 0
            options.append(("server.port", .string(p == 0 ? NbdAddress.defaultPort : String(p))))
        }
        return options
    }

    static func percentDecode<S: StringProtocol>(_ s: S) -> String {
        let u = Array(s.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(u.count)
        var i = 0
        func hex(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
        while i < u.count {
            if u[i] == UInt8(ascii: "%"), i + 2 < u.count, let a = hex(u[i + 1]), let b = hex(u[i + 2]) {
                out.append(a << 4 | b)
                i += 3
            } else {
                out.append(u[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

extension NbdName {
    /// The first occurrence of `needle` in `text` (strstr), as a range of `text`.
    static func find(_ needle: String, in text: String) -> Range<String.Index>? {
        let n = Array(needle.utf8)
        guard !n.isEmpty else { return nil }
        let u = text.utf8
        var i = u.startIndex
        while i != u.endIndex {
            var j = i
            var k = 0
            while k < n.count, j != u.endIndex, u[j] == n[k] { j = u.index(after: j); k += 1 }
            if k == n.count { return i..<j }
            i = u.index(after: i)
        }
        return nil
    }
}
