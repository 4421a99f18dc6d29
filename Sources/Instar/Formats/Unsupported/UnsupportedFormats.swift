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
}
