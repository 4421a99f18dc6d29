// LUKS1 with a passphrase, as oslo.utils' LUKSInspector uses it: unlock the master key from the first active
// key slot's material (captured by the caller) and decrypt the payload's first sector, so the inner format can
// be recognised. The engine's LUKS code (Crypto/) does the work; PBKDF2 iteration counts are capped first.

enum LuksProbe {
    /// regions[0]: the 592-byte header; regions[1]: the first active slot's key material at its offset;
    /// regions[2]: the payload's first 512 bytes at the payload offset.
    static func payload(_ r: ProbeRegions, passphrase: [UInt8], iterationLimit: UInt32) throws -> ProbeReport {
        var rep = ProbeReport()
        guard let h = r.region(0), h.bytes.count >= LuksHeader.byteCount else {
            throw InstarError.invalid("the LUKS header is not available")
        }
        let header = try LuksHeader(bytes: Array(h.bytes.prefix(LuksHeader.byteCount)))
        let info = try Qcow2LuksInfo(bytes: Array(h.bytes.prefix(LuksHeader.byteCount)))
        let settings = try Qcow2Crypt.settings(info)
        guard let active = header.slots.firstIndex(where: { $0.isActive }) else {
            throw InstarError(.encrypted, "Could not recover master key: no active key slot")
        }
        if iterationLimit != 0 {
            let slot = header.slots[active]
            guard header.masterKeyIterations <= iterationLimit, slot.iterations <= iterationLimit else {
                throw InstarError(.encrypted, "Could not recover master key: PBKDF2 iteration limit exceeded")
            }
        }
        // Only the first active slot is tried (its material is all the caller captured).
        var first = header
        first.slots = header.slots.enumerated().map { i, s in
            var s = s
            if i != active { s.active = LuksHeader.slotDisabled }
            return s
        }
        let key: [UInt8]
        do {
            key = try Luks.unlock(header: first, settings: settings, password: passphrase) { offset, count in
                guard let bytes = r.bytes(at: offset, count: count) else {
                    throw InstarError.invalid("Key material not available")
                }
                return bytes
            }
        } catch let e as InstarError where e.code == .permission {
            throw InstarError(.encrypted, "Could not recover master key: the passphrase unlocks no key slot")
        }
        let payloadAt = UInt64(header.payloadOffsetSector) * LuksHeader.sectorSize
        guard var block = r.bytes(at: payloadAt, count: 512) else {
            rep.need = (payloadAt, 512)
            return rep
        }
        try settings.sectorCipher(key: key).process(&block, firstSector: 0, encrypt: false)
        rep.match = true
        rep.payloadOffset = header.payloadOffsetSector
        rep.keySlot = active
        rep.payload = block
        return rep
    }
}
