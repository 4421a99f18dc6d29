import Glibc

/// qemu's file protocol driver (file-posix) used as the image's format, as `-f file` does: the guest bytes are
/// the file's, with no raw layer on top (so no offset/size window). Reading, block status and resizing are the
/// raw driver's over a whole file; only the name differs.
public final class FileFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "file", probe: { _, _ in 0 }, open: { try FileFormat(request: $0) })
        d.sharesWrites = true
        d.runtimeOptions = []
        return d
    }()

    /// file-posix's create: the file at the size given, rounded up to whole sectors, with its own options.
    public static let creator = FormatCreator(name: "file", options: HostFileCreate.options, create: RawCreate.create)

    public let formatName = "file"
    let raw: RawFormat

    init(request: OpenRequest) throws {
        var plain = request
        plain.options.driverOptions = [:]
        raw = try RawFormat(request: plain)
    }

    public var virtualSize: UInt64 { raw.virtualSize }
    public var backingReference: BackingReference? { nil }
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

extension FileFormat: ImageResizable {
    public func resize(to newSize: UInt64, preallocation: ResizePreallocation, backing: GuestReader?) throws {
        try raw.resize(to: newSize, preallocation: preallocation, backing: backing)
    }
}
