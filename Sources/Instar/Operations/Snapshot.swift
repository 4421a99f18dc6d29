import Glibc

/// `qemu-img snapshot`: lists, creates, reverts to and deletes internal snapshots through the driver's
/// `ImageSnapshottable` capability, with qemu-img 7.2's opens and messages (img_snapshot and block/snapshot.c).
/// A format without the capability answers as qemu's block layer does for a driver without snapshot callbacks.
public enum SnapshotOperation {
    public struct Options {
        /// --image-opts: the name is a QemuOpts string of block options.
        public var imageOpts = false
        /// --object secrets and the like; `forceShare` is -U.
        public var open = ImageOpenOptions()
        /// Receives the warnings qemu prints on stderr while the operation goes on (the probed-raw warning);
        /// the library drops them.
        public var warn: ((String) -> Void)?
        /// The wall clock a new snapshot records (qemu-img's g_get_real_time); nil reads the clock.
        public var clock: (() -> (sec: UInt32, nsec: UInt32))?
        public init() {}
    }

    /// Opens the image as img_snapshot does: read-only for a listing, read/write otherwise, backing chain
    /// included.
    static func open(_ name: String, writable: Bool, options: Options) throws -> ImageLayer {
        if !writable {
            do {
                let spec = try ImageOpener.commandLineSpec(name, format: nil, imageOpts: options.imageOpts)
                return try ImageOpener.open(spec, options: options.open, writable: false, openBacking: true)
            } catch let e as InstarError {
                throw e.prepending("Could not open '\(name)': ")
            }
        }
        if options.open.forceShare {
            throw InstarError.invalid("Could not open '\(name)': force-share=on can only be used with read-only images")
        }
        return try ResizeOperation.openForWrite(name, format: nil, imageOpts: options.imageOpts, open: options.open,
                                                warn: options.warn)
    }

    /// `snapshot -l`: the image's snapshots in table order (empty for a format without snapshots).
    public static func list(_ name: String, options: Options) throws -> [SnapshotInfo] {
        let layer = try open(name, writable: false, options: options)
        defer { try? layer.close() }
        if let remote = protocolSnapshots(layer) { return try remote.listSnapshots() }
        guard let s = layer.format as? ImageSnapshottable else { return [] }
        return try s.listSnapshots()
    }

    /// `snapshot` without an action: qemu-img opens the image read/write and closes it.
    public static func touch(_ name: String, options: Options) throws {
        let layer = try open(name, writable: true, options: options)
        try layer.close()
    }

    /// Runs `body` on the opened image and closes it; a failure of the close is reported after the body's.
    private static func withWritable(_ name: String, options: Options,
                                     _ body: (ImageLayer) throws -> Void) throws {
        let layer = try open(name, writable: true, options: options)
        do {
            try body(layer)
        } catch {
            try? layer.close()
            throw error
        }
        try layer.close()
    }

    /// `snapshot -c NAME`. Errors read "Could not create snapshot 'NAME': -ERRNO (strerror)".
    public static func create(_ name: String, snapshot: String, options: Options) throws {
        try withWritable(name, options: options) { layer in
            func fail(_ err: Int32) -> InstarError {
                InstarError(err == ENOTSUP ? .unsupported : .invalid,
                            "Could not create snapshot '\(snapshot)': -\(err) (\(strerrorString(err)))", errno: err)
            }
            if let remote = protocolSnapshots(layer) {
                do {
                    return try remote.createSnapshot(name: snapshot)
                } catch let e as InstarError {
                    var f = fail(e.errnoValue != 0 ? e.errnoValue : EIO)
                    f.code = e.code
                    throw f
                }
            }
            guard let s = layer.format as? ImageSnapshottable else { throw fail(ENOTSUP) }
            let now = options.clock?() ?? wallClock()
            do {
                try s.createSnapshot(name: snapshot, dateSec: now.sec, dateNsec: now.nsec)
            } catch let e as InstarError {
                let err = e.errnoValue != 0 ? e.errnoValue : EIO
                var f = fail(err)
                f.code = e.code
                throw f
            }
        }
    }

    /// `snapshot -a NAME` (NAME is an id or a name). Errors read "Could not apply snapshot 'NAME': ...".
    public static func apply(_ name: String, snapshot: String, options: Options) throws {
        var opts = options
        var openWarning: String?
        opts.warn = { msg in
            openWarning = msg
            options.warn?(msg)
        }
        try withWritable(name, options: opts) { layer in
            if let remote = protocolSnapshots(layer) {
                // bdrv_snapshot_goto closes the format, reverts the file and opens the format again: a probed
                // raw image warns a second time.
                if let w = openWarning { options.warn?(w) }
                do {
                    return try remote.revertSnapshot(name: snapshot)
                } catch let e as InstarError {
                    throw e.prepending("Could not apply snapshot '\(snapshot)': ")
                }
            }
            guard let s = layer.format as? ImageSnapshottable else {
                // qemu reverts through the protocol layer below: the format driver is closed and opened again
                // around it, and a probed raw image warns a second time.
                if let w = openWarning { options.warn?(w) }
                throw InstarError(.unsupported,
                                  "Could not apply snapshot '\(snapshot)': Block driver does not support snapshots",
                                  errno: ENOTSUP)
            }
            do {
                try s.applySnapshot(idOrName: snapshot, backing: layer.backing)
            } catch let e as InstarError {
                throw e.prepending("Could not apply snapshot '\(snapshot)': ")
            }
        }
    }

    /// `snapshot -d NAME`: qemu-img finds the snapshot by name only, then deletes the one with its id and name.
    public static func delete(_ name: String, snapshot: String, options: Options) throws {
        try withWritable(name, options: options) { layer in
            let notFound = InstarError(.notFound, "Could not delete snapshot '\(snapshot)': snapshot not found",
                                       errno: ENOENT)
            if let remote = protocolSnapshots(layer) {
                guard let found = try remote.listSnapshots().first(where: { $0.nameBytes == Array(snapshot.utf8) }) else {
                    throw notFound
                }
                do {
                    return try remote.deleteSnapshot(id: found.id, name: found.name)
                } catch let e as InstarError {
                    throw e.prepending("Could not delete snapshot '\(snapshot)': ")
                }
            }
            guard let s = layer.format as? ImageSnapshottable else { throw notFound }
            guard let found = try s.listSnapshots().first(where: { $0.nameBytes == Array(snapshot.utf8) }) else {
                throw notFound
            }
            do {
                try s.deleteSnapshot(id: found.id, name: String(decoding: found.nameBytes, as: UTF8.self))
            } catch let e as InstarError {
                throw e.prepending("Could not delete snapshot '\(snapshot)': ")
            }
        }
    }

    /// The storage's snapshots under a format that has none of its own (qemu's bdrv_snapshot_* fall through to
    /// the file child: RBD snapshots under raw).
    static func protocolSnapshots(_ layer: ImageLayer) -> ProtocolSnapshotting? {
        if layer.format is ImageSnapshottable { return nil }
        return layer.format.hostFiles.first?.remote?.snapshots
    }

    /// g_get_real_time split as qemu-img does: seconds, and the microseconds as nanoseconds.
    static func wallClock() -> (sec: UInt32, nsec: UInt32) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let usec = Int64(ts.tv_nsec) / 1000
        return (UInt32(truncatingIfNeeded: ts.tv_sec), UInt32(truncatingIfNeeded: usec * 1000))
    }
}
