import Glibc

/// QED writes, in qemu's order: data clusters are appended at the end of the file (with the untouched parts of
/// the clusters copied from the backing file, or zeroes), then a new L2 table if the range had none, then the
/// L1 entry. Without a backing file the need-check flag is set before the first allocation and cleared at close;
/// with one, the data is flushed before the tables point at it.
extension QedFormat {
    func checkWritable() throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try checkWritable()
        let end = try offset.adding(UInt64(buffer.count))
        if offset % 512 == 0 && end % 512 == 0 {
            return try writeSectors(buffer, at: offset, backing: backing)
        }
        // qed takes whole sectors: qemu's block layer pads a request with the current contents of its first
        // and last sectors (which for a zero cluster are zeroes, where a cluster copy would take the backing
        // file's bytes) and sends one request.
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
        try padded.withUnsafeBytes { try writeSectors($0, at: a0, backing: backing) }
    }

    private func writeSectors(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        var done: UInt64 = 0
        let total = UInt64(buffer.count)
        while done < total {
            let pos = offset + done
            let (kind, host, len) = try findCluster(pos, total - done)
            guard len > 0 else { throw invalidOffset() }
            let part = UnsafeRawBufferPointer(rebasing: buffer[Int(done)..<Int(done + len)])
            switch kind {
            case .found:
                try file.write(part, at: host + (pos & (cs - 1)))
            case .zero, .missingL1, .missingL2:
                try allocatingWrite(kind, pos: pos, data: part, backing: backing)
            }
            done += len
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        try checkWritable()
        // The block layer's split (bdrv_co_do_pwrite_zeroes with cluster alignment): an unaligned head or tail
        // is written as a buffer of zeroes, the aligned middle as zero clusters.
        var pos = offset
        var end = try offset.adding(length)
        // bdrv_co_do_zero_pwritev: partial sectors at either end are written as data (read, zeroed, written).
        if pos % 512 != 0 {
            let stop = min(end, (pos & ~511) + 512)
            try writeZeroBuffer(at: pos, length: stop - pos, backing: backing)
            pos = stop
        }
        var tail: UInt64 = 0
        if end % 512 != 0 && end > pos {
            tail = end - max(end & ~511, pos)
            end -= tail
        }
        let maxZero = UInt64(Int32.max) & ~(cs - 1)
        while pos < end {
            let head = pos & (cs - 1)
            var num = end - pos
            if head != 0 {
                num = min(num, cs - head)
                try writeZeroBuffer(at: pos, length: num, backing: backing)
            } else if num < cs {
                try writeZeroBuffer(at: pos, length: num, backing: backing)
            } else {
                num = min(num & ~(cs - 1), maxZero)
                try zeroClusters(at: pos, length: num, backing: backing)
            }
            pos += num
        }
        if tail > 0 { try writeZeroBuffer(at: end, length: tail, backing: backing) }
    }

    private func writeZeroBuffer(at pos: UInt64, length: UInt64, backing: GuestReader?) throws {
        let zeroes = [UInt8](repeating: 0, count: Int(length))
        try zeroes.withUnsafeBytes { try write($0, at: pos, backing: backing) }
    }

    /// qemu's QED_AIOCB_ZERO requests over whole clusters.
    private func zeroClusters(at offset: UInt64, length: UInt64, backing: GuestReader?) throws {
        var done: UInt64 = 0
        while done < length {
            let pos = offset + done
            let (kind, host, len) = try findCluster(pos, length - done)
            guard len > 0 else { throw invalidOffset() }
            switch kind {
            case .found:
                let zeroes = [UInt8](repeating: 0, count: Int(min(len, 1 << 20)))
                var off: UInt64 = 0
                while off < len {
                    let n = min(len - off, UInt64(zeroes.count))
                    try zeroes.withUnsafeBytes {
                        try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)]), at: host + off)
                    }
                    off += n
                }
            case .zero:
                break
            case .missingL1, .missingL2:
                try setNeedCheckIfNeeded(backing: backing)
                try updateTables(kind, pos: pos, clusters: len.divCeil(cs), first: 1)
            }
            done += len
        }
    }

    private func setNeedCheckIfNeeded(backing: GuestReader?) throws {
        // With a backing file the flush before the table update keeps the image consistent instead.
        guard backing == nil, header.features & QedHeader.featureNeedCheck == 0 else { return }
        header.features |= QedHeader.featureNeedCheck
        try writeHeader()
    }

    /// qed_aio_write_alloc for data: new clusters at the end of the file, filled around `data` from the layer
    /// below, then linked into the tables.
    private func allocatingWrite(_ kind: Kind, pos: UInt64, data: UnsafeRawBufferPointer, backing: GuestReader?) throws {
        let into = pos & (cs - 1)
        let len = UInt64(data.count)
        let n = (into + len).divCeil(cs)
        let cluster = fileSize
        fileSize = try fileSize.adding(try n.multiplied(by: cs))
        try setNeedCheckIfNeeded(backing: backing)
        // Front and back of the new clusters from the backing file (zeroes without one).
        if into > 0 {
            try copyFromBacking(guest: pos - into, length: into, to: cluster, backing: backing)
        }
        let tail = pos + len
        let tailEnd = (tail + cs - 1) & ~(cs - 1)
        if tailEnd > tail {
            try copyFromBacking(guest: tail, length: tailEnd - tail, to: cluster + into + len, backing: backing)
        }
        try file.write(data, at: cluster + into)
        if backing != nil { try file.sync() }
        try updateTables(kind, pos: pos, clusters: n, first: cluster)
    }

    private func copyFromBacking(guest: UInt64, length: UInt64, to host: UInt64, backing: GuestReader?) throws {
        var buf = [UInt8](repeating: 0, count: Int(length))
        try buf.withUnsafeMutableBytes { try readBacking(into: $0, at: guest, backing: backing) }
        try file.write(buf, at: host)
    }

    /// qed_aio_write_l2_update: points `clusters` entries from `pos` at `first` (an offset, consecutive, or the
    /// zero marker 1), in a new L2 table when the range has none.
    private func updateTables(_ kind: Kind, pos: UInt64, clusters: UInt64, first: UInt64) throws {
        let index = (pos >> l2Shift) & (tableEntries - 1)
        let count = min(clusters, tableEntries - index)
        let l1Index = Int(pos >> l1Shift)
        guard l1Index < l1.count else { throw invalidOffset() }
        var table: [UInt64]
        var tableOffset: UInt64
        let fresh = kind == .missingL1
        if fresh {
            tableOffset = fileSize
            fileSize = try fileSize.adding(tableBytes)
            table = [UInt64](repeating: 0, count: Int(tableEntries))
        } else {
            tableOffset = l1[l1Index]
            table = try l2Table(at: tableOffset)
        }
        var value = first
        for i in Int(index)..<Int(index + count) {
            table[i] = value
            if value > 1 { value += cs }
        }
        if fresh {
            try writeTable(table, at: tableOffset, index: 0, count: tableEntries)
            try file.sync()
            storeCached(tableOffset, table)
            l1[l1Index] = tableOffset
            try writeTable(l1, at: header.l1TableOffset, index: UInt64(l1Index), count: 1)
        } else {
            storeCached(tableOffset, table)
            try writeTable(table, at: tableOffset, index: index, count: count)
        }
    }

    public func flush() throws {
        if writable { try file.sync() }
    }

    /// bdrv_qed_close: everything reaches the disk, then the image is marked clean.
    public func close() throws {
        guard writable else { return }
        try file.sync()
        if header.features & QedHeader.featureNeedCheck != 0 {
            header.features &= ~QedHeader.featureNeedCheck
            try writeHeader()
            try file.sync()
        }
    }
}

extension QedFormat: ImageResizable {
    public func resize(to newSize: UInt64, preallocation: ResizePreallocation, backing: GuestReader?) throws {
        // bdrv_co_truncate asks for zeroed new space when a longer backing file would show through; qed
        // cannot do that.
        if newSize > header.imageSize, let b = backing, b.virtualSize > header.imageSize {
            throw InstarError(.unsupported, "Block driver does not support requested flags", errno: ENOTSUP)
        }
        if preallocation != .off {
            throw InstarError(.unsupported, "Unsupported preallocation mode '\(preallocation.rawValue)'", errno: ENOTSUP)
        }
        guard QedHeader.imageSizeValid(newSize, clusterSize: header.clusterSize, tableSize: header.tableSize) else {
            throw InstarError(.invalid, "Invalid image size specified", errno: EINVAL)
        }
        if newSize < header.imageSize {
            throw InstarError(.unsupported, "Shrinking images is currently not supported", errno: ENOTSUP)
        }
        try checkWritable()
        let old = header.imageSize
        header.imageSize = newSize
        do {
            try writeHeader()
        } catch let e as InstarError {
            header.imageSize = old
            throw InstarError(e.code, "Failed to update the image size: \(strerrorString(e.errnoValue))",
                              errno: e.errnoValue)
        }
    }
}

extension QedFormat: BackingFileChangeable {
    /// bdrv_qed_change_backing_file: the header and the name after it, rewritten in one write.
    public func changeBackingFile(_ name: String?, format: String?) throws {
        if name != nil && header.compatFeatures != 0 {
            throw InstarError(.unsupported, strerrorString(ENOTSUP), errno: ENOTSUP)
        }
        var h = header
        h.features &= ~(QedHeader.featureBackingFile | QedHeader.featureBackingRaw)
        let nameBytes = name.map { Array($0.utf8) } ?? []
        if name != nil {
            h.features |= QedHeader.featureBackingFile
            if format == "raw" { h.features |= QedHeader.featureBackingRaw }
        }
        h.backingNameOffset = UInt32(QedHeader.size)
        let total = UInt64(QedHeader.size) + UInt64(nameBytes.count)
        guard total <= UInt64(h.headerSize) * UInt64(h.clusterSize), nameBytes.count < Int(UInt32.max) else {
            throw InstarError(.io, strerrorString(ENOSPC), errno: ENOSPC)
        }
        h.backingNameSize = UInt32(nameBytes.count)
        try checkWritable()
        try file.sync()
        try file.write(h.bytes + nameBytes, at: 0)
        try file.sync()
        header = h
        backingReference = name.map {
            BackingReference(filename: $0, format: h.features & QedHeader.featureBackingRaw != 0 ? "raw" : nil)
        }
    }
}
