import Glibc

// The byte encoding of isolated mode's requests and results (docs/isolated.md). The parent reads what the helper
// sends as hostile input: every count is bounded by the bytes that remain, every read is bounds-checked, nesting
// is bounded, and any violation is an INSTAR_E_ISOLATION error.

/// Appends little-endian fixed-width values, strings and optionals.
struct WireWriter {
    var bytes: [UInt8] = []

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    mutating func str(_ s: String) {
        let utf8 = Array(s.utf8)
        u64(UInt64(utf8.count))
        bytes.append(contentsOf: utf8)
    }
    mutating func raw(_ b: [UInt8]) {
        u64(UInt64(b.count))
        bytes.append(contentsOf: b)
    }
    mutating func optStr(_ s: String?) {
        bool(s != nil)
        if let s { str(s) }
    }
    /// A string map (secrets by id), in key order.
    mutating func strMap(_ m: [String: String]) {
        u64(UInt64(m.count))
        for (k, v) in m.sorted(by: { $0.key < $1.key }) {
            str(k)
            str(v)
        }
    }
    mutating func optU64(_ v: UInt64?) {
        bool(v != nil)
        if let v { u64(v) }
    }
    mutating func optBool(_ v: Bool?) { u8(v == nil ? 2 : v == true ? 1 : 0) }

    mutating func qobject(_ o: QObject) {
        switch o {
        case let .dict(members):
            u8(0)
            u64(UInt64(members.count))
            for (k, v) in members {
                str(k)
                qobject(v)
            }
        case let .list(items):
            u8(1)
            u64(UInt64(items.count))
            for v in items { qobject(v) }
        case let .string(s): u8(2); str(s)
        case let .int(v): u8(3); i64(v)
        case let .uint(v): u8(4); u64(v)
        case let .double(d): u8(5); u64(d.bitPattern)
        case let .bool(b): u8(6); bool(b)
        case .null: u8(7)
        }
    }

    mutating func error(_ e: InstarError) {
        u32(UInt32(bitPattern: e.code.rawValue))
        u32(UInt32(bitPattern: e.errnoValue))
        str(e.message)
    }
}

/// Reads what WireWriter wrote, refusing anything malformed.
struct WireReader {
    let bytes: [UInt8]
    var pos = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    static func malformed() -> InstarError {
        InstarError(.isolation, "The isolated helper sent a malformed result")
    }

    var remaining: Int { bytes.count - pos }

    mutating func take(_ n: Int) throws -> ArraySlice<UInt8> {
        guard n >= 0, n <= remaining else { throw WireReader.malformed() }
        defer { pos += n }
        return bytes[pos..<(pos + n)]
    }

    mutating func u8() throws -> UInt8 {
        guard let b = try take(1).first else { throw WireReader.malformed() }
        return b
    }
    mutating func bool() throws -> Bool {
        switch try u8() {
        case 0: return false
        case 1: return true
        default: throw WireReader.malformed()
        }
    }
    mutating func u32() throws -> UInt32 {
        var v: UInt32 = 0
        for (i, b) in try take(4).enumerated() { v |= UInt32(b) << (8 * UInt32(i)) }
        return v
    }
    mutating func u64() throws -> UInt64 {
        var v: UInt64 = 0
        for (i, b) in try take(8).enumerated() { v |= UInt64(b) << (8 * UInt64(i)) }
        return v
    }
    mutating func i64() throws -> Int64 { Int64(bitPattern: try u64()) }
    /// A count of items each at least `minSize` bytes long, bounded by what remains.
    mutating func count(minSize: Int) throws -> Int {
        let n = try u64()
        guard n <= UInt64(remaining / max(1, minSize)) else { throw WireReader.malformed() }
        return Int(n)
    }
    mutating func str() throws -> String {
        let n = try count(minSize: 1)
        return String(decoding: try take(n), as: UTF8.self)
    }
    mutating func raw() throws -> [UInt8] {
        let n = try count(minSize: 1)
        return Array(try take(n))
    }
    mutating func optStr() throws -> String? { try bool() ? try str() : nil }
    mutating func strMap() throws -> [String: String] {
        let n = try count(minSize: 16)
        var m: [String: String] = [:]
        for _ in 0..<n {
            let k = try str()
            m[k] = try str()
        }
        return m
    }
    mutating func optU64() throws -> UInt64? { try bool() ? try u64() : nil }
    mutating func optBool() throws -> Bool? {
        switch try u8() {
        case 0: return false
        case 1: return true
        case 2: return nil
        default: throw WireReader.malformed()
        }
    }

    mutating func qobject(depth: Int = 0) throws -> QObject {
        guard depth < 256 else { throw WireReader.malformed() }
        switch try u8() {
        case 0:
            let n = try count(minSize: 9)
            var m: [(String, QObject)] = []
            m.reserveCapacity(n)
            for _ in 0..<n { m.append((try str(), try qobject(depth: depth + 1))) }
            return .dict(m)
        case 1:
            let n = try count(minSize: 1)
            var items: [QObject] = []
            items.reserveCapacity(n)
            for _ in 0..<n { items.append(try qobject(depth: depth + 1)) }
            return .list(items)
        case 2: return .string(try str())
        case 3: return .int(try i64())
        case 4: return .uint(try u64())
        case 5: return .double(Double(bitPattern: try u64()))
        case 6: return .bool(try bool())
        case 7: return .null
        default: throw WireReader.malformed()
        }
    }

    mutating func error() throws -> InstarError {
        let raw = Int32(bitPattern: try u32())
        let errnoValue = Int32(bitPattern: try u32())
        let message = try str()
        guard let code = InstarError.Code(rawValue: raw) else { throw WireReader.malformed() }
        return InstarError(code, message, errno: errnoValue)
    }

    func finish() throws {
        guard remaining == 0 else { throw WireReader.malformed() }
    }
}

// MARK: - the results that cross back

extension ImageInfo {
    /// Every member, as it was on the helper's side.
    init(filename: String, format: String, virtualSize: UInt64) {
        self.filename = filename
        self.format = format
        self.virtualSize = virtualSize
        self.snapshots = []
    }

    func encode(_ w: inout WireWriter) {
        w.str(filename)
        w.str(format)
        w.optBool(dirtyFlag)
        w.optU64(actualSize)
        w.u64(virtualSize)
        w.optU64(clusterSize)
        w.optBool(encrypted)
        w.optStr(backingFilename)
        w.optStr(fullBackingFilename)
        w.optStr(backingFilenameFormat)
        w.u64(UInt64(snapshots.count))
        for s in snapshots {
            w.str(s.id)
            w.str(s.name)
            w.raw(s.nameBytes)
            w.u64(s.vmStateSize)
            w.u32(s.dateSec)
            w.u32(s.dateNsec)
            w.u64(s.vmClockNsec)
            w.optU64(s.icount)
        }
        w.bool(formatSpecific != nil)
        if let f = formatSpecific { w.qobject(f) }
    }

    static func decode(_ r: inout WireReader) throws -> ImageInfo {
        let filename = try r.str()
        let format = try r.str()
        let dirty = try r.optBool()
        let actual = try r.optU64()
        var info = ImageInfo(filename: filename, format: format, virtualSize: 0)
        info.dirtyFlag = dirty
        info.actualSize = actual
        info.virtualSize = try r.u64()
        info.clusterSize = try r.optU64()
        info.encrypted = try r.optBool()
        info.backingFilename = try r.optStr()
        info.fullBackingFilename = try r.optStr()
        info.backingFilenameFormat = try r.optStr()
        let n = try r.count(minSize: 40)
        for _ in 0..<n {
            let id = try r.str()
            let name = try r.str()
            let nameBytes = try r.raw()
            let vmState = try r.u64()
            let sec = try r.u32()
            let nsec = try r.u32()
            let clock = try r.u64()
            let icount = try r.optU64()
            info.snapshots.append(SnapshotInfo(id: id, name: name, vmStateSize: vmState, dateSec: sec, dateNsec: nsec,
                                               vmClockNsec: clock, icount: icount, nameBytes: nameBytes))
        }
        if try r.bool() { info.formatSpecific = try r.qobject() }
        return info
    }
}

extension MapEntry {
    func encode(_ w: inout WireWriter) {
        w.u64(start)
        w.u64(length)
        w.i64(Int64(depth))
        w.u8((present ? 1 : 0) | (zero ? 2 : 0) | (data ? 4 : 0))
        w.optU64(offset)
        w.optStr(filename)
    }

    static func decode(_ r: inout WireReader) throws -> MapEntry {
        let start = try r.u64()
        let length = try r.u64()
        let depth = try r.i64()
        let bits = try r.u8()
        guard bits < 8, let d = Int(exactly: depth) else { throw WireReader.malformed() }
        return MapEntry(start: start, length: length, depth: d, present: bits & 1 != 0, zero: bits & 2 != 0,
                        data: bits & 4 != 0, offset: try r.optU64(), filename: try r.optStr())
    }
}

extension CheckResult {
    func encode(_ w: inout WireWriter) {
        for v in [corruptions, leaks, checkErrors, corruptionsFixed, leaksFixed, imageEndOffset, totalClusters,
                  allocatedClusters, fragmentedClusters, compressedClusters] {
            w.i64(v)
        }
    }

    static func decode(_ r: inout WireReader) throws -> CheckResult {
        var c = CheckResult()
        c.corruptions = try r.i64()
        c.leaks = try r.i64()
        c.checkErrors = try r.i64()
        c.corruptionsFixed = try r.i64()
        c.leaksFixed = try r.i64()
        c.imageEndOffset = try r.i64()
        c.totalClusters = try r.i64()
        c.allocatedClusters = try r.i64()
        c.fragmentedClusters = try r.i64()
        c.compressedClusters = try r.i64()
        return c
    }
}

extension ImageOpenOptions {
    /// The members an isolated read-only open uses.
    func encodeIsolated(_ w: inout WireWriter) {
        w.bool(forceShare)
        w.bool(direct)
        w.optStr(keySecret)
        w.strMap(secrets)
        w.optStr(backingKeySecret)
    }

    static func decodeIsolated(_ r: inout WireReader) throws -> ImageOpenOptions {
        var o = ImageOpenOptions()
        o.forceShare = try r.bool()
        o.direct = try r.bool()
        o.keySecret = try r.optStr()
        o.secrets = try r.strMap()
        o.backingKeySecret = try r.optStr()
        return o
    }
}
