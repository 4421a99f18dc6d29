/// qcow2 (docs/interop/qcow2.txt). Placeholder until the driver lands: probes, refuses to open.
public final class Qcow2Format {
    public static let descriptor = FormatDescriptor(
        name: "qcow2",
        probe: { header, _ in
            guard header.count >= 8, header[0] == 0x51, header[1] == 0x46, header[2] == 0x49, header[3] == 0xfb else { return 0 }
            let version = UInt32(header[4]) << 24 | UInt32(header[5]) << 16 | UInt32(header[6]) << 8 | UInt32(header[7])
            return version >= 2 ? 100 : 0
        },
        open: { _ in throw InstarError.unsupported("qcow2 is not supported yet") })
}
