import CZlib
import Glibc

/// Writing vmdk images as qemu's vmdk_pwritev does: grains allocated at the end of the extent file (the
/// backing file's bytes or zeroes around the request first, then the data, then the grain table entry in both
/// grain tables), compressed grains with markers in streamOptimized extents, zeroed-grain entries for zero
/// writes, and a new random CID in the descriptor on the first write of each open.
extension VmdkFormat {
    static let grainMarkerSize = 12

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        guard writable else { throw InstarError(.permission, "Image is read-only") }
        try checkWriteOffset(offset)
        var done = 0
        var pos = offset
        while done < buffer.count {
            guard let e = extent(forSector: pos >> 9) else { throw VmdkFormat.ioError() }
            if e.kind == .seSparse { throw InstarError(.unsupported, "Operation not supported", errno: ENOTSUP) }
            let inCluster = e.offsetInCluster(pos)
            let n = Int(min(UInt64(buffer.count - done), e.clusterBytes - inCluster))
            let part = UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)])
            if e.compressed {
                try writeCompressedGrain(e, part, at: pos, preCompressed: nil)
            } else {
                try writePlain(e, part, at: pos, inCluster: inCluster, backing: backing)
            }
            done += n
            pos += UInt64(n)
            try updateCIDOnce()
        }
    }

    func checkWriteOffset(_ offset: UInt64) throws {
        let total = virtualSize / 512
        if offset.divCeil(512) > total {
            Diagnostics.plain("Wrong offset: offset=0x\(String(offset, radix: 16)) total_sectors=0x\(String(total, radix: 16))")
            throw VmdkFormat.ioError()
        }
    }

    /// One piece inside one grain of an uncompressed extent.
    private func writePlain(_ e: VmdkExtent, _ data: UnsafeRawBufferPointer, at pos: UInt64, inCluster: UInt64,
                            backing: GuestReader?) throws {
        let (l, slot) = try e.lookup(pos)
        switch l {
        case .error:
            throw VmdkExtent.invalid()
        case .allocated(let host):
            try e.file.write(data, at: try host.adding(inCluster))
            e.nextClusterSector = max(e.nextClusterSector, try host.adding(inCluster).adding(UInt64(data.count)).divCeil(512))
        case .unallocated, .zeroed:
            // A grain table that does not exist: qemu would write nowhere sensible; refuse.
            guard let slot = slot else { throw VmdkFormat.ioError() }
            let host = try allocateGrain(e)
            // get_whole_cluster: the rest of the grain from the backing file (unless it was a zeroed grain) or
            // zeroes, around the request.
            let cb = Int(e.clusterBytes)
            let grainStart = pos - inCluster
            let skipStart = Int(inCluster)
            let skipEnd = skipStart + data.count
            if let b = backing { try checkParentCID(b) }
            // A step at a time (a hostile header may give grains of up to 1 GiB): each piece of the grain outside
            // the request is read from the backing file (or left zero) and written.
            let fromBacking = l != .zeroed ? backing : nil
            var scratch = [UInt8](repeating: 0, count: min(cb, VmdkExtent.inflateStep))
            for (from, to) in [(0, skipStart), (skipEnd, cb)] {
                var at = from
                while at < to {
                    let n = min(scratch.count, to - at)
                    try scratch.withUnsafeMutableBytes { raw in
                        let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<n])
                        if let b = fromBacking { try b.read(into: part, at: grainStart + UInt64(at)) }
                        try e.file.write(UnsafeRawBufferPointer(part), at: host + UInt64(at))
                    }
                    at += n
                }
            }
            try e.file.write(data, at: host + inCluster)
            e.nextClusterSector = max(e.nextClusterSector, (host + inCluster + UInt64(data.count)).divCeil(512))
            try updateGrainTable(e, slot, UInt32(truncatingIfNeeded: host >> 9))
        }
    }

    /// The next grain of an extent (get_cluster_offset's allocation).
    private func allocateGrain(_ e: VmdkExtent) throws -> UInt64 {
        if e.nextClusterSector >= VmdkExtent.maxSectors { throw VmdkExtent.invalid() }
        let s = e.nextClusterSector
        e.nextClusterSector = try s.adding(e.clusterSectors)
        return s << 9
    }

    /// vmdk_L2update: the entry in the grain table and its redundant copy, then a flush.
    func updateGrainTable(_ e: VmdkExtent, _ slot: VmdkExtent.TableSlot, _ value: UInt32) throws {
        var le = [UInt8](repeating: 0, count: 4)
        le.putU32le(value, at: 0)
        let at = try (slot.l2Offset << 9).adding(UInt64(slot.l2Index * 4))
        try e.file.write(le, at: at)
        if e.l1BackupOffset != 0 {
            let backupTable = slot.l1Index < e.l1Backup.count ? UInt64(e.l1Backup[slot.l1Index]) : 0
            try e.file.write(le, at: try (backupTable << 9).adding(UInt64(slot.l2Index * 4)))
        }
        try e.file.sync()
        e.updateCachedEntry(slot, value)
    }

    /// A grain of a streamOptimized extent: compressed (unless `preCompressed` already is), behind a marker.
    func writeCompressedGrain(_ e: VmdkExtent, _ data: UnsafeRawBufferPointer, at pos: UInt64,
                              preCompressed: [UInt8]?) throws {
        let (l, slot) = try e.lookup(pos)
        if case .allocated = l {
            Diagnostics.plain("Could not write to allocated cluster for streamOptimized")
            throw VmdkFormat.ioError()
        }
        if l == .error { throw VmdkExtent.invalid() }
        guard let slot = slot else { throw VmdkFormat.ioError() }
        let host = try allocateGrain(e)
        let inCluster = e.offsetInCluster(pos)
        let count = UInt64(data.count)
        if inCluster != 0 || count > e.clusterBytes || (count < e.clusterBytes && pos + count != e.endSector * 512) {
            throw VmdkExtent.invalid()
        }
        if !e.hasMarker { throw VmdkExtent.invalid() }
        let compressed: [UInt8]
        if let c = preCompressed { compressed = c } else { compressed = try VmdkCompressor.deflate(data) }
        var out = [UInt8](repeating: 0, count: VmdkFormat.grainMarkerSize + compressed.count)
        out.putU64le(pos >> 9, at: 0)
        out.putU32le(UInt32(compressed.count), at: 8)
        out.replaceSubrange(VmdkFormat.grainMarkerSize..<out.count, with: compressed)
        try e.file.write(out, at: host)
        // qemu writes a whole zeroed grain before the marker: what lies past the marker up to the grain's end
        // is zeroes, and the file reaches the grain's end.
        let dataEnd = host + UInt64(out.count)
        let grainEnd = host + e.clusterBytes
        let fileEnd = try e.file.size()
        let zeroFrom = max(dataEnd, min(fileEnd, grainEnd))
        if zeroFrom < grainEnd {
            try e.file.write([UInt8](repeating: 0, count: Int(grainEnd - zeroFrom)), at: zeroFrom)
        }
        e.nextClusterSector = dataEnd.divCeil(512)
        try updateGrainTable(e, slot, UInt32(truncatingIfNeeded: host >> 9))
    }

    /// vmdk_write_cid with a random CID, once per open, after the first write.
    func updateCIDOnce() throws {
        if cidUpdated { return }
        try writeCID(UInt32.random(in: 0...UInt32.max))
        cidUpdated = true
    }

    func writeCID(_ newCID: UInt32) throws {
        var size = VmdkFormat.descWindow
        if descOffset == 0 {
            // bdrv_getlength: the file's length in whole sectors.
            let length = try (try file.size()).alignedUp(512)
            if length > 16 << 20 {
                Diagnostics.plain("VMDK description file too big")
                throw InstarError(.range, "File too large", errno: EFBIG)
            }
            size = Int(length)
        }
        guard size > 0 else { throw VmdkDescriptor.invalidArgument() }
        var desc = try file.readBytes(at: descOffset, count: size)
        desc[size - 1] = 0
        let text = VmdkDescriptor(bytes: desc)
        guard let parentAt = text.find("parentCID") else { throw VmdkDescriptor.invalidArgument() }
        let tail = Array(text.text[parentAt...])
        if let c = text.find("CID") {
            // snprintf("%x\n") after "CID=", then the text from "parentCID" appended (pstrcat), all within the
            // buffer; bytes past the new end keep their old contents.
            var p = c + 4
            let number = Array((String(newCID, radix: 16) + "\n").utf8)
            for b in number where p < size - 1 {
                desc[p] = b
                p += 1
            }
            if p < size { desc[p] = 0 }
            for b in tail where p < size - 1 {
                desc[p] = b
                p += 1
            }
            if p < size { desc[p] = 0 }
        }
        try file.write(desc, at: descOffset)
        try file.sync()
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        guard writable else { throw InstarError(.permission, "Image is read-only") }
        // The block layer's pwrite_zeroes_alignment (the grain size): whole grains of extents with the zeroed-grain
        // feature become zeroed entries; everything else is written as zeroes.
        var pos = offset
        let end = try offset.adding(length)
        while pos < end {
            guard let e = extent(forSector: pos >> 9) else { throw VmdkFormat.ioError() }
            let inCluster = e.offsetInCluster(pos)
            let n = min(end - pos, e.clusterBytes - inCluster)
            if !e.isFlat && !e.compressed && e.hasZeroGrain && inCluster == 0 && n == e.clusterBytes {
                try checkWriteOffset(pos)
                let (l, slot) = try e.lookup(pos)
                if l == .error { throw VmdkExtent.invalid() }
                if l != .zeroed {
                    guard let slot = slot else { throw VmdkFormat.ioError() }
                    try updateGrainTable(e, slot, VmdkExtent.gteZeroed)
                }
                try updateCIDOnce()
            } else {
                let zeros = [UInt8](repeating: 0, count: Int(min(n, 1 << 20)))
                var done: UInt64 = 0
                while done < n {
                    let k = min(n - done, UInt64(zeros.count))
                    try zeros.withUnsafeBytes { try write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(k)]),
                                                          at: pos + done, backing: backing) }
                    done += k
                }
            }
            pos += n
        }
    }

    public func flush() throws {
        try file.sync()
        for f in extraFiles { try f.sync() }
    }

    public var compressedWrites: CompressedClusterWriting? {
        guard let first = extents.first, first.compressed,
              extents.allSatisfy({ $0.compressed && $0.clusterSectors == first.clusterSectors }) else { return nil }
        return VmdkCompressedWriter(image: self, clusterBytes: first.clusterBytes)
    }
}

/// zlib's compress() at its default level, as qemu's vmdk_write_extent calls it.
struct VmdkCompressor: ClusterCompressor {
    static func deflate(_ input: UnsafeRawBufferPointer) throws -> [UInt8] {
        var outLen = compressBound(uLong(input.count))
        var out = [UInt8](repeating: 0, count: Int(outLen))
        let rc = out.withUnsafeMutableBytes { dst -> Int32 in
            guard let d = dst.baseAddress else { return Z_BUF_ERROR }
            let src = input.baseAddress ?? UnsafeRawPointer(d)
            return CZlib.compress(d.assumingMemoryBound(to: Bytef.self), &outLen, src.assumingMemoryBound(to: Bytef.self),
                            uLong(input.count))
        }
        guard rc == Z_OK, outLen > 0 else { throw VmdkExtent.invalid() }
        out.removeSubrange(Int(outLen)...)
        return out
    }

    func compress(_ input: UnsafeRawBufferPointer) throws -> [UInt8]? { try VmdkCompressor.deflate(input) }
}

/// convert's compressed write side for streamOptimized targets (every write of such an image is compressed:
/// qemu's needs_compressed_writes).
final class VmdkCompressedWriter: CompressedClusterWriting {
    let image: VmdkFormat
    let compressedClusterSize: UInt64
    init(image: VmdkFormat, clusterBytes: UInt64) {
        self.image = image
        compressedClusterSize = clusterBytes
    }
    var needsCompressedWrites: Bool { true }
    var compressesExactLength: Bool { true }
    func makeClusterCompressor() -> ClusterCompressor { VmdkCompressor() }

    func writeCompressed(clusterIndex: UInt64, compressedBytes: [UInt8]) throws {
        let pos = try clusterIndex.multiplied(by: compressedClusterSize)
        try image.checkWriteOffset(pos)
        guard let e = image.extent(forSector: pos >> 9) else { throw VmdkFormat.ioError() }
        let count = min(compressedClusterSize, e.endSector * 512 - pos)
        // The data itself is already compressed; only its length is checked against the grain.
        try image.writeCompressedGrainLength(e, count: count, at: pos, compressed: compressedBytes)
        try image.updateCIDOnce()
    }

    /// The empty compressed write that ends a convert: every extent file's end aligned to a sector.
    func finishCompressedWrites() throws {
        for e in image.extents {
            let length = try e.file.size()
            let aligned = try length.alignedUp(512)
            if aligned != length { try e.file.truncate(to: aligned) }
        }
    }
}

extension VmdkFormat {
    /// `writeCompressedGrain` for data compressed elsewhere (`count` guest bytes).
    func writeCompressedGrainLength(_ e: VmdkExtent, count: UInt64, at pos: UInt64, compressed: [UInt8]) throws {
        // A view of `count` bytes is only used for its length.
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(max(count, 1)), alignment: 16)
        defer { scratch.deallocate() }
        try writeCompressedGrain(e, UnsafeRawBufferPointer(rebasing: scratch[0..<Int(count)]), at: pos,
                                 preCompressed: compressed)
    }
}
