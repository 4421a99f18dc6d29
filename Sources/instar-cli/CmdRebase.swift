import Glibc
import Instar

/// `rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u]
/// -b backing_file [-F backing_fmt] filename`, with qemu-img 7.2's option handling (img_rebase).
func rebaseCommand(_ args: [String]) -> Int32 {
    let optObject: Int32 = 256, optImageOpts: Int32 = 257
    let g = GetOpt(args, shortOpts: ":hf:F:b:upt:T:qU", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
    ])
    var options = RebaseOperation.Options()
    options.warn = CLI.warnLine
    var quiet = false
    var progress = false
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("f"): options.format = arg
        case .opt("F"): options.backingFormat = arg
        case .opt("b"): options.backingFile = arg
        case .opt("u"): options.unsafe = true
        case .opt("p"): progress = true
        case .opt("t"): options.cache = arg ?? ""
        case .opt("T"): options.sourceCache = arg ?? ""
        case .opt("q"): quiet = true
        case optObject:
            if !cliAddObject(arg ?? "", to: &options.open.secrets) { return 1 }
        case optImageOpts: options.imageOpts = true
        case .opt("U"): options.forceShare = true
        default: break
        }
    }
    if quiet { progress = false }
    guard g.operands.count == 1, let filename = g.operands.first else {
        return CLI.usageError("Expecting one image file name")
    }
    if !options.unsafe && options.backingFile == nil {
        return CLI.usageError("Must specify backing file (-b) or use unsafe mode (-u)")
    }
    if progress {
        options.progress = { p in
            CLI.out.write(ProgressMeter.record(p))
            CLI.out.flush()
        }
    }
    var rc: Int32 = 0
    do {
        try RebaseOperation.run(filename, options: options)
    } catch let e as InstarError {
        CLI.error(e.message)
        rc = 1
    } catch {
        CLI.error("\(error)")
        rc = 1
    }
    // qemu_progress_end.
    if progress { CLI.out.write("\n") }
    return rc
}
