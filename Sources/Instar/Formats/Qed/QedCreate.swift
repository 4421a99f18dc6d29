import Glibc

/// Creating QED images as qemu 7.2's bdrv_qed_co_create does: an empty file, the header (with the backing file
/// name right after it), and a zeroed L1 table in the second cluster.
public enum QedCreate {
    /// qed's create options in qemu's declaration order.
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size"),
        CreateOptionSpec("backing_file", .string, "File name of a base image"),
        CreateOptionSpec("backing_fmt", .string, "Image format of the base image"),
        CreateOptionSpec("cluster_size", .size, "Cluster size (in bytes)", default: "65536"),
        CreateOptionSpec("table_size", .size, "L1/L2 table size (in clusters)"),
    ]

    public static let creator = FormatCreator(name: "qed", options: options, create: create)

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        // The protocol layer creates (and empties) the file before the qed options are checked.
        // The protocol layer's own options (file-posix preallocation) apply to the empty file it creates.
        if o.text("preallocation") == "metadata" { try HostFileCreate.create(r.filename, size: 0, preallocation: .off) }
        try HostFileCreate.create(r.filename, size: 0, preallocation: try RawCreate.preallocation(o.text("preallocation")))
        let size = try (o.size("size") ?? 0).alignedUp(512)
        // qemu keeps these in 32-bit fields.
        let clusterSize = UInt32(truncatingIfNeeded: o.size("cluster_size") ?? UInt64(QedHeader.defaultClusterSize))
        let tableSize = UInt32(truncatingIfNeeded: o.size("table_size") ?? UInt64(QedHeader.defaultTableSize))
        guard QedHeader.clusterSizeValid(clusterSize) else {
            throw InstarError(.invalid, "QED cluster size must be within range [\(QedHeader.minClusterSize), "
                              + "\(QedHeader.maxClusterSize)] and power of 2", errno: EINVAL)
        }
        guard QedHeader.tableSizeValid(tableSize) else {
            throw InstarError(.invalid, "QED table size must be within range [\(QedHeader.minTableSize), "
                              + "\(QedHeader.maxTableSize)] and power of 2", errno: EINVAL)
        }
        guard QedHeader.imageSizeValid(size, clusterSize: clusterSize, tableSize: tableSize) else {
            throw InstarError(.invalid, "QED image size must be a non-zero multiple of cluster size and less than "
                + "\(QedHeader.maxImageSize(clusterSize: clusterSize, tableSize: tableSize)) bytes", errno: EINVAL)
        }
        var h = QedHeader(clusterSize: clusterSize, tableSize: tableSize, l1TableOffset: UInt64(clusterSize),
                          imageSize: size)
        var name: [UInt8] = []
        if let b = o.text("backing_file") {
            name = Array(b.utf8)
            h.features |= QedHeader.featureBackingFile
            h.backingNameOffset = UInt32(QedHeader.size)
            h.backingNameSize = UInt32(truncatingIfNeeded: name.count)
            if o.text("backing_fmt") == "raw" { h.features |= QedHeader.featureBackingRaw }
        }
        let file = try HostFile.open(r.filename, writable: true)
        try ImageLock.acquireForOpen(file, writable: true, forceShare: false)
        try file.truncate(to: 0)
        try file.write(h.bytes + name, at: 0)
        // The L1 table: table_size zeroed clusters, written out (not left as a hole).
        let l1Bytes = UInt64(clusterSize) * UInt64(tableSize)
        let chunk = [UInt8](repeating: 0, count: Int(min(l1Bytes, 1 << 20)))
        var done: UInt64 = 0
        while done < l1Bytes {
            let n = min(l1Bytes - done, UInt64(chunk.count))
            try chunk.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)]),
                                                       at: UInt64(clusterSize) + done) }
            done += n
        }
        // On disk before create returns (qemu's close flushes it).
        try file.sync()
    }
}
