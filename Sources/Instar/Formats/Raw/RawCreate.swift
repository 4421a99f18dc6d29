/// Creating and measuring raw images: the file itself at the requested size (file-posix create), with
/// preallocation off, falloc or full.
public enum RawCreate {
    public static let creator = FormatCreator(
        name: "raw",
        options: [CreateOptionSpec("size", .size, "Virtual disk size")],
        create: create,
        measure: measure)

    static func create(_ r: CreateRequest) throws {
        let size = try (r.options.size("size") ?? 0).alignedUp(512)
        if r.options.text("preallocation") == "metadata" {
            // file-posix creates and empties the file before it rejects the mode.
            try HostFileCreate.create(r.filename, size: 0, preallocation: .off)
        }
        let mode = try preallocation(r.options.text("preallocation"))
        let file = try HostFileCreate.create(r.filename, size: size, preallocation: mode, options: r.options,
                                             secrets: r.secrets)
        // On disk before create returns: its length, the first block file-posix writes, a full preallocation's
        // zeroes. qemu syncs only the full preallocation (file-posix's truncate); one fdatasync of a file with
        // no data written costs little, and a raw image's length is all it has.
        try file?.sync()
    }

    /// file-posix's parsing of the preallocation option.
    static func preallocation(_ text: String?) throws -> HostFileCreate.Preallocation {
        guard let t = text else { return .off }
        if let m = HostFileCreate.Preallocation(rawValue: t) { return m }
        if t == "metadata" { throw InstarError.unsupported("Unsupported preallocation mode: metadata") }
        throw InstarError.invalid("invalid parameter value: \(t)")
    }

    /// qemu's raw_measure: the source's virtual size, or --size rounded up to 512 bytes.
    static func measure(_ r: MeasureRequest) throws -> MeasureResult {
        let required: UInt64
        if let src = r.source {
            required = src.virtualSize
        } else {
            required = try (r.options.size("size") ?? 0).alignedUp(512)
        }
        return MeasureResult(required: required, fullyAllocated: required)
    }
}
