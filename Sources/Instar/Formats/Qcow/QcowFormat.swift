import Glibc

/// qcow (version 1), as qemu 7.2's block/qcow.c handles it: a 48-byte header, the backing file name after it,
/// an L1 table of L2 table offsets, L2 tables of cluster offsets (0: unallocated; bit 63: a zlib-compressed
/// cluster), everything appended at the end of the file in allocation order. Optionally encrypted with the
/// legacy AES-CBC method (the cipher is shared with qcow2's, see `Qcow2Crypt`). No check, resize or amend.
public final class QcowFormat: ImageFormat {
    public static let descriptor = FormatDescriptor(
        name: "qcow",
        probe: { header, _ in
            // qcow_probe: the magic and version 1 in a buffer at least as long as the header.
            let r = ByteReader(header)
            guard header.count >= QcowHeader.size, let magic = try? r.u32be(at: 0), magic == QcowHeader.magic,
                  let version = try? r.u32be(at: 4), version == QcowHeader.version else { return 0 }
            return 100
        },
        open: { try QcowFormat(request: $0) })
        // qemu's driver takes only the encryption options (encrypt.*): others fail the open.
        .knowing { $0.hasPrefix("encrypt.") }

    /// How a run of guest clusters is stored.
    enum Kind: Equatable {
        case unallocated
        /// Plain clusters from this host offset on (contiguous for the run).
        case plain(UInt64)
        /// One compressed cluster: the raw L2 entry.
        case compressed(UInt64)
    }

    /// qemu's BDRV_MAX_LENGTH: requests reaching past it fail with EIO before any I/O.
    static let maxRequestEnd: UInt64 = UInt64(Int64.max) & ~((UInt64(1) << 30) - 1)
    /// instar's bound on the L1 entries held in memory (512 MiB; 128 TiB of guest data at qemu's geometries).
    static let maxHeldL1Entries: UInt64 = 64 << 20
    /// L2 tables kept in memory (each at most 64 KiB).
    static let l2CacheLimit = 256

    public let formatName = "qcow"
    let file: HostFile
    let writable: Bool
    var header: QcowHeader
    let clusterBits: UInt64
    let cs: UInt64
    let l2Bits: UInt64
    let l2Entries: UInt64
    let l1Size: UInt64
    /// The L1 entries the file holds (entries past its end read as zero, as qemu's zero-padded read gives them).
    var l1: [UInt64]
    /// L1 entries written past `l1.count` (only a damaged image whose L1 table runs past the file end has any).
    var l1Beyond: [UInt64: UInt64] = [:]
    var cache: [UInt64: [UInt64]] = [:]
    var cacheOrder: [UInt64] = []
    /// The unlocked cipher of an encrypted image opened for I/O.
    let crypt: Qcow2Crypt?
    let encrypted: Bool
    /// The host file's length in bytes (qemu asks the file for it on each allocation).
    var fileLength: UInt64
    let decompressor = Qcow2Decompressor(type: Qcow2.compressionZlib)
    var decompressedEntry: UInt64?
    var decompressed: [UInt8] = []
    public let backingReference: BackingReference?

    public var hostFiles: [HostFile] { [file] }
    public var virtualSize: UInt64 { header.size / 512 * 512 }
    var offsetMask: UInt64 { (UInt64(1) << (63 - clusterBits)) - 1 }

    init(request: OpenRequest) throws {
        let f = request.file
        file = f
        writable = request.writable
        var raw = [UInt8](repeating: 0, count: QcowHeader.size)
        try raw.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: 0) }
        let h = try QcowHeader(bytes: raw)
        func invalid(_ m: String) -> InstarError { InstarError(.invalid, m, errno: EINVAL) }
        guard h.magic == QcowHeader.magic else { throw invalid("Image not in qcow format") }
        guard h.version == QcowHeader.version else {
            var m = "qcow (v1) does not support qcow version \(h.version)"
            if h.version == 2 || h.version == 3 { m += "\nTry the 'qcow2' driver instead." }
            throw InstarError(.unsupported, m, errno: ENOTSUP)
        }
        guard h.size > 1 else { throw invalid("Image size is too small (must be at least 2 bytes)") }
        guard h.clusterBits >= 9 && h.clusterBits <= 16 else { throw invalid("Cluster size must be between 512 and 64k") }
        guard h.l2Bits >= 6 && h.l2Bits <= 13 else { throw invalid("L2 table size must be between 512 and 64k") }
        let encryptFormat = request.options.driverOptions["encrypt.format"]?.stringValue
        if h.cryptMethod != QcowHeader.cryptNone {
            guard h.cryptMethod == QcowHeader.cryptAES else { throw invalid("invalid encryption method in qcow header") }
            if let ef = encryptFormat, ef != "aes" {
                throw invalid("Header reported 'aes' encryption format but options specify '\(ef)'")
            }
            // qemu-img info opens without I/O and needs no key.
            crypt = request.options.metadataOnly ? nil : try Qcow2Crypt.aes(password: Qcow2Crypt.password(request.options))
            encrypted = true
        } else {
            if let ef = encryptFormat {
                throw invalid("No encryption in image header, but options specified format '\(ef)'")
            }
            crypt = nil
            encrypted = false
        }
        clusterBits = UInt64(h.clusterBits)
        cs = UInt64(1) << clusterBits
        l2Bits = UInt64(h.l2Bits)
        l2Entries = UInt64(1) << l2Bits
        guard let n = QcowHeader.l1Size(size: h.size, clusterBits: h.clusterBits, l2Bits: h.l2Bits) else {
            throw invalid("Image too large")
        }
        l1Size = n
        header = h
        fileLength = try f.size()
        // Only the part of the L1 table that lies in the file is held; the rest reads as zeroes.
        let inFile: UInt64 = h.l1TableOffset < fileLength ? (fileLength - h.l1TableOffset).divCeil(8) : 0
        let held = min(n, inFile)
        guard held <= QcowFormat.maxHeldL1Entries else {
            throw InstarError(.unsupported, "qcow L1 tables of \(held) entries are larger than instar supports",
                              errno: ENOTSUP)
        }
        // A failed read fails the open with the generic message of qemu's bdrv_open_driver.
        func openRead(_ body: () throws -> Void) throws {
            do {
                try body()
            } catch let e as InstarError {
                let err = e.errnoValue != 0 ? e.errnoValue : EIO
                throw InstarError(.io, "Could not open '\(request.filename)': \(strerrorString(err))", errno: err)
            }
        }
        try CallBudget.reserve(count: held, of: 8, what: "the L1 table")
        var table = [UInt64](repeating: 0, count: Int(held))
        try openRead {
            try QcowFormat.checkRequest(h.l1TableOffset, n * 8)
            try table.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: h.l1TableOffset) }
        }
        for i in table.indices { table[i] = UInt64(bigEndian: table[i]) }
        l1 = table
        if h.backingFileOffset != 0 {
            let len = h.backingFileSize
            guard len <= QcowHeader.maxBackingNameLength else { throw invalid("Backing file name too long") }
            var name = [UInt8](repeating: 0, count: Int(len))
            try openRead {
                try QcowFormat.checkRequest(h.backingFileOffset, UInt64(len))
                try name.withUnsafeMutableBytes { try f.readZeroPadded(into: $0, at: h.backingFileOffset) }
            }
            if let nul = name.firstIndex(of: 0) { name = Array(name[..<nul]) }
            backingReference = name.isEmpty ? nil
                : BackingReference(filename: String(decoding: name, as: UTF8.self), format: nil)
        } else {
            backingReference = nil
        }
    }

    /// qemu's request checks (bdrv_check_request): a request reaching past BDRV_MAX_LENGTH fails with EIO.
    static func checkRequest(_ offset: UInt64, _ bytes: UInt64) throws {
        guard offset <= maxRequestEnd, bytes <= maxRequestEnd - offset else { throw ioError() }
    }

    static func ioError() -> InstarError { InstarError(.io, strerrorString(EIO), errno: EIO) }

    // MARK: tables

    func l1Entry(_ index: UInt64) -> UInt64 {
        index < UInt64(l1.count) ? l1[Int(index)] : (l1Beyond[index] ?? 0)
    }

    func setL1Entry(_ index: UInt64, _ value: UInt64) {
        if index < UInt64(l1.count) { l1[Int(index)] = value } else { l1Beyond[index] = value }
    }

    func l2Table(at offset: UInt64) throws -> [UInt64] {
        if let t = cache[offset] { return t }
        try QcowFormat.checkRequest(offset, l2Entries * 8)
        if cache.count < QcowFormat.l2CacheLimit {
            try CallBudget.reserve(count: l2Entries, of: 8, what: "the L2 table cache")
        }
        var t = [UInt64](repeating: 0, count: Int(l2Entries))
        try t.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: offset) }
        for i in t.indices { t[i] = UInt64(bigEndian: t[i]) }
        storeCached(offset, t)
        return t
    }

    func storeCached(_ offset: UInt64, _ table: [UInt64]) {
        if cache[offset] == nil {
            cacheOrder.append(offset)
            while cacheOrder.count > QcowFormat.l2CacheLimit { cache[cacheOrder.removeFirst()] = nil }
        }
        cache[offset] = table
    }

    /// The run of clusters from guest offset `pos` stored alike, at most `len` bytes, within one L2 table.
    func findRun(_ pos: UInt64, _ len: UInt64) throws -> (Kind, UInt64) {
        let l1Shift = clusterBits + l2Bits
        let l1Index = pos >> l1Shift
        guard l1Index < l1Size else { throw QcowFormat.ioError() }
        let spanEnd = (l1Index + 1) << l1Shift
        let into = pos & (cs - 1)
        var len = min(len, spanEnd &- pos)
        let l2Offset = l1Entry(l1Index)
        if l2Offset == 0 { return (.unallocated, len) }
        let table = try l2Table(at: l2Offset)
        let index = (pos >> clusterBits) & (l2Entries - 1)
        let first = table[Int(index)]
        if first & QcowHeader.compressedFlag != 0 { return (.compressed(first), min(len, cs - into)) }
        let want = (into + len).divCeil(cs)
        let end = min(index + want, l2Entries)
        var last = first
        var i = index + 1
        while i < end {
            let e = table[Int(i)]
            if first == 0 {
                if e != 0 { break }
            } else if e & QcowHeader.compressedFlag != 0 || e != last &+ cs {
                break
            }
            last = e
            i += 1
        }
        len = min(len, (i - index) * cs - into)
        return first == 0 ? (.unallocated, len) : (.plain(first), len)
    }

    // MARK: reading

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        var done: UInt64 = 0
        let total = UInt64(buffer.count)
        while done < total {
            let pos = offset + done
            let (kind, len) = try findRun(pos, total - done)
            guard len > 0 else { throw QcowFormat.ioError() }
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(done)..<Int(done + len)])
            switch kind {
            case .unallocated:
                if let b = backing {
                    try b.read(into: part, at: pos)
                } else {
                    part.initializeMemory(as: UInt8.self, repeating: 0)
                }
            case .compressed(let entry):
                try decompressCluster(entry)
                let into = Int(pos & (cs - 1))
                decompressed.withUnsafeBytes { src in
                    part.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[into..<(into + part.count)]))
                }
            case .plain(let host):
                // qemu refuses data clusters that are not sector aligned.
                guard host & 511 == 0 else { throw QcowFormat.ioError() }
                let at = try host.adding(pos & (cs - 1))
                try QcowFormat.checkRequest(at, len)
                if let c = crypt {
                    try c.readDecrypted(file, into: part, at: at, guest: pos)
                } else if encrypted {
                    throw InstarError(.encrypted, "Parameter 'encrypt.key-secret' is required for cipher", errno: EINVAL)
                } else {
                    try file.readZeroPadded(into: part, at: at)
                }
            }
            done += len
        }
    }

    /// Inflates the compressed cluster of L2 entry `entry` into `decompressed` (qemu's decompress_cluster,
    /// which keeps the last one).
    func decompressCluster(_ entry: UInt64) throws {
        if decompressedEntry == entry { return }
        let offset = entry & offsetMask
        let csize = (entry >> (63 - clusterBits)) & (cs - 1)
        guard offset <= QcowFormat.maxRequestEnd, csize <= QcowFormat.maxRequestEnd - offset else {
            throw QcowFormat.ioError()
        }
        let buffers = csize.addingReportingOverflow(cs)
        try CallBudget.reserve(count: buffers.overflow ? UInt64.max : buffers.partialValue, of: 1,
                               what: "the decompression buffers of a compressed cluster")
        defer { CallBudget.release(Int(csize + cs)) }
        var input = [UInt8](repeating: 0, count: Int(csize))
        try input.withUnsafeMutableBytes { try file.readZeroPadded(into: $0, at: offset) }
        var out = [UInt8](repeating: 0, count: Int(cs))
        do {
            try input.withUnsafeBytes { i in try out.withUnsafeMutableBytes { try decompressor.decompress(i, into: $0) } }
        } catch {
            throw QcowFormat.ioError()
        }
        decompressed = out
        decompressedEntry = entry
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        let (kind, len) = try findRun(offset, length)
        let n = max(len, 1)
        switch kind {
        case .unallocated:
            return .unallocated(n)
        case .compressed:
            return BlockStatus(length: n, allocated: true, data: true, zero: false)
        case .plain(let host):
            if encrypted { return BlockStatus(length: n, allocated: true, data: true, zero: false) }
            let (f, o) = file.hostLocation(host | (offset & (cs - 1)))
            return BlockStatus(length: n, allocated: true, data: true, zero: false, hostOffset: o, hostFile: f.path)
        }
    }

    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: cs, dirty: false, encrypted: encrypted ? true : nil)
    }
}
