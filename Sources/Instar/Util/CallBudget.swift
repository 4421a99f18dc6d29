import Glibc

/// Per-call limits on time: a wall-clock deadline for the whole call and a CPU-time allowance for each thread
/// working for it. A call of the C API installs one on its thread for its duration (the options struct's
/// `limits`); the I/O layer and the operations' loops call `CallBudget.checkpoint()`, which throws `.limit` once
/// a limit is passed. Checkpoints sit where stopping leaves an image as a crash at that point would (before a
/// read, between the steps of an operation), never inside a metadata update.
public final class CallBudget: @unchecked Sendable {
    /// CLOCK_MONOTONIC nanoseconds after which the call fails, or nil.
    let deadline: UInt64?
    let timeoutMs: Int64
    /// CPU nanoseconds each thread may use, or nil.
    let cpuAllowance: UInt64?
    let cpuMs: Int64

    /// `timeoutMs` and `cpuMs` at or below 0 mean no limit. Nil when neither limits anything.
    public static func make(timeoutMs: Int64, cpuMs: Int64) -> CallBudget? {
        if timeoutMs <= 0 && cpuMs <= 0 { return nil }
        return CallBudget(timeoutMs: timeoutMs, cpuMs: cpuMs)
    }

    private init(timeoutMs: Int64, cpuMs: Int64) {
        self.timeoutMs = timeoutMs
        self.cpuMs = cpuMs
        let ms: UInt64 = 1_000_000
        if timeoutMs > 0 {
            let span = UInt64(timeoutMs).multipliedReportingOverflow(by: ms)
            let end = CallBudget.now(CLOCK_MONOTONIC).addingReportingOverflow(span.partialValue)
            deadline = span.overflow || end.overflow ? UInt64.max : end.partialValue
        } else {
            deadline = nil
        }
        cpuAllowance = cpuMs > 0 ? UInt64(cpuMs).multipliedReportingOverflow(by: ms).partialValue : nil
    }

    static func now(_ clock: clockid_t) -> UInt64 {
        var ts = timespec()
        clock_gettime(clock, &ts)
        return UInt64(max(0, ts.tv_sec)) &* 1_000_000_000 &+ UInt64(max(0, ts.tv_nsec))
    }

    /// What one thread runs under: the budget and the thread's CPU time when it started working for the call.
    final class Installation {
        let budget: CallBudget
        let cpuStart: UInt64
        /// Set once a checkpoint threw: the rest of the call (closing images, flushing caches) runs unhindered,
        /// so stopping never leaves an update half done.
        var fired = false
        init(_ budget: CallBudget) {
            self.budget = budget
            cpuStart = CallBudget.now(CLOCK_THREAD_CPUTIME_ID)
        }
    }

    private static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k, nil)
        return k
    }()

    /// The installation of the current thread (retained by whoever installed it).
    static var currentInstallation: Installation? {
        guard let p = pthread_getspecific(key) else { return nil }
        return Unmanaged<Installation>.fromOpaque(p).takeUnretainedValue()
    }

    /// The budget the current thread works under, to hand to worker threads (`run(_:_:)` on each).
    public static var current: CallBudget? { currentInstallation?.budget }

    /// Runs `body` with `budget` installed on this thread (nil: no limits), restoring what was installed before.
    public static func run<T>(_ budget: CallBudget?, _ body: () throws -> T) rethrows -> T {
        let previous = pthread_getspecific(key)
        let installation = budget.map { Installation($0) }
        pthread_setspecific(key, installation.map { Unmanaged.passUnretained($0).toOpaque() })
        defer {
            pthread_setspecific(key, previous)
            withExtendedLifetime(installation) {}
        }
        return try body()
    }

    /// The C API call in progress on this thread: the installation it started with, to return to at its end.
    private final class CallScope {
        let base: UnsafeMutableRawPointer?
        init(base: UnsafeMutableRawPointer?) { self.base = base }
    }

    private static let scopeKey: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k, nil)
        return k
    }()

    /// Runs one C API call: a budget installed during it with `installForCall` is removed when it returns.
    static func callScope<T>(_ body: () throws -> T) rethrows -> T {
        let saved = pthread_getspecific(key)
        let outer = pthread_getspecific(scopeKey)
        let scope = CallScope(base: saved)
        pthread_setspecific(scopeKey, Unmanaged.passUnretained(scope).toOpaque())
        defer {
            if let cur = pthread_getspecific(key), cur != saved { Unmanaged<Installation>.fromOpaque(cur).release() }
            pthread_setspecific(key, saved)
            pthread_setspecific(scopeKey, outer)
            withExtendedLifetime(scope) {}
        }
        return try body()
    }

    /// Installs `budget` on this thread until the end of the C API call in progress (none: nothing happens).
    static func installForCall(_ budget: CallBudget?) {
        guard let budget, let sp = pthread_getspecific(scopeKey) else { return }
        let scope = Unmanaged<CallScope>.fromOpaque(sp).takeUnretainedValue()
        if let cur = pthread_getspecific(key), cur != scope.base { Unmanaged<Installation>.fromOpaque(cur).release() }
        pthread_setspecific(key, Unmanaged.passRetained(Installation(budget)).toOpaque())
    }

    /// Throws `.limit` when the current thread's budget is spent; free when no budget is installed.
    public static func checkpoint() throws {
        guard let p = pthread_getspecific(key) else { return }
        let inst = Unmanaged<Installation>.fromOpaque(p).takeUnretainedValue()
        if inst.fired { return }
        do {
            try inst.budget.check(cpuStart: inst.cpuStart)
        } catch {
            inst.fired = true
            throw error
        }
    }

    func check(cpuStart: UInt64) throws {
        if let deadline, CallBudget.now(CLOCK_MONOTONIC) >= deadline {
            throw InstarError(.limit, "Operation stopped: its time limit of \(timeoutMs) ms is reached")
        }
        if let cpuAllowance, CallBudget.now(CLOCK_THREAD_CPUTIME_ID) &- cpuStart >= cpuAllowance {
            throw InstarError(.limit, "Operation stopped: its CPU time limit of \(cpuMs) ms is reached")
        }
    }
}
