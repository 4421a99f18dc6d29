import Glibc
import Instar

/// `snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot]
/// filename`, parsed as qemu-img 7.2's img_snapshot does (no -f in 7.2: the format is always probed or given
/// through --image-opts). -c, -a and -d are silent on success; -q changes nothing qemu-img prints here.
func snapshotCommand(_ args: [String]) -> Int32 {
    let optObject: Int32 = 256, optImageOpts: Int32 = 257
    let g = GetOpt(args, shortOpts: ":la:c:d:hqU", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
    ])
    enum Action { case none, list, create(String), apply(String), delete(String) }
    var action = Action.none
    var options = SnapshotOperation.Options()
    options.warn = CLI.warnLine
    for (c, arg) in g.options {
        switch c {
        case .opt(":"), .opt("?"): return CLI.badOption(c, arg)
        case .opt("h"):
            CLI.out.write(helpText)
            return 0
        case .opt("l"), .opt("a"), .opt("c"), .opt("d"):
            if case .none = action {} else { return CLI.usageError("Cannot mix '-l', '-a', '-c', '-d'") }
            let v = arg ?? ""
            action = c == .opt("l") ? .list : c == .opt("a") ? .apply(v) : c == .opt("c") ? .create(v) : .delete(v)
        case .opt("q"): break
        case .opt("U"): options.open.forceShare = true
        case optObject:
            if !cliAddObject(arg ?? "", to: &options.open.secrets) { return 1 }
        case optImageOpts: options.imageOpts = true
        default: break
        }
    }
    guard g.operands.count == 1, let filename = g.operands.first else {
        return CLI.usageError("Expecting one image file name")
    }
    return CLI.exitStatus {
        switch action {
        case .none: try SnapshotOperation.touch(filename, options: options)
        case .list:
            let list = try SnapshotOperation.list(filename, options: options)
            if !list.isEmpty {
                CLI.out.write("Snapshot list:\n" + SnapshotTable.header + "\n")
                for s in list { CLI.out.write(bytes: snapshotRow(s)) }
            }
        case .create(let n): try SnapshotOperation.create(filename, snapshot: n, options: options)
        case .apply(let n): try SnapshotOperation.apply(filename, snapshot: n, options: options)
        case .delete(let n): try SnapshotOperation.delete(filename, snapshot: n, options: options)
        }
    }
}

/// One line of `snapshot -l`: qemu prints the name's bytes as stored, padded to 16 bytes, whether or not they
/// are UTF-8.
func snapshotRow(_ s: SnapshotInfo) -> [UInt8] {
    if Array(s.name.utf8) == s.nameBytes { return Array((SnapshotTable.row(s) + "\n").utf8) }
    var blank = s
    blank.name = ""
    blank.nameBytes = []
    let idPart = s.id.utf8.count >= 9 ? s.id + " " : s.id + String(repeating: " ", count: 9 - s.id.utf8.count) + " "
    let rest = Array(SnapshotTable.row(blank).utf8).dropFirst(idPart.utf8.count + 17)
    return Array(idPart.utf8) + s.nameBytes + [UInt8](repeating: 0x20, count: max(0, 16 - s.nameBytes.count))
        + [0x20] + rest + [0x0a]
}
