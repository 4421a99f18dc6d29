/// A format whose guest bytes are a raw node's shown under another name (`-f file`, `-f nbd`): reading, block
/// status, info and writes are the raw driver's, which the conforming format holds as `raw`.
public protocol RawForwarding: ImageFormat {
    var raw: RawFormat { get }
}

extension RawForwarding {
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
