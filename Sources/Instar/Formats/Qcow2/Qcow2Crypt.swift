import Glibc

/// The payload cipher of an encrypted qcow2 image: every data cluster is encrypted in 512-byte sectors, each
/// with its own IV. Two methods share it (qcow2.txt crypt_method):
/// - LUKS (2): the LUKS header and key material live in clusters the crypto header extension points at, and
///   the IV is the sector number of the HOST offset (qemu sets crypt_physical_offset), so moving a cluster
///   means re-encrypting it.
/// - the legacy AES-CBC method (1, qemu's "qcow" crypto driver): the key is the passphrase itself and the IV
///   is the sector number of the GUEST offset. There is no key check: a wrong passphrase decrypts garbage.
final class Qcow2Crypt {
    static let sectorSize: UInt64 = 512
    let cipher: LuksSectorCipher
    /// The IV counts host sectors (LUKS) rather than guest sectors (AES).
    let ivFromHost: Bool
    /// The LUKS master key (nil for the legacy AES method), for adding key slots.
    let masterKey: [UInt8]?

    init(cipher: LuksSectorCipher, ivFromHost: Bool, masterKey: [UInt8]? = nil) {
        self.cipher = cipher
        self.ivFromHost = ivFromHost
        self.masterKey = masterKey
    }

    /// The legacy AES method's cipher (qemu's crypto/block-qcow.c): AES-128-CBC keyed with the passphrase's
    /// first 16 bytes (it is taken as a C string, so up to its first NUL; shorter ones are zero-padded), IVs
    /// from the plain64 generator.
    static func aes(password: [UInt8]) throws -> Qcow2Crypt {
        var key = [UInt8](repeating: 0, count: 16)
        for (i, b) in password.prefix(while: { $0 != 0 }).prefix(16).enumerated() { key[i] = b }
        let cipher = try LuksSectorCipher(algorithm: "aes-128", mode: "cbc", ivgen: "plain64", ivgenHash: nil, key: key)
        return Qcow2Crypt(cipher: cipher, ivFromHost: false)
    }

    /// The cipher settings the header names (already validated by `Qcow2LuksInfo`).
    static func settings(_ info: Qcow2LuksInfo) throws -> LuksCipherSettings {
        guard let hash = LuksHash(rawValue: info.hashAlg) else {
            throw InstarError.invalid("Hash algorithm '\(info.hashAlg)' is not supported")
        }
        return LuksCipherSettings(algorithm: info.cipherAlg, mode: info.cipherMode, ivgen: info.ivgenAlg,
                                  ivgenHash: info.ivgenHashAlg.flatMap { LuksHash(rawValue: $0) }, hash: hash)
    }

    /// The passphrase named by the `encrypt.key-secret` open option, with qemu's messages.
    static func password(_ options: ImageOpenOptions) throws -> [UInt8] {
        guard let id = options.driverOptions["encrypt.key-secret"]?.stringValue else {
            throw InstarError(.encrypted, "Parameter 'encrypt.key-secret' is required for cipher", errno: EINVAL)
        }
        guard let secret = options.secrets[id] else {
            throw InstarError(.encrypted, "No secret with id '\(id)'", errno: EINVAL)
        }
        return Array(secret.utf8)
    }

    /// Unlocks the image's master key (qemu's qcrypto_block_open for a qcow2 with the LUKS method).
    static func unlock(file: HostFile, ext: Qcow2CryptoExtension, header: LuksHeader, info: Qcow2LuksInfo,
                       options: ImageOpenOptions) throws -> Qcow2Crypt {
        let password = try password(options)
        let settings = try settings(info)
        let key: [UInt8]
        do {
            key = try Luks.unlock(header: header, settings: settings, password: password) { offset, count in
                // qcow2_crypto_hdr_read_func: reads stay inside the extension's header area.
                guard offset <= ext.length, UInt64(count) <= ext.length - offset else {
                    throw InstarError.invalid("Request for data outside of extension header")
                }
                return try file.readBytes(at: try ext.offset.adding(offset), count: count)
            }
        } catch let e as InstarError where e.code == .permission {
            throw InstarError(.encrypted, e.message, errno: EACCES)
        }
        return Qcow2Crypt(cipher: try settings.sectorCipher(key: key), ivFromHost: true, masterKey: key)
    }

    /// The first IV sector for data at host offset `host` that holds guest offset `guest` (both sector aligned).
    private func firstSector(host: UInt64, guest: UInt64) -> UInt64 {
        (ivFromHost ? host : guest) / Qcow2Crypt.sectorSize
    }

    /// Reads host bytes at `host` (holding guest offset `guest`: the same offset within their cluster) into
    /// `dst`, decrypting the sectors they lie in.
    func readDecrypted(_ file: HostFile, into dst: UnsafeMutableRawBufferPointer, at host: UInt64,
                       guest: UInt64) throws {
        if dst.isEmpty { return }
        let start = host.alignedDown(Qcow2Crypt.sectorSize)
        let end = try host.adding(UInt64(dst.count)).alignedUp(Qcow2Crypt.sectorSize)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: try checkedInt(end - start), alignment: 4096)
        defer { bounce.deallocate() }
        try file.readZeroPadded(into: bounce, at: start)
        let skip = host - start
        // A cluster is sector aligned in both spaces, so guest and host share their offset within a sector.
        let guestStart = guest >= skip ? guest - skip : 0
        try cipher.process(bounce, firstSector: firstSector(host: start, guest: guestStart), encrypt: false)
        if let d = dst.baseAddress, let s = bounce.baseAddress { memcpy(d, s + Int(skip), dst.count) }
    }

    /// `data` encrypted for host offset `host`, which holds guest offset `guest` (both sector aligned, as
    /// qemu's 512-byte request alignment for encrypted images guarantees).
    func encrypted(_ data: UnsafeRawBufferPointer, at host: UInt64,
                   guest: UInt64) throws -> UnsafeMutableRawBufferPointer {
        guard host % Qcow2Crypt.sectorSize == 0, guest % Qcow2Crypt.sectorSize == 0,
              data.count % Int(Qcow2Crypt.sectorSize) == 0 else {
            throw InstarError.invalid("Encrypted write at \(host) of \(data.count) bytes is not sector aligned")
        }
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 4096)
        if let d = out.baseAddress, let s = data.baseAddress { memcpy(d, s, data.count) }
        do {
            try cipher.process(out, firstSector: firstSector(host: host, guest: guest), encrypt: true)
        } catch {
            out.deallocate()
            throw error
        }
        return out
    }
}

/// The `encrypt.*` creation options of a new qcow2 image, checked the way qemu's QAPI visitor checks
/// QCryptoBlockCreateOptions (the secret itself is looked up later, once the file exists, as in qemu).
struct Qcow2EncryptionRequest {
    enum Format { case aes, luks }
    var format: Format
    var keySecret: String?
    var settings: LuksCipherSettings
    var iterTimeMs: UInt64

    static let luksOptions = ["encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
                              "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time"]
    /// nil when the image is not to be encrypted.
    static func parse(_ o: CreateOptionValues) throws -> Qcow2EncryptionRequest? {
        // qcow2_co_create_opts maps the legacy spellings: encryption=on and encrypt.format=aes mean "qcow".
        var format = o.text("encrypt.format")
        if format == nil, let legacy = o.text("encryption") {
            format = o.bool("encryption") ? "aes" : nil
            _ = legacy
        }
        let given = (["encrypt.key-secret"] + luksOptions).filter { o.text($0) != nil }
        guard let f = format else {
            if !given.isEmpty { throw InstarError.invalid("Parameter 'encrypt.format' is missing") }
            return nil
        }
        switch f {
        case "aes", "qcow":
            if let extra = given.first(where: { $0 != "encrypt.key-secret" }) {
                throw InstarError.invalid("Parameter '\(extra)' is unexpected")
            }
            return Qcow2EncryptionRequest(format: .aes, keySecret: o.text("encrypt.key-secret"),
                                          settings: LuksCipherSettings(algorithm: "aes-128", mode: "cbc", ivgen: "plain64",
                                                                       ivgenHash: nil, hash: .sha256),
                                          iterTimeMs: 0)
        case "luks":
            let p = try LuksCreateParameters.parse(o, prefix: "encrypt.")
            return Qcow2EncryptionRequest(format: .luks, keySecret: p.keySecret, settings: p.settings,
                                          iterTimeMs: p.iterTimeMs)
        default:
            throw InstarError.invalid("Parameter 'format' does not accept value '\(f)'")
        }
    }

    /// The passphrase, with qemu's messages.
    func password(_ secrets: [String: String]) throws -> [UInt8] {
        guard let id = keySecret else { throw InstarError.invalid("Parameter 'encrypt.key-secret' is required for cipher") }
        guard let s = secrets[id] else { throw InstarError.invalid("No secret with id '\(id)'") }
        return Array(s.utf8)
    }

    /// Bytes of the LUKS header and key material (qcrypto_block_calculate_payload_offset).
    var luksHeaderBytes: UInt64 {
        let sectors = LuksHeader.keyMaterialSectors(keyBytes: UInt64(settings.keyBytes), stripes: UInt64(LuksHeader.stripes))
        return (LuksHeader.headerSectors + UInt64(LuksHeader.slotCount) * sectors) * LuksHeader.sectorSize
    }

    /// The parameter checks qemu's LUKS create makes before its PBKDF2 benchmark.
    func validateCipher() throws {
        guard settings.keyBytes > 0 else {
            throw InstarError.unsupported("Cipher algorithm '\(settings.algorithm)' is not supported")
        }
        _ = try settings.sectorCipher(key: [UInt8](repeating: 0, count: settings.keyBytes))
    }
}
