import Glibc

/// qcow2 (docs/interop/qcow2.txt), read side: versions 2 and 3, cluster sizes 512 B .. 2 MiB, extended L2,
/// zlib/zstd compressed clusters, backing files, external data files, internal snapshots, bitmaps and the
/// LUKS- or legacy AES-encrypted images (unlocked with the `encrypt.key-secret` passphrase). The open sequence
/// and its messages follow qemu's qcow2_do_open.
public final class Qcow2Format: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(
            name: "qcow2",
            probe: { header, _ in
                // qemu's qcow2_probe: the magic and a version of 2 or more.
                let r = ByteReader(header)
                guard let magic = try? r.u32be(at: 0), magic == Qcow2.magic, let version = try? r.u32be(at: 4),
                      version >= 2 else { return 0 }
                return 100
            },
            open: { request in
                let image = try Qcow2Format(request: request)
                // qcow2_do_open's order: a dirty image is repaired before its bitmaps are marked in use.
                try image.repairIfDirty(request: request)
                try image.prepareBitmapsForWriting()
                return image
            })
        d.knownOption = Qcow2RuntimeOptions.isKnown
        return d
    }()

    public let formatName = "qcow2"
    let file: HostFile
    /// Where guest data lives: the image file, or the external data file.
    let dataFile: HostFile
    let externalDataFile: HostFile?
    var header: Qcow2Header
    /// The header extensions as read (amend may rename the data file).
    var extensions: Qcow2Extensions
    /// Version 3 header bytes past the fields qemu knows (112 up to header_length), kept on header rewrites.
    let unknownHeaderFields: [UInt8]
    let mapper: Qcow2Mapper
    /// Replaced (with `snapshots`) when the repair of a dirty image rewrote the metadata behind them.
    var refcounts: Qcow2RefcountReader
    var snapshots: [SnapshotInfo]
    let bitmaps: [Qcow2BitmapEntry]
    /// Replaced when amend changes the key slots.
    var luks: Qcow2LuksInfo?
    /// The unlocked payload cipher of a LUKS image opened for I/O.
    let crypt: Qcow2Crypt?
    public internal(set) var backingReference: BackingReference?
    private let decompressor: Qcow2Decompressor
    /// The last decompressed cluster (reads in chunks smaller than a cluster hit it repeatedly).
    private var decompressedEntry: UInt64?
    private var decompressed: [UInt8] = []
    private var metadataPreallocated: Bool?
    /// Opened read/write (the host file is writable and write locks are held).
    let writable: Bool
    /// The write side, created on the first change (a repairing check may create it too).
    var writer: Qcow2Writer?
    /// A check marked the image corrupt while it was open (qemu then detaches the driver: nothing more is
    /// written, not even the clean mark of close).
    var corruptionSignalled = false
    /// A read-only open has said its one "Image is corrupt" line (set from any reading thread).
    private let readCorruptionTold = AtomicCounter()
    /// A metadata update that marked the image dirty failed part way: the refcounts and copied flags on disk
    /// may disagree, so close leaves the dirty bit for the repair of the next read/write open.
    var keepDirtyAfterFailure = false
    /// The bitmaps of the directory, as loaded at open (see `Qcow2LiveBitmap`), in directory order.
    /// Emptied once they are stored at close (qemu releases them then).
    var liveBitmaps: [Qcow2LiveBitmap]
    /// Bitmaps added to a writable image, newest first; stored on close after the loaded ones.
    var addedBitmaps: [Qcow2LiveBitmap] = []

    public var hostFiles: [HostFile] { externalDataFile.map { [file, $0] } ?? [file] }
    public var virtualSize: UInt64 { header.size / 512 * 512 }
    var encrypted: Bool { header.cryptMethod != Qcow2.cryptNone }

    /// qcow2_read_extensions' warning for a bitmaps extension without the autoclear bit that vouches for it.
    static func warnIgnoredBitmaps(version: UInt32) {
        Diagnostics.warning(version < 3
            ? "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without "
                + "persistent bitmap support; so now they must all be considered inconsistent"
            : "a program lacking bitmap support modified this file, so all bitmaps are now considered "
                + "inconsistent")
        Diagnostics.plain("Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.")
    }

    /// The bytes of the first cluster that the header, its extensions and the backing name can occupy. Most
    /// images keep them in the first 4 KiB, so that much is read when it holds everything the walk of the
    /// extensions meets up to their end marker (reading a 2 MiB cluster on every open costs more than the rest of
    /// `info`); otherwise, or when anything reaches past it, the whole cluster. Parsing either gives the same result.
    static func headerArea(file: HostFile, header h: Qcow2Header) throws -> [UInt8] {
        let short = 4096
        guard h.clusterSize > UInt64(short), UInt64(h.headerLength) <= UInt64(short) else {
            return try file.readBytes(at: 0, count: Int(h.clusterSize))
        }
        let area = try file.readBytes(at: 0, count: short)
        if h.extensionsEnd <= UInt64(short) { return area }
        var offset = UInt64(h.headerLength)
        // Each step moves past at least one 8-byte extension header, so the walk ends within short/8 steps.
        while offset + 8 <= UInt64(short) {
            let type = UInt32(area[Int(offset)]) << 24 | UInt32(area[Int(offset) + 1]) << 16
                | UInt32(area[Int(offset) + 2]) << 8 | UInt32(area[Int(offset) + 3])
            let len = UInt64(area[Int(offset) + 4]) << 24 | UInt64(area[Int(offset) + 5]) << 16
                | UInt64(area[Int(offset) + 6]) << 8 | UInt64(area[Int(offset) + 7])
            offset += 8
            guard len <= UInt64(short) - offset else { break }
            if type == Qcow2.extEnd { return area }
            offset += (len + 7) & ~7
        }
        return try file.readBytes(at: 0, count: Int(h.clusterSize))
    }

    init(request: OpenRequest) throws {
        file = request.file
        writable = request.writable
        let first = try file.readBytes(at: 0, count: Qcow2.decodedHeaderBytes)
        let h = try Qcow2Header(bytes: first)
        header = h
        // The first cluster holds the header, its extensions and the backing file name.
        let area = try Qcow2Format.headerArea(file: file, header: h)
        let knownHeaderBytes = 112
        unknownHeaderFields = h.version >= 3 && Int(h.headerLength) > knownHeaderBytes && Int(h.headerLength) <= area.count
            ? Array(area[knownHeaderBytes..<Int(h.headerLength)]) : []

        let unknown = h.incompatibleFeatures & ~Qcow2.incompatKnownMask
        if unknown != 0 {
            let seen = try? Qcow2Extensions.parse(area: area, header: h, lenient: true)
            // qemu's walk of the extensions for the feature names warns about ignored bitmaps as it goes.
            for _ in 0..<(seen?.ignoredBitmapsExtensions ?? 0) { Qcow2Format.warnIgnoredBitmaps(version: h.version) }
            let table = seen?.featureNames ?? []
            throw InstarError(.unsupported, Qcow2Extensions.unsupportedFeatureMessage(unknown, table: table),
                              errno: 95 /* ENOTSUP */)
        }
        if h.incompatibleFeatures & Qcow2.incompatCorrupt != 0 && request.writable && !request.options.check {
            throw InstarError(.permission, "qcow2: Image is corrupt; cannot be opened read/write", errno: EACCES)
        }
        try h.validateLayout(forCheck: request.options.check)
        let l1 = try Qcow2Mapper.readL1(header: h, file: file)
        // qcow2_do_open parses the driver's options once the L1 table is read (the encryption method too).
        try Qcow2RuntimeOptions.check(request.options.driverOptions, header: h)
        let ext = try Qcow2Extensions.parse(area: area, header: h)
        extensions = ext
        for _ in 0..<ext.ignoredBitmapsExtensions { Qcow2Format.warnIgnoredBitmaps(version: h.version) }
        // qcow2_do_open: unless opened only to describe the image (BDRV_O_NO_IO, qemu-img info), an AES image
        // needs its key at open and a LUKS image its crypto header extension.
        if !request.options.metadataOnly {
            if h.cryptMethod == Qcow2.cryptAES && request.options.driverOptions["encrypt.key-secret"] == nil {
                throw InstarError(.encrypted, "Parameter 'encrypt.key-secret' is required for cipher", errno: EINVAL)
            }
            if h.cryptMethod == Qcow2.cryptLUKS && ext.crypto == nil {
                throw InstarError(.invalid, "Missing CRYPTO header for crypt method 2", errno: EINVAL)
            }
        }

        // qcow2.txt: incompatible bit 2 means guest data lives in the file the data file extension names.
        if request.options.metadataOnly {
            // qemu-img info opens with BDRV_O_NO_IO and never touches the data file, nor (qemu's fix for
            // CVE-2024-4467, in Debian's 7.2) checks that data-file-raw has one.
            externalDataFile = nil
            dataFile = file
        } else if h.hasDataFile {
            guard let name = ext.dataFile else { throw InstarError.invalid("'data-file' is required for this image") }
            // qemu 7.2 opens the stored name as it is: a relative name is relative to the working directory,
            // not to the image (unlike backing file names).
            let path = name
            let df = try HostFile.open(path, writable: request.writable, direct: request.options.direct)
            try ImageLock.acquireForOpen(df, writable: request.writable, forceShare: request.options.forceShare)
            externalDataFile = df
            dataFile = df
        } else {
            if h.dataFileRaw { throw InstarError.invalid("data-file-raw requires a data file") }
            externalDataFile = nil
            dataFile = file
        }

        // Reading data needs the key (qemu opens the crypto layer unless the open is metadata-only); the
        // passphrase is looked up before the LUKS header is read, as qemu does.
        let password: [UInt8]? = h.cryptMethod != Qcow2.cryptNone && !request.options.metadataOnly
            ? try Qcow2Crypt.password(request.options) : nil
        if let c = ext.crypto {
            let len = Int(min(c.length, UInt64(Qcow2LuksInfo.headerBytes)))
            let bytes = try file.readBytes(at: c.offset, count: max(len, Qcow2LuksInfo.headerBytes))
            let luksHeader = try LuksHeader(bytes: bytes)
            let info = try Qcow2LuksInfo(bytes: bytes)
            luks = info
            if password != nil {
                crypt = try Qcow2Crypt.unlock(file: file, ext: c, header: luksHeader, info: info, options: request.options)
            } else {
                crypt = nil
            }
        } else {
            luks = nil
            // The legacy AES method has no header of its own: the passphrase is the key.
            if let pw = password, h.cryptMethod == Qcow2.cryptAES {
                crypt = try Qcow2Crypt.aes(password: pw)
            } else {
                crypt = nil
            }
        }

        // qcow2.txt: the backing file name is not NUL-terminated; qemu caps it at 1023 bytes.
        if h.backingFileOffset != 0 {
            let len = h.backingFileSize
            guard UInt64(len) <= min(UInt64(Qcow2.maxBackingNameLength), h.clusterSize - h.backingFileOffset) else {
                throw InstarError.invalid("Backing file name too long")
            }
            let bytes = try file.readBytes(at: h.backingFileOffset, count: Int(len))
            let name = Qcow2Snapshots.cString(bytes)
            // qemu keeps the name as a C string: an empty one (size 0, or a NUL first) means no backing file.
            backingReference = name.isEmpty ? nil : BackingReference(filename: name, format: ext.backingFormat)
        } else {
            backingReference = nil
        }

        // qcow2_do_open: an open for check leaves the snapshot table unread (the check reads it leniently and
        // reports what is wrong with it instead of failing).
        snapshots = request.options.check ? [] : try Qcow2Snapshots.read(header: h, file: file)
        if let b = ext.bitmaps {
            bitmaps = try Qcow2Bitmaps.read(b, header: h, file: file)
        } else {
            bitmaps = []
        }
        mapper = Qcow2Mapper(header: h, file: file, l1: l1)
        refcounts = Qcow2RefcountReader(header: h, file: file)
        decompressor = Qcow2Decompressor(type: h.compressionType)
        // qcow2_do_open loads every bitmap, read-only opens included: a broken table fails the open.
        liveBitmaps = try Qcow2LiveBitmap.load(bitmaps, file: file, clusterSize: h.clusterSize,
                                               virtualSize: h.size / 512 * 512)
        if !writable {
            // qcow2_signal_corruption on an image opened read-only: not fatal (nothing is marked), and said once
            // per open image, before the request fails with EIO.
            let told = readCorruptionTold
            let event: (String) -> Void = { message in
                guard told.exchange(1) == 0 else { return }
                Diagnostics.sink?(Diagnostics.Message(
                    "qcow2: Image is corrupt: \(message); further non-fatal corruption events will be suppressed\n",
                    prefixed: false))
            }
            mapper.onCorruption = event
            refcounts.onCorruption = event
        }
    }

    /// The writer, created on first use; read-only images refuse.
    func writeSide() throws -> Qcow2Writer {
        if let w = writer { return w }
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        let w = try Qcow2Writer(format: self)
        writer = w
        return w
    }

    /// Drops the decompressed-cluster memo (its entry may be freed and its host bytes reused by a write).
    func forgetDecompressed() {
        decompressedEntry = nil
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try checkRange(offset, UInt64(buffer.count))
        try writeSide().write(buffer, at: offset, backing: backing)
        try markBitmapsDirty(offset: offset, length: UInt64(buffer.count))
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        try checkRange(offset, length)
        try writeSide().writeZeroes(at: offset, length: length, mayUnmap: mayUnmap, backing: backing)
        try markBitmapsDirty(offset: offset, length: length)
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkRange(offset, length)
        try writeSide().discard(at: offset, length: length)
        try markBitmapsDirty(offset: offset, length: length)
    }

    /// Stores one already compressed cluster (see `Qcow2Compressor`) at guest cluster `clusterIndex`, which must
    /// not be allocated yet (qemu's compressed write path, used by convert -c).
    public func writeCompressed(clusterIndex: UInt64, compressedBytes: [UInt8]) throws {
        try writeSide().writeCompressed(clusterIndex: clusterIndex, compressedBytes: compressedBytes)
        try markBitmapsDirty(offset: try clusterIndex.multiplied(by: header.clusterSize), length: header.clusterSize)
    }

    /// A compressor for this image's compression type.
    public func makeCompressor() -> Qcow2Compressor {
        Qcow2Compressor(type: header.compressionType, clusterSize: Int(header.clusterSize))
    }

    public func flush() throws {
        try writer?.flush()
    }

    public func close() throws {
        try storeBitmaps()
        if let w = writer {
            writer = nil
            try w.close()
        }
        try markCleanOnClose()
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64) throws {
        let size = virtualSize
        guard offset <= size, length <= size - offset else {
            throw InstarError(.range, "Request of \(length) bytes at offset \(offset) is beyond the end of the image (\(size) bytes)",
                              errno: EINVAL)
        }
    }

    private func refuseEncrypted() throws {
        if encrypted && crypt == nil {
            throw InstarError(.encrypted, "Parameter 'encrypt.key-secret' is required for cipher", errno: EINVAL)
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        if buffer.isEmpty { return }
        try refuseEncrypted()
        var done = 0
        while done < buffer.count {
            let guest = try offset.adding(UInt64(done))
            let want = UInt64(buffer.count - done)
            let run = try mapper.lookup(guest, maxBytes: want)
            let n = Int(min(max(run.length, 1), want))
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            switch run.kind {
            case .normal:
                if let c = crypt {
                    try c.readDecrypted(dataFile, into: dst, at: run.hostOffset, guest: guest)
                } else {
                    try dataFile.readZeroPadded(into: dst, at: run.hostOffset)
                }
            case .zeroPlain, .zeroAlloc:
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocatedPlain, .unallocatedAlloc:
                if let b = backing {
                    try b.read(into: dst, at: guest)
                } else {
                    dst.initializeMemory(as: UInt8.self, repeating: 0)
                }
            case .compressed:
                let inCluster = Int(guest & (header.clusterSize - 1))
                let cluster = try decompressedCluster(entry: run.hostOffset)
                let m = min(n, cluster.count - inCluster)
                cluster.withUnsafeBytes { src in
                    if let s = src.baseAddress, let d = dst.baseAddress { memcpy(d, s + inCluster, m) }
                }
            }
            done += n
        }
    }

    /// The cluster a compressed L2 entry describes, inflated (and kept until the next one).
    private func decompressedCluster(entry: UInt64) throws -> [UInt8] {
        if decompressedEntry == entry { return decompressed }
        let d = Qcow2CompressedDescriptor(entry: entry, clusterBits: header.clusterBits)
        let fileSize = try file.size()
        guard d.hostOffset < fileSize else {
            throw InstarError(.corrupt, "Compressed cluster at \(hex(d.hostOffset)) lies past the end of the image",
                              errno: EIO)
        }
        let buffers = Int(d.length) + Int(header.clusterSize)
        let out = try CallBudget.withReserved(buffers, what: "the decompression buffers of a compressed cluster") {
            let input = try file.readBytes(at: d.hostOffset, count: Int(d.length))
            var out = [UInt8](repeating: 0, count: Int(header.clusterSize))
            try input.withUnsafeBytes { src in
                try out.withUnsafeMutableBytes { dst in try decompressor.decompress(src, into: dst) }
            }
            return out
        }
        decompressed = out
        decompressedEntry = entry
        return out
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        if metadataPreallocated == nil {
            // qcow2_co_block_status takes a failed detection (a damaged refcount structure) as "no": the status
            // is still answered. A call limit still stops the call.
            do {
                metadataPreallocated = try refcounts.looksMetadataPreallocated()
            } catch let e as InstarError where e.code == .limit {
                throw e
            } catch {
                metadataPreallocated = false
            }
        }
        let run = try mapper.lookup(offset, maxBytes: min(length, UInt64(Int32.max)))
        let len = max(run.length, 1)
        var status: BlockStatus
        switch run.kind {
        case .normal:
            status = BlockStatus(length: len, allocated: true, data: true, zero: false)
            if !encrypted {
                status.hostOffset = run.hostOffset
                status.hostFile = dataFile.path
                status.recurse = metadataPreallocated ?? false
            }
        case .zeroAlloc:
            status = BlockStatus(length: len, allocated: true, data: false, zero: true)
            if !encrypted {
                status.hostOffset = run.hostOffset
                status.hostFile = dataFile.path
            }
        case .zeroPlain:
            status = BlockStatus(length: len, allocated: true, data: false, zero: true)
        case .compressed:
            status = BlockStatus(length: len, allocated: true, data: true, zero: false)
        case .unallocatedPlain:
            status = .unallocated(len)
        case .unallocatedAlloc:
            // Not allocated (the backing file decides), yet qemu reports where the host cluster is.
            status = .unallocated(len)
            if !encrypted {
                status.hostOffset = run.hostOffset
                status.hostFile = dataFile.path
            }
        }
        return status
    }

    public func formatInfo() throws -> FormatInfo {
        var data: [(String, QObject)] = []
        let encrypt: QObject?
        switch header.cryptMethod {
        case Qcow2.cryptAES: encrypt = .dict([("format", .string("aes"))])
        case Qcow2.cryptLUKS: encrypt = luks?.qobject
        default: encrypt = nil
        }
        let refcountBits = Int64(1) << Int64(header.refcountOrder)
        // Members in the QAPI order of ImageInfoSpecificQCow2 (qapi/block-core.json, QEMU 7.2).
        if header.version == 2 {
            data.append(("compat", .string("0.10")))
            data.append(("refcount-bits", .int(refcountBits)))
            if let e = encrypt { data.append(("encrypt", e)) }
        } else {
            data.append(("compat", .string("1.1")))
            if let df = extensions.dataFile { data.append(("data-file", .string(df))) }
            if header.hasDataFile { data.append(("data-file-raw", .bool(header.dataFileRaw))) }
            data.append(("extended-l2", .bool(header.extendedL2)))
            data.append(("lazy-refcounts", .bool(header.compatibleFeatures & Qcow2.compatLazyRefcounts != 0)))
            data.append(("corrupt", .bool(header.incompatibleFeatures & Qcow2.incompatCorrupt != 0)))
            data.append(("refcount-bits", .int(refcountBits)))
            if let e = encrypt { data.append(("encrypt", e)) }
            if !bitmaps.isEmpty { data.append(("bitmaps", .list(bitmaps.map { $0.info }))) }
        }
        data.append(("compression-type", .string(header.compressionType == Qcow2.compressionZstd ? "zstd" : "zlib")))
        return FormatInfo(clusterSize: header.clusterSize,
                          dirty: header.incompatibleFeatures & Qcow2.incompatDirty != 0,
                          encrypted: encrypted ? true : nil,
                          snapshots: snapshots,
                          formatSpecific: .dict([("type", .string("qcow2")), ("data", .dict(data))]))
    }
}

extension Qcow2Format: HostCopyWritable {
    public func writeCopying(from source: HostFile, at sourceOffset: UInt64, length: UInt64, to offset: UInt64,
                             backing: GuestReader?) throws -> Bool {
        // Encrypted clusters are not the guest bytes; a window or a remote file has no descriptor of its own to
        // copy into or from.
        guard !encrypted, length > 0, source.fd >= 0, dataFile.fd >= 0, dataFile.hostLocation(0).file === dataFile,
              source.hostLocation(0).file === source else { return false }
        try checkRange(offset, length)
        try writeSide().write(.host(source, sourceOffset), count: length, at: offset, backing: backing)
        try markBitmapsDirty(offset: offset, length: length)
        return true
    }
}
