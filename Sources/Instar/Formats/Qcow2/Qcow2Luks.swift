/// The LUKS1 header a LUKS-encrypted qcow2 keeps in its own clusters (qcow2.txt "Full disk encryption header
/// pointer"), decoded for `qemu-img info`'s "encrypt" block (`Qcow2Crypt` unlocks the key from it).
struct Qcow2LuksInfo: Equatable {
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

    // LUKS1 on-disk layout (cryptsetup's LUKS1 spec; big-endian fields).
    static let magic: [UInt8] = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]
    static let headerBytes = 592
    static let sectorSize: UInt64 = 512
    static let slotCount = 8
    static let slotBytes = 48
    static let slotEnabled: UInt32 = 0x00ac_71f3

    /// Decodes the header bytes with qemu's messages for what it refuses.
    init(bytes: [UInt8]) throws {
        let r = ByteReader(bytes, what: "LUKS header")
        guard try r.slice(at: 0, count: 6) == Qcow2LuksInfo.magic else {
            throw InstarError.invalid("Volume is not in LUKS format")
        }
        let version = try r.u16be(at: 6)
        guard version == 1 else { throw InstarError.unsupported("LUKS version \(version) is not supported") }
        let cipherName = try r.string(at: 8, count: 32)
        let modeSpec = try r.string(at: 40, count: 32)
        let hashSpec = try r.string(at: 72, count: 32)
        let payloadSector = try r.u32be(at: 104)
        var keyBytes = try r.u32be(at: 108)
        masterKeyIterations = try r.u32be(at: 164)
        uuid = try r.string(at: 168, count: 40)

        // "xts-plain64", "cbc-essiv:sha256": mode, then the IV generator and its hash.
        let modeParts = modeSpec.split(separator: "-", maxSplits: 1).map(String.init)
        let modeName = modeParts.first ?? ""
        guard ["ecb", "cbc", "xts", "ctr"].contains(modeName) else {
            throw InstarError.invalid("Cipher mode '\(modeName)' is not supported")
        }
        cipherMode = modeName
        guard modeParts.count == 2 else { throw InstarError.invalid("Missing IV generator algorithm in cipher mode spec") }
        let ivParts = modeParts[1].split(separator: ":", maxSplits: 1).map(String.init)
        guard let iv = ivParts.first, ["plain", "plain64", "essiv"].contains(iv) else {
            throw InstarError.invalid("IV generator '\(modeParts[1])' is not supported")
        }
        ivgenAlg = iv
        if iv == "essiv" {
            guard ivParts.count == 2, Qcow2LuksInfo.hashes.contains(ivParts[1]) else {
                throw InstarError.invalid("Missing IV generator hash algorithm")
            }
            ivgenHashAlg = ivParts[1]
        } else {
            ivgenHashAlg = nil
        }
        if modeName == "xts" { keyBytes /= 2 }
        let bits = keyBytes * 8
        let sized: [String: [UInt32]] = ["aes": [128, 192, 256], "serpent": [128, 192, 256],
                                         "twofish": [128, 192, 256], "cast5": [128], "sm4": [128]]
        guard let allowed = sized[cipherName], allowed.contains(bits) else {
            throw InstarError.invalid("Algorithm '\(cipherName)' with key size \(keyBytes) bytes not supported")
        }
        cipherAlg = cipherName == "sm4" ? "sm4" : "\(cipherName)-\(bits)"
        guard Qcow2LuksInfo.hashes.contains(hashSpec) else {
            throw InstarError.invalid("Hash algorithm '\(hashSpec)' is not supported")
        }
        hashAlg = hashSpec
        payloadOffset = UInt64(payloadSector) * Qcow2LuksInfo.sectorSize

        var slots: [Slot] = []
        for i in 0..<Qcow2LuksInfo.slotCount {
            let base = 208 + i * Qcow2LuksInfo.slotBytes
            slots.append(Slot(active: try r.u32be(at: base) == Qcow2LuksInfo.slotEnabled,
                              iterations: try r.u32be(at: base + 4),
                              stripes: try r.u32be(at: base + 44),
                              keyOffset: UInt64(try r.u32be(at: base + 40)) * Qcow2LuksInfo.sectorSize))
        }
        self.slots = slots
    }

    static let hashes = ["md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"]

    /// qemu's ImageInfoSpecificQCow2Encryption for LUKS: "format" first, then QCryptoBlockInfoLUKS in QAPI order.
    var qobject: QObject {
        var members: [(String, QObject)] = [("format", .string("luks")), ("cipher-alg", .string(cipherAlg)),
                                            ("cipher-mode", .string(cipherMode)), ("ivgen-alg", .string(ivgenAlg))]
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
}
