/// `qemu-img create` (qemu's bdrv_img_create): merges the format's and the host-file layer's option tables,
/// parses `-o`, fills in size and backing options, checks the backing file, then hands over to the driver.
/// The `Formatting ...` line is printed between `prepare` and `run`, as qemu prints it before the driver's
/// own validation.
public enum Create {
    /// What the caller asked for (qemu-img create's arguments).
    public struct Parameters {
        public var filename: String
        public var format: String = "raw"
        public var backingFile: String?
        public var backingFormat: String?
        /// The accumulated `-o` list, or nil.
        public var options: String?
        /// The size operand, or nil when none was given.
        public var size: UInt64?
        /// -u: do not open the backing file.
        public var unsafeBacking = false
        /// Secrets by id from `--object secret,...`.
        public var secrets: [String: String] = [:]
        public init(filename: String) { self.filename = filename }
    }

    /// A validated request, ready for `run`.
    public struct Prepared {
        public let filename: String
        public let format: String
        public let creator: FormatCreator
        public let options: CreateOptionValues
        public var secrets: [String: String] = [:]
        /// The whole `Formatting ...` line without the newline.
        public var formattingLine: String {
            "Formatting '\(filename)', fmt=\(format) \(options.formattingLine())"
        }
    }

    /// The merged option table for `format` (format options, then the host-file layer's it does not repeat).
    public static func optionTable(for creator: FormatCreator) -> [CreateOptionSpec] {
        var specs = creator.options
        for s in HostFileCreate.options where !specs.contains(where: { $0.name == s.name }) { specs.append(s) }
        return specs
    }

    /// The table for creating `filename`: a name a protocol driver claims (rbd:) merges that protocol's
    /// create options instead of the file layer's.
    public static func optionTable(for creator: FormatCreator, filename: String) -> [CreateOptionSpec] {
        guard let d = ProtocolRegistry.descriptor(forPlainName: filename) else { return optionTable(for: creator) }
        var specs = creator.options
        for s in d.createOptions where !specs.contains(where: { $0.name == s.name }) { specs.append(s) }
        return specs
    }

    /// Looks up the format's creator with qemu's messages.
    public static func creator(for format: String) throws -> FormatCreator {
        guard let d = FormatRegistry.descriptor(named: format) else {
            throw InstarError.invalid("Unknown file format '\(format)'")
        }
        guard let c = d.creator else {
            throw InstarError.unsupported("Format driver '\(format)' does not support image creation")
        }
        return c
    }

    /// Everything bdrv_img_create does before printing. Errors carry qemu-img's "FILENAME: " prefix.
    public static func prepare(_ p: Parameters) throws -> Prepared {
        do {
            return try prepareUnprefixed(p)
        } catch let e as InstarError {
            throw e.prepending("\(p.filename): ")
        }
    }

    /// qemu's bdrv_img_create after the format's check: the protocol the filename names must create files too;
    /// protocol drivers with nothing beneath (null-co) cannot.
    public static func refuseUncreatableProtocol(_ filename: String) throws {
        if let proto = FormatRegistry.filelessProtocol(named: filename) {
            throw InstarError.unsupported("Protocol driver '\(proto.name)' does not support image creation")
        }
    }

    static func prepareUnprefixed(_ p: Parameters) throws -> Prepared {
        let creator = try creator(for: p.format)
        try refuseUncreatableProtocol(p.filename)
        _ = try ImageOpener.fileName(fromPlainName: p.filename)
        var values = CreateOptionValues(specs: optionTable(for: creator, filename: p.filename))
        if let list = p.options { try values.parse(list) }
        if !values.isSet("size") {
            if let s = p.size { try values.set("size", String(s)) }
        } else if p.size != nil {
            throw InstarError.invalid("The image size must be specified only once")
        }
        if let b = p.backingFile {
            guard values.spec("backing_file") != nil else {
                throw InstarError.unsupported("Backing file not supported for file format '\(p.format)'")
            }
            try values.set("backing_file", b)
        }
        if let f = p.backingFormat {
            guard values.spec("backing_fmt") != nil else {
                throw InstarError.unsupported("Backing file format not supported for file format '\(p.format)'")
            }
            try values.set("backing_fmt", f)
        }
        let backingFile = values.text("backing_file")
        if let b = backingFile {
            if b == p.filename {
                throw InstarError.invalid("Error: Trying to create an image with the same filename as the backing file")
            }
            if b.isEmpty { throw InstarError.invalid("Expected backing file name, got empty string") }
        }
        let backingFormat = values.text("backing_fmt")
        var size: UInt64? = values.size("size")
        if let b = backingFile, !p.unsafeBacking {
            let full = ImageOpener.resolveBackingName(b, relativeTo: p.filename)
            var opts = ImageOpenOptions()
            opts.forceShare = true
            // qemu opens it without I/O (BDRV_O_NO_IO): only its size and format are wanted, so an encrypted
            // backing file needs no passphrase.
            opts.metadataOnly = true
            let layer: ImageLayer
            do {
                let spec = try ImageOpener.parseSpec(full, format: backingFormat)
                layer = try ImageOpener.open(spec, options: opts, writable: false)
            } catch let e as InstarError {
                throw InstarError(e.code, e.message + "\nCould not open backing image.", errno: e.errnoValue)
            }
            defer { try? layer.close() }
            guard backingFormat != nil else {
                // qemu appends the detected format as a hint without a final newline.
                throw InstarError.invalid("Backing file specified without backing format\nDetected format of \(layer.format.formatName).")
            }
            if size == nil {
                size = layer.virtualSize
                try values.set("size", String(layer.virtualSize))
            }
        } else if backingFile != nil && backingFormat == nil {
            throw InstarError.invalid("Backing file specified without backing format")
        }
        if size == nil { throw InstarError.invalid("Image creation needs a size parameter") }
        var prepared = Prepared(filename: p.filename, format: p.format, creator: creator, options: values)
        prepared.secrets = ObjectRegistry.secrets(adding: p.secrets)
        return prepared
    }

    /// Creates the image (qemu's bdrv_create). Errors carry the "FILENAME: " prefix; an EFBIG failure gets
    /// qemu-img's "image size is too large" wording.
    public static func run(_ prepared: Prepared) throws {
        do {
            // The file a plain name names ("file:a:b" creates "a:b"), as qemu's protocol detection reads it.
            var request = CreateRequest(filename: try ImageOpener.fileName(fromPlainName: prepared.filename),
                                        options: prepared.options)
            request.secrets = prepared.secrets
            try prepared.creator.create(request)
        } catch let e as InstarError {
            if e.errnoValue == 27 /* EFBIG */ {
                let hint = (prepared.options.size("cluster_size") ?? 0) != 0 ? " (try using a larger cluster size)" : ""
                throw InstarError(.range, "\(prepared.filename): The image size is too large for file format '\(prepared.format)'\(hint)",
                                  errno: e.errnoValue)
            }
            throw e.prepending("\(prepared.filename): ")
        }
    }

    /// Both steps, for library callers that print nothing.
    public static func create(_ p: Parameters) throws {
        try run(try prepare(p))
    }
}
