/// The creation parameters of a new LUKS1 volume (qemu's QCryptoBlockCreateOptionsLUKS), read from `-o`
/// options with a prefix ("" for a native luks image, "encrypt." inside qcow2), checked in the order qemu's
/// QAPI visitor and qcrypto_block_luks_create check them, with their messages.
struct LuksCreateParameters {
    var keySecret: String?
    var settings: LuksCipherSettings
    var iterTimeMs: UInt64
    /// "des"/"3des": in the QAPI enum, but LUKS has no name for them (refused once the secret is found).
    var unmappedAlgorithm: Bool

    static let optionNames = ["key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg",
                              "iter-time"]
    static let defaultIterTimeMs: UInt64 = 2000

    /// The visitor's checks: each enum value in declaration order.
    static func parse(_ o: CreateOptionValues, prefix: String) throws -> LuksCreateParameters {
        func choice(_ name: String, _ allowed: [String]) throws -> String? {
            guard let v = o.text(prefix + name) else { return nil }
            guard allowed.contains(v) else { throw InstarError.invalid("Parameter '\(name)' does not accept value '\(v)'") }
            return v
        }
        let alg = try choice("cipher-alg", LuksInfo.cipherAlgorithms) ?? "aes-256"
        let mode = try choice("cipher-mode", LuksInfo.cipherModes) ?? "xts"
        let ivgen = try choice("ivgen-alg", LuksInfo.ivgenAlgorithms) ?? "plain64"
        var ivhash = try choice("ivgen-hash-alg", LuksInfo.hashes).flatMap { LuksHash(rawValue: $0) }
        let hash = try choice("hash-alg", LuksInfo.hashes).flatMap { LuksHash(rawValue: $0) } ?? .sha256
        if ivgen == "essiv" && ivhash == nil { ivhash = .sha256 }
        return LuksCreateParameters(keySecret: o.text(prefix + "key-secret"),
                                    settings: LuksCipherSettings(algorithm: alg, mode: mode, ivgen: ivgen,
                                                                 ivgenHash: ivhash, hash: hash),
                                    iterTimeMs: o.number(prefix + "iter-time") ?? defaultIterTimeMs,
                                    unmappedAlgorithm: alg == "des" || alg == "3des")
    }

    /// The passphrase (qemu looks it up before anything else of the volume is made).
    func password(_ secrets: [String: String], prefix: String) throws -> [UInt8] {
        guard let id = keySecret else { throw InstarError.invalid("Parameter '\(prefix)key-secret' is required for cipher") }
        guard let s = secrets[id] else { throw InstarError.invalid("No secret with id '\(id)'") }
        return Array(s.utf8)
    }

    /// qcrypto_block_luks_create's checks of the cipher after the secret: a LUKS name for the algorithm, an
    /// ESSIV cipher of the right key size, and a cipher this build can run.
    func validateCipher() throws {
        if unmappedAlgorithm { throw InstarError.invalid("Algorithm '\(settings.algorithm)' not supported") }
        if settings.ivgen == "essiv", let h = settings.ivgenHash {
            try LuksInfo.checkEssivCipher(settings.algorithm, digestBytes: h.digestLength)
        }
        guard settings.keyBytes > 0 else {
            throw InstarError.unsupported("Cipher algorithm '\(settings.algorithm)' is not supported by this build")
        }
        _ = try settings.sectorCipher(key: [UInt8](repeating: 0, count: settings.keyBytes))
        // qemu 7.2 encrypts the split key in whole sectors and aborts (an assertion) when 4000 stripes of the
        // key do not fill whole sectors (24-byte keys outside XTS); such a volume is refused instead.
        if (settings.keyBytes * Int(LuksHeader.stripes)) % Int(LuksHeader.sectorSize) != 0 {
            throw InstarError.unsupported("Cipher '\(settings.algorithm)' in mode '\(settings.mode)' is not supported: "
                + "its key material does not fill whole sectors")
        }
    }

    /// Bytes of the LUKS header and the eight slots' key material (qcrypto_block_calculate_payload_offset).
    var headerBytes: UInt64 {
        let sectors = LuksHeader.keyMaterialSectors(keyBytes: UInt64(settings.keyBytes), stripes: UInt64(LuksHeader.stripes))
        return (LuksHeader.headerSectors + UInt64(LuksHeader.slotCount) * sectors) * LuksHeader.sectorSize
    }
}
