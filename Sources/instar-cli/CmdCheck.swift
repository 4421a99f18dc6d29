import Glibc
import Instar

/// `check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache]
/// [-U] filename`, with qemu-img 7.2's options, messages and exit codes (0 clean, 1 failure, 2 corruptions,
/// 3 leaks, 63 no check for the format). instar's `--chain` checks every image of the backing chain, top first
/// (human: one block per image headed by "image: NAME", separated by an empty line; JSON: an array of the
/// per-image objects) and exits with the worst status: 1 > 2 > 3 > 63 > 0.
func checkCommand(_ args: [String]) -> Int32 {
    let optOutput: Int32 = 256, optObject: Int32 = 257, optImageOpts: Int32 = 258, optChain: Int32 = 259
    let optIsolated: Int32 = 260
    let parsed = GetOpt(args, shortOpts: ":hf:r:T:qU", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "format", argument: .required, value: .opt("f")),
        LongOption(name: "repair", argument: .required, value: .opt("r")),
        LongOption(name: "output", argument: .required, value: optOutput),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
        LongOption(name: "chain", argument: .none, value: optChain),
        LongOption(name: "isolated", argument: .none, value: optIsolated),
    ])
    var isolated = false
    var options = CheckOperation.Options()
    options.warn = { CLI.error("warning: \($0)") }
    var output: String?
    var cache = "writeback"
    var quiet = false
    var chain = false
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
        case optChain:
            chain = true
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
    // bdrv_parse_cache_mode: only O_DIRECT matters to a check.
    switch cache {
    case "none", "off", "directsync": options.open.direct = true
    case "writeback", "unsafe", "writethrough": break
    default:
        CLI.error("Invalid source cache option: \(cache)")
        return 1
    }

    guard chain else {
        return checkOne(filename, options: options, json: json, quiet: quiet, print: true, isolated: isolated).status
    }
    if isolated {
        CLI.error("--isolated does not support --chain")
        return 1
    }
    let members: [CheckOperation.ChainMember]
    do {
        members = try CheckOperation.chainMembers(filename, options: options)
    } catch {
        CLI.error("\(error)")
        return 1
    }
    var codes: [Int32] = []
    var reports: [QObject] = []
    for (i, m) in members.enumerated() {
        var o = options
        if i > 0 {
            o.format = m.format
            o.imageOpts = false
        }
        if !json && !quiet {
            if i > 0 { CLI.out.write("\n") }
            CLI.out.write("image: \(m.filename)\n")
        }
        let one = checkOne(m.filename, options: o, json: json, quiet: quiet, print: !json)
        codes.append(one.status)
        if let r = one.report { reports.append(r.qobject) }
    }
    if json && !quiet { CLI.out.write(QJSON.pretty(.list(reports)) + "\n") }
    return CheckOperation.worstExitCode(codes)
}

/// Checks one image as `qemu-img check` does: its messages, its report (printed when `print`) and its status.
private func checkOne(_ filename: String, options: CheckOperation.Options, json: Bool, quiet: Bool, print: Bool,
                      isolated: Bool = false)
    -> (status: Int32, report: ImageCheckReport?)
{
    let outcome: CheckOperation.Outcome
    let run = isolated ? IsolatedMode.runCheck : CheckOperation.run
    do {
        outcome = try run(filename, options) { message in
            if message.errorReport {
                CLI.error(message.text)
            } else {
                CLI.stderrLine(CLI.ownName(message.text))
            }
        }
    } catch is CheckNotSupported {
        CLI.error("This image format does not support checks")
        return (63, nil)
    } catch {
        CLI.error("\(error)")
        return (1, nil)
    }
    if let fixed = outcome.repaired, !json, !quiet, print {
        CLI.out.write(CheckOperation.repairBanner(leaks: fixed.leaks, corruptions: fixed.corruptions))
    }
    if let report = outcome.report, !quiet, print {
        CLI.out.write(json ? report.json : report.human)
    }
    if let e = outcome.failureErrno {
        CLI.error("Check failed: \(strerrorString(e))")
        return (1, nil)
    }
    if let r = outcome.report, r.result.checkErrors != 0 {
        CLI.error("Check failed")
        return (1, r)
    }
    return (outcome.exitCode, outcome.report)
}
