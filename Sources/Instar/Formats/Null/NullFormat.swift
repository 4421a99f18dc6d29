import Glibc

/// qemu's null-co and null-aio block drivers (block/null.c): a device of `size` bytes (1 GiB by default) that
/// holds nothing. Writes vanish; reads give zeroes (qemu leaves the buffer as it was unless read-zeroes is on, and
/// reports no data and no zeroes then, so that nothing counts as allocated). No host file lies beneath, no lock
/// is taken. Named `null-co://` (or `null-aio://`), qemu probes raw over it; `-f null-co` or a `driver` option
/// opens the driver itself.
public final class NullFormat: ImageFormat {
    /// The two names qemu registers; they differ only in how qemu schedules requests.
    public static let driverNames = ["null-co", "null-aio"]
    static let defaultSize: UInt64 = 1 << 30

    public static let descriptors: [FormatDescriptor] = driverNames.map { name in
        var d = FormatDescriptor(name: name, probe: { _, _ in 0 }, open: { try NullFormat(request: $0, driver: name) })
        d.runtimeOptions = ["size", "latency-ns", "read-zeroes"]
        d.filelessProtocol = "\(name)://"
        d.displayName = { spec in displayName(spec, driver: name) }
        return d
    }

    public let formatName: String
    public let virtualSize: UInt64
    let readZeroes: Bool
    public var hostFiles: [HostFile] { [] }
    public var backingReference: BackingReference? { nil }
    public var supportsBacking: Bool { false }

    /// `driver` is the protocol; `request.filename` the name given (which must be the driver's own URL unless
    /// options alone describe the device); a probed open shows the raw format qemu puts on top
    /// (`options.formatShown`).
    init(request: OpenRequest, driver: String) throws {
        let opts = request.options.driverOptions
        if !request.filename.isEmpty && request.filename != "\(driver)://" {
            throw InstarError.invalid("The only allowed filename for this driver is '\(driver)://'")
        }
        var size = NullFormat.defaultSize
        if let v = opts["size"] {
            guard let n = RawFormat.sizeOption(v) else { throw RawFormat.sizeOptionError("size") }
            size = UInt64(n)
        }
        if let v = opts["latency-ns"] {
            let n: Int64?
            if case let .string(t) = v { n = Int64(t) } else { n = v.int64Value }
            guard let latency = n else {
                throw InstarError.invalid("Parameter 'latency-ns' expects a number")
            }
            if latency < 0 { throw InstarError.invalid("latency-ns is invalid") }
        }
        var zeroes = false
        if let v = opts["read-zeroes"] {
            switch v {
            case let .bool(b): zeroes = b
            case .string("on"): zeroes = true
            case .string("off"): zeroes = false
            default: throw InstarError.invalid("Parameter 'read-zeroes' expects 'on' or 'off'")
            }
        }
        readZeroes = zeroes
        // The block layer counts whole sectors.
        virtualSize = (try? size.alignedUp(512)) ?? size
        formatName = request.options.formatShown ?? driver
    }

    /// qemu's null_refresh_filename: the driver's URL while only ignorable options were given, else a `json:`
    /// name of the driver and the options that change what it reads (size, read-zeroes), in QDict order.
    static func displayName(_ spec: ImageSpec, driver: String) -> String {
        let strong = spec.driverOptionOrder.filter { $0 == "size" || $0 == "read-zeroes" }
        if strong.isEmpty { return "\(driver)://" }
        var members: [(String, QObject)] = [("driver", .string(driver))]
        for k in strong { if let v = spec.driverOptions[k] { members.append((k, v)) } }
        return "json:" + QJSON.compact(.dict(QJSON.qdictOrder(members)))
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
    }

    /// null_co_block_status: the offset maps to itself; the range is zero with read-zeroes, else nothing at all.
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        if readZeroes {
            return BlockStatus(length: length, allocated: true, data: false, zero: true, hostOffset: offset,
                               hostFile: formatName == "raw" ? "\(NullFormat.driverNames[0])://" : formatName + "://")
        }
        return BlockStatus(length: length, allocated: false, data: false, zero: false)
    }

    /// No dirty flag: the driver answers no bdrv_get_info.
    public func formatInfo() throws -> FormatInfo { FormatInfo(dirty: nil) }

    public func allocatedFileSize() -> UInt64? { 0 }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {}
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, backing: GuestReader?) throws {}
    public func discard(at offset: UInt64, length: UInt64) throws {}
    public func flush() throws {}
}
