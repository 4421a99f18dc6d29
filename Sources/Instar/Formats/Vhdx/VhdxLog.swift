import Glibc

/// The circular log of a VHDX image (qemu's VHDXLogEntries): where it is, and the read and write positions,
/// as byte offsets into it.
struct VhdxLogState {
    var offset: UInt64 = 0
    var length: UInt64 = 0
    var write: UInt64 = 0
    var read: UInt64 = 0
    var sequence: UInt64 = 0
    var tail: UInt64 = 0
}

/// A run of valid log entries found by the search (qemu's VHDXLogSequence).
struct VhdxLogSequence {
    var valid = false
    var count: UInt64 = 0
    var log = VhdxLogState()
    var lastSequence: UInt64 = 0
}

/// The log, as qemu's block/vhdx-log.c reads, replays and writes it. Every loop over the log is bounded by
/// the number of its sectors, and descriptors are read one sector at a time, so a hostile log costs neither
/// memory nor unbounded time.
extension VhdxFormat {
    static func descriptorSectors(_ count: UInt32) -> UInt64 {
        (UInt64(count) + 2).divCeil(128)
    }

    func nextIndex(_ idx: UInt64, _ log: VhdxLogState) -> UInt64 {
        let n = idx + Vhdx.logSectorSize
        return n >= log.length ? 0 : n
    }

    func readLogSector(_ log: VhdxLogState, at idx: UInt64) throws -> [UInt8] {
        try file.readZeroPaddedBytes(at: try log.offset.adding(idx), count: Int(Vhdx.logSectorSize))
    }

    /// vhdx_log_peek_hdr.
    func peekHeader(_ log: VhdxLogState) throws -> VhdxLogEntryHeader {
        if log.read % Vhdx.logSectorSize != 0 { throw Vhdx.errnoError(EFAULT) }
        var read = log.read
        if read + 64 > log.length { read = 0 }
        if read == log.write { throw Vhdx.errnoError(EINVAL) }
        return try VhdxLogEntryHeader(bytes: try file.readZeroPaddedBytes(at: try log.offset.adding(read), count: 64))
    }

    /// vhdx_log_hdr_is_valid.
    func logHeaderIsValid(_ h: VhdxLogEntryHeader, _ log: VhdxLogState) -> Bool {
        h.signature == Vhdx.logSignature && log.length >= UInt64(h.entryLength)
            && UInt64(h.entryLength) % Vhdx.logSectorSize == 0 && h.sequenceNumber != 0
            && h.logGUID == header.logGUID && UInt64(h.descriptorCount) * 32 <= UInt64(h.entryLength)
    }

    func descriptorIsValid(_ d: VhdxLogDescriptor, _ h: VhdxLogEntryHeader) -> Bool {
        guard d.sequenceNumber == h.sequenceNumber, d.fileOffset % Vhdx.logSectorSize == 0 else { return false }
        if d.signature == Vhdx.logZeroSignature { return d.leadingBytes % Vhdx.logSectorSize == 0 }
        return d.signature == Vhdx.logDescSignature
    }

    /// vhdx_log_read_desc, streamed: reads the descriptor sectors of the entry at `log.read` (advancing it),
    /// checks every descriptor and hands each sector to `sector`. Returns the entry header.
    func readDescriptors(_ log: inout VhdxLogState, sector: ([UInt8]) -> Void,
                         descriptor: (VhdxLogDescriptor) throws -> Void) throws -> VhdxLogEntryHeader {
        let h = try peekHeader(log)
        guard logHeaderIsValid(h, log) else { throw Vhdx.errnoError(EINVAL) }
        let sectors = VhdxFormat.descriptorSectors(h.descriptorCount)
        var index: UInt64 = 0
        for _ in 0..<sectors {
            if log.read == log.write { throw Vhdx.errnoError(EINVAL) }
            let buf = try readLogSector(log, at: log.read)
            log.read = nextIndex(log.read, log)
            sector(buf)
            // Descriptor k lives at byte 64 + 32k of the descriptor area.
            var k = index == 0 ? 0 : (index * 128 - 2)
            let first = index == 0 ? 2 : 0
            for slot in first..<128 {
                if k >= UInt64(h.descriptorCount) { break }
                let d = try VhdxLogDescriptor(bytes: buf, at: slot * 32)
                guard descriptorIsValid(d, h) else { throw Vhdx.errnoError(EINVAL) }
                try descriptor(d)
                k += 1
            }
            index += 1
        }
        return h
    }

    /// vhdx_validate_log_entry: whether a whole, checksummed entry with the expected sequence number starts at
    /// `log.read`; `log.read` moves past what was read (one sector when the header is not valid).
    func validateEntry(_ log: inout VhdxLogState, previous seq: UInt64) throws -> VhdxLogEntryHeader? {
        let h: VhdxLogEntryHeader
        do {
            h = try peekHeader(log)
        } catch {
            log.read = nextIndex(log.read, log)
            throw error
        }
        guard logHeaderIsValid(h, log), seq == 0 || h.sequenceNumber == seq &+ 1 else {
            log.read = nextIndex(log.read, log)
            return nil
        }
        let descSectors = VhdxFormat.descriptorSectors(h.descriptorCount)
        let totalSectors = UInt64(h.entryLength) / Vhdx.logSectorSize
        var crc: UInt32 = 0xFFFF_FFFF
        var firstSector = true
        _ = try readDescriptors(&log, sector: { buf in
            var b = buf
            if firstSector {
                for i in 4..<8 { b[i] = 0 }
                firstSector = false
            }
            crc = b.withUnsafeBytes { CRC32C.update(crc, $0) }
        }, descriptor: { _ in })
        if totalSectors > descSectors {
            for _ in 0..<(totalSectors - descSectors) {
                if log.read == log.write { return nil }
                let buf = try readLogSector(log, at: log.read)
                log.read = nextIndex(log.read, log)
                crc = buf.withUnsafeBytes { CRC32C.update(crc, $0) }
            }
        }
        return crc ^ 0xFFFF_FFFF == h.checksum ? h : nil
    }

    /// vhdx_log_search: the valid sequence of entries with the highest sequence number.
    func searchLog() throws -> VhdxLogSequence {
        var cur = log
        cur.write = cur.length
        cur.read = 0
        var candidate = VhdxLogSequence()
        // Every step moves the read position forward by at least one sector; a chain may wrap once.
        let bound = 2 * (cur.length / Vhdx.logSectorSize) + 4
        var steps: UInt64 = 0
        while true {
            var currSeq: UInt64 = 0
            var current = VhdxLogSequence()
            let tail = cur.read
            steps += 1
            if steps > bound { throw Vhdx.errnoError(EINVAL) }
            if let h = try validateEntry(&cur, previous: currSeq) {
                current.valid = true
                current.log = cur
                current.log.read = tail
                current.log.write = cur.read
                current.count = 1
                current.lastSequence = h.sequenceNumber
                while true {
                    steps += 1
                    if steps > bound { throw Vhdx.errnoError(EINVAL) }
                    guard let next = try validateEntry(&cur, previous: currSeq) else { break }
                    current.log.write = cur.read
                    current.count += 1
                    current.lastSequence = next.sequenceNumber
                    currSeq = next.sequenceNumber
                }
            }
            if current.valid && (!candidate.valid || current.lastSequence > candidate.lastSequence) {
                candidate = current
            }
            if cur.read < tail { break }
        }
        return candidate
    }

    /// vhdx_parse_log: a log with valid entries is replayed, or refused when the image is read-only.
    func parseLog(readOnlyName: String?) throws {
        let h = header
        log.offset = h.logOffset
        log.length = UInt64(h.logLength)
        guard log.offset >= Vhdx.miB, log.offset % Vhdx.miB == 0 else { throw openError(EINVAL) }
        guard h.logVersion == 0 else { throw openError(EINVAL) }
        if h.logGUID == Vhdx.zeroGUID || h.logLength == 0 { return }
        guard log.length % Vhdx.miB == 0 else { throw openError(EINVAL) }
        let logs: VhdxLogSequence
        do {
            logs = try searchLog()
        } catch let e as InstarError {
            throw InstarError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errnoValue)
        }
        guard logs.valid else { return }
        log.sequence = logs.lastSequence &+ 1
        if let name = readOnlyName {
            throw InstarError(.permission, "VHDX image file '\(name)' opened read-only, "
                + "but contains a log that needs to be replayed\nTo replay the log, run:\n"
                + "qemu-img check -r all '\(name)'", errno: EPERM)
        }
        do {
            var l = logs
            try flushLog(&l)
        } catch let e as InstarError {
            throw InstarError(e.code, "Could not open '\(filename)': \(e.message)", errno: e.errnoValue)
        }
        logReplayedOnOpen = true
    }

    /// vhdx_log_flush: writes `logs.count` entries from `logs.log.read` into the file, then resets the log.
    func flushLog(_ logs: inout VhdxLogSequence) throws {
        try userVisibleWrite()
        var cnt = logs.count
        while cnt > 0 {
            cnt -= 1
            let peek = try peekHeader(logs.log)
            let fileLength = try file.nodeLength()
            if peek.flushedFileOffset > fileLength { throw Vhdx.errnoError(EINVAL) }
            // The descriptors are checked first (they are all read before any is applied), then applied in
            // order, each data descriptor taking the next data sector after the descriptor sectors.
            var descLog = logs.log
            let h = try readDescriptors(&descLog, sector: { _ in }, descriptor: { _ in })
            var dataLog = descLog
            var applyLog = logs.log
            _ = try readDescriptors(&applyLog, sector: { _ in }, descriptor: { d in
                try self.applyDescriptor(d, dataLog: &dataLog)
            })
            logs.log = dataLog
            if fileLength < h.lastFileOffset {
                var newSize = h.lastFileOffset
                if newSize % Vhdx.miB != 0 {
                    newSize = try newSize.alignedUp(Vhdx.miB)
                    guard newSize <= UInt64(Int64.max) else { throw Vhdx.errnoError(EINVAL) }
                    try file.truncate(to: newSize)
                }
            }
        }
        try file.sync()
        CrashPoint.hit("vhdx-log:applied")
        // vhdx_log_reset.
        log.read = 0
        log.write = 0
        try updateHeaders(newDataGUID: false, logGUID: Vhdx.zeroGUID)
    }

    /// vhdx_log_flush_desc (with the data sector read for a data descriptor).
    func applyDescriptor(_ d: VhdxLogDescriptor, dataLog: inout VhdxLogState) throws {
        var sector = [UInt8](repeating: 0, count: Int(Vhdx.logSectorSize))
        var count: UInt64 = 1
        if d.signature == Vhdx.logDescSignature {
            if dataLog.read == dataLog.write { throw Vhdx.errnoError(EINVAL) }
            let data = try readLogSector(dataLog, at: dataLog.read)
            dataLog.read = nextIndex(dataLog.read, dataLog)
            let r = ByteReader(data)
            let seq = (UInt64(try r.u32le(at: 4)) << 32) | UInt64(try r.u32le(at: 4092))
            if seq != d.sequenceNumber { throw Vhdx.errnoError(EINVAL) }
            sector.putU64le(d.leadingBytes, at: 0)
            for i in 8..<4092 { sector[i] = data[i] }
            sector.putU32le(d.trailingBytes, at: 4092)
        } else if d.signature == Vhdx.logZeroSignature {
            count = d.leadingBytes / Vhdx.logSectorSize
        } else {
            let hex = String(d.signature, radix: 16)
            VhdxFormat.errorReport("Invalid VHDX log descriptor entry signature 0x\(hex)")
            throw Vhdx.errnoError(EINVAL)
        }
        // A zero descriptor may name any length. qemu zeroes it a sector at a time, without end on a hostile
        // length; instar refuses one that reaches past the end of the file (a real log zeroes only space the
        // file already has), so a replay never grows the file nor runs unbounded.
        if count == 1 {
            guard d.fileOffset <= UInt64(Int64.max) - Vhdx.logSectorSize else { throw Vhdx.errnoError(EIO) }
            try file.write(sector, at: d.fileOffset)
        } else if count > 1 {
            let end = try d.fileOffset.adding(try count.multiplied(by: Vhdx.logSectorSize))
            guard end <= (try file.size()) else { throw Vhdx.errnoError(EINVAL) }
            try file.writeZeroes(at: d.fileOffset, length: end - d.fileOffset)
        }
        try file.sync()
    }

    /// vhdx_log_write: one entry carrying `data` for file offset `offset`, written at the log's write position.
    func writeLogEntry(_ data: [UInt8], at offset: UInt64) throws {
        let h = header
        guard UInt64(data.count) <= UInt64(h.logLength) else { throw Vhdx.errnoError(EINVAL) }
        guard h.logGUID == Vhdx.zeroGUID else { throw Vhdx.errnoError(ENOTSUP) }
        try updateHeaders(newDataGUID: false, logGUID: Vhdx.newGUID())
        if log.sequence == 0 { log.sequence = 1 }
        let sectorSize = Vhdx.logSectorSize
        let sectorOffset = offset % sectorSize
        var fileOffset = offset - sectorOffset
        var aligned = UInt64(data.count)
        var leading: UInt64 = 0
        var partial: UInt64 = 0
        if sectorOffset != 0 {
            leading = min(sectorSize - sectorOffset, UInt64(data.count))
            aligned -= leading
            partial += 1
        }
        var sectors = aligned / sectorSize
        let trailing = aligned - sectors * sectorSize
        if trailing != 0 { partial += 1 }
        sectors += partial
        let fileLength = try file.nodeLength()
        let descSectors = VhdxFormat.descriptorSectors(UInt32(sectors))
        let total = Int((descSectors + sectors) * sectorSize)
        var buf = [UInt8](repeating: 0, count: total)
        buf.putU32le(Vhdx.logSignature, at: 0)
        buf.putU32le(UInt32(total), at: 8)
        buf.putU32le(UInt32(truncatingIfNeeded: log.tail), at: 12)
        buf.putU64le(log.sequence, at: 16)
        buf.putU32le(UInt32(sectors), at: 24)
        for i in 0..<16 { buf[32 + i] = header.logGUID[i] }
        buf.putU64le(fileLength, at: 48)
        buf.putU64le(fileLength, at: 56)
        var dataPos = 0
        for i in 0..<Int(sectors) {
            var sector: [UInt8]
            var used: Int
            if i == 0 && leading != 0 {
                sector = try file.readZeroPaddedBytes(at: fileOffset, count: Int(sectorSize))
                for k in 0..<Int(leading) { sector[Int(sectorOffset) + k] = data[dataPos + k] }
                used = Int(leading)
            } else if i == Int(sectors) - 1 && trailing != 0 {
                sector = try file.readZeroPaddedBytes(at: fileOffset, count: Int(sectorSize))
                for k in 0..<Int(trailing) { sector[k] = data[dataPos + k] }
                used = Int(trailing)
            } else {
                sector = Array(data[dataPos..<(dataPos + Int(sectorSize))])
                used = Int(sectorSize)
            }
            let d = 64 + i * 32
            buf.putU32le(Vhdx.logDescSignature, at: d)
            buf.putU32le(try ByteReader(sector).u32le(at: 4092), at: d + 4)
            buf.putU64le(try ByteReader(sector).u64le(at: 0), at: d + 8)
            buf.putU64le(fileOffset, at: d + 16)
            buf.putU64le(log.sequence, at: d + 24)
            let s = Int(descSectors) * Int(sectorSize) + i * Int(sectorSize)
            buf.putU32le(Vhdx.logDataSignature, at: s)
            buf.putU32le(UInt32(truncatingIfNeeded: log.sequence >> 32), at: s + 4)
            for k in 8..<4092 { buf[s + k] = sector[k] }
            buf.putU32le(UInt32(truncatingIfNeeded: log.sequence), at: s + 4092)
            dataPos += used
            fileOffset += sectorSize
        }
        CRC32C.stamp(&buf, crcOffset: 4)
        // vhdx_log_write_sectors: sector by sector around the ring, stopping when it is full.
        try userVisibleWrite()
        var written = 0
        var write = log.write
        let count = Int(descSectors + sectors)
        while written < count {
            let at = try log.offset.adding(write)
            write = nextIndex(write, log)
            if write == log.read { break }
            try file.write(Array(buf[(written * Int(sectorSize))..<((written + 1) * Int(sectorSize))]), at: at)
            log.write = write
            written += 1
        }
        if written != count { throw Vhdx.errnoError(EINVAL) }
        log.sequence += 1
        log.tail = log.write
    }

    /// vhdx_log_write_and_flush: the entry is written, flushed, and applied to the file at once.
    func logWriteAndFlush(_ data: [UInt8], at offset: UInt64) throws {
        try file.sync()
        try writeLogEntry(data, at: offset)
        var logs = VhdxLogSequence(valid: true, count: 1, log: log, lastSequence: 0)
        try file.sync()
        CrashPoint.hit("vhdx-log:entry-written")
        try flushLog(&logs)
        log = logs.log
    }
}
