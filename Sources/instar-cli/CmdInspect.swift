import Glibc
import Instar

/// `inspect [--policy=PRESET] [-f fmt] [--max-virtual-size=SIZE] [--max-vmdk-extents=N] [--fatal=CODE,...]
/// [--output=human|json] filename`: instar's own subcommand (qemu-img has none). Detects the format from the
/// content alone and lists every violation of the policy (docs/inspect.md). `-f` is the declared format, checked
/// against the content. Exit status: 0 no fatal violation, 2 a fatal one, 1 the file could not be inspected.
func inspectCommand(_ args: [String]) -> Int32 {
    let optOutput: Int32 = 256, optPolicy: Int32 = 257, optMaxSize: Int32 = 258, optMaxExtents: Int32 = 259
    let optFatal: Int32 = 260
    let parsed = GetOpt(args, shortOpts: ":hf:", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "format", argument: .required, value: .opt("f")),
        LongOption(name: "output", argument: .required, value: optOutput),
        LongOption(name: "policy", argument: .required, value: optPolicy),
        LongOption(name: "preset", argument: .required, value: optPolicy),
        LongOption(name: "max-virtual-size", argument: .required, value: optMaxSize),
        LongOption(name: "max-vmdk-extents", argument: .required, value: optMaxExtents),
        LongOption(name: "fatal", argument: .required, value: optFatal),
    ])
    var policy = InspectPolicy()
    var output: String?
    for (c, arg) in parsed.options {
        let value = arg ?? ""
        switch c {
        case .opt(":"), .opt("?"):
            return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(inspectHelp)
            return 0
        case .opt("f"):
            policy.declaredFormat = value
        case optOutput:
            output = arg
        case optPolicy:
            guard let p = InspectPreset.named(value) else {
                CLI.error("Unknown policy '\(value)' (glance, oslo, vdsm, nova, cinder, pve)")
                return 1
            }
            policy.preset = p
        case optMaxSize:
            guard let v = cvtnum("max virtual size", value) else { return 1 }
            policy.maxVirtualSize = UInt64(v)
        case optMaxExtents:
            guard let v = UInt32(value) else {
                CLI.error("Invalid max vmdk extents '\(value)'")
                return 1
            }
            policy.maxVmdkExtents = v
        case optFatal:
            var mask: UInt64 = 0
            for name in value.split(separator: ",") where name != "none" {
                guard let code = InspectCode.named(String(name)) else {
                    CLI.error("Unknown violation code '\(name)'")
                    return 1
                }
                mask |= code.bit
            }
            policy.fatal = mask
        default:
            break
        }
    }
    guard parsed.operands.count == 1, let filename = parsed.operands.first else {
        return CLI.usageError("Expecting one image file name")
    }
    guard let json = CLI.outputIsJSON(output) else { return 1 }
    let report: InspectReport
    do {
        report = try Inspect.run(path: filename, policy: policy)
    } catch let e as InstarError {
        CLI.error("Could not inspect '\(filename)': \(e.message)")
        return 1
    } catch {
        CLI.error("Could not inspect '\(filename)': \(error)")
        return 1
    }
    CLI.out.write(json ? inspectJSON(report, filename: filename, preset: policy.preset)
                       : inspectHuman(report, filename: filename, preset: policy.preset))
    return report.isFatal ? 2 : 0
}

private func inspectJSON(_ r: InspectReport, filename: String, preset: InspectPreset) -> String {
    var s = "{\n"
    s += "    \"filename\": \(QJSON.quoted(filename)),\n"
    s += "    \"format\": \(QJSON.quoted(r.format)),\n"
    s += "    \"formats\": [" + r.formats.map { QJSON.quoted($0) }.joined(separator: ", ") + "],\n"
    s += "    \"virtual-size\": \(r.virtualSize.map { String($0) } ?? "null"),\n"
    s += "    \"policy\": \(QJSON.quoted(preset.name)),\n"
    s += "    \"fatal\": \(r.isFatal),\n"
    if r.violations.isEmpty {
        s += "    \"violations\": [\n    ]\n"
    } else {
        s += "    \"violations\": [\n"
        s += r.violations.map { v in
            "        {\n" +
            "            \"code\": \(QJSON.quoted(v.code.name)),\n" +
            "            \"field\": \(QJSON.quoted(v.field)),\n" +
            "            \"offset\": \(v.offset),\n" +
            "            \"message\": \(QJSON.quoted(v.message)),\n" +
            "            \"fatal\": \(v.fatal)\n" +
            "        }"
        }.joined(separator: ",\n")
        s += "\n    ]\n"
    }
    return s + "}\n"
}

private func inspectHuman(_ r: InspectReport, filename: String, preset: InspectPreset) -> String {
    var s = "image: \(filename)\n"
    s += "format: \(r.format)\n"
    if r.formats.count > 1 { s += "formats: \(r.formats.joined(separator: ", "))\n" }
    s += "virtual size: \(r.virtualSize.map { String($0) } ?? "beyond 2^64") bytes\n"
    s += "policy: \(preset.name)\n"
    s += "verdict: \(r.isFatal ? "refused" : "accepted")\n"
    if !r.violations.isEmpty {
        s += "violations:\n"
        for v in r.violations {
            s += "    \(v.fatal ? "fatal" : "note"): \(v.code.name) (\(v.field) at \(v.offset)): \(v.message)\n"
        }
    }
    return s
}

private let inspectHelp = """
    usage: instar inspect [--policy=PRESET] [-f FMT] [--max-virtual-size=SIZE] [--max-vmdk-extents=N]
                          [--fatal=CODE[,CODE...]] [--output=human|json] FILENAME

    Detects the format of FILENAME from its content alone and lists every violation of the policy.
      --policy   glance (default; also 'oslo'), vdsm, nova, cinder, pve: which violations are fatal
      -f FMT     the declared format: content of another format is a violation
      --fatal    the fatal codes instead of the preset's ('none' for none)
    Exit status: 0 accepted, 2 a fatal violation, 1 the file could not be inspected.

    """
