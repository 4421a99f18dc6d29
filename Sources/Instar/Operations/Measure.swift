/// `qemu-img measure` (qemu's img_measure + bdrv_measure): the file size a new image of the output format
/// needs, for a given virtual size or for the contents of an existing image.
public enum Measure {
    public struct Parameters {
        /// The source image, or nil to measure `size`.
        public var filename: String?
        public var sourceFormat: String?
        /// `filename` is an --image-opts option string ("driver=qcow2,file.filename=...").
        public var imageOpts = false
        public var outputFormat = "raw"
        public var options: String?
        public var size: UInt64?
        public var forceShare = false
        /// Secrets by id from `--object secret,...`.
        public var secrets: [String: String] = [:]
        /// A direct passphrase for the source image (the C API's key_secret).
        public var keySecret: String?
        /// Receives qemu's warnings about the options (deprecated forms) as they arise; the library drops them.
        public var warn: ((String) -> Void)?
        public init() {}
    }

    public static func measure(_ p: Parameters) throws -> MeasureResult {
        if p.filename == nil && (p.sourceFormat != nil || p.imageOpts) {
            throw InstarError.invalid("--image-opts, -f, and -l require a filename argument.")
        }
        if p.filename != nil && p.size != nil {
            throw InstarError.invalid("--size N cannot be used together with a filename.")
        }
        if p.filename == nil && p.size == nil {
            throw InstarError.invalid("Either --size N or one filename must be specified.")
        }
        var source: ImageLayer?
        if let name = p.filename {
            var opts = ImageOpenOptions()
            opts.forceShare = p.forceShare
            opts.secrets = p.secrets
            opts.keySecret = p.keySecret
            if p.imageOpts && p.sourceFormat != nil {
                throw InstarError.invalid("--image-opts and --format are mutually exclusive")
            }
            do {
                let spec = try ImageOpener.commandLineSpec(name, format: p.sourceFormat, imageOpts: p.imageOpts,
                                                           warn: p.warn)
                if p.imageOpts, p.forceShare, spec.forceShare == false {
                    // img_open_opts reports this one without the "Could not open" prefix.
                    throw ForceShareConflict()
                }
                source = try ImageOpener.open(spec, options: opts)
            } catch is ForceShareConflict {
                throw InstarError(.invalid, "--force-share/-U conflicts with image options")
            } catch let e as InstarError {
                throw e.prepending("Could not open '\(name)': ")
            }
        }
        defer { try? source?.close() }
        let creator = try Create.creator(for: p.outputFormat)
        var values = CreateOptionValues(specs: Create.optionTable(for: creator))
        if let o = p.options {
            do {
                try values.parse(o)
            } catch let e as InstarError {
                throw InstarError(e.code, "\(e.message)\nInvalid options for file format '\(p.outputFormat)'")
            }
        }
        if let s = p.size { try values.set("size", String(s)) }
        guard let measure = creator.measure else {
            throw InstarError.unsupported("Block driver '\(p.outputFormat)' does not support size measurement")
        }
        var request = MeasureRequest(options: values, source: source)
        request.secrets = p.secrets
        return try measure(request)
    }
}

/// Marks the one --image-opts failure qemu reports without naming the image.
private struct ForceShareConflict: Error {}
