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
        try HostFileCreate.resize(file, to: windowOffset + newSize, preallocation: preallocation)
    }
}

extension HostFileCreate {
    /// file-posix's truncate as a format that stores guest bytes plainly at a fixed offset passes it on (raw,
    /// luks): the file grows with off/falloc/full preallocation or shrinks; `metadata` is refused as the file
    /// layer refuses it.
    static func resize(_ file: HostFile, to target: UInt64, preallocation: ResizePreallocation) throws {
        let mode: Preallocation
        switch preallocation {
        case .off: mode = .off
        case .falloc: mode = .falloc
        case .full: mode = .full
        case .metadata:
            throw InstarError(.unsupported, "Unsupported preallocation mode: metadata", errno: ENOTSUP)
        }
        let current = try file.size()
        if target > current {
            try grow(file, to: target, preallocation: mode)
        } else if target < current {
            do {
                try file.truncate(to: target)
            } catch let e as InstarError where file.isHostFile {
                throw InstarError(e.code, "Failed to resize the file: \(strerrorString(e.errnoValue))", errno: e.errnoValue)
            }
        }
    }
}
