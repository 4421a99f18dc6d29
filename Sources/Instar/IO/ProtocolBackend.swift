import Glibc

/// What lies under a format driver when it is not a host file: an NBD export, an RBD image. `HostFile` holds one
/// and forwards to it, so format drivers and operations read and write through `HostFile` without asking which
/// protocol they are on (qemu's protocol nodes: file, nbd, rbd).
///
/// Offsets and lengths are bytes. Every method may be called from several threads at once (convert's workers);
/// a backend that cannot serve requests concurrently serialises them itself.
public protocol ProtocolBackend: AnyObject {
    /// The length of the device in bytes.
    func size() throws -> UInt64
    /// Bytes the storage holds for it, where the protocol can say (qemu's "disk size"); nil prints "unavailable".
    func allocatedSize() throws -> UInt64?
    /// Reads up to `buffer.count` bytes at `offset`; returns how many were read (fewer only at the end).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int
    /// Writes all of `buffer` at `offset`.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Zeroes the range; `mayUnmap` lets the storage deallocate it (NBD_CMD_WRITE_ZEROES without NO_HOLE).
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws
    /// Deallocates the range where the storage can (trim, discard); reads may then return anything the
    /// protocol allows, so callers that need zeroes use `writeZeroes`.
    func discard(at offset: UInt64, length: UInt64) throws
    /// Makes written data durable.
    func flush() throws
    /// Waits for every write the backend accepted and has not finished (write-behind), throwing the first that
    /// failed; with `durable` (the cache mode flushes), written data is then made durable. `durable` false also
    /// tells the backend not to flush when it closes (qemu's cache=unsafe). Backends that finish each write
    /// before returning have nothing to do.
    func finishWrites(durable: Bool) throws
    /// Changes the device's length, where the protocol can.
    func truncate(to length: UInt64) throws
    /// The status of the extent starting at `offset`, at most `length` bytes long (at least one byte when
    /// `offset` is inside the device): whether it holds data and whether it reads as zeroes.
    func extent(at offset: UInt64, length: UInt64) throws -> ProtocolExtent
    /// Releases the connection or image; called once, when the owning HostFile goes away.
    func close()
    /// The storage's allocation unit where it has one (an RBD object), shown as `cluster_size` by info.
    var clusterSize: UInt64? { get }
    /// The storage's own snapshots (RBD), nil when the protocol has none.
    var snapshots: ProtocolSnapshotting? { get }
    /// info's "format-specific" when the protocol is opened as the top node (`{"type": "rbd", "data": {}}`).
    func formatSpecific() throws -> QObject?
    /// How many reads a sequential copy should keep in flight to go at the storage's pace: each one waits a
    /// network round trip (RBD's OSDs, an NBD server), so several overlap. 1 for a backend with no latency to
    /// hide.
    var readsInFlight: Int { get }
    /// Waits until every write-behind request has been answered, and throws the first that failed (as the next
    /// write would), without flushing or changing what close does. Nothing to wait for by default.
    func drainWrites() throws
}

extension ProtocolBackend {
    public var clusterSize: UInt64? { nil }
    public var snapshots: ProtocolSnapshotting? { nil }
    public func finishWrites(durable: Bool) throws {}
    public func formatSpecific() throws -> QObject? { nil }
    public var readsInFlight: Int { 1 }
    public func drainWrites() throws {}
}

/// Snapshots kept by the storage under a protocol node (qemu's bdrv_snapshot_* falling through a raw format to
/// its file). Errors carry the errno qemu's callers print.
public protocol ProtocolSnapshotting: AnyObject {
    func listSnapshots() throws -> [SnapshotInfo]
    func createSnapshot(name: String) throws
    func deleteSnapshot(id: String, name: String) throws
    func revertSnapshot(name: String) throws
}

/// One extent of a protocol backend's block status.
public struct ProtocolExtent: Equatable {
    public var length: UInt64
    /// The storage holds data here (not a hole).
    public var data: Bool
    /// The range reads as zeroes.
    public var zero: Bool

    public init(length: UInt64, data: Bool, zero: Bool) {
        self.length = length
        self.data = data
        self.zero = zero
    }
}

/// A protocol driver: how a name or a json: "file" node becomes a backend.
public struct ProtocolDescriptor {
    /// The driver name in json:/--image-opts options ("nbd", "rbd").
    public var name: String
    /// Plain-name prefixes it claims ("nbd:", "nbd://", "nbd+unix://", "rbd:").
    public var prefixes: [String]
    /// The options a plain name stands for, in the order qemu's parse_filename puts them (they form the json:
    /// name qemu prints for the node); throws qemu's error for a malformed name.
    public var parseName: (String) throws -> [(String, QObject)]
    /// Opens the device the options name.
    public var open: (_ options: [(String, QObject)], _ writable: Bool) throws -> ProtocolBackend
    /// Creates the device for `qemu-img create` with `size` bytes, where the protocol can (rbd); nil means
    /// creation opens the existing device and checks it is large enough, as qemu's generic protocol create does.
    /// `createOptions` are the -o values of the create (the protocol reads its own, e.g. rbd's cluster_size).
    public var create: ((_ options: [(String, QObject)], _ size: UInt64, _ createOptions: CreateOptionValues?) throws
                        -> Void)?
    /// The protocol's create options, merged into a format's option table for names it claims (in place of
    /// the file layer's preallocation, nocow...), as qemu's bdrv_img_create appends the protocol's create_opts.
    public var createOptions: [CreateOptionSpec] = []
    /// Whether qemu's image locks apply (never for network protocols: the server arbitrates).
    public var takesLocks: Bool = false
    /// The plain name qemu shows for the node (its bdrv_refresh_filename, e.g. nbd+unix:///exp?socket=PATH),
    /// whatever name or options opened it; nil (no closure, or nil from it) when the driver has none and qemu
    /// names the node by a json: of its options (rbd).
    public var exactFilename: ((_ options: [(String, QObject)]) -> String?)?
    /// The options a json: name of the node shows (qemu's strong_runtime_opts, flattened as qemu flattens
    /// them); nil shows every option.
    public var nameOptions: ((_ options: [(String, QObject)]) -> [(String, QObject)])?
    /// Whether the driver reads `--object secret` values (rbd's key-secret, encrypt.key-secret): they reach its
    /// open and create as the internal option "=secrets", a dict of id → secret.
    public var takesSecrets: Bool = false

    public init(name: String, prefixes: [String],
                parseName: @escaping (String) throws -> [(String, QObject)],
                open: @escaping (_ options: [(String, QObject)], _ writable: Bool) throws -> ProtocolBackend,
                create: ((_ options: [(String, QObject)], _ size: UInt64, _ createOptions: CreateOptionValues?) throws
                         -> Void)? = nil) {
        self.name = name
        self.prefixes = prefixes
        self.parseName = parseName
        self.open = open
        self.create = create
    }
}

/// The protocol drivers instar has besides "file". Each driver adds its descriptor to `all`.
public enum ProtocolRegistry {
    public static let all: [ProtocolDescriptor] = protocolDescriptors()

    /// The driver a json: "file" node names.
    public static func descriptor(named name: String) -> ProtocolDescriptor? {
        all.first { $0.name == name }
    }

    /// The driver whose prefix starts the plain name `name`.
    public static func descriptor(forPlainName name: String) -> ProtocolDescriptor? {
        all.first { d in d.prefixes.contains { name.hasPrefix($0) } }
    }
}

/// The node under a format when it is a protocol other than "file": its driver and options.
public struct ProtocolAddress {
    public var driver: String
    public var options: [(String, QObject)]

    public init(driver: String, options: [(String, QObject)]) {
        self.driver = driver
        self.options = options
    }

    /// The address a plain name stands for, when a protocol driver claims the name.
    /// The options with `secrets` added as "=secrets" where the driver takes secrets.
    public func options(secrets: [String: String]) -> [(String, QObject)] {
        guard !secrets.isEmpty, ProtocolRegistry.descriptor(named: driver)?.takesSecrets == true else { return options }
        return options + [("=secrets", .dict(secrets.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) }))]
    }

    public static func fromPlainName(_ name: String) throws -> ProtocolAddress? {
        guard let d = ProtocolRegistry.descriptor(forPlainName: name) else { return nil }
        return ProtocolAddress(driver: d.name, options: try d.parseName(name))
    }

    /// The node as qemu prints it in a json: name: {"driver": ..., options...} (qemu puts the driver last for
    /// nodes it rebuilt from a parsed name; the driver's own parse order is kept otherwise).
    public var node: QObject {
        // Keys starting with "=" are a driver's internal options (rbd's "=keyvalue-pairs"): qemu never prints them.
        let shown = ProtocolRegistry.descriptor(named: driver)?.nameOptions?(options) ?? options
        return .dict(shown.filter { !$0.0.hasPrefix("=") } + [("driver", .string(driver))])
    }
}
