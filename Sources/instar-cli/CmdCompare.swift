import Glibc
import Instar

private let optObject: Int32 = 257
private let optImageOpts: Int32 = 258
private let optIsolated: Int32 = 259

/// `compare [-f FMT] [-F FMT] [-T CACHE] [-p] [-q] [-s] [-U] FILE1 FILE2`: exit 0 identical, 1 different, 2 error.
func compareCommand(_ args: [String]) -> Int32 {
    let parsed = GetOpt(args, shortOpts: ":hf:F:T:pqsU", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
        LongOption(name: "isolated", argument: .none, value: optIsolated),
    ])
    var isolated = false
    var fmt1: String?
    var fmt2: String?
    var cache = "writeback"
    var progress = false
    var quiet = false
    var strict = false
    var forceShare = false
    var imageOpts = false
    for (c, arg) in parsed.options {
        switch c {
        case .opt(":"), .opt("?"): return optionError(c, arg)
        case .opt("h"): CLI.out.write(helpText); return 0
        case .opt("f"): fmt1 = arg
        case .opt("F"): fmt2 = arg
        case .opt("T"): cache = arg ?? ""
        case .opt("p"): progress = true
        case .opt("q"): quiet = true
        case .opt("s"): strict = true
        case .opt("U"): forceShare = true
        case optImageOpts: imageOpts = true
        case optObject: if !cliAddObject(arg ?? "") { return 2 }
        case optIsolated: isolated = true
        default: break
        }
    }
    if quiet { progress = false }
    guard parsed.operands.count == 2 else { return CLI.usageError("Expecting two image file names") }
    let status = runCompare(parsed.operands[0], parsed.operands[1], fmt1: fmt1, fmt2: fmt2, cache: cache,
                            progress: progress, quiet: quiet, strict: strict, forceShare: forceShare,
                            imageOpts: imageOpts, isolated: isolated)
    progressEnd(progress)
    return status
}

private func runCompare(_ name1: String, _ name2: String, fmt1: String?, fmt2: String?, cache: String, progress: Bool,
                        quiet: Bool, strict: Bool, forceShare: Bool, imageOpts: Bool, isolated: Bool = false) -> Int32 {
    guard let mode = CacheMode(qemuName: cache) else {
        CLI.error("Invalid source cache option: \(cache)")
        return 2
    }
    if isolated {
        // --isolated: both images opened and compared in the confined helper (docs/isolated.md).
        var open = ImageOpenOptions()
        open.forceShare = forceShare
        open.direct = mode.direct
        open.secrets = cliSecrets
        do {
            switch try IsolatedMode.compare((name1, name2), formats: (fmt1, fmt2), flags: 0, keys: (nil, nil),
                                            strict: strict, commandLine: true, imageOpts: imageOpts, open: open,
                                            progress: progressPrinter(progress)) {
            case let .result(r):
                if !quiet { CLI.out.write(r.message) }
                return r.identical ? 0 : 1
            case let .failure(status, line, _):
                CLI.error(line)
                return status
            }
        } catch {
            CLI.error((error as? InstarError)?.message ?? "\(error)")
            return 2
        }
    }
    guard let a = cliOpenImage(name1, format: fmt1, imageOpts: imageOpts, forceShare: forceShare,
                               direct: mode.direct) else { return 2 }
    defer { try? a.close() }
    guard let b = cliOpenImage(name2, format: fmt2, imageOpts: imageOpts, forceShare: forceShare,
                               direct: mode.direct) else { return 2 }
    defer { try? b.close() }
    do {
        let r = try CompareOperation.compare(a, b, strict: strict, progress: progressPrinter(progress))
        if !quiet { CLI.out.write(r.message) }
        return r.identical ? 0 : 1
    } catch let e as StepError {
        // img_compare: 3 when block status fails, 4 when reading fails.
        let name = e.operand == 0 ? name1 : name2
        switch e.step {
        case .blockStatus:
            CLI.error("Sector allocation test failed for \(name)")
            return 3
        case .read, .write:
            CLI.error("Error while reading offset \(e.offset) of \(name): \(strerrorString(e.errnoValue))")
            return 4
        }
    } catch let e as InstarError {
        CLI.error(e.message)
        return e.code == .corrupt ? 3 : 4
    } catch {
        CLI.error("\(error)")
        return 4
    }
}
