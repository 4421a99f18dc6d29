import Glibc

/// qemu's qemu_strtosz: a byte count with an optional binary suffix (B, K, M, G, T, P, E in either case),
/// decimal or 0x-hex, and a decimal fraction only together with a suffix ("1.5G").
public enum SizeParse {
    public enum Failure: Error, Equatable { case invalid, range }

    /// Parses all of `text`; `defaultSuffix` applies when no suffix is given (qemu-img uses 'B').
    public static func parse(_ text: String, defaultSuffix: Character = "B") -> Result<UInt64, Failure> {
        let bytes = Array(text.utf8)
        var i = 0
        while i < bytes.count, isspace(Int32(bytes[i])) != 0 { i += 1 }
        let numberStart = i
        if i < bytes.count, bytes[i] == UInt8(ascii: "-") { return .failure(.invalid) }
        if i < bytes.count, bytes[i] == UInt8(ascii: "+") { i += 1 }
        var value: UInt64 = 0
        var digits = 0
        var overflow = false
        var isHex = false
        if i + 1 < bytes.count, bytes[i] == UInt8(ascii: "0"), bytes[i + 1] | 0x20 == UInt8(ascii: "x"),
           i + 2 < bytes.count, isxdigit(Int32(bytes[i + 2])) != 0 {
            isHex = true
            i += 2
            while i < bytes.count, isxdigit(Int32(bytes[i])) != 0 {
                let c = bytes[i] | 0x20
                let d = UInt64(c >= UInt8(ascii: "a") ? c - UInt8(ascii: "a") + 10 : c - UInt8(ascii: "0"))
                let (m, o1) = value.multipliedReportingOverflow(by: 16)
                let (a, o2) = m.addingReportingOverflow(d)
                overflow = overflow || o1 || o2
                value = a
                digits += 1
                i += 1
            }
        } else {
            while i < bytes.count, bytes[i] >= UInt8(ascii: "0"), bytes[i] <= UInt8(ascii: "9") {
                let (m, o1) = value.multipliedReportingOverflow(by: 10)
                let (a, o2) = m.addingReportingOverflow(UInt64(bytes[i] - UInt8(ascii: "0")))
                overflow = overflow || o1 || o2
                value = a
                digits += 1
                i += 1
            }
        }
        if digits == 0 { return .failure(.invalid) }
        if overflow { return .failure(.range) }
        _ = numberStart
        var fraction = 0.0
        if i < bytes.count, bytes[i] == UInt8(ascii: ".") {
            if isHex { return .failure(.invalid) }
            // The fraction is read as a double ("0.xxx"); an exponent makes the whole input invalid.
            var j = i + 1
            var s = "0."
            while j < bytes.count, bytes[j] >= UInt8(ascii: "0"), bytes[j] <= UInt8(ascii: "9") {
                s.append(Character(UnicodeScalar(bytes[j])))
                j += 1
            }
            if j < bytes.count, bytes[j] | 0x20 == UInt8(ascii: "e"), j + 1 < bytes.count,
               bytes[j + 1] >= UInt8(ascii: "0") && bytes[j + 1] <= UInt8(ascii: "9")
                || (j + 2 < bytes.count && (bytes[j + 1] == UInt8(ascii: "+") || bytes[j + 1] == UInt8(ascii: "-"))
                    && bytes[j + 2] >= UInt8(ascii: "0") && bytes[j + 2] <= UInt8(ascii: "9")) {
                return .failure(.invalid)
            }
            fraction = strtod(s, nil)
            i = j
        }
        var mul: UInt64
        if i < bytes.count, let m = suffixMultiplier(bytes[i]) {
            mul = m
            i += 1
        } else {
            mul = suffixMultiplier(defaultSuffix.asciiValue ?? 66) ?? 1
        }
        if mul == 1 && fraction != 0 { return .failure(.invalid) }
        if i != bytes.count { return .failure(.invalid) }
        let extra = UInt64(fraction * Double(mul))
        if value > (UInt64.max - extra) / mul { return .failure(.range) }
        return .success(value * mul + extra)
    }

    static func suffixMultiplier(_ c: UInt8) -> UInt64? {
        switch c | 0x20 {
        case UInt8(ascii: "b"): return 1
        case UInt8(ascii: "k"): return 1 << 10
        case UInt8(ascii: "m"): return 1 << 20
        case UInt8(ascii: "g"): return 1 << 30
        case UInt8(ascii: "t"): return 1 << 40
        case UInt8(ascii: "p"): return 1 << 50
        case UInt8(ascii: "e"): return 1 << 60
        default: return nil
        }
    }

    /// qemu-img's cvtnum for an image size: the value, or the two-line / range message qemu prints.
    public static func imageSize(_ text: String, name: String = "image size") throws -> UInt64 {
        switch parse(text) {
        case .success(let v) where v <= UInt64(Int64.max):
            return v
        case .failure(.invalid):
            throw InstarError.invalid("Invalid \(name) specified. You may use k, M, G, T, P or E suffixes for\n"
                + "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        default:
            throw InstarError(.range, "Invalid \(name) specified. Must be between 0 and \(Int64.max).")
        }
    }
}
