import CInstar
import Glibc

// instar_block_status on a handle from instar_open: the chain's status of a guest range, for servers
// (the nbdkit plugin's extents callback).

@_cdecl("instar_block_status")
public func instar_block_status(_ image: OpaquePointer?, _ offset: UInt64, _ count: UInt64,
                                _ status: UnsafeMutablePointer<instar_block_status_t>?,
                                _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let h = try handle(image)
        guard let status else { throw InstarError.invalid("status must not be NULL") }
        let declared = Int(status.pointee.struct_size)
        guard declared >= MemoryLayout<UInt32>.size else {
            throw InstarError.invalid("struct_size of the status struct is too small")
        }
        let s: ChainBlockStatus = try h.locked {
            let size = h.layer.virtualSize
            guard count > 0, offset <= size, count <= size - offset else {
                throw InstarError(.range, "Block status of \(count) bytes at offset \(offset) is beyond the end of "
                                  + "the image (\(size) bytes)")
            }
            return try ChainStatus.aboveStatus(h.layer, at: offset, length: count)
        }
        var flags: UInt32 = 0
        if s.allocated { flags |= UInt32(INSTAR_STATUS_ALLOCATED) }
        if s.data { flags |= UInt32(INSTAR_STATUS_DATA) }
        if s.zero { flags |= UInt32(INSTAR_STATUS_ZERO) }
        if s.eof { flags |= UInt32(INSTAR_STATUS_EOF) }
        var full = instar_block_status_t(struct_size: UInt32(min(declared, MemoryLayout<instar_block_status_t>.size)),
                                         flags: flags, length: min(max(s.length, 1), count),
                                         depth: Int32(clamping: s.depth), reserved: 0)
        let n = min(declared, MemoryLayout<instar_block_status_t>.size)
        withUnsafeBytes(of: &full) { src in
            UnsafeMutableRawPointer(status).copyMemory(from: src.baseAddress!, byteCount: n)
        }
    }
}
