import Glibc
import Instar

/// `commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p]
/// filename`, with qemu-img 7.2's parsing, messages and exit codes (img_commit).
func commitCommand(_ args: [String]) -> Int32 {
    let optObject: Int32 = 256, optImageOpts: Int32 = 257
    let g = GetOpt(args, shortOpts: ":f:ht:b:dpqr:", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
    ])
    var options = CommitOperation.Options()
    options.warn = CLI.warnLine
    var quiet = false, progress = false
    var cache = "writeback"
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("f"): options.format = arg
        case .opt("t"): cache = arg ?? ""
        case .opt("b"):
            options.base = arg
            options.drop = true   // -b implies -d
        case .opt("d"): options.drop = true
        case .opt("p"): progress = true
        case .opt("q"): quiet = true
        case .opt("r"):
            guard let r = cvtnum("rate limit", arg ?? "") else { return 1 }
            options.rateLimit = UInt64(r)
        case optObject:
            if !cliAddObject(arg ?? "", to: &options.open.secrets) { return 1 }
        case optImageOpts: options.imageOpts = true
        default: break
        }
    }
    if quiet { progress = false }
    guard g.operands.count == 1, let filename = g.operands.first else {
        return CLI.usageError("Expecting one image file name")
    }
    guard let mode = CacheMode(qemuName: cache) else {
        CLI.error("Invalid cache option: \(cache)")
        return 1
    }
    options.cache = mode
    var started = false
    if progress {
        options.progress = { percent in
            started = true
            CLI.out.write(ProgressMeter.record(percent))
            CLI.out.flush()
        }
    }
    do {
        try CommitOperation.run(filename, options: options)
    } catch let e as InstarError {
        progressEnd(started)
        CLI.error(e.message)
        return 1
    } catch {
        progressEnd(started)
        CLI.error("\(error)")
        return 1
    }
    progressEnd(started)
    if !quiet { CLI.out.write("Image committed.\n") }
    return 0
}
