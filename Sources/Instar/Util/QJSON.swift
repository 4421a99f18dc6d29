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
        var value = UInt32(0x238F_13AF) &* UInt32(truncatingIfNeeded: key.utf8.count)
        var i = 0
        for b in key.utf8 {
            value = value &+ (UInt32(b) << UInt32((i * 5) % 24))
            i += 1
        }
        return 1_103_515_243 &* value &+ 12345
    }

    /// The members of a dictionary in the order QEMU's qdict_first/qdict_next walk them. A key inserted twice
    /// keeps its first position and its last value, as qdict_put does.
    public static func qdictOrder(_ members: [(String, QObject)]) -> [(String, QObject)] {
        var unique: [(String, QObject)] = []
        unique.reserveCapacity(members.count)
        if members.count <= 32 {
            // The dictionaries qemu-img prints are small: a linear search beats hashing every key twice.
            outer: for (k, v) in members {
                for i in unique.indices where unique[i].0 == k {
                    unique[i].1 = v
                    continue outer
                }
                unique.append((k, v))
            }
        } else {
            var firstIndex: [String: Int] = [:]
            for (k, v) in members {
                if let i = firstIndex[k] {
                    unique[i].1 = v
                } else {
                    firstIndex[k] = unique.count
                    unique.append((k, v))
                }
            }
        }
        let keyed = unique.enumerated().map { (i, m) in (bucket: tdbHash(m.0) % bucketCount, index: i) }
        return keyed.sorted { a, b in
            a.bucket != b.bucket ? a.bucket < b.bucket : a.index > b.index
        }.map { unique[$0.index] }
    }

    /// `qobject_to_json_pretty`: 4-space indentation, no trailing newline (qemu-img adds one with printf).
    public static func pretty(_ value: QObject) -> String {
        var w = Writer(pretty: true)
        w.emit(name: nil, value)
        return String(decoding: w.bytes, as: UTF8.self)
    }

    /// `qobject_to_json`: one line, ", " between members and ": " after keys.
    public static func compact(_ value: QObject) -> String {
        var w = Writer(pretty: false)
        w.emit(name: nil, value)
        return String(decoding: w.bytes, as: UTF8.self)
    }

    /// QEMU's json-writer state machine, writing UTF-8 bytes (the output is ASCII: everything else is escaped).
    struct Writer {
        let pretty: Bool
        var bytes: [UInt8] = []
        /// One entry per open container: true for an array, false for an object.
        var containers: [Bool] = []
        var needComma = false

        init(pretty: Bool) {
            self.pretty = pretty
            bytes.reserveCapacity(1024)
        }

        mutating func append(_ s: StaticString) {
            s.withUTF8Buffer { bytes.append(contentsOf: $0) }
        }

        mutating func append(_ s: String) {
            bytes.append(contentsOf: s.utf8)
        }

        mutating func newline() {
            guard pretty else { return }
            bytes.append(0x0A)
            bytes.append(contentsOf: repeatElement(0x20, count: 4 * containers.count))
        }

        mutating func commaAndName(_ name: String?) {
            if needComma {
                bytes.append(0x2C)
                if pretty { newline() } else { bytes.append(0x20) }
            } else {
                if !bytes.isEmpty { newline() }
                needComma = true
            }
            if containers.last == false {
                QJSON.appendQuoted(name ?? "", to: &bytes)
                append(": ")
            }
        }

        mutating func emit(name: String?, _ value: QObject) {
            commaAndName(name)
            switch value {
            case let .dict(members):
                bytes.append(0x7B)
                containers.append(false)
                needComma = false
                for (k, v) in QJSON.qdictOrder(members) { emit(name: k, v) }
                containers.removeLast()
                newline()
                bytes.append(0x7D)
                needComma = true
            case let .list(items):
                bytes.append(0x5B)
                containers.append(true)
                needComma = false
                for v in items { emit(name: nil, v) }
                containers.removeLast()
                newline()
                bytes.append(0x5D)
                needComma = true
            case let .string(s): QJSON.appendQuoted(s, to: &bytes)
            case let .int(v): append(String(v))
            case let .uint(v): append(String(v))
            case let .double(d): append(QJSON.formatDouble(d))
            case let .bool(b): if b { append("true") } else { append("false") }
            case .null: append("null")
            }
        }
    }

    /// A JSON string literal the way QEMU's json-writer quotes: `"` and `\` and the five short control escapes
    /// are backslashed; every other code point outside printable ASCII becomes \uXXXX (upper-case hex, a
    /// surrogate pair beyond the BMP); noncharacters become U+FFFD. The string ends at a NUL, as a C string does.
    public static func quoted(_ s: String) -> String {
        var out: [UInt8] = []
        appendQuoted(s, to: &out)
        return String(decoding: out, as: UTF8.self)
    }

    static func appendQuoted(_ s: String, to out: inout [UInt8]) {
        out.append(0x22)
        defer { out.append(0x22) }
        // Printable ASCII without `"` and `\` goes through as it is; anything else takes the scalar path.
        var plain = true
        for b in s.utf8 where b < 0x20 || b >= 0x7F || b == 0x22 || b == 0x5C {
            plain = false
            break
        }
        if plain {
            out.append(contentsOf: s.utf8)
            return
        }
        for scalar in s.unicodeScalars {
            var cp = scalar.value
            switch cp {
            case 0: return
            case 0x22: out.append(0x5C); out.append(0x22)
            case 0x5C: out.append(0x5C); out.append(0x5C)
            case 0x08: out.append(0x5C); out.append(0x62)
            case 0x0C: out.append(0x5C); out.append(0x66)
            case 0x0A: out.append(0x5C); out.append(0x6E)
            case 0x0D: out.append(0x5C); out.append(0x72)
            case 0x09: out.append(0x5C); out.append(0x74)
            default:
                if (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE { cp = 0xFFFD }
                if cp > 0xFFFF {
                    appendEscape(0xD800 + ((cp - 0x10000) >> 10), to: &out)
                    appendEscape(0xDC00 + ((cp - 0x10000) & 0x3FF), to: &out)
                } else if cp < 0x20 || cp >= 0x7F {
                    appendEscape(cp, to: &out)
                } else {
                    out.append(UInt8(truncatingIfNeeded: cp))
                }
            }
        }
    }

    /// `\uXXXX` with upper-case hex digits.
    static func appendEscape(_ v: UInt32, to out: inout [UInt8]) {
        let digits: StaticString = "0123456789ABCDEF"
        out.append(0x5C)
        out.append(0x75)
        digits.withUTF8Buffer { d in
            for shift in stride(from: 12, through: 0, by: -4) {
                out.append(d[Int((v >> UInt32(shift)) & 0xF)])
            }
        }
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
