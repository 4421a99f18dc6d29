import Glibc
import Instar

/// `info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename`,
/// with qemu-img 7.2's options, messages and exit codes.
func infoCommand(_ args: [String]) -> Int32 {
    let optOutput: Int32 = 256, optBackingChain: Int32 = 257, optObject: Int32 = 258, optImageOpts: Int32 = 259
    let optIsolated: Int32 = 260
    let parsed = GetOpt(args, shortOpts: ":f:hU", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "format", argument: .required, value: .opt("f")),
        LongOption(name: "output", argument: .required, value: optOutput),
        LongOption(name: "backing-chain", argument: .none, value: optBackingChain),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
        LongOption(name: "isolated", argument: .none, value: optIsolated),
    ])
    var isolated = false
    var options = InfoOperation.Options()
    options.warn = { CLI.error("warning: \($0)") }
    var output: String?
    for (c, arg) in parsed.options {
        switch c {
        case .opt(":"), .opt("?"):
            return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("f"):
            options.format = arg
        case .opt("U"):
            options.open.forceShare = true
        case optOutput:
            output = arg
        case optBackingChain:
            options.backingChain = true
        case optObject:
            if !cliAddObject(arg ?? "", to: &options.open.secrets) { return 1 }
        case optImageOpts:
            options.imageOpts = true
        case optIsolated:
            isolated = true
        default:
            break
        }
    }
    guard parsed.operands.count == 1, let filename = parsed.operands.first else {
        return CLI.usageError("Expecting one image file name")
    }
    guard let json = CLI.outputIsJSON(output) else { return 1 }
    let list: [ImageInfo]
    do {
        list = isolated ? try IsolatedMode.collectInfo(filename, options: options)
            : try InfoOperation.collect(filename, options: options)
    } catch {
        CLI.error("\(error)")
        return 1
    }
    CLI.out.write(json ? InfoOperation.json(list, chain: options.backingChain) : InfoOperation.human(list))
    return 0
}
