import CZlib
import CZstd
import Glibc

/// Compressed clusters (qcow2.txt "Compressed Clusters Descriptor"): an L2 entry holds the host offset of a
/// compressed stream and its length in 512-byte sectors; the stream inflates to exactly one cluster.
struct Qcow2CompressedDescriptor: Equatable {
    var hostOffset: UInt64
    /// Bytes to read from `hostOffset` (the stream lies within them).
    var length: UInt64

    /// Splits an L2 entry. qcow2.txt: x = 62 - (cluster_bits - 8); bits 0..x-1 offset, x..61 sectors - 1.
    init(entry: UInt64, clusterBits: UInt32) {
        let shift = 62 - (UInt64(clusterBits) - 8)
        let sectorMask = (UInt64(1) << (UInt64(clusterBits) - 8)) - 1
        hostOffset = entry & ((UInt64(1) << shift) - 1)
        let sectors = ((entry >> shift) & sectorMask) + 1
        length = sectors * Qcow2.compressedSectorSize - (hostOffset & (Qcow2.compressedSectorSize - 1))
    }
}

/// Inflates compressed clusters with zlib (raw deflate) or zstd, reusing one decoder.
final class Qcow2Decompressor {
    let type: UInt8
    private var zstd: OpaquePointer?

    init(type: UInt8) { self.type = type }

    deinit { if let z = zstd { ZSTD_freeDCtx(z) } }

    /// Fills all of `output` from `input`; anything short of a full cluster is corruption (as in qemu).
    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else {
            throw InstarError(.corrupt, "Compressed cluster is empty", errno: EIO)
        }
        switch type {
        case Qcow2.compressionZlib:
            var strm = z_stream()
            strm.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: UInt8.self))
            strm.avail_in = uInt(input.count)
            strm.next_out = outBase.assumingMemoryBound(to: UInt8.self)
            strm.avail_out = uInt(output.count)
            // qemu's qcow2_zlib_decompress: raw deflate with a 4 KiB window.
            guard inflateInit2_(&strm, -12, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                throw InstarError(.noMemory, "Could not initialise zlib", errno: ENOMEM)
            }
            let r = inflate(&strm, Z_FINISH)
            let left = strm.avail_out
            inflateEnd(&strm)
            guard (r == Z_STREAM_END || r == Z_BUF_ERROR) && left == 0 else {
                throw InstarError(.corrupt, "Could not decompress cluster", errno: EIO)
            }
        case Qcow2.compressionZstd:
            if zstd == nil { zstd = ZSTD_createDCtx() }
            guard let dctx = zstd else { throw InstarError(.noMemory, "Could not initialise zstd", errno: ENOMEM) }
            ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only)
            var out = ZSTD_outBuffer(dst: outBase, size: output.count, pos: 0)
            var inp = ZSTD_inBuffer(src: inBase, size: input.count, pos: 0)
            var ret: Int = 0
            while out.pos < out.size {
                let lastIn = inp.pos
                let lastOut = out.pos
                ret = ZSTD_decompressStream(dctx, &out, &inp)
                if ZSTD_isError(ret) != 0 || (lastIn >= inp.pos && lastOut >= out.pos) {
                    throw InstarError(.corrupt, "Could not decompress cluster", errno: EIO)
                }
            }
            // A frame that is not fully flushed holds more than one cluster of content.
            if ret > 0 { throw InstarError(.corrupt, "Could not decompress cluster", errno: EIO) }
        default:
            throw InstarError(.corrupt, "Unknown compression type", errno: EIO)
        }
    }
}

/// Compresses whole clusters for compressed writes, as qemu's qcow2_co_compress: zlib as raw deflate with a
/// 4 KiB window, or a zstd frame. A result is only useful when it is smaller than the cluster.
public final class Qcow2Compressor {
    let type: UInt8
    let clusterSize: Int
    private var zstd: OpaquePointer?

    init(type: UInt8, clusterSize: Int) {
        self.type = type
        self.clusterSize = clusterSize
    }

    deinit { if let z = zstd { ZSTD_freeCCtx(z) } }

    /// The compressed form of `input` (one cluster), or nil when it would not be smaller than
    /// clusterSize - 1 bytes (qemu then writes the cluster uncompressed).
    public func compress(_ input: UnsafeRawBufferPointer) throws -> [UInt8]? {
        let limit = clusterSize - 1
        guard let inBase = input.baseAddress, limit > 0 else { return nil }
        var out = [UInt8](repeating: 0, count: limit)
        var produced = 0
        switch type {
        case Qcow2.compressionZlib:
            var strm = z_stream()
            // qemu's qcow2_zlib_compress: default level, raw deflate (-12 window bits), memLevel 9.
            guard deflateInit2_(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY, zlibVersion(),
                                Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                throw InstarError(.noMemory, "Could not initialise zlib", errno: ENOMEM)
            }
            let r: Int32 = out.withUnsafeMutableBytes { dst in
                strm.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: UInt8.self))
                strm.avail_in = uInt(input.count)
                strm.next_out = dst.baseAddress?.assumingMemoryBound(to: UInt8.self)
                strm.avail_out = uInt(limit)
                return deflate(&strm, Z_FINISH)
            }
            produced = limit - Int(strm.avail_out)
            deflateEnd(&strm)
            guard r == Z_STREAM_END else { return nil }
        case Qcow2.compressionZstd:
            if zstd == nil { zstd = ZSTD_createCCtx() }
            guard let cctx = zstd else { throw InstarError(.noMemory, "Could not initialise zstd", errno: ENOMEM) }
            ZSTD_CCtx_reset(cctx, ZSTD_reset_session_only)
            let r: Int = out.withUnsafeMutableBytes { dst in
                var o = ZSTD_outBuffer(dst: dst.baseAddress, size: limit, pos: 0)
                var i = ZSTD_inBuffer(src: inBase, size: input.count, pos: 0)
                let ret = ZSTD_compressStream2(cctx, &o, &i, ZSTD_e_end)
                produced = o.pos
                return ret
            }
            // Non-zero: an error, or output left over because it did not fit.
            if ZSTD_isError(r) != 0 || r != 0 { return nil }
        default:
            throw InstarError(.invalid, "Unknown compression type")
        }
        return Array(out[0..<produced])
    }
}
