/// QEMU's JSON dialect, as `json:` filenames are parsed (qobject_from_json): RFC 8259 plus single-quoted strings
/// and the `\'` escape, read the way qemu's lexer, streamer and parser read it, so what qemu accepts is accepted
/// and what it refuses is refused with its message ("JSON parse error, stray '01'", "Expecting at most one JSON
/// value", ...). Bounded: input length, token count and nesting depth are capped (nesting as qemu caps it) so
/// hostile strings (for example a backing name stored in an image) cannot exhaust memory or the stack.
public enum JSONParser {
    public static let maxLength = 1 << 20
    /// qemu's MAX_NESTING: brackets and braces open at once.
    public static let maxDepth = 1 << 10

    /// Parses `text`; errors carry qemu's message (without the "Could not parse the JSON options: " prefix).
    public static func parse(_ text: String) throws -> QObject {
        var bytes = Array(text.utf8)
        guard bytes.count <= maxLength else { throw InstarError.invalid("JSON token size limit exceeded") }
        // qemu reads the name as a C string.
        if let nul = bytes.firstIndex(of: 0) { bytes.removeSubrange(nul...) }
        var stream = Stream()
        var lexer = Lexer()
        for b in bytes { lexer.feed(b, into: &stream) }
        lexer.flush(into: &stream)
        if let e = stream.error { throw InstarError.invalid(e) }
        guard let v = stream.result else { throw InstarError.invalid("Expecting a JSON value") }
        return v
    }

    enum TokenKind { case lcurly, rcurly, lsquare, rsquare, colon, comma, integer, float, keyword, string }

    struct Token {
        var kind: TokenKind
        var text: [UInt8]
    }

    /// The lexer's states (json-lexer.c); a token ends when a byte does not continue it.
    enum State { case start, recovery, dqString, dqEscape, sqString, sqEscape, zero, expDigits, expSign, expE,
                      mantissa, mantissaDigits, digits, sign, keyword }

    /// What a byte does in a state: continue the token in a new state, end it before the byte (the byte is then
    /// read again from the start state), end it including the byte, or make it an error (the byte included).
    enum Step {
        case to(State)
        case endBefore(TokenKind)
        case endWith(TokenKind)
        case skip
        case error
    }

    struct Lexer {
        var state = State.start
        var token: [UInt8] = []

        static func isLower(_ c: UInt8) -> Bool { c >= 0x61 && c <= 0x7a }
        static func isDigit(_ c: UInt8) -> Bool { c >= 0x30 && c <= 0x39 }

        /// The transition table; `c` nil is the end of input.
        static func step(_ s: State, _ c: UInt8?) -> Step {
            let ch = c ?? 0
            switch s {
            case .start:
                guard let c else { return .skip }
                switch c {
                case UInt8(ascii: "\""): return .to(.dqString)
                case UInt8(ascii: "'"): return .to(.sqString)
                case UInt8(ascii: "0"): return .to(.zero)
                case UInt8(ascii: "1")...UInt8(ascii: "9"): return .to(.digits)
                case UInt8(ascii: "-"): return .to(.sign)
                case UInt8(ascii: "{"): return .endWith(.lcurly)
                case UInt8(ascii: "}"): return .endWith(.rcurly)
                case UInt8(ascii: "["): return .endWith(.lsquare)
                case UInt8(ascii: "]"): return .endWith(.rsquare)
                case UInt8(ascii: ","): return .endWith(.comma)
                case UInt8(ascii: ":"): return .endWith(.colon)
                case 0x20, 0x09, 0x0d, 0x0a: return .skip
                default: return isLower(c) ? .to(.keyword) : .error
                }
            case .recovery:
                return .skip  // handled by the caller
            case .dqString, .sqString:
                let quote = s == .dqString ? UInt8(ascii: "\"") : UInt8(ascii: "'")
                if ch == quote { return .endWith(.string) }
                if ch == UInt8(ascii: "\\") { return .to(s == .dqString ? .dqEscape : .sqEscape) }
                return ch >= 0x20 && ch <= 0xfd ? .to(s) : .error
            case .dqEscape, .sqEscape:
                return ch >= 0x20 && ch <= 0xfd ? .to(s == .dqEscape ? .dqString : .sqString) : .error
            case .zero:
                if isDigit(ch) && c != nil { return .error }
                if ch == UInt8(ascii: ".") { return .to(.mantissa) }
                return .endBefore(.integer)
            case .expDigits:
                return isDigit(ch) && c != nil ? .to(.expDigits) : .endBefore(.float)
            case .expSign:
                return isDigit(ch) && c != nil ? .to(.expDigits) : .error
            case .expE:
                if ch == UInt8(ascii: "-") || ch == UInt8(ascii: "+") { return .to(.expSign) }
                return isDigit(ch) && c != nil ? .to(.expDigits) : .error
            case .mantissaDigits:
                if isDigit(ch) && c != nil { return .to(.mantissaDigits) }
                if ch == UInt8(ascii: "e") || ch == UInt8(ascii: "E") { return .to(.expE) }
                return .endBefore(.float)
            case .mantissa:
                return isDigit(ch) && c != nil ? .to(.mantissaDigits) : .error
            case .digits:
                if isDigit(ch) && c != nil { return .to(.digits) }
                if ch == UInt8(ascii: "e") || ch == UInt8(ascii: "E") { return .to(.expE) }
                if ch == UInt8(ascii: ".") { return .to(.mantissa) }
                return .endBefore(.integer)
            case .sign:
                if ch == UInt8(ascii: "0") { return .to(.zero) }
                return isDigit(ch) && c != nil ? .to(.digits) : .error
            case .keyword:
                return isLower(ch) ? .to(.keyword) : .endBefore(.keyword)
            }
        }

        /// Error recovery skips bytes up to a structural character, a control character other than tab, or
        /// the impossible bytes 0xFE and 0xFF; that byte is then read from the start state.
        static func endsRecovery(_ c: UInt8) -> Bool {
            if c == 0x09 { return false }
            return c < 0x20 || c >= 0xfe || "[]{}:,".utf8.contains(c)
        }

        mutating func feed(_ c: UInt8, into stream: inout Stream) {
            while true {
                if state == .recovery {
                    if !Lexer.endsRecovery(c) { return }
                    state = .start
                }
                switch Lexer.step(state, c) {
                case let .to(next):
                    token.append(c)
                    state = next
                    return
                case .skip:
                    return
                case let .endWith(kind):
                    token.append(c)
                    stream.take(Token(kind: kind, text: token))
                    token = []
                    state = .start
                    return
                case let .endBefore(kind):
                    stream.take(Token(kind: kind, text: token))
                    token = []
                    state = .start
                    // the byte is read again from the start state
                case .error:
                    token.append(c)
                    stream.fail("JSON parse error, stray '\(String(decoding: token, as: UTF8.self))'")
                    token = []
                    state = .recovery
                    return
                }
            }
        }

        mutating func flush(into stream: inout Stream) {
            if state == .start || state == .recovery {
                state = .start
                token = []
            } else {
                switch Lexer.step(state, nil) {
                case let .endBefore(kind), let .endWith(kind):
                    stream.take(Token(kind: kind, text: token))
                default:
                    stream.fail("JSON parse error, stray '\(String(decoding: token, as: UTF8.self))'")
                }
                token = []
                state = .start
            }
            stream.endOfInput()
        }
    }

    /// json-streamer.c and qjson.c's consume_json: tokens gather until brackets balance, then one value is
    /// parsed; a second value or an error after a value makes the whole input an error; the first error wins.
    struct Stream {
        var tokens: [Token] = []
        var braces = 0
        var brackets = 0
        var result: QObject?
        var error: String?
        static let maxTokens = 1 << 20

        mutating func emit(_ value: QObject?, _ err: String?) {
            tokens = []
            braces = 0
            brackets = 0
            if result != nil {
                result = nil
                error = "Expecting at most one JSON value"
            }
            if error != nil { return }
            result = value
            error = err
        }

        mutating func fail(_ message: String) { emit(nil, message) }

        mutating func take(_ token: Token) {
            switch token.kind {
            case .lcurly: braces += 1
            case .rcurly: braces -= 1
            case .lsquare: brackets += 1
            case .rsquare: brackets -= 1
            default: break
            }
            if tokens.count + 1 > Stream.maxTokens { return fail("JSON token count limit exceeded") }
            if braces + brackets > JSONParser.maxDepth { return fail("JSON nesting depth limit exceeded") }
            tokens.append(token)
            if (braces > 0 || brackets > 0) && braces >= 0 && brackets >= 0 { return }
            var p = Parser(tokens: tokens)
            let v = p.value()
            emit(v, p.error)
        }

        mutating func endOfInput() {
            if tokens.isEmpty { return }
            var p = Parser(tokens: tokens)
            let v = p.value()
            emit(v, p.error)
        }
    }

    /// json-parser.c: a value from a balanced run of tokens, with qemu's messages.
    struct Parser {
        let tokens: [Token]
        var pos = 0
        var error: String?

        init(tokens: [Token]) { self.tokens = tokens }

        mutating func fail(_ message: String) {
            if error == nil { error = "JSON parse error, " + message }
        }

        func peek() -> Token? { pos < tokens.count ? tokens[pos] : nil }

        mutating func pop() -> Token? {
            guard pos < tokens.count else { return nil }
            pos += 1
            return tokens[pos - 1]
        }

        mutating func value() -> QObject? {
            guard let t = peek() else { fail("premature EOI"); return nil }
            switch t.kind {
            case .lcurly: return object()
            case .lsquare: return array()
            case .integer, .float, .string: return literal()
            case .keyword:
                _ = pop()
                switch t.text {
                case Array("true".utf8): return .bool(true)
                case Array("false".utf8): return .bool(false)
                case Array("null".utf8): return .null
                default:
                    fail("invalid keyword '\(String(decoding: t.text, as: UTF8.self))'")
                    return nil
                }
            default:
                fail("expecting value")
                return nil
            }
        }

        mutating func pair(into members: inout [(String, QObject)]) -> Bool {
            guard peek() != nil else { fail("premature EOI"); return false }
            guard case let .string(key)? = value() else { fail("key is not a string in object"); return false }
            guard let colon = pop() else { fail("premature EOI"); return false }
            guard colon.kind == .colon else { fail("missing : in object pair"); return false }
            guard let v = value() else { fail("Missing value in dict"); return false }
            if members.contains(where: { $0.0 == key }) { fail("duplicate key"); return false }
            members.append((key, v))
            return true
        }

        mutating func object() -> QObject? {
            _ = pop()
            var members: [(String, QObject)] = []
            guard let first = peek() else { fail("premature EOI"); return nil }
            if first.kind == .rcurly { _ = pop(); return .dict(members) }
            guard pair(into: &members) else { return nil }
            while true {
                guard let t = pop() else { fail("premature EOI"); return nil }
                if t.kind == .rcurly { return .dict(members) }
                guard t.kind == .comma else { fail("expected separator in dict"); return nil }
                guard pair(into: &members) else { return nil }
            }
        }

        mutating func array() -> QObject? {
            _ = pop()
            var items: [QObject] = []
            guard let first = peek() else { fail("premature EOI"); return nil }
            if first.kind == .rsquare { _ = pop(); return .list(items) }
            guard let v = value() else { fail("expecting value"); return nil }
            items.append(v)
            while true {
                guard let t = pop() else { fail("premature EOI"); return nil }
                if t.kind == .rsquare { return .list(items) }
                guard t.kind == .comma else { fail("expected separator in list"); return nil }
                guard let v = value() else { fail("expecting value"); return nil }
                items.append(v)
            }
        }

        mutating func literal() -> QObject? {
            guard let t = pop() else { fail("premature EOI"); return nil }
            let text = String(decoding: t.text, as: UTF8.self)
            switch t.kind {
            case .string:
                guard let s = decodeString(t.text) else { return nil }
                return .string(s)
            case .integer:
                if let i = Int64(text) { return .int(i) }
                if !text.hasPrefix("-"), let u = UInt64(text) { return .uint(u) }
                return .double(Double(text) ?? 0)
            default:
                return .double(Double(text) ?? 0)
            }
        }

        /// Four hex digits at `i`, or nil (qemu's cvt4hex stops at the first that is not one).
        static func hex4(_ b: [UInt8], _ i: Int) -> Int? {
            var v = 0
            for k in 0..<4 {
                guard i + k < b.count, let d = Int(String(UnicodeScalar(b[i + k])), radix: 16) else { return nil }
                v = v << 4 | d
            }
            return v
        }

        static func validCodePoint(_ cp: Int) -> Bool {
            if cp < 0 || cp > 0x10FFFF { return false }
            if (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE { return false }
            return !(cp >= 0xD800 && cp <= 0xDFFF)
        }

        /// qemu's modified UTF-8: U+0000 as C0 80.
        static func encode(_ cp: Int, into out: inout [UInt8]) {
            if cp > 0 && cp <= 0x7F {
                out.append(UInt8(cp))
            } else if cp <= 0x7FF {
                out += [UInt8(0xC0 | (cp >> 6) & 0x1F), UInt8(0x80 | cp & 0x3F)]
            } else if cp <= 0xFFFF {
                out += [UInt8(0xE0 | (cp >> 12) & 0x0F), UInt8(0x80 | (cp >> 6) & 0x3F), UInt8(0x80 | cp & 0x3F)]
            } else {
                out += [UInt8(0xF0 | (cp >> 18) & 0x07), UInt8(0x80 | (cp >> 12) & 0x3F),
                        UInt8(0x80 | (cp >> 6) & 0x3F), UInt8(0x80 | cp & 0x3F)]
            }
        }

        /// One modified-UTF-8 character at `i`: its code point (or -1) and the index after it.
        static func codePoint(_ b: [UInt8], _ i: Int) -> (Int, Int) {
            let byte = Int(b[i])
            if byte < 0x80 { return (byte, i + 1) }
            if byte >= 0xFE || byte & 0x40 == 0 { return (-1, i + 1) }
            var len = 0
            var mask = 0x80
            while byte & mask != 0 { len += 1; mask >>= 1 }
            var cp = byte & (mask - 1)
            var p = i + 1
            for _ in 1..<len {
                let next = p < b.count ? Int(b[p]) : 0
                if next & 0xC0 != 0x80 { return (-1, p) }
                p += 1
                cp = cp << 6 | next & 0x3F
            }
            let minimum = [0x80, 0x800, 0x10000, 0x200000, 0x4000000]
            if !validCodePoint(cp) { return (-1, p) }
            if len >= 2, len - 2 < minimum.count, cp < minimum[len - 2], !(cp == 0 && len == 2) { return (-1, p) }
            return (cp, p)
        }

        mutating func decodeString(_ b: [UInt8]) -> String? {
            let quote = b[0]
            var out: [UInt8] = []
            var i = 1
            while i < b.count, b[i] != quote {
                if b[i] == UInt8(ascii: "\\") {
                    let begin = i
                    i += 1
                    let e = i < b.count ? b[i] : 0
                    i += 1
                    switch e {
                    case UInt8(ascii: "\""), UInt8(ascii: "'"), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                    case UInt8(ascii: "b"): out.append(0x08)
                    case UInt8(ascii: "f"): out.append(0x0c)
                    case UInt8(ascii: "n"): out.append(0x0a)
                    case UInt8(ascii: "r"): out.append(0x0d)
                    case UInt8(ascii: "t"): out.append(0x09)
                    case UInt8(ascii: "u"):
                        var cp = Parser.hex4(b, i) ?? -1
                        i += 4
                        if cp >= 0xD800 && cp <= 0xDBFF && i + 1 < b.count && b[i] == UInt8(ascii: "\\")
                            && b[i + 1] == UInt8(ascii: "u") {
                            cp = 0x10000 + ((cp & 0x3FF) << 10)
                            if let trailing = Parser.hex4(b, i + 2), trailing >= 0xDC00 && trailing <= 0xDFFF {
                                cp |= trailing & 0x3FF
                                i += 6
                            } else {
                                cp = -1
                            }
                        }
                        guard Parser.validCodePoint(cp) else {
                            // qemu prints the escape as far as the token goes.
                            let shown = b[begin..<min(i, b.count)]
                            fail("\(String(decoding: shown, as: UTF8.self)) is not a valid Unicode character")
                            return nil
                        }
                        Parser.encode(cp, into: &out)
                    default:
                        fail("invalid escape sequence in string")
                        return nil
                    }
                } else {
                    let (cp, next) = Parser.codePoint(b, i)
                    guard cp >= 0 else { fail("invalid UTF-8 sequence in string"); return nil }
                    Parser.encode(cp, into: &out)
                    i = next
                }
            }
            return String(decoding: out, as: UTF8.self)
        }
    }
}
