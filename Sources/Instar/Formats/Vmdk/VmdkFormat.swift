import CZlib
import Glibc

/// vmdk (VMware's virtual disk), read and written as qemu 7.2's block/vmdk.c does: monolithicSparse and
/// streamOptimized images (a hosted sparse extent with its descriptor inside), and descriptor files naming
/// FLAT, SPARSE, VMFS, VMFSSPARSE (COWD) and SESPARSE extents (monolithicFlat, twoGbMaxExtent*, vmfs,
/// vmfsSparse, seSparse), with parent links (parentFileNameHint) as backing files. seSparse extents are read
/// only, as in qemu.
public final class VmdkFormat: ImageFormat {
    public static let descriptor = FormatDescriptor(
        name: "vmdk",
        probe: { header, _ in probe(header) },
        open: { try VmdkFormat(request: $0) })
        // qemu's driver takes only its extents' options (extents.N.*): others fail the open.
        .knowing { $0.hasPrefix("extents.") }

    /// qemu's DESC_SIZE: the descriptor window CID and parent lookups read.
    static let descWindow = 20 * 512

    public let formatName = "vmdk"
    let file: HostFile
    var extents: [VmdkExtent] = []
    /// Where the descriptor lives in `file` (0x200 in a sparse extent, 0 in a descriptor file).
    var descOffset: UInt64 = 0
    var createType: String?
    var cid: UInt32 = 0
    var parentCID: UInt32 = 0
    public private(set) var backingReference: BackingReference?
    let writable: Bool
    var cidUpdated = false
    var cidChecked = false
    /// Extent files opened besides the image file (locked, closed with the image).
    var extraFiles: [HostFile] = []

    public var hostFiles: [HostFile] { [file] + extraFiles }
    public var virtualSize: UInt64 { (extents.last?.endSector ?? 0) * 512 }

    init(request: OpenRequest) throws {
        file = request.file
        writable = request.writable
        // bdrv_getlength: whole sectors.
        let size = try (try file.size()).alignedUp(512)
        if size < 4 { throw InstarError(.invalid, "File is too small, not a valid image", errno: EINVAL) }
        let magic = try ByteReader(try file.readBytes(at: 0, count: 4)).u32be(at: 0)
        var parsedCreateType: String?
        if magic == VmdkExtent.magicVMDK3 || magic == VmdkExtent.magicVMDK4 {
            try openSparse(file: file, isImageFile: true, magic: magic, request: request, createType: &parsedCreateType)
            descOffset = 0x200
        } else {
            // A descriptor file: its text, up to 1 MiB.
            let head = try file.readMetadata(at: 0, count: Int(min(size, UInt64(VmdkDescriptor.maxBytes))),
                                             what: "the descriptor")
            try openDescriptorFile(VmdkDescriptor(bytes: head), request: request, createType: &parsedCreateType)
            descOffset = 0
        }
        createType = parsedCreateType
        // refresh_total_sectors: the image may not exceed BDRV_MAX_LENGTH.
        let maxLength = UInt64(Int64.max) & ~((UInt64(1) << 30) - 1)
        if let last = extents.last, last.endSector > maxLength / 512 {
            throw InstarError(.range, "Could not refresh total sector count: File too large", errno: EFBIG)
        }
        // vmdk_parent_open and vmdk_read_cid read the descriptor window at descOffset.
        let window = try file.readBytes(at: descOffset, count: VmdkFormat.descWindow)
        // Failures here carry no message of their own: the block layer words them.
        let openFailed = InstarError(.invalid, "Could not open '\(request.filename)': Invalid argument", errno: EINVAL)
        let parentText = VmdkDescriptor(bytes: window)
        let hint: String?
        do { hint = try parentText.parentFileNameHint() } catch { throw openFailed }
        if let hint = hint {
            backingReference = BackingReference(filename: hint, format: "vmdk")
        } else {
            backingReference = nil
        }
        var cidWindow = window
        cidWindow[cidWindow.count - 1] = 0
        let cidText = VmdkDescriptor(bytes: cidWindow)
        guard let c = cidText.cid(parent: false), let pc = cidText.cid(parent: true) else { throw openFailed }
        cid = c
        parentCID = pc
    }

    // MARK: Opening

    /// vmdk_open_sparse: a COWD or KDMV extent in `file`.
    private func openSparse(file: HostFile, isImageFile: Bool, magic: UInt32, request: OpenRequest,
                            createType: inout String?, nested: Bool = false) throws {
        switch magic {
        case VmdkExtent.magicVMDK3: try openCOWD(file: file, isImageFile: isImageFile)
        case VmdkExtent.magicVMDK4:
            try openVMDK4(file: file, isImageFile: isImageFile, request: request, createType: &createType,
                          nested: nested)
        default: throw InstarError(.invalid, "Image not in VMDK format", errno: EINVAL)
        }
    }

    private var nextStartSector: UInt64 { extents.last?.endSector ?? 0 }

    /// vmdk_open_vmfs_sparse.
    private func openCOWD(file: HostFile, isImageFile: Bool) throws {
        let b = try file.readBytes(at: 4, count: 40)
        let r = ByteReader(b)
        let diskSectors = UInt64(try r.u32le(at: 8))
        let granularity = UInt64(try r.u32le(at: 12))
        let l1Offset = UInt64(try r.u32le(at: 16)) << 9
        let l1Size = try r.u32le(at: 20)
        let e = try VmdkExtent(file: file, isImageFile: isImageFile, kind: .cowd, sectors: diskSectors,
                               startSector: nextStartSector, l1Offset: l1Offset, l1BackupOffset: 0, l1Size: l1Size,
                               l2Size: 4096, clusterSectors: granularity)
        try e.readTables()
        extents.append(e)
    }

    /// vmdk_open_se_sparse: a read-only ESXi seSparse extent. Its headers are checked strictly (the format is
    /// not documented), and the one grain size and grain table size qemu knows are required.
    private func openSeSparse(file: HostFile, request: OpenRequest) throws {
        // qemu-img never opens with auto-read-only, so a writable open is refused before anything is read; a
        // commit base is reopened read/write after a read-only open, which qemu lets through (writes then fail).
        if request.writable && !request.options.reopenedWritable {
            throw InstarError(.permission, "No write support for seSparse images available", errno: EACCES)
        }
        let c = try SeSparseConstHeader(try readHeaderSector(file, at: 0, what: "const header"))
        try c.validate()
        // qemu multiplies the sector number by 512 in 64 bits without a check.
        let volatileAt = c.volatileHeaderOffset &* 512
        let v = try SeSparseVolatileHeader(try readHeaderSector(file, at: volatileAt, what: "volatile header"))
        try v.validate()
        // vmdk_add_extent takes the capacity as a signed sector count and the directory size as a 32-bit
        // entry count; both are narrowed as qemu narrows them, and then bounded.
        let l1Size = UInt32(truncatingIfNeeded: (c.grainDirSize &* 512) / 8)
        let e = try VmdkExtent(file: file, isImageFile: false, kind: .seSparse, sectors: c.capacity,
                               startSector: nextStartSector, l1Offset: c.grainDirOffset &* 512, l1BackupOffset: 0,
                               l1Size: l1Size, l2Size: UInt32(truncatingIfNeeded: (c.grainTableSize &* 512) / 8),
                               clusterSectors: c.grainSize)
        e.seL2TablesOffset = c.grainTablesOffset
        e.seClustersOffset = c.grainsOffset
        try e.readTables()
        extents.append(e)
    }

    /// One 512-byte header of a seSparse extent (zero-padded past the end of the file, as qemu's reads are).
    private func readHeaderSector(_ file: HostFile, at offset: UInt64, what: String) throws -> [UInt8] {
        // bdrv_pread refuses an offset past BDRV_MAX_LENGTH (or negative as a signed number) with EIO.
        guard offset <= VmdkFormat.maxLength - 512 else {
            throw InstarError(.io, "Could not read \(what) from file '\(file.path)': Input/output error", errno: EIO)
        }
        return try file.readBytes(at: offset, count: 512)
    }

    /// qemu's BDRV_MAX_LENGTH: INT64_MAX rounded down to a whole GiB.
    static let maxLength = UInt64(Int64.max) & ~((UInt64(1) << 30) - 1)

    /// vmdk_open_vmdk4.
    private func openVMDK4(file: HostFile, isImageFile: Bool, request: OpenRequest, createType: inout String?,
                           nested: Bool) throws {
        var h = try Vmdk4Header(try file.readBytes(at: 4, count: Vmdk4Header.size))
        if h.capacity == 0 && h.descOffset != 0 {
            // A descriptor inside a sparse file that has no data of its own.
            guard !nested, h.descOffset <= UInt64(Int64.max) >> 9 else {
                throw InstarError(.invalid, "Invalid VMDK descriptor nesting", errno: EINVAL)
            }
            let size = try file.size()
            let buf = try file.readMetadata(at: h.descOffset << 9, count: Int(min(size, UInt64(VmdkDescriptor.maxBytes))),
                                            what: "the embedded descriptor")
            try openDescriptorFile(VmdkDescriptor(bytes: buf), request: request, createType: &createType,
                                   nested: true)
            return
        }
        if createType == nil { createType = "monolithicSparse" }
        let fileSize = try file.size()
        if h.gdOffset == VmdkExtent.gdAtEnd {
            // The footer (one sector before the end-of-stream marker) overrides the header.
            let total = fileSize.divCeil(512) * 512
            guard total >= 1536 else { throw InstarError(.invalid, "Invalid footer", errno: EINVAL) }
            let f = try file.readBytes(at: total - 1536, count: 1536)
            let r = ByteReader(f)
            guard try r.u32be(at: 512) == VmdkExtent.magicVMDK4, try r.u32le(at: 8) == 0, try r.u32le(at: 12) == 3,
                  try r.u64le(at: 1024) == 0, try r.u32le(at: 1032) == 0, try r.u32le(at: 1036) == 0 else {
                throw InstarError(.invalid, "Invalid footer", errno: EINVAL)
            }
            h = try Vmdk4Header(Array(f[516..<(516 + Vmdk4Header.size)]))
        }
        let compressed = h.compressAlgorithm == 1
        if h.version > 3 {
            throw InstarError(.unsupported, "Unsupported VMDK version \(h.version)", errno: ENOTSUP)
        } else if h.version == 3 && request.writable && !compressed {
            throw InstarError(.invalid, "VMDK version 3 must be read only", errno: EINVAL)
        }
        if h.numGTEsPerGT > 512 { throw InstarError(.invalid, "L2 table size too big", errno: EINVAL) }
        let l1EntrySectors = UInt32(truncatingIfNeeded: UInt64(h.numGTEsPerGT) &* h.granularity)
        if l1EntrySectors == 0 { throw InstarError(.invalid, "L1 entry size is invalid", errno: EINVAL) }
        let l1Size = UInt32(truncatingIfNeeded: (h.capacity &+ UInt64(l1EntrySectors) &- 1) / UInt64(l1EntrySectors))
        var l1Backup: UInt64 = 0
        if h.flags & VmdkExtent.flagRGD != 0 { l1Backup = h.rgdOffset &<< 9 }
        if fileSize.divCeil(512) < h.grainOffset {
            throw InstarError(.invalid, "File truncated, expecting at least \(Int64(bitPattern: h.grainOffset &* 512)) bytes",
                              errno: EINVAL)
        }
        let e = try VmdkExtent(file: file, isImageFile: isImageFile, kind: .vmdk4, sectors: h.capacity,
                               startSector: nextStartSector, l1Offset: h.gdOffset &<< 9, l1BackupOffset: l1Backup,
                               l1Size: l1Size, l2Size: h.numGTEsPerGT, clusterSectors: h.granularity)
        e.compressed = compressed
        if compressed { createType = "streamOptimized" }
        e.hasMarker = h.flags & VmdkExtent.flagMarker != 0
        e.version = h.version
        e.hasZeroGrain = h.flags & VmdkExtent.flagZeroGrain != 0
        try e.readTables()
        extents.append(e)
    }

    /// vmdk_open_desc_file and vmdk_parse_extents.
    private func openDescriptorFile(_ d: VmdkDescriptor, request: OpenRequest, createType: inout String?,
                                    nested: Bool = false) throws {
        guard let ct = d.quotedValue("createType", limit: 128) else {
            throw InstarError(.invalid, "invalid VMDK image descriptor", errno: EINVAL)
        }
        guard ["monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse",
               "twoGbMaxExtentFlat"].contains(ct) else {
            throw InstarError(.unsupported, "Unsupported image type '\(ct)'", errno: ENOTSUP)
        }
        createType = ct
        for line in try d.extentLines() {
            let path = line.fileName.hasPrefix("/") ? line.fileName
                : ImageOpener.resolveBackingName(line.fileName, relativeTo: file.path)
            let ef = try HostFile.open(path, writable: request.writable, direct: request.options.direct)
            do {
                try ImageLock.acquireForOpen(ef, writable: request.writable, forceShare: request.options.forceShare)
            }
            ef.noFlush = request.options.noFlush
            extraFiles.append(ef)
            let sectors = UInt64(line.sectors)
            switch line.type {
            case "FLAT", "VMFS":
                let e = try VmdkExtent(file: ef, isImageFile: false, kind: .flat, sectors: sectors,
                                       startSector: nextStartSector, l1Offset: 0, l1BackupOffset: 0, l1Size: 0,
                                       l2Size: 0, clusterSectors: 0)
                // qemu shifts without a check; reads past the host file's range then fail.
                e.flatStartOffset = UInt64(line.flatOffset) &<< 9
                e.typeName = line.type
                extents.append(e)
            case "SPARSE", "VMFSSPARSE":
                let size = try (try ef.size()).alignedUp(512)
                if size < 4 { throw InstarError(.invalid, "File is too small, not a valid image", errno: EINVAL) }
                let magic = try ByteReader(try ef.readBytes(at: 0, count: 4)).u32be(at: 0)
                var ignored = createType
                try openSparse(file: ef, isImageFile: false, magic: magic, request: request, createType: &ignored,
                               nested: true)
                extents.last?.typeName = line.type
            case "SESPARSE":
                try openSeSparse(file: ef, request: request)
                extents.last?.typeName = line.type
            default:
                throw InstarError(.unsupported, "Unsupported extent type '\(line.type)'", errno: ENOTSUP)
            }
        }
    }


    // MARK: Reading

    /// find_extent.
    func extent(forSector s: UInt64) -> VmdkExtent? {
        // Extents are in guest order: a binary search over their ends.
        var lo = 0
        var hi = extents.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if s < extents[mid].endSector { hi = mid } else { lo = mid + 1 }
        }
        return lo < extents.count ? extents[lo] : nil
    }

    /// vmdk_is_cid_valid: the backing file must be a vmdk whose current CID is this image's parentCID, or
    /// reads that reach it fail. Checked once per open.
    func checkParentCID(_ backing: GuestReader) throws {
        if cidChecked { return }
        guard let layer = backing as? ImageLayer, let parent = layer.format as? VmdkFormat,
              let current = try? parent.currentCID(), current == parentCID else {
            throw InstarError(.invalid, "Invalid argument", errno: EINVAL)
        }
        cidChecked = true
    }

    /// vmdk_read_cid on the descriptor as it is now in the file.
    func currentCID() throws -> UInt32? {
        var window = try file.readBytes(at: descOffset, count: VmdkFormat.descWindow)
        window[window.count - 1] = 0
        return VmdkDescriptor(bytes: window).cid(parent: false)
    }

    static func ioError() -> InstarError { InstarError(.io, "Input/output error", errno: EIO) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        var done = 0
        var pos = offset
        while done < buffer.count {
            guard let e = extent(forSector: pos >> 9) else { throw VmdkFormat.ioError() }
            let (l, _) = try e.lookup(pos)
            if l == .error { throw VmdkFormat.ioError() }
            let inCluster = e.offsetInCluster(pos)
            let n = Int(min(UInt64(buffer.count - done), e.clusterBytes - inCluster))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            switch l {
            case .error:
                throw VmdkFormat.ioError()
            case .allocated(let host):
                try e.readGrain(into: part, clusterOffset: host, inCluster: inCluster)
            case .unallocated:
                if let b = backing {
                    try checkParentCID(b)
                    try b.read(into: part, at: pos)
                } else {
                    part.initializeMemory(as: UInt8.self, repeating: 0)
                }
            case .zeroed:
                part.initializeMemory(as: UInt8.self, repeating: 0)
            }
            done += n
            pos += UInt64(n)
        }
    }

    /// vmdk_co_block_status.
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        guard let e = extent(forSector: offset >> 9) else { throw VmdkFormat.ioError() }
        let (l, _) = try e.lookup(offset)
        if l == .error { throw VmdkFormat.ioError() }
        let inCluster = e.offsetInCluster(offset)
        // qemu answers one grain at a time; runs of grains in the same state are answered at once (map and
        // convert merge them anyway), so a huge sparse image is not walked grain by grain.
        let n = try e.runLength(from: offset, first: l, limit: length)
        switch l {
        case .error: throw VmdkFormat.ioError()
        case .unallocated: return .unallocated(n)
        case .zeroed: return BlockStatus(length: n, allocated: true, data: false, zero: true)
        case .allocated(let host):
            if e.compressed { return BlockStatus(length: n, allocated: true, data: true, zero: false, hostFile: e.file.path) }
            return BlockStatus(length: n, allocated: true, data: true, zero: false, hostOffset: host &+ inCluster,
                               hostFile: e.file.path, recurse: e.isFlat)
        }
    }

    public func allocatedFileSize() -> UInt64? {
        var total = (try? file.allocatedSize()) ?? 0
        for f in extraFiles { total += (try? f.allocatedSize()) ?? 0 }
        return total
    }

    // MARK: Info

    public func formatInfo() throws -> FormatInfo {
        // vmdk_get_info fails (ENOTSUP) when the extents are not all of one kind, and qemu-img then prints
        // neither a cluster size nor a dirty flag.
        var clusterSize: UInt64?
        var dirty: Bool? = false
        if let first = extents.first {
            let same = extents.allSatisfy { $0.isFlat == first.isFlat && $0.compressed == first.compressed
                && ($0.isFlat || $0.clusterSectors == first.clusterSectors) }
            if !same {
                dirty = nil
            } else if !first.isFlat {
                clusterSize = first.clusterBytes
            }
        }
        var list: [QObject] = []
        for e in extents {
            var m: [(String, QObject)] = [
                ("filename", .string(e.file.path)),
                ("format", .string(e.typeName ?? "")),
                ("virtual-size", .int(Int64(e.sectors * 512))),
            ]
            if !e.isFlat { m.append(("cluster-size", .int(Int64(e.clusterBytes)))) }
            if e.compressed { m.append(("compressed", .bool(true))) }
            list.append(.dict(m))
        }
        let data: [(String, QObject)] = [
            ("create-type", .string(createType ?? "")),
            ("cid", .int(Int64(cid))),
            ("parent-cid", .int(Int64(parentCID))),
            ("extents", .list(list)),
        ]
        return FormatInfo(clusterSize: clusterSize, dirty: dirty,
                          formatSpecific: .dict([("type", .string("vmdk")), ("data", .dict(data))]))
    }

    // MARK: Probing

    /// vmdk_probe: a sparse extent magic, or a text descriptor whose first line that is not a comment or blank
    /// is "version=1", "version=2" or "version=3" (LF or CRLF).
    static func probe(_ buf: [UInt8]) -> Int {
        if buf.count < 4 { return 0 }
        if let m = try? ByteReader(buf).u32be(at: 0), m == VmdkExtent.magicVMDK3 || m == VmdkExtent.magicVMDK4 {
            return 100
        }
        func byte(_ i: Int) -> UInt8? { i >= 0 && i < buf.count ? buf[i] : nil }
        func has(_ text: String, at offset: Int) -> Bool {
            let bytes = Array(text.utf8)
            guard offset >= 0, buf.count >= offset + bytes.count else { return false }
            return buf[offset..<(offset + bytes.count)].elementsEqual(bytes)
        }
        let newline = UInt8(ascii: "\n")
        let space = UInt8(ascii: " ")
        var p = 0
        while let c = byte(p) {
            if c == UInt8(ascii: "#") {
                while let d = byte(p), d != newline { p += 1 }
                p += 1
                continue
            }
            if c == space {
                while byte(p) == space { p += 1 }
                if byte(p) == UInt8(ascii: "\r") { p += 1 }
                if byte(p) != newline { return 0 }
                p += 1
                continue
            }
            for v in ["1", "2", "3"] where has("version=\(v)\n", at: p) || has("version=\(v)\r\n", at: p) {
                return 100
            }
            return 0
        }
        return 0
    }
}
