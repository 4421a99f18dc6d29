/// The internal snapshot table (qcow2.txt "Snapshots"), read as qemu's qcow2_read_snapshots does: entries are
/// 8-byte aligned, each a 40-byte header, extra data, id and name.
enum Qcow2Snapshots {
    // qcow2.txt: extra data bytes 0-7 vm_state_size_large, 8-15 disk_size, 16-23 icount.
    static let extraVMStateLargeEnd: UInt32 = 8
    static let extraICountEnd: UInt32 = 24

    static func read(header: Qcow2Header, file: HostFile) throws -> [SnapshotInfo] {
        let count = Int(header.nbSnapshots)   // bounded to 65536 by header validation
        if count == 0 { return [] }
        var out: [SnapshotInfo] = []
        out.reserveCapacity(count)
        var offset = header.snapshotsOffset
        let start = offset
        for i in 0..<count {
            offset = try offset.alignedUp(8)
            let h = ByteReader(try file.readBytes(at: offset, count: Int(Qcow2.snapshotHeaderSize)), what: "snapshot table")
            offset = try offset.adding(Qcow2.snapshotHeaderSize)
            // qcow2.txt: bytes 0-7 l1_table_offset, 8-11 l1_size, 12-13 id_str_size, 14-15 name_size,
            // 16-19 date_sec, 20-23 date_nsec, 24-31 vm_clock_nsec, 32-35 vm_state_size, 36-39 extra_data_size.
            let idSize = Int(try h.u16be(at: 12))
            let nameSize = Int(try h.u16be(at: 14))
            let dateSec = try h.u32be(at: 16)
            let dateNsec = try h.u32be(at: 20)
            let vmClock = try h.u64be(at: 24)
            var vmState = UInt64(try h.u32be(at: 32))
            let extraSize = try h.u32be(at: 36)
            guard extraSize <= Qcow2.maxSnapshotExtraData else {
                throw InstarError(.invalid, "Too much extra metadata in snapshot table entry \(i)", errno: 27 /* EFBIG */)
            }
            let extra = ByteReader(try file.readBytes(at: offset, count: Int(extraSize)), what: "snapshot extra data")
            offset = try offset.adding(UInt64(extraSize))
            if extraSize >= extraVMStateLargeEnd { vmState = try extra.u64be(at: 0) }
            var icount: UInt64?
            if extraSize >= extraICountEnd {
                let v = try extra.u64be(at: 16)
                icount = v == UInt64.max ? nil : v
            }
            let id = ByteReader(try file.readBytes(at: offset, count: idSize)).bytes
            offset = try offset.adding(UInt64(idSize))
            let name = ByteReader(try file.readBytes(at: offset, count: nameSize)).bytes
            offset = try offset.adding(UInt64(nameSize))
            guard offset - start <= Qcow2.maxSnapshotTableBytes else {
                throw InstarError(.invalid, "Snapshot table is too big", errno: 27 /* EFBIG */)
            }
            out.append(SnapshotInfo(id: cString(id), name: cString(name), vmStateSize: vmState, dateSec: dateSec,
                                    dateNsec: dateNsec, vmClockNsec: vmClock, icount: icount,
                                    nameBytes: Array(name.prefix { $0 != 0 })))
        }
        return out
    }

    /// qemu keeps names as C strings: an embedded NUL ends them.
    static func cString(_ bytes: [UInt8]) -> String {
        String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }
}
