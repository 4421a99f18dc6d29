import Glibc

/// Creating qcow images as qemu 7.2's qcow_co_create_opts / qcow_co_create do: the header, the backing file
/// name right after it, then the L1 table written as zeroed sectors. With a backing file the clusters are
/// 512 bytes (so that writes never copy from the backing file) with 32 KiB L2 tables, else 4 KiB and 4 KiB.
public enum QcowCreate {
    /// qcow's create options in qemu's declaration order.
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size"),
        CreateOptionSpec("backing_file", .string, "File name of a base image"),
        CreateOptionSpec("backing_fmt", .string, "Format of the backing image"),
        CreateOptionSpec("encryption", .bool,
                         "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
        CreateOptionSpec("encrypt.format", .string, "Encrypt the image, format choices: 'aes'"),
        CreateOptionSpec("encrypt.key-secret", .string, "ID of the secret that provides the AES encryption key"),
    ]

    public static let creator: FormatCreator = {
        var c = FormatCreator(name: "qcow", options: options, create: create)
        c.writesCompressed = true
        return c
    }()

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        // qcow cannot store a backing format; it only checks that the name is a driver qemu knows.
        if let f = o.text("backing_fmt"), !RebaseOperation.qemuDriverNames.contains(f) {
            throw InstarError(.invalid, "unrecognized backing format '\(f)'", errno: EINVAL)
        }
        // The legacy spelling: encryption=on means the qcow (aes) method, off means none, anything else is
        // passed on as a format name.
        var legacy = o.text("encryption")
        if legacy == "on" { legacy = "qcow" } else if legacy == "off" { legacy = nil }
        var format = o.text("encrypt.format")
        if format == "aes" { format = "qcow" }
        if legacy != nil && format != nil {
            throw InstarError.invalid("'encrypt.format' and its alias 'encryption' can't be used at the same time")
        }
        format = format ?? legacy
        // The protocol layer creates (and empties) the file before the qcow options are checked; the options
        // qcow takes are not passed to it, so it creates an empty file.
        if o.text("preallocation") == "metadata" { try HostFileCreate.create(r.filename, size: 0, preallocation: .off) }
        try HostFileCreate.create(r.filename, size: 0, preallocation: try RawCreate.preallocation(o.text("preallocation")))
        // The QAPI visit of BlockdevCreateOptionsQcow.
        if let f = format, f != "qcow" && f != "luks" {
            throw InstarError.invalid("Parameter 'format' does not accept value '\(f)'")
        }
        if format == nil && o.text("encrypt.key-secret") != nil {
            throw InstarError.invalid("Parameter 'encrypt.format' is missing")
        }
        let size = try (o.size("size") ?? 0).alignedUp(512)
        guard size > 0 else { throw InstarError.invalid("Image size is too small, cannot be zero length") }
        if let f = format, f != "qcow" { throw InstarError.invalid("Unsupported encryption format") }

        var backing = o.text("backing_file")
        // The vvfat special name is not stored, but still picks the small clusters.
        let smallClusters = backing != nil
        if backing == "fat:" { backing = nil }
        let name = backing.map { Array($0.utf8) } ?? []
        var h = QcowHeader(size: size, clusterBits: smallClusters ? 9 : 12, l2Bits: smallClusters ? 12 : 9,
                           l1TableOffset: 0)
        var headerSize = UInt64(QcowHeader.size)
        if backing != nil {
            h.backingFileOffset = headerSize
            h.backingFileSize = UInt32(truncatingIfNeeded: name.count)
            headerSize += UInt64(name.count)
        }
        headerSize = (headerSize + 7) & ~7
        h.l1TableOffset = headerSize
        let shift = UInt64(h.clusterBits) + UInt64(h.l2Bits)
        let l1Size = try size.adding((UInt64(1) << shift) - 1) >> shift
        // qemu writes an L1 table it cannot open again (or, past 2^31 entries, writes without end); instar
        // refuses such sizes instead.
        guard l1Size <= QcowFormat.maxHeldL1Entries else {
            throw InstarError.invalid("Image too large: qcow images of this size cannot be opened")
        }
        if format != nil {
            h.cryptMethod = QcowHeader.cryptAES
            guard let id = o.text("encrypt.key-secret") else {
                throw InstarError.invalid("Parameter 'encrypt.key-secret' is required for cipher")
            }
            guard r.secrets[id] != nil else { throw InstarError.invalid("No secret with id '\(id)'") }
        }
        let file = try HostFile.open(r.filename, writable: true)
        try ImageLock.acquireForOpen(file, writable: true, forceShare: false)
        try file.write(h.bytes + name, at: 0)
        // The L1 table: zeroed sectors, written out (not left as a hole).
        let l1Bytes = try (try l1Size.multiplied(by: 8)).alignedUp(512)
        let chunk = [UInt8](repeating: 0, count: Int(min(l1Bytes, 1 << 20)))
        var done: UInt64 = 0
        while done < l1Bytes {
            let n = min(l1Bytes - done, UInt64(chunk.count))
            try chunk.withUnsafeBytes {
                try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)]), at: headerSize + done)
            }
            done += n
        }
        // On disk before create returns (qemu's close flushes it).
        try file.sync()
    }
}
