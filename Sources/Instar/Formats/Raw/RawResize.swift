import Glibc

/// Resizing a raw image is resizing its file (qemu's raw_co_truncate passing on to file-posix): only a whole
/// file can change size, and the file layer knows off, falloc and full preallocation.
extension RawFormat: ImageResizable {
    public func resize(to newSize: UInt64, preallocation: ResizePreallocation, backing: GuestReader?) throws {
        if windowSize != nil {
            throw InstarError(.unsupported, "Cannot resize fixed-size raw disks", errno: ENOTSUP)
        }
        guard newSize <= UInt64(Int64.max) - windowOffset else {
            throw InstarError(.invalid, "Disk size too large for the chosen offset", errno: EINVAL)
        }
        let target = windowOffset + newSize
        let mode: HostFileCreate.Preallocation
        switch preallocation {
        case .off: mode = .off
        case .falloc: mode = .falloc
        case .full: mode = .full
        case .metadata:
            throw InstarError(.unsupported, "Unsupported preallocation mode: metadata", errno: ENOTSUP)
        }
        let current = try file.size()
        if target > current {
            try HostFileCreate.grow(file, to: target, preallocation: mode)
        } else if target < current {
            do {
                try file.truncate(to: target)
            } catch let e as InstarError {
                throw InstarError(e.code, "Failed to resize the file: \(strerrorString(e.errnoValue))", errno: e.errnoValue)
            }
        }
    }
}
