import Glibc

/// parallels_co_check: the in-use flag, BAT entries past the end of the file (cleared by -r all, which then
/// rewrites the whole header buffer) and space after the last cluster (counted in clusters as leaks; -r leaks
/// cuts the file there, and close then sets its length to the data end again, as qemu does).
extension ParallelsFormat: ImageCheckable {
    public func check(repair: CheckRepair, report: (CheckMessage) -> Void) throws -> CheckResult {
        var result = CheckResult()
        let fixErrors = repair.contains(.errors)
        let fixLeaks = repair.contains(.leaks)
        let size: UInt64
        do {
            size = try file.size().alignedUp(512)
        } catch let e as InstarError {
            result.checkErrors += 1
            throw CheckFailure(partial: result, errnoValue: e.errnoValue != 0 ? e.errnoValue : EIO)
        }
        if unclean {
            report(CheckMessage((fixErrors ? "Repairing" : "ERROR") + " image was not closed correctly"))
            result.corruptions += 1
            if fixErrors {
                result.corruptionsFixed += 1
                unclean = false
            }
        }
        result.totalClusters = Int64(batSize)
        var highOff: UInt64 = 0
        var prevOff: UInt64 = 0
        var flushBAT = false
        var i: UInt64 = 0
        // Entries past the stored part of the BAT are zero.
        let stored = min(UInt64(batSize), UInt64(max(0, header.count - 64)) / 4)
        while i < stored {
            let off = hostOffset(entry(i))
            if off == 0 {
                prevOff = 0
                i += 1
                continue
            }
            if off > size {
                report(CheckMessage((fixErrors ? "Repairing" : "ERROR") + " cluster \(i) is outside image"))
                result.corruptions += 1
                if fixErrors {
                    prevOff = 0
                    header.putU32le(0, at: Int(64 + 4 * i))
                    result.corruptionsFixed += 1
                    flushBAT = true
                    i += 1
                    continue
                }
            }
            result.allocatedClusters += 1
            if off > highOff { highOff = off }
            if prevOff != 0 && prevOff + clusterSize != off { result.fragmentedClusters += 1 }
            prevOff = off
            i += 1
        }
        if flushBAT {
            do {
                // The whole header buffer, synced.
                let have = min(UInt64(header.count), headerSize)
                try file.write(Array(header[0..<Int(have)]), at: 0)
                if headerSize > have { try file.writeZeroes(at: have, length: headerSize - have) }
                try file.sync()
            } catch let e as InstarError {
                result.checkErrors += 1
                throw CheckFailure(partial: result, errnoValue: e.errnoValue != 0 ? e.errnoValue : EIO)
            }
        }
        let endOffset = highOff + clusterSize
        result.imageEndOffset = Int64(clamping: endOffset)
        if size > endOffset {
            let count = Int64(clamping: (size - endOffset).divCeil(clusterSize))
            report(CheckMessage((fixLeaks ? "Repairing" : "ERROR") + " space leaked at the end of the image \(size - endOffset)"))
            result.leaks += count
            if fixLeaks {
                do {
                    try file.truncate(to: endOffset)
                } catch let e as InstarError {
                    report(CheckMessage(e.message, errorReport: true))
                    result.checkErrors += 1
                    throw CheckFailure(partial: result, errnoValue: e.errnoValue != 0 ? e.errnoValue : EIO)
                }
                result.leaksFixed += count
            }
        }
        return result
    }
}
