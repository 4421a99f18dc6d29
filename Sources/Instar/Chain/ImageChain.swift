import Glibc

/// One opened image and the chain below it. A layer reads guest bytes through its format driver, which sends
/// unallocated ranges to the next layer down.
public final class ImageLayer: GuestReader {
    public let format: ImageFormat
    /// The name the layer was opened by, as qemu-img prints it ("image:").
    public let filename: String
    /// The backing layer, nil at the bottom of the chain or when opened without backing.
    public let backing: ImageLayer?
    /// The backing name resolved against this image's directory, as qemu's "full-backing-filename".
    public let fullBackingFilename: String?
    public let writable: Bool

    init(format: ImageFormat, filename: String, backing: ImageLayer?, fullBackingFilename: String?, writable: Bool) {
        self.format = format
        self.filename = filename
        self.backing = backing
        self.fullBackingFilename = fullBackingFilename
        self.writable = writable
    }

    public var virtualSize: UInt64 { format.virtualSize }

    /// Layers from this one down, top first.
    public var chain: [ImageLayer] {
        var out: [ImageLayer] = []
        var cur: ImageLayer? = self
        while let c = cur { out.append(c); cur = c.backing }
        return out
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let size = virtualSize
        if offset >= size {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let inside = Int(min(UInt64(buffer.count), size - offset))
        try format.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<inside]), at: offset, backing: backing)
        if inside < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[inside...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Closes every layer (writers flush here).
    public func close() throws {
        var firstError: Error?
        for layer in chain {
            do { try layer.format.close() } catch { if firstError == nil { firstError = error } }
        }
        if let e = firstError { throw e }
    }
}

/// What to open: a plain filename, or the parts of a qemu `json:{...}` filename.
public struct ImageSpec {
    public var filename: String
    public var format: String?
    public var driverOptions: [String: QObject] = [:]
    /// The keys of `driverOptions` in the order given.
    public var driverOptionOrder: [String] = []
    /// "force-share" from the options, if given.
    public var forceShare: Bool?
    /// "cache.direct" from the options, if given: O_DIRECT for this image's file, whatever the command's cache mode.
    public var direct: Bool?
    /// The name the user gave for a plain file; see `displayName(formatName:)` for what qemu-img shows.
    public var displayName: String

    public init(filename: String, format: String? = nil) {
        self.filename = filename
        self.format = format
        self.displayName = filename
    }

    /// Options that change what an image reads as, so qemu keeps them in a rebuilt json: name (the union of its
    /// drivers' strong_runtime_opts: raw's window, the secrets of luks and encrypted qcow2). Other options are
    /// passed to the driver but leave the plain file name.
    public static let strongOptions: Set<String> = ["offset", "size", "key-secret", "encrypt.key-secret"]

    /// The name qemu-img shows once the image is open (bdrv_refresh_filename): the plain file name, unless
    /// driver options remain, in which case qemu rebuilds a `json:` name from the driver, those options and
    /// the file node, in its QDict order.
    public func displayName(formatName: String) -> String {
        let strong = driverOptionOrder.filter { ImageSpec.strongOptions.contains($0) && driverOptions[$0] != nil }
        if strong.isEmpty { return displayName }
        var members: [(String, QObject)] = [("driver", .string(formatName))]
        for k in strong { if let v = driverOptions[k] { members.append((k, v)) } }
        members.append(("file", .dict([("driver", .string("file")), ("filename", .string(filename))])))
        return "json:" + QJSON.compact(.dict(members))
    }
}

/// Opens images and their backing chains.
public enum ImageOpener {
    /// Chains deeper than this are refused (a hostile image could otherwise name itself through many links).
    public static let maxChainDepth = 256

    /// Opens `spec` (and, if `openBacking`, everything below it). Errors are what qemu-img prints after
    /// "Could not open 'NAME': ".
    public static func open(_ spec: ImageSpec, options: ImageOpenOptions, writable: Bool = false,
                            openBacking: Bool = true) throws -> ImageLayer {
        var seen: [String] = []
        return try openLayer(spec, options: options, writable: writable, openBacking: openBacking, depth: 0, seen: &seen)
    }

    /// Splits a `json:{...}` filename into an ImageSpec; plain names pass through.
    public static func parseSpec(_ name: String, format: String?) throws -> ImageSpec {
        guard name.hasPrefix("json:") else {
            if name.isEmpty { throw InstarError.invalid("The 'file' block driver requires a file name") }
            return ImageSpec(filename: name, format: format)
        }
        let text = String(name.dropFirst(5))
        if text.allSatisfy({ $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }) {
            throw InstarError.invalid("Could not parse the JSON options: Expecting a JSON value")
        }
        let parsed = try JSONParser.parse(text)
        guard case let .dict(members) = parsed else { throw InstarError.invalid("Invalid JSON object given") }
        return try spec(fromOptions: members, format: format)
    }

    /// The spec an image argument of a command names: an --image-opts option string (`imageOpts`; `warn` gets
    /// qemu's deprecation warnings for short-form flags), or a filename, plain or json:, with -f's format.
    public static func commandLineSpec(_ name: String, format: String?, imageOpts: Bool,
                                       warn: ((String) -> Void)? = nil) throws -> ImageSpec {
        imageOpts ? try spec(fromOptions: QemuOptsParser.blockOptions(name, warn: warn), format: nil)
                  : try parseSpec(name, format: format)
    }

    /// Block-layer options that every node accepts and that never show in a regenerated `json:` filename.
    static let genericOptions: Set<String> = [
        "read-only", "auto-read-only", "cache.direct", "cache.no-flush", "discard", "detect-zeroes", "node-name",
    ]
    /// file-posix options accepted (and ignored) under "file.".
    static let fileOptions: Set<String> = ["locking", "aio", "aio-max-batch", "drop-cache", "x-check-cache-dropped"]

    /// An ImageSpec from block options (a parsed json: filename or --image-opts), after qemu's flattening of
    /// nested objects into dotted keys.
    public static func spec(fromOptions members: [(String, QObject)], format: String?) throws -> ImageSpec {
        var spec = ImageSpec(filename: "", format: format)
        var file: String?
        var fileDriver: String?
        for (k, v) in flatten(members, prefix: "") {
            switch k {
            case "driver":
                // qemu reads the driver name with qdict_get_try_str: a non-string value is as if absent.
                guard let s = v.stringValue else { continue }
                if let f = format, f != s { throw InstarError.invalid("Cannot use 'driver' with a format that conflicts") }
                spec.format = s
            case "file":
                // A plain string names an existing node, which a command line never has.
                let s = v.stringValue ?? ""
                throw InstarError.invalid("Cannot find device='\(s)' nor node-name='\(s)'")
            case "file.filename":
                guard let s = v.stringValue else { throw InstarError.invalid("Invalid parameter type for 'filename', expected: string") }
                file = s
            case "file.driver":
                fileDriver = v.stringValue
            case "force-share":
                switch v {
                case let .bool(b): spec.forceShare = b
                case .string("on"): spec.forceShare = true
                case .string("off"): spec.forceShare = false
                default: throw InstarError.invalid("Parameter 'force-share' expects 'on' or 'off'")
                }
            case "cache.direct":
                switch v {
                case let .bool(b): spec.direct = b
                case .string("on"): spec.direct = true
                case .string("off"): spec.direct = false
                default: throw InstarError.invalid("Parameter 'cache.direct' expects 'on' or 'off'")
                }
            default:
                if genericOptions.contains(k) { continue }
                if k.hasPrefix("file.") {
                    if fileOptions.contains(String(k.dropFirst(5))) { continue }
                    throw InstarError.invalid("Invalid parameter '\(k.dropFirst(5))'")
                }
                spec.driverOptions[k] = v
                spec.driverOptionOrder.append(k)
            }
        }
        if let d = fileDriver, d != "file" { throw InstarError.unsupported("Unknown protocol driver '\(d)'") }
        if file == nil, spec.format == FileFormat.descriptor.name, let f = spec.driverOptions["filename"]?.stringValue {
            // The file driver opened as the top node names its file directly.
            file = f
            spec.driverOptions["filename"] = nil
            spec.driverOptionOrder.removeAll { $0 == "filename" }
        }
        if file == nil, let f = spec.format, FormatRegistry.descriptor(named: f)?.filelessProtocol != nil {
            // A protocol driver with nothing beneath (null-co): its options describe the whole device.
            return spec
        }
        guard let f = file else {
            if spec.format == nil { throw InstarError.invalid("Must specify either driver or file") }
            throw InstarError.invalid("A block device must be specified for \"file\"")
        }
        if f.isEmpty { throw InstarError.invalid("The 'file' block driver requires a file name") }
        spec.filename = f
        spec.displayName = f
        return spec
    }

    /// qdict_flatten: {"a": {"b": 1}} becomes {"a.b": 1}; lists stay as they are.
    static func flatten(_ members: [(String, QObject)], prefix: String) -> [(String, QObject)] {
        var out: [(String, QObject)] = []
        for (k, v) in members {
            if case let .dict(inner) = v {
                out += flatten(inner, prefix: prefix + k + ".")
            } else {
                out.append((prefix + k, v))
            }
        }
        return out
    }

    static func openLayer(_ spec: ImageSpec, options: ImageOpenOptions, writable: Bool, openBacking: Bool,
                          depth: Int, seen: inout [String]) throws -> ImageLayer {
        if let layer = try openFileless(spec, options: options, writable: writable) { return layer }
        let file = try HostFile.open(spec.filename, writable: writable, direct: spec.direct ?? options.direct)
        file.noFlush = options.noFlush
        var opts = options
        if let fs = spec.forceShare { opts.forceShare = fs }
        let descriptor: FormatDescriptor
        if let f = spec.format {
            guard let d = FormatRegistry.openDescriptor(named: f) else {
                throw InstarError.unsupported("Unknown driver '\(f)'")
            }
            descriptor = d
        } else {
            descriptor = try FormatRegistry.probe(file, filename: spec.filename)
        }
        if let accepted = descriptor.runtimeOptions {
            for k in spec.driverOptionOrder where !accepted.contains(k) {
                throw InstarError.invalid("Block format '\(descriptor.name)' does not support the option '\(k)'")
            }
        }
        if descriptor.sharesWrites && !writable && !opts.forceShare && depth == 0 && !opts.noShareWrite {
            // qemu passes a plain reader's "share everything" through raw to the file.
            try ImageLock.acquire(file, perm: [.consistentRead], shared: .all)
        } else if descriptor.sharesWrites && writable && opts.resize && depth == 0 {
            // qemu-img resize's BlockBackend shares everything, and raw passes that through to the file.
            try ImageLock.acquire(file, perm: [.consistentRead, .write, .resize], shared: .all)
        } else {
            // A format with its own metadata takes the resize permission on its file whenever it may write
            // (qemu's bdrv_default_perms_for_storage); pass-through formats only when resizing.
            try ImageLock.acquireForOpen(file, writable: writable, forceShare: opts.forceShare,
                                         resize: writable && (opts.resize || !descriptor.sharesWrites))
        }
        opts.driverOptions = spec.driverOptions
        if depth == 0, let key = options.keySecret {
            // Only the top image: qemu passes encrypt.key-secret to the node it was given for. A json: name may
            // name the id itself; the direct passphrase then fills that id. The spec (and so the name qemu-img
            // shows) is left alone: the passphrase is not an option the user wrote.
            let id = spec.driverOptions["encrypt.key-secret"]?.stringValue ?? ImageOpenOptions.keySecretID
            opts.driverOptions["encrypt.key-secret"] = .string(id)
            if opts.secrets[id] == nil { opts.secrets[id] = key }
        }
        let request = OpenRequest(file: file, filename: spec.filename, baseDirectory: directoryName(spec.filename),
                                  writable: writable, options: opts)
        let format = try descriptor.open(request)

        var backingLayer: ImageLayer?
        var fullBacking: String?
        if let ref = format.backingReference {
            fullBacking = resolveBackingName(ref.filename, relativeTo: spec.filename)
            if openBacking, let full = fullBacking {
                if depth + 1 >= maxChainDepth {
                    throw InstarError(.chain, "Backing chain is deeper than \(maxChainDepth) images")
                }
                let key = canonicalKey(full)
                seen.append(canonicalKey(spec.filename))
                if seen.contains(key) {
                    throw InstarError(.chain, "Backing file '\(full)' creates an infinite loop")
                }
                let bspec = try parseSpec(full, format: ref.format)
                do {
                    backingLayer = try openLayer(bspec, options: options, writable: false, openBacking: true,
                                                 depth: depth + 1, seen: &seen)
                } catch let e as InstarError {
                    if e.code == .chain { throw e }
                    throw e.prepending("Could not open backing file: ")
                }
            }
        }
        return ImageLayer(format: format, filename: spec.displayName(formatName: format.formatName), backing: backingLayer,
                          fullBackingFilename: fullBacking, writable: writable)
    }

    /// Opens a protocol driver that has no host file (null-co), when the spec names one: by driver (`-f null-co`,
    /// a `driver` option) or by URL (`null-co://`, which qemu probes as raw over the driver). No file is opened and
    /// no lock taken. Other formats named over such a URL read its zeroes (qemu's probe then finds no magic).
    static func openFileless(_ spec: ImageSpec, options: ImageOpenOptions, writable: Bool) throws -> ImageLayer? {
        var opts = options
        if let fs = spec.forceShare { opts.forceShare = fs }
        opts.driverOptions = spec.driverOptions
        let named = spec.format.flatMap { FormatRegistry.descriptor(named: $0) }
        let descriptor: FormatDescriptor
        if let d = named, d.filelessProtocol != nil {
            descriptor = d
        } else if let d = FormatRegistry.filelessProtocol(named: spec.filename) {
            guard spec.format == nil || spec.format == "raw" else {
                let file = try HostFile.open("/dev/null")
                let request = OpenRequest(file: file, filename: spec.filename, baseDirectory: ".", writable: false,
                                          options: opts)
                guard let f = spec.format, let other = FormatRegistry.openDescriptor(named: f) else {
                    throw InstarError.unsupported("Unknown driver '\(spec.format ?? "")'")
                }
                _ = try other.open(request)
                return nil
            }
            descriptor = d
            opts.formatShown = "raw"
        } else {
            return nil
        }
        if let accepted = descriptor.runtimeOptions {
            for k in spec.driverOptionOrder where !accepted.contains(k) {
                throw InstarError.invalid("Block protocol '\(descriptor.name)' doesn't support the option '\(k)'")
            }
        }
        let file = try HostFile.open("/dev/null")
        let request = OpenRequest(file: file, filename: spec.filename, baseDirectory: ".", writable: writable,
                                  options: opts)
        let format = try descriptor.open(request)
        let name = descriptor.displayName?(spec) ?? spec.displayName
        return ImageLayer(format: format, filename: name, backing: nil, fullBackingFilename: nil, writable: writable)
    }

    /// qemu's path_combine(): a relative backing name is taken relative to the directory of the image that
    /// names it; absolute names and json: names stand as they are. No realpath is applied.
    public static func resolveBackingName(_ name: String, relativeTo image: String) -> String {
        if name.hasPrefix("/") || name.hasPrefix("json:") { return name }
        guard let slash = image.lastIndex(of: "/") else { return name }
        return String(image[...slash]) + name
    }

    /// The directory part of a filename, "." when there is none.
    public static func directoryName(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    /// A key that identifies a file for loop detection: device and inode when it exists, else the name.
    static func canonicalKey(_ path: String) -> String {
        var st = stat()
        if stat(path, &st) == 0 { return "\(st.st_dev):\(st.st_ino)" }
        return path
    }
}
