/// The table of formats instar knows, and qemu's probing over it.
public enum FormatRegistry {
    /// Every driver. Drivers add themselves here; nothing else lists formats.
    public static let all: [FormatDescriptor] = [
        RawFormat.descriptor,
        Qcow2Format.descriptor,
        FileFormat.descriptor,
        VpcFormat.descriptor,
        QedFormat.descriptor,
        VdiFormat.descriptor,
        VhdxFormat.descriptor,
        LuksFormat.descriptor,
        VmdkFormat.descriptor,
        BochsFormat.descriptor,
        CloopFormat.descriptor,
        DmgFormat.descriptor,
        ParallelsFormat.descriptor,
        QcowFormat.descriptor,
    ].map(attachingCreator) + NullFormat.descriptors
        // A protocol opened as the top node shows its name as the format; nbd has its own (-f nbd over a name).
        + ProtocolRegistry.all.filter { $0.name != "nbd" }.map(ProtocolFormat.descriptor(for:)) + [NbdFormat.descriptor]

    /// Formats instar would recognise but not open (they would take part in probing and in `-f NAME` only, so
    /// that their images fail clearly instead of being read as raw). Every image format of qemu-img 7.2 now has
    /// a driver, so there are none.
    public static let recognized: [FormatDescriptor] = []

    /// Create/measure entries by format name. They live beside each driver (RawCreate.swift,
    /// Qcow2Create.swift) and are merged into the descriptors here, so the reading side stays untouched.
    public static let creators: [FormatCreator] = [
        RawCreate.creator,
        Qcow2Create.creator,
        FileFormat.creator,
        VpcCreate.creator,
        QedCreate.creator,
        VdiCreate.creator,
        VhdxCreate.creator,
        LuksCreate.creator,
        VmdkCreate.creator,
        ParallelsCreate.creator,
        QcowCreate.creator,
    ]

    private static func attachingCreator(_ d: FormatDescriptor) -> FormatDescriptor {
        var d = d
        if d.creator == nil { d.creator = creators.first { $0.name == d.name } }
        return d
    }

    /// qemu's probe buffer size (BLOCK_PROBE_BUF_SIZE).
    public static let probeSize = 2048

    public static func descriptor(named name: String) -> FormatDescriptor? {
        all.first { $0.name == name }
    }

    /// The descriptor to open an image of format `name` (-f) with: a driver, or a recognised format whose open
    /// fails with a clear error.
    public static func openDescriptor(named name: String) -> FormatDescriptor? {
        descriptor(named: name) ?? recognized.first { $0.name == name }
    }

    /// Picks the format of `file` the way qemu does: the highest probe score over the first 2048 bytes wins, an
    /// empty file is raw.
    public static func probe(_ file: HostFile, filename: String) throws -> FormatDescriptor {
        let size = try file.size()
        if size == 0 { return RawFormat.descriptor }
        var header = try file.readBytes(at: 0, count: Int(min(UInt64(probeSize), size)))
        // qemu always probes a whole buffer: what lies past the end of a short file reads as zeroes.
        if header.count < probeSize { header += [UInt8](repeating: 0, count: probeSize - header.count) }
        var best = RawFormat.descriptor
        var bestScore = 0
        for d in all + recognized {
            let score = d.probe(header, filename)
            if score > bestScore {
                best = d
                bestScore = score
            }
        }
        return best
    }

    /// The fileless protocol driver a filename names by URL (`null-co://`), if any.
    public static func filelessProtocol(named filename: String) -> FormatDescriptor? {
        all.first { d in d.filelessProtocol.map { filename.hasPrefix($0) } ?? false }
    }

    /// The names `--help` lists after "Supported formats:", as qemu's bdrv_iterate_format lists its drivers:
    /// every one instar can open, sorted, each once.
    public static var supportedFormatNames: [String] {
        // Protocol drivers (rbd, nbd) are listed beside the formats, as qemu lists its block drivers.
        Array(Set(all.map(\.name) + ProtocolRegistry.all.map(\.name))).sorted()
    }
}
