import Glibc
import Instar

/// `compare`: not implemented yet.
func compareCommand(_ args: [String]) -> Int32 {
    CLI.error("compare: not implemented yet")
    return 1
}
