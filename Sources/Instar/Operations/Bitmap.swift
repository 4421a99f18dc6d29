import Glibc

/// `qemu-img bitmap`: persistent dirty bitmap operations on one image (qemu-img.c img_bitmap, running the QMP
/// block-dirty-bitmap-* commands of block/monitor/bitmap-qmp-cmds.c), through the driver's
/// `PersistentBitmapEditing` capability.
public enum BitmapOperation {
    public enum Action: Equatable {
        case add, remove, clear, enable, disable
        /// Merges the named bitmap (of the source image, or of the image itself) into the bitmap.
        case merge(String)

        var name: String {
            switch self {
            case .add: return "add"
            case .remove: return "remove"
            case .clear: return "clear"
            case .enable: return "enable"
            case .disable: return "disable"
            case .merge: return "merge"
            }
        }
    }

    public struct Options {
        /// -f; nil probes.
        public var format: String?
        /// --image-opts (for the image; the merge source is always a filename).
        public var imageOpts = false
        public var open = ImageOpenOptions()
        /// -g: the granularity of a bitmap --add makes; 0 takes the image's default.
        public var granularity: Int64 = 0
        /// -b / -F: the image whose bitmap --merge reads; nil reads from the image itself.
        public var sourceFile: String?
        public var sourceFormat: String?
        /// The probed-raw warning qemu prints.
        public var warn: ((String) -> Void)?
        public init() {}
    }

    /// The checks img_bitmap makes before it opens anything, in its order.
    public static func checkArguments(_ actions: [Action], options: Options) throws {
        if actions.isEmpty {
            throw InstarError.invalid("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
        }
        if options.granularity != 0 && !actions.contains(.add) {
            throw InstarError.invalid("granularity only supported with --add")
        }
        if options.sourceFormat != nil && options.sourceFile == nil {
            throw InstarError.invalid("-F only supported with -b")
        }
        if options.sourceFile != nil && !actions.contains(where: { if case .merge = $0 { return true }; return false }) {
            throw InstarError.invalid("Merge bitmap source file only supported with --merge")
        }
    }

    /// The node name qemu generates for the image (id_generate: counter 1, then two random digits); it shows
    /// in a few messages.
    static func nodeName() -> String {
        let r = Int.random(in: 0..<100)
        return "#block1" + (r < 10 ? "0" : "") + String(r)
    }

    /// Runs `actions` in order on bitmap `bitmap` of `filename`. The image is closed (and what was done stored)
    /// whether or not an action fails, as qemu-img does; the first failure is thrown with qemu's
    /// "Operation OP on bitmap NAME failed: " prefix.
    public static func run(_ filename: String, bitmap: String, actions: [Action], options: Options) throws {
        try checkArguments(actions, options: options)
        if options.imageOpts && options.format != nil {
            throw InstarError.invalid("--image-opts and --format are mutually exclusive")
        }
        let layer: ImageLayer
        do {
            let spec = try ImageOpener.commandLineSpec(filename, format: options.format, imageOpts: options.imageOpts,
                                                       warn: options.warn)
            layer = try ImageOpener.open(spec, options: options.open, writable: true, openBacking: false)
            if spec.format == nil && layer.format.formatName == "raw" {
                options.warn?(ResizeOperation.probedRawWarning(ResizeOperation.probedFileName(spec, layer)))
            }
        } catch let e as InstarError {
            throw e.prepending("Could not open '\(filename)': ")
        }
        var source: ImageLayer?
        var failure: Error?
        do {
            if let s = options.sourceFile {
                do {
                    let spec = try ImageOpener.parseSpec(s, format: options.sourceFormat)
                    source = try ImageOpener.open(spec, options: options.open, writable: false, openBacking: false)
                } catch let e as InstarError {
                    throw e.prepending("Could not open '\(s)': ")
                }
            }
            let node = nodeName()
            for action in actions {
                do {
                    try apply(action, bitmap: bitmap, layer: layer, source: source ?? layer,
                              granularity: options.granularity, nodeName: node)
                } catch let e as InstarError {
                    throw e.prepending("Operation \(action.name) on bitmap \(bitmap) failed: ")
                }
            }
        } catch {
            failure = error
        }
        // qemu-img closes the source, then the image (which stores its bitmaps); errors there are not reported.
        try? source?.close()
        do {
            try layer.close()
        } catch {
            if failure == nil { failure = error }
        }
        if let failure { throw failure }
    }

    /// The most bits a merge may change in the destination (held in memory until the image is closed).
    public static let maxMergeBytes: UInt64 = 256 << 20

    static func notFound(_ name: String) -> InstarError {
        InstarError(.notFound, "Dirty bitmap '\(name)' not found", errno: ENOENT)
    }

    /// block_dirty_bitmap_lookup.
    static func lookup(_ layer: ImageLayer, _ name: String) throws -> (PersistentBitmapEditing, PersistentBitmap) {
        guard let ed = layer.format as? PersistentBitmapEditing,
              let bm = ed.editableBitmaps.first(where: { $0.name == name }) else { throw notFound(name) }
        return (ed, bm)
    }

    /// bdrv_dirty_bitmap_check with BDRV_BITMAP_INCONSISTENT (never busy or read-only in qemu-img).
    static func checkConsistent(_ bm: PersistentBitmap) throws {
        if bm.inconsistent {
            throw InstarError.invalid("Bitmap '\(bm.name)' is inconsistent and cannot be used\n"
                                      + "Try block-dirty-bitmap-remove to delete this bitmap from disk")
        }
    }

    static func apply(_ action: Action, bitmap: String, layer: ImageLayer, source: ImageLayer, granularity: Int64,
                      nodeName: String) throws {
        switch action {
        case .add:
            // qmp_block_dirty_bitmap_add, persistent: the granularity is a uint32 there.
            if bitmap.isEmpty { throw InstarError.invalid("Bitmap name cannot be empty") }
            var g = UInt32(truncatingIfNeeded: granularity)
            if granularity != 0 {
                if g < 512 || g & (g - 1) != 0 {
                    throw InstarError.invalid("Granularity must be power of 2 and at least 512")
                }
            } else {
                // bdrv_get_default_bitmap_granularity: the cluster size within [4 KiB, 64 KiB].
                let cs = (try? layer.format.formatInfo().clusterSize) ?? nil
                if let cs, cs > 0 {
                    g = UInt32(min(65536, max(4096, cs)))
                } else {
                    g = 65536
                }
            }
            guard let ed = layer.format as? PersistentBitmapEditing else {
                throw InstarError(.unsupported, "Can't store persistent bitmaps to \(nodeName): Operation not supported",
                                  errno: ENOTSUP)
            }
            try ed.checkNewPersistentBitmap(name: bitmap, granularity: g, nodeName: nodeName)
            try ed.createPersistentBitmap(name: bitmap, granularity: g, enabled: true)
        case .remove:
            let (ed, _) = try lookup(layer, bitmap)
            try ed.removePersistentBitmap(named: bitmap)
        case .clear:
            let (ed, bm) = try lookup(layer, bitmap)
            try checkConsistent(bm)
            try ed.clearPersistentBitmap(named: bitmap)
        case .enable, .disable:
            let (ed, bm) = try lookup(layer, bitmap)
            try checkConsistent(bm)
            try ed.setPersistentBitmapEnabled(named: bitmap, action == .enable)
        case .merge(let srcName):
            let (ed, dst) = try lookup(layer, bitmap)
            let (sed, src) = try lookup(source, srcName)
            try checkConsistent(dst)
            try checkConsistent(src)
            let dsize = try ed.bitmapCoveredSize(named: bitmap)
            let ssize = try sed.bitmapCoveredSize(named: srcName)
            if dsize != ssize {
                throw InstarError.invalid("Bitmaps are of different sizes (destination size is \(dsize), source size "
                                          + "is \(ssize)) and can't be merged")
            }
            // The destination's changed bits are held in memory until close: bound them as a whole.
            let held = dsize.divCeil(dst.granularity).divCeil(8)
            guard held <= maxMergeBytes else {
                throw InstarError(.unsupported, "Bitmap '\(bitmap)' is too large to merge into "
                                  + "(\(held >> 20) MiB of bits, at most \(maxMergeBytes >> 20) MiB)",
                                  errno: ENOMEM)
            }
            // Merging a bitmap into itself changes nothing.
            if source === layer && srcName == bitmap { return }
            try sed.forEachDirtyRange(ofBitmap: srcName) { off, len in
                try ed.setBitmapDirty(named: bitmap, offset: off, length: len)
            }
        }
    }
}
