import Glibc
import Instar

/// `check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache]
/// [-U] filename`, with qemu-img 7.2's options, messages and exit codes (0 clean, 1 failure, 2 corruptions,
/// 3 leaks, 63 no check for the format).
func checkCommand(_ args: [String]) -> Int32 {
    let optOutput: Int32 = 256, optObject: Int32 = 257, optImageOpts: Int32 = 258
    let parsed = GetOpt(args, shortOpts: ":hf:r:T:qU", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "format", argument: .required, value: .opt("f")),
        LongOption(name: "repair", argument: .required, value: .opt("r")),
        LongOption(name: "output", argument: .required, value: optOutput),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
    ])
    var options = CheckOperation.Options()
    options.warn = { CLI.error("warning: \($0)") }
    var output: String?
    var cache = "writeback"
    var quiet = false
    for (c, arg) in parsed.options {
        switch c {
        case .opt(":"), .opt("?"):
            return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("f"):
            options.format = arg
        case .opt("r"):
            switch arg {
            case "leaks": options.repair = .leaks
            case "all": options.repair = .all
            default:
                return CLI.usageError("Unknown option value for -r (expecting 'leaks' or 'all'): \(arg ?? "")")
            }
        case .opt("T"):
            cache = arg ?? ""
        case .opt("q"):
            quiet = true
        case .opt("U"):
            options.open.forceShare = true
        case optOutput:
            output = arg
        case optObject:
            if !cliAddObject(arg ?? "", to: &options.open.secrets) { return 1 }
        case optImageOpts:
            options.imageOpts = true
        default:
            break
        }
    }
    guard parsed.operands.count == 1, let filename = parsed.operands.first else {
        return CLI.usageError("Expecting one image file name")
    }
    guard let json = CLI.outputIsJSON(output) else { return 1 }
    // bdrv_parse_cache_mode: only O_DIRECT matters to a check.
    switch cache {
    case "none", "off", "directsync": options.open.direct = true
    case "writeback", "unsafe", "writethrough": break
    default:
        CLI.error("Invalid source cache option: \(cache)")
        return 1
    }

    let outcome: CheckOperation.Outcome
    do {
        outcome = try CheckOperation.run(filename, options: options) { message in
            if message.errorReport {
                CLI.error(message.text)
            } else {
                CLI.out.flush()
                fputs(CLI.ownName(message.text) + "\n", stderr)
            }
        }
    } catch is CheckNotSupported {
        CLI.error("This image format does not support checks")
        return 63
    } catch {
        CLI.error("\(error)")
        return 1
    }
    if let fixed = outcome.repaired, !json, !quiet {
        CLI.out.write(CheckOperation.repairBanner(leaks: fixed.leaks, corruptions: fixed.corruptions))
    }
    if let report = outcome.report, !quiet {
        CLI.out.write(json ? report.json : report.human)
    }
    if let e = outcome.failureErrno {
        CLI.error("Check failed: \(strerrorString(e))")
        return 1
    }
    if let r = outcome.report, r.result.checkErrors != 0 {
        CLI.error("Check failed")
        return 1
    }
    return outcome.exitCode
}
