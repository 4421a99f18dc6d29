import Glibc
import Instar

/// `info`: not implemented yet.
func infoCommand(_ args: [String]) -> Int32 {
    CLI.error("info: not implemented yet")
    return 1
}
