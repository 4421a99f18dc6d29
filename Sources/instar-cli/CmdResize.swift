import Glibc
import Instar

/// Prints an engine error as qemu-img does, one "PROG: " prefix per line for the messages qemu reports in
/// two calls (the --shrink hint followed by its warning).
func printResizeError(_ e: InstarError) {
    if e.message.contains("\nwarning: ") {
        for line in e.message.split(separator: "\n") { CLI.error(String(line)) }
    } else {
        CLI.error(e.message)
    }
}

/// `resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename
/// [+ | -]size`, with qemu-img 7.2's parsing: the size is taken off the end before getopt sees it, so that
/// "-5G" is not an option.
func resizeCommand(_ args: [String]) -> Int32 {
    guard args.count >= 3, let sizeText = args.last else { return CLI.usageError("Not enough arguments") }
    let optObject: Int32 = 256, optImageOpts: Int32 = 257, optPrealloc: Int32 = 258, optShrink: Int32 = 259
    let g = GetOpt(Array(args.dropLast()), shortOpts: ":f:hq", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "preallocation", argument: .required, value: optPrealloc),
        LongOption(name: "shrink", argument: .none, value: optShrink),
    ])
    var options = ResizeOperation.Options()
    options.warn = CLI.warnLine
    var quiet = false
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("f"): options.format = arg
        case .opt("q"): quiet = true
        case optObject:
            if !cliAddObject(arg ?? "", to: &options.open.secrets) { return 1 }
        case optImageOpts: options.imageOpts = true
        case optPrealloc:
            guard let p = ResizePreallocation(rawValue: arg ?? "") else {
                CLI.error("Invalid preallocation mode '\(arg ?? "")'")
                return 1
            }
            options.preallocation = p
        case optShrink: options.shrink = true
        default: break
        }
    }
    guard g.operands.count == 1, let filename = g.operands.first else {
        return CLI.usageError("Expecting image file name and size")
    }
    var text = Substring(sizeText)
    var sign: Int64 = 0
    if text.first == "+" {
        sign = 1
        text = text.dropFirst()
    } else if text.first == "-" {
        sign = -1
        text = text.dropFirst()
    }
    let n: UInt64
    switch SizeParse.parse(String(text)) {
    case .success(let v): n = v
    case .failure(.range):
        CLI.error("Value '\(text)' is out of range for parameter 'size'")
        return 1
    case .failure(.invalid):
        CLI.error("Parameter 'size' expects a non-negative number below 2^64\n"
            + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
        return 1
    }
    // qemu keeps the value in an int64_t: 8E and above wrap to negative numbers.
    let value = Int64(bitPattern: n)
    do {
        try ResizeOperation.run(filename, size: sign == 0 ? value : value &* sign, relative: sign != 0, options: options)
    } catch let e as InstarError {
        printResizeError(e)
        return 1
    } catch {
        CLI.error("\(error)")
        return 1
    }
    if !quiet { CLI.out.write("Image resized.\n") }
    return 0
}
