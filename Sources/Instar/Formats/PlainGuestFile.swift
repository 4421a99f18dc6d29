import CInstar
import Glibc

/// A format whose guest bytes are the bytes of one host file at a fixed distance (raw): data copied into it
/// unchanged may go file to file in the kernel (copy_file_range) instead of through a buffer, with the same
/// result. Formats with metadata of their own (allocation, bitmaps, encryption) do not offer it.
public protocol PlainGuestFile: ImageFormat {
    /// The host file and offset that hold guest bytes [offset, offset + length), nil when they are not stored
    /// plainly there.
    func plainHostRange(at offset: UInt64, length: UInt64) -> (file: HostFile, offset: UInt64)?
}

/// A format that can store guest bytes copied straight from a host file where a buffered write would store them
/// unchanged (the same clusters and metadata, in the same order), the kernel copying the data (copy_file_range).
public protocol HostCopyWritable: ImageFormat {
    /// Writes guest bytes [offset, offset + length) with the bytes of `source` at `sourceOffset`. Returns false,
    /// having written nothing, when the request cannot be copied so (the caller writes through a buffer).
    func writeCopying(from source: HostFile, at sourceOffset: UInt64, length: UInt64, to offset: UInt64,
                      backing: GuestReader?) throws -> Bool
}

extension RawFormat: PlainGuestFile {
    public func plainHostRange(at offset: UInt64, length: UInt64) -> (file: HostFile, offset: UInt64)? {
        guard let end = try? offset.adding(length), end <= virtualSize,
              let host = try? windowOffset.adding(offset) else { return nil }
        return (file, host)
    }
}

extension HostFile {
    /// Copies `length` bytes from `source` at `sourceOffset` to this file at `offset` inside the kernel. Returns
    /// the bytes copied, which fall short when the kernel cannot copy between these files (the caller copies
    /// the rest itself).
    public func copyIn(from source: HostFile, at sourceOffset: UInt64, length: UInt64, to offset: UInt64) -> UInt64 {
        var inOff = Int64(clamping: sourceOffset)
        var outOff = Int64(clamping: offset)
        var done: UInt64 = 0
        if source.fd < 0 || fd < 0 { return 0 }
        noteChange()
        while done < length {
            let n = instar_shim_copy_file_range(source.fd, &inOff, fd, &outOff, Int64(min(length - done, 1 << 30)))
            if n == -Int64(EINTR) { continue }
            if n <= 0 { break }
            done += UInt64(n)
        }
        if pacer != nil, done > 0 { paceWrite(at: offset, length: done) }
        return done
    }
}
