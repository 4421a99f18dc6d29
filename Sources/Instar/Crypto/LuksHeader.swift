import Glibc

/// The LUKS1 header (cryptsetup's LUKS1 on-disk format, version 1.2.1): 592 big-endian bytes, then the key
/// material of eight key slots, then the payload. Decoding checks what qemu's qcrypto_block_luks_check_header
/// checks, with its messages, so every offset and count is bounded before use.
struct LuksHeader {
    struct KeySlot {
        var active: UInt32
        var iterations: UInt32
        var salt: [UInt8]
        /// In 512-byte sectors from the start of the header.
        var keyOffsetSector: UInt32
        var stripes: UInt32
        var isActive: Bool { active == LuksHeader.slotEnabled }
    }

    static let magic: [UInt8] = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]
    static let byteCount = 592
    static let sectorSize: UInt64 = 512
    static let slotCount = 8
    static let stripes: UInt32 = 4000
    static let saltBytes = 32
    static let digestBytes = 20
    static let slotEnabled: UInt32 = 0x00ac_71f3
    static let slotDisabled: UInt32 = 0x0000_dead
    /// The key slots start 4 KiB into the header.
    static let headerSectors: UInt64 = 4096 / 512
    /// qemu's minimum iteration counts for new headers.
    static let minSlotIterations: UInt64 = 1000
    static let minMasterKeyIterations: UInt64 = 1000
    /// PBKDF2 iteration counts instar is willing to run when unlocking. qemu has no limit, so a hostile image
    /// could make it spin for hours; a slot made with qemu's default 2 s on a fast machine stays well below.
    #if INSTAR_FUZZ
    /// The fuzz build (fuzz/run.sh) bounds each input's work: its seeds are made with qemu's smallest iter-time.
    static let maxIterations: UInt32 = 1 << 16
    #else
    static let maxIterations: UInt32 = 1 << 26
    #endif

    var cipherName: String
    var cipherMode: String
    var hashSpec: String
    var payloadOffsetSector: UInt32
    var keyBytes: UInt32
    var masterKeyDigest: [UInt8]
    var masterKeySalt: [UInt8]
    var masterKeyIterations: UInt32
    var uuid: String
    var slots: [KeySlot]

    init(cipherName: String, cipherMode: String, hashSpec: String, payloadOffsetSector: UInt32, keyBytes: UInt32,
         masterKeyDigest: [UInt8], masterKeySalt: [UInt8], masterKeyIterations: UInt32, uuid: String, slots: [KeySlot]) {
        self.cipherName = cipherName
        self.cipherMode = cipherMode
        self.hashSpec = hashSpec
        self.payloadOffsetSector = payloadOffsetSector
        self.keyBytes = keyBytes
        self.masterKeyDigest = masterKeyDigest
        self.masterKeySalt = masterKeySalt
        self.masterKeyIterations = masterKeyIterations
        self.uuid = uuid
        self.slots = slots
    }

    init(bytes: [UInt8]) throws {
        let r = ByteReader(bytes, what: "LUKS header")
        guard try r.slice(at: 0, count: 6) == LuksHeader.magic else {
            throw InstarError.invalid("Volume is not in LUKS format")
        }
        let version = try r.u16be(at: 6)
        guard version == 1 else { throw InstarError.unsupported("LUKS version \(version) is not supported") }
        func field(_ at: Int, _ count: Int, _ what: String) throws -> String {
            let raw = try r.slice(at: at, count: count)
            guard let nul = raw.firstIndex(of: 0) else {
                throw InstarError.invalid("LUKS header \(what) is not NUL terminated")
            }
            return String(decoding: raw[raw.startIndex..<nul], as: UTF8.self)
        }
        cipherName = try field(8, 32, "cipher name")
        cipherMode = try field(40, 32, "cipher mode")
        hashSpec = try field(72, 32, "hash spec")
        payloadOffsetSector = try r.u32be(at: 104)
        keyBytes = try r.u32be(at: 108)
        masterKeyDigest = try r.slice(at: 112, count: LuksHeader.digestBytes)
        masterKeySalt = try r.slice(at: 132, count: LuksHeader.saltBytes)
        masterKeyIterations = try r.u32be(at: 164)
        let u = try r.slice(at: 168, count: 40)
        uuid = String(decoding: u.prefix(while: { $0 != 0 }), as: UTF8.self)
        var slots: [KeySlot] = []
        for i in 0..<LuksHeader.slotCount {
            let base = 208 + i * 48
            slots.append(KeySlot(active: try r.u32be(at: base), iterations: try r.u32be(at: base + 4),
                                 salt: try r.slice(at: base + 8, count: LuksHeader.saltBytes),
                                 keyOffsetSector: try r.u32be(at: base + 40), stripes: try r.u32be(at: base + 44)))
        }
        self.slots = slots
        try check()
    }

    /// Sectors of one slot's key material: the split key rounded up to sectors, then to the header's 4 KiB.
    static func keyMaterialSectors(keyBytes: UInt64, stripes: UInt64) -> UInt64 {
        let sectors = (keyBytes &* stripes).divCeil(sectorSize)
        return sectors.divCeil(headerSectors) &* headerSectors
    }

    /// qemu's header checks, in its order.
    func check() throws {
        if UInt64(payloadOffsetSector) < LuksHeader.headerSectors {
            throw InstarError.invalid("LUKS payload is overlapping with the header")
        }
        if masterKeyIterations == 0 { throw InstarError.invalid("LUKS key iteration count is zero") }
        // qemu does this arithmetic in 32-bit unsigned ints, so a huge offset can wrap past the checks; the
        // read of the key material is bounded by the extension header later, as in qemu.
        let kb = UInt64(keyBytes)
        func sectors(_ stripes: UInt32) -> UInt32 {
            UInt32(truncatingIfNeeded: LuksHeader.keyMaterialSectors(keyBytes: kb, stripes: UInt64(stripes)))
        }
        for (i, s) in slots.enumerated() {
            if s.stripes != LuksHeader.stripes {
                throw InstarError.invalid("Keyslot \(i) is corrupted (stripes \(Int32(bitPattern: s.stripes)) != \(LuksHeader.stripes))")
            }
            if s.active != LuksHeader.slotDisabled && s.active != LuksHeader.slotEnabled {
                throw InstarError.invalid("Keyslot \(i) state (active/disable) is corrupted")
            }
            if s.isActive && s.iterations == 0 { throw InstarError.invalid("Keyslot \(i) iteration count is zero") }
            let start1 = s.keyOffsetSector
            let len1 = sectors(s.stripes)
            if UInt64(start1) < LuksHeader.headerSectors {
                throw InstarError.invalid("Keyslot \(i) is overlapping with the LUKS header")
            }
            if start1 &+ len1 > payloadOffsetSector {
                throw InstarError.invalid("Keyslot \(i) is overlapping with the encrypted payload")
            }
            for j in (i + 1)..<LuksHeader.slotCount {
                let t = slots[j]
                let start2 = t.keyOffsetSector
                let len2 = sectors(t.stripes)
                if start1 &+ len1 > start2 && start2 &+ len2 > start1 {
                    throw InstarError.invalid("Keyslots \(i) and \(j) are overlapping in the header")
                }
            }
        }
    }

    /// The 592 header bytes.
    func encoded() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: LuksHeader.byteCount)
        func put(_ at: Int, _ bytes: [UInt8]) { for (i, x) in bytes.enumerated() { b[at + i] = x } }
        func put32(_ at: Int, _ v: UInt32) { put(at, [UInt8(v >> 24), UInt8((v >> 16) & 0xff), UInt8((v >> 8) & 0xff), UInt8(v & 0xff)]) }
        put(0, LuksHeader.magic)
        b[7] = 1
        put(8, Array(cipherName.utf8.prefix(31)))
        put(40, Array(cipherMode.utf8.prefix(31)))
        put(72, Array(hashSpec.utf8.prefix(31)))
        put32(104, payloadOffsetSector)
        put32(108, keyBytes)
        put(112, masterKeyDigest)
        put(132, masterKeySalt)
        put32(164, masterKeyIterations)
        put(168, Array(uuid.utf8.prefix(39)))
        for (i, s) in slots.enumerated() {
            let base = 208 + i * 48
            put32(base, s.active)
            put32(base + 4, s.iterations)
            put(base + 8, s.salt)
            put32(base + 40, s.keyOffsetSector)
            put32(base + 44, s.stripes)
        }
        return b
    }
}

/// The payload cipher parameters of a LUKS volume, as qemu names them.
struct LuksCipherSettings {
    var algorithm: String      // "aes-256"
    var mode: String           // "xts"
    var ivgen: String          // "plain64"
    var ivgenHash: LuksHash?
    var hash: LuksHash

    /// The master key size; algorithms this build cannot run (twofish-192 through libgcrypt) still get the
    /// size their name gives, so the layout of a volume can be computed.
    var keyBytes: Int {
        var base = (try? LuksSectorCipher.keyBytes(algorithm)) ?? 0
        if base == 0, algorithm.hasPrefix("twofish-") || algorithm.hasPrefix("serpent-") || algorithm.hasPrefix("aes-"),
           let bits = algorithm.split(separator: "-").last.flatMap({ Int($0) }) {
            base = bits / 8
        }
        return base * (mode == "xts" ? 2 : 1)
    }

    func sectorCipher(key: [UInt8]) throws -> LuksSectorCipher {
        try LuksSectorCipher(algorithm: algorithm, mode: mode, ivgen: ivgen, ivgenHash: ivgenHash, key: key)
    }
}

/// Unlocking and creating LUKS1 volumes.
enum Luks {
    /// Finds the master key with `password`: each active slot in turn, PBKDF2 of the password gives the slot
    /// key, which decrypts the slot's key material; the merged result is the master key when its PBKDF2 digest
    /// matches the header's. `readKeyMaterial(offset, count)` reads bytes at an offset from the header start.
    static func unlock(header: LuksHeader, settings: LuksCipherSettings, password: [UInt8],
                       readKeyMaterial: (UInt64, Int) throws -> [UInt8]) throws -> [UInt8] {
        let keyBytes = Int(header.keyBytes)
        guard keyBytes == settings.keyBytes, keyBytes > 0, keyBytes <= 128 else {
            throw InstarError.invalid("LUKS key size \(header.keyBytes) does not match the cipher")
        }
        if header.masterKeyIterations > LuksHeader.maxIterations {
            throw InstarError.unsupported("LUKS master key digest needs \(header.masterKeyIterations) PBKDF2 iterations, "
                + "more than the limit of \(LuksHeader.maxIterations)")
        }
        for i in header.slots.indices {
            if let key = try loadKey(header: header, slot: i, settings: settings, password: password,
                                     readKeyMaterial: readKeyMaterial) {
                return key
            }
        }
        throw InstarError(.permission, "Invalid password, cannot unlock any keyslot", errno: EACCES)
    }

    /// qemu's qcrypto_block_luks_load_key: the master key when slot `index` is active and `password` opens it,
    /// nil otherwise. The caller has checked the key size against the cipher and the master key's iterations.
    static func loadKey(header: LuksHeader, slot index: Int, settings: LuksCipherSettings, password: [UInt8],
                        readKeyMaterial: (UInt64, Int) throws -> [UInt8]) throws -> [UInt8]? {
        guard header.slots.indices.contains(index) else { return nil }
        let slot = header.slots[index]
        guard slot.isActive else { return nil }
        let keyBytes = Int(header.keyBytes)
        guard keyBytes == settings.keyBytes, keyBytes > 0, keyBytes <= 128 else {
            throw InstarError.invalid("LUKS key size \(header.keyBytes) does not match the cipher")
        }
        if header.masterKeyIterations > LuksHeader.maxIterations {
            throw InstarError.unsupported("LUKS master key digest needs \(header.masterKeyIterations) PBKDF2 iterations, "
                + "more than the limit of \(LuksHeader.maxIterations)")
        }
        if slot.iterations > LuksHeader.maxIterations {
            throw InstarError.unsupported("LUKS key slot \(index) needs \(slot.iterations) PBKDF2 iterations, "
                + "more than the limit of \(LuksHeader.maxIterations)")
        }
        let slotKey = try settings.hash.pbkdf2(password: password, salt: slot.salt,
                                               iterations: UInt64(slot.iterations), length: keyBytes)
        let stripes = Int(slot.stripes)   // checked to be 4000 by the header check
        let length = keyBytes * stripes
        // The key material and the anti-forensic merge's buffer, held while the slot is tried.
        let candidate = try CallBudget.withReserved(2 * length, what: "the LUKS key material of key slot \(index)") {
            var material = try readKeyMaterial(UInt64(slot.keyOffsetSector) * LuksHeader.sectorSize, length)
            try settings.sectorCipher(key: slotKey).process(&material, firstSector: 0, encrypt: false)
            return try LuksAntiForensic.merge(material, keyBytes: keyBytes, stripes: stripes, hash: settings.hash)
        }
        let digest = try settings.hash.pbkdf2(password: candidate, salt: header.masterKeySalt,
                                              iterations: UInt64(header.masterKeyIterations),
                                              length: LuksHeader.digestBytes)
        return digest == header.masterKeyDigest ? candidate : nil
    }

    /// PBKDF2 iterations per second of this thread's CPU time, chosen by qemu's qcrypto_pbkdf2_count_iters
    /// algorithm (start at 2^15; ×10 while a run takes under 100 ms, rescale to one second while it takes
    /// 100–500 ms, stop once it takes over 500 ms) but timed in nanoseconds. qemu times in milliseconds and
    /// gives up ("Unable to get accurate CPU usage") when a run reads as 0 ms, which a coarse, tick-based
    /// thread clock does on a busy machine; a run that reads as 0 ns here is simply grown again, so the count
    /// comes out as qemu's would on a precise clock and creation never fails for want of clock resolution.
    static func iterationsPerSecond(hash: LuksHash, password: [UInt8], salt: [UInt8], length: Int) throws -> UInt64 {
        let nanosPerSecond: UInt64 = 1_000_000_000
        var iterations: UInt64 = 1 << 15
        // Each round either stops or grows the count; this bounds the loop even if the clock never moves.
        for _ in 0..<64 {
            let start = threadCPUNanoseconds()
            _ = try hash.pbkdf2(password: password, salt: salt, iterations: iterations, length: length)
            let elapsed = threadCPUNanoseconds() &- start
            if elapsed > 500_000_000 {
                return scaled(iterations, nanosPerSecond, elapsed)
            } else if elapsed < 100_000_000 {
                guard iterations <= UInt64(UInt32.max) else { break }
                iterations *= 10
            } else {
                iterations = scaled(iterations, nanosPerSecond, elapsed)
            }
        }
        throw InstarError(.range, "PBKDF2 iteration count does not fit in 32 bits", errno: ERANGE)
    }

    /// `value * numerator / denominator` without overflow (saturating at UInt64.max).
    private static func scaled(_ value: UInt64, _ numerator: UInt64, _ denominator: UInt64) -> UInt64 {
        guard denominator > 0 else { return UInt64.max }
        let product = value.multipliedFullWidth(by: numerator)
        guard product.high < denominator else { return UInt64.max }
        return denominator.dividingFullWidth(product).quotient
    }

    /// This thread's CPU time in nanoseconds (CLOCK_THREAD_CPUTIME_ID).
    static func threadCPUNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return UInt64(max(ts.tv_sec, 0)) &* 1_000_000_000 &+ UInt64(max(ts.tv_nsec, 0))
    }

    /// A version 4 UUID from the RNG, in lower-case text.
    static func randomUUID() -> String {
        var b = Gcrypt.randomBytes(16)
        b[6] = (b[6] & 0x0f) | 0x40
        b[8] = (b[8] & 0x3f) | 0x80
        let hex = b.map { x -> String in
            let s = String(x, radix: 16)
            return s.count == 1 ? "0" + s : s
        }
        return hex[0..<4].joined() + "-" + hex[4..<6].joined() + "-" + hex[6..<8].joined() + "-"
            + hex[8..<10].joined() + "-" + hex[10..<16].joined()
    }

    /// A new volume as qemu's qcrypto_block_luks_create makes it: random master key and salts, iterations
    /// scaled from `iterTimeMs`, slot 0 holding the master key for `password`. Returns the header, the
    /// master key and slot 0's encrypted key material (at `slots[0].keyOffsetSector`).
    static func create(settings: LuksCipherSettings, password: [UInt8], iterTimeMs: UInt64)
        throws -> (header: LuksHeader, masterKey: [UInt8], keyMaterial: [UInt8]) {
        let keyBytes = settings.keyBytes
        guard keyBytes > 0, let family = LuksSectorCipher.family(settings.algorithm) else {
            throw InstarError.unsupported("Cipher algorithm '\(settings.algorithm)' is not supported")
        }
        let masterSalt = Gcrypt.randomBytes(LuksHeader.saltBytes)
        let masterKey = Gcrypt.randomBytes(keyBytes)
        // Validates the payload cipher before the slow part.
        _ = try settings.sectorCipher(key: masterKey)

        var iters = try iterationsPerSecond(hash: settings.hash, password: masterKey, salt: masterSalt,
                                            length: LuksHeader.digestBytes)
        if iterTimeMs > 0 && iters > UInt64.max / iterTimeMs {
            throw InstarError(.range, "PBKDF iterations \(iters) too large to scale", errno: ERANGE)
        }
        iters = iters * iterTimeMs / 1000 / 8
        if iters > UInt64(UInt32.max) {
            throw InstarError(.range, "PBKDF iterations \(iters) larger than \(UInt32.max)", errno: ERANGE)
        }
        let masterIters = max(iters, LuksHeader.minMasterKeyIterations)
        let digest = try settings.hash.pbkdf2(password: masterKey, salt: masterSalt, iterations: masterIters,
                                              length: LuksHeader.digestBytes)

        let materialSectors = LuksHeader.keyMaterialSectors(keyBytes: UInt64(keyBytes), stripes: UInt64(LuksHeader.stripes))
        var slots: [LuksHeader.KeySlot] = []
        for i in 0..<LuksHeader.slotCount {
            slots.append(LuksHeader.KeySlot(active: LuksHeader.slotDisabled, iterations: 0,
                                            salt: [UInt8](repeating: 0, count: LuksHeader.saltBytes),
                                            keyOffsetSector: UInt32(LuksHeader.headerSectors + UInt64(i) * materialSectors),
                                            stripes: LuksHeader.stripes))
        }
        let slotSalt = Gcrypt.randomBytes(LuksHeader.saltBytes)
        var slotIters = try iterationsPerSecond(hash: settings.hash, password: password, salt: slotSalt, length: keyBytes)
        if iterTimeMs > 0 && slotIters > UInt64.max / iterTimeMs {
            throw InstarError(.range, "PBKDF iterations \(slotIters) too large to scale", errno: ERANGE)
        }
        slotIters = slotIters * iterTimeMs / 1000
        if slotIters > UInt64(UInt32.max) {
            throw InstarError(.range, "PBKDF iterations \(slotIters) larger than \(UInt32.max)", errno: ERANGE)
        }
        slotIters = max(slotIters, LuksHeader.minSlotIterations)
        let slotKey = try settings.hash.pbkdf2(password: password, salt: slotSalt, iterations: slotIters, length: keyBytes)
        var material = LuksAntiForensic.split(masterKey, stripes: Int(LuksHeader.stripes), hash: settings.hash)
        try settings.sectorCipher(key: slotKey).process(&material, firstSector: 0, encrypt: true)
        slots[0].active = LuksHeader.slotEnabled
        slots[0].iterations = UInt32(slotIters)
        slots[0].salt = slotSalt

        var modeSpec = "\(settings.mode)-\(settings.ivgen)"
        if let h = settings.ivgenHash { modeSpec += ":\(h.rawValue)" }
        let header = LuksHeader(cipherName: family, cipherMode: modeSpec, hashSpec: settings.hash.rawValue,
                                payloadOffsetSector: UInt32(LuksHeader.headerSectors + UInt64(LuksHeader.slotCount) * materialSectors),
                                keyBytes: UInt32(keyBytes), masterKeyDigest: digest, masterKeySalt: masterSalt,
                                masterKeyIterations: UInt32(masterIters), uuid: randomUUID(), slots: slots)
        return (header, masterKey, material)
    }
}
