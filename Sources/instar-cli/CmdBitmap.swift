import Glibc
import Instar

/// `bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F
/// source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap`, as qemu-img
/// 7.2's img_bitmap parses it.
func bitmapCommand(_ args: [String]) -> Int32 {
    let optObject: Int32 = 256, optImageOpts: Int32 = 257, optAdd: Int32 = 258, optRemove: Int32 = 259,
        optClear: Int32 = 260, optEnable: Int32 = 261, optDisable: Int32 = 262, optMerge: Int32 = 263
    let g = GetOpt(args, shortOpts: ":b:f:F:g:h", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "add", argument: .none, value: optAdd),
        LongOption(name: "remove", argument: .none, value: optRemove),
        LongOption(name: "clear", argument: .none, value: optClear),
        LongOption(name: "enable", argument: .none, value: optEnable),
        LongOption(name: "disable", argument: .none, value: optDisable),
        LongOption(name: "merge", argument: .required, value: optMerge),
        LongOption(name: "granularity", argument: .required, value: .opt("g")),
        LongOption(name: "source-file", argument: .required, value: .opt("b")),
        LongOption(name: "source-format", argument: .required, value: .opt("F")),
    ])
    var options = BitmapOperation.Options()
    options.warn = CLI.warnLine
    var actions: [BitmapOperation.Action] = []
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("b"): options.sourceFile = arg
        case .opt("f"): options.format = arg
        case .opt("F"): options.sourceFormat = arg
        case .opt("g"):
            guard let v = cvtnum("granularity", arg ?? "") else { return 1 }
            options.granularity = v
        case optAdd: actions.append(.add)
        case optRemove: actions.append(.remove)
        case optClear: actions.append(.clear)
        case optEnable: actions.append(.enable)
        case optDisable: actions.append(.disable)
        case optMerge: actions.append(.merge(arg ?? ""))
        case optObject:
            if !cliAddObject(arg ?? "", to: &options.open.secrets) { return 1 }
        case optImageOpts: options.imageOpts = true
        default: break
        }
    }
    do {
        try BitmapOperation.checkArguments(actions, options: options)
    } catch let e as InstarError {
        CLI.error(e.message)
        return 1
    } catch {
        CLI.error("\(error)")
        return 1
    }
    guard g.operands.count == 2 else {
        CLI.error("Expecting filename and bitmap name")
        return 1
    }
    return CLI.exitStatus {
        try BitmapOperation.run(g.operands[0], bitmap: g.operands[1], actions: actions, options: options)
    }
}
