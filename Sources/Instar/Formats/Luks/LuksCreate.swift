import Glibc

/// Creating and measuring luks images as qemu's block_crypto_co_create_opts_luks and block_crypto_measure do.
public enum LuksCreate {
    /// qemu's create_opts for luks in declaration order (this order decides the `Formatting` line).
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size"),
        CreateOptionSpec("key-secret", .string, "ID of the secret that provides the keyslot passphrase"),
        CreateOptionSpec("cipher-alg", .string, "Name of encryption cipher algorithm"),
        CreateOptionSpec("cipher-mode", .string, "Name of encryption cipher mode"),
        CreateOptionSpec("ivgen-alg", .string, "Name of IV generator algorithm"),
        CreateOptionSpec("ivgen-hash-alg", .string, "Name of IV generator hash algorithm"),
        CreateOptionSpec("hash-alg", .string, "Name of encryption hash algorithm"),
        CreateOptionSpec("iter-time", .number, "Time to spend in PBKDF in milliseconds"),
    ]

    public static let creator = FormatCreator(name: "luks", options: options, create: create, measure: measure)

    /// The preallocation option, parsed before anything else (qapi_enum_parse's message); metadata means off.
    static func preallocation(_ text: String?) throws -> HostFileCreate.Preallocation {
        guard let t = text else { return .off }
        switch t {
        case "off", "metadata": return .off
        case "falloc": return .falloc
        case "full": return .full
        default: throw InstarError.invalid("invalid parameter value: \(t)")
        }
    }

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        let size = o.size("size") ?? 0
        let prealloc = try preallocation(o.text("preallocation"))
        let params = try LuksCreateParameters.parse(o, prefix: "")
        // The protocol layer first: an empty file.
        try HostFileCreate.create(r.filename, size: 0, preallocation: .off)
        do {
            try build(r.filename, size: size, params: params, prealloc: prealloc, secrets: r.secrets)
        } catch {
            // qemu deletes the file it truncated and left half made.
            unlink(r.filename)
            throw error
        }
    }

    /// qcrypto_block_luks_create over the new file: the passphrase, the cipher checks, the volume (master key,
    /// iteration counts, slot 0), then the file sized to header plus guest size, then header and key material.
    static func build(_ path: String, size: UInt64, params: LuksCreateParameters,
                      prealloc: HostFileCreate.Preallocation, secrets: [String: String]) throws {
        let password = try params.password(secrets, prefix: "")
        try params.validateCipher()
        let made = try Luks.create(settings: params.settings, password: password, iterTimeMs: params.iterTimeMs)
        let headerBytes = UInt64(made.header.payloadOffsetSector) * LuksHeader.sectorSize
        guard size <= UInt64(Int64.max), headerBytes <= UInt64(Int64.max) - size else {
            throw InstarError(.range, "The requested file size is too large", errno: EFBIG)
        }
        let file = try HostFile.open(path, writable: true)
        try ImageLock.acquireForOpen(file, writable: true, forceShare: false, resize: true)
        try HostFileCreate.grow(file, to: headerBytes + size, preallocation: prealloc)
        try file.write(made.keyMaterial, at: UInt64(made.header.slots[0].keyOffsetSector) * LuksHeader.sectorSize)
        try file.write(made.header.encoded(), at: 0)
        try file.sync()
    }

    /// block_crypto_measure: the header and key material plus the guest size, allocated or not (every
    /// sector of the payload is stored encrypted). The volume's parameters and passphrase are checked as a
    /// creation would check them.
    static func measure(_ r: MeasureRequest) throws -> MeasureResult {
        var size = r.options.size("size") ?? 0
        if let src = r.source { size = src.virtualSize }
        let params = try LuksCreateParameters.parse(r.options, prefix: "")
        _ = try params.password(r.secrets, prefix: "")
        try params.validateCipher()
        let total = try params.headerBytes.adding(size)
        return MeasureResult(required: total, fullyAllocated: total)
    }
}
