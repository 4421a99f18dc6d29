import CInstar

/// A counter several threads bump and read: a heap word changed through C's atomic builtins (the standard
/// library has no atomics this package may use, and a stored property's address is not stable).
final class AtomicCounter {
    private let word: UnsafeMutablePointer<UInt64>

    init(_ value: UInt64 = 0) {
        word = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        word.initialize(to: value)
    }

    deinit { word.deallocate() }

    func increment() { instar_atomic_add_u64(word, 1) }
    var value: UInt64 { instar_atomic_load_u64(word) }
    func store(_ value: UInt64) { instar_atomic_store_u64(word, value) }
    /// Stores `value` and returns what was there.
    func exchange(_ value: UInt64) -> UInt64 { instar_atomic_exchange_u64(word, value) }
}
