import CGcrypt
import Glibc

/// libgcrypt, the one crypto library the engine uses (hashes, PBKDF2, block ciphers, random bytes).
enum Gcrypt {
    /// libgcrypt must be set up once before any other call; a static's initializer runs exactly once, even
    /// when several threads get here together.
    private static let ready: Bool = {
        instar_gcry_init()
        return true
    }()

    static func ensureReady() {
        _ = ready
    }

    /// Bytes from libgcrypt's strong RNG (master keys, salts, anti-forensic stripes, UUIDs).
    static func randomBytes(_ count: Int) -> [UInt8] {
        ensureReady()
        var out = [UInt8](repeating: 0, count: count)
        if count > 0 {
            out.withUnsafeMutableBytes { gcry_randomize($0.baseAddress, $0.count, GCRY_STRONG_RANDOM) }
        }
        return out
    }

    static func error(_ what: String, _ err: gcry_error_t) -> InstarError {
        let text = gcry_strerror(err).map { String(cString: $0) } ?? "error \(err)"
        return InstarError(.io, "\(what): \(text)", errno: EIO)
    }
}

/// The hash algorithms LUKS names (qemu's QCryptoHashAlgorithm names).
enum LuksHash: String, CaseIterable {
    case md5, sha1, sha224, sha256, sha384, sha512, ripemd160

    var gcryAlgo: Int32 {
        switch self {
        case .md5: return Int32(GCRY_MD_MD5.rawValue)
        case .sha1: return Int32(GCRY_MD_SHA1.rawValue)
        case .sha224: return Int32(GCRY_MD_SHA224.rawValue)
        case .sha256: return Int32(GCRY_MD_SHA256.rawValue)
        case .sha384: return Int32(GCRY_MD_SHA384.rawValue)
        case .sha512: return Int32(GCRY_MD_SHA512.rawValue)
        case .ripemd160: return Int32(GCRY_MD_RMD160.rawValue)
        }
    }

    var digestLength: Int {
        switch self {
        case .md5: return 16
        case .sha1, .ripemd160: return 20
        case .sha224: return 28
        case .sha256: return 32
        case .sha384: return 48
        case .sha512: return 64
        }
    }

    func digest(_ parts: [[UInt8]]) -> [UInt8] {
        Gcrypt.ensureReady()
        var data: [UInt8] = []
        for p in parts { data += p }
        var out = [UInt8](repeating: 0, count: digestLength)
        out.withUnsafeMutableBytes { o in
            data.withUnsafeBytes { d in gcry_md_hash_buffer(gcryAlgo, o.baseAddress, d.baseAddress, d.count) }
        }
        return out
    }

    /// PBKDF2 (RFC 2898) with this hash as the PRF.
    func pbkdf2(password: [UInt8], salt: [UInt8], iterations: UInt64, length: Int) throws -> [UInt8] {
        Gcrypt.ensureReady()
        guard iterations > 0, iterations <= UInt64(UInt.max) else { throw InstarError.invalid("Invalid PBKDF2 iteration count \(iterations)") }
        var out = [UInt8](repeating: 0, count: length)
        let err = out.withUnsafeMutableBytes { o in
            password.withUnsafeBytes { p in
                salt.withUnsafeBytes { s in
                    gcry_kdf_derive(p.baseAddress, p.count, Int32(GCRY_KDF_PBKDF2.rawValue), gcryAlgo,
                                    s.baseAddress, s.count, UInt(iterations), o.count, o.baseAddress)
                }
            }
        }
        if err != 0 { throw Gcrypt.error("PBKDF2 failed", err) }
        return out
    }
}

/// One keyed libgcrypt cipher handle.
final class GcryptCipher {
    private var handle: gcry_cipher_hd_t?
    let blockLength: Int

    init(algo: Int32, mode: Int32, key: [UInt8]) throws {
        Gcrypt.ensureReady()
        var h: gcry_cipher_hd_t?
        var err = gcry_cipher_open(&h, algo, mode, 0)
        if err != 0 { throw Gcrypt.error("Cannot initialize cipher", err) }
        handle = h
        blockLength = gcry_cipher_get_algo_blklen(algo)
        err = key.withUnsafeBytes { gcry_cipher_setkey(h, $0.baseAddress, $0.count) }
        if err != 0 { throw Gcrypt.error("Cannot set key", err) }
    }

    deinit {
        if let h = handle { gcry_cipher_close(h) }
    }

    func setIV(_ iv: [UInt8], counter: Bool) throws {
        let err = iv.withUnsafeBytes { b -> gcry_error_t in
            counter ? gcry_cipher_setctr(handle, b.baseAddress, b.count) : gcry_cipher_setiv(handle, b.baseAddress, b.count)
        }
        if err != 0 { throw Gcrypt.error("Cannot set IV", err) }
    }

    /// Encrypts or decrypts `buffer` in place.
    func apply(_ buffer: UnsafeMutableRawBufferPointer, encrypt: Bool) throws {
        if buffer.isEmpty { return }
        let err = encrypt
            ? gcry_cipher_encrypt(handle, buffer.baseAddress, buffer.count, nil, 0)
            : gcry_cipher_decrypt(handle, buffer.baseAddress, buffer.count, nil, 0)
        if err != 0 { throw Gcrypt.error(encrypt ? "Cannot encrypt data" : "Cannot decrypt data", err) }
    }
}
