/// Optional driver capabilities. Operations ask `format as? ImageResizable` (or `ImageAmendable`) instead of
/// asking which format an image is; a driver without the capability gets qemu's "does not support" message.

/// How a resize fills the space it adds (qemu's PreallocMode).
public enum ResizePreallocation: String, CaseIterable {
    case off, metadata, falloc, full
}

/// A format whose virtual size can change (qemu's bdrv_co_truncate on the format node).
public protocol ImageResizable: ImageFormat {
    /// Sets the virtual size to `newSize`. The caller has checked the size is positive and, for shrinking,
    /// that the user asked for it; the driver applies its own rules (alignment, preallocation support).
    /// `backing` is the layer below, for formats that must hide a longer backing file's tail.
    func resize(to newSize: UInt64, preallocation: ResizePreallocation, backing: GuestReader?) throws
}

/// One `-o` option of `amend`, as given (the value is still text).
public struct AmendOption: Equatable {
    public var name: String
    public var value: String
    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}

/// The amend options of each format that can amend, in qemu's declaration order (qemu's `amend_opts`), for
/// `amend -o help` without an image and for parsing `-o` before the driver sees it.
public enum AmendOptionTable {
    public static let byFormat: [String: [CreateOptionSpec]] = ["qcow2": Qcow2Format.amendOptionSpecs,
                                                                "luks": LuksFormat.amendOptionSpecs]
}

/// A format whose creation options can be changed on an existing image (qemu's bdrv_amend_options).
public protocol ImageAmendable: ImageFormat {
    /// Applies `options`; `force` is qemu-img amend's --force. `progress` receives values in 0...100.
    /// `backing` is the layer below (its size matters when the image shrinks or loses zero clusters).
    func amend(options: [AmendOption], force: Bool, backing: GuestReader?,
               progress: ((Double) throws -> Void)?) throws
    /// The same with the --object secrets by id, for options that name secrets (LUKS keyslots' new-secret and
    /// old-secret). Drivers without such options need not implement it.
    func amend(options: [AmendOption], force: Bool, secrets: [String: String], backing: GuestReader?,
               progress: ((Double) throws -> Void)?) throws
}

extension ImageAmendable {
    public func amend(options: [AmendOption], force: Bool, secrets: [String: String], backing: GuestReader?,
                      progress: ((Double) throws -> Void)?) throws {
        try amend(options: options, force: force, backing: backing, progress: progress)
    }
}

/// A format whose persistent dirty bitmaps can be added, removed and changed one by one (qemu's
/// block-dirty-bitmap-* commands, which `qemu-img bitmap` runs). Bitmaps are named; the bits travel as byte
/// ranges of the guest, so bitmaps of different granularities and images can be merged.
public protocol PersistentBitmapEditing: ImageFormat {
    /// Every bitmap of the image (loaded and added), in no particular order.
    var editableBitmaps: [PersistentBitmap] { get }
    /// Guest bytes a bitmap covers (qemu's bdrv_dirty_bitmap_size).
    func bitmapCoveredSize(named name: String) throws -> UInt64
    /// qemu's bdrv_can_store_new_dirty_bitmap: the driver's checks for a new persistent bitmap, with its
    /// messages (`nodeName` is the name qemu gives the image's node in them).
    func checkNewPersistentBitmap(name: String, granularity: UInt32, nodeName: String) throws
    /// Adds an empty bitmap, stored when the image is closed.
    func createPersistentBitmap(name: String, granularity: UInt32, enabled: Bool) throws
    /// Removes a bitmap from the image at once (qemu's bdrv_remove_persistent_dirty_bitmap and release).
    func removePersistentBitmap(named name: String) throws
    /// Clears every bit.
    func clearPersistentBitmap(named name: String) throws
    /// The auto flag: whether guest writes set bits.
    func setPersistentBitmapEnabled(named name: String, _ enabled: Bool) throws
    /// Calls `body(offset, length)` for each run of set bits as guest bytes, in order.
    func forEachDirtyRange(ofBitmap name: String, _ body: (UInt64, UInt64) throws -> Void) throws
    /// Sets the bits covering the guest range.
    func setBitmapDirty(named name: String, offset: UInt64, length: UInt64) throws
}

/// A format whose `read` and `write` may run on several threads at once for different guest ranges (a plain
/// file behind it, no metadata to keep consistent). Operations that keep several requests in flight (bench)
/// send them in parallel only to such formats and serialise the rest.
public protocol ConcurrentGuestIO: ImageFormat {
    /// Reads a sequential copy (convert) should keep in flight on its own threads: more than 1 where the bytes
    /// come over a network (`HostFile.readsInFlight`).
    var readsInFlight: Int { get }
}

/// A format with internal snapshots (qemu's bdrv_snapshot_* driver callbacks). A driver without it gets qemu's
/// answers for a format that has none (see `SnapshotOperation`).
public protocol ImageSnapshottable: ImageFormat {
    /// The snapshot table in table order.
    func listSnapshots() throws -> [SnapshotInfo]
    /// Creates a disk-only snapshot `name` of the current state with the given wall-clock time; the driver
    /// allocates the id. Errors carry the errno qemu's driver returns.
    func createSnapshot(name: String, dateSec: UInt32, dateNsec: UInt32) throws
    /// Reverts the image to the snapshot whose id, else whose name, is `idOrName`; `backing` is the layer below
    /// (a size change zeroes what a longer backing file would show). Errors carry qemu's whole message (e.g.
    /// "Failed to load snapshot: No such file or directory").
    func applySnapshot(idOrName: String, backing: GuestReader?) throws
    /// Deletes the first snapshot with this id and name (either may be nil, not both). Errors carry qemu's
    /// whole message.
    func deleteSnapshot(id: String?, name: String?) throws
}
