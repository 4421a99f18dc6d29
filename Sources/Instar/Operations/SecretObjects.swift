/// Command-line option strings in qemu's `key=value,key=value` syntax (QemuOpts, used by --image-opts) and
/// the `--object secret,...` definitions that give encrypted images their passphrases.
public enum QemuOptsParser {
    /// Splits `text` into (key, value) pairs. A value runs to the next single ','; ",," stands for a literal
    /// comma. A leading element without '=' takes `impliedKey` when one is given; any other element without '='
    /// is a flag: "foo" means foo=on and "nofoo" means foo=off.
    /// `warn` receives qemu's deprecation warning for each short-form flag.
    public static func parse(_ text: String, impliedKey: String?, warn: ((String) -> Void)? = nil) -> [(String, String)] {
        let chars = Array(text.utf8)
        var pairs: [(String, String)] = []
        var pos = 0
        var first = true
        while pos < chars.count {
            var len = 0
            while pos + len < chars.count, chars[pos + len] != UInt8(ascii: "="), chars[pos + len] != UInt8(ascii: ",") {
                len += 1
            }
            let hasValue = pos + len < chars.count && chars[pos + len] == UInt8(ascii: "=")
            if !hasValue {
                if first, let implied = impliedKey {
                    let (value, next) = readValue(chars, from: pos)
                    pairs.append((implied, value))
                    pos = next
                } else {
                    let written = String(decoding: chars[pos..<(pos + len)], as: UTF8.self)
                    var name = written
                    var value = "on"
                    if name.hasPrefix("no") {
                        name = String(name.dropFirst(2))
                        value = "off"
                    }
                    if value == "off" || (name != "help" && name != "?") {
                        warn?("short-form boolean option '\(written)' deprecated\nPlease use \(name)=\(value) instead")
                    }
                    pairs.append((name, value))
                    pos += len
                }
            } else {
                let name = String(decoding: chars[pos..<(pos + len)], as: UTF8.self)
                let (value, next) = readValue(chars, from: pos + len + 1)
                pairs.append((name, value))
                pos = next
            }
            if pos < chars.count, chars[pos] == UInt8(ascii: ",") { pos += 1 }
            first = false
        }
        return pairs
    }

    /// A value up to the next single comma, with ",," unescaped; returns the value and the index of the comma
    /// (or the end).
    static func readValue(_ chars: [UInt8], from start: Int) -> (String, Int) {
        var out: [UInt8] = []
        var pos = start
        while pos < chars.count {
            if chars[pos] == UInt8(ascii: ",") {
                if pos + 1 < chars.count, chars[pos + 1] == UInt8(ascii: ",") {
                    out.append(UInt8(ascii: ","))
                    pos += 2
                    continue
                }
                break
            }
            out.append(chars[pos])
            pos += 1
        }
        return (String(decoding: out, as: UTF8.self), pos)
    }

    /// An --image-opts string as block options, the way qemu_opts_to_qdict hands them to the block layer: every
    /// value a string, a later duplicate replacing the earlier value.
    public static func blockOptions(_ text: String, warn: ((String) -> Void)? = nil) -> [(String, QObject)] {
        var out: [(String, QObject)] = []
        for (k, v) in parse(text, impliedKey: "file", warn: warn) {
            if let i = out.firstIndex(where: { $0.0 == k }) { out[i].1 = .string(v) } else { out.append((k, .string(v))) }
        }
        return out
    }
}

/// `--object secret,id=ID,data=TEXT[,format=raw|base64]` definitions, collected into id → secret.
public enum SecretObjects {
    /// Adds the object defined by `text` to `secrets`. Only "secret" objects carry anything instar uses.
    public static func add(_ text: String, to secrets: inout [String: String]) throws {
        let pairs = QemuOptsParser.parse(text, impliedKey: "qom-type")
        var fields: [String: String] = [:]
        for (k, v) in pairs { fields[k] = v }
        guard let type = fields["qom-type"] else { throw InstarError.invalid("Parameter 'qom-type' is missing") }
        if let kind = TlsCredentials.Kind(rawValue: type) {
            // TLS credentials for nbd nodes' tls-creds: kept in the process's object table, not with the secrets.
            try TlsCredentials.add(kind: kind, pairs: pairs)
            return
        }
        guard type == "secret" else { throw InstarError.invalid("Parameter 'qom-type' does not accept value '\(type)'") }
        guard let id = fields["id"] else { throw InstarError.invalid("Parameter 'id' is missing") }
        guard isIdentifier(id) else {
            throw InstarError.invalid("Parameter 'id' expects an identifier\n"
                + "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        }
        for (k, _) in pairs where !secretProperties.contains(k) {
            throw InstarError.invalid("Parameter '\(k)' is unexpected")
        }
        if fields["keyid"] != nil {
            throw InstarError.unsupported("Secrets encrypted with another secret (keyid) are not supported")
        }
        var data: String
        if let d = fields["data"] {
            data = d
        } else if let path = fields["file"] {
            let file: HostFile
            do {
                file = try HostFile.open(path)
            } catch let e as InstarError {
                // glib's g_file_get_contents wording, which qemu passes on.
                throw InstarError(e.code, "Unable to read \(path): Failed to open file \u{201C}\(path)\u{201D}: "
                    + strerrorString(e.errnoValue), errno: e.errnoValue)
            }
            let size = try file.size()
            guard size <= 1 << 20 else { throw InstarError.invalid("Unable to read \(path): File too large") }
            data = String(decoding: try file.readBytes(at: 0, count: Int(size)), as: UTF8.self)
        } else {
            throw InstarError.invalid("Either 'file' or 'data' must be provided")
        }
        var bytes = Array(data.utf8)
        switch fields["format"] ?? "raw" {
        case "raw": break
        case "base64":
            guard let decoded = base64Decode(data) else { throw InstarError.invalid("Invalid base64 data") }
            data = String(decoding: decoded, as: UTF8.self)
            bytes = decoded
        case let f: throw InstarError.invalid("Parameter 'format' does not accept value '\(f)'")
        }
        if TlsCredentials.hasCredentials(id: id) { throw TlsCredentials.duplicate(id) }
        secrets[id] = data
        TlsCredentials.noteOtherObject(id: id)
        // The exact bytes, base64-encoded, for users of binary secrets (an rbd cephx key): the text above is
        // decoded as UTF-8 and may not keep them. "=" never starts an id, so no secret is shadowed.
        secrets[base64Key(id)] = base64Encode(bytes)
    }

    /// The properties a secret object takes (besides its type).
    static let secretProperties: Set<String> = ["qom-type", "id", "data", "file", "format", "keyid", "iv"]

    /// qemu's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
    static func isIdentifier(_ s: String) -> Bool {
        let bytes = Array(s.utf8)
        guard let first = bytes.first, (first | 0x20) >= UInt8(ascii: "a"), (first | 0x20) <= UInt8(ascii: "z") else {
            return false
        }
        return bytes.allSatisfy { c in
            let l = c | 0x20
            return (l >= UInt8(ascii: "a") && l <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9"))
                || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_")
        }
    }

    /// Where `add` keeps secret `id`'s exact bytes in base64 (qcrypto_secret_lookup_as_base64's answer).
    public static func base64Key(_ id: String) -> String { "=base64:" + id }

    /// Standard base64 with padding.
    public static func base64Encode(_ bytes: [UInt8]) -> String {
        let table = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i < bytes.count {
            let b0 = UInt32(bytes[i])
            let b1 = i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0
            let b2 = i + 2 < bytes.count ? UInt32(bytes[i + 2]) : 0
            let v = (b0 << 16) | (b1 << 8) | b2
            out.append(table[Int((v >> 18) & 63)])
            out.append(table[Int((v >> 12) & 63)])
            out.append(i + 1 < bytes.count ? table[Int((v >> 6) & 63)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? table[Int(v & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func base64Decode(_ s: String) -> [UInt8]? {
        var out: [UInt8] = []
        var acc: UInt32 = 0
        var bits = 0
        for c in s.utf8 {
            let v: UInt32
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): v = UInt32(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): v = UInt32(c - UInt8(ascii: "a")) + 26
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = UInt32(c - UInt8(ascii: "0")) + 52
            case UInt8(ascii: "+"): v = 62
            case UInt8(ascii: "/"): v = 63
            case UInt8(ascii: "="): continue
            default: return nil
            }
            acc = ((acc << 6) | v) & 0xFFFF
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8((acc >> UInt32(bits)) & 0xFF))
            }
        }
        return out
    }
}
