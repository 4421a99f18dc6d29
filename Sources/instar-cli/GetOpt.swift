import CInstar
import Glibc

/// qemu-img parses its arguments with glibc's getopt_long; calling the same function gives the same
/// permutation rules and the same diagnostics for free.
struct LongOption {
    enum Argument: Int32 { case none = 0, required = 1, optional = 2 }
    let name: String
    let argument: Argument
    /// The value getopt returns: a short option character, or a number above 255 for long-only options.
    let value: Int32
}

struct GetOpt {
    /// The options in the order given, as (value, argument).
    var options: [(Int32, String?)] = []
    /// The non-option arguments, in order.
    var operands: [String] = []

    /// Parses `args` (args[0] is the subcommand name, as qemu-img passes argv shifted by one).
    /// `shortOpts` uses getopt syntax; a leading ':' makes missing arguments return ':'.
    init(_ args: [String], shortOpts: String, longOpts: [LongOption]) {
        optind = 0  // full reinitialisation of glibc's getopt
        opterr = 1
        var cStrings = args.map { strdup($0) }
        cStrings.append(nil)
        var names = longOpts.map { strdup($0.name) }
        var table = longOpts.enumerated().map { i, o in option(name: names[i], has_arg: o.argument.rawValue, flag: nil, val: o.value) }
        table.append(option(name: nil, has_arg: 0, flag: nil, val: 0))
        defer {
            for c in cStrings { free(c) }
            for n in names { free(n) }
            names.removeAll()
        }
        let argc = Int32(args.count)
        cStrings.withUnsafeMutableBufferPointer { argv in
            table.withUnsafeBufferPointer { tbl in
                while true {
                    let c = getopt_long(argc, argv.baseAddress!, shortOpts, tbl.baseAddress, nil)
                    if c == -1 { break }
                    let arg = optarg.map { String(cString: $0) }
                    if c == Int32(UInt8(ascii: "?")) || c == Int32(UInt8(ascii: ":")) {
                        // Remember which argument was at fault for qemu-img's own messages.
                        let idx = Int(optind) - 1
                        let bad = idx >= 0 && idx < args.count ? args[idx] : ""
                        options.append((c, bad))
                        continue
                    }
                    options.append((c, arg))
                }
                var i = Int(optind)
                while i < args.count {
                    if let p = argv[i] { operands.append(String(cString: p)) }
                    i += 1
                }
            }
        }
    }
}

extension Int32 {
    /// The getopt value of a short option letter.
    static func opt(_ c: Character) -> Int32 { Int32(c.asciiValue ?? 0) }
}
