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
    "snapshot": snapshotCommand,
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
    let name = args[1]
    if name == "-V" || name == "--version" {
        CLI.out.write("\(CLI.programName) version \(Instar.version) (instar; qemu-img 7.2 compatible)\n")
        return 0
    }
    if name == "-h" || name == "--help" {
        CLI.out.write(helpText)
        return 0
    }
    guard let command = commands[name] else {
        CLI.error("Command not found: \(name)")
        return 1
    }
    return command(Array(args[1...]))
}

let helpText = """
    \(CLI.programName): disk image utility compatible with qemu-img 7.2

    usage: \(CLI.programName) [standard options] command [command options]
    Commands: \(commands.keys.sorted().joined(separator: " "))

    Supported formats: \(FormatRegistry.all.map(\.name).sorted().joined(separator: " "))

    """

let status = runMain()
CLI.out.flush()
exit(status)
