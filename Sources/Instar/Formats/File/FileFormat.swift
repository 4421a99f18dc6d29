import Glibc

/// qemu's file protocol driver (file-posix) used as the image's format, as `-f file` does: the guest bytes are
/// the file's, with no raw layer on top (so no offset/size window). Reading, block status and resizing are the
/// raw driver's over a whole file; only the name differs.
public final class FileFormat: RawForwarding {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "file", probe: { _, _ in 0 }, open: { try FileFormat(request: $0) })
        d.sharesWrites = true
        d.runtimeOptions = []
        return d
    }()

    /// file-posix's create: the file at the size given, rounded up to whole sectors, with its own options.
    public static let creator = FormatCreator(name: "file", options: HostFileCreate.options, create: RawCreate.create)

    public let formatName = "file"
    public let raw: RawFormat

    init(request: OpenRequest) throws {
        var plain = request
        plain.options.driverOptions = [:]
        raw = try RawFormat(request: plain)
    }

}

extension FileFormat: ImageResizable {
    public func resize(to newSize: UInt64, preallocation: ResizePreallocation, backing: GuestReader?) throws {
        try raw.resize(to: newSize, preallocation: preallocation, backing: backing)
    }
}
