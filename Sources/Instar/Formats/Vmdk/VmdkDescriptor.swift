import Glibc

/// The text descriptor of a vmdk image (embedded in a sparse extent or a file of its own), read as qemu's
/// block/vmdk.c reads it: a C string (up to the first NUL) of at most `maxBytes`, searched with strstr-like
/// lookups and extent lines scanned with sscanf's rules.
struct VmdkDescriptor {
    /// qemu's vmdk_read_desc reads at most 1 MiB - 1 bytes.
    static let maxBytes = (1 << 20) - 1
    /// At most this many extents (qemu has no limit; each extent opens a file, so a hostile descriptor is cut off).
    static let maxExtents = 4096

    /// The descriptor's bytes up to the first NUL.
    let text: [UInt8]

    init(bytes: [UInt8]) {
        if let nul = bytes.firstIndex(of: 0) { text = Array(bytes[..<nul]) } else { text = bytes }
    }

    /// strstr: the first position of `needle` from `from`.
    func find(_ needle: String, from: Int = 0) -> Int? {
        let n = Array(needle.utf8)
        guard !n.isEmpty, text.count >= n.count, from <= text.count - n.count else { return nil }
        var i = max(0, from)
        let last = text.count - n.count
        while i <= last {
            if text[i] == n[0] {
                var j = 1
                while j < n.count && text[i + j] == n[j] { j += 1 }
                if j == n.count { return i }
            }
            i += 1
        }
        return nil
    }

    /// vmdk_parse_description: the quoted value after `name="`; nil when missing or not shorter than `limit`.
    func quotedValue(_ name: String, limit: Int) -> String? {
        guard let p = find(name) else { return nil }
        let start = p + name.utf8.count + 2
        guard start < text.count else { return nil }
        var end = start
        while end < text.count && text[end] != UInt8(ascii: "\"") { end += 1 }
        guard end < text.count, limit >= end - start + 1 else { return nil }
        return String(decoding: text[start..<end], as: UTF8.self)
    }

    /// vmdk_read_cid: the hex number after "CID=" (the first "CID" in the text) or "parentCID=".
    func cid(parent: Bool) -> UInt32? {
        let key = parent ? "parentCID" : "CID"
        guard let p = find(key) else { return nil }
        var s = Scanner(text, p + key.utf8.count + 1)
        return s.hex32()
    }

    /// parentFileNameHint="...": nil when absent; throws (EINVAL) when unterminated or too long, as qemu fails.
    func parentFileNameHint() throws -> String? {
        let key = "parentFileNameHint"
        guard let p = find(key) else { return nil }
        let start = p + key.utf8.count + 2
        guard start <= text.count else { throw VmdkDescriptor.invalidArgument() }
        var end = start
        while end < text.count && text[end] != UInt8(ascii: "\"") { end += 1 }
        guard end < text.count else { throw VmdkDescriptor.invalidArgument() }
        // bs->auto_backing_file holds PATH_MAX (4096) bytes with its NUL.
        guard end - start <= 4095 else { throw VmdkDescriptor.invalidArgument() }
        return String(decoding: text[start..<end], as: UTF8.self)
    }

    static func invalidArgument() -> InstarError { InstarError(.invalid, "Invalid argument", errno: EINVAL) }

    /// One line that parsed as an extent.
    struct ExtentLine {
        var access: String
        var sectors: Int64
        var type: String
        var fileName: String
        var flatOffset: Int64
    }

    /// vmdk_parse_extents' scan: the extent lines qemu accepts, or qemu's "Invalid extent line" error.
    func extentLines() throws -> [ExtentLine] {
        var out: [ExtentLine] = []
        var p = 0
        while p < text.count {
            let lineEnd = nextLine(p)
            defer { p = lineEnd }
            var s = Scanner(text, p)
            guard let access = s.word(max: 10) else { continue }
            guard let sectors = s.int64() else { continue }
            guard let type = s.word(max: 10) else { continue }
            s.skipSpace()
            guard s.literal(UInt8(ascii: "\"")) else { continue }
            guard let name = s.set(max: 511, excluding: [0x0A, 0x0D, 0x22]) else { continue }
            var matches = 4
            var flat: Int64 = -1
            if s.literal(UInt8(ascii: "\"")), let f = s.int64() { flat = f; matches = 5 }
            if access != "RW" { continue }
            if type == "FLAT" {
                if matches != 5 || flat < 0 { throw invalidLine(p, lineEnd) }
            } else if type == "VMFS" {
                if matches == 4 { flat = 0 } else { throw invalidLine(p, lineEnd) }
            } else if matches != 4 {
                throw invalidLine(p, lineEnd)
            }
            guard sectors > 0, ["FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"].contains(type) else { continue }
            if out.count >= VmdkDescriptor.maxExtents {
                throw InstarError(.invalid, "Too many extents in the VMDK descriptor", errno: EINVAL)
            }
            out.append(ExtentLine(access: access, sectors: sectors, type: type, fileName: name, flatOffset: flat))
        }
        return out
    }

    private func nextLine(_ p: Int) -> Int {
        var i = p
        while i < text.count {
            if text[i] == 0x0A { return i + 1 }
            i += 1
        }
        return i
    }

    private func invalidLine(_ p: Int, _ next: Int) -> InstarError {
        var end = next
        if end > p && text[end - 1] == 0x0A { end -= 1 }
        return InstarError(.invalid, "Invalid extent line: " + String(decoding: text[p..<end], as: UTF8.self),
                           errno: EINVAL)
    }

    /// A little of sscanf over the rest of the text (its whitespace skipping crosses lines, as sscanf's does).
    struct Scanner {
        let t: [UInt8]
        var i: Int
        init(_ t: [UInt8], _ i: Int) {
            self.t = t
            self.i = i
        }

        static func isSpace(_ c: UInt8) -> Bool { c == 0x20 || (c >= 0x09 && c <= 0x0D) }

        mutating func skipSpace() { while i < t.count && Scanner.isSpace(t[i]) { i += 1 } }

        /// %Ns
        mutating func word(max: Int) -> String? {
            skipSpace()
            let start = i
            while i < t.count && !Scanner.isSpace(t[i]) && i - start < max { i += 1 }
            return i > start ? String(decoding: t[start..<i], as: UTF8.self) : nil
        }

        /// %lld (strtoll: saturates on overflow).
        mutating func int64() -> Int64? {
            skipSpace()
            var j = i
            var negative = false
            if j < t.count && (t[j] == UInt8(ascii: "+") || t[j] == UInt8(ascii: "-")) {
                negative = t[j] == UInt8(ascii: "-")
                j += 1
            }
            let digitsStart = j
            var v: Int64 = 0
            var overflow = false
            while j < t.count && t[j] >= 0x30 && t[j] <= 0x39 {
                let d = Int64(t[j] - 0x30)
                let (m, o1) = v.multipliedReportingOverflow(by: 10)
                let (a, o2) = m.addingReportingOverflow(d)
                if o1 || o2 { overflow = true } else { v = a }
                j += 1
            }
            guard j > digitsStart else { return nil }
            i = j
            if overflow { return negative ? Int64.min : Int64.max }
            return negative ? -v : v
        }

        /// %x into a uint32 (strtoul's value taken modulo 2^32, as glibc's scanf stores it).
        mutating func hex32() -> UInt32? {
            skipSpace()
            var j = i
            var negative = false
            if j < t.count && (t[j] == UInt8(ascii: "+") || t[j] == UInt8(ascii: "-")) {
                negative = t[j] == UInt8(ascii: "-")
                j += 1
            }
            if j + 1 < t.count && t[j] == 0x30 && (t[j + 1] | 0x20) == UInt8(ascii: "x"),
               j + 2 < t.count, Scanner.hexDigit(t[j + 2]) != nil {
                j += 2
            }
            let start = j
            var v: UInt64 = 0
            var saturated = false
            while j < t.count, let d = Scanner.hexDigit(t[j]) {
                if v > (UInt64.max >> 4) { saturated = true } else { v = v << 4 | UInt64(d) }
                j += 1
            }
            guard j > start else { return nil }
            i = j
            if saturated { v = UInt64.max }
            if negative { v = 0 &- v }
            return UInt32(truncatingIfNeeded: v)
        }

        static func hexDigit(_ c: UInt8) -> UInt8? {
            switch c {
            case 0x30...0x39: return c - 0x30
            case 0x41...0x46: return c - 0x41 + 10
            case 0x61...0x66: return c - 0x61 + 10
            default: return nil
            }
        }

        mutating func literal(_ c: UInt8) -> Bool {
            guard i < t.count, t[i] == c else { return false }
            i += 1
            return true
        }

        /// %N[^...]
        mutating func set(max: Int, excluding: [UInt8]) -> String? {
            let start = i
            while i < t.count && !excluding.contains(t[i]) && i - start < max { i += 1 }
            return i > start ? String(decoding: t[start..<i], as: UTF8.self) : nil
        }
    }
}
