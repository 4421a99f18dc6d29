import Glibc

/// Per-call limits on time and memory: a wall-clock deadline for the whole call, a CPU-time allowance for each
/// thread working for it, and a memory budget for the metadata the call's images hold (see `reserve`). A call of the C API installs one on its thread for its duration (the options struct's
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
    /// Bytes of metadata the call may hold at once, or nil.
    let memoryLimit: UInt64?
    /// Bytes reserved now (see `reserve`), under `memoryLock`: worker threads of one call share the budget.
    private var memoryReserved: UInt64 = 0
    private let memoryLock: UnsafeMutablePointer<pthread_mutex_t>

    /// `timeoutMs`, `cpuMs` and `memoryBytes` at or below 0 mean no limit. Nil when none limits anything.
    public static func make(timeoutMs: Int64, cpuMs: Int64, memoryBytes: Int64 = 0) -> CallBudget? {
        if timeoutMs <= 0 && cpuMs <= 0 && memoryBytes <= 0 { return nil }
        return CallBudget(timeoutMs: timeoutMs, cpuMs: cpuMs, memoryBytes: memoryBytes)
    }

    deinit {
        pthread_mutex_destroy(memoryLock)
        memoryLock.deallocate()
    }

    private init(timeoutMs: Int64, cpuMs: Int64, memoryBytes: Int64) {
        self.timeoutMs = timeoutMs
        self.cpuMs = cpuMs
        memoryLimit = memoryBytes > 0 ? UInt64(memoryBytes) : nil
        memoryLock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        pthread_mutex_init(memoryLock, nil)
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

    // ---- Memory ----------------------------------------------------------------------------------------------

    /// Reserves `bytes` of the current call's memory budget before allocating them: metadata an image holds
    /// (tables, caches, descriptors, bitmaps) or a buffer whose size comes from the image (decompression). Throws
    /// `.limit` naming `what` when the reservations held by the call would pass its limit; free when the call has
    /// no memory limit. A reservation counts until `release` gives it back, or else until the end of the call:
    /// the budget bounds the peak of what the call holds at once, counting metadata of images it opened and keeps
    /// open as held for the rest of the call.
    public static func reserve(_ bytes: Int, what: @autoclosure () -> String) throws {
        guard let p = pthread_getspecific(key) else { return }
        let budget = Unmanaged<Installation>.fromOpaque(p).takeUnretainedValue().budget
        try budget.reserveMemory(UInt64(max(0, bytes)), what: what)
    }

    /// `reserve` for a size computed from image values in UInt64 (a count times an entry size that may not fit).
    public static func reserve(count: UInt64, of size: Int, what: @autoclosure () -> String) throws {
        guard let p = pthread_getspecific(key) else { return }
        let budget = Unmanaged<Installation>.fromOpaque(p).takeUnretainedValue().budget
        let total = count.multipliedReportingOverflow(by: UInt64(max(0, size)))
        try budget.reserveMemory(total.overflow ? UInt64.max : total.partialValue, what: what)
    }

    /// Gives back `bytes` reserved with `reserve` by the same call once they are freed.
    public static func release(_ bytes: Int) {
        guard let p = pthread_getspecific(key) else { return }
        Unmanaged<Installation>.fromOpaque(p).takeUnretainedValue().budget.releaseMemory(UInt64(max(0, bytes)))
    }

    /// Runs `body` with `bytes` reserved for its duration (a transient buffer or table).
    public static func withReserved<T>(_ bytes: Int, what: @autoclosure () -> String, _ body: () throws -> T) throws -> T {
        try reserve(bytes, what: what())
        defer { release(bytes) }
        return try body()
    }

    func reserveMemory(_ bytes: UInt64, what: () -> String) throws {
        guard let limit = memoryLimit else { return }
        pthread_mutex_lock(memoryLock)
        let total = memoryReserved.addingReportingOverflow(bytes)
        let fits = !total.overflow && total.partialValue <= limit
        if fits { memoryReserved = total.partialValue }
        pthread_mutex_unlock(memoryLock)
        if !fits {
            throw InstarError(.limit, "Operation stopped: its memory limit of \(limit) bytes is reached "
                                + "(allocating \(what()), \(bytes) bytes)")
        }
    }

    func releaseMemory(_ bytes: UInt64) {
        guard memoryLimit != nil else { return }
        pthread_mutex_lock(memoryLock)
        memoryReserved = memoryReserved >= bytes ? memoryReserved - bytes : 0
        pthread_mutex_unlock(memoryLock)
    }
}
