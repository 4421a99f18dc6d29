import Glibc

/// VHDX images, as qemu 7.2's block/vhdx.c reads and writes them: dynamic and fixed images with 512-byte
/// logical sectors (differencing images are refused, as qemu refuses them), the two headers chosen by sequence
/// number, the region table, the metadata items, the BAT with its interleaved sector bitmap entries, and the log
/// (replayed at a writable open, refused read-only). Writes allocate payload blocks at the end of the file and
/// update the BAT through the log, as qemu does. There is no block status: qemu reports the whole image as data.
public final class VhdxFormat: ImageFormat {
    public static let descriptor = FormatDescriptor(
        name: "vhdx",
        probe: { header, _ in
            // vhdx_probe: the file type identifier.
            header.count >= 8 && header.prefix(8).elementsEqual(Array("vhdxfile".utf8)) ? 100 : 0
        },
        open: { try VhdxFormat(request: $0) })
        // qemu's driver has no options of its own: any fails the open, after the backing chain.
        .knowing { _ in false }

    public let formatName = "vhdx"
    let file: HostFile
    let filename: String
    let writable: Bool
    var headers: [VhdxHeader]
    var currentHeader: Int
    /// Registered regions (start, end), newest last; overlap checks walk them newest first as qemu's list does.
    var regions: [(start: UInt64, end: UInt64)] = []
    var batRegion = VhdxRegion(guid: Vhdx.batGUID, fileOffset: 0, length: 0, dataBits: 0)
    var metadataRegion = VhdxRegion(guid: Vhdx.metadataGUID, fileOffset: 0, length: 0, dataBits: 0)
    var blockSize: UInt64 = 0
    var blockSizeBits: UInt64 = 0
    var sectorsPerBlock: UInt64 = 0
    var sectorsPerBlockBits: UInt64 = 0
    var chunkRatio: UInt64 = 0
    var chunkRatioBits: UInt64 = 0
    var virtualDiskSize: UInt64 = 0
    var logicalSectorSize: UInt32 = 0
    var physicalSectorSize: UInt32 = 0
    var paramsDataBits: UInt32 = 0
    var batEntries: UInt64 = 0
    /// The BAT entries that lie inside the file; entries past its end read as zero (not present).
    var bat: [UInt64] = []
    var firstVisibleWrite = true
    let sessionGUID: [UInt8]
    var log = VhdxLogState()
    var logReplayedOnOpen = false

    public var hostFiles: [HostFile] { [file] }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }
    /// qemu's total_sectors: the virtual disk size in 512-byte sectors.
    public var virtualSize: UInt64 { virtualDiskSize / 512 * 512 }

    /// The "Could not open 'NAME': <strerror>" qemu's block layer reports for a driver that sets no message.
    func openError(_ e: Int32) -> InstarError {
        let base = Vhdx.errnoError(e)
        return InstarError(base.code, "Could not open '\(filename)': \(base.message)", errno: e)
    }

    static func errorReport(_ text: String) {
        Diagnostics.sink?(Diagnostics.Message(text + "\n", prefixed: true))
    }

    init(request: OpenRequest) throws {
        file = request.file
        filename = request.filename
        writable = request.writable
        sessionGUID = Vhdx.newGUID()
        headers = []
        currentHeader = 0
        do {
            let sig = try file.readZeroPaddedBytes(at: 0, count: 8)
            guard sig.elementsEqual(Array("vhdxfile".utf8)) else { throw openError(EINVAL) }
            try parseHeaders()
            try parseLog(readOnlyName: request.writable ? nil : request.filename)
            try openRegionTables()
            try parseMetadata()
            try loadBAT()
            if !request.options.check {
                var none: Int64? = nil
                if try checkBATEntries(errorCount: &none) != 0 { throw openError(EINVAL) }
            }
        } catch let e as InstarError where e.errnoValue != 0 && e.message == strerrorString(e.errnoValue) {
            // A failed read or check with no message of its own: qemu's block layer names the image.
            throw openError(e.errnoValue)
        }
    }

    // MARK: headers

    func parseHeaders() throws {
        var parsed: [VhdxHeader?] = []
        var raw: [VhdxHeader] = []
        for off in [Vhdx.header1Offset, Vhdx.header2Offset] {
            let buf = try file.readZeroPaddedBytes(at: off, count: Vhdx.headerSize)
            let h = try VhdxHeader(bytes: buf)
            raw.append(h)
            if CRC32C.isValid(buf, crcOffset: 4), h.signature == Vhdx.headerSignature, h.version == 1 {
                parsed.append(h)
            } else {
                parsed.append(nil)
            }
        }
        let noHeader = InstarError(.invalid, "No valid VHDX header found", errno: EINVAL)
        switch (parsed[0], parsed[1]) {
        case (.some, nil): currentHeader = 0
        case (nil, .some): currentHeader = 1
        case (nil, nil): throw noHeader
        case let (.some(a), .some(b)):
            if a.sequenceNumber > b.sequenceNumber {
                currentHeader = 0
            } else if b.sequenceNumber > a.sequenceNumber {
                currentHeader = 1
            } else if a == b {
                currentHeader = 0
            } else {
                throw noHeader
            }
        }
        headers = raw
        let h = headers[currentHeader]
        register(start: h.logOffset, length: UInt64(h.logLength))
    }

    var header: VhdxHeader { headers[currentHeader] }

    func register(start: UInt64, length: UInt64) {
        regions.append((start, start &+ length))
    }

    /// vhdx_region_check: whether [start, start+length) overlaps a registered region; reports the first it finds.
    func regionOverlaps(start: UInt64, length: UInt64) -> Bool {
        let end = start &+ length
        for r in regions.reversed() where !(start >= r.end || end <= r.start) {
            // qemu's format prints the region's end with "%.lu": a zero end prints as nothing.
            let rEnd = r.end == 0 ? "" : "\(r.end)"
            VhdxFormat.errorReport("VHDX region \(start)-\(end) overlaps with region \(r.start)-\(rEnd)")
            return true
        }
        return false
    }

    /// vhdx_write_header + vhdx_update_header (twice, as the spec asks): the inactive header gets the next
    /// sequence number, the session's file write GUID, optionally a new data write GUID and a log GUID.
    func updateHeaders(newDataGUID: Bool, logGUID: [UInt8]?) throws {
        for _ in 0..<2 {
            let idx = currentHeader == 0 ? 1 : 0
            let offset = idx == 0 ? Vhdx.header1Offset : Vhdx.header2Offset
            var h = headers[idx]
            h.sequenceNumber = headers[currentHeader].sequenceNumber &+ 1
            h.fileWriteGUID = sessionGUID
            if newDataGUID { h.dataWriteGUID = Vhdx.newGUID() }
            if let g = logGUID { h.logGUID = g }
            let base = try file.readZeroPaddedBytes(at: offset, count: Vhdx.headerSize)
            let block = h.encoded(over: base)
            try file.write(Array(block[0..<Vhdx.headerStructSize]), at: offset)
            try file.sync()
            headers[idx] = h
            currentHeader = idx
        }
    }

    func userVisibleWrite() throws {
        if firstVisibleWrite {
            firstVisibleWrite = false
            try updateHeaders(newDataGUID: true, logGUID: nil)
        }
    }

    // MARK: region table and metadata

    func openRegionTables() throws {
        let buf = try file.readZeroPaddedBytes(at: Vhdx.regionTable1Offset, count: Int(Vhdx.headerBlockSize))
        guard CRC32C.isValid(buf, crcOffset: 4) else { throw openError(EINVAL) }
        let r = ByteReader(buf)
        guard try r.u32le(at: 0) == Vhdx.regionSignature else { throw openError(EINVAL) }
        let count = try r.u32le(at: 8)
        guard count <= Vhdx.maxRegionEntries else { throw openError(EINVAL) }
        var batFound = false
        var metadataFound = false
        for i in 0..<Int(count) {
            let o = 16 + i * 32
            let e = VhdxRegion(guid: try r.slice(at: o, count: 16), fileOffset: try r.u64le(at: o + 16),
                               length: try r.u32le(at: o + 24), dataBits: try r.u32le(at: o + 28))
            if regionOverlaps(start: e.fileOffset, length: UInt64(e.length)) { throw openError(EINVAL) }
            register(start: e.fileOffset, length: UInt64(e.length))
            if e.guid == Vhdx.batGUID {
                if batFound { throw openError(EINVAL) }
                batFound = true
                batRegion = e
                continue
            }
            if e.guid == Vhdx.metadataGUID {
                if metadataFound { throw openError(EINVAL) }
                metadataFound = true
                metadataRegion = e
                continue
            }
            if e.dataBits & Vhdx.regionRequired != 0 { throw openError(ENOTSUP) }
        }
        if !batFound || !metadataFound { throw openError(EINVAL) }
    }

    func parseMetadata() throws {
        let buf = try file.readZeroPaddedBytes(at: metadataRegion.fileOffset, count: Vhdx.metadataTableMaxSize)
        let r = ByteReader(buf)
        guard try r.u64le(at: 0) == Vhdx.metadataSignature else { throw openError(EINVAL) }
        let count = Int(try r.u16le(at: 10))
        guard count * 32 <= Vhdx.metadataTableMaxSize - 32 else { throw openError(EINVAL) }
        var found: [[UInt8]: UInt32] = [:]
        let known = [Vhdx.fileParamGUID, Vhdx.virtualSizeGUID, Vhdx.page83GUID, Vhdx.logicalSectorGUID,
                     Vhdx.physSectorGUID, Vhdx.parentLocatorGUID]
        for i in 0..<count {
            let o = 32 + i * 32
            let id = try r.slice(at: o, count: 16)
            let offset = try r.u32le(at: o + 16)
            let bits = try r.u32le(at: o + 24)
            if known.contains(id) {
                if found[id] != nil { throw openError(EINVAL) }
                found[id] = offset
                continue
            }
            if bits & Vhdx.metaIsRequired != 0 { throw openError(ENOTSUP) }
        }
        guard let paramsAt = found[Vhdx.fileParamGUID], let sizeAt = found[Vhdx.virtualSizeGUID],
              found[Vhdx.page83GUID] != nil, let logicalAt = found[Vhdx.logicalSectorGUID],
              let physAt = found[Vhdx.physSectorGUID] else { throw openError(ENOTSUP) }
        let hasParentLocator = found[Vhdx.parentLocatorGUID] != nil
        // Every required item and nothing more than the parent locator: qemu compares the present mask exactly.
        if hasParentLocator { throw openError(ENOTSUP) }
        func item(_ off: UInt32, _ n: Int) throws -> ByteReader {
            ByteReader(try file.readZeroPaddedBytes(at: try metadataRegion.fileOffset.adding(UInt64(off)), count: n))
        }
        let params = try item(paramsAt, 8)
        let bs = UInt64(try params.u32le(at: 0))
        paramsDataBits = try params.u32le(at: 4)
        if paramsDataBits & Vhdx.paramsHasParent != 0 {
            throw openError(hasParentLocator ? ENOTSUP : EINVAL)
        }
        virtualDiskSize = try item(sizeAt, 8).u64le(at: 0)
        logicalSectorSize = try item(logicalAt, 4).u32le(at: 0)
        physicalSectorSize = try item(physAt, 4).u32le(at: 0)
        guard bs >= Vhdx.blockSizeMin && bs <= Vhdx.blockSizeMax else { throw openError(EINVAL) }
        guard logicalSectorSize == 512 else { throw openError(ENOTSUP) }
        sectorsPerBlock = bs / 512
        chunkRatio = Vhdx.maxSectorsPerBlock * 512 / bs
        guard isPowerOfTwo(sectorsPerBlock), isPowerOfTwo(chunkRatio), isPowerOfTwo(bs) else {
            throw openError(EINVAL)
        }
        blockSize = bs
        blockSizeBits = UInt64(bs.trailingZeroBitCount)
        sectorsPerBlockBits = UInt64(sectorsPerBlock.trailingZeroBitCount)
        chunkRatioBits = UInt64(chunkRatio.trailingZeroBitCount)
    }

    /// vhdx_calc_bat_entries for an image without a parent, in qemu's 32-bit arithmetic.
    static func batEntryCount(virtualSize: UInt64, blockSize: UInt64, chunkRatioBits: UInt64) -> UInt64 {
        let dataBlocks = UInt32(truncatingIfNeeded: virtualSize.divCeil(blockSize))
        return UInt64(dataBlocks &+ ((dataBlocks &- 1) >> UInt32(chunkRatioBits)))
    }

    func loadBAT() throws {
        batEntries = VhdxFormat.batEntryCount(virtualSize: virtualDiskSize, blockSize: blockSize,
                                              chunkRatioBits: chunkRatioBits)
        guard batEntries <= UInt64(batRegion.length) / 8 else { throw openError(EINVAL) }
        // Only the entries the file holds are kept: the rest read as zero, as qemu reads past the end.
        let fileSize = try file.size()
        let inFile = batRegion.fileOffset >= fileSize ? 0 : (fileSize - batRegion.fileOffset) / 8
        let n = min(batEntries, inFile)
        guard n <= (1 << 27) else { throw openError(ENOMEM) }
        try CallBudget.reserve(Int(n) * 8, what: "the BAT")
        let bytes = try file.readZeroPaddedBytes(at: batRegion.fileOffset, count: Int(n) * 8)
        let r = ByteReader(bytes)
        bat = try (0..<Int(n)).map { try r.u64le(at: $0 * 8) }
    }

    func batEntry(_ i: UInt64) -> UInt64 { i < UInt64(bat.count) ? bat[Int(i)] : 0 }

    func setBATEntry(_ i: UInt64, _ v: UInt64) throws {
        guard i < batEntries else { throw Vhdx.errnoError(EINVAL) }
        while UInt64(bat.count) <= i { bat.append(0) }
        bat[Int(i)] = v
    }

    /// vhdx_check_bat_entries: fully present blocks must lie inside the file and outside other regions.
    /// Returns 0 or -EINVAL; with an error count, every problem is counted and reported, else the first stops.
    func checkBATEntries(errorCount: inout Int64?) throws -> Int32 {
        let fileSize = try file.nodeLength()  // bdrv_getlength: whole sectors
        var payblocks = chunkRatio
        var ret: Int32 = 0
        let total = virtualSize
        for i in 0..<UInt64(bat.count) {
            let e = bat[Int(i)]
            guard e & Vhdx.batStateMask == Vhdx.blockFullyPresent else { continue }
            let offset = e & Vhdx.batOffsetMask
            let blockLength = min(blockSize, total &- (i &* blockSize))
            if offset > UInt64(Int64.max) - blockSize {
                VhdxFormat.errorReport("VHDX BAT entry \(i) offset overflow.")
                ret = -EINVAL
                guard let c = errorCount else { break }
                errorCount = c + 1
            }
            if offset >= fileSize {
                VhdxFormat.errorReport("VHDX BAT entry \(i) start offset \(offset) points after end of file "
                                       + "(\(fileSize)). Image has probably been truncated.")
                ret = -EINVAL
                guard let c = errorCount else { break }
                errorCount = c + 1
            } else if offset &+ blockLength > fileSize {
                VhdxFormat.errorReport("VHDX BAT entry \(i) end offset \(offset &+ blockLength &- 1) points after "
                                       + "end of file (\(fileSize)). Image has probably been truncated.")
                ret = -EINVAL
                guard let c = errorCount else { break }
                errorCount = c + 1
            }
            if payblocks != 0 {
                payblocks -= 1
                if regionOverlaps(start: offset, length: blockSize) {
                    ret = -EINVAL
                    guard let c = errorCount else { break }
                    errorCount = c + 1
                }
            } else {
                payblocks = chunkRatio
            }
        }
        return ret
    }

    // MARK: reading

    /// vhdx_block_translate: the BAT index, the offset in the block and the bytes left in it.
    func translate(_ offset: UInt64) -> (batIndex: UInt64, inBlock: UInt64, left: UInt64) {
        let sector = offset / 512
        var idx = sector >> sectorsPerBlockBits
        let inBlock = offset - (idx << blockSizeBits)
        idx += idx >> chunkRatioBits
        return (idx, inBlock, blockSize - inBlock)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let t = translate(pos)
            let n = Int(min(UInt64(buffer.count - done), t.left))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            let e = batEntry(t.batIndex)
            switch e & Vhdx.batStateMask {
            case Vhdx.blockNotPresent, Vhdx.blockUndefined, Vhdx.blockUnmapped, Vhdx.blockUnmappedV095,
                 Vhdx.blockZero:
                part.initializeMemory(as: UInt8.self, repeating: 0)
            case Vhdx.blockFullyPresent:
                let host = try (e & Vhdx.batOffsetMask).adding(t.inBlock)
                try file.readZeroPadded(into: part, at: host)
            default:
                throw InstarError(.io, strerrorString(EIO), errno: EIO)
            }
            done += n
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        // No bdrv_co_block_status in qemu's driver: everything is allocated data.
        BlockStatus(length: length, allocated: true, data: true, zero: false)
    }

    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: blockSize, dirty: false)
    }

    // MARK: writing

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        if buffer.isEmpty { return }
        // The block layer works in 512-byte sectors: a partial sector is read, merged and written whole.
        let end = try offset.adding(UInt64(buffer.count))
        let start = offset / 512 * 512
        let alignedEnd = try end.alignedUp(512)
        if start != offset || alignedEnd != end {
            var merged = [UInt8](repeating: 0, count: Int(alignedEnd - start))
            try merged.withUnsafeMutableBytes { try read(into: $0, at: start, backing: nil) }
            let at = Int(offset - start)
            for (k, byte) in buffer.enumerated() { merged[at + k] = byte }
            try merged.withUnsafeBytes { try writeAligned($0, at: start) }
            return
        }
        try writeAligned(buffer, at: offset)
    }

    func writeAligned(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try userVisibleWrite()
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let t = translate(pos)
            let n = Int(min(UInt64(buffer.count - done), t.left))
            let part = UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)])
            let e = batEntry(t.batIndex)
            var host: UInt64
            var batUpdate: UInt64?
            switch e & Vhdx.batStateMask {
            case Vhdx.blockNotPresent, Vhdx.blockUndefined, Vhdx.blockUnmapped, Vhdx.blockUnmappedV095,
                 Vhdx.blockZero:
                // vhdx_allocate_block: a new block at the end of the file, 1 MiB aligned; growing the file
                // gives zeroes, so the rest of a ZERO block needs no filling.
                let newOffset = try (try file.size()).alignedUp(Vhdx.miB)
                guard newOffset <= UInt64(Int64.max) else { throw Vhdx.errnoError(EINVAL) }
                try file.truncate(to: try newOffset.adding(blockSize))
                CrashPoint.hit("vhdx-write:block-allocated")
                let entry = newOffset | Vhdx.blockFullyPresent
                try setBATEntry(t.batIndex, entry)
                batUpdate = entry
                host = newOffset + t.inBlock
            case Vhdx.blockFullyPresent:
                host = try (e & Vhdx.batOffsetMask).adding(t.inBlock)
            default:
                throw InstarError(.io, strerrorString(EIO), errno: EIO)
            }
            if host < Vhdx.miB {
                if batUpdate != nil { try setBATEntry(t.batIndex, e) }
                throw InstarError(.io, strerrorString(EFAULT), errno: EFAULT)
            }
            do {
                try file.write(part, at: host)
            } catch {
                if batUpdate != nil { try setBATEntry(t.batIndex, e) }
                throw error
            }
            if let entry = batUpdate {
                CrashPoint.hit("vhdx-write:data-written")
                var le = [UInt8](repeating: 0, count: 8)
                le.putU64le(entry, at: 0)
                try logWriteAndFlush(le, at: try batRegion.fileOffset.adding(t.batIndex * 8))
            }
            done += n
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        // No write-zeroes in qemu's driver: the block layer writes zero buffers (at most 16 MiB at a time).
        var pos = offset
        let end = try offset.adding(length)
        let chunk = min(length, 16 << 20)
        let zeros = [UInt8](repeating: 0, count: Int(chunk))
        while pos < end {
            let n = Int(min(end - pos, chunk))
            try zeros.withUnsafeBytes { try write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: pos, backing: nil) }
            pos += UInt64(n)
        }
    }

    public func flush() throws {
        if writable { try file.sync() }
    }
}

extension HostFile {
    /// `count` bytes at `offset`, zeroes past the end of the file (qemu's reads past EOF).
    func readZeroPaddedBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        // qemu's block layer refuses requests past INT64_MAX with EIO.
        guard offset <= UInt64(Int64.max) - UInt64(count) else { throw Vhdx.errnoError(EIO) }
        var b = [UInt8](repeating: 0, count: count)
        try b.withUnsafeMutableBytes { try readZeroPadded(into: $0, at: offset) }
        return b
    }
}

// MARK: check

extension VhdxFormat: ImageCheckable {
    /// vhdx_co_check: a log replayed at open counts as a fixed corruption; the BAT entries are checked.
    public func check(repair: CheckRepair, report: (CheckMessage) -> Void) throws -> CheckResult {
        var result = CheckResult()
        if logReplayedOnOpen { result.corruptionsFixed += 1 }
        var count: Int64? = 0
        _ = try checkBATEntries(errorCount: &count)
        result.corruptions += count ?? 0
        return result
    }
}
