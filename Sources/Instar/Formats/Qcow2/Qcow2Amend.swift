import Glibc

/// `qemu-img amend` for qcow2, after qemu 7.2's qcow2_amend_options: options are checked in declaration
/// order, then the image is upgraded, its header rewritten, lazy refcounts toggled, resized and finally
/// downgraded (zero clusters turned into data clusters or dropped first).
extension Qcow2Format: ImageAmendable {
    /// qcow2's amend_opts: the LUKS keyslot options, then the options common with creation.
    public static let amendOptionSpecs: [CreateOptionSpec] = [
        CreateOptionSpec("encrypt.state", .string, "Select new state of affected keyslots (active/inactive)"),
        CreateOptionSpec("encrypt.keyslot", .number, "Select a single keyslot to modify explicitly"),
        CreateOptionSpec("encrypt.old-secret", .string, "Select all keyslots that match this password"),
        CreateOptionSpec("encrypt.new-secret", .string, "New secret to set in the matching keyslots. Empty string to erase"),
        CreateOptionSpec("encrypt.iter-time", .number, "Time to spend in PBKDF in milliseconds"),
    ] + Qcow2Create.commonOptions

    public func amend(options: [AmendOption], force: Bool, backing: GuestReader?,
                      progress: ((Double) throws -> Void)?) throws {
        try amend(options: options, force: force, secrets: [:], backing: backing, progress: progress)
    }

    public func amend(options: [AmendOption], force: Bool, secrets: [String: String], backing: GuestReader?,
                      progress: ((Double) throws -> Void)?) throws {
        let oldVersion = header.version
        var newVersion = oldVersion
        var newSize: UInt64 = 0
        var backingFile: String?
        var backingFormat: String?
        var lazy = header.compatibleFeatures & Qcow2.compatLazyRefcounts != 0
        var refcountBits = UInt64(1) << UInt64(header.refcountOrder)
        var encryptionUpdate = false
        var newDataFile: String?
        var dataFileRaw = header.dataFileRaw
        func value(_ name: String) -> String? { options.last { $0.name == name }?.value }

        for spec in Qcow2Format.amendOptionSpecs {
            guard let v = value(spec.name) else { continue }
            switch spec.name {
            case "compat":
                switch v {
                case "0.10", "v2": newVersion = 2
                case "1.1", "v3": newVersion = 3
                default: throw InstarError(.invalid, "Unknown compatibility level \(v)", errno: EINVAL)
                }
            case "size":
                if case .success(let n) = SizeParse.parse(v) { newSize = n }
            case "backing_file": backingFile = v
            case "backing_fmt": backingFormat = v
            case "lazy_refcounts": lazy = CreateOptionValues.parseBool(v) ?? lazy
            case "refcount_bits":
                let n = CreateOptionValues.parseNumber(v) ?? refcountBits
                guard n > 0, n <= 64, n & (n - 1) == 0 else {
                    throw InstarError(.invalid, "Refcount width must be a power of two and may not exceed 64 bits",
                                      errno: EINVAL)
                }
                refcountBits = n
            case "data_file":
                if !header.hasDataFile {
                    throw InstarError(.invalid, "data-file can only be set for images that use an external data file",
                                      errno: EINVAL)
                }
                newDataFile = v
            case "data_file_raw":
                if CreateOptionValues.parseBool(v) == true && !header.dataFileRaw {
                    throw InstarError(.invalid, "data-file-raw cannot be set on existing images", errno: EINVAL)
                }
                dataFileRaw = CreateOptionValues.parseBool(v) ?? dataFileRaw
            default:
                // encrypt.*
                if header.cryptMethod == Qcow2.cryptNone {
                    throw InstarError(.invalid, "Can't amend encryption options - encryption not present", errno: EINVAL)
                }
                if header.cryptMethod != Qcow2.cryptLUKS {
                    throw InstarError(.unsupported, "Only LUKS encryption options can be amended", errno: ENOTSUP)
                }
                encryptionUpdate = true
            }
        }

        let refcountChange = refcountBits != UInt64(1) << UInt64(header.refcountOrder)
        var meter = AmendProgress(total: (newVersion != oldVersion ? 1 : 0) + (refcountChange ? 1 : 0)
                                          + (encryptionUpdate ? 1 : 0), report: progress)
        let w = try writeSide()
        try w.prepare()

        if newVersion > oldVersion {
            meter.start(1)
            try meter.status(0, 2)
            if try snapshotsNeedV3Update() {
                // v3 wants every entry to carry the 64-bit VM state size and the disk size; the table is
                // written again in that form.
                let table = try Qcow2SnapshotTable.read(file: file, offset: header.snapshotsOffset,
                                                        count: Int(header.nbSnapshots), diskSize: virtualSize,
                                                        repair: false)
                try w.writeSnapshotTable(table.entries, oldSize: table.size)
            }
            try meter.status(1, 2)
            try w.flushAll()
            header.version = newVersion
            w.header.version = newVersion
            try w.rewriteHeader()
            try meter.status(2, 2)
        }
        if encryptionUpdate {
            meter.start(2)
            try amendKeyslots(options: options, force: force, secrets: secrets)
        }
        if refcountChange {
            if newVersion < 3 && refcountBits != 16 {
                throw InstarError(.invalid, "Refcount widths other than 16 bits require compatibility level 1.1 "
                    + "or above (use compat=1.1 or greater)", errno: EINVAL)
            }
            meter.start(3)
            try w.changeRefcountOrder(UInt64(refcountBits.trailingZeroBitCount)) { try meter.status($0, $1) }
        }
        // qcow2_amend_options: the data file extension takes the new name (an empty one drops the extension),
        // and data_file_raw can only stay as it is or be cleared; both land with the header update below.
        if let name = newDataFile { extensions.dataFile = name.isEmpty ? nil : name }
        if dataFileRaw {
            w.header.autoclearFeatures |= Qcow2.autoclearDataFileRaw
        } else {
            w.header.autoclearFeatures &= ~Qcow2.autoclearDataFileRaw
        }
        header.autoclearFeatures = w.header.autoclearFeatures
        try w.flushAll()
        try w.rewriteHeader()

        if backingFile != nil || backingFormat != nil {
            if backingFile != backingReference?.filename || backingFormat != backingReference?.format {
                throw InstarError(.invalid, "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
                                  errno: EINVAL)
            }
        }

        let wasLazy = header.compatibleFeatures & Qcow2.compatLazyRefcounts != 0
        if wasLazy != lazy {
            if lazy {
                if newVersion < 3 {
                    throw InstarError(.invalid, "Lazy refcounts only supported with compatibility level 1.1 and "
                        + "above (use compat=1.1 or greater)", errno: EINVAL)
                }
                w.header.compatibleFeatures |= Qcow2.compatLazyRefcounts
            } else {
                try w.markClean()
                w.header.compatibleFeatures &= ~Qcow2.compatLazyRefcounts
            }
            header.compatibleFeatures = w.header.compatibleFeatures
            try w.rewriteHeader()
        }

        if newSize != 0 {
            try resize(to: newSize, preallocation: .off, backing: backing)
        }

        if newVersion < oldVersion {
            meter.start(2)
            try downgrade(w, backing: backing, meter: &meter)
        }
    }

    /// The encrypt.* options applied to the LUKS header in the crypto header clusters (qcrypto_block_amend_options
    /// with qcow2_crypto_hdr_read_func/write_func: every access stays inside the extension's area).
    private func amendKeyslots(options: [AmendOption], force: Bool, secrets: [String: String]) throws {
        let request = try LuksKeyslotRequest.parse(options, prefix: "encrypt.")
        guard let ext = extensions.crypto, let key = crypt?.masterKey else {
            throw InstarError(.encrypted, "Parameter 'encrypt.key-secret' is required for cipher", errno: EINVAL)
        }
        let file = self.file
        func inside(_ offset: UInt64, _ count: Int) throws -> UInt64 {
            guard offset <= ext.length, UInt64(count) <= ext.length - offset else {
                throw InstarError.invalid("Request for data outside of extension header")
            }
            return try ext.offset.adding(offset)
        }
        let io = LuksVolumeIO(read: { offset, count in
            try file.readBytes(at: try inside(offset, count), count: count)
        }, write: { offset, bytes in
            let at = try inside(offset, bytes.count)
            do {
                try file.write(bytes, at: at)
            } catch let e as InstarError {
                throw InstarError(e.code, "Could not read encryption header: " + e.message, errno: e.errnoValue)
            }
        }, sync: { try file.sync() })
        var h = try LuksHeader(bytes: try io.read(0, LuksHeader.byteCount))
        defer { if let i = try? Qcow2LuksInfo(header: h) { luks = i } }
        try LuksKeyslotAmend.apply(request, header: &h, masterKey: key, secrets: secrets, force: force, io: io)
    }

    /// qcow2_downgrade to version 2.
    private func downgrade(_ w: Qcow2Writer, backing: GuestReader?, meter: inout AmendProgress) throws {
        if header.refcountOrder != 4 {
            throw InstarError(.unsupported, "compat=0.10 requires refcount_bits=16", errno: ENOTSUP)
        }
        if header.hasDataFile {
            throw InstarError(.unsupported, "Cannot downgrade an image with a data file", errno: ENOTSUP)
        }
        for s in try snapshotExtras() where s.vmStateSize > UInt64(UInt32.max) || s.diskSize != virtualSize {
            throw InstarError(.unsupported, "Internal snapshots prevent downgrade of image", errno: ENOTSUP)
        }
        try w.markClean()
        let incompat = w.header.incompatibleFeatures & ~Qcow2.incompatCompression & ~Qcow2.incompatDirty
        if incompat != 0 {
            throw InstarError(.unsupported,
                              "Cannot downgrade an image with incompatible features 0x\(String(incompat, radix: 16)) set",
                              errno: ENOTSUP)
        }
        w.header.compatibleFeatures = 0
        w.header.autoclearFeatures = 0
        try w.expandZeroClusters(hasBacking: backingReference != nil, meter: &meter)
        if w.header.incompatibleFeatures & Qcow2.incompatCompression != 0 {
            if try hasCompressedClusters() {
                throw InstarError(.unsupported, "Cannot downgrade an image with zstd compression type and existing "
                    + "compressed clusters", errno: ENOTSUP)
            }
            w.header.incompatibleFeatures &= ~Qcow2.incompatCompression
            w.header.compressionType = 0
        }
        w.header.version = 2
        try w.flushAll()
        try w.rewriteHeader()
        header = w.header
    }

    private func hasCompressedClusters() throws -> Bool {
        var pos: UInt64 = 0
        let size = virtualSize
        while pos < size {
            let run = try mapper.lookup(pos, maxBytes: size - pos)
            if run.kind == .compressed { return true }
            pos += max(run.length, 1)
        }
        return false
    }

    struct SnapshotExtra {
        var extraSize: UInt32
        var vmStateSize: UInt64
        var diskSize: UInt64
    }

    /// The parts of the snapshot table that version changes depend on (extra data size, 64-bit VM state size
    /// and disk size, which v2 snapshots may lack).
    func snapshotExtras() throws -> [SnapshotExtra] {
        var out: [SnapshotExtra] = []
        var offset = header.snapshotsOffset
        for _ in 0..<Int(header.nbSnapshots) {
            offset = try offset.alignedUp(8)
            let h = ByteReader(try file.readBytes(at: offset, count: Int(Qcow2.snapshotHeaderSize)), what: "snapshot table")
            // qcow2.txt: bytes 12-13 id_str_size, 14-15 name_size, 32-35 vm_state_size, 36-39 extra_data_size.
            let idSize = UInt64(try h.u16be(at: 12))
            let nameSize = UInt64(try h.u16be(at: 14))
            var vmState = UInt64(try h.u32be(at: 32))
            let extraSize = try h.u32be(at: 36)
            guard extraSize <= Qcow2.maxSnapshotExtraData else { throw InstarError.corrupt("Snapshot extra data too large") }
            offset = try offset.adding(Qcow2.snapshotHeaderSize)
            let extra = ByteReader(try file.readBytes(at: offset, count: Int(extraSize)), what: "snapshot table")
            var disk = virtualSize
            if extraSize >= 8 { vmState = try extra.u64be(at: 0) }
            if extraSize >= 16 { disk = try extra.u64be(at: 8) }
            out.append(SnapshotExtra(extraSize: extraSize, vmStateSize: vmState, diskSize: disk))
            offset = try offset.adding(UInt64(extraSize) + idSize + nameSize)
        }
        return out
    }

    private func snapshotsNeedV3Update() throws -> Bool {
        try snapshotExtras().contains { $0.extraSize < 16 }
    }
}

/// qemu's qcow2_amend_helper_cb over amend_status_cb: the percentage across the amend's operations, each new
/// operation projecting the remaining ones from the work seen so far.
struct AmendProgress {
    let total: Int
    let report: ((Double) throws -> Void)?
    private var current = 0
    private var last = 0
    private var completed = 0
    private var offsetCompleted: Int64 = 0
    private var lastWork: Int64 = 0

    init(total: Int, report: ((Double) throws -> Void)?) {
        self.total = total
        self.report = report
    }

    mutating func start(_ operation: Int) { current = operation }

    mutating func status(_ offset: Int64, _ work: Int64) throws {
        if current != last {
            if last != 0 {
                offsetCompleted += lastWork
                completed += 1
            }
            last = current
        }
        guard total > 0, completed < total else { return }
        lastWork = work
        let currentWork = offsetCompleted + work
        let projected = currentWork * Int64(total - completed - 1) / Int64(completed + 1)
        let all = currentWork + projected
        if all > 0 { try report?(100.0 * Double(Float(offsetCompleted + offset) / Float(all))) }
    }
}

extension Qcow2Writer {
    /// qcow2_update_header with the writer's header and bitmaps extension; qemu's callers name a header that no
    /// longer fits as the "image" header, the refcount-width change as the "qcow2" header.
    func rewriteHeader(what: String = "image") throws {
        do {
            try format.writeHeaderCluster(header, bitmaps: bitmapsExtension)
        } catch let e as InstarError where e.errnoValue == ENOSPC {
            throw e.prepending("Failed to update the \(what) header: ")
        }
    }

    /// qcow2_mark_clean: caches written back, then the dirty bit cleared.
    func markClean() throws {
        try flushAll()
        try file.sync()
        if markedDirty || header.incompatibleFeatures & Qcow2.incompatDirty != 0 {
            header.incompatibleFeatures &= ~Qcow2.incompatDirty
            if header.version >= 3 { try writeHeaderU64(header.incompatibleFeatures, at: 72) }
            markedDirty = false
        }
    }

    /// qcow2_expand_zero_clusters: in the active L1 table and then in every snapshot's, zero clusters become
    /// data clusters holding zeroes, or, without a backing file, plain unallocated clusters (which then read as
    /// zeroes anyway). L2 tables shared with snapshots get new clusters whose refcount is the table's.
    func expandZeroClusters(hasBacking: Bool, meter: inout AmendProgress) throws {
        let snapshotTables = try format.snapshotL1Tables()
        var total = Int64(mapper.l1.count)
        for s in snapshotTables { total += Int64(s.size) }
        var visited: Int64 = 0
        try expandZeroClusters(inL1: mapper.l1, active: true, hasBacking: hasBacking, visited: &visited,
                               total: total, meter: &meter)
        // Snapshot L1 tables may name active L2 tables: those must be on disk and out of the cache before
        // they are changed directly in the file.
        try flushAll()
        for key in Array(l2Cache.entries.keys) { l2Cache.remove(at: key) }
        mapper.cache.removeAll()
        for s in snapshotTables {
            guard UInt64(s.size) <= Qcow2.maxL1Bytes / 8 else {
                throw InstarError(.range, "Snapshot L1 table too large", errno: EFBIG)
            }
            guard s.offset & (clusterSize - 1) == 0, s.offset <= UInt64(Int64.max) - UInt64(s.size) * 8 else {
                throw InstarError(.invalid, "Snapshot L1 table offset invalid", errno: EINVAL)
            }
            let bytes = try file.readExactly(at: s.offset, count: Int(s.size) * 8, what: "snapshot L1 table")
            let l1 = Qcow2Mapper.decodeBE64(bytes, count: Int(s.size))
            try expandZeroClusters(inL1: l1, active: false, hasBacking: hasBacking, visited: &visited, total: total,
                                   meter: &meter)
        }
        try flushAll()
        format.forgetDecompressed()
    }

    /// expand_zero_clusters_in_l1 for one L1 table; the active one goes through the L2 cache, the others are
    /// read and written directly.
    private func expandZeroClusters(inL1 l1: [UInt64], active: Bool, hasBacking: Bool, visited: inout Int64,
                                    total: Int64, meter: inout AmendProgress) throws {
        for (i, l1Entry) in l1.enumerated() {
            let l2Offset = l1Entry & Qcow2.l1OffsetMask
            if l2Offset != 0 {
                if l2Offset & (clusterSize - 1) != 0 {
                    throw InstarError(.corrupt, "L2 table offset \(hex(l2Offset)) unaligned (L1 index: \(hex(UInt64(i))))",
                                      errno: EIO)
                }
                let l2Refcount = try refcount(ofCluster: l2Offset >> clusterBits)
                var table: [UInt64]
                let cached = active ? try l2Entry(at: l2Offset) : nil
                if let c = cached {
                    table = c.table
                } else {
                    let raw = try file.readExactly(at: l2Offset, count: Int(clusterSize), what: "L2 table")
                    table = Qcow2Mapper.decodeBE64(raw, count: Int(clusterSize / 8))
                }
                var dirty = false
                for k in 0..<table.count {
                    let entry = table[k]
                    if entry & Qcow2.l2Compressed != 0 || entry & Qcow2.l2Zero == 0 { continue }
                    var host = entry & Qcow2.l2OffsetMask
                    if host == 0 {
                        if !hasBacking {
                            table[k] = 0
                            dirty = true
                            continue
                        }
                        host = try allocateClusters(1)
                        if l2Refcount > 1 {
                            // Shared L2 table: the new cluster is referenced as often as the table is.
                            let cluster = host >> clusterBits
                            if let rb = try blockOffset(tableIndex: cluster >> refBlockBits) {
                                let e = try refBlock(at: rb)
                                Qcow2Writer.setEntry(&e.table, index: cluster & refIndexMask, order: refOrder,
                                                     value: l2Refcount)
                                rbCache.markDirty(e)
                            }
                        }
                        try flushRefcounts()
                    }
                    if host & (clusterSize - 1) != 0 {
                        throw InstarError(.corrupt, "Cluster allocation offset \(hex(host)) unaligned (L2 offset: "
                            + "\(hex(l2Offset)), L2 index: \(hex(UInt64(k))))", errno: EIO)
                    }
                    try file.writeZeroes(at: host, length: clusterSize)
                    table[k] = l2Refcount == 1 ? host | Qcow2.l2Copied : host
                    dirty = true
                }
                if dirty {
                    if let c = cached {
                        c.table = table
                        l2Cache.markDirty(c)
                        l2DependsOnFlush = true
                    } else {
                        try file.write(Qcow2Writer.encodeBE64(table), at: l2Offset)
                    }
                }
            }
            visited += 1
            try meter.status(visited, total)
        }
    }
}

extension Qcow2Format {
    /// The L1 tables (offset, entries) of the internal snapshots, in table order.
    func snapshotL1Tables() throws -> [(offset: UInt64, size: UInt32)] {
        var out: [(offset: UInt64, size: UInt32)] = []
        var offset = header.snapshotsOffset
        for _ in 0..<Int(header.nbSnapshots) {
            offset = try offset.alignedUp(8)
            let h = ByteReader(try file.readBytes(at: offset, count: Int(Qcow2.snapshotHeaderSize)), what: "snapshot table")
            out.append((try h.u64be(at: 0), try h.u32be(at: 8)))
            let idSize = UInt64(try h.u16be(at: 12))
            let nameSize = UInt64(try h.u16be(at: 14))
            let extraSize = UInt64(try h.u32be(at: 36))
            offset = try offset.adding(Qcow2.snapshotHeaderSize + extraSize + idSize + nameSize)
        }
        return out
    }
}
