import Glibc

/// Parallels writes as qemu 7.2's allocate_clusters places them: a run of unallocated clusters goes at the data
/// end, in guest order; when it passes the file's end the file first grows by the run plus `prealloc-size`
/// (zeroed space: fallocate, or a plain truncate with prealloc-mode=truncate); with a backing file the whole run
/// is first copied from it. The BAT blocks that changed are written after the data (qemu writes them at the next
/// flush); close clears the in-use flag and truncates the file to the data end.
extension ParallelsFormat {
    func checkWritable() throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try checkWritable()
        var done: UInt64 = 0
        let total = UInt64(buffer.count)
        var allocated = false
        while done < total {
            let pos = offset + done
            var (host, n) = run(pos, total - done)
            if host == nil {
                host = try allocateClusters(pos, n, backing: backing)
                allocated = true
            }
            guard let h = host else { throw InstarError(.io, strerrorString(EIO), errno: EIO) }
            try file.write(UnsafeRawBufferPointer(rebasing: buffer[Int(done)..<Int(done + n)]), at: h)
            done += n
        }
        if allocated { try writeDirtyBlocks() }
    }

    /// allocate_clusters for an unallocated run [pos, pos + n): returns the host offset of `pos`.
    private func allocateClusters(_ pos: UInt64, _ n: UInt64, backing: GuestReader?) throws -> UInt64 {
        let idx = pos / clusterSize
        let toAllocate = (pos + n).divCeil(clusterSize) - idx
        // qemu asserts the run lies inside the BAT; a header whose size outgrows its BAT fails here instead.
        guard idx < UInt64(batSize), idx + toAllocate <= UInt64(batSize) else {
            throw InstarError(.io, "Parallels BAT has no entry for offset \(pos)", errno: EIO)
        }
        var space = toAllocate * tracks
        let length = try file.size().divCeil(512)
        let end = try dataEnd.adding(space)
        if end > length {
            space = try space.adding(preallocSize)
            let newEnd = try (try dataEnd.adding(space)).multiplied(by: 512)
            if preallocMode == .truncate {
                try file.truncate(to: newEnd)
            } else {
                // A zeroing write: existing bytes in the range become zeroes, the rest is allocated.
                let start = try dataEnd.multiplied(by: 512)
                let fileLength = try file.size()
                if fileLength > start {
                    try file.writeZeroes(at: start, length: min(fileLength, newEnd) - start)
                }
                let from = max(start, fileLength)
                if newEnd > from { try file.allocate(at: from, length: newEnd - from) }
            }
        }
        if let b = backing {
            // The whole run, copied from the backing file first (1 MiB at a time).
            let bytes = toAllocate * clusterSize
            let dest = try dataEnd.multiplied(by: 512)
            var chunk = [UInt8](repeating: 0, count: Int(min(bytes, 1 << 20)))
            var off: UInt64 = 0
            while off < bytes {
                let k = Int(min(bytes - off, UInt64(chunk.count)))
                try chunk.withUnsafeMutableBytes { c in
                    try b.read(into: UnsafeMutableRawBufferPointer(rebasing: c[0..<k]), at: idx * clusterSize + off)
                }
                try chunk.withUnsafeBytes { c in
                    try file.write(UnsafeRawBufferPointer(rebasing: c[0..<k]), at: dest + off)
                }
                off += UInt64(k)
            }
        }
        for i in 0..<toAllocate {
            setEntry(idx + i, UInt32(truncatingIfNeeded: dataEnd / offMultiplier))
            dataEnd = try dataEnd.adding(tracks)
        }
        return hostOffset(entry(idx)) + pos % clusterSize
    }

    /// parallels has no zero writes of its own: the block layer writes buffers of zeroes, which allocate.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        try checkWritable()
        let chunk = [UInt8](repeating: 0, count: Int(min(length, 1 << 20)))
        var done: UInt64 = 0
        while done < length {
            let n = min(length - done, UInt64(chunk.count))
            try chunk.withUnsafeBytes {
                try write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)]), at: offset + done, backing: backing)
            }
            done += n
        }
    }

    /// parallels_co_flush_to_os, then the file's flush.
    public func flush() throws {
        guard writable else { return }
        try writeDirtyBlocks()
        dirtyBlocks.removeAll()
        try file.sync()
    }

    /// parallels_close: the header with the in-use flag cleared, then the file cut at the data end (errors
    /// ignored, as qemu ignores them).
    public func close() throws {
        guard writable else { return }
        try flush()
        setHeaderU32(0, at: 44)
        try updateHeader()
        let (end, overflow) = dataEnd.multipliedReportingOverflow(by: 512)
        if !overflow && end <= ParallelsFormat.maxLength {
            try? file.truncate(to: end)
        }
    }
}
