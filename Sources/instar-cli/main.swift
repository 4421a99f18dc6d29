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
        default: break  // -T: tracing, which instar does not have
        }
    }
    guard let name = top.operands.first else { return 0 }
    guard let command = commands[name] else {
        CLI.error("Command not found: \(name)")
        return 1
    }
    return command(top.operands)
}

let helpText = HelpText.full

let status = runMain()
CLI.out.flush()
exit(status)
