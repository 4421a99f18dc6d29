import Glibc

/// Memory a writer lends to the protocol backends below it, so a write-behind backend (NBD's, RBD's) keeps
/// the caller's bytes until its request is over instead of copying them (the copy was a fifth of the CPU of a
/// convert into NBD).
///
/// The writer marks a buffer as lent around its write calls (`WriteLoan.lending`); nothing above the protocol
/// changes: format drivers pass pointers as before, and a backend that keeps bytes past the call asks
/// `WriteLoan.borrow` whether they lie inside the buffer lent on this thread. If they do, it keeps the pointer
/// and the buffer (which stays allocated while referenced) and calls `giveBack()` once the request is over;
/// otherwise it copies. The lender does not refill a buffer while it is borrowed (`LendingPool`).
final class LendableBuffer {
    let memory: UnsafeMutableRawBufferPointer
    /// The pool's lock: guards `borrowers` and `held`, broadcast when a buffer comes free.
    fileprivate let monitor: ConditionLock
    fileprivate var borrowers = 0
    /// The lender is using it (a chunk slot holds it).
    fileprivate var held = false

    fileprivate init(bytes: Int, alignment: Int, monitor: ConditionLock) {
        memory = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes, 1), alignment: alignment)
        self.monitor = monitor
    }

    deinit { memory.deallocate() }

    /// A borrower is done with the bytes (its request finished, failed, or never started).
    func giveBack() {
        monitor.lock()
        borrowers -= 1
        if borrowers == 0 { monitor.broadcast() }
        monitor.unlock()
    }
}

/// The lender's buffers: `take()` gives one nobody uses or borrows, allocating up to `limit` of them, and waits
/// for a borrower to give one back beyond that (backpressure on the backends' write-behind).
final class LendingPool {
    let bytes: Int
    let alignment: Int
    let limit: Int
    private let monitor = ConditionLock()
    private var buffers: [LendableBuffer] = []

    init(bytes: Int, alignment: Int, limit: Int) {
        self.bytes = bytes
        self.alignment = alignment
        self.limit = max(1, limit)
    }

    func take() -> LendableBuffer {
        monitor.lock()
        defer { monitor.unlock() }
        while true {
            if let b = buffers.first(where: { !$0.held && $0.borrowers == 0 }) {
                b.held = true
                return b
            }
            if buffers.count < limit {
                let b = LendableBuffer(bytes: bytes, alignment: alignment, monitor: monitor)
                b.held = true
                buffers.append(b)
                return b
            }
            monitor.wait()
        }
    }

    /// The lender is done with `b` (borrowers may still hold it).
    func put(_ b: LendableBuffer) {
        monitor.lock()
        b.held = false
        monitor.broadcast()
        monitor.unlock()
    }
}

enum WriteLoan {
    private static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k, nil)
        return k
    }()

    /// Runs `body` with `buffer` lent to the backends its writes reach on this thread.
    static func lending<T>(_ buffer: LendableBuffer?, _ body: () throws -> T) rethrows -> T {
        guard let buffer else { return try body() }
        let previous = pthread_getspecific(key)
        pthread_setspecific(key, Unmanaged.passUnretained(buffer).toOpaque())
        defer { pthread_setspecific(key, previous) }
        return try body()
    }

    /// The buffer lent on this thread when `bytes` lie wholly inside it, borrowed once (the caller keeps it and
    /// calls `giveBack()` when done); nil when nothing is lent or the bytes are elsewhere (copy them).
    static func borrow(_ bytes: UnsafeRawBufferPointer) -> LendableBuffer? {
        guard let raw = pthread_getspecific(key), let start = bytes.baseAddress else { return nil }
        let b = Unmanaged<LendableBuffer>.fromOpaque(raw).takeUnretainedValue()
        guard let base = b.memory.baseAddress else { return nil }
        let lo = UInt(bitPattern: base), hi = lo + UInt(b.memory.count)
        let s = UInt(bitPattern: start)
        guard s >= lo, s <= hi, UInt(bytes.count) <= hi - s else { return nil }
        b.monitor.lock()
        b.borrowers += 1
        b.monitor.unlock()
        return b
    }
}
