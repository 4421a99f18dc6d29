import Glibc

/// `qemu-img resize`: changes an image's virtual size through the driver's `ImageResizable` capability, with
/// qemu-img 7.2's checks and messages (img_resize, then bdrv_co_truncate).
public enum ResizeOperation {
    public struct Options {
        /// -f; nil probes.
        public var format: String?
        /// --image-opts: the name is a QemuOpts string of block options.
        public var imageOpts = false
        /// --object secrets and the like.
        public var open = ImageOpenOptions()
        /// --preallocation.
        public var preallocation: ResizePreallocation = .off
        /// --shrink: shrinking is refused without it.
        public var shrink = false
        /// Receives the warnings qemu prints on stderr while the operation goes on (the probed-raw warning);
        /// the library drops them.
        public var warn: ((String) -> Void)?
        public init() {}
    }

    /// The three-line warning qemu prints when a write opens a raw image whose format was probed.
    public static func probedRawWarning(_ filename: String) -> String {
        "WARNING: Image format was not specified for '\(filename)' and probing guessed raw.\n"
            + "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n"
            + "         Specify the 'raw' format explicitly to remove the restrictions."
    }

    /// The name the probed-raw warning gives: the file node's, which a protocol driver rebuilds from its options
    /// (raw's open refreshes its child's filename first).
    public static func probedFileName(_ spec: ImageSpec, _ layer: ImageLayer) -> String {
        if let f = layer.format.hostFiles.first, !f.isHostFile { return f.path }
        return spec.displayName
    }

    /// Opens `name` read/write for a change of its metadata (resize, amend): the image and its backing chain,
    /// with qemu's "Could not open" prefix on failure and the probed-raw warning.
    public static func openForWrite(_ name: String, format: String?, imageOpts: Bool, open: ImageOpenOptions,
                                    warn: ((String) -> Void)?) throws -> ImageLayer {
        if imageOpts && format != nil {
            throw InstarError.invalid("--image-opts and --format are mutually exclusive")
        }
        do {
            let spec = try ImageOpener.commandLineSpec(name, format: format, imageOpts: imageOpts, warn: warn)
            let layer = try ImageOpener.open(spec, options: open, writable: true, openBacking: true)
            if spec.format == nil && layer.format.formatName == "raw" {
                warn?(probedRawWarning(probedFileName(spec, layer)))
            }
            return layer
        } catch let e as InstarError {
            throw e.prepending("Could not open '\(name)': ")
        }
    }

    /// Resizes `name`: to `size` bytes, or by `size` (signed) bytes when `relative`. Errors carry qemu-img's
    /// full message (after the "qemu-img: " prefix).
    public static func run(_ name: String, size: Int64, relative: Bool, options: Options) throws {
        var open = options.open
        open.resize = true
        let layer = try openForWrite(name, format: options.format, imageOpts: options.imageOpts,
                                     open: open, warn: options.warn)
        var closed = false
        defer { if !closed { try? layer.close() } }
        let current = Int64(clamping: layer.virtualSize)
        // qemu computes in int64_t; a wrapped sum is caught by the positivity check as in qemu.
        let total = relative ? current &+ size : size
        if total <= 0 { throw InstarError.invalid("New image size must be positive") }
        if total <= current && options.preallocation != .off {
            throw InstarError.invalid("Preallocation can only be used for growing images")
        }
        if total < current && !options.shrink {
            throw InstarError.invalid("Use the --shrink option to perform a shrink operation.\n"
                + "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before "
                + "performing such an operation, make sure there is no important data there.")
        }
        guard let resizable = layer.format as? ImageResizable else {
            throw InstarError(.unsupported, "Image format driver does not support resize", errno: ENOTSUP)
        }
        try resizable.resize(to: UInt64(total), preallocation: options.preallocation, backing: layer.backing)
        closed = true
        try layer.close()
    }
}
