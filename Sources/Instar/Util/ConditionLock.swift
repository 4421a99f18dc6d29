import Glibc

/// A mutex with one condition variable, kept on the heap (pthread objects must not move): the hand-offs between
/// convert's reader and writer and the completion bookkeeping of the protocols' write-behind queues.
final class ConditionLock {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        condition.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    /// Sleeps until a broadcast; the caller holds the lock (and holds it again on return).
    func wait() { pthread_cond_wait(condition, mutex) }
    /// Sleeps until a broadcast or `seconds` have passed (the caller holds the lock, and holds it again on return).
    func wait(seconds: Int) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        ts.tv_sec += seconds
        pthread_cond_timedwait(condition, mutex, &ts)
    }
    /// Wakes every waiter; called with the lock held.
    func broadcast() { pthread_cond_broadcast(condition) }
}
