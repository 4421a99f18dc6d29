import Glibc
import Instar

/// `convert`: not implemented yet.
func convertCommand(_ args: [String]) -> Int32 {
    CLI.error("convert: not implemented yet")
    return 1
}
