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
            // Writes a protocol backend still has in flight (NBD's write-behind) finish here, failures reported.
            guard layer.writable else { continue }
            for file in layer.format.hostFiles {
                do { try file.finishWrites() } catch { if firstError == nil { firstError = error } }
            }
        }
        if let e = firstError { throw e }
    }
}

/// A raw node between a format and its file (qemu's `{"driver": "raw", "offset": O, "size": S, "file": ...}`
/// as a format's child): a window of the node below it.
public struct RawWindowSpec {
    public var offset: UInt64 = 0
    public var size: UInt64?
    /// The strong options as given ("offset", "size"), for the json: name qemu rebuilds.
    public var given: [(String, QObject)] = []
    public init() {}
}

/// What an image's backing child is (qemu's "backing" option).
public indirect enum BackingChoice {
    /// The backing file the image names (no option given).
    case fromImage
    /// `"backing": null`: opened without a backing file.
    case none
    /// `"backing": "NAME"`: an existing node by name, which a command line never has.
    case reference(String)
    /// `"backing": {...}`: this node (its options, "backing." taken off) instead of the image's own backing
    /// file; without a file of its own it opens the image's backing file with these options.
    case node([(String, QObject)])

    /// Whether a backing option was given that an open without backing files leaves unused.
    var isSet: Bool { if case .none = self { return false }; return true }
}

/// What to open: a plain filename, or the parts of a qemu `json:{...}` filename.
public struct ImageSpec {
    /// The host file at the bottom of the node tree.
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
    /// Raw window nodes between the format and the file, outermost first.
    public var windows: [RawWindowSpec] = []
    /// The file node's "locking" (on, off, auto); nil when not given.
    public var locking: String?
    /// The file node names qemu's host_device driver: the file must be a block or character device.
    public var deviceOnly = false
    /// The node under the format when it is a protocol driver other than "file" given as json:/--image-opts
    /// options (nbd, rbd); plain protocol names stay in `filename` and are parsed when opened.
    public var protocolAddress: ProtocolAddress?
    public var backing: BackingChoice = .fromImage
    /// The flattened backing.* options, for the error qemu gives when a backing node is given to an open
    /// that does not open backing files.
    public var backingOptionKeys: [String] = []
    /// The name format probing sees when it is not `filename`: qemu probes a file given as a "file" child of
    /// json: or --image-opts options with no name at all (dmg probes by name only).
    public var probeName: String?

    public init(filename: String, format: String? = nil) {
        self.filename = filename
        self.format = format
        self.displayName = filename
    }

    /// Whether the file node takes and checks qemu's image locks ("locking": "off" opens without them).
    public var takesLocks: Bool { locking != "off" }

    /// Options that change what an image reads as, so qemu keeps them in a rebuilt json: name (the union of its
    /// drivers' strong_runtime_opts: raw's window, the secrets of luks and encrypted qcow2). Other options are
    /// passed to the driver but leave the plain file name.
    public static let strongOptions: Set<String> = ["offset", "size", "key-secret", "encrypt.key-secret", "force_size_calc"]

    /// The options of the node under the format (qemu's full_open_options of the "file" child), and the name
    /// qemu gives each window node, innermost last.
    func fileNode() -> (options: QObject, windowNames: [String]) {
        var node: QObject = .dict([("driver", .string("file")), ("filename", .string(filename))])
        var plain = true
        if let a = protocolAddress {
            node = a.node
            plain = ProtocolRegistry.descriptor(named: a.driver)?.exactFilename != nil
        }
        var names: [String] = []
        for w in windows.reversed() {
            var members: [(String, QObject)] = [("driver", .string("raw"))]
            members += w.given
            members.append(("file", node))
            node = .dict(members)
            // qemu's bdrv_refresh_filename: a plain name only over a protocol node and without strong options.
            let name = plain && w.given.isEmpty ? filename : "json:" + QJSON.compact(node)
            names.insert(name, at: 0)
            plain = false
        }
        return (node, names)
    }

    /// The name qemu-img shows once the image is open (bdrv_refresh_filename): the plain file name, unless
    /// driver options remain or the format's file is a window, in which case qemu rebuilds a `json:` name from
    /// the driver, those options and the file node, in its QDict order.
    public func displayName(formatName: String) -> String {
        let strong = driverOptionOrder.filter { ImageSpec.strongOptions.contains($0) && driverOptions[$0] != nil }
        let protocolNamed = protocolAddress.map { ProtocolRegistry.descriptor(named: $0.driver)?.exactFilename == nil }
        if strong.isEmpty && windows.isEmpty && protocolNamed != true { return displayName }
        // The protocol opened as the top node is shown by its own name.
        if protocolAddress?.driver == formatName && windows.isEmpty { return displayName }
        var members: [(String, QObject)] = [("driver", .string(formatName))]
        for k in strong { if let v = driverOptions[k] { members.append((k, v)) } }
        members.append(("file", fileNode().options))
        return "json:" + QJSON.compact(.dict(members))
    }
}

/// Opens images and their backing chains.
public enum ImageOpener {
    /// Chains deeper than this are refused (a hostile image could otherwise name itself through many links).
    public static let maxChainDepth = 256
    /// The end of qemu's message for a node whose driver cannot be reopened read/write (commit's base).
    public static let reopenUnsupported = "does not support reopening files"

    /// Opens `spec` (and, if `openBacking`, everything below it). Errors are what qemu-img prints after
    /// "Could not open 'NAME': ".
    public static func open(_ spec: ImageSpec, options: ImageOpenOptions, writable: Bool = false,
                            openBacking: Bool = true) throws -> ImageLayer {
        var seen: [String] = []
        // Secrets a library caller added with instar_object_add serve every open, after the call's own.
        var options = options
        options.secrets = ObjectRegistry.secrets(adding: options.secrets)
        return try openLayer(spec, options: options, writable: writable, openBacking: openBacking, depth: 0, seen: &seen)
    }

    /// Splits a `json:{...}` filename into an ImageSpec; plain names pass through.
    public static func parseSpec(_ name: String, format: String?, warn: ((String) -> Void)? = nil) throws -> ImageSpec {
        guard name.hasPrefix("json:") else {
            if name.isEmpty { throw InstarError.invalid("The 'file' block driver requires a file name") }
            let file = try fileName(fromPlainName: name)
            if file.isEmpty { throw InstarError.invalid("The 'file' block driver requires a file name") }
            var spec = ImageSpec(filename: file, format: format)
            if let d = ProtocolRegistry.descriptor(forPlainName: file), d.exactFilename == nil {
                // A protocol node without a plain name of its own (rbd): qemu names it by its options.
                let address = ProtocolAddress(driver: d.name, options: try d.parseName(file))
                spec.protocolAddress = address
                spec.displayName = "json:" + QJSON.compact(address.node)
            }
            return spec
        }
        let parsed: QObject
        do {
            parsed = try JSONParser.parse(String(name.dropFirst(5)))
        } catch let e as InstarError {
            throw e.prepending("Could not parse the JSON options: ")
        }
        guard case let .dict(members) = parsed else { throw InstarError.invalid("Invalid JSON object given") }
        return try spec(fromOptions: members, format: format, warn: warn)
    }

    /// qemu's path_has_protocol(): a colon before any slash.
    public static func hasProtocol(_ name: String) -> Bool {
        guard let i = name.firstIndex(where: { $0 == ":" || $0 == "/" }) else { return false }
        return name[i] == ":"
    }

    /// The file a plain image name names, as qemu's protocol detection reads it: a `file:` prefix is taken off
    /// (with "./" put before a rest that would itself read as a protocol), any other prefix is a protocol
    /// instar does not have.
    public static func fileName(fromPlainName name: String) throws -> String {
        guard hasProtocol(name), let colon = name.firstIndex(of: ":") else { return name }
        // A protocol driver with nothing beneath (null-co://) is opened by its URL.
        if FormatRegistry.filelessProtocol(named: name) != nil { return name }
        let proto = name[..<colon]
        // nbd:, rbd: and the other protocol drivers open the name as given.
        if ProtocolRegistry.descriptor(forPlainName: name) != nil { return name }
        guard proto == "file" else { throw InstarError.unsupported("Unknown protocol '\(proto)'") }
        let rest = String(name[name.index(after: colon)...])
        return hasProtocol(rest) ? "./" + rest : rest
    }

    /// The spec an image argument of a command names: an --image-opts option string (`imageOpts`; `warn` gets
    /// qemu's deprecation warnings for short-form flags), or a filename, plain or json:, with -f's format.
    public static func commandLineSpec(_ name: String, format: String?, imageOpts: Bool,
                                       warn: ((String) -> Void)? = nil) throws -> ImageSpec {
        imageOpts ? try spec(fromOptions: QemuOptsParser.blockOptions(name, warn: warn), format: nil, warn: warn)
                  : try parseSpec(name, format: format, warn: warn)
    }

    /// Block-layer options that every node accepts and that never show in a regenerated `json:` filename.
    static let genericOptions: Set<String> = [
        "read-only", "auto-read-only", "cache.direct", "cache.no-flush", "discard", "detect-zeroes", "node-name",
    ]
    /// file-posix options accepted (and ignored) under "file.".
    static let fileOptions: Set<String> = ["locking", "aio", "aio-max-batch", "drop-cache", "x-check-cache-dropped"]

    /// An ImageSpec from block options (a parsed json: filename or --image-opts), after qemu's flattening of
    /// nested objects into dotted keys. `warn` receives qemu's deprecation warnings.
    public static func spec(fromOptions members: [(String, QObject)], format: String?,
                            warn: ((String) -> Void)? = nil) throws -> ImageSpec {
        var spec = ImageSpec(filename: "", format: format)
        var fileKeys: [(String, QObject)] = []
        var backingKeys: [(String, QObject)] = []
        for (k, v) in flatten(members, prefix: "") {
            if k.hasPrefix("file.") { fileKeys.append((String(k.dropFirst(5)), v)); continue }
            if k.hasPrefix("backing.") { backingKeys.append((String(k.dropFirst(8)), v)); continue }
            switch k {
            case "driver":
                // qemu reads the driver name with qdict_get_try_str: a non-string value is as if absent.
                guard let s = v.stringValue else { continue }
                // A format given beside the name (-f, a backing format) wins: qemu joins the json: options
                // under the ones it already has without overwriting them.
                if format == nil { spec.format = s }
            case "file":
                // A plain string names an existing node, which a command line never has; an empty object no node.
                if case .dict = v { throw InstarError.invalid("A block device must be specified for \"file\"") }
                let s = v.stringValue ?? ""
                throw InstarError.invalid("Cannot find device='\(s)' nor node-name='\(s)'")
            case "backing":
                switch v {
                case .null: spec.backing = .none
                case .string(""):
                    warn?("Use of \"backing\": \"\" is deprecated; use \"backing\": null instead")
                    spec.backing = .none
                case let .string(s): spec.backing = .reference(s)
                default: break  // qemu reads it with qdict_get_try_str; the option then stays unused
                }
                if spec.backing.isSet { spec.backingOptionKeys.append("backing") }
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
                spec.driverOptions[k] = v
                spec.driverOptionOrder.append(k)
            }
        }
        if !backingKeys.isEmpty {
            spec.backingOptionKeys = backingKeys.map { "backing." + $0.0 }
            spec.backing = .node(backingKeys)
        }
        if fileKeys.isEmpty, spec.format == FileFormat.descriptor.name,
           let f = spec.driverOptions["filename"]?.stringValue {
            // The file driver opened as the top node names its file directly.
            spec.driverOptions["filename"] = nil
            spec.driverOptionOrder.removeAll { $0 == "filename" }
            if f.isEmpty { throw InstarError.invalid("The 'file' block driver requires a file name") }
            spec.filename = f
            spec.displayName = f
            return spec
        }
        if fileKeys.isEmpty, let f = spec.format, ProtocolRegistry.descriptor(named: f) != nil,
           FormatRegistry.descriptor(named: f)?.filelessProtocol == nil {
            // A protocol driver as the top node (driver=rbd): its options name the device; qemu shows the node
            // by them and the protocol as the format. (A protocol with a format entry of its own, nbd, opens there.)
            let options = spec.driverOptionOrder.compactMap { k in spec.driverOptions[k].map { (k, $0) } }
            spec.driverOptions = [:]
            spec.driverOptionOrder = []
            let address = ProtocolAddress(driver: f, options: options)
            spec.protocolAddress = address
            spec.filename = "json:" + QJSON.compact(address.node)
            spec.displayName = spec.filename
            return spec
        }
        if fileKeys.isEmpty, let f = spec.format, FormatRegistry.descriptor(named: f)?.filelessProtocol != nil {
            // A protocol driver with nothing beneath (null-co): its options describe the whole device.
            return spec
        }
        guard !fileKeys.isEmpty else {
            if spec.format == nil { throw InstarError.invalid("Must specify either driver or file") }
            throw InstarError.invalid("A block device must be specified for \"file\"")
        }
        try protocolNode(fileKeys, into: &spec)
        spec.displayName = spec.filename
        spec.probeName = ""
        return spec
    }

    /// Reads the node under a format (its "file." options with the prefix taken off): a file node, or a raw
    /// window over another such node, to any depth.
    static func protocolNode(_ keys: [(String, QObject)], into spec: inout ImageSpec) throws {
        var driver = "file"
        for (k, v) in keys where k == "driver" { if let s = v.stringValue { driver = s } }
        switch driver {
        case "file", "host_device":
            var filename: String?
            for (k, v) in keys {
                switch k {
                case "driver": continue
                case "filename":
                    guard let s = v.stringValue else {
                        throw InstarError.invalid("Invalid parameter type for 'filename', expected: string")
                    }
                    filename = s
                case "locking":
                    guard let s = v.stringValue, ["on", "off", "auto"].contains(s) else {
                        throw InstarError.invalid("invalid parameter value: \(v.stringValue ?? QJSON.compact(v))")
                    }
                    spec.locking = s
                default:
                    if genericOptions.contains(k) || fileOptions.contains(k) { continue }
                    throw InstarError.invalid("Block protocol '\(driver)' doesn't support the option '\(k)'")
                }
            }
            guard let f = filename, !f.isEmpty else {
                throw InstarError.invalid("The '\(driver)' block driver requires a file name")
            }
            spec.filename = f
            spec.deviceOnly = driver == "host_device"
        case "raw":
            var window = RawWindowSpec()
            var child: [(String, QObject)] = []
            for (k, v) in keys {
                if k.hasPrefix("file.") { child.append((String(k.dropFirst(5)), v)); continue }
                switch k {
                case "driver": continue
                case "offset", "size":
                    guard let n = RawFormat.sizeOption(v) else { throw RawFormat.sizeOptionError(k) }
                    if k == "offset" { window.offset = UInt64(n) } else { window.size = UInt64(n) }
                    window.given.removeAll { $0.0 == k }
                    window.given.append((k, v))
                case "file":
                    if case .dict = v { throw InstarError.invalid("A block device must be specified for \"file\"") }
                    let s = v.stringValue ?? ""
                    throw InstarError.invalid("Cannot find device='\(s)' nor node-name='\(s)'")
                default:
                    if genericOptions.contains(k) { continue }
                    throw InstarError.invalid("Block format 'raw' does not support the option '\(k)'")
                }
            }
            guard !child.isEmpty else { throw InstarError.invalid("A block device must be specified for \"file\"") }
            spec.windows.append(window)
            try protocolNode(child, into: &spec)
        default:
            if ProtocolRegistry.descriptor(named: driver) != nil {
                // nbd, rbd...: the driver reads its own options when it opens.
                let options = keys.filter { $0.0 != "driver" && !genericOptions.contains($0.0) }
                let address = ProtocolAddress(driver: driver, options: options)
                spec.protocolAddress = address
                spec.filename = "json:" + QJSON.compact(address.node)
                return
            }
            if FormatRegistry.openDescriptor(named: driver) != nil {
                throw InstarError.unsupported("Block format '\(driver)' is not supported as the node under a format")
            }
            throw InstarError.unsupported("Unknown driver '\(driver)'")
        }
    }

    /// qdict_flatten: {"a": {"b": 1}} becomes {"a.b": 1}; lists stay as they are.
    static func flatten(_ members: [(String, QObject)], prefix: String) -> [(String, QObject)] {
        var out: [(String, QObject)] = []
        for (k, v) in members {
            if case let .dict(inner) = v, !inner.isEmpty {
                out += flatten(inner, prefix: prefix + k + ".")
            } else {
                out.append((prefix + k, v))
            }
        }
        return out
    }

    static func openLayer(_ givenSpec: ImageSpec, options: ImageOpenOptions, writable: Bool, openBacking: Bool,
                          depth: Int, seen: inout [String]) throws -> ImageLayer {
        if let layer = try openFileless(givenSpec, options: options, writable: writable) { return layer }
        var spec = givenSpec
        let hostFile: HostFile
        if let address = spec.protocolAddress {
            hostFile = try HostFile.open(address: address, name: spec.filename, writable: writable,
                                         secrets: options.secrets)
        } else {
            hostFile = try HostFile.open(spec.filename, writable: writable, direct: spec.direct ?? options.direct)
        }
        if let address = hostFile.address, spec.windows.isEmpty,
           let exact = ProtocolRegistry.descriptor(named: address.driver)?.exactFilename?(address.options) {
            // A protocol node shows the name its driver rebuilds from its options (qemu's bdrv_refresh_filename).
            spec.displayName = exact
        }
        if spec.deviceOnly {
            // file-posix's host_device: the opened file must be a device (checked after the open, as qemu does)
            var st = stat()
            let kind = fstat(hostFile.fd, &st) == 0 ? st.st_mode & S_IFMT : 0
            guard kind == S_IFBLK || kind == S_IFCHR else {
                throw InstarError.invalid(
                    "'host_device' driver requires '\(spec.filename)' to be either a character or block device")
            }
        }
        hostFile.noFlush = options.noFlush
        // The format reads through the window nodes between it and the file, innermost first.
        var file = hostFile
        let windowNames = spec.fileNode().windowNames
        for (w, name) in zip(spec.windows, windowNames).reversed() {
            file = try HostFile.window(of: file, offset: w.offset, size: w.size, name: name)
        }
        var opts = options
        if let fs = spec.forceShare { opts.forceShare = fs }
        let descriptor: FormatDescriptor
        if let f = spec.format {
            guard let d = FormatRegistry.openDescriptor(named: f) else {
                throw InstarError.unsupported("Unknown driver '\(f)'")
            }
            descriptor = d
        } else {
            descriptor = try FormatRegistry.probe(file, filename: spec.probeName ?? spec.filename)
        }
        if let accepted = descriptor.runtimeOptions {
            for k in spec.driverOptionOrder where !accepted.contains(k) {
                throw InstarError.invalid("Block format '\(descriptor.name)' does not support the option '\(k)'")
            }
        }
        if !openBacking, let key = unusedBackingOption(spec) {
            // An open without backing files leaves a backing node's options unused, which qemu refuses.
            throw InstarError.invalid("Block format '\(descriptor.name)' does not support the option '\(key)'")
        }
        if writable && descriptor.readOnly {
            guard depth > 0 else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
            // A backing file asked for writing (commit's base): qemu opens it read-only, which must succeed, then
            // fails to reopen it read/write, naming the node by its generated name ("#block", a counter, two
            // random digits).
            var seenCopy = seen
            _ = try openLayer(spec, options: options, writable: false, openBacking: openBacking, depth: depth,
                              seen: &seenCopy)
            let digits = Int.random(in: 0...99)
            throw InstarError(.unsupported, "Block format '\(descriptor.name)' used by node '#block\(2 * depth + 1)"
                              + (digits < 10 ? "0" : "") + "\(digits)' \(ImageOpener.reopenUnsupported)", errno: ENOTSUP)
        }
        if !spec.takesLocks {
            // "locking": "off": the file node neither takes nor checks qemu's locks.
        } else if descriptor.sharesWrites && !writable && !opts.forceShare && depth == 0 && !opts.noShareWrite {
            // qemu passes a plain reader's "share everything" through raw to the file.
            try ImageLock.acquire(hostFile, perm: [.consistentRead], shared: .all)
        } else if descriptor.sharesWrites && writable && opts.resize && depth == 0 {
            // qemu-img resize's BlockBackend shares everything, and raw passes that through to the file.
            try ImageLock.acquire(hostFile, perm: [.consistentRead, .write, .resize], shared: .all)
        } else {
            // A format with its own metadata takes the resize permission on its file whenever it may write
            // (qemu's bdrv_default_perms_for_storage); pass-through formats only when resizing.
            try ImageLock.acquireForOpen(hostFile, writable: writable, forceShare: opts.forceShare,
                                         resize: writable && (opts.resize || !descriptor.sharesWrites))
        }
        opts.driverOptions = spec.driverOptions
        // The direct passphrases: key_secret for the top image only (qemu passes encrypt.key-secret to the node it
        // was given for), backing_key_secret for every image below it, each under its own reserved id.
        let direct = depth == 0 ? options.keySecret.map { ($0, ImageOpenOptions.keySecretID) }
            : options.backingKeySecret.map { ($0, ImageOpenOptions.backingKeySecretID) }
        if let (key, reservedID) = direct {
            // A json: name (or a backing node of one) may name the id itself; the direct passphrase then fills
            // that id. The spec (and so the name qemu-img shows) is left alone: the passphrase is not an option
            // the user wrote.
            if spec.driverOptions["encrypt.key-secret"] == nil, let id = spec.driverOptions["key-secret"]?.stringValue {
                // luks's own option names the id (a driver without that option refuses it, as qemu's does)
                if opts.secrets[id] == nil { opts.secrets[id] = key }
            } else {
                let id = spec.driverOptions["encrypt.key-secret"]?.stringValue ?? reservedID
                opts.driverOptions["encrypt.key-secret"] = .string(id)
                if opts.secrets[id] == nil { opts.secrets[id] = key }
            }
        }
        // A commit base of a driver qemu cannot reopen stays read-only: the commit refuses it (see `reopenable`).
        let request = OpenRequest(file: file, filename: spec.filename, baseDirectory: directoryName(spec.filename),
                                  writable: writable && (depth == 0 || descriptor.reopenable), options: opts)
        let format = try descriptor.open(request)

        var backingLayer: ImageLayer?
        var fullBacking: String?
        if let ref = format.backingReference {
            fullBacking = resolveBackingName(ref.filename, relativeTo: spec.filename)
        }
        if openBacking {
            var backingSpec: ImageSpec?
            switch spec.backing {
            case .fromImage:
                if let ref = format.backingReference, let full = fullBacking {
                    let key = canonicalKey(full)
                    seen.append(canonicalKey(spec.filename))
                    if seen.contains(key) {
                        throw InstarError(.chain, "Backing file '\(full)' creates an infinite loop")
                    }
                    backingSpec = try parseSpec(full, format: ref.format)
                }
            case .none:
                break
            case let .reference(name):
                throw InstarError.invalid("Could not open backing file: Cannot find device='\(name)' nor node-name='\(name)'")
            case let .node(keys):
                do {
                    backingSpec = try backingNodeSpec(keys, imageBacking: fullBacking,
                                                      imageBackingFormat: format.backingReference?.format)
                } catch let e as InstarError {
                    throw e.prepending("Could not open backing file: ")
                }
            }
            if let bspec = backingSpec {
                if depth + 1 >= maxChainDepth {
                    throw InstarError(.chain, "Backing chain is deeper than \(maxChainDepth) images")
                }
                do {
                    // The name the image stores and its resolved path; a backing node given in the options has
                    // only its own file name.
                    var names = (stored: bspec.filename, full: bspec.filename)
                    if case .fromImage = spec.backing, let ref = format.backingReference, let full = fullBacking {
                        names = (ref.filename, full)
                    }
                    let backingWritable = options.writableBacking?(spec.filename, names.stored, names.full) ?? false
                    var backingOptions = options
                    backingOptions.reopenedWritable = backingWritable
                    backingLayer = try openLayer(bspec, options: backingOptions, writable: backingWritable, openBacking: true,
                                                 depth: depth + 1, seen: &seen)
                } catch let e as InstarError {
                    if e.code == .chain { throw e }
                    throw e.prepending("Could not open backing file: ")
                }
            }
        }
        if let known = descriptor.knownOption {
            // bdrv_open_inherit: options nobody used fail the open, the first in the QDict's order named.
            // qdict_flatten also flattens lists: a list's first member is the key qemu sees ("name.0").
            let unused = spec.driverOptionOrder.compactMap { k -> String? in
                if case let .list(items)? = spec.driverOptions[k] { return items.isEmpty ? nil : "\(k).0" }
                return known(k) ? nil : k
            }
            if let first = QJSON.qdictOrder(unused.map { ($0, QObject.null) }).first?.0 {
                throw InstarError.invalid("Block format '\(descriptor.name)' does not support the option '\(first)'")
            }
        }
        return ImageLayer(format: format, filename: spec.displayName(formatName: format.formatName), backing: backingLayer,
                          fullBackingFilename: fullBacking, writable: writable)
    }

    /// The spec of an explicit backing node: its own file, or else the image's backing file opened with the
    /// node's other options (qemu's bdrv_open_backing_file fills in the name and format the image gives).
    static func backingNodeSpec(_ keys: [(String, QObject)], imageBacking: String?,
                                imageBackingFormat: String?) throws -> ImageSpec {
        if keys.contains(where: { $0.0 == "file" || $0.0.hasPrefix("file.") }) || imageBacking == nil {
            return try spec(fromOptions: keys, format: nil)
        }
        let overlay = try spec(fromOptions: keys + [("file.filename", .string("-"))], format: nil)
        var b = try parseSpec(imageBacking ?? "", format: overlay.format ?? imageBackingFormat)
        if let f = overlay.format { b.format = f }
        b.driverOptions.merge(overlay.driverOptions) { $1 }
        b.driverOptionOrder += overlay.driverOptionOrder.filter { !b.driverOptionOrder.contains($0) }
        if let fs = overlay.forceShare { b.forceShare = fs }
        b.backing = overlay.backing
        b.backingOptionKeys = overlay.backingOptionKeys
        return b
    }

    /// The backing option qemu names when an open that skips backing files is given a backing node: the first
    /// of the node's options in qemu's QDict order.
    static func unusedBackingOption(_ spec: ImageSpec) -> String? {
        switch spec.backing {
        case .none: return nil
        case .fromImage, .reference, .node:
            return QJSON.qdictOrder(spec.backingOptionKeys.map { ($0, QObject.null) }).first?.0
        }
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
        if name.hasPrefix("/") || hasProtocol(name) { return name }
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
