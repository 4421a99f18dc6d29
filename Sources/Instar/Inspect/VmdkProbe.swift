// VMDK as oslo.utils inspects it: the 512-byte sparse header (its first 64 bytes), the text descriptor it points
// to (at sector 1, at most 1 MiB) and, when the grain directory is at the end (streamOptimized written in one
// pass), the footer marker, footer header and end-of-stream marker in the last 1536 bytes.

enum VmdkProbe {
    static let magic: [UInt8] = Array("KDMV".utf8)
    static let headerBytes = 64
    static let descriptorOffset: UInt64 = 0x200
    static let descriptorMax: UInt64 = (1 << 20) - 1
    static let gdAtEnd = UInt64.max
    static let markerEOS: UInt32 = 0
    static let markerFooter: UInt32 = 3

    struct Header: Equatable {
        var magic: [UInt8]
        var version: UInt32
        var sectors: UInt64
        var descriptorSector: UInt64
        var descriptorSectors: UInt64
        var gdOffset: UInt64

        init?(_ b: [UInt8]) {
            guard b.count >= VmdkProbe.headerBytes, let v = b.probeU32le(4), let s = b.probeU64le(12),
                  let ds = b.probeU64le(28), let dn = b.probeU64le(36), let gd = b.probeU64le(56) else { return nil }
            magic = Array(b[0..<4])
            version = v
            sectors = s
            descriptorSector = ds
            descriptorSectors = dn
            gdOffset = gd
        }
    }

    /// Python's str.isprintable() or str.isspace() for an ASCII byte.
    static func isTextByte(_ c: UInt8) -> Bool { (0x20...0x7e).contains(c) || (0x09...0x0d).contains(c) || (0x1c...0x1f).contains(c) }

    static func header(_ r: ProbeRegions) throws -> ProbeReport {
        var rep = ProbeReport()
        let b = Probe.first(r)
        guard let h = Header(b) else {
            if b.count >= 4 { rep.match = b.probeStarts(with: magic) }
            rep.need = (0, UInt64(headerBytes))
            return rep
        }
        guard h.magic == magic else {
            if b.allSatisfy(isTextByte) {
                rep.text = true
                rep.match = false
                return rep
            }
            let shown = h.magic.map { (0x20...0x7e).contains($0) ? String(UnicodeScalar($0)) : "\\x" + hex2($0) }
            throw InstarError.corrupt("Signature KDMV not found: b'\(shown.joined())'")
        }
        rep.match = true
        guard (1...3).contains(h.version) else { throw InstarError.corrupt("Unsupported format version \(h.version)") }
        rep.version = Int64(h.version)
        rep.footer = h.gdOffset == gdAtEnd
        rep.sectors = h.sectors
        let (sizeBytes, o1) = h.sectors.multipliedReportingOverflow(by: 512)
        rep.virtualSize = o1 ? nil : sizeBytes
        let (descOffset, o2) = h.descriptorSector.multipliedReportingOverflow(by: 512)
        let (descLen, o3) = h.descriptorSectors.multipliedReportingOverflow(by: 512)
        guard !o2, descOffset == descriptorOffset else { throw InstarError.corrupt("Wrong descriptor location") }
        rep.need = (descOffset, o3 ? descriptorMax : min(descLen, descriptorMax))
        return rep
    }

    static func hex2(_ c: UInt8) -> String {
        let digits = Array("0123456789abcdef")
        return String(digits[Int(c >> 4)]) + String(digits[Int(c & 15)])
    }

    /// Python's str.strip() whitespace for ASCII.
    static func isSpace(_ c: UInt8) -> Bool { c == 0x20 || (0x09...0x0d).contains(c) || (0x1c...0x1f).contains(c) }

    static func strip(_ s: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
        var a = s.startIndex, b = s.endIndex
        while a < b && isSpace(s[a]) { a += 1 }
        while b > a && isSpace(s[b - 1]) { b -= 1 }
        return s[a..<b]
    }

    static func find(_ needle: [UInt8], in hay: [UInt8], from: Int = 0) -> Int? {
        guard needle.count <= hay.count, from >= 0 else { return nil }
        var i = from
        while i + needle.count <= hay.count {
            if hay[i] == needle[0] && Array(hay[i..<(i + needle.count)]) == needle { return i }
            i += 1
        }
        return nil
    }

    /// The descriptor text: createType (lower case) and the lines oslo.utils accepts (comments, `key=value`
    /// fields, ddb entries, extents with an access mode and no path).
    static func descriptor(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        var d = Array(Probe.first(r).prefix(Int(descriptorMax)))
        if let nul = d.firstIndex(of: 0) { d = Array(d[0..<nul]) }
        guard d.allSatisfy({ $0 < 0x80 }) else {
            rep.match = false   // not ASCII: no descriptor
            return rep
        }
        rep.match = true
        let text = d.map { (0x41...0x5a).contains($0) ? $0 + 0x20 : $0 }
        let key = Array("createtype=\"".utf8)
        var type = "formatnotfound"
        if let at = find(key, in: text) {
            let start = at + key.count
            if let end = find([0x22], in: text, from: start) {
                if end - start < 64 { type = String(decoding: text[start..<end], as: UTF8.self) }
            } else if start <= text.count - 1 {
                // No closing quote: what a slice to "the last character" gives.
                type = String(decoding: text[start..<(text.count - 1)], as: UTF8.self)
            } else {
                type = ""
            }
        }
        rep.subformat = type
        guard type == "monolithicsparse" || type == "streamoptimized" else {
            rep.violate(.subformat, "Unsupported subformat")
            return rep
        }
        var extents: [ArraySlice<UInt8>] = []
        let access: [[UInt8]] = [Array("rw".utf8), Array("rdonly".utf8), Array("noaccess".utf8)]
        for raw in text.split(separator: 0x0a, omittingEmptySubsequences: false) {
            let line = strip(raw)
            if line.isEmpty || line.first == 0x23 { continue }                        // '#'
            if line.starts(with: Array("ddb".utf8)) { continue }
            if let eq = line.firstIndex(of: 0x3d), !line[line.startIndex..<eq].contains(0x20) { continue }  // field
            let word = line.split(separator: 0x20, maxSplits: 1, omittingEmptySubsequences: false).first ?? []
            if access.contains(Array(word)) {
                extents.append(line)
            } else {
                rep.violate(.descriptor, "Invalid VMDK descriptor data")
                return rep
            }
        }
        if extents.contains(where: { $0.contains(0x2f) }) {
            rep.violate(.extentPath, "Invalid extent filenames found")
        } else if extents.isEmpty {
            rep.violate(.noExtents, "No extents found")
        }
        return rep
    }

    /// regions[0]: the header; regions[1]: the last 1536 bytes (footer marker, footer, end-of-stream marker).
    static func footer(_ r: ProbeRegions) -> ProbeReport {
        var rep = ProbeReport()
        guard let hb = r.region(0)?.bytes, let fb = r.region(1)?.bytes, fb.count >= 1536,
              let h = Header(hb), let f = Header(Array(fb[512..<1024])) else {
            rep.violate(.footer, "Unexpected error")
            return rep
        }
        rep.match = true
        if h.magic != f.magic { rep.violate(.footer, "Header and footer signature do not match"); return rep }
        if h.version != f.version { rep.violate(.footer, "Header and footer versions do not match"); return rep }
        if h.descriptorSector != f.descriptorSector || h.descriptorSectors != f.descriptorSectors {
            rep.violate(.footer, "Footer specifies a different descriptor than header")
            return rep
        }
        if f.gdOffset == gdAtEnd { rep.violate(.footer, "Footer indicates another footer"); return rep }
        func marker(_ at: Int) -> (value: UInt64, size: UInt32, type: UInt32, zeroPad: Bool) {
            (fb.probeU64le(at) ?? 1, fb.probeU32le(at + 8) ?? 1, fb.probeU32le(at + 12) ?? 1,
             fb[(at + 16)..<(at + 512)].allSatisfy { $0 == 0 })
        }
        let fm = marker(0)
        if fm.size != 0 || fm.type != markerFooter || !fm.zeroPad {
            rep.violate(.footer, "Footer marker is invalid")
            return rep
        }
        let eos = marker(fb.count - 512)
        if eos.value != 0 || eos.size != 0 || eos.type != markerEOS || !eos.zeroPad {
            rep.violate(.footer, "End-of-stream marker is invalid")
        }
        return rep
    }
}
