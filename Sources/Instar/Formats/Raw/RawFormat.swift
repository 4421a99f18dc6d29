/// The raw format: guest bytes are the file's bytes, optionally a window of it (json: "offset"/"size", as
/// ovirt-imageio opens tar members).
public final class RawFormat: ImageFormat {
    public static let descriptor: FormatDescriptor = {
        var d = FormatDescriptor(name: "raw", probe: { _, _ in 1 }, open: { try RawFormat(request: $0) })
        d.sharesWrites = true
        d.runtimeOptions = ["offset", "size"]
        return d
    }()

    public let formatName = "raw"
    public let file: HostFile
    let windowOffset: UInt64
    let windowSize: UInt64?
    public var hostFiles: [HostFile] { [file] }
    public var backingReference: BackingReference? { nil }

    init(request: OpenRequest) throws {
        file = request.file
        let opts = request.options.driverOptions
        var off: UInt64 = 0
        if let o = opts["offset"] {
            guard let v = RawFormat.sizeOption(o) else { throw RawFormat.sizeOptionError("offset") }
            off = UInt64(v)
        }
        windowOffset = off
        if let s = opts["size"] {
            guard let v = RawFormat.sizeOption(s) else { throw RawFormat.sizeOptionError("size") }
            windowSize = UInt64(v)
        } else {
            windowSize = nil
        }
        // The same checks as a window node under a format (qemu's raw_apply_options).
        _ = try HostFile.window(of: file, offset: windowOffset, size: windowSize, name: file.path)
    }

    /// A size option: a JSON number, or a string with qemu's optional k/M/G/T/P/E suffix (as --image-opts
    /// gives every value).
    static func sizeOption(_ v: QObject) -> Int64? {
        if case let .string(text) = v {
            var digits = Substring(text)
            var shift: Int64 = 0
            if let last = digits.last, let i = "bkmgtpe".firstIndex(of: Character(last.lowercased())) {
                shift = Int64("bkmgtpe".distance(from: "bkmgtpe".startIndex, to: i)) * 10
                digits = digits.dropLast()
            }
            guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int64(digits) else { return nil }
            let (r, o) = n.multipliedReportingOverflow(by: Int64(1) << shift)
            return o ? nil : r
        }
        guard let n = v.int64Value, n >= 0 else { return nil }
        return n
    }

    static func sizeOptionError(_ name: String) -> InstarError {
        InstarError.invalid("Parameter '\(name)' expects a non-negative number below 2^64\n"
            + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
    }

    /// The virtual size: the window size, else the file size rounded up to 512 bytes as qemu's block layer does.
    public var virtualSize: UInt64 {
        if let ws = windowSize { return ws }
        let length = (try? file.nodeLength()) ?? 0
        return length >= windowOffset ? length - windowOffset : 0
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try file.readZeroPadded(into: buffer, at: try windowOffset.adding(offset))
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        var s = try windowStatus(at: offset, length: length)
        // qemu's raw driver answers BDRV_BLOCK_RAW: the status is the file's, at the host file under any windows.
        if let h = s.hostOffset {
            let (host, hostOffset) = file.hostLocation(h)
            s.hostOffset = hostOffset
            s.hostFile = host.path
        }
        return s
    }

    private func windowStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        let hostStart = try windowOffset.adding(offset)
        let fileSize = try file.size()
        if hostStart >= fileSize {
            // The tail of the last sector past end of file: a hole.
            return BlockStatus(length: length, allocated: true, data: false, zero: true, hostOffset: hostStart, hostFile: file.path)
        }
        let limit = min(try hostStart.adding(length), fileSize)
        if let e = try file.protocolExtent(at: hostStart, length: limit - hostStart) {
            // A protocol's own block status (NBD base:allocation, RBD diff): data and zero as it reports them.
            // Neither data nor zeroes (an x-dirty-bitmap's dirty extent) is not allocated, as in qemu's block layer.
            let allocated = e.data || e.zero
            return BlockStatus(length: max(1, min(e.length, limit - hostStart)), allocated: allocated, data: e.data,
                               zero: e.zero, hostOffset: allocated ? hostStart : nil, hostFile: file.path)
        }
        guard let data = file.nextData(from: hostStart) else {
            return BlockStatus(length: length, allocated: true, data: false, zero: true, hostOffset: hostStart, hostFile: file.path)
        }
        if data > hostStart {
            return BlockStatus(length: min(data, limit) - hostStart, allocated: true, data: false, zero: true,
                               hostOffset: hostStart, hostFile: file.path)
        }
        let hole = file.nextHole(from: hostStart)
        // The part of the final partial sector past EOF is a trailing hole, as file-posix reports it; with
        // O_DIRECT, block status works in whole sectors, so data reaching EOF covers that sector to its end.
        var end = min(max(hole, hostStart + 1), limit)
        if file.direct && hole >= fileSize {
            end = min(try hostStart.adding(length), try fileSize.alignedUp(512))
        }
        return BlockStatus(length: end - hostStart, allocated: true, data: true, zero: false, hostOffset: hostStart,
                           hostFile: file.path)
    }

    /// qemu's raw driver has no backing file: a range it reports neither data nor zero does not read as zero.
    public var supportsBacking: Bool { false }

    /// raw_get_info forwards to the node below: a protocol's allocation unit (an RBD object) is the cluster size,
    /// and a protocol node without get_info (nbd) leaves the dirty flag out.
    public func formatInfo() throws -> FormatInfo {
        let clusterSize = file.remote?.clusterSize
        return FormatInfo(clusterSize: clusterSize, dirty: file.isHostFile || clusterSize != nil ? false : nil)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        try file.write(buffer, at: try windowOffset.adding(offset))
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {
        let start = try windowOffset.adding(offset)
        if mayUnmap { try file.punchHole(at: start, length: length) } else { try file.writeZeroes(at: start, length: length) }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try file.punchHole(at: try windowOffset.adding(offset), length: length)
    }

    public func flush() throws { try file.sync() }
}
