import Glibc
import Instar

/// Prints an engine error the way qemu-img does: multi-line size messages get the program prefix on each
/// line, and the backing-format hint ends without a newline.
func printCreateError(_ e: InstarError) {
    if e.message.contains("\nkilobytes, megabytes") {
        for line in e.message.split(separator: "\n", omittingEmptySubsequences: false) { CLI.error(String(line)) }
    } else if e.message.contains("\nDetected format of ") {
        CLI.errorNoNewline(e.message)
    } else {
        CLI.error(e.message)
    }
}

/// Adds an `-o` argument to the accumulated list (qemu-img's accumulate_options).
func accumulateOptions(_ list: inout String?, _ arg: String) -> Bool {
    guard CreateOptionValues.isValidList(arg) else {
        CLI.error("Invalid option list: \(arg)")
        return false
    }
    list = list.map { "\($0),\(arg)" } ?? arg
    return true
}

/// `-o help` (print_block_option_help).
func printOptionHelp(filename: String?, format: String) -> Int32 {
    guard let d = FormatRegistry.descriptor(named: format) else {
        CLI.error("Unknown file format '\(format)'")
        return 1
    }
    guard let c = d.creator else {
        CLI.error("Format driver '\(format)' does not support image creation")
        return 1
    }
    if let filename {
        CLI.out.write("Supported options:\n")
        for l in CreateOptionValues.helpLines(Create.optionTable(for: c, filename: filename)) { CLI.out.write(l + "\n") }
    } else {
        CLI.out.write("Supported \(format) options:\n")
        for l in CreateOptionValues.helpLines(c.options) { CLI.out.write(l + "\n") }
        CLI.out.write("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n")
    }
    return 0
}

/// `create [-q] [-f fmt] [-b backing [-F fmt]] [-u] [-o options] filename [size]`.
func createCommand(_ args: [String]) -> Int32 {
    let g = GetOpt(args, shortOpts: ":F:b:f:ho:qu",
                   longOpts: [LongOption(name: "help", argument: .none, value: .opt("h")),
                              LongOption(name: "object", argument: .required, value: 256)])
    var format = "raw"
    var backing: String?
    var backingFormat: String?
    var options: String?
    var quiet = false
    var unsafe = false
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("F"): backingFormat = arg
        case .opt("b"): backing = arg
        case .opt("f"): format = arg ?? "raw"
        case .opt("o"):
            if !accumulateOptions(&options, arg ?? "") { return 1 }
        case .opt("q"): quiet = true
        case .opt("u"): unsafe = true
        case 256: if !cliAddObject(arg ?? "") { return 1 }
        default: break
        }
    }
    var operands = g.operands[...]
    let filename = operands.first
    if let o = options, CreateOptionValues.wantsHelp(o) {
        return printOptionHelp(filename: filename, format: format)
    }
    guard let name = filename else { return CLI.usageError("Expecting image file name") }
    operands = operands.dropFirst()
    var p = Create.Parameters(filename: name)
    p.format = format
    p.backingFile = backing
    p.backingFormat = backingFormat
    p.options = options
    p.unsafeBacking = unsafe
    p.secrets = cliSecrets
    if let s = operands.first {
        do {
            p.size = try SizeParse.imageSize(s)
        } catch let e as InstarError {
            printCreateError(e)
            return 1
        } catch { return 1 }
        operands = operands.dropFirst()
    }
    if let extra = operands.first { return CLI.usageError("Unexpected argument: \(extra)") }
    do {
        let prepared = try Create.prepare(p)
        if !quiet {
            CLI.out.write(prepared.formattingLine + "\n")
            CLI.out.flush()
        }
        try Create.run(prepared)
        return 0
    } catch let e as InstarError {
        printCreateError(e)
        return 1
    } catch {
        CLI.error("\(error)")
        return 1
    }
}
