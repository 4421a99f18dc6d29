import CInstar
import Glibc

/// Creating qcow2 images byte for byte as qemu 7.2's qcow2_co_create does. qemu builds the image by writing a
/// minimal header, opening it and then growing it through the ordinary allocation paths (L1 growth, L2 and
/// refcount-block allocation, refcount-area creation for preallocation). `Qcow2Builder` replays those paths
/// on an in-memory model of the refcounts and tables, writing to the file in qemu's order, so cluster
/// placement (including freed and reused clusters) comes out the same.
public enum Qcow2Create {
    /// qcow2's create options in qemu's declaration order (this order decides the `Formatting` line).
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("encryption", .bool, "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
        CreateOptionSpec("encrypt.format", .string, "Encrypt the image, format choices: 'aes', 'luks'"),
        CreateOptionSpec("encrypt.key-secret", .string, "ID of secret providing qcow AES key or LUKS passphrase"),
        CreateOptionSpec("encrypt.cipher-alg", .string, "Name of encryption cipher algorithm"),
        CreateOptionSpec("encrypt.cipher-mode", .string, "Name of encryption cipher mode"),
        CreateOptionSpec("encrypt.ivgen-alg", .string, "Name of IV generator algorithm"),
        CreateOptionSpec("encrypt.ivgen-hash-alg", .string, "Name of IV generator hash algorithm"),
        CreateOptionSpec("encrypt.hash-alg", .string, "Name of encryption hash algorithm"),
        CreateOptionSpec("encrypt.iter-time", .number, "Time to spend in PBKDF in milliseconds"),
        CreateOptionSpec("cluster_size", .size, "qcow2 cluster size", default: "65536"),
        CreateOptionSpec("extended_l2", .bool, "Extended L2 tables", default: "off"),
        CreateOptionSpec("preallocation", .string, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        CreateOptionSpec("compression_type", .string, "Compression method used for image cluster compression", default: "zlib"),
    ] + commonOptions

    /// The options qemu's qcow2 create_opts and amend_opts share (QCOW_COMMON_OPTIONS), in declaration order.
    static let commonOptions: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size"),
        CreateOptionSpec("compat", .string, "Compatibility level (v2 [0.10] or v3 [1.1])"),
        CreateOptionSpec("backing_file", .string, "File name of a base image"),
        CreateOptionSpec("backing_fmt", .string, "Image format of the base image"),
        CreateOptionSpec("data_file", .string, "File name of an external data file"),
        CreateOptionSpec("data_file_raw", .bool, "The external data file must stay valid as a raw image"),
        CreateOptionSpec("lazy_refcounts", .bool, "Postpone refcount updates", default: "off"),
        CreateOptionSpec("refcount_bits", .number, "Width of a reference count entry in bits", default: "16"),
    ]

    public static let creator = FormatCreator(name: "qcow2", options: options, create: create, measure: measure)

    public enum Preallocation: String { case off, metadata, falloc, full }

    /// The validated creation parameters (qemu's BlockdevCreateOptionsQcow2 after qcow2_co_create's checks).
    struct Settings {
        var size: UInt64
        var version: UInt32 = 3
        var clusterSize: UInt64 = 65536
        var extendedL2 = false
        var preallocation: Preallocation = .off
        var lazyRefcounts = false
        var refcountBits: UInt64 = 16
        var backingFile: String?
        var backingFormat: String?
        var dataFile: String?
        var dataFileRaw = false
        var zstd = false
        var encryption: Qcow2EncryptionRequest?
        var secrets: [String: String] = [:]
        var clusterBits: UInt64 { UInt64(clusterSize.trailingZeroBitCount) }
    }

    static func parseVersion(_ text: String?) throws -> UInt32? {
        guard let t = text else { return nil }
        switch t {
        case "0.10", "v2": return 2
        case "1.1", "v3": return 3
        default: throw InstarError.invalid("Parameter 'version' does not accept value '\(t)'")
        }
    }

    static func parsePreallocation(_ text: String?) throws -> Preallocation? {
        guard let t = text else { return nil }
        guard let p = Preallocation(rawValue: t) else {
            throw InstarError.invalid("Parameter 'preallocation' does not accept value '\(t)'")
        }
        return p
    }

    static func parseCompression(_ text: String?) throws -> Bool {
        guard let t = text else { return false }
        switch t {
        case "zlib": return false
        case "zstd": return true
        default: throw InstarError.invalid("Parameter 'compression-type' does not accept value '\(t)'")
        }
    }

    /// qemu's validate_cluster_size.
    static func validateClusterSize(_ cs: UInt64, extendedL2: Bool) throws {
        guard isPowerOfTwo(cs), cs >= 512, cs <= 2 << 20 else {
            throw InstarError.invalid("Cluster size must be a power of two between 512 and 2048k")
        }
        if extendedL2 && cs < 16384 {
            throw InstarError.invalid("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
    }

    /// qcow2_co_create_opts + qcow2_co_create's checks, in qemu's order.
    static func settings(_ o: CreateOptionValues) throws -> Settings {
        if o.text("encrypt.format") != nil && o.text("encryption") != nil {
            throw InstarError.invalid("'encrypt.format' and its alias 'encryption' can't be used at the same time")
        }
        // QAPI visits version, then encrypt, then preallocation, then compression-type.
        let version = try parseVersion(o.text("compat"))
        let encryption = try Qcow2EncryptionRequest.parse(o)
        let prealloc = try parsePreallocation(o.text("preallocation"))
        let zstd = try parseCompression(o.text("compression_type"))

        var s = Settings(size: try (o.size("size") ?? 0).alignedUp(512))
        s.version = version ?? 3
        s.encryption = encryption
        s.clusterSize = o.size("cluster_size") ?? 65536
        s.extendedL2 = o.bool("extended_l2")
        if s.extendedL2 && s.version < 3 {
            throw InstarError.invalid("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        try validateClusterSize(s.clusterSize, extendedL2: s.extendedL2)
        s.preallocation = prealloc ?? .off
        s.backingFile = o.text("backing_file")
        s.backingFormat = o.text("backing_fmt")
        if s.backingFile != nil && s.preallocation != .off && !s.extendedL2 {
            throw InstarError.invalid("Backing file and preallocation can only be used at the same time if extended_l2 is on")
        }
        if s.backingFormat != nil && s.backingFile == nil {
            throw InstarError.invalid("Backing format cannot be used without backing file")
        }
        s.lazyRefcounts = o.bool("lazy_refcounts")
        if s.version < 3 && s.lazyRefcounts {
            throw InstarError.invalid("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        s.refcountBits = o.number("refcount_bits") ?? 16
        if s.refcountBits > 64 || !isPowerOfTwo(s.refcountBits) {
            throw InstarError.invalid("Refcount width must be a power of two and may not exceed 64 bits")
        }
        if s.version < 3 && s.refcountBits != 16 {
            throw InstarError.invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
        }
        s.dataFile = o.text("data_file")
        s.dataFileRaw = o.bool("data_file_raw")
        if s.dataFileRaw && s.dataFile == nil { throw InstarError.invalid("data-file-raw requires data-file") }
        if s.dataFileRaw && s.backingFile != nil {
            throw InstarError.invalid("Backing file and data-file-raw cannot be used at the same time")
        }
        if s.dataFileRaw && s.preallocation == .off {
            // A raw data file must be readable without the metadata, so qemu preallocates the mapping.
            s.preallocation = .metadata
        }
        if s.dataFile != nil && s.version < 3 {
            throw InstarError.invalid("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        if zstd {
            if s.version < 3 {
                throw InstarError.invalid("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
            }
            s.zstd = true
        }
        return s
    }

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        // The protocol file is created (empty) before the qcow2 options are checked, as in qemu.
        let file = try HostFileCreate.createEmpty(r.filename, options: r.options)
        // qemu creates the external data file through the protocol layer with the image's size and mode.
        var dataFile: HostFile?
        if let df = o.text("data_file") {
            let mode: HostFileCreate.Preallocation
            switch o.text("preallocation") {
            case "falloc": mode = .falloc
            case "full": mode = .full
            default: mode = .off
            }
            dataFile = try HostFileCreate.create(df, size: try (o.size("size") ?? 0).alignedUp(512), preallocation: mode)
        }
        do {
            var s = try settings(o)
            s.secrets = r.secrets
            let builder = try Qcow2Builder(file: file, settings: s)
            try builder.build()
            // Every file on disk before create returns, the data file first. qemu flushes between the steps of
            // its sequence too (qcow2_co_create reopens the image to flush it before returning, and its metadata
            // caches flush the file as they write back), but those flushes only order writes inside a new file
            // that create holds locked and that is no finished image before it returns: a crash before the end
            // leaves an unfinished image with qemu as with instar, so one flush per file at the end promises the
            // same. The data file's preallocation went through another descriptor of the same file; fdatasync
            // writes back the whole file, whichever descriptor wrote it.
            try dataFile?.sync()
            try file.sync()
        } catch {
            // qemu deletes the image (and a data file it created) when qcow2 creation fails.
            unlink(r.filename)
            if let df = o.text("data_file") { unlink(df) }
            throw error
        }
    }

    // MARK: measure

    /// qemu's qcow2_refcount_metadata_size: refcount table and blocks needed for `clusters` clusters,
    /// counting the refcount structures themselves (a fixed point).
    static func refcountMetadataSize(clusters: UInt64, clusterSize: UInt64, refcountOrder: UInt64,
                                     generous: Bool) -> (bytes: UInt64, blocks: UInt64) {
        let perTableCluster = clusterSize / 8
        let perBlock = clusterSize * 8 / (1 << refcountOrder)
        var clusters = clusters
        var table: UInt64 = 0
        var blocks: UInt64 = 0
        var last: UInt64 = 0
        var n: UInt64 = 0
        var generous = generous
        repeat {
            last = n
            blocks = (clusters &+ table &+ blocks).divCeil(perBlock)
            table = blocks.divCeil(perTableCluster)
            n = clusters &+ blocks &+ table
            if n == last && generous {
                clusters &+= table.divCeil(2)
                n = 0
                generous = false
            }
        } while n != last
        return ((blocks &+ table) &* clusterSize, blocks)
    }

    /// qemu's qcow2_calc_prealloc_size: the file size of a fully preallocated image.
    static func preallocSize(_ size: UInt64, clusterSize: UInt64, refcountOrder: UInt64, extendedL2: Bool) throws -> UInt64 {
        let aligned = try size.alignedUp(clusterSize)
        let l2eSize: UInt64 = extendedL2 ? 16 : 8
        var meta = clusterSize
        var nl2e = aligned / clusterSize
        nl2e = try nl2e.alignedUp(clusterSize / l2eSize)
        meta = try meta.adding(try nl2e.multiplied(by: l2eSize))
        var nl1e = nl2e * l2eSize / clusterSize
        nl1e = try nl1e.alignedUp(clusterSize / 8)
        meta = try meta.adding(try nl1e.multiplied(by: 8))
        let rc = refcountMetadataSize(clusters: try meta.adding(aligned) / clusterSize, clusterSize: clusterSize,
                                      refcountOrder: refcountOrder, generous: false)
        return try meta.adding(rc.bytes).adding(aligned)
    }

    /// qemu's qcow2_measure.
    static func measure(_ r: MeasureRequest) throws -> MeasureResult {
        let o = r.options
        let extendedL2 = o.bool("extended_l2")
        let clusterSize = o.size("cluster_size") ?? 65536
        try validateClusterSizeForMeasure(clusterSize)
        let version: UInt32
        do {
            version = try parseVersion(o.text("compat")) ?? 3
        } catch {
            throw InstarError.invalid("Invalid compatibility level: '\(o.text("compat") ?? "")'")
        }
        let refcountBits = o.number("refcount_bits") ?? 16
        if refcountBits > 64 || !isPowerOfTwo(refcountBits) {
            throw InstarError.invalid("Refcount width must be a power of two and may not exceed 64 bits")
        }
        if version < 3 && refcountBits != 16 {
            throw InstarError.invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
        }
        let prealloc: Preallocation
        if let t = o.text("preallocation") {
            guard let p = Preallocation(rawValue: t) else {
                throw InstarError.invalid("invalid parameter value: \(t)")
            }
            prealloc = p
        } else {
            prealloc = .off
        }
        // A LUKS header takes its own clusters; qemu sizes it by going through LUKS creation.
        var luksBytes: UInt64 = 0
        if o.text("encrypt.format") == "luks", let e = try Qcow2EncryptionRequest.parse(o) {
            _ = try e.password(r.secrets)
            try e.validateCipher()
            luksBytes = try e.luksHeaderBytes.alignedUp(clusterSize)
        }
        try validateClusterSize(clusterSize, extendedL2: extendedL2)
        let refcountOrder = UInt64(refcountBits.trailingZeroBitCount)
        let hasBacking = o.text("backing_file") != nil
        var virtualSize: UInt64
        var required: UInt64 = 0
        if let src = r.source {
            let ssize = src.virtualSize
            virtualSize = try ssize.alignedUp(clusterSize)
            if hasBacking {
                required = virtualSize
            } else {
                required = try allocatedBytes(src, clusterSize: clusterSize)
            }
        } else {
            virtualSize = try (o.size("size") ?? 0).alignedUp(clusterSize)
        }
        // The L1 table of the result must stay within QCOW_MAX_L1_SIZE (32 MiB).
        let l2Tables = (virtualSize / clusterSize).divCeil(clusterSize / (extendedL2 ? 16 : 8))
        if l2Tables > (32 << 20) / 8 {
            throw InstarError(.range, "The image size is too large (try using a larger cluster size)")
        }
        if prealloc == .full || prealloc == .falloc { required = virtualSize }
        let full = try preallocSize(virtualSize, clusterSize: clusterSize, refcountOrder: refcountOrder, extendedL2: extendedL2)
        let req = try full.subtracting(virtualSize).adding(required).adding(luksBytes)
        var result = MeasureResult(required: req, fullyAllocated: try full.adding(luksBytes))
        // Bitmaps are reported when both the target (v3) and the source (a qcow2 v3 image) can hold them
        // (qemu's bdrv_supports_persistent_dirty_bitmap); every persistent bitmap is counted fully allocated.
        if version >= 3, let src = r.source, let q = src.format as? Qcow2Format, q.header.version >= 3 {
            var total: UInt64 = 0
            var dirSize: UInt64 = 0
            for b in q.bitmaps {
                let granularity = UInt64(1) << UInt64(min(b.granularityBits, 63))
                let bits = src.virtualSize.divCeil(granularity)
                let clusters = bits.divCeil(8).divCeil(clusterSize)
                total = try total.adding(try clusters.multiplied(by: clusterSize))
                total = try total.adding(try (clusters * 8).alignedUp(clusterSize))
                dirSize = try dirSize.adding(try (24 + UInt64(b.name.utf8.count)).alignedUp(8))
            }
            result.bitmaps = try total.adding(try dirSize.alignedUp(clusterSize))
        }
        return result
    }

    static func validateClusterSizeForMeasure(_ cs: UInt64) throws {
        guard isPowerOfTwo(cs), cs >= 512, cs <= 2 << 20 else {
            throw InstarError.invalid("Cluster size must be a power of two between 512 and 2048k")
        }
    }

    /// Bytes of data clusters the source allocates (qcow2_measure's walk): allocated ranges holding data count,
    /// rounded out to whole clusters; zero ranges are skipped.
    static func allocatedBytes(_ src: ImageLayer, clusterSize: UInt64) throws -> UInt64 {
        let ssize = src.virtualSize
        var offset: UInt64 = 0
        var required: UInt64 = 0
        while offset < ssize {
            let st = try ChainStatus.aboveStatus(src, at: offset, length: ssize - offset)
            var pnum = max(1, min(st.length, ssize - offset))
            if !st.zero && st.data && st.allocated {
                pnum = try (offset + pnum).alignedUp(clusterSize) - offset
                required = try required.adding(offset % clusterSize + pnum)
            }
            offset = try offset.adding(pnum)
        }
        return required
    }
}

/// Replays qemu 7.2's qcow2 image construction (qcow2_co_create, qcow2_co_truncate, preallocate_co and the
/// refcount allocator in qcow2-refcount.c) on an in-memory model, writing to the file what qemu writes.
/// Only the paths a freshly created image takes are modelled: no snapshots, no compressed clusters.
final class Qcow2Builder {
    typealias Settings = Qcow2Create.Settings
    let file: HostFile
    let s: Settings
    let cs: UInt64
    let cb: UInt64
    let refcountMax: UInt64
    /// Entries in one refcount block, and its log2.
    let refblockEntries: UInt64
    let refblockBits: UInt64
    /// Bytes per L2 entry (8, or 16 with extended L2) and entries per L2 table.
    let l2EntrySize: UInt64
    let l2Entries: UInt64

    /// Refcounts by refcount-block index; counts never exceed a few in a new image, so one byte each.
    var refblocks: [UInt64: [UInt8]] = [:]
    var dirtyRefblocks = Set<UInt64>()
    var reftable: [UInt64]
    var reftableOffset: UInt64
    var freeClusterIndex: UInt64 = 0
    var l1: [UInt64] = []
    var l1Offset: UInt64 = 0
    /// L2 tables by host offset, as 64-bit words (two per entry with extended L2).
    var l2Tables: [UInt64: [UInt64]] = [:]
    var backingFile: String?
    var backingFormat: String?
    var size: UInt64 = 0
    var cryptMethod: UInt32 = 0
    /// Where the LUKS header lives (qcow2.txt full disk encryption header extension).
    var cryptoHeader: (offset: UInt64, length: UInt64)?

    static let copied: UInt64 = 1 << 63
    /// Signals qemu's -EAGAIN: a refcount block was placed where the caller meant to allocate; search again.
    struct Again: Error {}

    init(file: HostFile, settings: Settings) throws {
        self.file = file
        s = settings
        cs = settings.clusterSize
        cb = settings.clusterBits
        refcountMax = settings.refcountBits == 64 ? UInt64.max : (1 << settings.refcountBits) - 1
        refblockEntries = cs * 8 / settings.refcountBits
        refblockBits = UInt64(refblockEntries.trailingZeroBitCount)
        l2EntrySize = settings.extendedL2 ? 16 : 8
        l2Entries = cs / l2EntrySize
        reftable = [UInt64](repeating: 0, count: Int(cs / 8))
        reftable[0] = 2 * cs
        reftableOffset = cs
    }

    // MARK: the create sequence

    func build() throws {
        // qcow2_co_create: a first header cluster, then the refcount table with one (empty) block.
        try file.write([UInt8](try headerCluster(initial: true)), at: 0)
        var rt = [UInt8](repeating: 0, count: Int(2 * cs))
        put64(&rt, 0, 2 * cs)
        try file.write(rt, at: cs)
        // Opening it and accounting for the three clusters.
        _ = try allocClusters(3 * cs)
        try flushRefblocks()
        try writeHeader()
        // blk_co_truncate to the requested size.
        try truncate(to: s.size)
        if let b = s.backingFile {
            backingFile = b
            backingFormat = s.backingFormat
            try writeHeader()
        }
        if let e = s.encryption { try setUpEncryption(e) }
        try flushL2()
        try flushRefblocks()
        try writeHeader()
    }

    /// qcow2_co_truncate from 0 to `newSize` with the requested preallocation.
    func truncate(to newSize: UInt64) throws {
        let l2Bits = cb - UInt64(l2EntrySize.trailingZeroBitCount)
        let shift = cb + l2Bits
        let l1Size = newSize == 0 ? 0 : ((newSize - 1) >> shift) + 1
        try growL1(l1Size)
        switch s.preallocation {
        case .off:
            break
        case .metadata:
            try preallocate(from: 0, to: newSize, mode: .metadata)
        case .falloc, .full:
            if s.dataFile != nil {
                try preallocate(from: 0, to: newSize, mode: s.preallocation)
            } else {
                try preallocateFile(newSize)
            }
        }
        size = newSize
        try writeHeader()
    }

    /// qcow2_grow_l1_table with exact sizing, from an empty table.
    func growL1(_ entries: UInt64) throws {
        if entries <= UInt64(l1.count) { return }
        // QCOW_MAX_L1_SIZE is 32 MiB.
        if entries > (32 << 20) / 8 { throw InstarError(.range, "Failed to grow the L1 table: File too large", errno: 27) }
        let bytes = entries * 8
        let offset = try allocClusters(bytes)
        try flushRefblocks()
        l1 = [UInt64](repeating: 0, count: Int(entries))
        try file.write([UInt8](repeating: 0, count: Int(bytes)), at: offset)
        l1Offset = offset
    }

    // MARK: preallocation

    /// preallocate_co: allocates guest range [from, to) through the normal allocation path.
    func preallocate(from start: UInt64, to end: UInt64, mode: Qcow2Create.Preallocation) throws {
        var offset = start
        var bytes = end - start
        var lastHost: UInt64 = 0
        var lastBytes: UInt64 = 0
        let maxChunk = UInt64(Int32.max).alignedDown(cs)
        while bytes > 0 {
            let want = min(bytes, maxChunk)
            let (host, got, metas) = try allocHostOffset(offset, want)
            for m in metas { try link(m) }
            lastHost = host
            lastBytes = got
            bytes -= got
            offset += got
        }
        if let name = s.dataFile {
            // preallocate_co extends the data file to the end of the last allocated subcluster, past the
            // image's unaligned size (with plain truncation for preallocation=metadata).
            let sub = s.extendedL2 ? cs / 32 : cs
            let end = try (lastHost.adding(lastBytes)).alignedUp(sub)
            let df = try HostFile.open(name, writable: true)
            if end > (try df.size()) {
                let m: HostFileCreate.Preallocation = mode == .full ? .full : mode == .falloc ? .falloc : .off
                try HostFileCreate.grow(df, to: end, preallocation: m)
            }
            return
        }
        let fileLength = try file.size()
        let end = try lastHost.adding(lastBytes)
        if end > fileLength {
            let m: HostFileCreate.Preallocation = mode == .full ? .full : mode == .falloc ? .falloc : .off
            try HostFileCreate.grow(file, to: end, preallocation: m)
        }
    }

    struct L2Meta {
        var guest: UInt64
        var host: UInt64
        var clusters: UInt64
    }

    /// qcow2_alloc_host_offset for a fresh range: returns the host offset of `guest`, the bytes mapped
    /// contiguously from there, and the L2 updates to make.
    func allocHostOffset(_ guest: UInt64, _ bytes: UInt64) throws -> (UInt64, UInt64, [L2Meta]) {
        var start = guest
        var remaining = bytes
        var clusterOffset: UInt64? = nil
        var hostOffset: UInt64? = nil
        var cur: UInt64 = 0
        var metas: [L2Meta] = []
        while true {
            if hostOffset == nil, let c = clusterOffset { hostOffset = c }
            start += cur
            remaining -= cur
            if let c = clusterOffset { clusterOffset = c + cur }
            if remaining == 0 { break }
            cur = remaining
            // handle_copied finds nothing in a new image; handle_alloc:
            let l2 = try clusterTable(for: start)
            _ = l2
            let inCluster = start % cs
            let l2Index = (start >> cb) % l2Entries
            var n = min((inCluster + cur).divCeil(cs), l2Entries - l2Index)
            var allocAt: UInt64
            if s.dataFile != nil {
                allocAt = start - inCluster
            } else if let want = clusterOffset {
                allocAt = want.alignedDown(cs)
                n = try allocClustersAt(allocAt, n)
            } else {
                allocAt = try allocClusters(n * cs)
            }
            if n == 0 { cur = 0; break }
            if clusterOffset == nil { clusterOffset = allocAt + inCluster }
            cur = min(cur, n * cs - inCluster)
            metas.append(L2Meta(guest: start - inCluster, host: allocAt, clusters: n))
        }
        return (hostOffset ?? 0, bytes - remaining, metas)
    }

    /// The falloc/full branch of qcow2_co_truncate: one refcount area sized for data and L2 tables, the data
    /// area allocated in the file, then L2 entries for all of it.
    func preallocateFile(_ newSize: UInt64) throws {
        var oldFileSize = try file.size()
        if let last = lastCluster(oldFileSize) {
            oldFileSize = (last + 1) * cs
        } else {
            oldFileSize = try oldFileSize.alignedUp(cs)
        }
        var dataClusters = try newSize.alignedUp(cs) >> cb
        let l2Count = dataClusters.divCeil(l2Entries)
        let allocationStart = try refcountArea(start: oldFileSize, additional: dataClusters + l2Count, exact: true,
                                               newIndex: 0, newOffset: 0)
        let got = try allocClustersAt(allocationStart, dataClusters)
        guard got == dataClusters else { throw InstarError(.io, "Could not allocate the data area") }
        let newFileSize = try allocationStart.adding(dataClusters * cs)
        try HostFileCreate.grow(file, to: newFileSize, preallocation: s.preallocation == .full ? .full : .falloc)
        var host = allocationStart
        var guest: UInt64 = 0
        while dataClusters > 0 {
            let n = min(dataClusters, l2Entries - (guest >> cb) % l2Entries)
            try link(L2Meta(guest: guest, host: host, clusters: n))
            guest += n * cs
            host += n * cs
            dataClusters -= n
        }
    }

    /// qcow2_get_last_cluster: the last cluster below `size` with a nonzero refcount.
    func lastCluster(_ size: UInt64) -> UInt64? {
        var i = size.divCeil(cs)
        while i > 0 {
            i -= 1
            if refcount(i) > 0 { return i }
        }
        return nil
    }

    // MARK: L2 tables

    /// get_cluster_table: the L2 table covering `guest`, allocated (and written as zeroes) if missing.
    func clusterTable(for guest: UInt64) throws -> UInt64 {
        let l1Index = Int(guest >> (cb + UInt64(l2Entries.trailingZeroBitCount)))
        guard l1Index < l1.count else { throw InstarError(.io, "L1 index out of range") }
        let entry = l1[l1Index] & ~Qcow2Builder.copied
        if entry != 0 { return entry }
        let offset = try allocClusters(cs)
        try flushRefblocks()
        l2Tables[offset] = [UInt64](repeating: 0, count: Int(cs / 8))
        try file.write([UInt8](repeating: 0, count: Int(cs)), at: offset)
        l1[l1Index] = offset | Qcow2Builder.copied
        try writeL1()
        return offset
    }

    /// qcow2_alloc_cluster_link_l2 for preallocated clusters: the entries point at the new clusters; with
    /// extended L2 the subcluster bitmap stays clear (reads as zeroes).
    func link(_ m: L2Meta) throws {
        let table = try clusterTable(for: m.guest)
        guard var words = l2Tables[table] else { throw InstarError(.io, "missing L2 table") }
        let first = (m.guest >> cb) % l2Entries
        let stride = Int(l2EntrySize / 8)
        for i in 0..<m.clusters {
            let idx = Int(first + i) * stride
            if idx < words.count { words[idx] = (m.host + i * cs) | Qcow2Builder.copied }
        }
        l2Tables[table] = words
    }

    func flushL2() throws {
        for (offset, words) in l2Tables.sorted(by: { $0.key < $1.key }) {
            var buf = [UInt8](repeating: 0, count: Int(cs))
            for (i, w) in words.enumerated() where w != 0 { put64(&buf, i * 8, w) }
            try file.write(buf, at: offset)
        }
    }

    func writeL1() throws {
        var buf = [UInt8](repeating: 0, count: l1.count * 8)
        for (i, e) in l1.enumerated() where e != 0 { put64(&buf, i * 8, e) }
        try file.write(buf, at: l1Offset)
    }

    // MARK: refcounts (qcow2-refcount.c)

    func refcount(_ cluster: UInt64) -> UInt64 {
        let t = cluster >> refblockBits
        guard let block = refblocks[t] else { return 0 }
        return UInt64(block[Int(cluster & (refblockEntries - 1))])
    }

    func setRefcount(_ cluster: UInt64, _ value: UInt64) {
        let t = cluster >> refblockBits
        // Changed in place in the dictionary: a copy taken out and stored back copied the whole block per
        // cluster, most of a large preallocation=metadata create's time.
        refblocks[t, default: [UInt8](repeating: 0, count: Int(refblockEntries))][Int(cluster & (refblockEntries - 1))] =
            UInt8(truncatingIfNeeded: value)
        dirtyRefblocks.insert(t)
    }

    func refblockOffset(_ tableIndex: UInt64) -> UInt64 {
        tableIndex < UInt64(reftable.count) ? reftable[Int(tableIndex)] : 0
    }

    /// Writes the dirty refcount blocks (qcow2_cache_flush of the refcount cache).
    func flushRefblocks() throws {
        for t in dirtyRefblocks.sorted() {
            let offset = refblockOffset(t)
            if offset == 0 { continue }
            try file.write(refblockBytes(t), at: offset)
        }
        dirtyRefblocks.removeAll()
    }

    func refblockBytes(_ t: UInt64) -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: Int(cs))
        guard let block = refblocks[t] else { return buf }
        let bits = Int(s.refcountBits)
        for (i, v) in block.enumerated() where v != 0 {
            let bitPos = i * bits
            if bits >= 8 {
                // Big-endian value in the last byte of its field.
                buf[(bitPos + bits) / 8 - 1] = v
            } else {
                // Sub-byte widths pack from the least significant bits.
                buf[bitPos / 8] |= (v & UInt8((1 << bits) - 1)) << UInt8(bitPos % 8)
            }
        }
        return buf
    }

    /// alloc_clusters_noref: the first run of free clusters from the free-cluster index.
    func allocClustersNoref(_ bytes: UInt64) -> UInt64 {
        let n = bytes.divCeil(cs)
        var i: UInt64 = 0
        while i < n {
            let idx = freeClusterIndex
            freeClusterIndex += 1
            if refcount(idx) != 0 { i = 0; continue }
            i += 1
        }
        return (freeClusterIndex - n) << cb
    }

    /// qcow2_alloc_clusters.
    func allocClusters(_ bytes: UInt64) throws -> UInt64 {
        while true {
            let offset = allocClustersNoref(bytes)
            do {
                try updateRefcount(offset, bytes, increase: true)
                return offset
            } catch is Again {
                continue
            }
        }
    }

    /// qcow2_alloc_clusters_at: claims up to `count` free clusters at `offset`; returns how many.
    func allocClustersAt(_ offset: UInt64, _ count: UInt64) throws -> UInt64 {
        while true {
            var i: UInt64 = 0
            while i < count, refcount((offset >> cb) + i) == 0 { i += 1 }
            do {
                try updateRefcount(offset, i * cs, increase: true)
                return i
            } catch is Again {
                continue
            }
        }
    }

    /// update_refcount with qemu's restart and undo behaviour.
    func updateRefcount(_ offset: UInt64, _ length: UInt64, increase: Bool) throws {
        if length == 0 { return }
        let start = offset.alignedDown(cs)
        let last = (offset + length - 1).alignedDown(cs)
        var oldTableIndex: UInt64 = .max
        var clusterOffset = start
        do {
            while clusterOffset <= last {
                let idx = clusterOffset >> cb
                let t = idx >> refblockBits
                if t != oldTableIndex {
                    do {
                        try allocRefcountBlock(idx)
                    } catch let e as Again {
                        if freeClusterIndex > start >> cb { freeClusterIndex = start >> cb }
                        throw e
                    }
                }
                oldTableIndex = t
                var rc = refcount(idx)
                if increase {
                    guard rc < refcountMax, rc < 255 else { throw InstarError(.io, "refcount overflow") }
                    rc += 1
                } else {
                    guard rc > 0 else { throw InstarError(.io, "refcount underflow") }
                    rc -= 1
                }
                if rc == 0 && idx < freeClusterIndex { freeClusterIndex = idx }
                setRefcount(idx, rc)
                clusterOffset += cs
            }
        } catch {
            try? updateRefcount(offset, clusterOffset - offset, increase: !increase)
            throw error
        }
    }

    /// alloc_refcount_block: makes sure a refcount block covers `clusterIndex`; throws Again when it had to
    /// place one (the caller searches for free clusters again).
    func allocRefcountBlock(_ clusterIndex: UInt64) throws {
        let t = clusterIndex >> refblockBits
        if refblockOffset(t) != 0 { return }
        let newBlock = allocClustersNoref(cs)
        if newBlock == 0 { throw InstarError(.io, "Preventing invalid allocation of refcount block at offset 0") }
        let newIndex = newBlock >> cb
        if newIndex >> refblockBits == t {
            // The block describes itself.
            refblocks[t] = [UInt8](repeating: 0, count: Int(refblockEntries))
            setRefcount(newIndex, 1)
        } else {
            try updateRefcount(newBlock, cs, increase: true)
            try flushRefblocks()
            refblocks[t] = [UInt8](repeating: 0, count: Int(refblockEntries))
        }
        if t < UInt64(reftable.count) {
            try file.write(refblockBytes(t), at: newBlock)
            reftable[Int(t)] = newBlock
            dirtyRefblocks.remove(t)
            var e = [UInt8](repeating: 0, count: 8)
            put64(&e, 0, newBlock)
            try file.write(e, at: reftableOffset + t * 8)
            try flushRefblocks()
            throw Again()
        }
        // The table must grow: new self-describing structures go past everything in use.
        let blocksUsed = max(clusterIndex + 1, newIndex + 1).divCeil(refblockEntries)
        let metaOffset = try (blocksUsed * refblockEntries).multiplied(by: cs)
        // The pending block is handed to the area as an existing one; write it where it belongs first.
        pendingBlock = (t, newBlock)
        _ = try refcountArea(start: metaOffset, additional: 0, exact: false, newIndex: t, newOffset: newBlock)
        throw Again()
    }

    var pendingBlock: (UInt64, UInt64)?

    /// qcow2_refcount_area (layout shared with the writer, `Qcow2RefcountArea`): refcount blocks and a new
    /// refcount table at `start`, covering everything up to the area itself plus `additional` clusters; returns
    /// the end of the new structures.
    func refcountArea(start: UInt64, additional: UInt64, exact: Bool, newIndex: UInt64, newOffset: UInt64) throws -> UInt64 {
        let area = try Qcow2RefcountArea(startCluster: start >> cb, additional: additional, exact: exact,
                                         clusterBits: cb, refcountOrder: UInt64(s.refcountBits.trailingZeroBitCount))
        var newTable = [UInt64](repeating: 0, count: Int(area.tableEntries))
        for i in 0..<min(reftable.count, newTable.count) { newTable[i] = reftable[i] }
        if newOffset != 0 && newIndex < UInt64(newTable.count) { newTable[Int(newIndex)] = newOffset }
        let placed = area.place(in: &newTable, clusterBits: cb)
        for b in placed.blocks {
            if b.isNew || refblocks[b.index] == nil {
                refblocks[b.index] = [UInt8](repeating: 0, count: Int(refblockEntries))
            }
            var j = b.setFrom
            while j < b.setTo {
                setRefcount(b.index * refblockEntries + j, 1)
                j += 1
            }
        }
        let oldOffset = reftableOffset
        let oldSize = UInt64(reftable.count)
        reftable = newTable
        // The refcount blocks first, then the table, then the header switch.
        for b in placed.blocks {
            try file.write(refblockBytes(b.index), at: b.offset)
            dirtyRefblocks.remove(b.index)
        }
        try flushRefblocks()
        let tableOffset = placed.tableCluster << cb
        var tbuf = [UInt8](repeating: 0, count: newTable.count * 8)
        for (k, e) in newTable.enumerated() where e != 0 { put64(&tbuf, k * 8, e) }
        try file.write(tbuf, at: tableOffset)
        reftableOffset = tableOffset
        var h = [UInt8](repeating: 0, count: 12)
        put64(&h, 0, tableOffset)
        put32(&h, 8, UInt32(truncatingIfNeeded: area.tableClusters))
        try file.write(h, at: 48)
        try updateRefcount(oldOffset, oldSize * 8, increase: false)
        try flushRefblocks()
        return placed.endCluster << cb
    }

    // MARK: encryption (qcow2_set_up_encryption)

    /// Sets the crypt method; for LUKS, writes a new LUKS header and slot 0's key material into clusters
    /// of their own (zeroed whole first, as qemu's qcow2_crypto_hdr_init_func does).
    func setUpEncryption(_ e: Qcow2EncryptionRequest) throws {
        let password = try e.password(s.secrets)
        switch e.format {
        case .aes:
            cryptMethod = Qcow2.cryptAES
        case .luks:
            let made = try Luks.create(settings: e.settings, password: password, iterTimeMs: e.iterTimeMs)
            let length = UInt64(made.header.payloadOffsetSector) * LuksHeader.sectorSize
            let offset = try allocClusters(length)
            try flushRefblocks()
            // qemu's bdrv_pwrite_zeroes ends in fallocate(FALLOC_FL_ZERO_RANGE) on a local file; the same call
            // keeps the file's allocation (and so `disk size`) as qemu leaves it.
            let span = try length.alignedUp(cs)
            file.noteChange()
            if file.fd < 0 || instar_shim_zero_range(file.fd, Int64(offset), Int64(span)) != 0 {
                try file.writeZeroes(at: offset, length: span)
            }
            cryptMethod = Qcow2.cryptLUKS
            cryptoHeader = (offset, length)
            try file.write(made.header.encoded(), at: offset)
            try file.write(made.keyMaterial, at: offset + UInt64(made.header.slots[0].keyOffsetSector) * LuksHeader.sectorSize)
        }
        try writeHeader()
    }

    // MARK: header (qcow2_update_header)

    func writeHeader() throws {
        try file.write(try headerCluster(initial: false), at: 0)
    }

    func headerCluster(initial: Bool) throws -> [UInt8] {
        var h = [UInt8](repeating: 0, count: Int(cs))
        put32(&h, 0, 0x5146_49fb)
        put32(&h, 4, s.version)
        put32(&h, 20, UInt32(cb))
        put64(&h, 24, initial ? 0 : size)
        put32(&h, 32, initial ? 0 : cryptMethod)
        put32(&h, 36, initial ? 0 : UInt32(l1.count))
        put64(&h, 40, initial ? 0 : l1Offset)
        put64(&h, 48, initial ? cs : reftableOffset)
        put32(&h, 56, initial ? 1 : UInt32(truncatingIfNeeded: UInt64(reftable.count) * 8 / cs))
        var incompatible: UInt64 = 0
        if s.dataFile != nil { incompatible |= 1 << 2 }
        if s.zstd { incompatible |= 1 << 3 }
        if s.extendedL2 { incompatible |= 1 << 4 }
        let compatible: UInt64 = s.lazyRefcounts ? 1 : 0
        let autoclear: UInt64 = s.dataFileRaw ? 1 << 1 : 0
        let headerLength: Int = s.version >= 3 || initial ? 112 : 72
        if s.version >= 3 || initial {
            put64(&h, 72, incompatible)
            put64(&h, 80, compatible)
            put64(&h, 88, autoclear)
            put32(&h, 96, UInt32(s.refcountBits.trailingZeroBitCount))
            put32(&h, 100, UInt32(headerLength))
            h[104] = s.zstd ? 1 : 0
        }
        if initial { return h }
        var pos = headerLength
        func ext(_ magic: UInt32, _ data: [UInt8]) throws {
            let padded = (data.count + 7) & ~7
            guard pos + 8 + padded + 8 <= h.count else { throw InstarError.invalid("Header extensions do not fit in a cluster") }
            put32(&h, pos, magic)
            put32(&h, pos + 4, UInt32(data.count))
            for (i, b) in data.enumerated() { h[pos + 8 + i] = b }
            pos += 8 + padded
        }
        if let f = backingFormat { try ext(0xe279_2aca, Array(f.utf8)) }
        if let d = s.dataFile { try ext(0x4441_5441, Array(d.utf8)) }
        if let c = cryptoHeader {
            var data = [UInt8](repeating: 0, count: 16)
            put64(&data, 0, c.offset)
            put64(&data, 8, c.length)
            try ext(Qcow2.extCryptoHeader, data)
        }
        // qemu 7.2 leaves the feature-name table out of images with clusters of 4 KiB or less (observed for
        // 512..4k; 8k and up carry it).
        if s.version >= 3 && cs > 4096 {
            try ext(0x6803_f857, Qcow2Extensions.featureNameTable())
        }
        pos += 8  // end of extensions
        if let b = backingFile {
            let bytes = Array(b.utf8)
            guard bytes.count <= 1023, pos + bytes.count <= h.count else {
                throw InstarError.invalid("Backing file name too long")
            }
            put64(&h, 8, UInt64(pos))
            put32(&h, 16, UInt32(bytes.count))
            for (i, c) in bytes.enumerated() { h[pos + i] = c }
        }
        return h
    }
}

@inline(__always)
fileprivate func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) {
    for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) }
}

@inline(__always)
fileprivate func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
    for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) }
}
