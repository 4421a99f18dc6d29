import Glibc

/// Test hook for crash-safety tests: when the environment variable `INSTAR_CRASH_AT` names a point an operation
/// passes, the process kills itself there with SIGKILL (no cleanup, no flush), as a power cut or `kill -9` would.
/// Points are named "<operation>:<step>"; unset (the normal case) costs one getenv per point.
enum CrashPoint {
    static func hit(_ name: String) {
        guard let raw = getenv("INSTAR_CRASH_AT") else { return }
        if String(cString: raw) == name { raise(SIGKILL) }
    }
}
