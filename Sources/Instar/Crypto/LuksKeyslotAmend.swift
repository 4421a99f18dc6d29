import Glibc

/// What `qemu-img amend` asks of a LUKS volume's key slots (qemu 7.2's QCryptoBlockAmendOptionsLUKS), read
/// from the `-o` options with a prefix ("" for a luks image, "encrypt." inside qcow2). The checks and messages
/// follow qemu's QAPI visitor: members in declaration order, names shown without the prefix.
struct LuksKeyslotRequest {
    enum State { case active, inactive }

    var state: State
    var newSecret: String?
    var oldSecret: String?
    /// As given; qemu keeps it in a C int, so larger values wrap.
    var keyslot: Int32?
    /// Milliseconds, as qemu's unsigned 64-bit iter_time (a negative value wraps).
    var iterTimeMs: UInt64?

    static func parse(_ options: [AmendOption], prefix: String) throws -> LuksKeyslotRequest {
        func value(_ name: String) -> String? { options.last { $0.name == prefix + name }?.value }
        func integer(_ name: String) throws -> Int64? {
            guard let text = value(name) else { return nil }
            guard case .value(let v) = QemuStrtol.signed(text) else {
                throw InstarError.invalid("Parameter '\(name)' expects integer")
            }
            return v
        }
        guard let stateText = value("state") else { throw InstarError.invalid("Parameter 'state' is missing") }
        let state: State
        switch stateText {
        case "active": state = .active
        case "inactive": state = .inactive
        default: throw InstarError.invalid("Parameter 'state' does not accept value '\(stateText)'")
        }
        let newSecret = value("new-secret")
        let oldSecret = value("old-secret")
        let keyslot = try integer("keyslot").map { Int32(truncatingIfNeeded: $0) }
        let iterTime = try integer("iter-time").map { UInt64(bitPattern: $0) }
        return LuksKeyslotRequest(state: state, newSecret: newSecret, oldSecret: oldSecret, keyslot: keyslot,
                                  iterTimeMs: iterTime)
    }
}

/// Where a LUKS volume's header and key material live: offsets count from the start of the LUKS header (the
/// file's start for a luks image, the crypto header clusters of a qcow2 image).
struct LuksVolumeIO {
    var read: (_ offset: UInt64, _ count: Int) throws -> [UInt8]
    var write: (_ offset: UInt64, _ bytes: [UInt8]) throws -> Void
    /// Makes what was written durable before the next step depends on it.
    var sync: () throws -> Void
}

/// qemu's keyslot amend (qcrypto_block_luks_amend_options): activating a slot stores the master key under a new
/// passphrase, deactivating erases the slots given by index or by the passphrase they hold. The order of the
/// writes is qemu's: a new slot's key material is written before the header marks it active; an erased slot
/// is marked inactive in the header before its key material is overwritten with random bytes.
enum LuksKeyslotAmend {
    /// qemu's QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS: passes of random bytes over erased key material.
    static let erasePasses = 40

    /// Applies `request` to the volume whose header is `header` (updated in place as the disk is) and whose
    /// master key is `masterKey`. `secrets` resolves the secret ids the request names.
    static func apply(_ request: LuksKeyslotRequest, header: inout LuksHeader, masterKey: [UInt8],
                      secrets: [String: String], force: Bool, io: LuksVolumeIO) throws {
        let info = try LuksInfo(header: header)
        let settings = info.settings
        switch request.state {
        case .active:
            try addKeyslot(request, header: &header, settings: settings, masterKey: masterKey, secrets: secrets,
                           force: force, io: io)
        case .inactive:
            try eraseKeyslots(request, header: &header, settings: settings, secrets: secrets, force: force, io: io)
        }
    }

    /// The byte offset of a slot's key material, checked in 64 bits to end before the payload (the header check
    /// does this arithmetic in 32 bits, as qemu does, so a hostile offset could wrap past it and send the
    /// writes of an amend far beyond the volume).
    static func keyMaterialOffset(_ header: LuksHeader, slot index: Int) throws -> UInt64 {
        let slot = header.slots[index]
        let offset = UInt64(slot.keyOffsetSector) * LuksHeader.sectorSize
        let length = UInt64(header.keyBytes) * UInt64(slot.stripes)
        guard offset + length <= UInt64(header.payloadOffsetSector) * LuksHeader.sectorSize else {
            throw InstarError.invalid("Keyslot \(index) is overlapping with the encrypted payload")
        }
        return offset
    }

    static func secret(_ id: String, _ secrets: [String: String]) throws -> [UInt8] {
        guard let s = secrets[id] else { throw InstarError.invalid("No secret with id '\(id)'") }
        return Array(s.utf8)
    }

    private static func addKeyslot(_ r: LuksKeyslotRequest, header: inout LuksHeader, settings: LuksCipherSettings,
                                   masterKey: [UInt8], secrets: [String: String], force: Bool,
                                   io: LuksVolumeIO) throws {
        guard let newSecret = r.newSecret else {
            throw InstarError.invalid("'new-secret' is required to activate a keyslot")
        }
        if r.oldSecret != nil {
            throw InstarError.invalid("'old-secret' must not be given when activating keyslots")
        }
        let slot: Int
        if let k = r.keyslot {
            guard k >= 0, Int(k) < LuksHeader.slotCount else {
                throw InstarError.invalid("Invalid keyslot \(UInt32(bitPattern: k)) specified, must be between 0 and "
                    + "\(LuksHeader.slotCount - 1)")
            }
            slot = Int(k)
        } else {
            guard let free = header.slots.firstIndex(where: { !$0.isActive }) else {
                throw InstarError.invalid("Can't add a keyslot - all keyslots are in use")
            }
            slot = free
        }
        if !force && header.slots[slot].isActive {
            throw InstarError.invalid("Refusing to overwrite active keyslot \(slot) - please erase it first")
        }
        // The image was unlocked when it was opened: that is qemu's lookup of the master key here.
        let password = try secret(newSecret, secrets)
        do {
            try storeKey(slot: slot, header: &header, settings: settings, password: password, masterKey: masterKey,
                         iterTimeMs: r.iterTimeMs ?? LuksCreateParameters.defaultIterTimeMs, io: io)
        } catch let e as InstarError {
            // qemu's error hint, which qemu-img prints without a newline.
            throw InstarError(e.code, e.message + "\nFailed to write to keyslot \(slot)", errno: e.errnoValue)
        }
    }

    /// qcrypto_block_luks_store_key: new salt and iteration count, the master key split and encrypted with
    /// the passphrase's key, written to the slot's key material, then the header with the slot active.
    private static func storeKey(slot index: Int, header: inout LuksHeader, settings: LuksCipherSettings,
                                 password: [UInt8], masterKey: [UInt8], iterTimeMs: UInt64,
                                 io: LuksVolumeIO) throws {
        let keyBytes = Int(header.keyBytes)
        guard keyBytes == masterKey.count, keyBytes == settings.keyBytes, keyBytes > 0 else {
            throw InstarError.invalid("LUKS key size \(header.keyBytes) does not match the cipher")
        }
        let salt = Gcrypt.randomBytes(LuksHeader.saltBytes)
        var iters = try Luks.iterationsPerSecond(hash: settings.hash, password: password, salt: salt, length: keyBytes)
        if iterTimeMs > 0 && iters > UInt64.max / iterTimeMs {
            throw InstarError(.range, "PBKDF iterations \(iters) too large to scale: \(strerrorString(ERANGE))",
                              errno: ERANGE)
        }
        iters = iters &* iterTimeMs / 1000
        if iters > UInt64(UInt32.max) {
            throw InstarError(.range, "PBKDF iterations \(iters) larger than \(UInt32.max): \(strerrorString(ERANGE))",
                              errno: ERANGE)
        }
        let iterations = UInt32(max(iters, LuksHeader.minSlotIterations))
        let stripes = Int(header.slots[index].stripes)   // 4000, checked when the header was read
        let slotKey = try settings.hash.pbkdf2(password: password, salt: salt, iterations: UInt64(iterations),
                                               length: keyBytes)
        var material = LuksAntiForensic.split(masterKey, stripes: stripes, hash: settings.hash)
        try settings.sectorCipher(key: slotKey).process(&material, firstSector: 0, encrypt: true)
        let offset = try keyMaterialOffset(header, slot: index)
        try io.write(offset, material)
        try io.sync()
        CrashPoint.hit("luks-amend:key-material-written")
        var updated = header
        updated.slots[index].salt = salt
        updated.slots[index].iterations = iterations
        updated.slots[index].active = LuksHeader.slotEnabled
        try io.write(0, updated.encoded())
        header = updated
        try io.sync()
    }

    private static func eraseKeyslots(_ r: LuksKeyslotRequest, header: inout LuksHeader,
                                      settings: LuksCipherSettings, secrets: [String: String], force: Bool,
                                      io: LuksVolumeIO) throws {
        if r.newSecret != nil { throw InstarError.invalid("'new-secret' must not be given when erasing keyslots") }
        if r.iterTimeMs != nil { throw InstarError.invalid("'iter-time' must not be given when erasing keyslots") }
        let oldPassword = try r.oldSecret.map { try secret($0, secrets) }
        let activeCount = header.slots.filter { $0.isActive }.count
        if let k = r.keyslot {
            guard k >= 0, Int(k) < LuksHeader.slotCount else {
                throw InstarError.invalid("Invalid keyslot \(k) specified, must be between 0 and \(LuksHeader.slotCount - 1)")
            }
            let slot = Int(k)
            if let pw = oldPassword {
                let key = try Luks.loadKey(header: header, slot: slot, settings: settings, password: pw,
                                           readKeyMaterial: io.read)
                if key == nil {
                    throw InstarError.invalid("Given keyslot \(slot) doesn't contain the given old password for erase "
                        + "operation")
                }
            }
            if !force && !header.slots[slot].isActive {
                throw InstarError.invalid("Given keyslot \(slot) is already erased (inactive) ")
            }
            if !force && activeCount == 1 {
                throw InstarError.invalid("Attempt to erase the only active keyslot \(slot) which will erase all the "
                    + "data in the image irreversibly - refusing operation")
            }
            try erase(slot: slot, header: &header, io: io)
        } else if let pw = oldPassword {
            var matching: [Int] = []
            for i in header.slots.indices {
                if try Luks.loadKey(header: header, slot: i, settings: settings, password: pw,
                                    readKeyMaterial: io.read) != nil {
                    matching.append(i)
                }
            }
            if matching.isEmpty {
                throw InstarError.invalid("No keyslots match given (old) password for erase operation")
            }
            if !force && matching.count == activeCount {
                throw InstarError.invalid("All the active keyslots match the (old) password that was given and erasing "
                    + "them will erase all the data in the image irreversibly - refusing operation")
            }
            for i in matching { try erase(slot: i, header: &header, io: io) }
        } else {
            throw InstarError.invalid("To erase keyslot(s), either explicit keyslot index or the password currently "
                + "contained in them must be given")
        }
    }

    /// qcrypto_block_luks_erase_key: the header first (slot inactive, salt and iterations cleared), then the
    /// key material overwritten with random bytes, even when the header write failed.
    private static func erase(slot index: Int, header: inout LuksHeader, io: LuksVolumeIO) throws {
        let length = Int(header.keyBytes) * Int(header.slots[index].stripes)
        let offset = try keyMaterialOffset(header, slot: index)
        var updated = header
        updated.slots[index].salt = [UInt8](repeating: 0, count: LuksHeader.saltBytes)
        updated.slots[index].iterations = 0
        updated.slots[index].active = LuksHeader.slotDisabled
        var headerError: Error?
        do {
            try io.write(0, updated.encoded())
            try io.sync()
            header = updated
        } catch {
            headerError = error
        }
        CrashPoint.hit("luks-amend:slot-disabled")
        do {
            for pass in 0..<erasePasses {
                try io.write(offset, Gcrypt.randomBytes(length))
                if pass == erasePasses / 2 { CrashPoint.hit("luks-amend:scrubbing") }
            }
            try io.sync()
        } catch let e as InstarError {
            throw InstarError(e.code, e.message + "\nFailed to erase keyslot \(index)", errno: e.errnoValue)
        }
        if let e = headerError as? InstarError {
            throw InstarError(e.code, e.message + "\nFailed to erase keyslot \(index)", errno: e.errnoValue)
        } else if let e = headerError {
            throw e
        }
    }
}

/// qemu's integer parsing of option text (strtoull/strtoll with base 0 as qemu_strtou64/qemu_strtoi64 use
/// them): leading white space, an optional sign, "0x" hex or leading-0 octal, and nothing after the digits.
/// A minus sign on an unsigned number wraps it, as strtoull does.
enum QemuStrtol {
    enum Result: Equatable {
        case value(Int64)
        case unsignedValue(UInt64)
        case invalid
        case range
    }

    /// The sign and magnitude of `text`; nil when it is not a number, .range when the magnitude overflows.
    private static func magnitude(_ text: String) -> (negative: Bool, value: UInt64?)? {
        var bytes = Array(text.utf8)[...]
        while let c = bytes.first, c == 0x20 || (c >= 0x09 && c <= 0x0d) { bytes = bytes.dropFirst() }
        var negative = false
        if let c = bytes.first, c == UInt8(ascii: "-") || c == UInt8(ascii: "+") {
            negative = c == UInt8(ascii: "-")
            bytes = bytes.dropFirst()
        }
        var radix: UInt64 = 10
        if bytes.count >= 3, bytes.first == UInt8(ascii: "0"),
           bytes.dropFirst().first == UInt8(ascii: "x") || bytes.dropFirst().first == UInt8(ascii: "X"),
           let d = bytes.dropFirst(2).first, digit(d, 16) != nil {
            radix = 16
            bytes = bytes.dropFirst(2)
        } else if bytes.count >= 2, bytes.first == UInt8(ascii: "0") {
            radix = 8
        }
        guard !bytes.isEmpty else { return nil }
        var v: UInt64? = 0
        for c in bytes {
            guard let d = digit(c, radix) else { return nil }
            if let cur = v {
                let (m, o1) = cur.multipliedReportingOverflow(by: radix)
                let (a, o2) = m.addingReportingOverflow(d)
                v = o1 || o2 ? nil : a
            }
        }
        return (negative, v)
    }

    private static func digit(_ c: UInt8, _ radix: UInt64) -> UInt64? {
        let d: UInt64
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt64(c - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt64(c - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt64(c - UInt8(ascii: "A") + 10)
        default: return nil
        }
        return d < radix ? d : nil
    }

    /// strtoull: .unsignedValue, .invalid or .range.
    static func unsigned(_ text: String) -> Result {
        guard let m = magnitude(text) else { return .invalid }
        guard let v = m.value else { return .range }
        return .unsignedValue(m.negative ? 0 &- v : v)
    }

    /// strtoll: .value, .invalid or .range.
    static func signed(_ text: String) -> Result {
        guard let m = magnitude(text) else { return .invalid }
        guard let v = m.value else { return .range }
        if m.negative {
            if v > UInt64(Int64.max) + 1 { return .range }
            return .value(v == UInt64(Int64.max) + 1 ? Int64.min : -Int64(v))
        }
        if v > UInt64(Int64.max) { return .range }
        return .value(Int64(v))
    }
}
