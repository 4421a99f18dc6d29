import Glibc

/// Formats qemu-img knows and instar cannot open yet. They take part in probing with qemu's own rules and
/// scores (the `*_probe` functions of qemu's block/*.c), so such an image is never silently read as raw; opening
/// one, probed or named with -f, fails with a clear error.
enum UnsupportedFormats {
    static let descriptors: [FormatDescriptor] = [
        descriptor("qcow", probe: qcow),
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

    // qcow_probe: the qcow magic (shared with qcow2) and version 1, in a 48-byte header.
    private static func qcow(_ buf: [UInt8], _ filename: String) -> Int {
        let r = ByteReader(buf)
        guard buf.count >= 48, let magic = try? r.u32be(at: 0), magic == 0x5146_49FB,
              let version = try? r.u32be(at: 4), version == 1 else { return 0 }
        return 100
    }
}
