import Glibc

/// QEMU's JSON text for a QObject: `qobject_to_json_pretty` (qemu-img's --output=json) and `qobject_to_json`
/// (the compact form inside `json:{...}` filenames), byte for byte.
///
/// Two QEMU details decide the bytes:
/// - Member order. A QDict is a 512-bucket hash table; iteration walks the buckets in ascending order and,
///   inside a bucket, meets the most recently inserted key first. `QObject.dict` keeps insertion order (the
///   QAPI declaration order, as QEMU's output visitor inserts), so the order is recomputed here.
/// - The writer. Every value after the first in a container is preceded by "," and a newline (pretty) or a space
///   (compact); a container's closing bracket goes on its own line even when the container is empty.
public enum QJSON {
    /// QEMU's QDICT_BUCKET_MAX.
    public static let bucketCount: UInt32 = 512

    /// The hash QEMU's QDict uses (tdb_hash from Samba's TDB), modulo 2^32.
    public static func tdbHash(_ key: String) -> UInt32 {
        let bytes = Array(key.utf8)
        var value = UInt32(0x238F_13AF) &* UInt32(truncatingIfNeeded: bytes.count)
        for (i, b) in bytes.enumerated() {
            value = value &+ (UInt32(b) << UInt32((i * 5) % 24))
        }
        return 1_103_515_243 &* value &+ 12345
    }

    /// The members of a dictionary in the order QEMU's qdict_first/qdict_next walk them. A key inserted twice
    /// keeps its first position and its last value, as qdict_put does.
    public static func qdictOrder(_ members: [(String, QObject)]) -> [(String, QObject)] {
        var firstIndex: [String: Int] = [:]
        var unique: [(String, QObject)] = []
        for (k, v) in members {
            if let i = firstIndex[k] {
                unique[i].1 = v
            } else {
                firstIndex[k] = unique.count
                unique.append((k, v))
            }
        }
        let keyed = unique.enumerated().map { (i, m) in (bucket: tdbHash(m.0) % bucketCount, index: i, member: m) }
        return keyed.sorted { a, b in
            a.bucket != b.bucket ? a.bucket < b.bucket : a.index > b.index
        }.map(\.member)
    }

    /// `qobject_to_json_pretty`: 4-space indentation, no trailing newline (qemu-img adds one with printf).
    public static func pretty(_ value: QObject) -> String {
        var w = Writer(pretty: true)
        w.emit(name: nil, value)
        return w.text
    }

    /// `qobject_to_json`: one line, ", " between members and ": " after keys.
    public static func compact(_ value: QObject) -> String {
        var w = Writer(pretty: false)
        w.emit(name: nil, value)
        return w.text
    }

    /// QEMU's json-writer state machine.
    struct Writer {
        let pretty: Bool
        var text = ""
        /// One entry per open container: true for an array, false for an object.
        var containers: [Bool] = []
        var needComma = false

        init(pretty: Bool) { self.pretty = pretty }

        mutating func newline() {
            guard pretty else { return }
            text += "\n"
            text += String(repeating: " ", count: 4 * containers.count)
        }

        mutating func commaAndName(_ name: String?) {
            if needComma {
                text += ","
                if pretty { newline() } else { text += " " }
            } else {
                if !text.isEmpty { newline() }
                needComma = true
            }
            if containers.last == false {
                text += QJSON.quoted(name ?? "")
                text += ": "
            }
        }

        mutating func emit(name: String?, _ value: QObject) {
            commaAndName(name)
            switch value {
            case let .dict(members):
                text += "{"
                containers.append(false)
                needComma = false
                for (k, v) in QJSON.qdictOrder(members) { emit(name: k, v) }
                containers.removeLast()
                newline()
                text += "}"
                needComma = true
            case let .list(items):
                text += "["
                containers.append(true)
                needComma = false
                for v in items { emit(name: nil, v) }
                containers.removeLast()
                newline()
                text += "]"
                needComma = true
            case let .string(s): text += QJSON.quoted(s)
            case let .int(v): text += String(v)
            case let .uint(v): text += String(v)
            case let .double(d): text += QJSON.formatDouble(d)
            case let .bool(b): text += b ? "true" : "false"
            case .null: text += "null"
            }
        }
    }

    /// A JSON string literal the way QEMU's json-writer quotes: `"` and `\` and the five short control escapes
    /// are backslashed; every other code point outside printable ASCII becomes \uXXXX (upper-case hex, a
    /// surrogate pair beyond the BMP); noncharacters become U+FFFD. The string ends at a NUL, as a C string does.
    public static func quoted(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            var cp = scalar.value
            switch cp {
            case 0: out += "\""; return out
            case 0x22: out += "\\\""
            case 0x5C: out += "\\\\"
            case 0x08: out += "\\b"
            case 0x0C: out += "\\f"
            case 0x0A: out += "\\n"
            case 0x0D: out += "\\r"
            case 0x09: out += "\\t"
            default:
                if (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE { cp = 0xFFFD }
                if cp > 0xFFFF {
                    out += "\\u" + hex4(0xD800 + ((cp - 0x10000) >> 10)) + "\\u" + hex4(0xDC00 + ((cp - 0x10000) & 0x3FF))
                } else if cp < 0x20 || cp >= 0x7F {
                    out += "\\u" + hex4(cp)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
        return out
    }

    static func hex4(_ v: UInt32) -> String {
        let s = String(v, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, 4 - s.count)) + s
    }

    /// A double as QEMU prints it ("%.17g").
    public static func formatDouble(_ d: Double) -> String {
        cFormat("%.17g", d)
    }
}

/// printf-style formatting of one double through the C library (the engine does not use Foundation).
func cFormat(_ format: String, _ value: Double) -> String {
    var buffer = [CChar](repeating: 0, count: 64)
    let n = withVaList([value]) { args in
        buffer.withUnsafeMutableBufferPointer { vsnprintf($0.baseAddress, $0.count, format, args) }
    }
    guard n >= 0 else { return "" }
    return String(cString: buffer)
}
