import Glibc

/// qcow writes, laid out as qemu 7.2's get_cluster_offset allocates: a missing L2 table goes at the file end
/// rounded up to a cluster, a new data cluster likewise (the file is extended over it), a compressed cluster
/// at the file end rounded up to a sector. Untouched parts of a new cluster stay zero (qemu copies nothing from
/// the backing file; images with a backing file use 512-byte clusters), except that a partly overwritten
/// compressed cluster is first copied out decompressed. The file bytes come out as qemu's; instar orders the
/// writes of one request so that data reaches the disk before the tables point at it.
extension QcowFormat {
    func checkWritable() throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
    }

    /// qemu's bdrv_getlength: the file length rounded up to a sector.
    var sectorLength: UInt64 { (fileLength &+ 511) & ~511 }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try checkWritable()
        let end = try offset.adding(UInt64(buffer.count))
        if offset % 512 == 0 && end % 512 == 0 {
            return try writeSectors(buffer, at: offset)
        }
        // qcow takes whole sectors: the block layer pads a request with the current contents of its first and
        // last sectors and sends one request.
        let a0 = offset & ~511
        let a1 = try end.alignedUp(512)
        var padded = [UInt8](repeating: 0, count: Int(a1 - a0))
        try padded.withUnsafeMutableBytes { p in
            if offset % 512 != 0 {
                try read(into: UnsafeMutableRawBufferPointer(rebasing: p[0..<512]), at: a0, backing: backing)
            }
            if end % 512 != 0 && (a1 - 512 > a0 || offset % 512 == 0) {
                try read(into: UnsafeMutableRawBufferPointer(rebasing: p[(p.count - 512)...]), at: a1 - 512,
                         backing: backing)
            }
            UnsafeMutableRawBufferPointer(rebasing: p[Int(offset - a0)..<Int(end - a0)]).copyMemory(from: buffer)
        }
        try padded.withUnsafeBytes { try writeSectors($0, at: a0) }
    }

    /// The pending changes of one request: data runs, L2 tables to write back, new L1 entries.
    private struct Pending {
        var dataHost: UInt64 = 0
        var dataStart = 0
        var dataEnd = 0
        /// L2 tables changed: offset -> (first, last) dirty entry, or nil for a new table written whole.
        var tables: [(offset: UInt64, first: Int, last: Int, new: Bool)] = []
        var tableData: [UInt64: [UInt64]] = [:]
        var l1: [(index: UInt64, value: UInt64)] = []
        var extendTo: UInt64 = 0
    }

    /// Sector-aligned writes, cluster by cluster in qemu's order; one request's data goes out in contiguous
    /// runs, then the tables.
    private func writeSectors(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if let c = crypt {
            // Encrypted data is written from a copy (the caller's buffer stays as it is).
            let enc = try c.encrypted(buffer, at: 0, guest: offset)
            defer { enc.deallocate() }
            return try writePlainSectors(UnsafeRawBufferPointer(enc), at: offset)
        }
        if encrypted { throw InstarError(.encrypted, "Parameter 'encrypt.key-secret' is required for cipher", errno: EINVAL) }
        try writePlainSectors(buffer, at: offset)
    }

    private func writePlainSectors(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        decompressedEntry = nil
        var p = Pending()
        var done = 0
        let total = buffer.count
        func flushData() throws {
            if p.dataEnd > p.dataStart {
                try file.write(UnsafeRawBufferPointer(rebasing: buffer[p.dataStart..<p.dataEnd]), at: p.dataHost)
            }
            p.dataStart = p.dataEnd
        }
        while done < total {
            let pos = offset + UInt64(done)
            let into = pos & (cs - 1)
            let n = min(Int(cs - into), total - done)
            let cluster = try clusterForWrite(pos, nStart: into, nEnd: into + UInt64(n), pending: &p)
            guard cluster != 0, cluster & 511 == 0 else { throw QcowFormat.ioError() }
            let host = try cluster.adding(into)
            try QcowFormat.checkRequest(host, UInt64(n))
            if p.dataEnd == done && p.dataEnd > p.dataStart && p.dataHost + UInt64(p.dataEnd - p.dataStart) == host {
                p.dataEnd += n
            } else {
                try flushData()
                p.dataHost = host
                p.dataStart = done
                p.dataEnd = done + n
            }
            done += n
        }
        try flushData()
        try commit(p)
    }

    /// Writes the tables a request changed, after its data.
    private func commit(_ p: Pending) throws {
        for (offset, table) in p.tableData { storeCached(offset, table) }
        if p.extendTo > 0, try file.size() < p.extendTo { try file.truncate(to: p.extendTo) }
        if p.tables.isEmpty && p.l1.isEmpty { return }
        try file.sync()
        for t in p.tables {
            guard let table = p.tableData[t.offset] else { continue }
            let first = t.new ? 0 : t.first
            let last = t.new ? table.count - 1 : t.last
            var bytes = [UInt8](repeating: 0, count: (last - first + 1) * 8)
            for i in first...last { bytes.putU64be(table[i], at: (i - first) * 8) }
            try file.write(bytes, at: t.offset + UInt64(first) * 8)
        }
        if !p.l1.isEmpty {
            try file.sync()
            for e in p.l1 {
                var b = [UInt8](repeating: 0, count: 8)
                b.putU64be(e.value, at: 0)
                try file.write(b, at: try header.l1TableOffset.adding(e.index * 8))
            }
        }
        try file.sync()
    }

    /// The L2 table for guest offset `pos`, allocating it at the file end when the L1 entry is empty.
    private func tableForWrite(_ pos: UInt64, pending p: inout Pending) throws -> UInt64 {
        let l1Index = pos >> (clusterBits + l2Bits)
        guard l1Index < l1Size else { throw QcowFormat.ioError() }
        let existing = l1Entry(l1Index)
        if existing != 0 { return existing }
        let offset = try sectorLength.alignedUp(cs)
        try QcowFormat.checkRequest(offset, l2Entries * 8)
        try QcowFormat.checkRequest(header.l1TableOffset, (l1Index + 1) * 8)
        fileLength = offset + l2Entries * 8
        p.extendTo = max(p.extendTo, fileLength)
        setL1Entry(l1Index, offset)
        p.l1.append((l1Index, offset))
        storeCached(offset, [UInt64](repeating: 0, count: Int(l2Entries)))
        p.tableData[offset] = cache[offset]
        p.tables.append((offset, 0, 0, true))
        return offset
    }

    private func setEntry(_ tableOffset: UInt64, _ index: Int, _ value: UInt64, pending p: inout Pending) throws {
        // The request's copy of the table is changed in place; the cache takes it when the request commits.
        if p.tableData[tableOffset] == nil { p.tableData[tableOffset] = try l2Table(at: tableOffset) }
        p.tableData[tableOffset]?[index] = value
        if let k = p.tables.firstIndex(where: { $0.offset == tableOffset }) {
            p.tables[k].first = min(p.tables[k].first, index)
            p.tables[k].last = max(p.tables[k].last, index)
        } else {
            p.tables.append((tableOffset, index, index, false))
        }
    }

    /// get_cluster_offset with allocate = 1: the host offset of the cluster holding `pos`, allocating it when
    /// it is unallocated or compressed. [nStart, nEnd) is the part of the cluster the request covers.
    private func clusterForWrite(_ pos: UInt64, nStart: UInt64, nEnd: UInt64, pending p: inout Pending) throws -> UInt64 {
        let tableOffset = try tableForWrite(pos, pending: &p)
        let index = Int((pos >> clusterBits) & (l2Entries - 1))
        let entry = try (p.tableData[tableOffset] ?? l2Table(at: tableOffset))[index]
        if entry != 0 && entry & QcowHeader.compressedFlag == 0 { return entry }
        let cluster = try sectorLength.alignedUp(cs)
        try QcowFormat.checkRequest(cluster, cs)
        if entry & QcowHeader.compressedFlag != 0 && nEnd - nStart < cs {
            // A partly overwritten compressed cluster is copied out whole first.
            try decompressCluster(entry)
            try file.write(decompressed, at: cluster)
            fileLength = max(fileLength, cluster + cs)
        } else {
            fileLength = cluster + cs
            p.extendTo = max(p.extendTo, fileLength)
            if let c = crypt, nEnd - nStart < cs {
                // The sectors the request leaves out hold encrypted zeroes.
                let guestCluster = pos & ~(cs - 1)
                let zero = [UInt8](repeating: 0, count: 512)
                var i: UInt64 = 0
                while i < cs {
                    if i < nStart || i >= nEnd {
                        let enc = try zero.withUnsafeBytes { try c.encrypted($0, at: 0, guest: guestCluster + i) }
                        defer { enc.deallocate() }
                        try file.write(UnsafeRawBufferPointer(enc), at: cluster + i)
                    }
                    i += 512
                }
            }
        }
        try setEntry(tableOffset, index, cluster, pending: &p)
        return cluster
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        try checkWritable()
        // qcow has no zero clusters: the block layer writes buffers of zeroes.
        let end = try offset.adding(length)
        let chunk: UInt64 = 1 << 20
        let zeroes = [UInt8](repeating: 0, count: Int(min(length, chunk)))
        var pos = offset
        while pos < end {
            let n = min(end - pos, chunk)
            try zeroes.withUnsafeBytes { try write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)]), at: pos, backing: backing) }
            pos += n
        }
    }

    public func flush() throws {
        if writable { try file.sync() }
    }

    public func close() throws {
        if writable { try file.sync() }
    }

    /// qemu stores compressed clusters unencrypted even in an encrypted image (and reads them back so).
    public var compressedWrites: CompressedClusterWriting? { self }
}

/// The signal qemu-img convert -c sends at the end of a compressed copy (a zero-length compressed write) fails
/// on qcow, whose driver takes whole clusters only: the copy is complete but qemu-img exits with status 1
/// without a message. The CLI answers this error the same way.
public struct CompressedEndRefused: Error {
    public init() {}
}

extension QcowFormat: CompressedClusterWriting {
    public var compressedClusterSize: UInt64 { cs }

    public func makeClusterCompressor() -> ClusterCompressor {
        // qemu's qcow and qcow2 deflate alike (raw deflate, 4 KiB window, memLevel 9, default level).
        Qcow2Compressor(type: Qcow2.compressionZlib, clusterSize: Int(cs))
    }

    /// qcow_co_pwritev_compressed after compressing: the stream goes at the file end rounded up to a sector,
    /// and the L2 entry records its offset and length.
    public func writeCompressed(clusterIndex: UInt64, compressedBytes: [UInt8]) throws {
        try checkWritable()
        decompressedEntry = nil
        let pos = try clusterIndex.multiplied(by: cs)
        var p = Pending()
        let tableOffset = try tableForWrite(pos, pending: &p)
        let index = Int((pos >> clusterBits) & (l2Entries - 1))
        let entry = try l2Table(at: tableOffset)[index]
        let host: UInt64
        if entry == 0 {
            host = sectorLength
            try QcowFormat.checkRequest(host, UInt64(compressedBytes.count))
            fileLength = host + UInt64(compressedBytes.count)
            let value = host | QcowHeader.compressedFlag | (UInt64(compressedBytes.count) << (63 - clusterBits))
            try file.write(compressedBytes, at: host)
            try setEntry(tableOffset, index, value, pending: &p)
        } else {
            // qemu reuses whatever the entry holds.
            host = entry & offsetMask
            try QcowFormat.checkRequest(host, UInt64(compressedBytes.count))
            try file.write(compressedBytes, at: host)
            fileLength = max(fileLength, host + UInt64(compressedBytes.count))
        }
        try commit(p)
    }

    public func finishCompressedWrites() throws {
        throw CompressedEndRefused()
    }
}

extension QcowFormat: ImageEmptiable {
    /// qcow_make_empty: the whole L1 table zeroed, then the file cut right after it.
    public func makeEmpty() throws {
        try checkWritable()
        let bytes = try l1Size.multiplied(by: 8)
        try QcowFormat.checkRequest(header.l1TableOffset, bytes)
        let chunk = [UInt8](repeating: 0, count: Int(min(bytes, 1 << 20)))
        var done: UInt64 = 0
        while done < bytes {
            let n = min(bytes - done, UInt64(chunk.count))
            try chunk.withUnsafeBytes {
                try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)]), at: header.l1TableOffset + done)
            }
            done += n
        }
        try file.sync()
        try file.truncate(to: header.l1TableOffset + bytes)
        fileLength = header.l1TableOffset + bytes
        for i in l1.indices { l1[i] = 0 }
        l1Beyond = [:]
        cache = [:]
        cacheOrder = []
        decompressedEntry = nil
    }
}
