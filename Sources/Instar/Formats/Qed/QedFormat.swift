import Glibc

/// QED, the QEMU Enhanced Disk format: a header, an L1 table and L2 tables of cluster offsets (0: unallocated,
/// 1: reads as zeroes), data clusters appended at the end of the file. The open sequence, messages, allocation
/// order and the need-check flag follow qemu 7.2's block/qed*.c.
public final class QedFormat: ImageFormat {
    public static let descriptor = FormatDescriptor(
        name: "qed",
        probe: { header, _ in
            // bdrv_qed_probe: the magic in a header of at least 64 bytes.
            guard header.count >= QedHeader.size, let m = try? ByteReader(header).u32le(at: 0),
                  m == QedHeader.magic else { return 0 }
            return 100
        },
        open: { try QedFormat(request: $0) })
        // qemu's driver has no options of its own: any fails the open, after the backing chain.
        .knowing { _ in false }

    /// How one guest range maps (qemu's QED_CLUSTER_*).
    enum Kind { case found, zero, missingL2, missingL1 }

    public let formatName = "qed"
    let file: HostFile
    let writable: Bool
    var header: QedHeader
    /// The file length rounded down to a cluster: where the next clusters go (qemu's s->file_size).
    var fileSize: UInt64
    var l1: [UInt64]
    let tableEntries: UInt64
    let l2Shift: UInt64
    let l1Shift: UInt64
    var cache: [UInt64: [UInt64]] = [:]
    var cacheOrder: [UInt64] = []
    let cacheLimit: Int
    public internal(set) var backingReference: BackingReference?
    /// Whether a backing file was opened under the image (qemu's bs->backing), known from the first I/O.
    var cs: UInt64 { UInt64(header.clusterSize) }
    var tableBytes: UInt64 { UInt64(header.clusterSize) * UInt64(header.tableSize) }

    public var hostFiles: [HostFile] { [file] }
    public var virtualSize: UInt64 { header.imageSize }

    init(request: OpenRequest) throws {
        let f = request.file
        file = f
        writable = request.writable
        var raw = [UInt8](repeating: 0, count: QedHeader.size)
        do {
            try raw.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: 0) }
        } catch let e as InstarError {
            throw InstarError(e.code, "Failed to read QED header", errno: e.errnoValue)
        }
        var h = try QedHeader(bytes: raw)
        guard h.magic == QedHeader.magic else { throw InstarError(.invalid, "Image not in QED format", errno: EINVAL) }
        if h.features & ~QedHeader.knownFeatures != 0 {
            throw InstarError(.unsupported, "Unsupported QED features: "
                              + String(h.features & ~QedHeader.knownFeatures, radix: 16), errno: ENOTSUP)
        }
        guard QedHeader.clusterSizeValid(h.clusterSize) else {
            throw InstarError(.invalid, "QED cluster size is invalid", errno: EINVAL)
        }
        let clusterSize = UInt64(h.clusterSize)
        // bdrv_getlength counts whole sectors; qed rounds that down to a cluster.
        let length = try f.size().alignedUp(512)
        fileSize = length & ~(clusterSize - 1)
        guard QedHeader.tableSizeValid(h.tableSize) else {
            throw InstarError(.invalid, "QED table size is invalid", errno: EINVAL)
        }
        guard QedHeader.imageSizeValid(h.imageSize, clusterSize: h.clusterSize, tableSize: h.tableSize) else {
            throw InstarError(.invalid, "QED image size is invalid", errno: EINVAL)
        }
        header = h
        tableEntries = clusterSize * UInt64(h.tableSize) / 8
        l2Shift = UInt64(clusterSize.trailingZeroBitCount)
        l1Shift = l2Shift + UInt64(tableEntries.trailingZeroBitCount)
        l1 = []
        cacheLimit = max(1, Int((64 << 20) / (clusterSize * UInt64(h.tableSize))))
        guard tableOffsetValid(h.l1TableOffset) else {
            throw InstarError(.invalid, "QED table offset is invalid", errno: EINVAL)
        }
        if h.headerSize > UInt32.max / h.clusterSize {
            throw InstarError(.invalid, "QED header size is too large", errno: EINVAL)
        }
        if h.features & QedHeader.featureBackingFile != 0 {
            let end = UInt64(h.backingNameOffset) + UInt64(h.backingNameSize)
            if end > UInt64(h.clusterSize * h.headerSize) {
                throw InstarError(.invalid, "QED backing filename offset is invalid", errno: EINVAL)
            }
            guard Int(h.backingNameSize) < QedHeader.backingNameBuffer else {
                throw InstarError(.invalid, "Failed to read backing filename", errno: EINVAL)
            }
            var name = [UInt8](repeating: 0, count: Int(h.backingNameSize))
            try name.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: UInt64(h.backingNameOffset)) }
            // qemu keeps it as a C string.
            if let nul = name.firstIndex(of: 0) { name = Array(name[..<nul]) }
            let text = String(decoding: name, as: UTF8.self)
            backingReference = text.isEmpty ? nil : BackingReference(
                filename: text, format: h.features & QedHeader.featureBackingRaw != 0 ? "raw" : nil)
        } else {
            backingReference = nil
        }
        guard tableBytes <= QedHeader.maxTableBytes else {
            throw InstarError(.unsupported, "QED tables of \(tableBytes) bytes are larger than instar supports",
                              errno: ENOTSUP)
        }
        // Unknown autoclear bits are knocked out by a writer.
        if h.autoclearFeatures != 0 && writable {
            h.autoclearFeatures = 0
            header = h
            do {
                try file.write(h.bytes, at: 0)
            } catch let e as InstarError {
                throw InstarError(e.code, "Failed to update header", errno: e.errnoValue)
            }
            try? file.sync()
        }
        try CallBudget.reserve(count: tableEntries, of: 8, what: "the L1 table")
        do {
            l1 = try readTable(at: h.l1TableOffset)
        } catch let e as InstarError {
            throw InstarError(e.code, "Failed to read L1 table", errno: e.errnoValue)
        }
        // An image not closed cleanly is checked (and repaired) by a writer before use; a reader may go ahead.
        if !request.options.check && h.features & QedHeader.featureNeedCheck != 0 && writable {
            do {
                _ = try runCheck(fix: true)
            } catch let f as CheckFailure {
                throw InstarError(.corrupt, "Image corrupted", errno: f.errnoValue)
            }
        }
        // qemu arms its need-check timer when the flag is still set after open, and the first drain fires it
        // at once: the flag is cleared in memory and (on a writable image, after a flush) on disk.
        if header.features & QedHeader.featureNeedCheck != 0 {
            header.features &= ~QedHeader.featureNeedCheck
            if writable {
                try file.sync()
                try writeHeader()
            }
        }
    }

    // MARK: geometry (qed.h)

    func clusterOffsetValid(_ offset: UInt64) -> Bool {
        if offset & (cs - 1) != 0 { return false }
        let headerBytes = UInt64(header.headerSize) &* cs
        return offset >= headerBytes && offset < fileSize
    }

    func tableOffsetValid(_ offset: UInt64) -> Bool {
        let end = offset &+ UInt64(header.tableSize - 1) &* cs
        // qemu's overflow test, which also refuses every table of one cluster (end == offset).
        if end <= offset { return false }
        return clusterOffsetValid(offset) && clusterOffsetValid(end)
    }

    /// qemu's qed_bytes_to_clusters, which divides by cluster_size - 1 (its check counts clusters this way).
    func bytesToClustersAsQemu(_ bytes: UInt64) -> UInt64 {
        ((bytes &+ (cs - 1)) & ~(cs - 1)) / (cs - 1)
    }

    // MARK: tables

    func readTable(at offset: UInt64) throws -> [UInt64] {
        var t = [UInt64](repeating: 0, count: Int(tableEntries))
        try t.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: offset) }
        for i in t.indices { t[i] = UInt64(littleEndian: t[i]) }
        return t
    }

    func l2Table(at offset: UInt64) throws -> [UInt64] {
        if let t = cache[offset] { return t }
        if cache.count < cacheLimit { try CallBudget.reserve(count: tableEntries, of: 8, what: "the L2 table cache") }
        let t = try readTable(at: offset)
        storeCached(offset, t)
        return t
    }

    func storeCached(_ offset: UInt64, _ table: [UInt64]) {
        if cache[offset] == nil {
            cacheOrder.append(offset)
            while cacheOrder.count > cacheLimit {
                cache[cacheOrder.removeFirst()] = nil
            }
        }
        cache[offset] = table
    }

    /// Writes entries [index, index + n) of `table` (at `offset`), widened to whole sectors as qemu does.
    func writeTable(_ table: [UInt64], at offset: UInt64, index: UInt64, count n: UInt64) throws {
        let start = index & ~63
        let end = min((index + n + 63) & ~63, UInt64(table.count))
        guard start < end else { return }
        var bytes = [UInt8](repeating: 0, count: Int(end - start) * 8)
        for i in Int(start)..<Int(end) { bytes.putU64le(table[i], at: (i - Int(start)) * 8) }
        try file.write(bytes, at: offset + start * 8)
    }

    func writeHeader() throws {
        try file.write(header.bytes, at: 0)
    }

    // MARK: lookup

    /// qemu's qed_find_cluster: the kind of the run at `pos`, its host offset (for `.found`) and its length
    /// (at most `len`, never past the L2 table's span).
    func findCluster(_ pos: UInt64, _ len: UInt64) throws -> (Kind, UInt64, UInt64) {
        let spanEnd = ((pos >> l1Shift) + 1) << l1Shift
        var len = min(len, spanEnd &- pos)
        let l1Index = pos >> l1Shift
        guard l1Index < UInt64(l1.count) else { throw invalidOffset() }
        let l2Offset = l1[Int(l1Index)]
        if l2Offset == 0 { return (.missingL1, 0, len) }
        guard tableOffsetValid(l2Offset) else { throw invalidOffset() }
        let table = try l2Table(at: l2Offset)
        let into = pos & (cs - 1)
        let index = (pos >> l2Shift) & (tableEntries - 1)
        let want = (into + len).divCeil(cs)
        let end = min(index + want, tableEntries)
        let first = table[Int(index)]
        var last = first
        var i = index + 1
        while i < end {
            let e = table[Int(i)]
            if last == 0 {
                if e != 0 { break }
            } else if last == 1 {
                if e != 1 { break }
            } else {
                if e != last &+ cs { break }
                last = e
            }
            i += 1
        }
        let n = i - index
        len = min(len, n * cs - into)
        if first == 0 { return (.missingL2, 0, len) }
        if first == 1 { return (.zero, 1, len) }
        guard clusterOffsetValid(first) else { throw invalidOffset() }
        return (.found, first, len)
    }

    func invalidOffset() -> InstarError {
        InstarError(.corrupt, strerrorString(EINVAL), errno: EINVAL)
    }

    // MARK: reading

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        var done: UInt64 = 0
        let total = UInt64(buffer.count)
        while done < total {
            let pos = offset + done
            let (kind, host, len) = try findCluster(pos, total - done)
            guard len > 0 else { throw invalidOffset() }
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(done)..<Int(done + len)])
            switch kind {
            case .found:
                try file.readZeroPadded(into: part, at: host + (pos & (cs - 1)))
            case .zero:
                part.initializeMemory(as: UInt8.self, repeating: 0)
            case .missingL1, .missingL2:
                try readBacking(into: part, at: pos, backing: backing)
            }
            done += len
        }
    }

    func readBacking(into part: UnsafeMutableRawBufferPointer, at pos: UInt64, backing: GuestReader?) throws {
        if let b = backing {
            try b.read(into: part, at: pos)
        } else {
            part.initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        let (kind, host, len) = try findCluster(offset, length)
        let n = max(len, 1)
        switch kind {
        case .found:
            let (f, o) = file.hostLocation(host + (offset & (cs - 1)))
            return BlockStatus(length: n, allocated: true, data: true, zero: false, hostOffset: o, hostFile: f.path)
        case .zero:
            return BlockStatus(length: n, allocated: true, data: false, zero: true)
        case .missingL1, .missingL2:
            return .unallocated(n)
        }
    }

    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: cs, dirty: header.features & QedHeader.featureNeedCheck != 0)
    }
}
