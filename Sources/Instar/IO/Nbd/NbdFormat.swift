/// qemu's nbd driver opened as the image's format itself (`json:{"driver": "nbd", ...}`, `-f nbd`,
/// `--image-opts driver=nbd,...`): the export's bytes with no raw layer on top, shown as format "nbd". The raw
/// driver does the work over the export's node.
public final class NbdFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "nbd", probe: { _, _ in 0 }, open: { try NbdFormat(request: $0) })
        d.sharesWrites = true
        // Never the prefix of a name: the nbd: names belong to the protocol driver (probed, as qemu does).
        d.filelessProtocol = "\u{0}nbd"
        d.displayName = { spec in
            let options = NbdFormat.options(filename: spec.filename, driverOptions: spec.driverOptions)
            return (try? options.flatMap { try NbdAddress(options: $0).exactFilename }) ?? spec.displayName
        }
        return d
    }()

    public let formatName = "nbd"
    let raw: RawFormat

    /// The node's options: those given, or those a plain name (`-f nbd nbd:...`) stands for.
    static func options(filename: String, driverOptions: [String: QObject]) -> [(String, QObject)]? {
        if !driverOptions.isEmpty || filename.isEmpty {
            return driverOptions.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        }
        return try? NbdName.parse(filename)
    }

    init(request: OpenRequest) throws {
        let options: [(String, QObject)]
        let given = request.options.driverOptions
        if !given.isEmpty || request.filename.isEmpty {
            options = given.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        } else {
            options = try NbdName.parse(request.filename)
        }
        let address = ProtocolAddress(driver: "nbd", options: options)
        let file = try HostFile.open(address: address, name: request.filename, writable: request.writable)
        var plain = request
        plain.file = file
        plain.options.driverOptions = [:]
        raw = try RawFormat(request: plain)
    }

    public var virtualSize: UInt64 { raw.virtualSize }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }
    public var hostFiles: [HostFile] { raw.hostFiles }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try raw.read(into: buffer, at: offset, backing: backing)
    }
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        try raw.blockStatus(at: offset, length: length)
    }
    public func formatInfo() throws -> FormatInfo { try raw.formatInfo() }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try raw.write(buffer, at: offset, backing: backing)
    }
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        try raw.writeZeroes(at: offset, length: length, mayUnmap: mayUnmap, backing: backing)
    }
    public func discard(at offset: UInt64, length: UInt64) throws { try raw.discard(at: offset, length: length) }
    public func flush() throws { try raw.flush() }
}
