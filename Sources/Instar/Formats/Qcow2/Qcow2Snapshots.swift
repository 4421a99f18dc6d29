/// The internal snapshot table (qcow2.txt "Snapshots"), read as qemu's qcow2_read_snapshots does: entries are
/// 8-byte aligned, each a 40-byte header, extra data, id and name.
enum Qcow2Snapshots {
    // qcow2.txt: extra data bytes 0-7 vm_state_size_large, 8-15 disk_size, 16-23 icount.
    static let extraVMStateLargeEnd: UInt32 = 8
    static let extraICountEnd: UInt32 = 24

    /// qcow2_read_snapshots at open: the strict reading of the table (the check reads it leniently).
    static func read(header: Qcow2Header, file: HostFile) throws -> [SnapshotInfo] {
        let count = Int(header.nbSnapshots)   // bounded to 65536 by header validation
        if count == 0 { return [] }
        let table = try Qcow2SnapshotTable.read(file: file, offset: header.snapshotsOffset, count: count,
                                                diskSize: header.size / 512 * 512, repair: false)
        return table.entries.map { e in
            SnapshotInfo(id: cString(e.id), name: cString(e.name), vmStateSize: e.vmStateSize, dateSec: e.dateSec,
                         dateNsec: e.dateNsec, vmClockNsec: e.vmClockNsec,
                         icount: e.icount == UInt64.max ? nil : e.icount, nameBytes: e.name)
        }
    }

    /// qemu keeps names as C strings: an embedded NUL ends them.
    static func cString(_ bytes: [UInt8]) -> String {
        String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }
}
