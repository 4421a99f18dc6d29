import Glibc
import Instar

/// `dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input
/// of=output`, as qemu-img 7.2's img_dd parses it, plus Proxmox's `-n`, `-l SNAPSHOT`, `osize=`, `isize=`
/// and stdin/stdout streams. The streams (which change qemu-img's answer to a missing if= or of=) are on when
/// the command uses any Proxmox extension or INSTAR_PVE=1 is set in the environment.
func ddCommand(_ args: [String]) -> Int32 {
    let optObject: Int32 = 256, optImageOpts: Int32 = 257
    let g = GetOpt(args, shortOpts: ":hf:O:l:Un", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
    ])
    var o = DdOperation.Options()
    o.warn = { msg in CLI.error(msg) }
    var pve = (getenv("INSTAR_PVE").map { String(cString: $0) } ?? "") == "1"
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("f"): o.inputFormat = arg
        case .opt("O"): o.outputFormat = arg ?? "raw"
        case .opt("U"): o.forceShare = true
        case .opt("n"):
            o.skipCreate = true
            pve = true
        case .opt("l"):
            let a = arg ?? ""
            do {
                o.snapshot = try ConvertOperation.SnapshotSelector(parsing: a)
            } catch let e as InstarError {
                CLI.error(e.message)
                CLI.error("Failed in parsing snapshot param '\(a)'")
                return 1
            } catch { return 1 }
            pve = true
        case optObject:
            if !cliAddObject(arg ?? "", to: &o.open.secrets) { return 1 }
        case optImageOpts: o.imageOpts = true
        default: break
        }
    }
    for operand in g.operands {
        guard let eq = operand.firstIndex(of: "=") else {
            CLI.error("unrecognized operand \(operand)")
            return 1
        }
        let key = String(operand[..<eq])
        let value = String(operand[operand.index(after: eq)...])
        switch key {
        case "bs":
            guard let v = cvtnum("bs", value, min: 1, max: Int64(Int32.max)) else { return 1 }
            o.blockSize = v
        case "count":
            guard let v = cvtnum("count", value) else { return 1 }
            o.count = v
        case "if": o.input = value
        case "of": o.output = value
        case "skip":
            guard let v = cvtnum("skip", value) else { return 1 }
            o.skip = v
        case "osize":
            guard let v = cvtnum("osize", value) else { return 1 }
            o.outputSize = v
            pve = true
        case "isize":
            guard let v = cvtnum("isize", value) else { return 1 }
            o.inputSize = v
            pve = true
        default:
            CLI.error("unrecognized operand \(key)")
            return 1
        }
    }
    o.allowStreams = pve
    if o.output == nil && pve { CLI.out.flush() }
    return CLI.exitStatus {
        try DdOperation.run(o)
    }
}
