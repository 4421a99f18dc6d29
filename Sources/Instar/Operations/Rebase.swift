import Glibc

/// `qemu-img rebase`: points an image at a new backing file. In safe mode the guest contents stay what they
/// were: every range the image does not allocate itself is read from the old and the new backing file in
/// qemu-img 7.2's 2 MiB chunks, and the 512-byte sectors that differ are written into the image from the old
/// one (img_rebase); then the header names the new backing file, through the driver's `BackingFileChangeable`
/// capability. A crash before the header change leaves the old chain reading the same contents.
public enum RebaseOperation {
    public struct Options {
        /// -f; nil probes.
        public var format: String?
        /// --image-opts: the image name is a QemuOpts string of block options.
        public var imageOpts = false
        /// --object secrets, and the top image's passphrase (`keySecret`).
        public var open = ImageOpenOptions()
        /// -b: the new backing name, stored verbatim ("" makes the image standalone). nil only with `unsafe`,
        /// where it also removes the backing file.
        public var backingFile: String?
        /// -F: the new backing format, stored in the header; qemu requires it with a non-empty -b.
        public var backingFormat: String?
        /// -u: only the header changes; the old backing file is not even opened.
        public var unsafe = false
        /// -t (image) and -T (backing files read in safe mode), qemu's cache mode names.
        public var cache = "writeback"
        public var sourceCache = "writeback"
        /// -U: the new backing file is opened sharing every permission.
        public var forceShare = false
        /// Receives warnings printed while the operation goes on (the probed-raw warning).
        public var warn: ((String) -> Void)?
        /// Receives the percentages `qemu-img rebase -p` prints (already filtered as qemu's meter does); a
        /// throw (e.g. `.cancelled`) stops the operation, leaving the image reading what it read before.
        public var progress: ((Double) throws -> Void)?
        public init() {}
    }

    /// qemu-img's chunk size (IO_BUF_SIZE).
    static let chunkSize: UInt64 = 2 << 20
    /// compare_buffers' unit (BDRV_SECTOR_SIZE).
    static let sectorSize = 512

    /// The format names bdrv_find_format knows in Debian's qemu-img 7.2 (its "Supported formats" list, which
    /// includes protocol drivers): -F is checked against these, not against what instar can open.
    public static let qemuDriverNames: Set<String> = [
        "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read",
        "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "iser",
        "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
        "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc",
        "vvfat",
    ]

    /// Rebases `name` as `qemu-img rebase` does, in qemu's order of checks. Errors carry qemu-img's message
    /// (after the "qemu-img: " prefix). The caller has checked that -b is given unless `unsafe`.
    public static func run(_ name: String, options: Options) throws {
        var meter = ProgressMeter(minSkip: 2.0, report: options.progress)
        try meter.advance(0, max: 100)
        guard let cache = CacheMode(qemuName: options.cache) else {
            throw InstarError.invalid("Invalid cache option: \(options.cache)")
        }
        guard let sourceCache = CacheMode(qemuName: options.sourceCache) else {
            throw InstarError.invalid("Invalid source cache option: \(options.sourceCache)")
        }
        let layer = try openImage(name, options: options, cache: cache)
        var closed = false
        defer { if !closed { try? layer.close() } }
        if let f = options.backingFormat, !qemuDriverNames.contains(f) {
            throw InstarError.invalid("Invalid format name: '\(f)'")
        }
        if !options.unsafe {
            // The copied differences are flushed before the backing link changes: as in commit, the image's
            // files write them out while the copy goes on (EarlyWriteback.swift), with a writeback cache only.
            let pace = !cache.writethrough && !cache.direct && cache.flushes
            if pace { for f in layer.format.hostFiles { f.beginEarlyWriteback() } }
            defer { if pace { for f in layer.format.hostFiles { f.endEarlyWriteback() } } }
            try copyDifferences(layer, options: options, sourceCache: sourceCache, meter: &meter)
        }
        do {
            try changeBackingFile(layer, options: options)
        } catch {
            // qemu-img completes the progress line after reporting the failure.
            try? meter.advance(100, max: 0)
            throw error
        }
        try meter.advance(100, max: 0)
        closed = true
        try layer.close()
    }

    /// img_open of the image: read/write with the -t cache mode, its backing chain only in safe mode, qemu's
    /// "Could not open" prefix and the probed-raw warning.
    static func openImage(_ name: String, options: Options, cache: CacheMode) throws -> ImageLayer {
        if options.imageOpts && options.format != nil {
            throw InstarError.invalid("--image-opts and --format are mutually exclusive")
        }
        var open = options.open
        open.direct = cache.direct
        open.noFlush = !cache.flushes
        do {
            let spec = try ImageOpener.commandLineSpec(name, format: options.format, imageOpts: options.imageOpts,
                                                       warn: options.warn)
            let layer = try ImageOpener.open(spec, options: open, writable: true, openBacking: !options.unsafe)
            if spec.format == nil && layer.format.formatName == "raw" {
                options.warn?(ResizeOperation.probedRawWarning(ResizeOperation.probedFileName(spec, layer)))
            }
            return layer
        } catch let e as InstarError {
            throw e.prepending("Could not open '\(name)': ")
        }
    }

    /// The new backing file of a safe rebase: a layer of the image's own chain when -b names one (then only
    /// the layers above it can differ), else the file opened read-only with -F, -T and -U.
    static func openNewBacking(_ layer: ImageLayer, options: Options,
                               sourceCache: CacheMode) throws -> (ImageLayer, inChain: Bool)? {
        guard let out = options.backingFile, !out.isEmpty else { return nil }
        // bdrv_get_full_backing_filename_from_filename against the image's own name.
        let full: String
        if RebaseChain.hasProtocol(out) || out.hasPrefix("/") {
            full = out
        } else if layer.filename.isEmpty || layer.filename.hasPrefix("json:") {
            throw InstarError.invalid("Could not resolve backing filename: Cannot use relative backing file names "
                                      + "for '\(layer.filename)'")
        } else {
            full = ImageOpener.resolveBackingName(out, relativeTo: layer.filename)
        }
        if let found = RebaseChain.findBackingImage(layer, path: full) { return (found, true) }
        var open = options.open
        open.keySecret = nil
        open.direct = sourceCache.direct
        open.noFlush = !sourceCache.flushes
        open.forceShare = options.forceShare
        do {
            var spec = try ImageOpener.parseSpec(full, format: options.backingFormat)
            if options.forceShare { spec.forceShare = true }
            return (try ImageOpener.open(spec, options: open, writable: false, openBacking: true), false)
        } catch let e as InstarError {
            throw e.prepending("Could not open new backing file '\(out)': ")
        }
    }

    /// The safe-mode pass of img_rebase: for each range the image does not allocate (and, when the new backing
    /// file is in the chain, that the layers in between do), the old and new backing contents are compared in
    /// sectors and the differing runs written from the old one (zero writes past the old one's end).
    static func copyDifferences(_ layer: ImageLayer, options: Options, sourceCache: CacheMode,
                                meter: inout ProgressMeter) throws {
        let oldBacking = layer.backing
        let newBacking = try openNewBacking(layer, options: options, sourceCache: sourceCache)
        defer { if let (b, inChain) = newBacking, !inChain { try? b.close() } }
        let prefix: ImageLayer? = newBacking.flatMap { $0.inChain ? $0.0 : nil }
        let size = layer.virtualSize
        let oldSize = oldBacking?.virtualSize ?? 0
        let newSize = newBacking?.0.virtualSize ?? 0
        let local: Float = size == 0 ? 0 : Float(100) / Float(size / min(size, chunkSize))
        let capacity = Int(chunkSize)
        let bufOld = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 4096)
        let bufNew = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 4096)
        defer {
            bufOld.deallocate()
            bufNew.deallocate()
        }
        var offset: UInt64 = 0
        while offset < size {
            var n = min(chunkSize, size - offset)
            let own: (allocated: Bool, length: UInt64)
            do {
                own = try RebaseChain.layerStatus(layer, at: offset, length: n) ?? (false, n)
            } catch let e as InstarError {
                throw metadataError(e)
            }
            n = own.length
            if own.allocated {
                offset += n
                continue
            }
            if let base = prefix, let old = oldBacking {
                let bytes = n
                let above: (allocated: Bool, length: UInt64)
                do {
                    above = try RebaseChain.isAllocatedAbove(old, base: base, offset: offset, length: n)
                } catch let e as InstarError {
                    throw metadataError(e)
                }
                n = above.length
                if !above.allocated && n > 0 {
                    offset += n
                    continue
                }
                if n == 0 { n = bytes }
            }
            // Backing files shorter than the image: each read stops at its end (qemu reads zeroes past the old
            // one's end, and writes zeroes where they differ from the new one).
            let newChain: ImageLayer? = newBacking?.0
            let oldIsZero = offset >= oldSize
            if !oldIsZero { n = min(n, oldSize - offset) }
            let newIsZero = newChain == nil || offset >= newSize
            if !newIsZero { n = min(n, newSize - offset) }
            let range = 0..<Int(n)
            // Ranges that read as zeroes in both chains hold no difference: the reads and the comparison are
            // skipped (qemu-img reads and compares them), the chunking and progress stay qemu's.
            if zeroesInBoth(old: oldIsZero ? nil : oldBacking, new: newIsZero ? nil : newChain, offset: offset,
                            length: n) {
                try meter.advance(local, max: 100)
                offset += n
                continue
            }
            if oldIsZero {
                UnsafeMutableRawBufferPointer(rebasing: bufOld[range]).initializeMemory(as: UInt8.self, repeating: 0)
            } else if let old = oldBacking {
                do {
                    try old.read(into: UnsafeMutableRawBufferPointer(rebasing: bufOld[range]), at: offset)
                } catch let e as InstarError {
                    throw InstarError(e.code, "error while reading from old backing file", errno: e.errnoValue)
                }
            }
            if !newIsZero, let new = newChain {
                do {
                    try new.read(into: UnsafeMutableRawBufferPointer(rebasing: bufNew[range]), at: offset)
                } catch let e as InstarError {
                    throw InstarError(e.code, "error while reading from new backing file", errno: e.errnoValue)
                }
            } else {
                UnsafeMutableRawBufferPointer(rebasing: bufNew[range]).initializeMemory(as: UInt8.self, repeating: 0)
            }
            var written = 0
            let count = Int(n)
            while written < count {
                let (differ, run) = compareSectors(bufOld, bufNew, from: written, to: count)
                if differ {
                    let at = offset + UInt64(written)
                    do {
                        if oldIsZero {
                            try layer.format.writeZeroes(at: at, length: UInt64(run), mayUnmap: false, backing: oldBacking)
                        } else {
                            try layer.format.write(UnsafeRawBufferPointer(rebasing: bufOld[written..<written + run]),
                                                   at: at, backing: oldBacking)
                        }
                    } catch let e as InstarError {
                        let err = e.errnoValue != 0 ? e.errnoValue : EIO
                        throw InstarError(e.code, "Error while writing to COW image: \(strerrorString(err))",
                                          errno: err)
                    }
                }
                written += run
            }
            try meter.advance(local, max: 100)
            offset += n
        }
    }

    /// Whether [offset, offset + length) reads as zeroes in the old and in the new backing chain, known from
    /// block status; a failed query only means the data is read and compared after all.
    static func zeroesInBoth(old: ImageLayer?, new: ImageLayer?, offset: UInt64, length: UInt64) -> Bool {
        guard (try? RebaseChain.readsAsZeroes(old, at: offset, length: length)) == true else { return false }
        return (try? RebaseChain.readsAsZeroes(new, at: offset, length: length)) == true
    }

    /// "error while reading image metadata: STRERROR", as qemu-img reports a failed block-status query.
    static func metadataError(_ e: InstarError) -> InstarError {
        let err = e.errnoValue != 0 ? e.errnoValue : EIO
        return InstarError(e.code, "error while reading image metadata: \(strerrorString(err))", errno: err)
    }

    /// compare_buffers: whether the first sector of [from, to) differs, and how many bytes from `from` share
    /// that answer (whole sectors, the last one possibly short).
    static func compareSectors(_ a: UnsafeMutableRawBufferPointer, _ b: UnsafeMutableRawBufferPointer,
                               from: Int, to: Int) -> (Bool, Int) {
        guard let pa = a.baseAddress, let pb = b.baseAddress else { return (false, to - from) }
        func differs(_ at: Int, _ len: Int) -> Bool { memcmp(pa + at, pb + at, len) != 0 }
        var i = min(to - from, sectorSize)
        let first = differs(from, i)
        while from + i < to {
            let len = min(to - from - i, sectorSize)
            if differs(from + i, len) != first { break }
            i += len
        }
        return (first, i)
    }

    /// bdrv_change_backing_file(require: true) and img_rebase's wording of its failures.
    static func changeBackingFile(_ layer: ImageLayer, options: Options) throws {
        let out = options.backingFile
        let name: String? = (out?.isEmpty ?? true) ? nil : out
        let format = name == nil ? nil : options.backingFormat
        let shown = out ?? "(null)"
        func failure(_ err: Int32) -> InstarError {
            let code: InstarError.Code = err == ENOTSUP ? .unsupported : err == EINVAL ? .invalid : .io
            if err == ENOSPC {
                return InstarError(code, "Could not change the backing file to '\(shown)': No space left in the file "
                                   + "header", errno: err)
            }
            if err == EINVAL && out != nil && options.backingFormat == nil {
                return InstarError(code, "Could not change the backing file to '\(shown)': backing format must be "
                                   + "specified", errno: err)
            }
            return InstarError(code, "Could not change the backing file to '\(shown)': \(strerrorString(err))",
                               errno: err)
        }
        if name != nil && format == nil { throw failure(EINVAL) }
        guard let changer = layer.format as? BackingFileChangeable else { throw failure(ENOTSUP) }
        do {
            try changer.changeBackingFile(name, format: format)
        } catch let e as InstarError {
            throw failure(e.errnoValue != 0 ? e.errnoValue : EIO)
        }
    }
}
