import Glibc
import Instar

// MARK: helpers shared by map, compare and convert

/// qemu-img's missing_argument()/unrecognized_option() for getopt's ':' and '?' results.
func optionError(_ c: Int32, _ arg: String?) -> Int32 { CLI.badOption(c, arg) }

/// qemu_strtosz(): a byte count with an optional k/M/G/T/P/E suffix (binary), fractions allowed with a suffix.
/// nil for malformed input; .max (overflow) maps to ERANGE by the caller.
func parseSize(_ text: String) -> (value: UInt64, overflow: Bool)? {
    var digits = Substring(text)
    var multiplier: Double = 1
    if let last = digits.last, !last.isNumber && last != "." {
        let suffixes: [Character: Double] = ["b": 1, "B": 1, "k": 1024, "K": 1024, "m": 1048576, "M": 1048576,
                                             "g": 1073741824, "G": 1073741824, "t": 1099511627776, "T": 1099511627776,
                                             "p": 1125899906842624, "P": 1125899906842624, "e": 1152921504606846976, "E": 1152921504606846976]
        guard let m = suffixes[last] else { return nil }
        multiplier = m
        digits = digits.dropLast()
    }
    guard !digits.isEmpty, digits.hasPrefix("0x") || digits.hasPrefix("0X")
            || digits.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
          digits.filter({ $0 == "." }).count <= 1, digits.first != "." else { return nil }
    if digits.hasPrefix("0x") || digits.hasPrefix("0X") {
        guard let v = UInt64(digits.dropFirst(2), radix: 16) else { return nil }
        let (r, o) = v.multipliedReportingOverflow(by: UInt64(multiplier))
        return o ? (UInt64.max, true) : (r, false)
    }
    if !digits.contains(".") {
        guard let v = UInt64(digits) else { return (UInt64.max, true) }
        let (r, o) = v.multipliedReportingOverflow(by: UInt64(multiplier))
        return o ? (UInt64.max, true) : (r, false)
    }
    // qemu allows a fraction only together with a suffix.
    guard multiplier > 1, let d = Double(digits) else { return nil }
    let r = d * multiplier
    if r >= 18446744073709551616.0 { return (UInt64.max, true) }
    return (UInt64(r), false)
}

/// qemu-img's cvtnum(): prints its errors and returns nil on failure.
func cvtnum(_ name: String, _ text: String, min: Int64 = 0, max: Int64 = Int64.max) -> Int64? {
    guard let (v, overflow) = parseSize(text) else {
        CLI.error("Invalid \(name) specified. You may use k, M, G, T, P or E suffixes for")
        CLI.error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        return nil
    }
    if overflow || v > UInt64(max) || Int64(v) < min {
        CLI.error("Invalid \(name) specified. Must be between \(min) and \(max).")
        return nil
    }
    return Int64(v)
}

/// qemu-img's img_open(): opens `name` (a filename, json: name or --image-opts string), printing
/// "Could not open 'NAME': ..." on failure.
func cliOpenImage(_ name: String, format: String?, imageOpts: Bool, forceShare: Bool, writable: Bool = false,
                  direct: Bool = false, noShareWrite: Bool = false) -> ImageLayer? {
    do {
        let spec = try ImageOpener.commandLineSpec(name, format: format, imageOpts: imageOpts,
                                                   warn: { CLI.error("warning: \($0)") })
        var options = ImageOpenOptions()
        options.forceShare = forceShare
        options.direct = direct
        options.noShareWrite = noShareWrite
        options.secrets = cliSecrets
        return try ImageOpener.open(spec, options: options, writable: writable)
    } catch let e as InstarError {
        CLI.error("Could not open '\(name)': \(e.message)")
    } catch {
        CLI.error("Could not open '\(name)': \(error)")
    }
    return nil
}

/// A hex number as C's "%#llx" prints it ("0" for zero, else "0x...").
func cHex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }

/// Pads to `width` on the right, as "%-Ns".
func padRight(_ s: String, _ width: Int) -> String {
    s.count >= width ? s : s + String(repeating: " ", count: width - s.count)
}

// MARK: map

private let optOutput: Int32 = 256
private let optObject: Int32 = 257
private let optImageOpts: Int32 = 258
private let optIsolated: Int32 = 259

/// `map [--object OBJ] [-f FMT] [--image-opts] [--output=OFMT] [--start-offset=OFF] [--max-length=LEN] [-U] FILE`
func mapCommand(_ args: [String]) -> Int32 {
    let parsed = GetOpt(args, shortOpts: ":f:hU", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "format", argument: .required, value: .opt("f")),
        LongOption(name: "output", argument: .required, value: optOutput),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
        LongOption(name: "start-offset", argument: .required, value: .opt("s")),
        LongOption(name: "max-length", argument: .required, value: .opt("l")),
        LongOption(name: "isolated", argument: .none, value: optIsolated),
    ])
    var isolated = false
    var format: String?
    var output: String?
    var forceShare = false
    var imageOpts = false
    var start: Int64 = 0
    var maxLength: Int64 = -1
    for (c, arg) in parsed.options {
        switch c {
        case .opt(":"), .opt("?"): return optionError(c, arg)
        case .opt("h"): CLI.out.write(helpText); return 0
        case .opt("f"): format = arg
        case .opt("U"): forceShare = true
        case optOutput: output = arg
        case .opt("s"):
            guard let v = cvtnum("start offset", arg ?? "") else { return 1 }
            start = v
        case .opt("l"):
            guard let v = cvtnum("max length", arg ?? "") else { return 1 }
            maxLength = v
        case optImageOpts: imageOpts = true
        case optObject: if !cliAddObject(arg ?? "") { return 1 }
        case optIsolated: isolated = true
        default: break
        }
    }
    guard parsed.operands.count == 1 else { return CLI.usageError("Expecting one image file name") }
    let filename = parsed.operands[0]
    guard let json = CLI.outputIsJSON(output) else { return 1 }
    if imageOpts && format != nil {
        CLI.error("--image-opts and --format are mutually exclusive")
        return 1
    }
    // --isolated: the walk runs in the confined helper and its entries are replayed here.
    var walk: IsolatedMode.MapWalk?
    if isolated {
        var open = ImageOpenOptions()
        open.forceShare = forceShare
        open.secrets = cliSecrets
        do {
            walk = try IsolatedMode.mapWalk(filename, format: format, imageOpts: imageOpts, open: open,
                                            start: UInt64(start), maxLength: maxLength < 0 ? nil : UInt64(maxLength),
                                            humanCoalescing: !json, warn: { CLI.error("warning: \($0)") })
        } catch {
            CLI.error((error as? InstarError)?.message ?? "\(error)")
            return 1
        }
    }
    let image = walk != nil ? nil : cliOpenImage(filename, format: format, imageOpts: imageOpts,
                                                 forceShare: forceShare)
    if walk == nil && image == nil { return 1 }
    defer { try? image?.close() }

    if json { CLI.out.write("[") } else {
        CLI.out.write(padRight("Offset", 16) + padRight("Length", 16) + padRight("Mapped to", 16) + "File\n")
    }
    do {
        let emit: (MapEntry, Bool) throws -> Void = { e, more in
            if json {
                CLI.out.write(e.json)
                if more { CLI.out.write(",\n") }
            } else {
                if e.data && e.offset == nil {
                    throw InstarError.unsupported("File contains external, encrypted or compressed clusters.")
                }
                if e.data && !e.zero {
                    CLI.out.write(padRight(cHex(e.start), 16) + padRight(cHex(e.length), 16)
                                  + padRight(cHex(e.offset ?? 0), 16) + (e.filename ?? "") + "\n")
                }
            }
        }
        if let walk {
            for (i, e) in walk.entries.enumerated() {
                try emit(e, i + 1 < walk.entries.count || walk.error != nil)
            }
            if let e = walk.error { throw e }
        } else if let image {
            try MapOperation.walk(image, start: UInt64(start), maxLength: maxLength < 0 ? nil : UInt64(maxLength),
                                  humanCoalescing: !json, emit: emit)
        }
    } catch {
        CLI.error((error as? InstarError)?.message ?? "\(error)")
        return 1
    }
    if json { CLI.out.write("]\n") }
    return 0
}
