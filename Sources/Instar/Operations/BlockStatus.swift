/// Chain-level block status: the generic part of qemu's block-status query (block/io.c) on top of the drivers'
/// per-layer `blockStatus`, and the walk down a backing chain that `map`, `compare` and `convert` share.

/// How a guest range stands across a whole chain, in qemu's BDRV_BLOCK_* terms.
public struct ChainBlockStatus: Equatable {
    /// Bytes from the queried offset that share this status (> 0).
    public var length: UInt64
    /// BDRV_BLOCK_ALLOCATED: some layer decides the contents ("present" in `map`).
    public var allocated: Bool
    /// BDRV_BLOCK_DATA.
    public var data: Bool
    /// BDRV_BLOCK_ZERO.
    public var zero: Bool
    /// BDRV_BLOCK_OFFSET_VALID: the host offset, when the range is stored plainly.
    public var hostOffset: UInt64?
    /// The host file holding `hostOffset`.
    public var hostFile: String?
    /// How many backing links below the top the deciding layer is (`map`'s "depth").
    public var depth: Int
    /// BDRV_BLOCK_EOF: the range reaches the end of the image.
    public var eof: Bool

    public init(length: UInt64, allocated: Bool, data: Bool, zero: Bool, hostOffset: UInt64?, hostFile: String?,
                depth: Int, eof: Bool) {
        self.length = length
        self.allocated = allocated
        self.data = data
        self.zero = zero
        self.hostOffset = hostOffset
        self.hostFile = hostFile
        self.depth = depth
        self.eof = eof
    }
}

public enum ChainStatus {
    /// The status of one layer at `offset` (at most `length` bytes), with the generic rules applied: a range the
    /// driver calls data or zero is allocated; an unallocated range reads as zero when there is no backing file
    /// or it lies past the backing file's end; data over a hole of the host file (RECURSE) reads as zero.
    /// Returns nil when `offset` is at or past the layer's end (qemu's pnum 0 with BDRV_BLOCK_EOF).
    public static func layerStatus(_ layer: ImageLayer, at offset: UInt64, length: UInt64) throws -> ChainBlockStatus? {
        try CallBudget.checkpoint()
        let total = layer.virtualSize
        if offset >= total || length == 0 { return nil }
        let bytes = min(length, total - offset)
        let s = try layer.format.blockStatus(at: offset, length: bytes)
        // A driver answering 0 bytes would make every caller loop forever; a hostile image must not do that.
        guard s.length > 0 else { throw InstarError.corrupt("block status of offset \(offset) reported no bytes") }
        var out = ChainBlockStatus(length: min(s.length, bytes), allocated: false, data: s.data, zero: s.zero,
                                   hostOffset: s.hostOffset, hostFile: s.hostOffset == nil ? nil : s.hostFile,
                                   depth: 0, eof: false)
        if s.data || s.zero {
            out.allocated = true
        } else if let backing = layer.backing {
            if offset >= backing.virtualSize { out.zero = true }
        } else if layer.format.supportsBacking {
            out.zero = true
        }
        if s.recurse, s.data, !s.zero, let host = s.hostOffset, let name = s.hostFile,
           let file = layer.format.hostFiles.first(where: { $0.path == name }) {
            try recurseIntoHostFile(file, hostOffset: host, status: &out)
        }
        out.eof = offset + out.length == total
        return out
    }

    /// BDRV_BLOCK_RECURSE: asks the host file whether the range at `hostOffset` is a hole. Errors are ignored as
    /// qemu ignores them: the answer only adds information.
    static func recurseIntoHostFile(_ file: HostFile, hostOffset: UInt64, status: inout ChainBlockStatus) throws {
        guard let fileSize = try? file.size(), let fileEnd = try? fileSize.alignedUp(512) else { return }
        if hostOffset >= fileEnd {
            status.zero = true
            return
        }
        if let e = try? file.protocolExtent(at: hostOffset, length: status.length) {
            if e.length > 0 { status.length = min(status.length, e.length) }
            if e.zero { status.zero = true }
            return
        }
        guard let data = file.nextData(from: hostOffset) else {
            // Only a hole follows up to end of file: reads as zeroes.
            status.zero = true
            return
        }
        if data > hostOffset {
            status.length = min(status.length, data - hostOffset)
            status.zero = true
        } else {
            let hole = file.nextHole(from: hostOffset)
            if hole > hostOffset { status.length = min(status.length, hole - hostOffset) }
        }
    }

    /// qemu-img's get_block_status() for `map`: walks down from `top` until a layer holds data or zeroes,
    /// counting the depth; each layer narrows the range.
    public static func mapStatus(_ top: ImageLayer, at offset: UInt64, length: UInt64) throws -> ChainBlockStatus {
        var layer = top
        var depth = 0
        var bytes = length
        while true {
            guard var s = try layerStatus(layer, at: offset, length: bytes) else {
                // A lower layer ends before the range: qemu reads zeroes there, decided by that layer.
                return ChainBlockStatus(length: bytes, allocated: true, data: false, zero: true, hostOffset: nil,
                                        hostFile: nil, depth: depth, eof: false)
            }
            bytes = s.length
            if s.data || s.zero {
                s.depth = depth
                return s
            }
            guard let next = layer.backing else {
                s.depth = depth
                return s
            }
            layer = next
            depth += 1
        }
    }

    /// bdrv_block_status_above(top, NULL): the status that decides what a reader of `top` sees, as convert and
    /// compare query it. The EOF flag is the top layer's.
    public static func aboveStatus(_ top: ImageLayer, at offset: UInt64, length: UInt64) throws -> ChainBlockStatus {
        guard let first = try layerStatus(top, at: offset, length: length) else {
            throw InstarError(.range, "block status queried past the end of the image")
        }
        if first.allocated { return first }
        let eofEnd: UInt64? = first.eof ? offset + first.length : nil
        var result = first
        var bytes = first.length
        var layer = top
        var depth = 0
        while let next = layer.backing {
            layer = next
            depth += 1
            guard var s = try layerStatus(layer, at: offset, length: bytes) else {
                // Past a short backing file: zeroes that count as allocated in that layer.
                result = ChainBlockStatus(length: bytes, allocated: true, data: false, zero: true, hostOffset: nil,
                                          hostFile: nil, depth: depth, eof: false)
                break
            }
            s.depth = depth
            s.eof = false
            result = s
            if s.allocated { break }
            bytes = s.length
        }
        result.eof = eofEnd != nil && offset + result.length == eofEnd
        return result
    }
}
