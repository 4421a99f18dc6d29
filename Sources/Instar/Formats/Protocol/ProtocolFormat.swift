/// A protocol driver opened as the top node (`json:{"driver":"rbd",...}`, `--image-opts driver=rbd,...`): qemu
/// then shows the protocol's name as the format. The guest bytes are the device's bytes, as with raw.
public final class ProtocolFormat: ImageFormat, ConcurrentGuestIO {
    /// The format entry of each protocol driver; it never wins a probe.
    public static func descriptor(for p: ProtocolDescriptor) -> FormatDescriptor {
        var d = FormatDescriptor(name: p.name, probe: { _, _ in 0 },
                                 open: { ProtocolFormat(file: $0.file, name: p.name) })
        d.sharesWrites = true
        d.runtimeOptions = []
        return d
    }

    public let formatName: String
    public let file: HostFile
    public var hostFiles: [HostFile] { [file] }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }

    init(file: HostFile, name: String) {
        self.file = file
        self.formatName = name
    }

    public var virtualSize: UInt64 { (try? file.size()) ?? 0 }

    public var readsInFlight: Int { file.readsInFlight }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try file.readZeroPadded(into: buffer, at: offset)
    }

    /// The protocol's own block status, with the offset in the node itself (qemu's rbd driver answers
    /// OFFSET_VALID at the same offset).
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        let size = try file.size()
        guard offset < size else { return BlockStatus(length: length, allocated: true, data: false, zero: true) }
        let n = min(length, size - offset)
        let e = try file.protocolExtent(at: offset, length: n) ?? ProtocolExtent(length: n, data: true, zero: false)
        return BlockStatus(length: max(1, min(e.length, n)), allocated: true, data: e.data, zero: e.zero,
                           hostOffset: offset, hostFile: file.path)
    }

    public func formatInfo() throws -> FormatInfo {
        FormatInfo(clusterSize: file.remote?.clusterSize, dirty: false, formatSpecific: try file.remote?.formatSpecific())
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try file.write(buffer, at: offset)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        if mayUnmap { try file.punchHole(at: offset, length: length) } else { try file.writeZeroes(at: offset, length: length) }
    }

    public func discard(at offset: UInt64, length: UInt64) throws { try file.discard(at: offset, length: length) }

    public func flush() throws { try file.sync() }
}
