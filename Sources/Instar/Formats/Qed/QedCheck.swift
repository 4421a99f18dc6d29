import Glibc

/// qemu's qed_check: every L1 and L2 entry must point inside the file at a cluster boundary and every cluster be
/// used once. A repair clears entries that point outside the file (corruptions fixed) and, when nothing is left
/// wrong, clears the need-check flag. Leaks are counted, never repaired. Clusters are numbered with qemu's own
/// bytes-to-clusters arithmetic (which divides by cluster_size - 1), so its counts come out the same.
extension QedFormat: ImageCheckable {
    /// instar's bound on the used-cluster bitmap (qemu fails the check with ENOMEM when it cannot allocate it).
    static let maxCheckBitmapWords: UInt64 = 1 << 22

    public func check(repair: CheckRepair, report: (CheckMessage) -> Void) throws -> CheckResult {
        try runCheck(fix: !repair.isEmpty)
    }

    func runCheck(fix: Bool) throws -> CheckResult {
        var result = CheckResult()
        let nclusters = bytesToClustersAsQemu(fileSize)
        let words = (nclusters + 31) / 32
        guard words <= QedFormat.maxCheckBitmapWords else { throw CheckFailure(partial: result, errnoValue: ENOMEM) }
        try CallBudget.reserve(count: words, of: 4, what: "the check's cluster bitmap")
        defer { CallBudget.release(Int(words) * 4) }
        var used = [UInt32](repeating: 0, count: Int(words))
        result.totalClusters = Int64(clamping: header.imageSize.divCeil(cs))

        func markUsed(_ offset: UInt64, _ n: UInt64) -> Bool {
            var cluster = bytesToClustersAsQemu(offset)
            var corruptions: Int64 = 0
            var left = n
            while left > 0 {
                let w = Int(cluster / 32)
                let bit = UInt32(1) << UInt32(cluster % 32)
                if w < used.count {
                    if used[w] & bit != 0 { corruptions += 1 }
                    used[w] |= bit
                }
                cluster += 1
                left -= 1
            }
            result.corruptions += corruptions
            return corruptions == 0
        }

        var lastError: Int32 = 0
        var invalidL1 = 0
        _ = markUsed(header.l1TableOffset, UInt64(header.tableSize))
        for i in 0..<l1.count {
            let offset = l1[i]
            if offset == 0 { continue }
            if !tableOffsetValid(offset) {
                if fix {
                    l1[i] = 0
                    result.corruptionsFixed += 1
                } else {
                    result.corruptions += 1
                }
                invalidL1 += 1
                continue
            }
            if !markUsed(offset, UInt64(header.tableSize)) { continue }
            var table: [UInt64]
            do {
                table = try l2Table(at: offset)
            } catch let e as InstarError {
                result.checkErrors += 1
                lastError = e.errnoValue != 0 ? e.errnoValue : EIO
                continue
            }
            var invalidL2 = 0
            var last: UInt64 = 0
            for j in 0..<table.count {
                let o = table[j]
                if o == 0 || o == 1 { continue }
                result.allocatedClusters += 1
                if last != 0 && last &+ cs != o { result.fragmentedClusters += 1 }
                last = o
                if !clusterOffsetValid(o) {
                    if fix {
                        table[j] = 0
                        result.corruptionsFixed += 1
                    } else {
                        result.corruptions += 1
                    }
                    invalidL2 += 1
                    continue
                }
                _ = markUsed(o, 1)
            }
            if invalidL2 > 0 && fix {
                storeCached(offset, table)
                do {
                    try writeTable(table, at: offset, index: 0, count: tableEntries)
                } catch let e as InstarError {
                    result.checkErrors += 1
                    lastError = e.errnoValue != 0 ? e.errnoValue : EIO
                    continue
                }
            }
        }
        if invalidL1 > 0 && fix {
            do {
                try writeTable(l1, at: header.l1TableOffset, index: 0, count: tableEntries)
            } catch let e as InstarError {
                result.checkErrors += 1
                lastError = e.errnoValue != 0 ? e.errnoValue : EIO
            }
        }
        if lastError != 0 { throw CheckFailure(partial: result, errnoValue: lastError) }
        // Leaks: clusters past the header that nothing references.
        var c = UInt64(header.headerSize)
        while c < nclusters {
            let w = Int(c / 32)
            if w >= used.count || used[w] & (UInt32(1) << UInt32(c % 32)) == 0 { result.leaks += 1 }
            c += 1
        }
        if fix && result.corruptions == 0 && result.checkErrors == 0
            && header.features & QedHeader.featureNeedCheck != 0 {
            try file.sync()
            header.features &= ~QedHeader.featureNeedCheck
            try writeHeader()
        }
        return result
    }
}
