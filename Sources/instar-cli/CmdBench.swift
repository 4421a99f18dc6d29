import Glibc
import Instar

/// qemu_strtoul(text, NULL, 0, &res): the whole text a number in base 10, 16 (0x) or 8 (0); a leading '-'
/// wraps as strtoul does.
func qemuStrtoul(_ text: String) -> UInt64? {
    guard !text.isEmpty else { return nil }
    return text.withCString { p -> UInt64? in
        var end: UnsafeMutablePointer<CChar>?
        errno = 0
        let v = strtoul(p, &end, 0)
        guard errno == 0, let end, end.pointee == 0, end != UnsafeMutablePointer(mutating: p) else { return nil }
        return UInt64(v)
    }
}

/// `bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain]
/// [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename`, as
/// qemu-img 7.2's img_bench parses it and prints.
func benchCommand(_ args: [String]) -> Int32 {
    let optFlush: Int32 = 256, optImageOpts: Int32 = 257, optPattern: Int32 = 258, optNoDrain: Int32 = 259
    let g = GetOpt(args, shortOpts: ":hc:d:f:ni:o:qs:S:t:wU", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "flush-interval", argument: .required, value: optFlush),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "pattern", argument: .required, value: optPattern),
        LongOption(name: "no-drain", argument: .none, value: optNoDrain),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
    ])
    var o = BenchOperation.Options()
    o.warn = CLI.warnLine
    var aioNative = false
    for (c, arg) in g.options {
        let a = arg ?? ""
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("c"):
            guard let v = qemuStrtoul(a), v <= UInt64(Int32.max) else {
                CLI.error("Invalid request count specified")
                return 1
            }
            o.count = Int(v)
        case .opt("d"):
            guard let v = qemuStrtoul(a), v <= UInt64(Int32.max) else {
                CLI.error("Invalid queue depth specified")
                return 1
            }
            o.depth = Int(v)
        case .opt("f"): o.format = a
        case .opt("n"): aioNative = true
        case .opt("i"):
            switch a {
            case "native": aioNative = true
            case "threads", "io_uring": aioNative = false
            default:
                CLI.error("Invalid aio option: \(a)")
                return 1
            }
        case .opt("o"):
            guard let v = cvtnum("offset", a) else { return 1 }
            o.offset = v
        case .opt("q"): o.quiet = true
        case .opt("s"):
            guard let v = cvtnum("buffer size", a, min: 0, max: Int64(Int32.max)) else { return 1 }
            o.bufferSize = Int(v)
        case .opt("S"):
            guard let v = cvtnum("step_size", a, min: 0, max: Int64(Int32.max)) else { return 1 }
            o.step = Int(v)
        case .opt("t"):
            guard let m = CacheMode(qemuName: a) else {
                CLI.error("Invalid cache mode")
                return 1
            }
            o.cache = m
        case .opt("w"): o.write = true
        case .opt("U"): o.open.forceShare = true
        case optPattern:
            guard let v = qemuStrtoul(a), v <= 0xff else {
                CLI.error("Invalid pattern byte specified")
                return 1
            }
            o.pattern = UInt8(v)
        case optFlush:
            guard let v = qemuStrtoul(a), v <= UInt64(Int32.max) else {
                CLI.error("Invalid flush interval specified")
                return 1
            }
            o.flushInterval = Int(v)
        case optNoDrain: o.drainOnFlush = false
        case optImageOpts: o.imageOpts = true
        default: break
        }
    }
    o.nativeAIO = aioNative
    guard g.operands.count == 1, let filename = g.operands.first else {
        return CLI.usageError("Expecting one image file name")
    }
    return CLI.exitStatus {
        try BenchOperation.checkOptions(o)
        let layer = try BenchOperation.open(filename, o)
        defer { try? layer.close() }
        CLI.out.write(BenchOperation.headerLines(o))
        CLI.out.flush()
        let r = try BenchOperation.run(layer, o)
        var text = [CChar](repeating: 0, count: 64)
        _ = withVaList([r.seconds]) { vsnprintf(&text, text.count, "%3.3f", $0) }
        CLI.out.write("Run completed in \(String(cString: text)) seconds.\n")
    }
}
