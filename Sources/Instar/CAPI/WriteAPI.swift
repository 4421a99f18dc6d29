import CInstar
import Glibc

// instar_write / instar_write_zeroes / instar_discard / instar_flush on a handle from instar_open.

/// Checks that [offset, offset + count) lies within the image of a writable handle.
private func writableRange(_ h: ImageHandle, _ count: UInt64, _ offset: UInt64) throws {
    guard h.layer.writable else {
        throw InstarError(.permission, "Image is read-only (open it with INSTAR_OPEN_READ_WRITE)", errno: EACCES)
    }
    let size = h.layer.virtualSize
    guard offset <= size, count <= size - offset, count <= UInt64(Int.max) else {
        throw InstarError(.range, "Request of \(count) bytes at offset \(offset) is beyond the end of the image (\(size) bytes)")
    }
}

@_cdecl("instar_write")
public func instar_write(_ image: OpaquePointer?, _ buf: UnsafeRawPointer?, _ count: UInt64, _ offset: UInt64,
                         _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let h = try handle(image)
        guard let buf else { throw InstarError.invalid("buf must not be NULL") }
        try h.locked {
            try writableRange(h, count, offset)
            try h.layer.format.write(UnsafeRawBufferPointer(start: buf, count: Int(count)), at: offset,
                                     backing: h.layer.backing)
        }
    }
}

@_cdecl("instar_write_zeroes")
public func instar_write_zeroes(_ image: OpaquePointer?, _ count: UInt64, _ offset: UInt64, _ flags: UInt32,
                                _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let h = try handle(image)
        try h.locked {
            try writableRange(h, count, offset)
            try h.layer.format.writeZeroes(at: offset, length: count,
                                           mayUnmap: flags & UInt32(INSTAR_ZERO_MAY_UNMAP) != 0,
                                           backing: h.layer.backing)
        }
    }
}

@_cdecl("instar_discard")
public func instar_discard(_ image: OpaquePointer?, _ count: UInt64, _ offset: UInt64,
                           _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let h = try handle(image)
        try h.locked {
            try writableRange(h, count, offset)
            try h.layer.format.discard(at: offset, length: count)
        }
    }
}

@_cdecl("instar_flush")
public func instar_flush(_ image: OpaquePointer?, _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let h = try handle(image)
        try h.locked { try h.layer.format.flush() }
    }
}
