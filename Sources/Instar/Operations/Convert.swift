import Glibc

/// `qemu-img convert`: copies the guest contents of one or more sources (concatenated) into a target written
/// through the `ImageFormat` write API, following qemu-img's chunking so holes, zero writes and progress steps
/// come out the same.

/// qemu's cache modes (bdrv_parse_cache_mode).
public enum CacheMode: String {
    case none, writeback, writethrough, directsync, unsafe

    /// Parses a -t/-T argument ("off" is qemu's alias of "none"); nil when qemu rejects it.
    public init?(qemuName: String) {
        if qemuName == "off" { self = .none; return }
        self.init(rawValue: qemuName)
    }

    /// O_DIRECT on the image files.
    public var direct: Bool { self == .none || self == .directsync }
    /// Every write is followed by a flush.
    public var writethrough: Bool { self == .writethrough || self == .directsync }
    /// Flushes are real (everything but unsafe).
    public var flushes: Bool { self != .unsafe }
}

public struct ConvertOptions {
    /// -O: any format the registry can create (or open, with -n).
    public var targetFormat = "raw"
    /// --target-image-opts (with -n): the target as a parsed option string instead of a plain filename.
    public var targetSpec: ImageSpec?
    /// Secrets by id (--object secret), for an encrypted target that is created or opened.
    public var secrets: [String: String] = [:]
    /// The passphrase of an existing encrypted target (the C API's target_key_secret).
    public var targetKeySecret: String?
    /// -n: the target exists and is opened, not created.
    public var noCreate = false
    /// --target-is-zero (with -n): the target reads as zeroes already.
    public var targetIsZero = false
    /// -t, already parsed.
    public var targetCache = CacheMode.unsafe
    /// -t as given; when set, `convert` parses it after creating the target (qemu reports a bad mode then and
    /// leaves the new target behind).
    public var targetCacheName: String?
    /// -S in bytes: zero runs at least this long are left unwritten; 0 writes every byte.
    public var sparseSize: UInt64 = 4096
    /// -c.
    public var compress = false
    /// -o: the target's creation options.
    public var createOptions: String?
    /// -B / -F: the target's backing file; only what differs from it is written.
    public var backingFile: String?
    public var backingFormat: String?
    /// -m: parallel requests (1...16). Writes stay in guest order unless `unorderedWrites`.
    public var coroutines = 8
    /// -W.
    public var unorderedWrites = false
    /// -r: bytes per second written to the target, 0 for no limit.
    public var rateLimit: UInt64 = 0
    /// --bitmaps: the source's persistent bitmaps are copied once the data is; --skip-broken-bitmaps leaves
    /// inconsistent ones out (with a warning) instead of refusing.
    public var bitmaps = false
    public var skipBrokenBitmaps = false
    /// Receives qemu's warnings (without the "warning: " prefix).
    public var warning: ((String) -> Void)?
    /// Threads compressing clusters for -c; 0 uses every online CPU (at most 8).
    public var compressThreads = 0
    /// Removes a target this call created when the copy fails or is cancelled.
    public var removeTargetOnFailure = true
    /// -C: copy offloading (qemu's copy_range): data ranges stored plainly in the sources are copied unchanged
    /// (no zero detection), by the kernel (copy_file_range) into targets whose guest bytes are a plain file,
    /// until a range that cannot be offloaded turns it off for the rest of the copy, as qemu does.
    public var copyRange = false
    /// --salvage: read errors are not fatal; the sectors that cannot be read are written as zeroes.
    public var salvage = false
    /// --salvage's warnings (without "warning: "); nil keeps them quiet (-q).
    public var salvageWarning: ((String) -> Void)?
    /// Each progress value qemu-img -p would print (from 0 to 100 inclusive); throw to cancel.
    public var progress: ((Double) throws -> Void)?

    public init() {}
}

/// img_convert stops after reporting this but still exits with 0 (qemu 7.2 leaves its return code at 0 on
/// this path); library callers see it as an error.
public struct ConvertStopped: Error {
    public let message: String
}

public enum ConvertOperation {
    static let sectorSize: UInt64 = 512
    /// qemu-img's IO_BUF_SIZE: the copy chunk (2 MiB).
    static let bufferSectors: UInt64 = 4096
    /// MAX_BUF_SECTORS: the largest -S qemu accepts (16 MiB).
    public static let maxSparseBytes: UInt64 = 32768 * 512
    /// BDRV_REQUEST_MAX_SECTORS.
    static let requestMaxSectors: UInt64 = UInt64(Int32.max) >> 9

    /// Checks -S as qemu does; returns the error message for a bad value.
    public static func sparseSizeError(_ bytes: UInt64) -> String? {
        if bytes % sectorSize != 0 || bytes / sectorSize > maxSparseBytes / sectorSize {
            return "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                + "\(maxSparseBytes). Select 0 to disable sparse detection (fully allocates output)."
        }
        return nil
    }

    /// Creates a raw target of `size` bytes as qemu's file driver does with preallocation=off: truncate, then
    /// write the first block so its allocation can be probed later.
    public static func createRawTarget(_ path: String, size: UInt64) throws {
        // Created (and emptied) only once qemu's create locks are held: a target another process uses is refused.
        let file = try HostFileCreate.createEmpty(path)
        try file.truncate(to: size)
        if size > 0 {
            let first = size < 4096 ? 512 : 4096
            try file.write([UInt8](repeating: 0, count: first), at: 0)
        }
    }

    /// Opens the target for writing with the cache mode's flags (and its backing chain, which reads through
    /// the target's unallocated ranges).
    public static func openTarget(_ path: String, format: String, cache: CacheMode, openBacking: Bool = false,
                                  spec: ImageSpec? = nil, secrets: [String: String] = [:],
                                  keySecret: String? = nil) throws -> ImageLayer {
        var options = ImageOpenOptions()
        options.keySecret = keySecret
        options.direct = cache.direct
        options.noFlush = !cache.flushes
        options.secrets = secrets
        // A json: name (convert -n's target, as img_open_file takes it): -O's format is the top node's driver.
        let named: ImageSpec
        if let spec {
            named = spec
        } else if path.hasPrefix("json:") {
            named = try ImageOpener.parseSpec(path, format: format)
        } else {
            named = ImageSpec(filename: try ImageOpener.fileName(fromPlainName: path), format: format)
        }
        return try ImageOpener.open(named, options: options, writable: true, openBacking: openBacking)
    }

    /// What img_convert does once the sources are open: creates the target through the format's creator with
    /// the -o options (or opens it with -n), checks the option combinations in qemu's order and copies. Errors
    /// carry qemu-img's complete message (without the program name).
    public static func convert(sources: [ImageLayer], target: String, options inputOptions: ConvertOptions) throws {
        var options = inputOptions
        let fmt = options.targetFormat
        guard !sources.isEmpty else { throw InstarError.invalid("Must specify image file name") }
        let totalSectors = sources.reduce(UInt64(0)) { $0 + $1.virtualSize.divCeil(sectorSize) }
        var values: CreateOptionValues?
        var creator: FormatCreator?
        if !options.noCreate {
            guard let d = FormatRegistry.descriptor(named: fmt) else {
                throw InstarError.invalid("Unknown file format '\(fmt)'")
            }
            // bdrv_find_protocol: a name with a prefix no protocol driver has (json: among them) stops here.
            if target.hasPrefix("json:") { _ = try ImageOpener.fileName(fromPlainName: target) }
            guard let c = d.creator else {
                throw InstarError.unsupported("Format driver '\(fmt)' does not support image creation")
            }
            try Create.refuseUncreatableProtocol(target)
            creator = c
            var v = CreateOptionValues(specs: Create.optionTable(for: c))
            if let list = options.createOptions { try v.parse(list) }
            try v.set("size", String(totalSectors * sectorSize))
            // add_old_style_options: -B and -F become backing_file and backing_fmt.
            if let b = options.backingFile {
                guard v.spec("backing_file") != nil else {
                    throw InstarError.unsupported("Backing file not supported for file format '\(fmt)'")
                }
                try v.set("backing_file", b)
            }
            if let f = options.backingFormat {
                guard v.spec("backing_fmt") != nil else {
                    throw InstarError.unsupported("Backing file format not supported for file format '\(fmt)'")
                }
                try v.set("backing_fmt", f)
            }
            values = v
        }
        let backingParam = values?.text("backing_file")
        let targetHasBacking = (backingParam ?? options.backingFile) != nil
        if options.targetIsZero && targetHasBacking {
            throw ConvertStopped(message: "Cannot use --target-is-zero when the destination image has a backing file")
        }
        if sources.count > 1 && targetHasBacking {
            throw InstarError.invalid("Having a backing file for the target makes no sense when concatenating "
                                      + "multiple input images")
        }
        if backingParam != nil && values?.text("backing_fmt") == nil {
            throw InstarError.invalid("Use of backing file requires explicit backing format")
        }
        if options.compress, let v = values {
            if FormatRegistry.descriptor(named: fmt).map({ canCompress($0) }) == false {
                throw InstarError.unsupported("Compression not supported for this file format")
            }
            if v.bool("encrypt") || v.bool("encryption") || v.isSet("encrypt.format") {
                throw InstarError.unsupported("Compression and encryption not supported at the same time")
            }
            if let p = v.text("preallocation"), p != "off" {
                throw InstarError.unsupported("Compression and preallocation not supported at the same time")
            }
        }
        if options.bitmaps {
            if sources.count > 1 { throw InstarError.invalid("Copying bitmaps only possible with single source") }
            try checkBitmaps(sources[0].format, skipBroken: options.skipBrokenBitmaps)
        }
        var created = false
        if let c = creator, let v = values {
            do {
                var request = CreateRequest(filename: try ImageOpener.fileName(fromPlainName: target), options: v)
                request.secrets = ObjectRegistry.secrets(adding: options.secrets)
                try c.create(request)
            } catch let e as InstarError {
                throw e.prepending("\(target): error while converting \(fmt): ")
            }
            created = true
        }
        if let name = options.targetCacheName {
            guard let cache = CacheMode(qemuName: name) else {
                throw InstarError.invalid("Invalid cache option: \(name)")
            }
            options.targetCache = cache
        }
        // img_convert keeps the key-secret options of -o for the open of the new target (its create drops them),
        // so an encrypted target is unlocked with the passphrase it was created with.
        var targetSpec = options.targetSpec
        if created, targetSpec == nil, let v = values {
            var spec = ImageSpec(filename: (try? ImageOpener.fileName(fromPlainName: target)) ?? target, format: fmt)
            for (name, text) in v.entries where name.hasSuffix("key-secret") {
                if spec.driverOptions[name] == nil { spec.driverOptionOrder.append(name) }
                spec.driverOptions[name] = .string(text)
            }
            if !spec.driverOptions.isEmpty { targetSpec = spec }
        }
        let targetImage: ImageLayer
        do {
            targetImage = try openTarget(target, format: fmt, cache: options.targetCache, openBacking: true,
                                         spec: targetSpec, secrets: options.secrets,
                                         keySecret: options.targetKeySecret)
        } catch let e as InstarError {
            if created && options.removeTargetOnFailure { unlink((try? ImageOpener.fileName(fromPlainName: target)) ?? target) }
            throw e.prepending("Could not open '\(target)': ")
        }
        do {
            defer { try? targetImage.close() }
            if options.bitmaps && targetImage.format.persistentBitmapStore == nil {
                throw InstarError.unsupported("Format driver '\(targetImage.format.formatName)' does not support bitmaps")
            }
            if options.compress && targetImage.format.compressedWrites == nil {
                throw InstarError.unsupported("Compression not supported for this file format")
            }
            if options.noCreate && targetImage.virtualSize.divCeil(sectorSize) < totalSectors {
                throw InstarError.invalid("output file is smaller than input file")
            }
            try copy(sources: sources, into: targetImage, targetCreated: created, targetHasBacking: targetHasBacking,
                     options: options)
            if options.bitmaps {
                try copyBitmaps(from: sources[0].format, to: targetImage.format, skipBroken: options.skipBrokenBitmaps,
                                warning: options.warning)
            }
            try targetImage.close()
        } catch {
            if created && options.removeTargetOnFailure { unlink((try? ImageOpener.fileName(fromPlainName: target)) ?? target) }
            throw error
        }
    }

    /// qemu-img's convert_check_bitmaps, before the target exists. qemu walks a node's bitmaps newest first,
    /// which for bitmaps loaded from an image is the reverse of the directory order.
    static func checkBitmaps(_ source: ImageFormat, skipBroken: Bool) throws {
        guard let store = source.persistentBitmapStore else {
            throw InstarError.unsupported("Source lacks bitmap support")
        }
        if !skipBroken, let bad = store.persistentBitmaps.reversed().first(where: { $0.inconsistent }) {
            throw InstarError.invalid(inconsistentBitmapPrefix + "'\(bad.name)'")
        }
    }

    /// The start of the error for an in-use source bitmap; the CLI adds qemu's hint line after it.
    public static let inconsistentBitmapPrefix = "Cannot copy inconsistent bitmap "

    /// qemu-img's convert_copy_bitmaps, after the data: each consistent source bitmap becomes a target bitmap
    /// with the same name, granularity and enabled state, then receives the source's bits.
    static func copyBitmaps(from source: ImageFormat, to target: ImageFormat, skipBroken: Bool,
                            warning: ((String) -> Void)?) throws {
        guard let src = source.persistentBitmapStore, let dst = target.persistentBitmapStore else { return }
        for bm in src.persistentBitmaps.reversed() {
            if bm.inconsistent {
                if skipBroken {
                    warning?("Skipping inconsistent bitmap '\(bm.name)'")
                    continue
                }
                throw InstarError.invalid(inconsistentBitmapPrefix + "'\(bm.name)'")
            }
            let bits = try src.readBitmap(named: bm.name)
            // block_dirty_bitmap_merge needs bitmaps of the same size.
            if source.virtualSize != target.virtualSize {
                throw InstarError.invalid("Failed to populate bitmap \(bm.name): Bitmaps are of different sizes "
                    + "(destination size is \(target.virtualSize), source size is \(source.virtualSize)) and can't be merged")
            }
            do {
                try dst.addBitmap(PersistentBitmap(name: bm.name, granularity: bm.granularity, enabled: bm.enabled),
                                  bits: bits)
            } catch let e as InstarError {
                throw e.prepending("Failed to create bitmap \(bm.name): ")
            }
        }
    }

    /// Which internal snapshot -l selects.
    public struct SnapshotSelector {
        /// Given as snapshot.id= / snapshot.name= options.
        public var options: Bool
        public var id: String?
        public var name: String?

        /// Parses a -l argument: "snapshot.id=ID,snapshot.name=NAME" (qemu's internal_snapshot_opts) or a plain
        /// id-or-name. The error is qemu's first message line.
        public init(parsing a: String) throws {
            options = a.hasPrefix("snapshot.")
            guard options else {
                name = a
                return
            }
            for (k, v) in try CreateOptionValues.splitList(a) {
                switch k {
                case "snapshot.id": id = v
                case "snapshot.name": name = v
                default: throw InstarError.invalid("Invalid parameter '\(k)'")
                }
            }
        }
    }

    /// bdrv_snapshot_load_tmp(_by_id_or_name) on the first source, with img_convert's checks. Errors carry
    /// qemu-img's message.
    public static func loadSnapshot(_ sel: SnapshotSelector, sources: [ImageLayer]) throws {
        guard let first = sources.first else { return }
        do {
            if sel.options {
                if sel.id == nil && sel.name == nil { throw InstarError.invalid("snapshot_id and name are both NULL") }
                try first.format.loadSnapshotTemporarily(id: sel.id, name: sel.name)
            } else if let name = sel.name {
                if sources.count > 1 { throw ConvertSnapshotError.multipleSources }
                // The argument as an id first, then as a name.
                do {
                    try first.format.loadSnapshotTemporarily(id: name, name: nil)
                } catch let e as InstarError where e.code == .notFound {
                    try first.format.loadSnapshotTemporarily(id: nil, name: name)
                }
            }
        } catch ConvertSnapshotError.multipleSources {
            throw InstarError.invalid("No support for concatenating multiple snapshot")
        } catch let e as InstarError {
            throw e.prepending("Failed to load snapshot: ")
        }
    }

    enum ConvertSnapshotError: Error { case multipleSources }

    /// Whether a format's images take compressed writes, asked of the driver's creator table (qemu's
    /// block_driver_can_compress): formats with a compression_type option or a cluster_size do.
    static func canCompress(_ d: FormatDescriptor) -> Bool {
        guard let c = d.creator else { return false }
        return c.writesCompressed || c.options.contains { $0.name == "compression_type" }
    }

    /// One stretch of the source as convert_iteration_sectors() classifies it.
    enum Status { case data, zero, backingFile }

    /// qemu-img's ImgConvertState as far as convert_iteration_sectors() uses it.
    struct Iterator {
        let sources: [ImageLayer]
        let sourceSectors: [UInt64]
        let alignment: [UInt64]
        let totalSectors: UInt64
        let targetHasBacking: Bool
        /// The target's backing file size in sectors, nil when unknown or there is none.
        let targetBackingSectors: UInt64?
        let bufSectors: UInt64
        let compressed: Bool
        let clusterSectors: UInt64
        var sectorNextStatus: UInt64 = 0
        var status: Status = .data
        /// --salvage: a failed block-status query is retried on a quarter of the range down to one sector, which
        /// is then taken as data; `warnings` collects qemu's warning for each such sector until the caller takes them.
        var salvage = false
        var warnings: [String] = []

        /// The source holding `sector` and where it starts.
        func part(_ sector: UInt64) -> (Int, UInt64) {
            var start: UInt64 = 0
            for (i, n) in sourceSectors.enumerated() {
                if sector < start + n { return (i, start) }
                start += n
            }
            return (sourceSectors.count - 1, start - (sourceSectors.last ?? 0))
        }

        mutating func next(_ sectorNum: UInt64) throws -> UInt64 {
            let (cur, curOffset) = part(sectorNum)
            var n = min(totalSectors - sectorNum, requestMaxSectors)
            var postBackingZero = false
            if let tbs = targetBackingSectors {
                if sectorNum >= tbs {
                    postBackingZero = true
                } else if sectorNum + n > tbs {
                    n = tbs - sectorNum
                }
            }
            if sectorNextStatus <= sectorNum {
                let src = sources[cur]
                let offset = (sectorNum - curOffset) * sectorSize
                var query = n
                var found: ChainBlockStatus?
                while found == nil {
                    let bytes = min(query * sectorSize, src.virtualSize.divCeil(sectorSize) * sectorSize - offset)
                    do {
                        if targetHasBacking {
                            // Only the source's own layer: what it leaves unallocated comes from the target's
                            // backing.
                            guard let s = try ChainStatus.layerStatus(src, at: offset, length: bytes) else {
                                throw InstarError(.range, "block status queried past the end of the image")
                            }
                            found = s
                        } else {
                            found = try ChainStatus.aboveStatus(src, at: offset, length: bytes)
                        }
                    } catch let e as InstarError {
                        guard salvage else { throw StepError(.blockStatus, at: offset, operand: cur, e) }
                        if query > 1 {
                            // --salvage: qemu asks again for a quarter of the range, down to one sector...
                            query = query.divCeil(4)
                        } else {
                            // ...which it then reads as data.
                            let code = e.errnoValue != 0 ? e.errnoValue : EIO
                            warnings.append("error while reading block status at offset \(offset): \(strerrorString(code))")
                            found = ChainBlockStatus(length: sectorSize, allocated: true, data: true, zero: false,
                                                     hostOffset: nil, hostFile: nil, depth: 0, eof: false)
                        }
                    }
                }
                guard let st = found else { throw InstarError(.io, "no block status") }
                n = st.length.divCeil(sectorSize)
                let tail = (sectorNum - curOffset + n) % alignment[cur]
                if n > tail { n -= tail }
                if st.zero {
                    status = postBackingZero ? .backingFile : .zero
                } else if st.data {
                    status = .data
                } else {
                    status = targetHasBacking ? .backingFile : .data
                }
                sectorNextStatus = sectorNum + n
            }
            n = min(n, sectorNextStatus - sectorNum)
            if status == .data { n = min(n, bufSectors) }
            // Compressed clusters are written whole: a shorter stretch makes the whole cluster data.
            if compressed {
                if n < clusterSectors {
                    n = min(clusterSectors, totalSectors - sectorNum)
                    status = .data
                } else {
                    n -= n % clusterSectors
                }
            }
            return n
        }
    }

    /// Copies `sources` (concatenated) into `target` (convert_do_copy). `targetCreated` says whether the call
    /// created it (zero init: zero ranges are then left as holes); `targetHasBacking` whether it has a backing
    /// file that the source's unallocated ranges are left to.
    public static func copy(sources: [ImageLayer], into target: ImageLayer, targetCreated: Bool,
                            targetHasBacking: Bool = false, options: ConvertOptions) throws {
        var sourceSectors: [UInt64] = []
        var alignment: [UInt64] = []
        for s in sources {
            sourceSectors.append(s.virtualSize.divCeil(sectorSize))
            let cluster = (try? s.format.formatInfo().clusterSize) ?? nil
            alignment.append(max(1, (cluster ?? 0) / sectorSize))
        }
        let totalSectors = sourceSectors.reduce(0, +)
        let minSparse = options.sparseSize / sectorSize
        let hasZeroInit = options.targetIsZero
            || (targetCreated && minSparse > 0 && !targetHasBacking && target.format.hasZeroInit)
        let writeAlignment = max(pow2floor(minSparse), 1)
        let targetFormat = target.format
        let targetBacking = target.backing

        if target.virtualSize.divCeil(sectorSize) < totalSectors {
            throw InstarError.invalid("output file is smaller than input file")
        }
        let targetCluster = ((try? targetFormat.formatInfo().clusterSize) ?? nil) ?? 0
        var bufSectors = min(maxSparseBytes / sectorSize, max(bufferSectors, targetCluster / sectorSize))
        var compressor: CompressedClusterWriting?
        // qemu-img: a target whose driver needs compressed writes (vmdk streamOptimized) is written compressed.
        let compress = options.compress || (targetFormat.compressedWrites?.needsCompressedWrites ?? false)
        if compress {
            guard let cw = targetFormat.compressedWrites else {
                throw InstarError.unsupported("Compression not supported for this file format")
            }
            let cs = cw.compressedClusterSize / sectorSize
            if cs == 0 || cs > bufSectors { throw InstarError.invalid("invalid cluster size") }
            bufSectors = cs
            compressor = cw
        }
        let clusterSectors = max(1, targetCluster / sectorSize)
        var backingSectors: UInt64?
        if targetHasBacking && targetCreated, let b = targetBacking { backingSectors = b.virtualSize.divCeil(sectorSize) }

        var base = Iterator(sources: sources, sourceSectors: sourceSectors, alignment: alignment,
                            totalSectors: totalSectors, targetHasBacking: targetHasBacking,
                            targetBackingSectors: backingSectors, bufSectors: bufSectors,
                            compressed: compress, clusterSectors: compressor == nil ? clusterSectors
                                : bufSectors)
        base.salvage = options.salvage
        // First pass: progress counts only the sectors that will be read or written.
        var counter = base
        var allocated: UInt64 = 0
        var sector: UInt64 = 0
        while sector < totalSectors {
            let n = try counter.next(sector)
            if !counter.warnings.isEmpty {
                for w in counter.warnings { options.salvageWarning?(w) }
                counter.warnings = []
            }
            if counter.status == .data || (minSparse == 0 && counter.status == .zero) { allocated += n }
            sector += n
        }

        // The caller reports the initial 0% (qemu-img prints it before opening the images).
        var meter = ProgressMeter(minSkip: 1.0, report: options.progress)
        var writer = TargetWriter(target: targetFormat, backing: targetBacking, minSparse: minSparse,
                                  alignment: writeAlignment, hasZeroInit: hasZeroInit, cache: options.targetCache,
                                  rateLimit: options.rateLimit)
        var batch: CompressedBatch?
        if let cw = compressor {
            let threads = options.compressThreads > 0 ? options.compressThreads
                : max(1, min(8, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
            batch = CompressedBatch(writer: cw, clusterBytes: Int(bufSectors * sectorSize), threads: threads)
        }
        // The reads run ahead on their own thread: 4 chunks in flight (up to 64 small clusters, 8 MiB); over a
        // network, on as many threads as the sources want reads in flight (--salvage reads one at a time).
        let bufferBytes = Int(bufSectors * sectorSize)
        let readers = options.salvage ? 1
            : sources.map { ($0.format as? ConcurrentGuestIO)?.readsInFlight ?? 1 }.min() ?? 1
        let reader = ChunkReader(iterator: base, sources: sources, sourceSectors: sourceSectors,
                                 totalSectors: totalSectors, bufSectors: bufSectors, minSparse: minSparse,
                                 depth: min(64, max(4, (8 << 20) / max(bufferBytes, 1))), readers: readers)
        reader.offload = options.copyRange && (targetFormat as? CopyOffloadTarget)?.acceptsCopyOffload == true
        reader.kernelCopy = reader.offload && targetFormat is PlainGuestFile
        reader.salvage = options.salvage
        reader.coroutines = options.coroutines
        var kernelCopyWorks = true
        reader.start()
        defer { reader.stop() }
        var done: UInt64 = 0
        // The report that reaches 100% waits until every write is answered (qemu reports a chunk once its write
        // completed; write-behind targets answer later): a failed write must not follow a "100%".
        var fullReportPending = false
        sector = 0
        while sector < totalSectors {
            let step = reader.next()
            if let e = step.pointee.statusError { throw e }
            let n = step.pointee.count
            var status = step.pointee.status
            if status == .data || (minSparse == 0 && status == .zero) {
                done += n
                if done < allocated {
                    try meter.set(done: done, total: allocated)
                } else {
                    fullReportPending = true
                }
            }
            for w in step.pointee.warnings { options.salvageWarning?(w) }
            if let e = step.pointee.readError {
                guard var first = e as? StepError else { throw e }
                first.alsoFailed = reader.readErrors(after: step).compactMap { $0 as? StepError }
                throw first
            }
            let chunk = UnsafeMutableRawBufferPointer(rebasing: step.pointee.buffer[0..<Int(min(n, bufSectors) * sectorSize)])
            if status == .data && step.pointee.offloadBytes > 0 {
                do {
                    if step.pointee.unread {
                        if kernelCopyWorks, try writer.copyIn(step.pointee.pieces, sector: sector) {
                            reader.release()
                            sector += n
                            continue
                        }
                        // The kernel could not copy: qemu's copy fails and it reads and writes the chunk.
                        kernelCopyWorks = false
                        do {
                            try readSources(sources, sourceSectors, sector: sector, into: chunk)
                        } catch let e as InstarError {
                            throw StepError(.read, at: sector * sectorSize, e)
                        }
                    } else {
                        let prefix = Int(step.pointee.offloadBytes)
                        try WriteLoan.lending(step.pointee.owner) {
                            try writer.write(UnsafeMutableRawBufferPointer(rebasing: chunk[0..<prefix]), sector: sector,
                                             count: UInt64(prefix) / sectorSize, status: .data, noZeroSector: true)
                        }
                        if prefix == chunk.count {
                            reader.release()
                            sector += n
                            continue
                        }
                    }
                } catch let e as InstarError {
                    throw StepError(.write, at: sector * sectorSize, e)
                }
            }
            // -S 0: the reader zeroed the buffer; it is written as data.
            if minSparse == 0 && status == .zero { status = .data }
            do {
                if let b = batch, status == .data {
                    // Whole clusters (the last one may be short): compressed on worker threads, stored in order.
                    if minSparse == 0 || !(chunk.baseAddress.map { isZero(UnsafeRawPointer($0), chunk.count) } ?? true) {
                        try b.add(chunk, sector: sector, writer: &writer)
                    } else {
                        try b.drain(&writer)
                        try writer.zero(sector: sector, count: n)
                    }
                } else {
                    try batch?.drain(&writer)
                    // The chunk's buffer is lent to write-behind backends below (WriteLoan): the reader does
                    // not refill it until they are done with it.
                    try WriteLoan.lending(step.pointee.owner) {
                        try writer.write(chunk, sector: sector, count: n, status: status,
                                         noZeroSector: step.pointee.noZeroSector)
                    }
                }
            } catch let f as CompressedWriteFailure {
                throw writeError(f)
            } catch let e as InstarError {
                throw StepError(.write, at: sector * sectorSize, e)
            }
            reader.release()
            sector += n
        }
        do {
            try batch?.drain(&writer)
            for f in targetFormat.hostFiles { try f.drainWrites() }
        } catch let f as CompressedWriteFailure {
            throw writeError(f)
        } catch let e as InstarError {
            throw StepError(.write, at: sector * sectorSize, e)
        }
        if fullReportPending { try meter.set(done: done, total: allocated) }
        do {
            // convert_do_copy ends a successful compressed copy with an empty compressed write.
            try compressor?.finishCompressedWrites()
            if options.targetCache.flushes { try targetFormat.flush() }
        } catch let f as CompressedWriteFailure {
            throw writeError(f)
        } catch let e as InstarError {
            throw StepError(.write, at: sector * sectorSize, e)
        }
        try meter.advance(100, max: 0)
    }

    static func writeError(_ f: CompressedWriteFailure) -> Error {
        guard let e = f.error as? InstarError else { return f.error }
        return StepError(.write, at: f.offset, e)
    }

    /// Where guest bytes lie in a source's host file, for copy offloading.
    struct HostPiece {
        var file: HostFile
        var offset: UInt64
        var length: UInt64
    }

    /// How many leading bytes of the data range [sector, +bytes) of the concatenated sources qemu's copy_range
    /// would copy before it meets a range it cannot offload (one not stored plainly in a host file: compressed,
    /// encrypted, or a read error), and where they are. Errors end the prefix (qemu's read then reports them),
    /// except a call limit firing inside the block-status query, which is thrown: the limit fires once, so
    /// swallowing it would let the copy run to the end.
    static func offloadablePieces(_ sources: [ImageLayer], _ sizes: [UInt64], sector: UInt64, bytes: UInt64)
        throws -> (bytes: UInt64, pieces: [HostPiece])
    {
        var pieces: [HostPiece] = []
        var done: UInt64 = 0
        var start: UInt64 = 0
        let first = sector * sectorSize
        for (i, n) in sizes.enumerated() {
            let partStart = start * sectorSize
            let partEnd = (start + n) * sectorSize
            start += n
            if done >= bytes { break }
            let at = first + done
            if at >= partEnd || at < partStart { continue }
            var offset = at - partStart
            let size = sources[i].virtualSize
            var left = min(bytes - done, partEnd - at)
            // qemu checks the whole request against the source's length first: a sector-rounded tail past a
            // source's end makes the copy fail before anything of this part is copied.
            if offset + left > size { return (done, pieces) }
            var guardSteps = 0
            while left > 0 && guardSteps < 1 << 20 {
                guardSteps += 1
                let want = min(left, size > offset ? size - offset : 0)
                if want == 0 { return (done, pieces) }
                let status: ChainBlockStatus?
                do {
                    status = try ChainStatus.aboveStatus(sources[i], at: offset, length: want)
                } catch let e as InstarError where e.code == .limit {
                    throw e
                } catch {
                    status = nil
                }
                guard let st = status, st.data, !st.zero, let host = st.hostOffset, let name = st.hostFile,
                      st.length > 0 else {
                    return (done, pieces)
                }
                let chain = sources[i].chain
                guard st.depth < chain.count,
                      let file = chain[st.depth].format.hostFiles.first(where: { $0.path == name }) else {
                    return (done, pieces)
                }
                let len = min(st.length, want)
                // A host range no file can hold (a hostile image's wrapped offset) is not copied by the kernel;
                // reading it fails as qemu's does.
                guard host <= UInt64(Int64.max), len <= UInt64(Int64.max) - host else { return (done, pieces) }
                if let last = pieces.last, last.file === file, last.offset + last.length == host {
                    pieces[pieces.count - 1].length += len
                } else {
                    pieces.append(HostPiece(file: file, offset: host, length: len))
                }
                done += len
                offset += len
                left -= len
                if left > 0 && offset >= size {
                    // The sector-rounded tail past a source's end: plain zeroes, not in the file.
                    return (done, pieces)
                }
            }
            if left > 0 { return (done, pieces) }
        }
        return (done, pieces)
    }

    /// convert_co_read() with --salvage: a failed read of several sectors is retried sector by sector; a sector
    /// that still fails reads as zeroes and gets qemu's warning (offsets within its source). Returns the
    /// warnings in order.
    static func readSalvaging(_ sources: [ImageLayer], _ sizes: [UInt64], sector: UInt64,
                              into chunk: UnsafeMutableRawBufferPointer) throws -> [String] {
        var warnings: [String] = []
        var start: UInt64 = 0
        var at = sector
        var filled = 0
        for (i, n) in sizes.enumerated() {
            let end = start + n
            if at < end && filled < chunk.count {
                let bytes = min(chunk.count - filled, Int((end - at) * sectorSize))
                let part = UnsafeMutableRawBufferPointer(rebasing: chunk[filled..<(filled + bytes)])
                let offset = (at - start) * sectorSize
                do {
                    try sources[i].read(into: part, at: offset)
                } catch let e as InstarError {
                    let one = Int(sectorSize)
                    var s = 0
                    var first: InstarError? = bytes <= one ? e : nil
                    while s < bytes {
                        let len = min(one, bytes - s)
                        let sec = UnsafeMutableRawBufferPointer(rebasing: part[s..<(s + len)])
                        var failure = first
                        first = nil
                        if failure == nil {
                            do {
                                try sources[i].read(into: sec, at: offset + UInt64(s))
                            } catch let f as InstarError {
                                failure = f
                            }
                        }
                        if let f = failure {
                            let code = f.errnoValue != 0 ? f.errnoValue : EIO
                            warnings.append("error while reading offset \(offset + UInt64(s)): \(strerrorString(code))")
                            sec.initializeMemory(as: UInt8.self, repeating: 0)
                        }
                        s += len
                    }
                }
                filled += bytes
                at += UInt64(bytes) / sectorSize
            }
            start = end
        }
        if filled < chunk.count {
            UnsafeMutableRawBufferPointer(rebasing: chunk[filled...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        return warnings
    }

    /// convert_co_read(): `chunk` from the concatenated sources starting at `sector`.
    static func readSources(_ sources: [ImageLayer], _ sizes: [UInt64], sector: UInt64,
                            into chunk: UnsafeMutableRawBufferPointer) throws {
        var start: UInt64 = 0
        var at = sector
        var filled = 0
        for (i, n) in sizes.enumerated() {
            let end = start + n
            if at < end && filled < chunk.count {
                let bytes = min(chunk.count - filled, Int((end - at) * sectorSize))
                try sources[i].read(into: UnsafeMutableRawBufferPointer(rebasing: chunk[filled..<(filled + bytes)]),
                                    at: (at - start) * sectorSize)
                filled += bytes
                at += UInt64(bytes) / sectorSize
            }
            start = end
        }
        if filled < chunk.count {
            UnsafeMutableRawBufferPointer(rebasing: chunk[filled...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// convert_co_write() without compression, plus -t writethrough flushes and the -r rate limit.
    struct TargetWriter {
        let target: ImageFormat
        let backing: GuestReader?
        let minSparse: UInt64
        let alignment: UInt64
        let hasZeroInit: Bool
        let cache: CacheMode
        let rateLimit: UInt64
        /// The -r bucket: bytes written and not yet drained, and when it last drained.
        var level: Double = 0
        var lastLeak = TargetWriter.monotonicSeconds()

        /// `noZeroSector`: the caller checked that no sector of `buf` is all zero, so it is one data run.
        mutating func write(_ buf: UnsafeMutableRawBufferPointer, sector: UInt64, count: UInt64,
                            status: Status, noZeroSector: Bool = false) throws {
            switch status {
            case .backingFile:
                return
            case .zero:
                try zero(sector: sector, count: count)
            case .data:
                var i: UInt64 = 0
                while i < count {
                    var n = count - i
                    var isData = true
                    if minSparse > 0 && !noZeroSector {
                        let r = allocatedSectorsMin(buf, from: i, count: n, min: minSparse, sector: sector + i,
                                                    alignment: alignment)
                        isData = r.allocated
                        n = r.count
                    }
                    if isData {
                        let range = Int(i * sectorSize)..<Int((i + n) * sectorSize)
                        admit()
                        try target.write(UnsafeRawBufferPointer(rebasing: buf[range]), at: (sector + i) * sectorSize,
                                         backing: backing)
                        try account(n * sectorSize)
                    } else {
                        try zero(sector: sector + i, count: n)
                    }
                    i += n
                }
            }
        }

        /// -C into a plain-file target: the kernel copies `pieces` (the sources' host ranges of the guest range
        /// from `sector`, in order) into the target. False when it copied nothing of the first piece (qemu then
        /// falls back to reading); a piece the kernel stops in the middle of is finished through a buffer.
        mutating func copyIn(_ pieces: [HostPiece], sector: UInt64) throws -> Bool {
            guard let plain = target as? PlainGuestFile else { return false }
            var at = sector * sectorSize
            for (i, p) in pieces.enumerated() {
                guard let (dst, dstOffset) = plain.plainHostRange(at: at, length: p.length) else {
                    if i == 0 { return false }
                    return try finish(pieces[i...], at)
                }
                admit()
                let copied = dst.copyIn(from: p.file, at: p.offset, length: p.length, to: dstOffset)
                if copied < p.length {
                    if copied == 0 && i == 0 { return false }
                    return try finish(pieces[i...], at, skipping: copied)
                }
                try account(p.length)
                at += p.length
            }
            return true
        }

        /// The rest of a kernel copy that stopped part way, through a buffer from the same host ranges.
        private mutating func finish(_ pieces: ArraySlice<HostPiece>, _ start: UInt64, skipping: UInt64 = 0) throws
            -> Bool
        {
            var at = start
            var skip = skipping
            for p in pieces {
                var left = p.length - skip
                var src = p.offset + skip
                at += skip
                skip = 0
                var buf = [UInt8](repeating: 0, count: Int(min(left, 1 << 20)))
                while left > 0 {
                    let n = min(left, UInt64(buf.count))
                    try buf.withUnsafeMutableBytes { raw in
                        let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<Int(n)])
                        try p.file.readZeroPadded(into: part, at: src)
                        admit()
                        try target.write(UnsafeRawBufferPointer(part), at: at, backing: backing)
                    }
                    try account(n)
                    left -= n
                    src += n
                    at += n
                }
            }
            return true
        }

        mutating func zero(sector: UInt64, count: UInt64) throws {
            if hasZeroInit { return }
            admit()
            try target.writeZeroes(at: sector * sectorSize, length: count * sectorSize, mayUnmap: true,
                                   backing: backing)
            try account(count * sectorSize)
        }

        /// Before each request, with -r: qemu's leaky bucket (throttle_compute_wait with no burst setting) lets
        /// a request start once the bytes not yet drained at the limit's rate are at most a tenth of a second's
        /// worth.
        mutating func admit() {
            guard rateLimit > 0 else { return }
            leak()
            let extra = level - Double(rateLimit) / 10
            if extra > 0 {
                let wait = extra / Double(rateLimit)
                var ts = timespec(tv_sec: Int(wait), tv_nsec: Int((wait - Double(Int(wait))) * 1e9))
                var left = timespec()
                while nanosleep(&ts, &left) != 0 && errno == EINTR { ts = left }
                leak()
            }
        }

        /// After each request: the writethrough flush and the bytes added to the bucket.
        mutating func account(_ bytes: UInt64) throws {
            if cache.writethrough { try target.flush() }
            guard rateLimit > 0 else { return }
            leak()
            level += Double(bytes)
        }

        private mutating func leak() {
            let now = TargetWriter.monotonicSeconds()
            level = max(0, level - (now - lastLeak) * Double(rateLimit))
            lastLeak = now
        }

        static func monotonicSeconds() -> Double {
            var ts = timespec()
            clock_gettime(CLOCK_MONOTONIC, &ts)
            return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
        }
    }

    /// True when the 512-byte sector `index` of `buf` is all zeroes (memcmp against itself shifted: word-wise
    /// in glibc, no per-byte loop here).
    @inline(__always)
    static func sectorIsZero(_ buf: UnsafeMutableRawBufferPointer, _ index: UInt64) -> Bool {
        guard let base = buf.baseAddress else { return true }
        let p = base + Int(index * sectorSize)
        return isZero(UnsafeRawPointer(p), Int(sectorSize))
    }

    /// Whether `count` bytes at `p` are all zero.
    public static func isZero(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
        if count == 0 { return true }
        if p.load(as: UInt8.self) != 0 { return false }
        return memcmp(p, p + 1, count - 1) == 0
    }

    /// qemu-img's is_allocated_sectors(): the run of sectors from `from` with the same zero state, its end
    /// aligned to `alignment` where that saves a read-modify-write.
    static func allocatedSectors(_ buf: UnsafeMutableRawBufferPointer, from: UInt64, count n: UInt64, sector: UInt64,
                                 alignment: UInt64) -> (allocated: Bool, count: UInt64) {
        if n == 0 { return (false, 0) }
        var isZero = sectorIsZero(buf, from)
        var i: UInt64 = 1
        while i < n {
            if isZero != sectorIsZero(buf, from + i) { break }
            i += 1
        }
        if i == n { return (!isZero, i) }
        let tail = (sector + i) & (alignment - 1)
        if tail != 0 {
            if isZero && i <= tail { isZero = false }
            if !isZero {
                i = min(i + alignment - tail, n)
            } else {
                i -= tail
            }
        }
        return (!isZero, i)
    }

    /// qemu-img's is_allocated_sectors_min(): after data, zero runs shorter than `min` sectors stay data.
    static func allocatedSectorsMin(_ buf: UnsafeMutableRawBufferPointer, from: UInt64, count: UInt64, min: UInt64,
                                    sector: UInt64, alignment: UInt64) -> (allocated: Bool, count: UInt64) {
        let minRun = Swift.min(min, count)
        let first = allocatedSectors(buf, from: from, count: count, sector: sector, alignment: alignment)
        if !first.allocated { return first }
        var used = first.count
        var checked = used
        var n = count - first.count
        var at = from + first.count
        var sec = sector + first.count
        while n > 0 {
            let r = allocatedSectors(buf, from: at, count: n, sector: sec, alignment: alignment)
            at += r.count
            n -= r.count
            sec += r.count
            checked += r.count
            if r.allocated {
                used = checked
            } else if r.count >= minRun {
                break
            }
        }
        return (true, used)
    }

    static func pow2floor(_ v: UInt64) -> UInt64 {
        if v == 0 { return 0 }
        return UInt64(1) << UInt64(63 - v.leadingZeroBitCount)
    }
}
