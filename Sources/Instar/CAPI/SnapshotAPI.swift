import CInstar
import Glibc

/// The defaults of instar_snapshot_options_t, the values of INSTAR_SNAPSHOT_OPTIONS_INIT.
func snapshotOptionsDefaults() -> instar_snapshot_options_t {
    instar_snapshot_options_t(struct_size: UInt32(MemoryLayout<instar_snapshot_options_t>.size),
                              open_flags: 0, key_secret: nil, limits: nil)
}

@_cdecl("instar_snapshot_options_init")
public func instar_snapshot_options_init(_ opts: UnsafeMutablePointer<instar_snapshot_options_t>?) {
    legacyInitOptions(opts, frozenSize: 16, snapshotOptionsDefaults())
}

@_cdecl("instar_snapshot_options_init_sized")
public func instar_snapshot_options_init_sized(_ opts: UnsafeMutablePointer<instar_snapshot_options_t>?,
                                               _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, snapshotOptionsDefaults())
}

/// The operation options an options struct (or its defaults) asks for.
private func snapshotOptions(_ opts: UnsafePointer<instar_snapshot_options_t>?) throws -> SnapshotOperation.Options {
    let defaults = snapshotOptionsDefaults()
    let o = try readOptions(opts, defaults: defaults)
    var options = SnapshotOperation.Options()
    options.open = openOptions(flags: o.open_flags & ~UInt32(INSTAR_OPEN_READ_WRITE), keySecret: o.key_secret)
    return options
}

@_cdecl("instar_snapshot_list")
public func instar_snapshot_list(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_snapshot_options_t>?,
                                 _ out: UnsafeMutablePointer<UnsafeMutablePointer<instar_snapshot_list_t>?>?,
                                 _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let out else { throw InstarError.invalid("out must not be NULL") }
        out.pointee = nil
        let name = try cString(filename, "filename")
        let list = try SnapshotOperation.list(name, options: try snapshotOptions(opts))
        guard let result = calloc(1, MemoryLayout<instar_snapshot_list_t>.size)?
                .assumingMemoryBound(to: instar_snapshot_list_t.self),
              let array = calloc(max(1, list.count), MemoryLayout<instar_snapshot_t>.size)?
                .assumingMemoryBound(to: instar_snapshot_t.self) else {
            throw InstarError(.noMemory, "Cannot allocate memory")
        }
        for (i, s) in list.enumerated() {
            // The name as stored: its bytes (up to the first NUL, which a stored name cannot hold).
            let nameCopy: UnsafePointer<CChar>? = (s.nameBytes + [0]).withUnsafeBufferPointer { b in
                b.baseAddress.flatMap { p in
                    p.withMemoryRebound(to: CChar.self, capacity: b.count) { UnsafePointer(strdup($0)) }
                }
            }
            array[i] = instar_snapshot_t(id: mallocString(s.id), name: nameCopy, vm_state_size: s.vmStateSize,
                                         date_sec: s.dateSec, date_nsec: s.dateNsec, vm_clock_nsec: s.vmClockNsec,
                                         icount: s.icount ?? UInt64.max)
        }
        result.pointee = instar_snapshot_list_t(count: UInt64(list.count), snapshots: array)
        out.pointee = result
    }
}

@_cdecl("instar_snapshot_list_free")
public func instar_snapshot_list_free(_ list: UnsafeMutablePointer<instar_snapshot_list_t>?) {
    guard let list else { return }
    if let entries = list.pointee.snapshots {
        for i in 0..<Int(list.pointee.count) {
            free(UnsafeMutableRawPointer(mutating: entries[i].id))
            free(UnsafeMutableRawPointer(mutating: entries[i].name))
        }
        free(entries)
    }
    free(list)
}

@_cdecl("instar_snapshot_create")
public func instar_snapshot_create(_ filename: UnsafePointer<CChar>?, _ snapshot: UnsafePointer<CChar>?,
                                   _ opts: UnsafePointer<instar_snapshot_options_t>?,
                                   _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        try SnapshotOperation.create(try cString(filename, "filename"), snapshot: try cString(snapshot, "name"),
                                     options: try snapshotOptions(opts))
    }
}

@_cdecl("instar_snapshot_apply")
public func instar_snapshot_apply(_ filename: UnsafePointer<CChar>?, _ snapshot: UnsafePointer<CChar>?,
                                  _ opts: UnsafePointer<instar_snapshot_options_t>?,
                                  _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        try SnapshotOperation.apply(try cString(filename, "filename"), snapshot: try cString(snapshot, "id_or_name"),
                                    options: try snapshotOptions(opts))
    }
}

@_cdecl("instar_snapshot_delete")
public func instar_snapshot_delete(_ filename: UnsafePointer<CChar>?, _ snapshot: UnsafePointer<CChar>?,
                                   _ opts: UnsafePointer<instar_snapshot_options_t>?,
                                   _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        try SnapshotOperation.delete(try cString(filename, "filename"), snapshot: try cString(snapshot, "name"),
                                     options: try snapshotOptions(opts))
    }
}
