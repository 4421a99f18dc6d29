import Glibc
import Instar

func amendCommand(_ args: [String]) -> Int32 {
    CLI.error("amend: not implemented yet")
    return 1
}
