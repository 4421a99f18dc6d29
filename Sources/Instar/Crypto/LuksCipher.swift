import CGcrypt

/// A LUKS payload or key-material cipher: the block cipher in its mode, with the IV generator that gives each
/// 512-byte sector its IV (qemu's QCryptoCipher + QCryptoIVGen, driven per sector as
/// qcrypto_block_cipher_encrypt_helper does).
final class LuksSectorCipher {
    static let sectorSize = 512

    enum IVGen {
        case none
        /// Sector number, truncated to 32 bits, little-endian.
        case plain
        /// Sector number, 64 bits, little-endian.
        case plain64
        /// plain64, then encrypted (ECB) with a cipher keyed by the hash of the key.
        case essiv(GcryptCipher)
    }

    private let cipher: GcryptCipher
    private let ivgen: IVGen
    private let ivLength: Int
    private let counterMode: Bool

    /// The cipher for qemu's algorithm name ("aes-256", "serpent-128", "cast5-128", "sm4"), mode name
    /// ("xts", "cbc", "ecb", "ctr"), IV generator ("plain", "plain64", "essiv") and ESSIV hash, keyed with `key`
    /// (twice the cipher's key size for XTS).
    init(algorithm: String, mode: String, ivgen ivgenName: String, ivgenHash: LuksHash?, key: [UInt8]) throws {
        let algo = try LuksSectorCipher.gcryAlgorithm(algorithm)
        let gmode: Int32
        switch mode {
        case "ecb": gmode = Int32(GCRY_CIPHER_MODE_ECB.rawValue)
        case "cbc": gmode = Int32(GCRY_CIPHER_MODE_CBC.rawValue)
        case "xts": gmode = Int32(GCRY_CIPHER_MODE_XTS.rawValue)
        case "ctr": gmode = Int32(GCRY_CIPHER_MODE_CTR.rawValue)
        default: throw InstarError.unsupported("Cipher mode '\(mode)' is not supported")
        }
        let keyBytes = try LuksSectorCipher.keyBytes(algorithm) * (mode == "xts" ? 2 : 1)
        guard key.count == keyBytes else {
            throw InstarError.invalid("Cipher key length \(key.count) should be \(keyBytes)")
        }
        cipher = try GcryptCipher(algo: algo, mode: gmode, key: key)
        counterMode = mode == "ctr"
        ivLength = mode == "ecb" ? 0 : cipher.blockLength
        switch ivgenName {
        case "plain": ivgen = ivLength == 0 ? .none : .plain
        case "plain64": ivgen = ivLength == 0 ? .none : .plain64
        case "essiv":
            let hash = ivgenHash ?? .sha256
            let essivKey = hash.digest([key])
            let essivAlg = try LuksSectorCipher.essivAlgorithm(algorithm, keyBytes: essivKey.count)
            ivgen = .essiv(try GcryptCipher(algo: try LuksSectorCipher.gcryAlgorithm(essivAlg),
                                            mode: Int32(GCRY_CIPHER_MODE_ECB.rawValue), key: essivKey))
        default: throw InstarError.unsupported("IV generator '\(ivgenName)' is not supported")
        }
    }

    /// Encrypts or decrypts `buffer` in place, sector by sector (a shorter last piece is processed alone);
    /// its first sector is `firstSector`.
    func process(_ buffer: UnsafeMutableRawBufferPointer, firstSector: UInt64, encrypt: Bool) throws {
        var sector = firstSector
        var pos = 0
        while pos < buffer.count {
            let n = min(LuksSectorCipher.sectorSize, buffer.count - pos)
            if let iv = try iv(for: sector) { try cipher.setIV(iv, counter: counterMode) }
            try cipher.apply(UnsafeMutableRawBufferPointer(rebasing: buffer[pos..<(pos + n)]), encrypt: encrypt)
            pos += n
            sector &+= 1
        }
    }

    func process(_ bytes: inout [UInt8], firstSector: UInt64, encrypt: Bool) throws {
        try bytes.withUnsafeMutableBytes { try process($0, firstSector: firstSector, encrypt: encrypt) }
    }

    private func iv(for sector: UInt64) throws -> [UInt8]? {
        var iv = [UInt8](repeating: 0, count: ivLength)
        switch ivgen {
        case .none:
            return nil
        case .plain:
            for i in 0..<min(4, ivLength) { iv[i] = UInt8(truncatingIfNeeded: sector >> (8 * UInt64(i))) }
        case .plain64:
            for i in 0..<min(8, ivLength) { iv[i] = UInt8(truncatingIfNeeded: sector >> (8 * UInt64(i))) }
        case let .essiv(c):
            var block = [UInt8](repeating: 0, count: max(c.blockLength, 8))
            for i in 0..<8 { block[i] = UInt8(truncatingIfNeeded: sector >> (8 * UInt64(i))) }
            block = Array(block[0..<c.blockLength])
            try block.withUnsafeMutableBytes { try c.apply($0, encrypt: true) }
            for i in 0..<min(ivLength, block.count) { iv[i] = block[i] }
        }
        return iv
    }

    // MARK: algorithm tables (qemu's QCryptoCipherAlgorithm names)

    static let algorithms: [(name: String, family: String, keyBytes: Int, gcry: UInt32)] = [
        ("aes-128", "aes", 16, GCRY_CIPHER_AES.rawValue),
        ("aes-192", "aes", 24, GCRY_CIPHER_AES192.rawValue),
        ("aes-256", "aes", 32, GCRY_CIPHER_AES256.rawValue),
        ("cast5-128", "cast5", 16, GCRY_CIPHER_CAST5.rawValue),
        ("serpent-128", "serpent", 16, GCRY_CIPHER_SERPENT128.rawValue),
        ("serpent-192", "serpent", 24, GCRY_CIPHER_SERPENT192.rawValue),
        ("serpent-256", "serpent", 32, GCRY_CIPHER_SERPENT256.rawValue),
        ("twofish-128", "twofish", 16, GCRY_CIPHER_TWOFISH128.rawValue),
        ("twofish-256", "twofish", 32, GCRY_CIPHER_TWOFISH.rawValue),
        ("sm4", "sm4", 16, GCRY_CIPHER_SM4.rawValue),
    ]

    static func gcryAlgorithm(_ name: String) throws -> Int32 {
        guard let a = algorithms.first(where: { $0.name == name }) else {
            throw InstarError.unsupported("Cipher algorithm '\(name)' is not supported")
        }
        return Int32(a.gcry)
    }

    static func keyBytes(_ name: String) throws -> Int {
        guard let a = algorithms.first(where: { $0.name == name }) else {
            throw InstarError.unsupported("Cipher algorithm '\(name)' is not supported")
        }
        return a.keyBytes
    }

    /// The LUKS header's cipher name for an algorithm ("aes-256" → "aes").
    static func family(_ name: String) -> String? {
        algorithms.first(where: { $0.name == name })?.family
    }

    /// qemu's qcrypto_block_luks_essiv_cipher: the same cipher family, sized to the ESSIV hash's digest.
    static func essivAlgorithm(_ name: String, keyBytes: Int) throws -> String {
        guard let a = algorithms.first(where: { $0.name == name }) else {
            throw InstarError.unsupported("Cipher algorithm '\(name)' is not supported")
        }
        if a.keyBytes == keyBytes { return name }
        guard let b = algorithms.first(where: { $0.family == a.family && $0.keyBytes == keyBytes }) else {
            let fam = a.family == "aes" ? "AES" : a.family == "serpent" ? "Serpent" : a.family == "twofish" ? "Twofish" : a.family
            if a.family == "aes" || a.family == "serpent" || a.family == "twofish" {
                throw InstarError.unsupported("No \(fam) cipher with key size \(keyBytes) available")
            }
            throw InstarError.unsupported("Cipher '\(name)' cannot be used with ESSIV hash with key size \(keyBytes)")
        }
        return b.name
    }
}

/// The LUKS anti-forensic splitter (cryptsetup's AF_split/AF_merge, qemu's afsplit.c): a key is spread over
/// `stripes` blocks so that losing any one block's worth of the key material destroys the key.
enum LuksAntiForensic {
    /// Hashes `block` in digest-sized pieces, each prefixed with its big-endian index.
    static func diffuse(_ block: inout [UInt8], hash: LuksHash) {
        let d = hash.digestLength
        var i = 0
        var offset = 0
        while offset < block.count {
            let len = min(d, block.count - offset)
            let index: [UInt8] = [UInt8(truncatingIfNeeded: i >> 24), UInt8(truncatingIfNeeded: i >> 16),
                                  UInt8(truncatingIfNeeded: i >> 8), UInt8(truncatingIfNeeded: i)]
            let out = hash.digest([index, Array(block[offset..<(offset + len)])])
            for k in 0..<len { block[offset + k] = out[k] }
            offset += len
            i += 1
        }
    }

    /// Splits `key` into `stripes` blocks (random blocks, the last one carrying the key).
    static func split(_ key: [UInt8], stripes: Int, hash: LuksHash) -> [UInt8] {
        let n = key.count
        var out = Gcrypt.randomBytes(n * stripes)
        var acc = [UInt8](repeating: 0, count: n)
        for s in 0..<(stripes - 1) {
            for k in 0..<n { acc[k] ^= out[s * n + k] }
            diffuse(&acc, hash: hash)
        }
        let last = (stripes - 1) * n
        for k in 0..<n { out[last + k] = acc[k] ^ key[k] }
        return out
    }

    /// Joins split key material back into the key of `keyBytes` bytes.
    static func merge(_ material: [UInt8], keyBytes n: Int, stripes: Int, hash: LuksHash) throws -> [UInt8] {
        guard stripes >= 1, material.count == n * stripes else { throw InstarError.corrupt("LUKS key material size mismatch") }
        var acc = [UInt8](repeating: 0, count: n)
        for s in 0..<(stripes - 1) {
            for k in 0..<n { acc[k] ^= material[s * n + k] }
            diffuse(&acc, hash: hash)
        }
        let last = (stripes - 1) * n
        return (0..<n).map { acc[$0] ^ material[last + $0] }
    }
}
