import Glibc

/// What convert needs from the qcow2 driver beyond the generic write path: compressed cluster writes through
/// the driver-neutral `CompressedClusterWriting` protocol.
extension Qcow2Compressor: ClusterCompressor {}

extension Qcow2Format: CompressedClusterWriting {
    public var compressedWrites: CompressedClusterWriting? { self }
    public var compressedClusterSize: UInt64 { header.clusterSize }
    public func makeClusterCompressor() -> ClusterCompressor {
        header.hasDataFile ? Qcow2DataFileCompressor() : makeCompressor()
    }

    /// qcow2_co_pwritev_compressed_part with no bytes: the image file is truncated to its own length as the
    /// block layer reports it, which counts whole 512-byte sectors, so a file ending inside a sector (after a
    /// compressed stream, or after an L1 table shorter than a sector) grows to the sector's end. It runs even
    /// when nothing was written, and before the metadata is flushed at close.
    public func finishCompressedWrites() throws {
        let length = try file.size()
        let aligned = try length.alignedUp(Qcow2.compressedSectorSize)
        if aligned != length { try file.truncate(to: aligned) }
    }
}

/// qcow2_co_pwritev_compressed_part refuses every compressed write to an image with an external data file, even
/// one whose data would not compress; failing in the compressor makes the first cluster fail, as in qemu.
struct Qcow2DataFileCompressor: ClusterCompressor {
    func compress(_ input: UnsafeRawBufferPointer) throws -> [UInt8]? {
        throw InstarError(.unsupported, "Compressed writes are not supported with an external data file", errno: ENOTSUP)
    }
}

extension Qcow2Format {
    /// qemu's qcow2_snapshot_load_tmp: the snapshot's L1 table replaces the active one for reading. The
    /// virtual size stays the active one's, as in qemu.
    public func loadSnapshotTemporarily(id: String?, name: String?) throws {
        if writable { throw InstarError(.permission, "Device must be read only", errno: EACCES) }
        let entries = try Qcow2SnapshotL1.read(header: header, file: file)
        // find_snapshot_by_id_and_name: both given must both match.
        guard let sn = entries.first(where: { e in
            (id == nil || e.id == id) && (name == nil || e.name == name) && (id != nil || name != nil)
        }) else {
            throw InstarError(.notFound, "Can't find snapshot", errno: ENOENT)
        }
        guard UInt64(sn.l1Size) <= Qcow2.maxL1Bytes / 8 else { throw InstarError.invalid("Snapshot L1 table too large") }
        let bytes = UInt64(sn.l1Size) * 8
        guard sn.l1Offset <= UInt64(Int64.max) - bytes, sn.l1Offset % header.clusterSize == 0 else {
            throw InstarError.invalid("Snapshot L1 table offset invalid")
        }
        let raw = sn.l1Size == 0 ? [] : try file.readMetadata(at: sn.l1Offset, count: Int(bytes),
                                                                what: "the L1 table of the snapshot")
        mapper.l1 = Qcow2Mapper.decodeBE64(raw, count: Int(sn.l1Size))
        forgetDecompressed()
    }
}

/// The L1 location of each internal snapshot (qcow2.txt "Snapshots": bytes 0-7 l1_table_offset, 8-11 l1_size,
/// 12-13 id length, 14-15 name length, 36-39 extra data length), walked as `Qcow2Snapshots.read` does.
enum Qcow2SnapshotL1 {
    struct Entry {
        var id: String
        var name: String
        var l1Offset: UInt64
        var l1Size: UInt32
    }

    static func read(header: Qcow2Header, file: HostFile) throws -> [Entry] {
        var out: [Entry] = []
        var offset = header.snapshotsOffset
        for _ in 0..<Int(header.nbSnapshots) {
            offset = try offset.alignedUp(8)
            let h = ByteReader(try file.readBytes(at: offset, count: Int(Qcow2.snapshotHeaderSize)), what: "snapshot table")
            offset = try offset.adding(Qcow2.snapshotHeaderSize)
            let l1Offset = try h.u64be(at: 0)
            let l1Size = try h.u32be(at: 8)
            let idSize = UInt64(try h.u16be(at: 12))
            let nameSize = UInt64(try h.u16be(at: 14))
            let extra = UInt64(try h.u32be(at: 36))
            guard extra <= UInt64(Qcow2.maxSnapshotExtraData) else { throw InstarError.invalid("Too much extra metadata in snapshot table") }
            offset = try offset.adding(extra)
            let id = try file.readBytes(at: offset, count: Int(idSize))
            offset = try offset.adding(idSize)
            let name = try file.readBytes(at: offset, count: Int(nameSize))
            offset = try offset.adding(nameSize)
            out.append(Entry(id: Qcow2Snapshots.cString(id), name: Qcow2Snapshots.cString(name), l1Offset: l1Offset,
                             l1Size: l1Size))
        }
        return out
    }
}
