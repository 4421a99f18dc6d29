import CInstar
import Glibc

/// QEMU-compatible image locking. QEMU's file driver expresses block-layer permissions as OFD byte-range locks
/// on the image file: for each permission bit i it holds a shared lock on byte 100+i while it *uses* the
/// permission, and on byte 200+i while it *refuses to share* it. Before using permission i it checks that
/// nobody holds byte 200+i, and before refusing to share i it checks that nobody holds byte 100+i.
public struct BlockPermissions: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let consistentRead = BlockPermissions(rawValue: 1 << 0)
    public static let write = BlockPermissions(rawValue: 1 << 1)
    public static let writeUnchanged = BlockPermissions(rawValue: 1 << 2)
    public static let resize = BlockPermissions(rawValue: 1 << 3)
    public static let all: BlockPermissions = [.consistentRead, .write, .writeUnchanged, .resize]

    static let names = ["consistent read", "write", "write unchanged", "resize"]
    static let bitCount = 4
}

public enum ImageLock {
    static let permBase: Int64 = 100
    static let sharedBase: Int64 = 200

    /// Takes the locks for using `perm` while sharing `shared` with other processes, as QEMU does on open.
    /// A reader that does not force-share uses [.consistentRead] and refuses to share .write; a writer uses
    /// [.consistentRead, .write] (+ .resize) and refuses to share .write and .resize.
    public static func acquire(_ file: HostFile, perm: BlockPermissions, shared: BlockPermissions) throws {
        // Network protocols have no host file to lock: the server arbitrates, as with qemu.
        if file.fd < 0 { return }
        let unshared = BlockPermissions.all.subtracting(shared)
        for i in 0..<BlockPermissions.bitCount {
            let bit = BlockPermissions(rawValue: 1 << UInt32(i))
            if perm.contains(bit) { try lock(file, permBase + Int64(i)) }
            if unshared.contains(bit) { try lock(file, sharedBase + Int64(i)) }
        }
        for i in 0..<BlockPermissions.bitCount {
            let bit = BlockPermissions(rawValue: 1 << UInt32(i))
            if perm.contains(bit), try conflicts(file, sharedBase + Int64(i)) {
                throw lockError("Failed to get \"\(BlockPermissions.names[i])\" lock", file)
            }
        }
        for i in 0..<BlockPermissions.bitCount {
            let bit = BlockPermissions(rawValue: 1 << UInt32(i))
            if unshared.contains(bit), try conflicts(file, permBase + Int64(i)) {
                throw lockError("Failed to get shared \"\(BlockPermissions.names[i])\" lock", file)
            }
        }
    }

    /// The locks for a plain open: readers and writers as qemu-img takes them.
    public static func acquireForOpen(_ file: HostFile, writable: Bool, forceShare: Bool, resize: Bool = false) throws {
        if writable {
            var perm: BlockPermissions = [.consistentRead, .write]
            if resize { perm.insert(.resize) }
            try acquire(file, perm: perm, shared: [.consistentRead, .writeUnchanged])
        } else if forceShare {
            try acquire(file, perm: [], shared: .all)
        } else {
            try acquire(file, perm: [.consistentRead], shared: [.consistentRead, .writeUnchanged, .resize])
        }
    }

    private static func lock(_ file: HostFile, _ byte: Int64) throws {
        let r = instar_shim_ofd_lock(file.fd, byte, 1, 1)
        if r < 0 {
            // Filesystems without OFD locks: QEMU's "auto" locking silently goes without.
            if -r == EINVAL || -r == ENOSYS || -r == EOPNOTSUPP { return }
            throw InstarError(.locked, "Failed to lock byte \(byte)", errno: -r)
        }
    }

    private static func conflicts(_ file: HostFile, _ byte: Int64) throws -> Bool {
        let r = instar_shim_ofd_test(file.fd, byte, 1, 2)
        if r < 0 { return false }
        return r == 1
    }

    private static func lockError(_ what: String, _ file: HostFile) -> InstarError {
        InstarError(.locked, "\(what)\nIs another process using the image [\(file.path)]?", errno: EAGAIN)
    }
}
