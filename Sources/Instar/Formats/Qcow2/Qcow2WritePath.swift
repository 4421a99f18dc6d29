import Glibc

/// Guest-visible write operations of the writer: data writes (qemu's qcow2_alloc_host_offset with
/// handle_copied / handle_alloc and the COW of partial clusters), zero writes (qcow2_subcluster_zeroize),
/// discards (qcow2_cluster_discard) and compressed cluster writes (qcow2_alloc_compressed_cluster_offset).
extension Qcow2Writer {
    /// How one cluster of a write is carried out.
    private struct ClusterPlan {
        var guestCluster: UInt64
        /// The host cluster to write into: the existing one (in place) or nil for a new one.
        var keepHost: UInt64?
        /// Guest range written into the cluster (the request widened by copy-on-write padding).
        var writeStart: UInt64
        var writeEnd: UInt64
        /// Subclusters [first, end) that become allocated (extended L2).
        var firstSub: UInt64
        var endSub: UInt64
        /// The whole cluster is rewritten and every subcluster becomes allocated.
        var whole: Bool
        var oldEntry: UInt64
        var oldBitmap: UInt64
    }

    private static let maxRunBytes: UInt64 = 16 << 20

    func entryPair(_ table: [UInt64], _ index: UInt64) -> (UInt64, UInt64) {
        let stride = extended ? 2 : 1
        let base = Int(index) * stride
        guard base + stride <= table.count else { return (0, 0) }
        return (table[base], extended ? table[base + 1] : 0)
    }

    func setEntryPair(_ e: Qcow2WriteCache<[UInt64]>.Entry, _ index: UInt64, _ entry: UInt64, _ bitmap: UInt64) {
        let stride = extended ? 2 : 1
        let base = Int(index) * stride
        guard base + stride <= e.table.count else { return }
        e.table[base] = entry
        if extended { e.table[base + 1] = bitmap }
        l2Cache.markDirty(e)
    }

    private func subRangeMask(_ first: UInt64, _ end: UInt64) -> UInt64 {
        if end <= first { return 0 }
        let n = end - first
        let bits: UInt64 = n >= 64 ? UInt64.max : (UInt64(1) << n) - 1
        return (bits << first) & 0xffff_ffff
    }

    /// Whether a standard (not compressed) L2 entry points at a host cluster. With an external data file,
    /// host offset 0 is a real cluster, told apart by the copied flag.
    func hasHostCluster(_ entry: UInt64) -> Bool {
        if entry & Qcow2.l2Compressed != 0 { return false }
        return entry & Qcow2.l2OffsetMask != 0 || (hasDataFile && entry & Qcow2.l2Copied != 0)
    }

    /// Drops the host side of an L2 entry being replaced. Data clusters in an external data file have no
    /// refcounts; qemu passes the discard down to the data file instead (qcow2_free_any_cluster).
    func freeGuestEntry(_ entry: UInt64, discard: Bool = false) throws {
        if !hasDataFile { return try freeEntry(entry, discard: discard) }
        if hasHostCluster(entry) {
            try format.dataFile.punchHole(at: entry & Qcow2.l2OffsetMask, length: clusterSize)
        }
    }

    /// Whether the subcluster `sc` of a cluster reads from its host cluster (allocated, not zero).
    private func subclusterIsData(entry: UInt64, bitmap: UInt64, sc: UInt64) -> Bool {
        if !hasHostCluster(entry) { return false }
        if !extended { return entry & Qcow2.l2Zero == 0 }
        return bitmap & (UInt64(1) << sc) != 0 && bitmap & (UInt64(1) << (sc + 32)) == 0
    }

    private func plan(guest start: UInt64, end: UInt64, entry: UInt64, bitmap: UInt64) throws -> ClusterPlan {
        let cstart = start & ~(clusterSize - 1)
        let cend = cstart + clusterSize
        let host = entry & Qcow2.l2OffsetMask
        let compressed = entry & Qcow2.l2Compressed != 0
        if !compressed && host & (clusterSize - 1) != 0 {
            throw InstarError(.corrupt, "Cluster allocation offset \(hex(host)) unaligned", errno: EIO)
        }
        let allocated = compressed || hasHostCluster(entry)
        if hasDataFile && allocated && (compressed || host != cstart) {
            throw InstarError(.corrupt, "Cluster allocation offset \(hex(host)) does not match guest offset \(hex(cstart)) in an image with an external data file", errno: EIO)
        }
        let inPlace = !compressed && allocated && entry & Qcow2.l2Copied != 0
        // Encrypted data is written in whole 512-byte sectors (qemu's request alignment for encrypted images).
        let sector: UInt64 = format.crypt == nil ? 1 : Qcow2Crypt.sectorSize
        var p = ClusterPlan(guestCluster: cstart, keepHost: inPlace ? host : nil, writeStart: start.alignedDown(sector),
                            writeEnd: min(cend, try end.alignedUp(sector)),
                            firstSub: 0, endSub: 0, whole: false, oldEntry: entry, oldBitmap: bitmap)
        if !extended {
            p.whole = true
            if !(inPlace && entry & Qcow2.l2Zero == 0) {
                p.writeStart = cstart
                p.writeEnd = cend
            }
            return p
        }
        if compressed || (allocated && !inPlace) {
            // A compressed or shared cluster is copied whole into a new one.
            p.whole = true
            p.writeStart = cstart
            p.writeEnd = cend
            return p
        }
        let subBits = UInt64(subclusterSize.trailingZeroBitCount)
        p.firstSub = (start - cstart) >> subBits
        p.endSub = (end - cstart + subclusterSize - 1) >> subBits
        if !subclusterIsData(entry: entry, bitmap: bitmap, sc: p.firstSub) {
            p.writeStart = cstart + (p.firstSub << subBits)
        }
        if !subclusterIsData(entry: entry, bitmap: bitmap, sc: p.endSub - 1) {
            p.writeEnd = min(cend, cstart + (p.endSub << subBits))
        }
        return p
    }

    /// The L2 entry and bitmap a cluster gets once `p` is written at host cluster `host`.
    private func newEntry(_ p: ClusterPlan, host: UInt64) -> (UInt64, UInt64) {
        let entry = host | Qcow2.l2Copied
        if !extended { return (entry, 0) }
        if p.whole { return (entry, 0xffff_ffff) }
        let mask = subRangeMask(p.firstSub, p.endSub)
        return (entry, (p.oldBitmap | mask) & ~(mask << 32))
    }

    // MARK: Data writes

    /// Where the bytes of a write come from: a buffer, or a host file whose bytes the kernel copies
    /// (copy_file_range); byte k of the request is buffer[k] or the file's byte at offset + k.
    enum WriteSource {
        case bytes(UnsafeRawBufferPointer)
        case host(HostFile, UInt64)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try write(.bytes(buffer), count: UInt64(buffer.count), at: offset, backing: backing)
    }

    /// Writes `count` guest bytes at `offset` taken from `source`: the same clusters, mapping and metadata
    /// order as a buffered write of those bytes.
    func write(_ source: WriteSource, count total: UInt64, at offset: UInt64, backing: GuestReader?) throws {
        if total == 0 { return }
        try prepare()
        var done: UInt64 = 0
        while done < total {
            let guest = try offset.adding(done)
            let inTable = ((l2Entries - ((guest >> clusterBits) & (l2Entries - 1))) << clusterBits)
                - (guest & (clusterSize - 1))
            let n = min(total - done, inTable)
            try writeInTable(source, total: total, from: Int(done), count: n, at: guest, backing: backing)
            done += n
        }
    }

    /// A write that stays within one L2 table.
    private func writeInTable(_ buffer: WriteSource, total: UInt64, from: Int, count: UInt64, at guest: UInt64,
                              backing: GuestReader?) throws {
        let l1Index = guest >> (clusterBits + UInt64(header.l2Bits))
        let (_, l2) = try writableL2(l1Index: l1Index)
        let end = guest + count
        var pos = guest
        var plans: [ClusterPlan] = []
        while pos < end {
            let cend = (pos & ~(clusterSize - 1)) + clusterSize
            let e = min(end, cend)
            let (entry, bitmap) = entryPair(l2.table, (pos >> clusterBits) & (l2Entries - 1))
            plans.append(try plan(guest: pos, end: e, entry: entry, bitmap: bitmap))
            pos = e
        }
        // Group clusters into runs written with one pwrite each: in-place clusters with contiguous hosts, or
        // clusters that get new, contiguous hosts. As in qemu's qcow2_alloc_host_offset, new clusters that
        // follow clusters already placed in this request are first sought right after them in the file
        // (qcow2_alloc_clusters_at); only what cannot go there is allocated first-fit.
        var i = 0
        var cursor: UInt64?
        while i < plans.count {
            var j = i + 1
            let newHost = plans[i].keepHost == nil
            while j < plans.count && UInt64(j - i) * clusterSize < Qcow2Writer.maxRunBytes {
                if newHost {
                    if plans[j].keepHost != nil { break }
                } else {
                    guard let h = plans[j].keepHost, let h0 = plans[j - 1].keepHost, h == h0 + clusterSize else { break }
                }
                j += 1
            }
            var placed: UInt64?
            if let h = plans[i].keepHost {
                if h != cursor { cursor = nil }
            } else if let c = cursor, !hasDataFile {
                let got = try allocateAt(c, maxClusters: UInt64(j - i))
                if got > 0 {
                    placed = c
                    j = i + Int(got)
                    try setL2DependsOnRefcount()
                }
            }
            let base = try writeRun(Array(plans[i..<j]), l2: l2, buffer: buffer, total: total, bufferStart: guest,
                                    bufferFrom: from, backing: backing, host: placed)
            cursor = base.map { $0 + UInt64(j - i) * clusterSize }
            i = j
        }
        format.forgetDecompressed()
    }

    /// Writes guest bytes (for guest offset `guest`) at host offset `host` of the file that holds guest data,
    /// encrypted first when the image is.
    func writeGuestData(_ data: UnsafeRawBufferPointer, host: UInt64, guest: UInt64) throws {
        guard let c = format.crypt else {
            try format.dataFile.write(data, at: host)
            return
        }
        let sealed = try c.encrypted(data, at: host, guest: guest)
        defer { sealed.deallocate() }
        try format.dataFile.write(UnsafeRawBufferPointer(sealed), at: host)
    }

    /// Copies `length` guest bytes from `source` at `sourceOffset` to host offset `host` of the file that holds
    /// guest data, in the kernel where it can; what it does not copy is read and written through a buffer.
    func copyGuestData(from source: HostFile, at sourceOffset: UInt64, length: UInt64, host: UInt64,
                       guest: UInt64) throws {
        var copied: UInt64 = 0
        if format.crypt == nil {
            let (dst, dstOffset) = format.dataFile.hostLocation(host)
            copied = dst.copyIn(from: source, at: sourceOffset, length: length, to: dstOffset)
        }
        var left = length - copied
        let chunk = Int(min(left, Qcow2Writer.maxRunBytes))
        guard chunk > 0 else { return }
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { b.deallocate() }
        while left > 0 {
            let n = Int(min(left, UInt64(chunk)))
            let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
            let at = length - left
            try source.readZeroPadded(into: part, at: sourceOffset + at)
            try writeGuestData(UnsafeRawBufferPointer(part), host: host + at, guest: guest + at)
            left -= UInt64(n)
        }
    }

    /// Writes one run and points its L2 entries at it; returns its first host cluster (nil with an external
    /// data file). `host` is where new clusters were already allocated, if they were.
    @discardableResult
    private func writeRun(_ run: [ClusterPlan], l2: Qcow2WriteCache<[UInt64]>.Entry, buffer source: WriteSource,
                          total: UInt64, bufferStart: UInt64, bufferFrom: Int, backing: GuestReader?,
                          host placed: UInt64? = nil) throws -> UInt64? {
        guard let first = run.first, let last = run.last else { return nil }
        let wStart = first.writeStart
        let wEnd = last.writeEnd
        // Request bytes inside the run.
        let reqStart = max(wStart, bufferStart)
        let reqEnd = min(wEnd, bufferStart + (total - UInt64(bufferFrom)))
        let dataFrom = bufferFrom + Int(reqStart - bufferStart)
        let len = Int(wEnd - wStart)
        // Old contents for the copy-on-write padding are read before any mapping changes.
        var bounce: UnsafeMutableRawBufferPointer?
        defer { bounce?.deallocate() }
        var data = UnsafeRawBufferPointer(start: nil, count: 0)
        // The whole run comes from a host file: the kernel copies it once the clusters are placed.
        var copyFrom: (file: HostFile, offset: UInt64)?
        if reqStart == wStart && reqEnd == wEnd {
            switch source {
            case let .bytes(buffer):
                data = UnsafeRawBufferPointer(rebasing: buffer[dataFrom..<(dataFrom + len)])
            case let .host(file, offset):
                copyFrom = (file, offset + UInt64(dataFrom))
            }
        } else {
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: len, alignment: 4096)
            bounce = b
            if reqStart > wStart {
                try format.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<Int(reqStart - wStart)]),
                                at: wStart, backing: backing)
            }
            if wEnd > reqEnd {
                try format.read(into: UnsafeMutableRawBufferPointer(rebasing: b[Int(reqEnd - wStart)..<len]),
                                at: reqEnd, backing: backing)
            }
            let n = Int(reqEnd - reqStart)
            switch source {
            case let .bytes(buffer):
                if n > 0, let d = b.baseAddress, let s = buffer.baseAddress {
                    memcpy(d + Int(reqStart - wStart), s + dataFrom, n)
                }
            case let .host(file, offset):
                if n > 0 {
                    let at = Int(reqStart - wStart)
                    try file.readZeroPadded(into: UnsafeMutableRawBufferPointer(rebasing: b[at..<(at + n)]),
                                            at: offset + UInt64(dataFrom))
                }
            }
            data = UnsafeRawBufferPointer(b)
        }
        let hostBase: UInt64
        if let h = first.keepHost {
            hostBase = h
        } else if let h = placed {
            hostBase = h
        } else if hasDataFile {
            // qcow2.txt: with an external data file a guest cluster lives at its guest offset.
            hostBase = first.guestCluster
        } else {
            hostBase = try allocateClusters(UInt64(run.count))
            try setL2DependsOnRefcount()
        }
        if let c = copyFrom {
            try copyGuestData(from: c.file, at: c.offset, length: UInt64(len),
                              host: hostBase + (wStart - first.guestCluster), guest: wStart)
        } else {
            try writeGuestData(data, host: hostBase + (wStart - first.guestCluster), guest: wStart)
        }
        // The data must be stable before an L2 entry points at it.
        for (k, p) in run.enumerated() {
            let host = hostBase + UInt64(k) * clusterSize
            let (entry, bitmap) = newEntry(p, host: host)
            if entry != p.oldEntry || bitmap != p.oldBitmap {
                setEntryPair(l2, (p.guestCluster >> clusterBits) & (l2Entries - 1), entry, bitmap)
                l2DependsOnFlush = true
            }
            if p.keepHost == nil && !hasDataFile { try freeEntry(p.oldEntry) }
        }
        return hasDataFile ? nil : hostBase
    }

    // MARK: Zero writes

    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        if length == 0 { return }
        try prepare()
        let end = try offset.adding(length)
        let sector = Qcow2Crypt.sectorSize
        if format.crypt != nil && (offset % sector != 0 || end % sector != 0) {
            // An encrypted image takes requests in whole sectors: qemu's block layer (bdrv_co_do_zero_pwritev)
            // writes the partial first and last sectors as data (read, zeroed in part, rewritten), in one
            // write when they are all the request covers, and only the sectors between as a zero write.
            let first = offset.alignedDown(sector)
            let last = try end.alignedUp(sector)
            let head = offset != first
            let tail = end != last
            let span = last - first
            if span == ((span > sector && head && tail) ? 2 * sector : sector) {
                return try writeZeroBytes(offset, end, backing: backing)
            }
            var a = offset
            if head {
                a = first + sector
                try writeZeroBytes(offset, a, backing: backing)
            }
            let b = tail ? end.alignedDown(sector) : end
            if b > a { try writeZeroes(at: a, length: b - a, mayUnmap: mayUnmap, backing: backing) }
            if tail { try writeZeroBytes(b, end, backing: backing) }
            return
        }
        let imageEnd = format.virtualSize
        let a = try offset.alignedUp(subclusterSize)
        var b = end.alignedDown(subclusterSize)
        if end == imageEnd { b = try end.alignedUp(subclusterSize) }
        if end <= a && b <= offset {
            // Within one subcluster (qemu's block layer hands such a request down whole).
            try zeroPiece(offset, end, mayUnmap: mayUnmap, backing: backing)
            return
        }
        if offset < a { try zeroPiece(offset, a, mayUnmap: mayUnmap, backing: backing) }
        if a < b { try zeroAligned(a, b, mayUnmap: mayUnmap, backing: backing) }
        if max(a, b) < end { try zeroPiece(max(a, b), end, mayUnmap: mayUnmap, backing: backing) }
    }

    /// Part of one subcluster (qemu's qcow2_co_pwrite_zeroes with head/tail): when the rest of the subcluster
    /// already reads as zeroes and it holds no data in this layer, the whole subcluster is marked zero;
    /// otherwise zeroes are written.
    private func zeroPiece(_ start: UInt64, _ end: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        if end <= start { return }
        let s0 = start.alignedDown(subclusterSize)
        let s1 = min(s0 + subclusterSize, format.virtualSize)
        if header.version >= 3 && end <= s0 + subclusterSize,
           try chainIsZero(s0, start, backing: backing), try chainIsZero(end, s1, backing: backing) {
            let run = try mapper.lookup(s0, maxBytes: 1)
            switch run.kind {
            case .unallocatedPlain, .unallocatedAlloc, .zeroPlain, .zeroAlloc:
                try zeroAligned(s0, s0 + subclusterSize, mayUnmap: mayUnmap, backing: backing)
                return
            default:
                break
            }
        }
        // Version 2 with a backing file cannot mark zeroes: qemu's zeroize refuses (ENOTSUP) and the block
        // layer writes a zero buffer, allocating the cluster.
        if header.version < 3 && (format.backingReference != nil || backing != nil) {
            try writeZeroBytes(start, end, backing: backing)
            return
        }
        // Already zero by status: nothing to write.
        if try chainIsZero(start, end, backing: backing) { return }
        try writeZeroBytes(start, end, backing: backing)
    }

    /// Whether [start, end) reads as zeroes by block status alone, down the chain (qemu's is_zero, which
    /// never reads data).
    private func chainIsZero(_ start: UInt64, _ end: UInt64, backing: GuestReader?) throws -> Bool {
        var pos = start
        while pos < end {
            let run = try mapper.lookup(pos, maxBytes: end - pos)
            let n = max(run.length, 1)
            switch run.kind {
            case .zeroPlain, .zeroAlloc:
                break
            case .unallocatedPlain, .unallocatedAlloc:
                if !(try Qcow2Writer.layerIsZero(backing, pos, min(end, pos + n))) { return false }
            default:
                return false
            }
            pos += n
        }
        return true
    }

    private static func layerIsZero(_ reader: GuestReader?, _ start: UInt64, _ end: UInt64) throws -> Bool {
        guard let reader else { return true }
        guard let layer = reader as? ImageLayer else { return false }
        var pos = start
        while pos < end {
            if pos >= layer.virtualSize { return true }
            let st = try layer.format.blockStatus(at: pos, length: min(end, layer.virtualSize) - pos)
            let n = max(st.length, 1)
            if st.allocated {
                if !st.zero { return false }
            } else if !(try layerIsZero(layer.backing, pos, min(end, pos + n))) {
                return false
            }
            pos += n
        }
        return true
    }

    private func writeZeroBytes(_ start: UInt64, _ end: UInt64, backing: GuestReader?) throws {
        let chunk: UInt64 = 1 << 20
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(chunk, end - start)), alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var pos = start
        while pos < end {
            let n = min(chunk, end - pos)
            try write(UnsafeRawBufferPointer(rebasing: zeros[0..<Int(n)]), at: pos, backing: backing)
            pos += n
        }
    }

    private func zeroAligned(_ start: UInt64, _ end: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        defer { processDiscards() }
        if header.dataFileRaw && hasDataFile {
            // qcow2_subcluster_zeroize: a raw data file must stay a valid image of the guest, so it is zeroed
            // first (up to the image's end when the request reaches it unaligned).
            let vs = format.virtualSize
            let rawEnd = end > vs && start < vs ? vs : end
            if rawEnd > start { try format.dataFile.writeZeroes(at: start, length: rawEnd - start) }
        }
        if header.version < 3 {
            // No zero flag before version 3: without a backing file an unallocated cluster reads as zeroes, so
            // whole clusters are dropped; otherwise zeroes are written.
            if format.backingReference == nil && backing == nil {
                try discardClusters(start, end, zeroOnly: true)
            } else {
                try writeZeroBytes(start, min(end, format.virtualSize), backing: backing)
            }
            return
        }
        var pos = start
        while pos < end {
            let l1Index = pos >> (clusterBits + UInt64(header.l2Bits))
            let (_, l2) = try writableL2(l1Index: l1Index)
            let tableEnd = ((pos >> (clusterBits + UInt64(header.l2Bits))) + 1) << (clusterBits + UInt64(header.l2Bits))
            let stop = min(end, tableEnd)
            while pos < stop {
                let cstart = pos & ~(clusterSize - 1)
                let cend = min(cstart + clusterSize, stop)
                let index = (pos >> clusterBits) & (l2Entries - 1)
                let (entry, bitmap) = entryPair(l2.table, index)
                if pos == cstart && cend == cstart + clusterSize {
                    // A whole cluster (qemu's zero_in_l2_slice).
                    let compressed = entry & Qcow2.l2Compressed != 0
                    let allocated = compressed || hasHostCluster(entry)
                    let unmap = compressed || (mayUnmap && allocated)
                    var newEntry = unmap ? 0 : entry
                    var newBitmap = bitmap
                    if extended { newBitmap = 0xffff_ffff_0000_0000 } else { newEntry |= Qcow2.l2Zero }
                    if newEntry != entry || newBitmap != bitmap {
                        setEntryPair(l2, index, newEntry, newBitmap)
                        if unmap { try freeGuestEntry(entry, discard: true) }
                    }
                } else if entry & Qcow2.l2Compressed != 0 {
                    // Part of a compressed cluster cannot be zeroed in the table.
                    try writeZeroBytes(pos, cend, backing: backing)
                } else {
                    // Subclusters of an extended L2 entry (qemu's zero_l2_subclusters).
                    let first = (pos - cstart) / subclusterSize
                    let last = (cend - cstart) / subclusterSize
                    let mask = subRangeMask(first, last)
                    let newBitmap = (bitmap | (mask << 32)) & ~mask
                    if newBitmap != bitmap { setEntryPair(l2, index, entry, newBitmap) }
                }
                pos = cend
            }
        }
        format.forgetDecompressed()
    }

    // MARK: Discard

    /// qemu's qcow2_co_pdiscard: only whole clusters (and the partial last cluster of the image) are discarded;
    /// they read as zeroes afterwards on version 3, and as unallocated on version 2 (which has no backing file then).
    func discard(at offset: UInt64, length: UInt64) throws {
        if length == 0 { return }
        // Without zero clusters a discard would expose the backing file's stale data: qemu refuses it there.
        if header.version < 3 && format.backingReference != nil { return }
        try prepare()
        let end = try offset.adding(length)
        let a = try offset.alignedUp(clusterSize)
        var b = end.alignedDown(clusterSize)
        if end == format.virtualSize { b = try end.alignedUp(clusterSize) }
        if a >= b { return }
        try discardClusters(a, b, zeroOnly: false)
    }

    /// qemu's qcow2_cluster_discard with full_discard over the whole image (qcow2_make_empty's slow path): every
    /// L2 entry becomes 0, so the backing file shows through, and the clusters are freed and punched out.
    func discardEverything() throws {
        try prepare()
        let end = try format.virtualSize.alignedUp(clusterSize)
        if end == 0 { return }
        try discardClusters(0, end, zeroOnly: false, full: true)
    }

    private func discardClusters(_ start: UInt64, _ end: UInt64, zeroOnly: Bool, full: Bool = false) throws {
        defer { processDiscards() }
        let hasBacking = format.backingReference != nil
        var pos = start
        while pos < end {
            let l1Index = pos >> (clusterBits + UInt64(header.l2Bits))
            let tableEnd = (l1Index + 1) << (clusterBits + UInt64(header.l2Bits))
            let stop = min(end, tableEnd)
            // A discard gets an L2 table even where none exists (qemu's get_cluster_table allocates it); the v2
            // zero write, which only drops clusters, leaves such ranges alone.
            if zeroOnly, l1Index >= UInt64(mapper.l1.count) || mapper.l1[Int(l1Index)] & Qcow2.l1OffsetMask == 0 {
                if !hasBacking || header.version < 3 { pos = stop; continue }
            }
            let (_, l2) = try writableL2(l1Index: l1Index)
            while pos < stop {
                let index = (pos >> clusterBits) & (l2Entries - 1)
                let (entry, bitmap) = entryPair(l2.table, index)
                let allocated = entry & Qcow2.l2Compressed != 0 || hasHostCluster(entry)
                var newEntry = entry
                var newBitmap = bitmap
                if full {
                    newEntry = 0
                    newBitmap = 0
                } else if hasBacking || allocated {
                    if extended {
                        newEntry = 0
                        newBitmap = 0xffff_ffff_0000_0000
                    } else {
                        newEntry = header.version >= 3 ? Qcow2.l2Zero : 0
                    }
                }
                if zeroOnly && header.version < 3 { newEntry = 0 }
                if newEntry != entry || newBitmap != bitmap {
                    setEntryPair(l2, index, newEntry, newBitmap)
                    try freeGuestEntry(entry, discard: true)
                }
                pos += clusterSize
            }
        }
        format.forgetDecompressed()
    }

    // MARK: Compressed clusters

    /// Stores an already compressed cluster at guest cluster `clusterIndex`, which must be unallocated. The
    /// stream is packed right after the previous one, sharing host clusters (each reference counts).
    func writeCompressed(clusterIndex: UInt64, compressedBytes: [UInt8]) throws {
        if hasDataFile {
            throw InstarError(.unsupported, "Compression is not supported with external data files", errno: ENOTSUP)
        }
        try prepare()
        let guest = try clusterIndex.shifted(left: clusterBits)
        guard guest < format.virtualSize else { throw InstarError(.range, "Compressed write beyond the end of the image") }
        guard !compressedBytes.isEmpty, UInt64(compressedBytes.count) < clusterSize else {
            throw InstarError.invalid("Compressed data must be smaller than a cluster")
        }
        let l1Index = guest >> (clusterBits + UInt64(header.l2Bits))
        let (_, l2) = try writableL2(l1Index: l1Index)
        let index = clusterIndex & (l2Entries - 1)
        let (entry, _) = entryPair(l2.table, index)
        if entry & Qcow2.l2OffsetMask != 0 || entry & Qcow2.l2Compressed != 0 {
            throw InstarError(.io, "Compressed write to an allocated cluster", errno: EIO)
        }
        let size = UInt64(compressedBytes.count)
        let offset = try allocateBytes(size)
        try setL2DependsOnRefcount()
        try file.write(compressedBytes, at: offset)
        // qcow2.txt: bits x..61 hold the number of additional 512-byte sectors.
        let sectors = ((offset + size - 1) >> 9) - (offset >> 9)
        let shift = 62 - (clusterBits - 8)
        let newEntry = Qcow2.l2Compressed | (sectors << shift) | offset
        setEntryPair(l2, index, newEntry, 0)
        l2DependsOnFlush = true
        format.forgetDecompressed()
    }

    /// qemu's qcow2_alloc_bytes: `size` bytes right after the last compressed stream when they fit (or spill
    /// into the next cluster when it is the next free one), else at a new cluster.
    private func allocateBytes(_ size: UInt64) throws -> UInt64 {
        var offset = freeByteOffset
        if offset != 0, try refcount(ofCluster: offset >> clusterBits) >= refMax { offset = 0 }
        var freeInCluster = clusterSize - (offset & (clusterSize - 1))
        for _ in 0..<64 {
            if offset == 0 || freeInCluster < size {
                let nextCluster = try findFree(1)
                // The free-cluster search moves past the cluster it found, as in qemu's alloc_clusters_noref.
                freeHint = nextCluster + 1
                let next = nextCluster << clusterBits
                let roundedUp = try offset.alignedUp(clusterSize)
                if offset == 0 || roundedUp != next {
                    offset = next
                    freeInCluster = clusterSize
                } else {
                    freeInCluster += clusterSize
                }
            }
            let first = offset >> clusterBits
            let last = (offset + size - 1) >> clusterBits
            var missing: UInt64?
            for c in first...last where try blockOffset(tableIndex: c >> refBlockBits) == nil {
                missing = c
                break
            }
            if let c = missing {
                // A new refcount block restarts the search at the start of this run, with a fresh cluster.
                try createRefBlock(forCluster: c, depth: 0)
                freeHint = min(freeHint, first)
                offset = 0
                continue
            }
            try claim(first, last - first + 1)
            for c in first...last { try changeRefcount(ofCluster: c, by: 1) }
            highestAllocated = max(highestAllocated, last + 1)
            freeByteOffset = offset + size
            if freeByteOffset & (clusterSize - 1) == 0 { freeByteOffset = 0 }
            return offset
        }
        throw InstarError(.io, "Could not allocate bytes for a compressed cluster", errno: EIO)
    }
}
