// Format probes over captured regions: one entry point per (format, part), answering what oslo.utils'
// format_inspector asks of each structure (match, virtual size, next region, safety findings). Each probe is
// small and bounded: fixed-size header fields, a descriptor of at most 1 MiB, tables of at most 2047 entries.

/// Safety findings (instar.h INSTAR_PROBE_V_*).
struct ProbeViolations: OptionSet {
    let rawValue: UInt32
    static let backingFile = ProbeViolations(rawValue: 1 << 0)
    static let dataFile = ProbeViolations(rawValue: 1 << 1)
    static let unknownFeatures = ProbeViolations(rawValue: 1 << 2)
    static let unsupportedVersion = ProbeViolations(rawValue: 1 << 3)
    static let banned = ProbeViolations(rawValue: 1 << 4)
    static let descriptor = ProbeViolations(rawValue: 1 << 5)
    static let subformat = ProbeViolations(rawValue: 1 << 6)
    static let extentPath = ProbeViolations(rawValue: 1 << 7)
    static let noExtents = ProbeViolations(rawValue: 1 << 8)
    static let footer = ProbeViolations(rawValue: 1 << 9)
    static let partitions = ProbeViolations(rawValue: 1 << 10)
}

/// What one probe found.
struct ProbeReport {
    /// true/false, nil when the bytes cannot tell yet.
    var match: Bool?
    var virtualSize: UInt64?
    var version: Int64?
    var violations: ProbeViolations = []
    /// The first violation's text (oslo.utils' wording).
    var message = ""
    /// The next bytes the format needs.
    var need: (offset: UInt64, length: UInt64)?
    var footer = false
    var text = false
    var payloadOffset: UInt32 = 0
    var keySlot: Int?
    /// vmdk: capacity in sectors as stored.
    var sectors: UInt64 = 0
    /// luks "payload": the decrypted first sector.
    var payload: [UInt8] = []
    var subformat = ""

    mutating func violate(_ v: ProbeViolations, _ text: String) {
        if violations.isEmpty { message = text }
        violations.insert(v)
    }
}

struct ProbeOptions {
    /// qcow2 incompatible feature bits at or above this number are unknown.
    var qcow2KnownFeatures: UInt32 = 4
    /// vhdx metadata item to look up (16 bytes as stored); nil for the virtual disk size.
    var vhdxItem: [UInt8]?
    var luksPassphrase: [UInt8]?
    var luksIterLimit: UInt32 = 0
}

enum Probe {
    /// Runs the probe of `format`'s `part` over `regions`. Throws .corrupt for a malformed structure and
    /// .invalid for a format or part that has no probe.
    static func run(format: String, part: String, regions: ProbeRegions, options: ProbeOptions) throws
        -> ProbeReport
    {
        switch (format, part) {
        case ("qcow2", "header"): return qcow2Header(regions, options)
        case ("qed", "header"): return qedHeader(regions)
        case ("vhd", "header"): return vhdFooterCopy(regions)
        case ("vdi", "header"): return vdiHeader(regions)
        case ("iso", "header"): return isoDescriptor(regions)
        case ("gpt", "header"), ("gpt", "mbr"): return mbr(regions)
        case ("luks", "header"): return luksHeader(regions)
        case ("vmdk", "header"): return try VmdkProbe.header(regions)
        case ("vmdk", "descriptor"): return VmdkProbe.descriptor(regions)
        case ("vmdk", "footer"): return VmdkProbe.footer(regions)
        case ("luks", "payload"):
            guard let pass = options.luksPassphrase else { throw InstarError.invalid("luks_passphrase is required") }
            return try LuksProbe.payload(regions, passphrase: pass, iterationLimit: options.luksIterLimit)
        case ("vhdx", "ident"): return vhdxIdent(regions)
        case ("vhdx", "header"): return try VhdxProbe.regionTable(regions)
        case ("vhdx", "metadata"): return try VhdxProbe.metadataTable(regions, item: options.vhdxItem)
        case ("vhdx", "item"): return VhdxProbe.item(regions)
        default: throw InstarError.invalid("no probe for part '\(part)' of format '\(format)'")
        }
    }

    /// The first region's bytes (the structure the part names), or empty.
    static func first(_ r: ProbeRegions) -> [UInt8] { r.region(0)?.bytes ?? [] }

    // qcow2: the driver's own magic and feature constants (Formats/Qcow2); the fields oslo.utils checks.
    static func qcow2Header(_ r: ProbeRegions, _ o: ProbeOptions) -> ProbeReport {
        var rep = ProbeReport()
        guard let h = r.bytes(at: 0, count: 32) else { rep.need = (0, 32); return rep }
        rep.match = h.probeU32be(0) == Qcow2.magic
        guard rep.match == true else { return rep }
        let version = h.probeU32be(4) ?? 0
        rep.version = Int64(version)
        rep.virtualSize = h.probeU64be(24)
        if (h.probeU64be(8) ?? 0) != 0 { rep.violate(.backingFile, "Image has a backing file") }
        guard let f = r.bytes(at: 72, count: 8), let features = f.probeU64be(0) else {
            rep.need = (72, 8)
            return rep
        }
        // The data-file bit is read whatever the version says, as oslo.utils does.
        if features & Qcow2.incompatDataFile != 0 { rep.violate(.dataFile, "Image has data_file set") }
        if version == 2 { return rep }
        guard version == 3 else {
            rep.violate(.unsupportedVersion, "Unsupported qcow2 version")
            return rep
        }
        let known = o.qcow2KnownFeatures
        let unknown = known >= 64 ? 0 : features >> UInt64(known)
        if unknown != 0 { rep.violate(.unknownFeatures, "Unknown QCOW2 features found") }
        return rep
    }

    static func qedHeader(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        guard let h = r.bytes(at: 0, count: 4) else { rep.need = (0, 4); return rep }
        rep.match = h == [0x51, 0x45, 0x44, 0x00]   // "QED\0"
        if rep.match == true { rep.violate(.banned, "This file format is not allowed") }
        return rep
    }

    /// The copy of the VHD footer at offset 0 of a dynamic image: "conectix", current size at 40 (big-endian).
    static func vhdFooterCopy(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        let h = first(r)
        guard h.count >= 8 else { rep.need = (0, 8); return rep }
        rep.match = h.probeStarts(with: Array("conectix".utf8))
        if rep.match == true { rep.virtualSize = h.probeU64be(40) }
        return rep
    }

    /// VirtualBox VDI: signature 0xbeda107f at 0x40, disk size at 0x170 (little-endian).
    static func vdiHeader(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        guard let h = r.bytes(at: 0, count: 0x178) else { rep.need = (0, 0x178); return rep }
        rep.match = h.probeU32le(0x40) == 0xbeda_107f
        if rep.match == true { rep.virtualSize = h.probeU64le(0x170) }
        return rep
    }

    /// ISO 9660 / UDF: the volume descriptor at 32 KiB; a primary one (type 1) gives blocks x block size.
    static func isoDescriptor(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        let at: UInt64 = 32 * 1024
        guard let d = r.bytes(at: at, count: 132) else { rep.need = (at, 2048); return rep }
        let id = Array(d[1..<6])
        rep.match = [Array("CD001".utf8), Array("NSR02".utf8), Array("NSR03".utf8)].contains(id)
        guard rep.match == true else { return rep }
        if d[0] != 1 {
            rep.virtualSize = 0
        } else {
            let blockSize = UInt64(d.probeU16le(128) ?? 0)
            let blocks = UInt64(d.probeU32le(80) ?? 0)
            rep.virtualSize = blocks * blockSize   // both below 2^32: no overflow
        }
        return rep
    }

    /// The MBR of a GPT (or plain MBR) disk: signature 0xaa55, not a FAT boot sector, and a partition table
    /// with valid boot flags and, for a protective GPT entry, the one partition at LBA 1.
    static func mbr(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        guard let m = r.bytes(at: 0, count: 512) else { rep.need = (0, 512); return rep }
        let isFat = m[0x10] == 2 && m[0x15] == 0xf8
        rep.match = m.probeU16le(510) == 0xaa55 && !isFat
        var valid: [Int] = []
        var foundGpt = false
        for i in 0..<4 {
            let e = 446 + 16 * i
            let boot = m[e], ostype = m[e + 4]
            guard boot == 0x00 || boot == 0x80 else {
                rep.violate(.partitions, "MBR PTE \(i) has invalid boot flag")
                return rep
            }
            if ostype != 0 { valid.append(i) }
            if ostype == 0xee {
                foundGpt = true
                guard m[e + 1] == 0, m[e + 2] == 2, m[e + 3] == 0 else {
                    rep.violate(.partitions, "GPT MBR has invalid start CHS")
                    return rep
                }
                guard m.probeU32le(e + 8) == 1 else {
                    rep.violate(.partitions, "GPT MBR has invalid start LBA")
                    return rep
                }
            }
        }
        if foundGpt && valid != [0] {
            rep.violate(.partitions, "GPT MBR defines invalid extra partitions")
        } else if valid.isEmpty {
            rep.violate(.partitions, "GPT MBR has no partitions defined")
        }
        return rep
    }

    /// LUKS: magic "LUKS\xba\xbe", version (big-endian) at 6, payload offset in sectors at 104.
    static func luksHeader(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        let h = first(r)
        guard h.count >= 6 else { rep.need = (0, 6); return rep }
        rep.match = h.probeStarts(with: [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe])
        guard rep.match == true else { return rep }
        guard let version = h.probeU16be(6), let payload = h.probeU32be(104) else { rep.need = (0, 108); return rep }
        rep.version = Int64(version)
        rep.payloadOffset = payload
        if version != 1 { rep.violate(.unsupportedVersion, "LUKS version \(version) is not supported") }
        // Key slots (LUKS1): 8 x 48 bytes at 208: active, iterations, salt[32], key material sector, stripes.
        let keyBytes = UInt64(h.probeU32be(108) ?? 0)
        for slot in 0..<8 {
            let at = 208 + 48 * slot
            guard let active = h.probeU32be(at), let sector = h.probeU32be(at + 40), let stripes = h.probeU32be(at + 44)
            else { break }
            if active == 0x00ac_71f3 {
                rep.keySlot = slot
                // Key material is key size x stripes: at most 128 x 4000 bytes for any cipher LUKS1 names
                // (qemu insists on 4000 stripes); a header asking for more gets no region to fill memory with.
                if keyBytes <= 128 && stripes <= 4000 {
                    rep.need = (UInt64(sector) * 512, keyBytes * UInt64(stripes))   // below 2^41 and 2^19
                }
                break
            }
        }
        return rep
    }

    static func vhdxIdent(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        let h = first(r)
        guard h.count >= 8 else { rep.need = (0, 8); return rep }
        rep.match = h.probeStarts(with: Array("vhdxfile".utf8))
        return rep
    }
}
