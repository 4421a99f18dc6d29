/// A LUKS1 header's cipher parameters as qemu names them, decoded the way qemu's qcrypto_block_luks_parse_header
/// does (same order, same messages), for `qemu-img info`'s LUKS block and for unlocking. Both a native luks
/// image and a LUKS-encrypted qcow2 (whose header lives in its own clusters) use it.
struct LuksInfo: Equatable {
    struct Slot: Equatable {
        var active: Bool
        var iterations: UInt32
        var stripes: UInt32
        var keyOffset: UInt64
    }

    var cipherAlg: String
    var cipherMode: String
    var ivgenAlg: String
    var ivgenHashAlg: String?
    var hashAlg: String
    var payloadOffset: UInt64
    var masterKeyIterations: UInt32
    var uuid: String
    var slots: [Slot]

    static let headerBytes = LuksHeader.byteCount

    /// qemu 7.2's QAPI enums (QCryptoCipherAlgorithm, QCryptoCipherMode, QCryptoIVGenAlgorithm,
    /// QCryptoHashAlgorithm): the values its option visitor accepts.
    static let cipherAlgorithms = ["aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128",
                                   "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256"]
    static let cipherModes = ["ecb", "cbc", "xts", "ctr"]
    static let ivgenAlgorithms = ["plain", "plain64", "essiv"]
    static let hashes = ["md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"]
    /// The LUKS cipher names qemu maps, with the key sizes (bytes) each takes.
    static let families: [(name: String, keyBytes: [Int])] = [
        ("aes", [16, 24, 32]), ("cast5", [16]), ("serpent", [16, 24, 32]), ("twofish", [16, 24, 32]),
    ]

    /// Decodes and checks the header bytes (qemu's load, check and parse steps).
    init(bytes: [UInt8]) throws {
        try self.init(header: try LuksHeader(bytes: bytes))
    }

    /// qemu's parse step over a header that passed the checks.
    init(header h: LuksHeader) throws {
        // "<mode>-<ivgen>[:<ivgen hash>]", e.g. "xts-plain64", "cbc-essiv:sha256".
        let spec = Array(h.cipherMode.utf8)
        guard let dash = spec.firstIndex(of: UInt8(ascii: "-")) else {
            throw InstarError.invalid("Unexpected cipher mode string format '\(h.cipherMode)'")
        }
        let modeName = String(decoding: spec[..<dash], as: UTF8.self)
        var ivgenPart = Array(spec[(dash + 1)...])
        var ivHash: String?
        if let colon = ivgenPart.firstIndex(of: UInt8(ascii: ":")) {
            let name = String(decoding: ivgenPart[(colon + 1)...], as: UTF8.self)
            guard LuksInfo.hashes.contains(name) else { throw InstarError.invalid("Hash algorithm '\(name)' not supported") }
            ivHash = name
            ivgenPart = Array(ivgenPart[..<colon])
        }
        guard LuksInfo.cipherModes.contains(modeName) else {
            throw InstarError.invalid("Cipher mode '\(modeName)' not supported")
        }
        var keyBytes = h.keyBytes
        if modeName == "xts" { keyBytes /= 2 }
        guard let family = LuksInfo.families.first(where: { $0.name == h.cipherName }),
              family.keyBytes.contains(Int(keyBytes)) else {
            throw InstarError.invalid("Algorithm '\(h.cipherName)' with key size \(Int32(bitPattern: keyBytes)) bytes not supported")
        }
        let alg = "\(family.name)-\(keyBytes * 8)"
        guard LuksInfo.hashes.contains(h.hashSpec) else {
            throw InstarError.invalid("Hash algorithm '\(h.hashSpec)' not supported")
        }
        let ivgen = String(decoding: ivgenPart, as: UTF8.self)
        guard LuksInfo.ivgenAlgorithms.contains(ivgen) else {
            throw InstarError.invalid("IV generator '\(ivgen)' not supported")
        }
        if ivgen == "essiv" {
            guard let hash = ivHash.flatMap({ LuksHash(rawValue: $0) }) else {
                throw InstarError.invalid("Missing IV generator hash specification")
            }
            try LuksInfo.checkEssivCipher(alg, digestBytes: hash.digestLength)
        }
        cipherAlg = alg
        cipherMode = modeName
        ivgenAlg = ivgen
        ivgenHashAlg = ivgen == "essiv" ? ivHash : nil
        hashAlg = h.hashSpec
        payloadOffset = UInt64(h.payloadOffsetSector) * LuksHeader.sectorSize
        masterKeyIterations = h.masterKeyIterations
        uuid = h.uuid
        slots = h.slots.map { s in
            Slot(active: s.isActive, iterations: s.iterations, stripes: s.stripes,
                 keyOffset: UInt64(s.keyOffsetSector) * LuksHeader.sectorSize)
        }
    }

    /// qemu's qcrypto_block_luks_essiv_cipher: ESSIV keys a cipher of the same family with the hash digest,
    /// so the family must have that key size.
    static func checkEssivCipher(_ alg: String, digestBytes: Int) throws {
        let family = alg.split(separator: "-").first.map(String.init) ?? alg
        let names = ["aes": "AES", "serpent": "Serpent", "twofish": "Twofish"]
        guard let shown = names[family] else {
            throw InstarError.invalid("Cipher \(alg) not supported with essiv")
        }
        guard [16, 24, 32].contains(digestBytes) else {
            throw InstarError.invalid("No \(shown) cipher with key size \(digestBytes) available")
        }
    }

    /// The payload cipher parameters.
    var settings: LuksCipherSettings {
        LuksCipherSettings(algorithm: cipherAlg, mode: cipherMode, ivgen: ivgenAlg,
                           ivgenHash: ivgenHashAlg.flatMap { LuksHash(rawValue: $0) },
                           hash: LuksHash(rawValue: hashAlg) ?? .sha256)
    }

    /// qemu's QCryptoBlockInfoLUKS in QAPI declaration order; qcow2's encrypt block puts "format" first.
    func qobject(withFormat: Bool) -> QObject {
        var members: [(String, QObject)] = withFormat ? [("format", .string("luks"))] : []
        members += [("cipher-alg", .string(cipherAlg)), ("cipher-mode", .string(cipherMode)),
                    ("ivgen-alg", .string(ivgenAlg))]
        if let h = ivgenHashAlg { members.append(("ivgen-hash-alg", .string(h))) }
        members.append(("hash-alg", .string(hashAlg)))
        members.append(("payload-offset", .int(Int64(payloadOffset))))
        members.append(("master-key-iters", .int(Int64(masterKeyIterations))))
        members.append(("uuid", .string(uuid)))
        members.append(("slots", .list(slots.map { s in
            var m: [(String, QObject)] = [("active", .bool(s.active))]
            if s.active {
                m.append(("iters", .int(Int64(s.iterations))))
                m.append(("stripes", .int(Int64(s.stripes))))
            }
            m.append(("key-offset", .int(Int64(s.keyOffset))))
            return .dict(m)
        })))
        return .dict(members)
    }

    var qobject: QObject { qobject(withFormat: true) }
}

/// The name qcow2's code knows the shared LUKS description by.
typealias Qcow2LuksInfo = LuksInfo
