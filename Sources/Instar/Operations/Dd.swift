import Glibc

/// `qemu-img dd` (qemu-img.c img_dd): a plain read/write loop of `bs`-byte blocks from an image into a new
/// image of the input's size, with Proxmox's extensions (pve-qemu's qemu-img dd patches): `osize=`, `isize=`,
/// stdin/stdout for raw streams, `-n` and `-l`.
public enum DdOperation {
    public struct Options {
        /// if=; nil reads standard input (Proxmox).
        public var input: String?
        /// of=; nil writes standard output (Proxmox).
        public var output: String?
        /// -f; nil probes.
        public var inputFormat: String?
        /// -O.
        public var outputFormat = "raw"
        /// --image-opts (the input only, as qemu).
        public var imageOpts = false
        /// -U.
        public var forceShare = false
        public var open = ImageOpenOptions()
        /// bs= (1 ... INT_MAX).
        public var blockSize: Int64 = 512
        /// count=, skip= in blocks.
        public var count: Int64?
        public var skip: Int64?
        /// osize= (Proxmox): the output's size, which count= then no longer limits.
        public var outputSize: Int64?
        /// isize= (Proxmox): bytes to read; 0 reads standard input to its end without complaint.
        public var inputSize: Int64?
        /// -n (Proxmox): the output exists; it is not created.
        public var skipCreate = false
        /// -l (Proxmox): read an internal snapshot of the input.
        public var snapshot: ConvertOperation.SnapshotSelector?
        /// Proxmox's stdin/stdout streams: without it a missing if= or of= is qemu-img 7.2's error.
        public var allowStreams = false
        /// Warnings qemu prints and goes on ("cannot skip to specified offset").
        public var warn: ((String) -> Void)?
        /// Receives the percentage done after each block; a throw cancels.
        public var progress: ((Double) throws -> Void)?
        public init() {}
    }

    static func readError(_ e: Int32) -> InstarError {
        InstarError(.io, "error while reading from input image file: \(String(cString: strerror(e)))", errno: e)
    }
    static func writeError(_ e: Int32) -> InstarError {
        InstarError(.io, "error while writing to output image file: \(String(cString: strerror(e)))", errno: e)
    }

    public static func run(_ o: Options) throws {
        let bs = o.blockSize
        guard bs >= 1 && bs <= Int64(Int32.max) else {
            throw InstarError.invalid("Invalid bs specified. Must be between 1 and \(Int32.max).")
        }
        if !o.allowStreams {
            guard o.input != nil && o.output != nil else {
                throw InstarError.invalid("Must specify both input and output files")
            }
        } else {
            if o.input == nil && o.inputFormat != "raw" {
                throw InstarError.invalid("Input format must be raw when readin from stdin")
            }
            if o.output == nil && o.outputFormat != "raw" {
                throw InstarError.invalid("Output format must be raw when writing to stdout")
            }
        }
        var input: ImageLayer?
        var output: ImageLayer?
        defer {
            try? input?.close()
        }
        if let name = o.input {
            if o.imageOpts && o.inputFormat != nil {
                throw InstarError.invalid("--image-opts and --format are mutually exclusive")
            }
            var open = o.open
            open.forceShare = o.forceShare
            do {
                let spec = try ImageOpener.commandLineSpec(name, format: o.inputFormat, imageOpts: o.imageOpts,
                                                           warn: o.warn)
                input = try ImageOpener.open(spec, options: open, writable: false)
            } catch let e as InstarError {
                throw e.prepending("Could not open '\(name)': ")
            }
            if let sel = o.snapshot, let l = input { try ConvertOperation.loadSnapshot(sel, sources: [l]) }
        }
        var size: Int64
        if let s = o.outputSize {
            size = s
        } else if let l = input {
            size = Int64(clamping: l.virtualSize)
        } else if let c = o.count {
            size = c &* bs
        } else {
            throw InstarError.invalid("Output size must be known when reading from stdin")
        }
        if o.outputSize == nil, let c = o.count, c <= Int64.max / bs, c * bs < size { size = c * bs }
        let skip = o.skip ?? 0
        let skipBeyond = o.skip != nil && (skip > Int64.max / bs || size < bs * skip)
        if let outName = o.output {
            let creator: FormatCreator
            guard let d = FormatRegistry.descriptor(named: o.outputFormat) else {
                throw InstarError.invalid("Unknown file format")
            }
            guard let c = d.creator else {
                throw InstarError.unsupported("Format driver '\(o.outputFormat)' does not support image creation")
            }
            creator = c
            let outSize: Int64 = o.outputSize != nil ? size : (skipBeyond ? 0 : size - bs * skip)
            if !o.skipCreate {
                do {
                    var values = CreateOptionValues(specs: Create.optionTable(for: creator))
                    try values.set("size", String(outSize))
                    var request = CreateRequest(filename: outName, options: values)
                    request.secrets = o.open.secrets
                    try creator.create(request)
                } catch let e as InstarError {
                    throw e.prepending("\(outName): error while creating output image: ")
                }
            }
            do {
                let spec = try ImageOpener.parseSpec(outName, format: o.outputFormat)
                var open = o.open
                open.forceShare = false
                open.keySecret = nil
                output = try ImageOpener.open(spec, options: open, writable: true)
            } catch let e as InstarError {
                throw e.prepending("Could not open '\(outName)': ")
            }
        }
        var failure: Error?
        do {
            try copy(o, input: input, output: output, size: size, skipBeyond: skipBeyond)
        } catch {
            failure = error
        }
        do {
            try output?.close()
        } catch {
            if failure == nil { failure = error }
        }
        if let failure { throw failure }
    }

    private static func copy(_ o: Options, input: ImageLayer?, output: ImageLayer?, size: Int64,
                             skipBeyond: Bool) throws {
        let bs = o.blockSize
        var inPos: Int64
        if skipBeyond {
            o.warn?("\(o.input ?? "-"): cannot skip to specified offset")
            inPos = size
        } else {
            inPos = (o.skip ?? 0) * bs
        }
        let readSize: Int64 = (o.inputSize ?? -1) > 0 ? (o.inputSize ?? 0) : size
        let inputLength = input.map { Int64(clamping: $0.virtualSize) } ?? Int64.max
        var buf = [UInt8](repeating: 0, count: Int(bs))
        var outPos: Int64 = 0
        let start = inPos
        try o.progress?(0)
        // Raw file to raw file: each block goes file to file in the kernel (copy_file_range), the same bytes at
        // the same places as a read and a write, without the copy through user space; a block the kernel does
        // not copy whole is copied through the buffer as usual.
        let plainIn = input.flatMap { $0.backing == nil ? $0.format as? PlainGuestFile : nil }
        let plainOut = output.flatMap { $0.backing == nil ? $0.format as? PlainGuestFile : nil }
        while inPos < readSize {
            let bytes = Int(bs > readSize - inPos ? readSize - inPos : bs)
            var got = bytes
            if let pin = plainIn, let pout = plainOut, inPos + Int64(bytes) <= inputLength,
               let src = pin.plainHostRange(at: UInt64(inPos), length: UInt64(bytes)),
               let dst = pout.plainHostRange(at: UInt64(outPos), length: UInt64(bytes)),
               dst.file.copyIn(from: src.file, at: src.offset, length: UInt64(bytes), to: dst.offset) == UInt64(bytes) {
                inPos += Int64(bytes)
                outPos += Int64(bytes)
                if readSize > start { try o.progress?(100.0 * Double(inPos - start) / Double(readSize - start)) }
                continue
            }
            if let l = input {
                // blk_pread refuses a request past the end of the input.
                guard inPos + Int64(bytes) <= inputLength else { throw readError(EIO) }
                do {
                    try buf.withUnsafeMutableBytes { try l.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<bytes]), at: UInt64(inPos)) }
                } catch let e as InstarError {
                    throw readError(e.errnoValue != 0 ? e.errnoValue : EIO)
                }
            } else {
                got = 0
                while got < bytes {
                    let n = buf.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress! + got, bytes - got) }
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw readError(errno)
                    }
                    if n == 0 { break }
                    got += n
                }
                if got == 0 {
                    // isize=0: the end of the input is expected.
                    if o.inputSize == 0 { return }
                    throw InstarError(.io, "Input ended unexpectedly", errno: EIO)
                }
            }
            inPos += Int64(bytes)
            if let out = output {
                do {
                    try buf.withUnsafeBytes {
                        try out.format.write(UnsafeRawBufferPointer(rebasing: $0[0..<got]), at: UInt64(outPos),
                                             backing: out.backing)
                    }
                } catch let e as InstarError {
                    throw writeError(e.errnoValue != 0 ? e.errnoValue : EIO)
                }
            } else {
                var done = 0
                while done < got {
                    let n = buf.withUnsafeBytes { Glibc.write(1, $0.baseAddress! + done, got - done) }
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw writeError(errno)
                    }
                    done += n
                }
            }
            outPos += Int64(bytes)
            if readSize > start { try o.progress?(100.0 * Double(inPos - start) / Double(readSize - start)) }
        }
    }
}
