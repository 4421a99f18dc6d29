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
    /// The name qemu-img shows for the image.
    public var displayName: String

    public init(filename: String, format: String? = nil) {
        self.filename = filename
        self.format = format
        self.displayName = filename
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
        var spec = ImageSpec(filename: name, format: format)
        guard name.hasPrefix("json:") else { return spec }
        let parsed = try JSONParser.parse(String(name.dropFirst(5)))
        guard case let .dict(members) = parsed else {
            throw InstarError.invalid("Could not parse the JSON options")
        }
        var file: String?
        for (k, v) in members {
            switch k {
            case "driver":
                guard let s = v.stringValue else { throw InstarError.invalid("Invalid parameter type for 'driver', expected: string") }
                if spec.format != nil && spec.format != s {
                    throw InstarError.invalid("Cannot use 'driver' with a format that conflicts")
                }
                spec.format = s
            case "file":
                if let s = v.stringValue { file = s; break }
                guard case let .dict(fm) = v else { throw InstarError.invalid("Invalid parameter type for 'file'") }
                for (fk, fv) in fm {
                    switch fk {
                    case "driver":
                        guard fv.stringValue == "file" else { throw InstarError.unsupported("Unsupported protocol driver '\(fv.stringValue ?? "")'") }
                    case "filename": file = fv.stringValue
                    default: throw InstarError.invalid("Invalid parameter '\(fk)'")
                    }
                }
            case "file.filename": file = v.stringValue
            case "file.driver":
                guard v.stringValue == "file" else { throw InstarError.unsupported("Unsupported protocol driver '\(v.stringValue ?? "")'") }
            default:
                spec.driverOptions[k] = v
            }
        }
        guard let f = file else { throw InstarError.invalid("A block device must be specified for \"file\"") }
        spec.filename = f
        spec.displayName = f
        if !spec.driverOptions.isEmpty { spec.displayName = name }
        return spec
    }

    static func openLayer(_ spec: ImageSpec, options: ImageOpenOptions, writable: Bool, openBacking: Bool,
                          depth: Int, seen: inout [String]) throws -> ImageLayer {
        let file = try HostFile.open(spec.filename, writable: writable, direct: options.direct)
        let descriptor: FormatDescriptor
        if let f = spec.format {
            guard let d = FormatRegistry.descriptor(named: f) else {
                throw InstarError.unsupported("Unknown driver '\(f)'")
            }
            descriptor = d
        } else {
            descriptor = try FormatRegistry.probe(file, filename: spec.filename)
        }
        if !writable && !options.forceShare && depth == 0 && descriptor.sharesWriteWhenReading && !options.noShareWrite {
            // qemu passes a plain reader's "share everything" through raw to the file.
            try ImageLock.acquire(file, perm: [.consistentRead], shared: .all)
        } else {
            try ImageLock.acquireForOpen(file, writable: writable, forceShare: options.forceShare)
        }
        var opts = options
        opts.driverOptions = spec.driverOptions
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
                var bspec = try parseSpec(full, format: ref.format)
                if ref.filename.hasPrefix("json:") { bspec.displayName = bspec.filename }
                do {
                    backingLayer = try openLayer(bspec, options: options, writable: false, openBacking: true,
                                                 depth: depth + 1, seen: &seen)
                } catch let e as InstarError {
                    if e.code == .chain { throw e }
                    throw e.prepending("Could not open backing file: Could not open '\(bspec.displayName)': ")
                }
            }
        }
        return ImageLayer(format: format, filename: spec.displayName, backing: backingLayer,
                          fullBackingFilename: fullBacking, writable: writable)
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
