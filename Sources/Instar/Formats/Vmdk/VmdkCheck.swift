import Glibc

/// vmdk_co_check: every grain of every extent is looked up; a lookup that fails or a grain past the end of its
/// extent file stops the check with one corruption. Repairs are not supported.
extension VmdkFormat: ImageCheckable {
    public func check(repair: CheckRepair, report: (CheckMessage) -> Void) throws -> CheckResult {
        // vmdk_co_check returns -ENOTSUP for any repair, which qemu-img reports as a format without checks.
        if !repair.isEmpty { throw CheckNotSupported() }
        var result = CheckResult()
        let total = virtualSize / 512
        var sector: UInt64 = 0
        while sector < total {
            guard let e = extent(forSector: sector) else {
                report(CheckMessage("ERROR: could not find extent for sector \(sector)"))
                result.corruptions += 1
                throw CheckFailure(partial: result, errnoValue: EINVAL)
            }
            let (l, _) = try e.lookup(sector * 512)
            switch l {
            case .error:
                report(CheckMessage("ERROR: could not get cluster_offset for sector \(sector)"))
                result.corruptions += 1
                // qemu returns VMDK_ERROR (-1) as the check's result.
                throw CheckFailure(partial: result, errnoValue: EPERM)
            case .allocated(let host):
                if host >= (try (try e.file.size()).alignedUp(512)) {
                    report(CheckMessage("ERROR: cluster offset for sector \(sector) points after EOF"))
                    result.corruptions += 1
                    throw CheckFailure(partial: result, errnoValue: EINVAL)
                }
            default:
                break
            }
            // Flat extents are one cluster; a sparse grain may cross an extent's end only in a hostile image.
            let step = max(1, e.clusterSectors)
            if l == .unallocated, let end = e.missingTableEnd(forSector: sector), end > sector {
                // No grain table here: the grains up to `end` all look up as unallocated. Go on from the first
                // sector of the same stride at or past it (a 2 TiB image with an empty directory is 32 Mi
                // lookups otherwise).
                let gap = end - sector
                let strides = gap / step + (gap % step == 0 ? 0 : 1)
                sector = try sector.adding(try strides.multiplied(by: step))
            } else {
                sector = try sector.adding(step)
            }
        }
        return result
    }
}
