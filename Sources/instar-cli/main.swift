import Glibc
import Instar

// instar: a drop-in for qemu-img with the same subcommands, options, output and exit codes.

let commands: [String: Command] = [
    "info": infoCommand,
    "check": checkCommand,
    "map": mapCommand,
    "compare": compareCommand,
    "convert": convertCommand,
    "create": createCommand,
    "measure": measureCommand,
    "resize": resizeCommand,
    "amend": amendCommand,
    "commit": commitCommand,
    "rebase": rebaseCommand,
    "bitmap": bitmapCommand,
    "dd": ddCommand,
    "bench": benchCommand,
    "snapshot": snapshotCommand,
    "inspect": inspectCommand,
]

func runMain() -> Int32 {
    let args = CommandLine.arguments
    if let first = args.first {
        CLI.programName = String(first.split(separator: "/").last ?? Substring(first))
    }
    signal(SIGPIPE, SIG_IGN)
    Diagnostics.sink = { m in
        CLI.out.flush()
        fputs(m.prefixed ? "\(CLI.programName): \(CLI.ownName(m.text))" : CLI.ownName(m.text), stderr)
    }
    guard args.count >= 2 else {
        CLI.error("Not enough arguments\nTry '\(CLI.programName) --help' for more information")
        return 1
    }
    // qemu-img's own options come before the subcommand (getopt "+:hVT:").
    let top = GetOpt(args, shortOpts: "+:hVT:", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "version", argument: .none, value: .opt("V")),
        LongOption(name: "trace", argument: .required, value: .opt("T")),
    ])
    for (c, arg) in top.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"): CLI.out.write(helpText); return 0
        case .opt("V"): CLI.out.write(HelpText.version); return 0
        default:
            // -T: instar has no trace events, so an event named outright is one that does not exist (qemu warns
            // likewise); patterns with wildcards match nothing silently.
            for part in (arg ?? "").split(separator: ",", omittingEmptySubsequences: false) {
                var name = Substring(part)
                if name.hasPrefix("enable=") { name = name.dropFirst(7) } else if name.contains("=") { continue }
                if !name.isEmpty && !name.contains("*") && !name.contains("?") {
                    CLI.error("warning: trace event '\(name)' does not exist")
                }
            }
        }
    }
    guard let name = top.operands.first else { return 0 }
    guard let command = commands[name] else {
        return CLI.usageError("Command not found: \(name)")
    }
    return command(top.operands)
}

/// Read when printed: the text names the program by argv[0], known only once runMain has started.
var helpText: String { HelpText.full }

let status = runMain()
CLI.out.flush()
exit(status)
