/// A QEMU QObject value: what qemu-img serialises to JSON and walks for human output. Dictionaries keep the
/// order in which members were inserted (the QAPI declaration order); `QJSON` applies QEMU's QDict hash order
/// when printing.
public indirect enum QObject: Equatable {
    case dict([(String, QObject)])
    case list([QObject])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case bool(Bool)
    case null

    public static func == (a: QObject, b: QObject) -> Bool {
        switch (a, b) {
        case let (.dict(x), .dict(y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        case let (.list(x), .list(y)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.int(x), .int(y)): return x == y
        case let (.uint(x), .uint(y)): return x == y
        case let (.double(x), .double(y)): return x == y
        case let (.bool(x), .bool(y)): return x == y
        case (.null, .null): return true
        default: return false
        }
    }

    /// The member `key` of a dictionary, or nil.
    public subscript(key: String) -> QObject? {
        if case let .dict(members) = self { return members.first { $0.0 == key }?.1 }
        return nil
    }

    public var stringValue: String? { if case let .string(s) = self { return s }; return nil }
    public var boolValue: Bool? { if case let .bool(b) = self { return b }; return nil }
    public var int64Value: Int64? {
        switch self {
        case let .int(v): return v
        case let .uint(v): return v <= UInt64(Int64.max) ? Int64(v) : nil
        case let .double(d): return d.rounded() == d && abs(d) < 9.2e18 ? Int64(d) : nil
        case let .string(s): return Int64(s)
        default: return nil
        }
    }
}
