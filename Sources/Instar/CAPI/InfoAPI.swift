import CInstar
import Glibc

// instar_info*: what `qemu-img info` reports, as a struct tree or as qemu-img's exact text.
// An instar_info_t and everything it points to (strings, the snapshot and bitmap arrays, the backing chain) are
// separate malloc'd blocks owned by the root; instar_info_free walks the tree and frees them all.

/// The defaults of instar_info_options_t, the values of INSTAR_INFO_OPTIONS_INIT.
func infoOptionsDefaults() -> instar_info_options_t {
    instar_info_options_t(struct_size: UInt32(MemoryLayout<instar_info_options_t>.size), open_flags: 0,
                          format: nil, backing_chain: 0, key_secret: nil, limits: nil,
                          backing_key_secret: nil)
}

@_cdecl("instar_info_options_init")
public func instar_info_options_init(_ opts: UnsafeMutablePointer<instar_info_options_t>?) {
    legacyInitOptions(opts, frozenSize: 32, infoOptionsDefaults())
}

@_cdecl("instar_info_options_init_sized")
public func instar_info_options_init_sized(_ opts: UnsafeMutablePointer<instar_info_options_t>?,
                                           _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, infoOptionsDefaults())
}

/// The engine options and the list qemu-img would print for `filename`.
func collectInfo(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_info_options_t>?) throws
    -> (list: [ImageInfo], chain: Bool)
{
    let name = try cString(filename, "filename")
    let defaults = infoOptionsDefaults()
    let o = try readOptions(opts, defaults: defaults)
    var options = InfoOperation.Options()
    options.format = optionalString(o.format)
    options.backingChain = o.backing_chain != 0
    options.open = openOptions(flags: o.open_flags, keySecret: o.key_secret, backingKeySecret: o.backing_key_secret)
    if o.open_flags & UInt32(INSTAR_OPEN_ISOLATED) != 0 {
        return (try IsolatedMode.collectInfo(name, options: options), options.backingChain)
    }
    return (try InfoOperation.collect(name, options: options), options.backingChain)
}

@_cdecl("instar_info")
public func instar_info(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_info_options_t>?,
                        _ out: UnsafeMutablePointer<UnsafeMutablePointer<instar_info_t>?>?,
                        _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let out else { throw InstarError.invalid("out must not be NULL") }
        out.pointee = nil
        let (list, _) = try collectInfo(filename, opts)
        var next: UnsafeMutablePointer<instar_info_t>?
        for info in list.reversed() {
            let node: UnsafeMutablePointer<instar_info_t>
            do {
                node = try makeInfoNode(info)
            } catch {
                instar_info_free(next)
                throw error
            }
            node.pointee.backing = next
            next = node
        }
        out.pointee = next
    }
}

@_cdecl("instar_info_free")
public func instar_info_free(_ info: UnsafeMutablePointer<instar_info_t>?) {
    var cur = info
    while let node = cur {
        let i = node.pointee
        for p in [i.filename, i.format, i.backing_filename, i.full_backing_filename, i.backing_format, i.specific_type,
                  i.compat, i.compression_type, i.data_file, i.encrypt_format, i.format_specific_json] {
            free(UnsafeMutableRawPointer(mutating: p))
        }
        if let snaps = i.snapshots {
            for k in 0..<Int(i.snapshot_count) {
                free(UnsafeMutableRawPointer(mutating: snaps[k].id))
                free(UnsafeMutableRawPointer(mutating: snaps[k].name))
            }
            free(UnsafeMutableRawPointer(mutating: snaps))
        }
        if let maps = i.bitmaps {
            for k in 0..<Int(i.bitmap_count) { free(UnsafeMutableRawPointer(mutating: maps[k].name)) }
            free(UnsafeMutableRawPointer(mutating: maps))
        }
        for p in [i.vmdk_create_type, i.luks_cipher_alg, i.luks_cipher_mode, i.luks_ivgen_alg, i.luks_ivgen_hash_alg,
                  i.luks_hash_alg, i.luks_uuid] {
            free(UnsafeMutableRawPointer(mutating: p))
        }
        if let ext = i.extents {
            for k in 0..<Int(i.extent_count) {
                free(UnsafeMutableRawPointer(mutating: ext[k].filename))
                free(UnsafeMutableRawPointer(mutating: ext[k].format))
            }
            free(UnsafeMutableRawPointer(mutating: ext))
        }
        free(UnsafeMutableRawPointer(mutating: i.luks_slots))
        cur = i.backing
        free(node)
    }
}

@_cdecl("instar_info_json")
public func instar_info_json(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_info_options_t>?,
                             _ json: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                             _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let json else { throw InstarError.invalid("json must not be NULL") }
        json.pointee = nil
        let (list, chain) = try collectInfo(filename, opts)
        json.pointee = mallocString(InfoOperation.json(list, chain: chain))
    }
}

@_cdecl("instar_info_human")
public func instar_info_human(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_info_options_t>?,
                              _ text: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                              _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let text else { throw InstarError.invalid("text must not be NULL") }
        text.pointee = nil
        let (list, _) = try collectInfo(filename, opts)
        text.pointee = mallocString(InfoOperation.human(list))
    }
}

/// One malloc'd instar_info_t for `info` (backing left NULL).
/// Every block is malloc'd so that instar_info_free can free() each one.
func makeInfoNode(_ info: ImageInfo) throws -> UnsafeMutablePointer<instar_info_t> {
    guard let raw = malloc(MemoryLayout<instar_info_t>.stride) else { throw InstarError(.noMemory, "Out of memory") }
    let p = raw.bindMemory(to: instar_info_t.self, capacity: 1)
    var v = instar_info_t()
    v.filename = mallocString(Optional(info.filename))
    v.format = mallocString(Optional(info.format))
    v.virtual_size = Int64(clamping: info.virtualSize)
    v.actual_size = info.actualSize.map { Int64(clamping: $0) } ?? -1
    v.cluster_size = info.clusterSize.map { Int64(clamping: $0) } ?? -1
    v.dirty_flag = triState(info.dirtyFlag)
    v.encrypted = triState(info.encrypted)
    v.compressed = Int32(INSTAR_UNSET)
    v.backing_filename = mallocString(info.backingFilename)
    v.full_backing_filename = mallocString(info.fullBackingFilename)
    v.backing_format = mallocString(info.backingFilenameFormat)
    v.snapshot_count = UInt32(clamping: info.snapshots.count)
    if !info.snapshots.isEmpty, let arr = malloc(MemoryLayout<instar_snapshot_t>.stride * info.snapshots.count) {
        let snaps = arr.bindMemory(to: instar_snapshot_t.self, capacity: info.snapshots.count)
        for (k, s) in info.snapshots.enumerated() {
            snaps[k] = instar_snapshot_t(id: mallocString(Optional(s.id)), name: mallocString(Optional(s.name)),
                                         vm_state_size: s.vmStateSize, date_sec: s.dateSec, date_nsec: s.dateNsec,
                                         vm_clock_nsec: s.vmClockNsec, icount: s.icount ?? UInt64.max)
        }
        v.snapshots = UnsafePointer(snaps)
    } else {
        v.snapshot_count = 0
    }
    v.lazy_refcounts = Int32(INSTAR_UNSET)
    v.refcount_bits = -1
    v.corrupt = Int32(INSTAR_UNSET)
    v.extended_l2 = Int32(INSTAR_UNSET)
    v.data_file_raw = Int32(INSTAR_UNSET)
    if let spec = info.formatSpecific {
        v.specific_type = mallocString(spec["type"]?.stringValue)
        v.format_specific_json = mallocString(Optional(QJSON.compact(spec)))
        let data = spec["data"]
        v.compat = mallocString(data?["compat"]?.stringValue)
        v.compression_type = mallocString(data?["compression-type"]?.stringValue)
        v.lazy_refcounts = triState(data?["lazy-refcounts"]?.boolValue)
        v.refcount_bits = data?["refcount-bits"]?.int64Value.map { Int32(clamping: $0) } ?? -1
        v.corrupt = triState(data?["corrupt"]?.boolValue)
        v.extended_l2 = triState(data?["extended-l2"]?.boolValue)
        v.data_file = mallocString(data?["data-file"]?.stringValue)
        v.data_file_raw = triState(data?["data-file-raw"]?.boolValue)
        v.encrypt_format = mallocString(data?["encrypt"]?["format"]?.stringValue)
        if case let .list(items)? = data?["bitmaps"] {
            v.has_bitmaps = 1
            if !items.isEmpty, let arr = malloc(MemoryLayout<instar_bitmap_t>.stride * items.count) {
                let maps = arr.bindMemory(to: instar_bitmap_t.self, capacity: items.count)
                for (k, b) in items.enumerated() {
                    var flags: UInt32 = 0
                    if case let .list(fl)? = b["flags"] {
                        for f in fl {
                            if f.stringValue == "in-use" { flags |= UInt32(INSTAR_BITMAP_IN_USE) }
                            if f.stringValue == "auto" { flags |= UInt32(INSTAR_BITMAP_AUTO) }
                        }
                    }
                    maps[k] = instar_bitmap_t(name: mallocString(Optional(b["name"]?.stringValue ?? "")),
                                              granularity: UInt64(clamping: b["granularity"]?.int64Value ?? 0), flags: flags)
                }
                v.bitmaps = UnsafePointer(maps)
                v.bitmap_count = UInt32(clamping: items.count)
            }
        }
    }
    fillVmdkAndLuks(&v, info.formatSpecific)
    p.initialize(to: v)
    return p
}

/// The vmdk and LUKS members of the format-specific block as fields (the C caller needs no JSON parser to see
/// every extent path or key slot).
private func fillVmdkAndLuks(_ v: inout instar_info_t, _ spec: QObject?) {
    v.vmdk_cid = -1
    v.vmdk_parent_cid = -1
    v.luks_payload_offset = -1
    v.luks_master_key_iters = -1
    guard let spec, let data = spec["data"] else { return }
    if spec["type"]?.stringValue == "vmdk" {
        v.vmdk_cid = data["cid"]?.int64Value ?? -1
        v.vmdk_parent_cid = data["parent-cid"]?.int64Value ?? -1
        v.vmdk_create_type = mallocString(data["create-type"]?.stringValue)
        if case let .list(items)? = data["extents"], !items.isEmpty,
           let arr = malloc(MemoryLayout<instar_info_extent_t>.stride * items.count) {
            let ext = arr.bindMemory(to: instar_info_extent_t.self, capacity: items.count)
            for (k, e) in items.enumerated() {
                ext[k] = instar_info_extent_t(filename: mallocString(Optional(e["filename"]?.stringValue ?? "")),
                                              format: mallocString(Optional(e["format"]?.stringValue ?? "")),
                                              virtual_size: e["virtual-size"]?.int64Value ?? -1,
                                              cluster_size: e["cluster-size"]?.int64Value ?? -1,
                                              compressed: triState(e["compressed"]?.boolValue))
            }
            v.extents = UnsafePointer(ext)
            v.extent_count = UInt32(clamping: items.count)
        }
    }
    let luks: QObject?
    if spec["type"]?.stringValue == "luks" {
        luks = data
    } else if let enc = data["encrypt"], enc["format"]?.stringValue == "luks" {
        luks = enc
    } else {
        luks = nil
    }
    guard let luks else { return }
    v.luks_cipher_alg = mallocString(luks["cipher-alg"]?.stringValue)
    v.luks_cipher_mode = mallocString(luks["cipher-mode"]?.stringValue)
    v.luks_ivgen_alg = mallocString(luks["ivgen-alg"]?.stringValue)
    v.luks_ivgen_hash_alg = mallocString(luks["ivgen-hash-alg"]?.stringValue)
    v.luks_hash_alg = mallocString(luks["hash-alg"]?.stringValue)
    v.luks_uuid = mallocString(luks["uuid"]?.stringValue)
    v.luks_payload_offset = luks["payload-offset"]?.int64Value ?? -1
    v.luks_master_key_iters = luks["master-key-iters"]?.int64Value ?? -1
    if case let .list(items)? = luks["slots"], !items.isEmpty,
       let arr = malloc(MemoryLayout<instar_info_luks_slot_t>.stride * items.count) {
        let slots = arr.bindMemory(to: instar_info_luks_slot_t.self, capacity: items.count)
        for (k, sl) in items.enumerated() {
            slots[k] = instar_info_luks_slot_t(active: sl["active"]?.boolValue == true ? 1 : 0,
                                               iters: sl["iters"]?.int64Value ?? -1,
                                               stripes: sl["stripes"]?.int64Value ?? -1,
                                               key_offset: sl["key-offset"]?.int64Value ?? -1)
        }
        v.luks_slots = UnsafePointer(slots)
        v.luks_slot_count = UInt32(clamping: items.count)
    }
}

func triState(_ b: Bool?) -> Int32 {
    guard let b else { return Int32(INSTAR_UNSET) }
    return b ? Int32(INSTAR_TRUE) : Int32(INSTAR_FALSE)
}
