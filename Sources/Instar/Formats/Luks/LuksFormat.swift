import Glibc

/// The luks format (qemu's block/crypto.c over crypto/block-luks.c): a LUKS1 header and eight key slots, then
/// the payload, every 512-byte sector of it encrypted with the master key and its own IV (the sector number
/// counted from the payload's start). The guest size is what follows the payload offset in the file.
public final class LuksFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "luks", probe: probe, open: { try LuksFormat(request: $0) })
        // No runtimeOptions: qemu opens the crypto layer (and fails on a missing secret) before it refuses
        // options the driver left unused, so the driver checks them itself at the end of its open.
        return d
    }()

    /// qemu's qcrypto_block_luks_has_format: the magic and version 1 (other versions probe as raw).
    static func probe(_ header: [UInt8], _ filename: String) -> Int {
        guard header.count >= 8, Array(header[0..<6]) == LuksHeader.magic, header[6] == 0, header[7] == 1 else { return 0 }
        return 100
    }

    /// qemu's BLOCK_CRYPTO_MAX_IO_SIZE: requests are encrypted through a bounce buffer of at most 1 MiB.
    static let chunkBytes = 1 << 20
    static let sectorSize = LuksHeader.sectorSize

    public let formatName = "luks"
    let file: HostFile
    /// Replaced when amend changes the key slots.
    var header: LuksHeader
    var info: LuksInfo
    /// nil when the image was opened only to describe it (no passphrase needed).
    let cipher: LuksSectorCipher?
    /// The unlocked master key (nil without a passphrase), for adding key slots.
    let masterKey: [UInt8]?
    let payloadOffset: UInt64
    public var hostFiles: [HostFile] { [file] }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }

    init(request: OpenRequest) throws {
        file = request.file
        let opts = request.options
        var password: [UInt8]?
        if !opts.metadataOnly {
            // The C API's direct passphrase arrives as encrypt.key-secret under the reserved id (the command
            // line cannot give that name to a luks image: the option check refuses it). An encrypt.key-secret a
            // json: name gave a luks image is not luks's option: qemu asks for key-secret then.
            let named = opts.driverOptions["encrypt.key-secret"]?.stringValue
            let apiID = (opts.keySecret != nil && named == ImageOpenOptions.keySecretID)
                || (opts.backingKeySecret != nil && named == ImageOpenOptions.backingKeySecretID) ? named : nil
            guard let id = opts.driverOptions["key-secret"]?.stringValue ?? apiID else {
                throw InstarError(.encrypted, "Parameter 'key-secret' is required for cipher", errno: EINVAL)
            }
            guard let secret = opts.secrets[id] else {
                throw InstarError(.encrypted, "No secret with id '\(id)'", errno: EINVAL)
            }
            password = Array(secret.utf8)
        }
        // Reads past the end of the file are zeroes, as the block layer gives them.
        let bytes = try file.readBytes(at: 0, count: LuksHeader.byteCount)
        header = try LuksHeader(bytes: bytes)
        info = try LuksInfo(header: header)
        payloadOffset = info.payloadOffset
        if let password {
            let settings = info.settings
            // Fails here for a cipher libgcrypt lacks, before the slow key search.
            _ = try settings.sectorCipher(key: [UInt8](repeating: 0, count: settings.keyBytes))
            let fileSize = try file.size()
            let hostFile = request.file
            let key = try Luks.unlock(header: header, settings: settings, password: password) { offset, count in
                // The key material is at most 64 bytes x 4000 stripes (checked by the header check and the
                // cipher's key size); past the end of the file it reads as zeroes.
                guard count <= 64 * Int(LuksHeader.stripes) else {
                    throw InstarError.corrupt("LUKS key material of \(count) bytes is too large")
                }
                if offset >= fileSize { return [UInt8](repeating: 0, count: count) }
                return try hostFile.readBytes(at: offset, count: count)
            }
            cipher = try settings.sectorCipher(key: key)
            masterKey = key
        } else {
            cipher = nil
            masterKey = nil
        }
        // block_crypto_getlength: a file shorter than the payload offset has no length.
        if payloadOffset > (try file.nodeLength()) {
            throw InstarError(.io, "Could not refresh total sector count: Input/output error", errno: EIO)
        }
        // The C API's direct passphrase arrives as encrypt.key-secret; from the command line it is unknown here.
        let known: Set<String> = opts.keySecret != nil ? ["key-secret", "encrypt.key-secret"] : ["key-secret"]
        if let k = opts.driverOptions.keys.filter({ !known.contains($0) }).sorted().first {
            throw InstarError.invalid("Block format 'luks' does not support the option '\(k)'")
        }
    }

    /// The file's length (in whole sectors, as the block layer sees it) past the payload offset.
    public var virtualSize: UInt64 {
        let length = (try? file.nodeLength()) ?? 0
        return length > payloadOffset ? length - payloadOffset : 0
    }

    private func requireCipher() throws -> LuksSectorCipher {
        guard let c = cipher else { throw InstarError(.encrypted, "Parameter 'key-secret' is required for cipher", errno: EINVAL) }
        return c
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        if buffer.isEmpty { return }
        let c = try requireCipher()
        let s = LuksFormat.sectorSize
        let end = try offset.adding(UInt64(buffer.count))
        var pos = offset.alignedDown(s)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: LuksFormat.chunkBytes, alignment: 4096)
        defer { bounce.deallocate() }
        while pos < end {
            let n = Int(min(UInt64(LuksFormat.chunkBytes), try end.alignedUp(s) - pos))
            let chunk = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<n])
            try file.readZeroPadded(into: chunk, at: try payloadOffset.adding(pos))
            try c.process(chunk, firstSector: pos / s, encrypt: false)
            // Copy the part of the chunk the caller asked for.
            let from = max(pos, offset)
            let to = min(pos + UInt64(n), end)
            if let d = buffer.baseAddress, let src = bounce.baseAddress, to > from {
                memcpy(d + Int(from - offset), src + Int(from - pos), Int(to - from))
            }
            pos += UInt64(n)
        }
    }

    /// Writes guest bytes; partial sectors at either end are read, decrypted, patched and written back whole.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try writeBytes(count: buffer.count, at: offset) { dst, srcOffset in
            if let d = dst.baseAddress, let s = buffer.baseAddress { memcpy(d, s + srcOffset, dst.count) }
        }
    }

    /// Zeroes are written encrypted like any other data (the crypto driver has no write-zeroes of its own).
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        var done: UInt64 = 0
        while done < length {
            let n = min(length - done, UInt64(LuksFormat.chunkBytes))
            try writeBytes(count: Int(n), at: offset + done) { dst, _ in
                if let d = dst.baseAddress { memset(d, 0, dst.count) }
            }
            done += n
        }
    }

    /// Encrypts and writes `count` guest bytes at `offset`; `fill(dst, sourceOffset)` supplies the bytes for a
    /// piece of the bounce buffer.
    private func writeBytes(count: Int, at offset: UInt64,
                            fill: (UnsafeMutableRawBufferPointer, Int) -> Void) throws {
        if count == 0 { return }
        let c = try requireCipher()
        let s = LuksFormat.sectorSize
        let end = try offset.adding(UInt64(count))
        var pos = offset.alignedDown(s)
        let alignedEnd = try end.alignedUp(s)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: LuksFormat.chunkBytes, alignment: 4096)
        defer { bounce.deallocate() }
        while pos < alignedEnd {
            let n = Int(min(UInt64(LuksFormat.chunkBytes), alignedEnd - pos))
            let chunk = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<n])
            let from = max(pos, offset)
            let to = min(pos + UInt64(n), end)
            if from > pos || to < pos + UInt64(n) {
                // A partial sector at an end: start from the current contents.
                try file.readZeroPadded(into: chunk, at: try payloadOffset.adding(pos))
                try c.process(chunk, firstSector: pos / s, encrypt: false)
            }
            fill(UnsafeMutableRawBufferPointer(rebasing: bounce[Int(from - pos)..<Int(to - pos)]), Int(from - offset))
            try c.process(chunk, firstSector: pos / s, encrypt: true)
            try file.write(UnsafeRawBufferPointer(chunk), at: try payloadOffset.adding(pos))
            pos += UInt64(n)
        }
    }

    public func flush() throws {
        try file.sync()
    }

    /// The crypto driver has no block status of its own: the generic answer is "allocated data" with no
    /// offset (the bytes are not stored plainly).
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        BlockStatus(length: length, allocated: true, data: true, zero: false)
    }

    /// block_crypto_get_info_luks takes the cluster size from the file's info: only a protocol with one (an RBD
    /// object) has it; a host file has no info, so none is shown.
    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: file.remote?.clusterSize, dirty: false, encrypted: true,
                   formatSpecific: .dict([("type", .string("luks")), ("data", info.qobject(withFormat: false))]))
    }

    /// Unwritten sectors decrypt to noise, so a new image does not read as zeroes (bdrv_has_zero_init is 0).
    public var hasZeroInit: Bool { false }
}

/// block_crypto_co_truncate: the file becomes the payload offset plus the new size, with the file layer's
/// preallocation.
extension LuksFormat: ImageResizable {
    public func resize(to newSize: UInt64, preallocation: ResizePreallocation, backing: GuestReader?) throws {
        guard newSize <= UInt64(Int64.max) - payloadOffset else {
            throw InstarError(.range, "The requested file size is too large", errno: EFBIG)
        }
        try HostFileCreate.resize(file, to: payloadOffset + newSize, preallocation: preallocation)
    }
}

/// block_crypto_amend_options_luks: the key slot options (state, keyslot, old-secret, new-secret, iter-time)
/// applied to the volume's header and key material in the file.
extension LuksFormat: ImageAmendable {
    /// qemu's amend_opts for luks.
    public static let amendOptionSpecs: [CreateOptionSpec] = [
        CreateOptionSpec("state", .string, "Select new state of affected keyslots (active/inactive)"),
        CreateOptionSpec("keyslot", .number, "Select a single keyslot to modify explicitly"),
        CreateOptionSpec("old-secret", .string, "Select all keyslots that match this password"),
        CreateOptionSpec("new-secret", .string, "New secret to set in the matching keyslots. Empty string to erase"),
        CreateOptionSpec("iter-time", .number, "Time to spend in PBKDF in milliseconds"),
    ]

    public func amend(options: [AmendOption], force: Bool, backing: GuestReader?,
                      progress: ((Double) throws -> Void)?) throws {
        try amend(options: options, force: force, secrets: [:], backing: backing, progress: progress)
    }

    public func amend(options: [AmendOption], force: Bool, secrets: [String: String], backing: GuestReader?,
                      progress: ((Double) throws -> Void)?) throws {
        let request = try LuksKeyslotRequest.parse(options, prefix: "")
        guard let key = masterKey else {
            throw InstarError(.encrypted, "Parameter 'key-secret' is required for cipher", errno: EINVAL)
        }
        let file = self.file
        let fileSize = try file.size()
        let io = LuksVolumeIO(read: { offset, count in
            // Key material is at most 64-byte keys in 4000 stripes; past the end of the file it reads as zeroes.
            guard count <= 64 * Int(LuksHeader.stripes) else {
                throw InstarError.corrupt("LUKS key material of \(count) bytes is too large")
            }
            if offset >= fileSize { return [UInt8](repeating: 0, count: count) }
            return try file.readBytes(at: offset, count: count)
        }, write: { offset, bytes in
            do {
                try file.write(bytes, at: offset)
            } catch let e as InstarError {
                throw InstarError(e.code, "Could not write encryption header: " + e.message, errno: e.errnoValue)
            }
        }, sync: { try file.sync() })
        var h = header
        defer {
            header = h
            if let i = try? LuksInfo(header: h) { info = i }
        }
        try LuksKeyslotAmend.apply(request, header: &h, masterKey: key, secrets: secrets, force: force, io: io)
    }
}
