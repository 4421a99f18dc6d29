import Glibc

/// A mutex with one condition variable, kept on the heap (pthread objects must not move): the hand-offs between
/// convert's reader and writer and the completion bookkeeping of the protocols' write-behind queues.
final class ConditionLock {
    fileprivate let mutex: UnsafeMutablePointer<pthread_mutex_t>
    /// The condition `wait` and `broadcast` use; others on the same mutex come from `LockCondition(lock)`.
    private let condition: LockCondition

    init() {
        mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = LockCondition(mutex: mutex)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    /// Sleeps until a broadcast; the caller holds the lock (and holds it again on return).
    func wait() { condition.wait() }
    /// Sleeps until a broadcast or `seconds` have passed (the caller holds the lock, and holds it again on return).
    func wait(seconds: Int) { condition.wait(seconds: seconds) }
    /// Wakes every waiter; called with the lock held.
    func broadcast() { condition.broadcast() }
}

/// A condition variable of its own on a `ConditionLock`'s mutex, so threads waiting for different things under
/// one lock are woken separately (`signal` wakes one waiter, not every thread that sleeps on the lock).
final class LockCondition {
    /// The lock whose mutex this waits on, kept alive by it (nil for a `ConditionLock`'s own condition, which
    /// lives exactly as long as the lock).
    private let owner: ConditionLock?
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    convenience init(_ lock: ConditionLock) {
        self.init(mutex: lock.mutex, owner: lock)
    }

    fileprivate init(mutex: UnsafeMutablePointer<pthread_mutex_t>, owner: ConditionLock? = nil) {
        self.owner = owner
        self.mutex = mutex
        condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        condition.deallocate()
    }

    /// Sleeps until signalled; the caller holds the lock (and holds it again on return).
    func wait() { pthread_cond_wait(condition, mutex) }
    /// Sleeps until signalled or `seconds` have passed (the caller holds the lock, and holds it again on return).
    func wait(seconds: Int) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        ts.tv_sec += seconds
        pthread_cond_timedwait(condition, mutex, &ts)
    }
    /// Wakes one waiter; called with the lock held.
    func signal() { pthread_cond_signal(condition) }
    /// Wakes every waiter; called with the lock held.
    func broadcast() { pthread_cond_broadcast(condition) }
}
