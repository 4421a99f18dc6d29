import Glibc
import Instar

/// `measure [--output=human|json] [-O fmt] [-o options] [--size N | [-f fmt] filename]`.
func measureCommand(_ args: [String]) -> Int32 {
    let g = GetOpt(args, shortOpts: ":hf:O:o:l:U",
                   longOpts: [LongOption(name: "help", argument: .none, value: .opt("h")),
                              LongOption(name: "image-opts", argument: .none, value: 257),
                              LongOption(name: "object", argument: .required, value: 256),
                              LongOption(name: "output", argument: .required, value: 258),
                              LongOption(name: "size", argument: .required, value: 259),
                              LongOption(name: "force-share", argument: .none, value: .opt("U")),
                              LongOption(name: "isolated", argument: .none, value: 260)])
    var isolated = false
    var p = Measure.Parameters()
    p.warn = { CLI.error("warning: \($0)") }
    var json = false
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("f"): p.sourceFormat = arg
        case .opt("O"): p.outputFormat = arg ?? "raw"
        case .opt("o"):
            var o = p.options
            if !accumulateOptions(&o, arg ?? "") { return 1 }
            p.options = o
        case .opt("l"):
            CLI.error("measure: -l (snapshots) is not supported yet")
            return 1
        case .opt("U"): p.forceShare = true
        case 256:
            if !cliAddObject(arg ?? "") { return 1 }
        case 257: p.imageOpts = true
        case 260: isolated = true
        case 258:
            if arg == "json" { json = true } else if arg == "human" { json = false } else {
                CLI.error("--output must be used with human or json as argument.")
                return 1
            }
        case 259:
            do {
                p.size = try SizeParse.imageSize(arg ?? "")
            } catch let e as InstarError {
                printCreateError(e)
                return 1
            } catch { return 1 }
        default: break
        }
    }
    if g.operands.count > 1 {
        CLI.error("At most one filename argument is allowed.")
        return 1
    }
    p.filename = g.operands.first
    p.secrets = cliSecrets
    do {
        let r = isolated ? try IsolatedMode.measure(p) : try Measure.measure(p)
        if json {
            var s = "{\n"
            if let b = r.bitmaps { s += "    \"bitmaps\": \(b),\n" }
            s += "    \"required\": \(r.required),\n    \"fully-allocated\": \(r.fullyAllocated)\n}\n"
            CLI.out.write(s)
        } else {
            CLI.out.write("required size: \(r.required)\nfully allocated size: \(r.fullyAllocated)\n")
            if let b = r.bitmaps { CLI.out.write("bitmaps size: \(b)\n") }
        }
        return 0
    } catch let e as InstarError {
        for line in e.message.split(separator: "\n", omittingEmptySubsequences: false) where e.message.contains("\nInvalid options for") {
            CLI.error(String(line))
        }
        if !e.message.contains("\nInvalid options for") { printCreateError(e) }
        return 1
    } catch {
        CLI.error("\(error)")
        return 1
    }
}
