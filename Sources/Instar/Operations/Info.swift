import Glibc

/// What `qemu-img info` reports for one image (QAPI ImageInfo), built from an open layer and its driver's
/// `formatInfo()`. Optional members are nil where qemu leaves the key out.
public struct ImageInfo {
    // The members are QAPI ImageInfo's, named after its keys ("virtual-size" is virtualSize).
    /// The name as qemu-img shows it ("image:").
    public var filename: String
    public var format: String
    public var dirtyFlag: Bool?
    public var actualSize: UInt64?
    public var virtualSize: UInt64
    public var clusterSize: UInt64?
    public var encrypted: Bool?
    public var backingFilename: String?
    public var fullBackingFilename: String?
    public var backingFilenameFormat: String?
    public var snapshots: [SnapshotInfo]
    /// `{"type": ..., "data": {...}}`, members in QAPI order.
    public var formatSpecific: QObject?

    /// Collects the info of an open layer (bdrv_query_image_info).
    public init(layer: ImageLayer) throws {
        let driver = layer.format
        let details = try driver.formatInfo()
        filename = layer.filename
        format = driver.formatName
        virtualSize = driver.virtualSize
        actualSize = driver.allocatedFileSize()
        if let c = details.clusterSize, c != 0 { clusterSize = c }
        dirtyFlag = details.dirty
        encrypted = details.encrypted == true ? true : nil
        formatSpecific = details.formatSpecific
        snapshots = details.snapshots
        if !(driver is ImageSnapshottable), let remote = driver.hostFiles.first?.remote?.snapshots {
            // bdrv_snapshot_list falls through a format without snapshots to its file (RBD snapshots).
            snapshots = try remote.listSnapshots()
        }
        if let ref = driver.backingReference, !ref.filename.isEmpty {
            backingFilename = ref.filename
            fullBackingFilename = layer.fullBackingFilename
            if let f = ref.format, !f.isEmpty { backingFilenameFormat = f }
        }
    }

    /// The QAPI object, members inserted in ImageInfo's declaration order (qapi/block-core.json), which decides
    /// the order of keys that share a QDict bucket.
    public var qobject: QObject {
        var m: [(String, QObject)] = [("filename", .string(filename)), ("format", .string(format))]
        if let d = dirtyFlag { m.append(("dirty-flag", .bool(d))) }
        if let a = actualSize { m.append(("actual-size", .int(Int64(clamping: a)))) }
        m.append(("virtual-size", .int(Int64(clamping: virtualSize))))
        if let c = clusterSize { m.append(("cluster-size", .int(Int64(clamping: c)))) }
        if let e = encrypted { m.append(("encrypted", .bool(e))) }
        if let b = backingFilename { m.append(("backing-filename", .string(b))) }
        if let b = fullBackingFilename { m.append(("full-backing-filename", .string(b))) }
        if let b = backingFilenameFormat { m.append(("backing-filename-format", .string(b))) }
        if !snapshots.isEmpty { m.append(("snapshots", .list(snapshots.map(Self.snapshotObject)))) }
        if let s = formatSpecific { m.append(("format-specific", s)) }
        return .dict(m)
    }

    /// QAPI SnapshotInfo.
    static func snapshotObject(_ s: SnapshotInfo) -> QObject {
        var m: [(String, QObject)] = [
            ("id", .string(s.id)), ("name", .string(s.name)), ("vm-state-size", .int(Int64(clamping: s.vmStateSize))),
            ("date-sec", .int(Int64(s.dateSec))), ("date-nsec", .int(Int64(s.dateNsec))),
            ("vm-clock-sec", .int(Int64(s.vmClockNsec / 1_000_000_000))),
            ("vm-clock-nsec", .int(Int64(s.vmClockNsec % 1_000_000_000))),
        ]
        if let i = s.icount { m.append(("icount", .int(Int64(clamping: i)))) }
        return .dict(m)
    }

    /// The human form (bdrv_image_info_dump).
    public var human: String {
        var out = "image: \(filename)\n"
        out += "file format: \(format)\n"
        out += "virtual size: \(SizeFormat.sizeToString(virtualSize)) (\(virtualSize) bytes)\n"
        out += "disk size: \(actualSize.map(SizeFormat.sizeToString) ?? "unavailable")\n"
        if encrypted == true { out += "encrypted: yes\n" }
        if let c = clusterSize { out += "cluster_size: \(c)\n" }
        if dirtyFlag == true { out += "cleanly shut down: no\n" }
        if let b = backingFilename {
            out += "backing file: \(b)"
            if let full = fullBackingFilename {
                if full != b { out += " (actual path: \(full))" }
            } else {
                out += " (cannot determine actual path)"
            }
            out += "\n"
            if let f = backingFilenameFormat { out += "backing file format: \(f)\n" }
        }
        if !snapshots.isEmpty {
            out += "Snapshot list:\n"
            out += SnapshotTable.header + "\n"
            for s in snapshots { out += SnapshotTable.row(s) + "\n" }
        }
        if let spec = formatSpecific {
            out += "Format specific information:\n"
            if let data = spec["data"] { HumanDump.value(data, indent: 1, into: &out) }
        }
        return out
    }
}

/// The snapshot table of `qemu-img info` and `qemu-img snapshot -l` (bdrv_snapshot_dump).
public enum SnapshotTable {
    public static let header = pad("ID", 10, left: true) + pad("TAG", 17, left: true) + pad("VM SIZE", 8, left: false)
        + pad("DATE", 20, left: false) + pad("VM CLOCK", 13, left: false) + pad("ICOUNT", 11, left: false)

    public static func row(_ s: SnapshotInfo) -> String {
        let secs = s.vmClockNsec / 1_000_000_000
        let millis = (s.vmClockNsec / 1_000_000) % 1000
        let clock = zeroPad(secs / 3600, 2) + ":" + zeroPad((secs / 60) % 60, 2) + ":" + zeroPad(secs % 60, 2) + "."
            + zeroPad(millis, 3)
        let icount = s.icount.map { String($0) } ?? ""
        // printf("%-16s") pads the name by its bytes in the image; text output shows U+FFFD for bytes that are
        // not UTF-8, so the padding follows the stored bytes, not the text.
        return pad(s.id, 9, left: true) + " " + pad(s.name, 16, left: true, byteCount: s.nameBytes.count) + " "
            + pad(SizeFormat.sizeToString(s.vmStateSize), 8, left: false) + pad(localDate(s.dateSec), 20, left: false)
            + pad(clock, 13, left: false) + pad(icount, 11, left: false)
    }

    /// printf's %-Ns / %Ns: pads by bytes, never truncates.
    static func pad(_ s: String, _ width: Int, left: Bool, byteCount: Int? = nil) -> String {
        let n = byteCount ?? s.utf8.count
        if n >= width { return s }
        let spaces = String(repeating: " ", count: width - n)
        return left ? s + spaces : spaces + s
    }

    static func zeroPad(_ v: UInt64, _ width: Int) -> String {
        let s = String(v)
        return s.count >= width ? s : String(repeating: "0", count: width - s.count) + s
    }

    /// "%Y-%m-%d %H:%M:%S" in local time, as g_date_time_format over g_date_time_new_from_unix_local.
    static func localDate(_ seconds: UInt32) -> String {
        var t = time_t(seconds)
        var tmv = tm()
        guard localtime_r(&t, &tmv) != nil else { return "" }
        var buf = [CChar](repeating: 0, count: 64)
        let n = strftime(&buf, buf.count, "%Y-%m-%d %H:%M:%S", &tmv)
        return n > 0 ? String(cString: buf) : ""
    }
}

/// The human dump of format-specific data (dump_qobject in block/qapi.c): dictionaries in QDict order with
/// '-' in keys shown as ' ', lists as "[i]:", nested containers indented four spaces per level.
public enum HumanDump {
    public static func value(_ v: QObject, indent: Int, into out: inout String) {
        switch v {
        case let .dict(members):
            for (k, value) in QJSON.qdictOrder(members) {
                let key = String(k.map { $0 == "-" ? " " : $0 })
                line(key, value, indent: indent, into: &out)
            }
        case let .list(items):
            for (i, value) in items.enumerated() { line("[\(i)]", value, indent: indent, into: &out) }
        case let .string(s): out += s
        case let .int(i): out += String(i)
        case let .uint(u): out += String(u)
        case let .double(d): out += QJSON.formatDouble(d)
        case let .bool(b): out += b ? "true" : "false"
        case .null: out += "null"
        }
    }

    static func line(_ label: String, _ value: QObject, indent: Int, into out: inout String) {
        out += String(repeating: " ", count: indent * 4) + label + ":"
        switch value {
        case .dict, .list:
            out += "\n"
            Self.value(value, indent: indent + 1, into: &out)
        default:
            out += " "
            Self.value(value, indent: indent + 1, into: &out)
            out += "\n"
        }
    }
}

/// `qemu-img info`: one image, or with `backingChain` the image and every backing file below it.
public enum InfoOperation {
    public struct Options {
        /// -f; nil probes.
        public var format: String?
        /// --backing-chain.
        public var backingChain = false
        /// --image-opts: the name is a QemuOpts string of block options.
        public var imageOpts = false
        /// -U and the --object secrets.
        public var open = ImageOpenOptions()
        /// Receives qemu's warnings (deprecated option syntax) as they arise; the library drops them.
        public var warn: ((String) -> Void)?
        public init() {}
    }

    /// Opens each image of the list in turn without its backing file, as qemu-img does (so a missing backing
    /// file is no error unless the chain is asked for). Errors carry qemu-img's full message.
    public static func collect(_ name: String, options: Options) throws -> [ImageInfo] {
        if options.imageOpts && options.format != nil {
            throw InstarError.invalid("--image-opts and --format are mutually exclusive")
        }
        var list: [ImageInfo] = []
        var seen: Set<String> = []
        var current: String? = name
        var format = options.format
        var imageOpts = options.imageOpts
        while let filename = current {
            if seen.contains(filename) {
                throw InstarError(.chain, "Backing file '\(filename)' creates an infinite loop.")
            }
            if list.count >= ImageOpener.maxChainDepth {
                throw InstarError(.chain, "Backing chain is deeper than \(ImageOpener.maxChainDepth) images")
            }
            seen.insert(filename)
            var spec: ImageSpec?
            var parseError: InstarError?
            do {
                spec = try ImageOpener.commandLineSpec(filename, format: format, imageOpts: imageOpts, warn: options.warn)
            } catch let e as InstarError {
                parseError = e
            }
            if imageOpts, options.open.forceShare, spec?.forceShare == false {
                throw InstarError(.invalid, "--force-share/-U conflicts with image options")
            }
            let layer: ImageLayer
            do {
                if let e = parseError { throw e }
                guard let spec else { throw InstarError.invalid("no image") }
                var open = options.open
                open.metadataOnly = true
                layer = try ImageOpener.open(spec, options: open, writable: false, openBacking: false)
            } catch let e as InstarError {
                throw e.prepending("Could not open '\(filename)': ")
            }
            // qemu reports a failure to query an opened image without the "Could not open" prefix.
            let info = try ImageInfo(layer: layer)
            list.append(info)
            current = nil
            format = nil
            imageOpts = false
            if options.backingChain {
                if let full = info.fullBackingFilename {
                    current = full
                } else if let b = info.backingFilename {
                    throw InstarError(.chain, "Could not determine absolute backing filename, but backing filename '\(b)' present")
                }
                format = info.backingFilenameFormat
            }
        }
        return list
    }

    /// `--output=json`: one object, or an array of them for --backing-chain; ends with a newline.
    public static func json(_ list: [ImageInfo], chain: Bool) -> String {
        if chain { return QJSON.pretty(.list(list.map(\.qobject))) + "\n" }
        guard let first = list.first else { return "" }
        return QJSON.pretty(first.qobject) + "\n"
    }

    /// The human form; images of a chain are separated by one empty line.
    public static func human(_ list: [ImageInfo]) -> String {
        list.map(\.human).joined(separator: "\n")
    }
}
