/// The in-memory reference count table a qcow2 check builds (qemu's "IMRT"): one packed entry per host cluster,
/// laid out exactly like the concatenation of all refcount blocks (so a slice of it can be written to disk as a
/// refblock when the refcount structure is rebuilt).
struct Qcow2RefcountArray {
    /// log2 of the entry width in bits (0..6).
    let order: UInt64
    let clusterSize: Int
    private(set) var bytes: [UInt8] = []
    /// Entries the array covers.
    private(set) var count: Int = 0

    /// An upper bound on the memory a check may take for the array; past it qemu's allocation would be what
    /// fails (ENOMEM), and so does ours.
    static let maxBytes = 1 << 30

    init(order: UInt64, clusterSize: Int) {
        self.order = order
        self.clusterSize = clusterSize
    }

    /// The largest value an entry holds.
    var maxValue: UInt64 { order >= 6 ? UInt64.max : (UInt64(1) << (UInt64(1) << order)) - 1 }

    /// Bytes holding `entries` entries, rounded up to whole clusters (qemu's realloc_refcount_array).
    private func byteSize(_ entries: Int) -> Int? {
        guard entries >= 0, entries < 1 << 40 else { return nil }
        let raw = (entries << Int(order) + 7) / 8
        let clusters = (raw + clusterSize - 1) / clusterSize
        return clusters * clusterSize
    }

    /// Grows (or shrinks the logical size of) the array to `entries`; new entries are zero. Throws ENOMEM where
    /// the memory bound is exceeded.
    mutating func resize(to entries: Int) throws {
        guard let newBytes = byteSize(entries), newBytes <= Qcow2RefcountArray.maxBytes else {
            throw Qcow2CheckAbort(errno: 12 /* ENOMEM */)
        }
        if newBytes > bytes.count {
            try CallBudget.reserve(newBytes - bytes.count, what: "the refcounts the check computes")
            bytes.append(contentsOf: repeatElement(0, count: newBytes - bytes.count))
        } else if newBytes < bytes.count {
            CallBudget.release(bytes.count - newBytes)
            bytes.removeSubrange(newBytes...)
        }
        count = entries
    }

    /// Sets every entry to zero, keeping the size.
    mutating func clear() {
        for i in bytes.indices { bytes[i] = 0 }
    }

    func get(_ index: Int) -> UInt64 {
        guard index >= 0, index < count else { return 0 }
        return Qcow2RefcountArray.entry(bytes, index: index, order: order)
    }

    mutating func set(_ index: Int, _ value: UInt64) {
        guard index >= 0, index < count else { return }
        Qcow2RefcountArray.setEntry(&bytes, index: index, order: order, value: value)
    }

    /// Entry `index` of packed refcounts (sub-byte widths fill each byte from its least significant bit,
    /// wider ones are big-endian), as qemu's get_refcount_ro* read them.
    static func entry(_ bytes: [UInt8], index: Int, order: UInt64) -> UInt64 {
        let width = 1 << Int(order)
        if width < 8 {
            let perByte = 8 / width
            let byte = index / perByte
            guard byte >= 0, byte < bytes.count else { return 0 }
            let shift = (index % perByte) * width
            return UInt64((Int(bytes[byte]) >> shift) & ((1 << width) - 1))
        }
        let n = width / 8
        let start = index * n
        guard start >= 0, start + n <= bytes.count else { return 0 }
        var v: UInt64 = 0
        for i in 0..<n { v = v << 8 | UInt64(bytes[start + i]) }
        return v
    }

    /// Stores `value` (already within the width) at entry `index`.
    static func setEntry(_ bytes: inout [UInt8], index: Int, order: UInt64, value: UInt64) {
        let width = 1 << Int(order)
        if width < 8 {
            let perByte = 8 / width
            let byte = index / perByte
            guard byte >= 0, byte < bytes.count else { return }
            let shift = (index % perByte) * width
            let mask = ((1 << width) - 1) << shift
            let old = Int(bytes[byte])
            bytes[byte] = UInt8(truncatingIfNeeded: (old & ~mask) | ((Int(value) << shift) & mask))
            return
        }
        let n = width / 8
        let start = index * n
        guard start >= 0, start + n <= bytes.count else { return }
        for i in 0..<n {
            bytes[start + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (n - 1 - i)))
        }
    }
}

/// Stops a check the way a negative return stops qemu's: the errno qemu-img then reports.
struct Qcow2CheckAbort: Error {
    var errno: Int32
}
