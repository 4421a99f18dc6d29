/// `qemu-img map`: the allocation of an image's guest range through its backing chain, as merged entries.

/// One entry of `qemu-img map` (qemu's MapEntry).
public struct MapEntry: Equatable {
    public var start: UInt64
    public var length: UInt64
    public var depth: Int
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    /// The host offset, when known.
    public var offset: UInt64?
    /// The host file holding `offset`.
    public var filename: String?

    public init(start: UInt64, length: UInt64, depth: Int, present: Bool, zero: Bool, data: Bool,
                offset: UInt64?, filename: String?) {
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.filename = filename
    }

    /// The JSON object `qemu-img map --output=json` prints for the entry (without separators).
    public var json: String {
        var s = "{ \"start\": \(start), \"length\": \(length), \"depth\": \(depth), \"present\": \(present), "
            + "\"zero\": \(zero), \"data\": \(data)"
        // qemu prints the offset as a signed 64-bit number (a wrapped host offset reads negative).
        if let o = offset { s += ", \"offset\": \(Int64(bitPattern: o))" }
        return s + "}"
    }

    /// Whether `next` continues this entry (qemu's entry_mergeable).
    func canMerge(_ next: MapEntry) -> Bool {
        if length == 0 { return false }
        if zero != next.zero || data != next.data || depth != next.depth || present != next.present
            || filename != next.filename || (offset == nil) != (next.offset == nil) {
            return false
        }
        if let o = offset, let n = next.offset, o &+ length != n { return false }
        return true
    }
}

public enum MapOperation {
    /// qemu-img map probes at most 1 GiB per query.
    static let probeLimit: UInt64 = 1 << 30
    /// The largest query the map walk grows to.
    static let maxProbe: UInt64 = 1 << 62

    /// Walks `[start, start + maxLength)` (clamped to the image) and hands each merged entry to `emit`, with
    /// whether another entry follows. With `humanCoalescing`, ranges without plain data are treated alike after
    /// the first entry, as the human output does, so they merge. `emit` may throw to stop the walk.
    public static func walk(_ image: ImageLayer, start: UInt64, maxLength: UInt64?, humanCoalescing: Bool,
                            emit: (MapEntry, Bool) throws -> Void) throws {
        var length = image.virtualSize
        if let m = maxLength {
            let (end, overflow) = start.addingReportingOverflow(m)
            length = min(overflow ? UInt64.max : end, length)
        }
        var curr = MapEntry(start: start, length: 0, depth: 0, present: false, zero: false, data: false,
                            offset: nil, filename: nil)
        // The probe grows while each answer covers all of it: a header can declare exabytes (parallels, nbd), and
        // 1 GiB steps would walk such an image for hours. Entries merge, so the output is the same.
        var probe = probeLimit
        while curr.start &+ curr.length < length {
            let offset = curr.start + curr.length
            let n = min(probe, length - offset)
            let s: ChainBlockStatus
            do {
                s = try ChainStatus.mapStatus(image, at: offset, length: n)
            } catch let e as InstarError {
                // qemu prints the errno's text (a qcow2 corruption event has printed its own line before).
                let why = e.errnoValue != 0 ? strerrorString(e.errnoValue) : e.message
                throw InstarError(e.code, "Could not read file metadata: \(why)", errno: e.errnoValue)
            }
            probe = s.length >= n ? min(probe << 1, maxProbe) : probeLimit
            var next = MapEntry(start: offset, length: s.length, depth: s.depth, present: s.allocated, zero: s.zero,
                                data: s.data, offset: s.hostOffset, filename: s.hostOffset == nil ? nil : s.hostFile)
            if curr.canMerge(next) {
                curr.length += next.length
                continue
            }
            if curr.length > 0 {
                try emit(curr, true)
                if humanCoalescing && (!next.data || next.zero) {
                    next.data = false
                    next.zero = true
                }
            }
            curr = next
        }
        try emit(curr, false)
    }

    /// Every entry `qemu-img map --output=json` prints.
    public static func entries(_ image: ImageLayer, start: UInt64 = 0, maxLength: UInt64? = nil) throws -> [MapEntry] {
        var out: [MapEntry] = []
        try walk(image, start: start, maxLength: maxLength, humanCoalescing: false) { e, _ in out.append(e) }
        return out
    }
}
