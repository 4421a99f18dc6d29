import Glibc

/// Creating VHDX images as qemu 7.2's vhdx_co_create_opts and vhdx_co_create do: the file identifier with
/// qemu's creator string, two headers, two region tables, the BAT (written when its entries are not all zero)
/// and the metadata items, each written where and as large as qemu writes it, so the file's bytes and its
/// sparse layout match (GUIDs and the header sequence number are random in both).
public enum VhdxCreate {
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size; max of 64TB."),
        CreateOptionSpec("log_size", .size, "Log size; min 1MB.", default: "1048576"),
        CreateOptionSpec("block_size", .size, "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
                         default: "0"),
        CreateOptionSpec("subformat", .string, "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."),
        CreateOptionSpec("block_state_zero", .bool, "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  "
                         + "Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic."),
    ]

    public static let creator = FormatCreator(name: "vhdx", options: options, create: create)

    /// The creator field qemu writes: "QEMU v" and its version (Debian's 7.2 build), UTF-16LE without a NUL.
    static let creatorString = "QEMU v7.2.22"

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        // The protocol file first, empty: qemu takes the vhdx options (size included) out of the list it hands
        // to bdrv_create_file, so only the host-file options (preallocation) reach it.
        let mode = try RawCreate.preallocation(o.text("preallocation"))
        try HostFileCreate.create(r.filename, size: 0, preallocation: mode)
        let size = try (o.size("size") ?? 0).alignedUp(512)
        // The QAPI visit of the options.
        var fixed = false
        if let s = o.text("subformat") {
            switch s {
            case "dynamic": fixed = false
            case "fixed": fixed = true
            default: throw InstarError.invalid("Parameter 'subformat' does not accept value '\(s)'")
            }
        }
        var logSize = Vhdx.defaultLogSize
        if let l = o.size("log_size") { logSize = try l.alignedUp(Vhdx.miB) }
        var blockSize: UInt64?
        if let b = o.size("block_size") {
            let rounded = try b.alignedUp(Vhdx.miB)
            if rounded != 0 { blockSize = min(rounded, Vhdx.blockSizeMax) }
        }
        let zeroBlocks = o.isSet("block_state_zero") ? o.bool("block_state_zero") : true

        // vhdx_co_create's checks.
        if size > Vhdx.maxImageSize { throw InstarError.invalid("Image size too large; max of 64TB") }
        if logSize > UInt64(UInt32.max) { throw InstarError.invalid("Log size must be smaller than 4 GB") }
        if logSize < Vhdx.miB || logSize % Vhdx.miB != 0 { throw InstarError.invalid("Log size must be a multiple of 1 MB") }
        let bs: UInt64
        if let b = blockSize {
            bs = b
        } else if size > 32 << 40 {
            bs = 64 << 20
        } else if size > 100 << 30 {
            bs = 32 << 20
        } else if size > 1 << 30 {
            bs = 16 << 20
        } else {
            bs = 8 << 20
        }
        if bs < Vhdx.miB || bs % Vhdx.miB != 0 { throw InstarError.invalid("Block size must be a multiple of 1 MB") }
        if !isPowerOfTwo(bs) { throw InstarError.invalid("Block size must be a power of two") }
        if bs > Vhdx.blockSizeMax { throw InstarError.invalid("Block size must not exceed \(Vhdx.blockSizeMax)") }

        let file = try HostFile.open(r.filename, writable: true)
        try ImageLock.acquireForOpen(file, writable: true, forceShare: false)
        try build(file, size: size, logSize: logSize, blockSize: bs, fixed: fixed, zeroBlocks: zeroBlocks)
        // Everything on disk before create returns, in one flush. qemu also flushes after each header (its
        // vhdx_update_header writes through bdrv_pwrite_sync), but the new file is no image before the region
        // tables and metadata that follow are written: a crash before the final flush leaves no image with
        // qemu either, so those flushes order nothing anyone can read.
        try file.sync()
    }

    static func build(_ file: HostFile, size: UInt64, logSize: UInt64, blockSize: UInt64, fixed: Bool,
                      zeroBlocks: Bool) throws {
        // (A) the file identifier.
        var id = Array("vhdxfile".utf8)
        for u in creatorString.utf16 { id.append(UInt8(u & 0xff)); id.append(UInt8(u >> 8)) }
        try file.write(Array(id[0..<8]), at: 0)
        try file.write(Array(id[8...]), at: 8)

        // (B), (C) the headers: a random sequence number, the second one higher.
        var rng = SystemRandomNumberGenerator()
        var hdr = [UInt8](repeating: 0, count: Vhdx.headerSize)
        hdr.putU32le(Vhdx.headerSignature, at: 0)
        hdr.putU64le(UInt64(UInt32.random(in: 0...UInt32.max, using: &rng)), at: 8)
        let fileGUID = Vhdx.newGUID(), dataGUID = Vhdx.newGUID()
        for i in 0..<16 { hdr[16 + i] = fileGUID[i]; hdr[32 + i] = dataGUID[i] }
        hdr.putU16le(1, at: 66)
        hdr.putU32le(UInt32(logSize), at: 68)
        hdr.putU64le(Vhdx.headerSectionEnd, at: 72)
        var h = try VhdxHeader(bytes: hdr)
        for off in [Vhdx.header1Offset, Vhdx.header2Offset] {
            let block = h.encoded(over: [UInt8](repeating: 0, count: Vhdx.headerSize))
            try file.write(Array(block[0..<Vhdx.headerStructSize]), at: off)
            h.sequenceNumber &+= 1
        }

        // (D), (E), (G) the region tables and the BAT.
        let sectorsPerBlock = blockSize / 512
        let chunkRatio = Vhdx.maxSectorsPerBlock * 512 / blockSize
        let chunkRatioBits = UInt64(chunkRatio.trailingZeroBitCount)
        let entries = VhdxFormat.batEntryCount(virtualSize: size, blockSize: blockSize, chunkRatioBits: chunkRatioBits)
        let batLength = UInt64(UInt32(truncatingIfNeeded: try (entries * 8).alignedUp(Vhdx.miB)))
        let batOffset = try (Vhdx.headerSectionEnd + logSize).alignedUp(Vhdx.miB)
        let metadataOffset = try (batOffset + batLength).alignedUp(Vhdx.miB)
        var rt = [UInt8](repeating: 0, count: Int(Vhdx.headerBlockSize))
        rt.putU32le(Vhdx.regionSignature, at: 0)
        rt.putU32le(2, at: 8)
        for i in 0..<16 { rt[16 + i] = Vhdx.batGUID[i]; rt[48 + i] = Vhdx.metadataGUID[i] }
        rt.putU64le(batOffset, at: 32)
        rt.putU32le(UInt32(batLength), at: 40)
        rt.putU64le(metadataOffset, at: 64)
        rt.putU32le(UInt32(Vhdx.miB), at: 72)
        CRC32C.stamp(&rt, crcOffset: 4)

        let dataOffset = batOffset + batLength + 5 * Vhdx.miB
        try file.truncate(to: fixed ? try dataOffset.adding(size) : dataOffset)
        if fixed || zeroBlocks {
            // qemu writes the BAT in one request; one longer than the block layer's limit fails with EIO.
            guard batLength <= 0x7FFF_FE00 else {
                throw InstarError(.io, "Failed to write the BAT: \(strerrorString(EIO))", errno: EIO)
            }
            // Built and written a piece at a time (a BAT may be up to 2 GiB): the same bytes as one write.
            let state = zeroBlocks ? Vhdx.blockZero : (fixed ? Vhdx.blockFullyPresent : Vhdx.blockNotPresent)
            let totalSectors = size / 512
            let dataBlocks = totalSectors.divCeil(sectorsPerBlock)
            let piece: UInt64 = Vhdx.miB
            var pieceStart: UInt64 = 0
            var block: UInt64 = 0
            while pieceStart < batLength {
                let n = min(piece, batLength - pieceStart)
                var bat = [UInt8](repeating: 0, count: Int(n))
                while block < dataBlocks {
                    let idx = block + block / chunkRatio
                    let at = idx * 8
                    if at >= pieceStart + n { break }
                    var entry: UInt64 = state
                    if state == Vhdx.blockFullyPresent {
                        entry |= try (dataOffset + block * sectorsPerBlock * 512).alignedUp(Vhdx.miB)
                    }
                    if at >= pieceStart { bat.putU64le(entry, at: Int(at - pieceStart)) }
                    block += 1
                }
                try file.write(bat, at: batOffset + pieceStart)
                pieceStart += n
            }
        }
        try file.write(rt, at: Vhdx.regionTable1Offset)
        try file.write(rt, at: Vhdx.regionTable2Offset)

        // (H) the metadata table and its five items.
        var table = [UInt8](repeating: 0, count: Int(Vhdx.headerBlockSize))
        table.putU64le(Vhdx.metadataSignature, at: 0)
        table.putU16le(5, at: 10)
        let items: [([UInt8], UInt32, UInt32)] = [
            (Vhdx.fileParamGUID, 8, Vhdx.metaIsRequired),
            (Vhdx.virtualSizeGUID, 8, Vhdx.metaIsRequired | Vhdx.metaIsVirtualDisk),
            (Vhdx.page83GUID, 16, Vhdx.metaIsRequired | Vhdx.metaIsVirtualDisk),
            (Vhdx.logicalSectorGUID, 4, Vhdx.metaIsRequired | Vhdx.metaIsVirtualDisk),
            (Vhdx.physSectorGUID, 4, Vhdx.metaIsRequired | Vhdx.metaIsVirtualDisk),
        ]
        var itemOffset: UInt32 = 64 * 1024
        for (k, item) in items.enumerated() {
            let o = 32 + k * 32
            for i in 0..<16 { table[o + i] = item.0[i] }
            table.putU32le(itemOffset, at: o + 16)
            table.putU32le(item.1, at: o + 20)
            table.putU32le(item.2, at: o + 24)
            itemOffset += item.1
        }
        var values = [UInt8](repeating: 0, count: 40)
        values.putU32le(UInt32(blockSize), at: 0)
        values.putU32le(fixed ? Vhdx.paramsLeaveBlocksAllocated : 0, at: 4)
        values.putU64le(size, at: 8)
        let page83 = Vhdx.newGUID()
        for i in 0..<16 { values[16 + i] = page83[i] }
        values.putU32le(512, at: 32)
        values.putU32le(512, at: 36)
        try file.write(table, at: metadataOffset)
        try file.write(values, at: metadataOffset + 64 * 1024)
    }
}
