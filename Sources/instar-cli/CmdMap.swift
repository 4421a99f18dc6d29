import Glibc
import Instar

/// `map`: not implemented yet.
func mapCommand(_ args: [String]) -> Int32 {
    CLI.error("map: not implemented yet")
    return 1
}
