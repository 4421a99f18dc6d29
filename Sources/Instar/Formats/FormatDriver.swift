/// The format driver protocol. Every format (raw, qcow2, ...) lives in `Formats/<Format>/` and conforms to
/// `ImageFormat` for an open image plus a `FormatDescriptor` entry in `FormatRegistry` for probing, opening and
/// creating. Operations are written against these types only; they never ask which format an image is.

/// How one guest range stands in one layer of a chain, in qemu's BDRV_BLOCK_* terms.
public struct BlockStatus: Equatable {
    /// Bytes from the queried offset that share this status (> 0).
    public var length: UInt64
    /// This layer decides the contents of the range (BDRV_BLOCK_ALLOCATED); false sends readers to the backing file.
    public var allocated: Bool
    /// The range holds data (BDRV_BLOCK_DATA).
    public var data: Bool
    /// The range reads as zeroes (BDRV_BLOCK_ZERO).
    public var zero: Bool
    /// Where the range lives in `hostFile` (BDRV_BLOCK_OFFSET_VALID), if it is stored contiguously and plainly.
    public var hostOffset: UInt64?
    /// The host file name holding `hostOffset` (the image file, or an external data file).
    public var hostFile: String?
    /// BDRV_BLOCK_RECURSE: the data range may still read as zeroes in `hostFile` (qcow2 with preallocated
    /// metadata); the caller asks the host file's own status at `hostOffset` to find out.
    public var recurse: Bool

    public init(length: UInt64, allocated: Bool, data: Bool, zero: Bool, hostOffset: UInt64? = nil,
                hostFile: String? = nil, recurse: Bool = false) {
        self.length = length
        self.allocated = allocated
        self.data = data
        self.zero = zero
        self.hostOffset = hostOffset
        self.hostFile = hostFile
        self.recurse = recurse
    }

    /// Not allocated in this layer: the backing file (or zeroes) decides.
    public static func unallocated(_ length: UInt64) -> BlockStatus {
        BlockStatus(length: length, allocated: false, data: false, zero: false)
    }
}

/// The backing file an image names, exactly as stored in the image.
public struct BackingReference: Equatable {
    public var filename: String
    public var format: String?
    public init(filename: String, format: String?) {
        self.filename = filename
        self.format = format
    }
}

/// One internal snapshot, as `qemu-img info` lists it.
public struct SnapshotInfo: Equatable {
    public var id: String
    /// The name as text (bytes that are not UTF-8 become U+FFFD).
    public var name: String
    /// The name's bytes as stored in the image (up to a NUL): qemu prints and pads these, not `name`.
    public var nameBytes: [UInt8]
    public var vmStateSize: UInt64
    public var dateSec: UInt32
    public var dateNsec: UInt32
    public var vmClockNsec: UInt64
    /// nil when the image does not record an instruction count (qemu omits "icount").
    public var icount: UInt64?
    public init(id: String, name: String, vmStateSize: UInt64, dateSec: UInt32, dateNsec: UInt32,
                vmClockNsec: UInt64, icount: UInt64?, nameBytes: [UInt8]? = nil) {
        self.id = id
        self.name = name
        self.nameBytes = nameBytes ?? Array(name.utf8)
        self.vmStateSize = vmStateSize
        self.dateSec = dateSec
        self.dateNsec = dateNsec
        self.vmClockNsec = vmClockNsec
        self.icount = icount
    }
}

/// What a driver reports for `qemu-img info`, beyond what the generic layer knows (filename, sizes, backing).
public struct FormatInfo {
    /// "cluster-size", if the format has one.
    public var clusterSize: UInt64?
    /// "dirty-flag"; nil when qemu omits the key for this format.
    public var dirty: Bool?
    /// "encrypted": true, or nil to omit.
    public var encrypted: Bool?
    public var snapshots: [SnapshotInfo]
    /// "format-specific": `{"type": ..., "data": {...}}` with members in QAPI declaration order.
    public var formatSpecific: QObject?

    public init(clusterSize: UInt64? = nil, dirty: Bool? = false, encrypted: Bool? = nil,
                snapshots: [SnapshotInfo] = [], formatSpecific: QObject? = nil) {
        self.clusterSize = clusterSize
        self.dirty = dirty
        self.encrypted = encrypted
        self.snapshots = snapshots
        self.formatSpecific = formatSpecific
    }
}

/// Reads guest bytes of a layer below (the backing file). The chain layer implements it.
public protocol GuestReader: AnyObject {
    var virtualSize: UInt64 { get }
    /// Fills `buffer` with guest bytes at `offset`; bytes past `virtualSize` read as zeroes.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
}

/// An open image of one format: one layer of a chain.
public protocol ImageFormat: AnyObject {
    /// The qemu format name ("raw", "qcow2").
    var formatName: String { get }
    /// The guest-visible size in bytes.
    var virtualSize: UInt64 { get }
    /// The backing file the image names, if any.
    var backingReference: BackingReference? { get }
    /// The host files this layer reads (image file first, then e.g. an external data file), for actual-size.
    var hostFiles: [HostFile] { get }

    /// Fills `buffer` with guest bytes at `offset` (offset + count <= virtualSize). Ranges this layer does not
    /// allocate come from `backing`, or read as zeroes when there is none.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws

    /// The status of the range starting at `offset`, at most `length` bytes, in this layer alone.
    func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus

    /// What `qemu-img info` shows for this image beyond the generic fields.
    func formatInfo() throws -> FormatInfo

    /// "actual-size": bytes the layer occupies on the host, nil when unknown. qemu 7.2 counts the image file
    /// only (an external qcow2 data file is not included); drivers whose image spans several files of their
    /// own (vmdk extents) override this to add them up.
    func allocatedFileSize() -> UInt64?

    // Writing. Read-only drivers keep the default implementations below, which refuse.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws
    func discard(at offset: UInt64, length: UInt64) throws
    func flush() throws
    /// Called once before the image is dropped; writers write back caches and clear the dirty flag here.
    func close() throws

    /// Compressed cluster writes (convert -c), nil when the format cannot store compressed clusters.
    var compressedWrites: CompressedClusterWriting? { get }
    /// The persistent dirty bitmaps of the image; nil when the format (or this version of it) cannot hold any
    /// (qemu's bdrv_supports_persistent_dirty_bitmap).
    var persistentBitmapStore: PersistentBitmapStore? { get }
    /// Makes a read-only image read an internal snapshot's contents instead of the active ones (qemu's
    /// bdrv_snapshot_load_tmp, for convert -l): `id` and/or `name` select it.
    func loadSnapshotTemporarily(id: String?, name: String?) throws
    /// Whether an unallocated range falls through to a backing file, and so reads as zero without one (qemu's
    /// supports_backing). Drivers that cannot have one report unallocated ranges as neither data nor zero.
    var supportsBacking: Bool { get }
    /// A newly created image of this format reads as zeroes before anything is written (qemu's
    /// bdrv_has_zero_init), so convert may skip writing zero ranges to it.
    var hasZeroInit: Bool { get }
}

/// One persistent dirty bitmap as an image describes it.
public struct PersistentBitmap: Equatable {
    public var name: String
    /// Guest bytes per bit (a power of two).
    public var granularity: UInt64
    /// Records guest writes (qcow2's auto flag); a disabled bitmap keeps its contents.
    public var enabled: Bool
    /// Marked in use: not saved properly by its last writer, so its contents cannot be trusted (qemu's
    /// inconsistent bitmap).
    public var inconsistent: Bool
    public init(name: String, granularity: UInt64, enabled: Bool, inconsistent: Bool = false) {
        self.name = name
        self.granularity = granularity
        self.enabled = enabled
        self.inconsistent = inconsistent
    }
}

/// The persistent dirty bitmaps of an open image. Bits travel in qemu's serialized form: bit k covers guest
/// bytes [k * granularity, (k + 1) * granularity), least significant bit first in each byte, padded with zero
/// bits to a multiple of 64.
public protocol PersistentBitmapStore: AnyObject {
    /// The bitmaps in the image's own order.
    var persistentBitmaps: [PersistentBitmap] { get }
    /// The contents of a consistent bitmap.
    func readBitmap(named name: String) throws -> [UInt8]
    /// Adds a bitmap with these contents (sized for the image's virtual size) to an image opened writable;
    /// bitmaps added are stored together when the image is closed, as qemu stores them.
    func addBitmap(_ bitmap: PersistentBitmap, bits: [UInt8]) throws
}

/// Compresses one cluster; one instance per thread.
public protocol ClusterCompressor {
    /// The compressed form of a whole cluster, or nil when it is not smaller than the cluster (the caller then
    /// writes the cluster uncompressed, as qemu does).
    func compress(_ input: UnsafeRawBufferPointer) throws -> [UInt8]?
}

/// The compressed write side of a format (qemu's bdrv_co_pwritev_compressed split in two: compressing, which
/// may run on any thread, and storing, which runs in guest order on the writing thread).
public protocol CompressedClusterWriting: AnyObject {
    var compressedClusterSize: UInt64 { get }
    func makeClusterCompressor() -> ClusterCompressor
    /// Stores an already compressed cluster at guest cluster `clusterIndex` (unallocated in this layer).
    func writeCompressed(clusterIndex: UInt64, compressedBytes: [UInt8]) throws
    /// Ends a compressed convert (qemu-img's zero-length compressed write "to signal EOF"): the format may
    /// align its file's end, which compressed streams leave anywhere.
    func finishCompressedWrites() throws
    /// Every write of the image must be compressed (qemu's needs_compressed_writes: vmdk streamOptimized);
    /// convert then compresses without -c.
    var needsCompressedWrites: Bool { get }
    /// A short last cluster is compressed at its own length, not padded with zeroes to a whole cluster.
    var compressesExactLength: Bool { get }
}

extension CompressedClusterWriting {
    public var needsCompressedWrites: Bool { false }
    public var compressesExactLength: Bool { false }
}

extension ImageFormat {
    public func allocatedFileSize() -> UInt64? {
        guard let file = hostFiles.first else { return nil }
        return try? file.allocatedSize()
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        throw InstarError(.permission, "Image is read-only")
    }
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        throw InstarError(.permission, "Image is read-only")
    }
    public func discard(at offset: UInt64, length: UInt64) throws {}
    public func flush() throws {}
    public func close() throws {}
    public var compressedWrites: CompressedClusterWriting? { nil }
    public var persistentBitmapStore: PersistentBitmapStore? { nil }
    public var supportsBacking: Bool { true }
    public var hasZeroInit: Bool { true }
    public func loadSnapshotTemporarily(id: String?, name: String?) throws {
        throw InstarError.unsupported("Block format '\(formatName)' used by device '' does not support temporarily "
                                      + "loading internal snapshots")
    }
}

/// What a driver is given to open an image.
public struct OpenRequest {
    /// The image file (or the window of it a json: filename selects, see `RawWindow`).
    public var file: HostFile
    /// The name the user gave, as qemu prints it.
    public var filename: String
    /// Directory used to resolve relative names stored in the image (backing and data files).
    public var baseDirectory: String
    public var writable: Bool
    public var options: ImageOpenOptions
    public init(file: HostFile, filename: String, baseDirectory: String, writable: Bool, options: ImageOpenOptions) {
        self.file = file
        self.filename = filename
        self.baseDirectory = baseDirectory
        self.writable = writable
        self.options = options
    }
}

/// Options that reach the drivers.
public struct ImageOpenOptions {
    public var forceShare = false
    /// Readers refuse to share writing even through pass-through formats (qemu-img convert's sources).
    public var noShareWrite = false
    /// Opened for `check` (qemu's BDRV_O_CHECK): a corrupt image may still be opened writable, to repair it.
    public var check = false
    public var direct = false
    /// cache=unsafe: the image's files never flush (BDRV_O_NO_FLUSH).
    public var noFlush = false
    /// qemu's BDRV_O_NO_IO: the image is opened only to describe it (qemu-img info), so drivers do not open
    /// the files that hold guest data only (an external qcow2 data file), which then need not exist.
    public var metadataOnly = false
    /// qemu's BDRV_O_RESIZE: the top image is opened to change its size, and takes the resize permission.
    public var resize = false
    /// Driver options from a json: filename or --image-opts (for raw: "offset", "size").
    public var driverOptions: [String: QObject] = [:]
    /// Secrets by id, from --object secret,id=...,data=...
    public var secrets: [String: String] = [:]
    /// The format name a driver reports when qemu would show another driver on top of it: a protocol driver
    /// named by its URL (`null-co://`) is probed as raw.
    public var formatShown: String?
    /// The passphrase of the top image's encryption given directly (the C API's key_secret) instead of through
    /// a secret object; the opener hands it to the top image's driver as its `encrypt.key-secret` option.
    public var keySecret: String?
    /// The secret id under which `keySecret` reaches the driver when the image's options name none.
    public static let keySecretID = "instar-key-secret"
    /// The passphrase of the encrypted images below the top of the chain (the backing file and its own backing
    /// files), given directly (the C API's backing_key_secret): the opener hands it to each backing image's driver
    /// as its `encrypt.key-secret` (a luks image's `key-secret`), under the id a json: backing node names or
    /// under `backingKeySecretID`.
    public var backingKeySecret: String?
    /// The secret id under which `backingKeySecret` reaches a backing image's driver when its options name none.
    public static let backingKeySecretID = "instar-backing-key-secret"
    /// Decides whether a backing file is opened read/write (commit's base): asked once per backing link with
    /// the overlay's name, the backing name stored in it and that name resolved against the overlay.
    public var writableBacking: ((_ overlay: String, _ storedName: String, _ fullName: String) -> Bool)?
    /// The image is a backing file opened read/write because `writableBacking` chose it: qemu opens it
    /// read-only and then reopens it, so checks its drivers make only at open (vmdk's seSparse refusal) do not
    /// apply, and its writes fail instead.
    public var reopenedWritable = false
    public init() {}
}

/// A format's entry in the registry.
public struct FormatDescriptor {
    public var name: String
    /// qemu's probe score for the first 2048 bytes of a file (0: not this format; raw scores 1).
    public var probe: (_ header: [UInt8], _ filename: String) -> Int
    public var open: (OpenRequest) throws -> ImageFormat
    /// The driver hands its users' permissions straight to the file (qemu's raw driver acts as a filter), so a
    /// reader shares writing with other processes; drivers that cache metadata refuse to share writes.
    public var sharesWrites = false
    /// The json:/--image-opts options the driver takes; nil when it does not declare them (all are passed on).
    public var runtimeOptions: Set<String>?
    /// The options a driver uses, for drivers whose options qemu checks after the open (qcow2, qcow, qed, vdi,
    /// vhdx, vmdk): any other fails the open once the backing chain is open, where qemu's block layer looks for
    /// unused options.
    public var knownOption: ((String) -> Bool)? = nil
    /// Creation and measurement; nil for formats that cannot create images (filled in by `FormatRegistry`).
    public var creator: FormatCreator? = nil
    /// For a protocol driver with no host file beneath (null-co): the URL that names it (`null-co://`). The opener
    /// opens no file and takes no lock for it; named by URL without a format, it is probed as raw, as qemu does.
    public var filelessProtocol: String? = nil
    /// The name qemu-img shows for an image opened with this driver, when the driver decides it.
    public var displayName: ((ImageSpec) -> String)? = nil
    /// The driver can be reopened with other flags (qemu's bdrv_reopen_prepare). qemu reopens a commit's base
    /// and every node below it read/write; a driver that cannot be reopened fails that commit. Such a driver is
    /// opened read-only as a commit base, and the commit then reports qemu's error.
    public var reopenable = true
    /// The driver can only read (qemu's drivers that call bdrv_apply_auto_read_only first): a writable open fails
    /// with "Image is read-only" before any lock is taken, as qemu fails it before its permissions apply.
    public var readOnly = false
    public init(name: String, probe: @escaping ([UInt8], String) -> Int,
                open: @escaping (OpenRequest) throws -> ImageFormat) {
        self.name = name
        self.probe = probe
        self.open = open
    }
}

// MARK: Creating and measuring

/// One creation option of a format or of the host-file layer (qemu's QemuOptDesc in `create_opts`).
public struct CreateOptionSpec {
    public enum Kind: Equatable {
        case string, bool, number, size
        /// How `-o help` names the type.
        public var helpName: String {
            switch self {
            case .string: return "str"
            case .bool: return "bool (on/off)"
            case .number: return "num"
            case .size: return "size"
            }
        }
    }
    public var name: String
    public var kind: Kind
    public var help: String
    /// The value qemu prints on the `Formatting ...` line when the option is not given; nil prints nothing.
    public var defaultValue: String?
    public init(_ name: String, _ kind: Kind, _ help: String, default defaultValue: String? = nil) {
        self.name = name
        self.kind = kind
        self.help = help
        self.defaultValue = defaultValue
    }
}

/// What a driver's create entry is given: the file to create and the parsed `-o` options (with size,
/// backing_file and backing_fmt filled in from the command line).
public struct CreateRequest {
    public var filename: String
    public var options: CreateOptionValues
    /// Secrets by id (`--object secret,...`), for options such as encrypt.key-secret.
    public var secrets: [String: String] = [:]
    public init(filename: String, options: CreateOptionValues) {
        self.filename = filename
        self.options = options
    }
}

/// What a driver's measure entry is given: the options and, when measuring an image, its open chain.
public struct MeasureRequest {
    public var options: CreateOptionValues
    public var source: ImageLayer?
    /// Secrets by id (`--object secret,...`), for options such as encrypt.key-secret.
    public var secrets: [String: String] = [:]
    public init(options: CreateOptionValues, source: ImageLayer?) {
        self.options = options
        self.source = source
    }
}

/// qemu's BlockMeasureInfo.
public struct MeasureResult: Equatable {
    public var required: UInt64
    public var fullyAllocated: UInt64
    /// nil when qemu leaves "bitmaps" out.
    public var bitmaps: UInt64?
    public init(required: UInt64, fullyAllocated: UInt64, bitmaps: UInt64? = nil) {
        self.required = required
        self.fullyAllocated = fullyAllocated
        self.bitmaps = bitmaps
    }
}

/// A format's creation entries, kept apart from `FormatDescriptor` so a driver file can add them in an
/// extension; `FormatRegistry` merges them into the descriptors by format name.
public struct FormatCreator {
    public var name: String
    /// The format's create options in declaration order (this order decides the `Formatting` line).
    public var options: [CreateOptionSpec]
    public var create: (CreateRequest) throws -> Void
    public var measure: ((MeasureRequest) throws -> MeasureResult)?
    /// The driver writes compressed clusters (qemu's block_driver_can_compress), for convert -c's check
    /// before the target exists; formats with a `compression_type` option are taken to.
    public var writesCompressed = false
    public init(name: String, options: [CreateOptionSpec], create: @escaping (CreateRequest) throws -> Void,
                measure: ((MeasureRequest) throws -> MeasureResult)? = nil) {
        self.name = name
        self.options = options
        self.create = create
        self.measure = measure
    }
}

extension FormatDescriptor {
    /// The descriptor with `knownOption` set: the options its driver uses, any other refused after the open.
    public func knowing(_ known: @escaping (String) -> Bool) -> FormatDescriptor {
        var d = self
        d.knownOption = known
        return d
    }
}
