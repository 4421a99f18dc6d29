import Glibc

/// Chain queries of `qemu-img rebase`: finding a named image in an open backing chain
/// (bdrv_find_backing_image) and allocation between two layers of it (bdrv_is_allocated_above).
public enum RebaseChain {
    /// The layer of `top`'s chain below the layer whose backing name resolves to `path`, or nil
    /// (bdrv_find_backing_image without overridden backing options). A name with a protocol prefix ("json:",
    /// "nbd:") is compared as text with the stored and the resolved backing names; other names are resolved
    /// against each layer's directory and compared with realpath(3), layers whose names do not resolve to an
    /// existing file being skipped.
    public static func findBackingImage(_ top: ImageLayer, path: String) -> ImageLayer? {
        let isProtocol = hasProtocol(path)
        var current: ImageLayer? = top
        var steps = 0
        while let layer = current, let below = layer.backing, steps <= ImageOpener.maxChainDepth {
            steps += 1
            current = below
            guard let stored = layer.format.backingReference?.filename else { continue }
            let full = layer.fullBackingFilename ?? stored
            if isProtocol || hasProtocol(stored) {
                if path == stored || path == full { return below }
                continue
            }
            let candidate = ImageOpener.resolveBackingName(path, relativeTo: layer.filename)
            guard let a = realPath(candidate), let b = realPath(full) else { continue }
            if a == b { return below }
        }
        return nil
    }

    /// qemu's path_has_protocol: a ':' before any '/'.
    static func hasProtocol(_ path: String) -> Bool {
        for c in path.utf8 {
            if c == UInt8(ascii: "/") { return false }
            if c == UInt8(ascii: ":") { return true }
        }
        return false
    }

    static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// One layer's status as bdrv_co_block_status reports it without want_zero: nil at or past the layer's
    /// end (qemu's pnum 0), else whether the layer allocates the start of the range and for how many bytes.
    static func layerStatus(_ layer: ImageLayer, at offset: UInt64, length: UInt64) throws -> (allocated: Bool, length: UInt64)? {
        let size = layer.virtualSize
        guard offset < size, length > 0 else { return nil }
        let ask = min(length, size - offset)
        let st = try layer.format.blockStatus(at: offset, length: ask)
        return (st.allocated, max(1, min(st.length, ask)))
    }

    /// bdrv_is_allocated_above(top, base, include_base false) with qemu 7.2's rules: whether some layer from
    /// `top` down to, not including, `base` decides the start of the range, and for how many bytes the answer
    /// holds. A length of 0 means `offset` is at or past `top`'s end. A layer shorter than `top` counts as
    /// allocating (zeroes) past its end.
    public static func isAllocatedAbove(_ top: ImageLayer, base: ImageLayer?, offset: UInt64,
                                        length: UInt64) throws -> (allocated: Bool, length: UInt64) {
        if top === base { return (false, length) }
        guard let first = try layerStatus(top, at: offset, length: length) else { return (false, 0) }
        if first.allocated { return (true, first.length) }
        var bytes = first.length
        var layer = top.backing
        var steps = 0
        while let p = layer, p !== base, steps <= ImageOpener.maxChainDepth {
            steps += 1
            guard let st = try layerStatus(p, at: offset, length: bytes) else { return (true, bytes) }
            if st.allocated { return (true, st.length) }
            bytes = st.length
            layer = p.backing
        }
        return (false, bytes)
    }

    /// Whether the whole range is known to read as zeroes through `top`'s chain from block status alone: every
    /// layer down to the first one that decides it leaves it unallocated, or that layer stores it as zeroes
    /// without data, or the layers end before it. False when a read is needed to know (data somewhere, or a
    /// status that covers only part of the range). A nil chain reads as zeroes.
    static func readsAsZeroes(_ top: ImageLayer?, at offset: UInt64, length: UInt64) throws -> Bool {
        var layer = top
        var steps = 0
        while let l = layer, steps <= ImageOpener.maxChainDepth {
            steps += 1
            let size = l.virtualSize
            if offset >= size { return true }
            let ask = min(length, size - offset)
            let st = try l.format.blockStatus(at: offset, length: ask)
            if st.length < ask { return false }
            if st.allocated { return st.zero && !st.data && ask == length }
            if ask < length { return false }
            layer = l.backing
        }
        return layer == nil
    }
}
