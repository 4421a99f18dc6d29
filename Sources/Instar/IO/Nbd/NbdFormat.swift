/// qemu's nbd driver opened as the image's format itself (`json:{"driver": "nbd", ...}`, `-f nbd`,
/// `--image-opts driver=nbd,...`): the export's bytes with no raw layer on top, shown as format "nbd". The raw
/// driver does the work over the export's node.
public final class NbdFormat: RawForwarding {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "nbd", probe: { _, _ in 0 }, open: { try NbdFormat(request: $0) })
        d.sharesWrites = true
        // Never the prefix of a name: the nbd: names belong to the protocol driver (probed, as qemu does).
        d.filelessProtocol = "\u{0}nbd"
        d.displayName = { spec in
            let options = try? NbdFormat.options(filename: spec.filename, driverOptions: spec.driverOptions)
            return (try? options.flatMap { try NbdAddress(options: $0).exactFilename }) ?? spec.displayName
        }
        return d
    }()

    public let formatName = "nbd"
    public let raw: RawFormat

    /// The node's options: those given, or those a plain name (`-f nbd nbd:...`) stands for.
    static func options(filename: String, driverOptions: [String: QObject]) throws -> [(String, QObject)] {
        if !driverOptions.isEmpty || filename.isEmpty {
            return driverOptions.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        }
        return try NbdName.parse(filename)
    }

    init(request: OpenRequest) throws {
        let options = try NbdFormat.options(filename: request.filename, driverOptions: request.options.driverOptions)
        let address = ProtocolAddress(driver: "nbd", options: options)
        let file = try HostFile.open(address: address, name: request.filename, writable: request.writable)
        var plain = request
        plain.file = file
        plain.options.driverOptions = [:]
        raw = try RawFormat(request: plain)
    }

    public var supportsBacking: Bool { false }
}
