import Glibc
import Instar

/// `amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename`.
func amendCommand(_ args: [String]) -> Int32 {
    let optObject: Int32 = 256, optImageOpts: Int32 = 257, optForce: Int32 = 258
    let g = GetOpt(args, shortOpts: ":ho:f:t:pq", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force", argument: .none, value: optForce),
    ])
    var options = AmendOperation.Options()
    options.warn = CLI.warnLine
    var list: String?
    var quiet = false
    var progress = false
    var cache = "writeback"
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("o"):
            if !accumulateOptions(&list, arg ?? "") { return 1 }
        case .opt("f"): options.format = arg
        case .opt("t"): cache = arg ?? ""
        case .opt("p"): progress = true
        case .opt("q"): quiet = true
        case optObject:
            if !cliAddObject(arg ?? "", to: &options.open.secrets) { return 1 }
        case optImageOpts: options.imageOpts = true
        case optForce: options.force = true
        default: break
        }
    }
    guard let optionList = list else { return CLI.usageError("Must specify options (-o)") }
    if quiet { progress = false }
    var meter = ProgressMeter(minSkip: 1.0, report: { CLI.out.write(ProgressMeter.record($0)); CLI.out.flush() })
    let finish: (Int32) -> Int32 = { rc in
        if progress { CLI.out.write("\n") }
        return rc
    }
    let filename = g.operands.count == 1 ? g.operands.first : nil
    if let f = options.format, CreateOptionValues.wantsHelp(optionList) {
        do {
            CLI.out.write(try AmendOperation.optionHelp(format: f))
            return finish(0)
        } catch {
            CLI.error("\(error)")
            return finish(1)
        }
    }
    guard let name = filename else {
        CLI.error("Expecting one image file name")
        return finish(1)
    }
    guard ["none", "writeback", "writethrough", "directsync", "unsafe"].contains(cache) else {
        CLI.error("Invalid cache option: \(cache)")
        return finish(1)
    }
    if progress { options.progress = { try? meter.advance(Float($0), max: 0) } }
    do {
        if let help = try AmendOperation.run(name, optionList: optionList, options: options) {
            CLI.out.write(help)
        }
        return finish(0)
    } catch let e as InstarError {
        // The hint names the program by the name it was run as.
        var message = e.message
        let hint = "You can use 'qemu-img rebase' instead."
        if message.hasSuffix(hint) {
            message = String(message.dropLast(hint.count)) + "You can use '\(CLI.programName) rebase' instead."
        }
        if message.contains("\nFailed to write to keyslot ") || message.contains("\nFailed to erase keyslot ") {
            // qemu's error hint after a LUKS keyslot failure ends without a newline.
            CLI.errorNoNewline(message)
        } else {
            CLI.error(message)
        }
        return finish(1)
    } catch {
        CLI.error("\(error)")
        return finish(1)
    }
}
