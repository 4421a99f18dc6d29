/// A small, strict JSON parser for qemu `json:` filenames and --image-opts. Bounded: input length and nesting
/// depth are capped so hostile strings (for example a backing name stored in an image) cannot exhaust the stack.
public enum JSONParser {
    public static let maxLength = 1 << 20
    public static let maxDepth = 64

    public static func parse(_ text: String) throws -> QObject {
        let bytes = Array(text.utf8)
        guard bytes.count <= maxLength else { throw InstarError.invalid("JSON text is too long") }
        var p = Parser(bytes: bytes)
        p.skipSpace()
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.pos == bytes.count else { throw p.error("trailing characters") }
        return v
    }

    struct Parser {
        let bytes: [UInt8]
        var pos = 0

        func error(_ what: String) -> InstarError {
            InstarError.invalid("Could not parse JSON: \(what) at position \(pos)")
        }

        mutating func skipSpace() {
            while pos < bytes.count, [0x20, 0x09, 0x0a, 0x0d].contains(bytes[pos]) { pos += 1 }
        }

        mutating func expect(_ c: UInt8) throws {
            guard pos < bytes.count, bytes[pos] == c else { throw error("expected '\(Character(Unicode.Scalar(c)))'") }
            pos += 1
        }

        mutating func literal(_ word: String) -> Bool {
            let w = Array(word.utf8)
            guard pos + w.count <= bytes.count, Array(bytes[pos..<(pos + w.count)]) == w else { return false }
            pos += w.count
            return true
        }

        mutating func value(depth: Int) throws -> QObject {
            guard depth < JSONParser.maxDepth else { throw error("nesting too deep") }
            guard pos < bytes.count else { throw error("unexpected end") }
            switch bytes[pos] {
            case UInt8(ascii: "{"):
                pos += 1
                var members: [(String, QObject)] = []
                skipSpace()
                if pos < bytes.count, bytes[pos] == UInt8(ascii: "}") { pos += 1; return .dict(members) }
                while true {
                    skipSpace()
                    let k = try string()
                    skipSpace()
                    try expect(UInt8(ascii: ":"))
                    skipSpace()
                    let v = try value(depth: depth + 1)
                    if let i = members.firstIndex(where: { $0.0 == k }) { members[i].1 = v } else { members.append((k, v)) }
                    skipSpace()
                    guard pos < bytes.count else { throw error("unexpected end") }
                    if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                    try expect(UInt8(ascii: "}"))
                    return .dict(members)
                }
            case UInt8(ascii: "["):
                pos += 1
                var items: [QObject] = []
                skipSpace()
                if pos < bytes.count, bytes[pos] == UInt8(ascii: "]") { pos += 1; return .list(items) }
                while true {
                    skipSpace()
                    items.append(try value(depth: depth + 1))
                    skipSpace()
                    guard pos < bytes.count else { throw error("unexpected end") }
                    if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                    try expect(UInt8(ascii: "]"))
                    return .list(items)
                }
            case UInt8(ascii: "\""):
                return .string(try string())
            case UInt8(ascii: "t"):
                if literal("true") { return .bool(true) }
                throw error("bad literal")
            case UInt8(ascii: "f"):
                if literal("false") { return .bool(false) }
                throw error("bad literal")
            case UInt8(ascii: "n"):
                if literal("null") { return .null }
                throw error("bad literal")
            default:
                return try number()
            }
        }

        mutating func string() throws -> String {
            try expect(UInt8(ascii: "\""))
            var out: [UInt8] = []
            while true {
                guard pos < bytes.count else { throw error("unterminated string") }
                let c = bytes[pos]
                pos += 1
                if c == UInt8(ascii: "\"") { break }
                if c != UInt8(ascii: "\\") { out.append(c); continue }
                guard pos < bytes.count else { throw error("unterminated escape") }
                let e = bytes[pos]
                pos += 1
                switch e {
                case UInt8(ascii: "n"): out.append(0x0a)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "r"): out.append(0x0d)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0c)
                case UInt8(ascii: "u"):
                    guard pos + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[pos..<(pos + 4)], as: UTF8.self), radix: 16)
                    else { throw error("bad \\u escape") }
                    pos += 4
                    let scalar = Unicode.Scalar(v) ?? "\u{FFFD}"
                    out.append(contentsOf: Array(String(Character(scalar)).utf8))
                default: out.append(e)
                }
            }
            return String(decoding: out, as: UTF8.self)
        }

        mutating func number() throws -> QObject {
            let start = pos
            while pos < bytes.count, "+-0123456789.eE".utf8.contains(bytes[pos]) { pos += 1 }
            let s = String(decoding: bytes[start..<pos], as: UTF8.self)
            if let i = Int64(s) { return .int(i) }
            if let u = UInt64(s) { return .uint(u) }
            if let d = Double(s) { return .double(d) }
            throw error("bad number")
        }
    }
}
