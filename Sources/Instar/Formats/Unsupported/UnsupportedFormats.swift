import Glibc

/// Formats qemu-img knows and instar cannot open yet. They take part in probing with qemu's own rules and
/// scores (the `*_probe` functions of qemu's block/*.c), so such an image is never silently read as raw; opening
/// one, probed or named with -f, fails with a clear error.
enum UnsupportedFormats {
    static let descriptors: [FormatDescriptor] = [
        descriptor("bochs", probe: bochs),
        descriptor("cloop", probe: cloop),
        descriptor("dmg", probe: dmg),
        descriptor("parallels", probe: parallels),
        descriptor("qcow", probe: qcow),
        descriptor("vmdk", probe: vmdk),
    ]

    private static func descriptor(_ name: String, probe: @escaping ([UInt8], String) -> Int) -> FormatDescriptor {
        FormatDescriptor(name: name, probe: probe, open: { _ in
            throw InstarError(.unsupported, "The '\(name)' image format is not supported by instar yet",
                              errno: ENOTSUP)
        })
    }

    /// Whether `buf` holds `text`'s bytes at `offset`.
    private static func has(_ buf: [UInt8], _ text: String, at offset: Int = 0) -> Bool {
        let bytes = Array(text.utf8)
        guard offset >= 0, buf.count >= offset + bytes.count else { return false }
        return buf[offset..<(offset + bytes.count)].elementsEqual(bytes)
    }

    /// A NUL-terminated string equal to `text` at `offset` (C strcmp on a fixed header field).
    private static func cStringEquals(_ buf: [UInt8], _ text: String, at offset: Int) -> Bool {
        has(buf, text + "\0", at: offset)
    }

    // bochs_probe: a 512-byte header "Bochs Virtual HD Image" / "Redolog" / "Growing", version 1 or 2 (LE u32 at 64).
    private static func bochs(_ buf: [UInt8], _ filename: String) -> Int {
        guard buf.count >= 512, cStringEquals(buf, "Bochs Virtual HD Image", at: 0),
              cStringEquals(buf, "Redolog", at: 32), cStringEquals(buf, "Growing", at: 48),
              let version = try? ByteReader(buf).u32le(at: 64),
              version == 0x0002_0000 || version == 0x0001_0000 else { return 0 }
        return 100
    }

    // cloop_probe: the V2.0 shell-script preamble (compared over what was read of it); a weak score.
    private static func cloop(_ buf: [UInt8], _ filename: String) -> Int {
        let magic = Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8)
        let n = min(magic.count, buf.count)
        return buf.prefix(n).elementsEqual(magic.prefix(n)) ? 2 : 0
    }

    // dmg_probe: only the file name, ending in ".dmg" after at least one more character.
    private static func dmg(_ buf: [UInt8], _ filename: String) -> Int {
        let name = Array(filename.utf8)
        return name.count > 4 && name.suffix(4).elementsEqual(Array(".dmg".utf8)) ? 2 : 0
    }

    // parallels_probe: a 64-byte header, one of two signatures and version 2 (LE u32 at 16).
    private static func parallels(_ buf: [UInt8], _ filename: String) -> Int {
        guard buf.count >= 64, has(buf, "WithoutFreeSpace") || has(buf, "WithouFreSpacExt"),
              let version = try? ByteReader(buf).u32le(at: 16), version == 2 else { return 0 }
        return 100
    }

    // qcow_probe: the qcow magic (shared with qcow2) and version 1, in a 48-byte header.
    private static func qcow(_ buf: [UInt8], _ filename: String) -> Int {
        let r = ByteReader(buf)
        guard buf.count >= 48, let magic = try? r.u32be(at: 0), magic == 0x5146_49FB,
              let version = try? r.u32be(at: 4), version == 1 else { return 0 }
        return 100
    }

    // vmdk_probe: a sparse extent magic ("COWD", "KDMV"), or a text descriptor whose first line that is not a
    // comment or blank is "version=1", "version=2" or "version=3" (LF or CRLF).
    private static func vmdk(_ buf: [UInt8], _ filename: String) -> Int {
        if buf.count < 4 { return 0 }
        if has(buf, "COWD") || has(buf, "KDMV") { return 100 }
        // Bounds-checked byte access: positions here come from the file's contents.
        func byte(_ i: Int) -> UInt8? { i >= 0 && i < buf.count ? buf[i] : nil }
        let newline = UInt8(ascii: "\n")
        let space = UInt8(ascii: " ")
        var p = 0
        while let c = byte(p) {
            if c == UInt8(ascii: "#") {
                while let d = byte(p), d != newline { p += 1 }
                p += 1
                continue
            }
            if c == space {
                while byte(p) == space { p += 1 }
                if byte(p) == UInt8(ascii: "\r") { p += 1 }
                if byte(p) != newline { return 0 }
                p += 1
                continue
            }
            for v in ["1", "2", "3"] where has(buf, "version=\(v)\n", at: p) || has(buf, "version=\(v)\r\n", at: p) {
                return 100
            }
            return 0
        }
        return 0
    }
}
