/// A write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks) keyed by host offset, as
/// qemu's qcow2-cache.c: tables are changed in memory, marked dirty, and written back on flush or when the
/// cache is trimmed. The writer decides the order in which the two caches reach the disk.
final class Qcow2WriteCache<Table> {
    final class Entry {
        var table: Table
        var dirty = false
        var stamp: UInt64 = 0
        init(table: Table) { self.table = table }
    }

    private(set) var entries: [UInt64: Entry] = [:]
    private var clock: UInt64 = 0
    /// The entry the last lookup returned: walks over a table's clusters hit the same refcount block or L2
    /// table again and again, and skip the dictionary then.
    private var lastOffset = UInt64.max
    private var lastEntry: Entry?
    let capacity: Int
    private let entryBytes: Int
    private let what: String

    /// Each entry loaded while the cache holds fewer than `capacity` reserves `entryBytes` of the call's memory
    /// budget for `what` (past it, trimming gives the room back).
    init(capacity: Int, entryBytes: Int = 0, what: String = "a table cache") {
        self.capacity = max(4, capacity)
        self.entryBytes = entryBytes
        self.what = what
    }

    /// The entry at `offset`, loaded with `load` on a miss. Entries are never evicted here: callers hold them
    /// across an operation, so eviction happens only in `trim`, between operations.
    func entry(at offset: UInt64, load: () throws -> Table) throws -> Entry {
        clock &+= 1
        if offset == lastOffset, let hit = lastEntry {
            hit.stamp = clock
            return hit
        }
        if let hit = entries[offset] {
            hit.stamp = clock
            lastOffset = offset
            lastEntry = hit
            return hit
        }
        if entries.count < capacity { try CallBudget.reserve(entryBytes, what: what) }
        let e = Entry(table: try load())
        e.stamp = clock
        entries[offset] = e
        lastOffset = offset
        lastEntry = e
        return e
    }

    /// Puts a table that is already on disk (a new, just written table) into the cache.
    func insert(_ table: Table, at offset: UInt64, dirty: Bool = false) -> Entry {
        clock &+= 1
        let e = Entry(table: table)
        e.stamp = clock
        e.dirty = dirty
        entries[offset] = e
        lastOffset = offset
        lastEntry = e
        return e
    }

    func markDirty(_ e: Entry) { e.dirty = true }

    var hasDirty: Bool { entries.values.contains { $0.dirty } }

    /// Dirty entries by ascending offset (sequential writes back to back).
    func dirtyEntries() -> [(UInt64, Entry)] {
        entries.filter { $0.value.dirty }.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    /// True when the cache holds more than its capacity and would like to drop entries.
    var overCapacity: Bool { entries.count > capacity }

    /// Drops least recently used clean entries until the cache is within capacity (callers write dirty
    /// entries back first).
    func trim() {
        guard entries.count > capacity else { return }
        lastOffset = .max
        lastEntry = nil
        let clean = entries.filter { !$0.value.dirty }.sorted { $0.value.stamp < $1.value.stamp }
        var excess = entries.count - capacity
        for (k, _) in clean where excess > 0 {
            entries.removeValue(forKey: k)
            excess -= 1
        }
    }

    func remove(at offset: UInt64) {
        entries.removeValue(forKey: offset)
        if offset == lastOffset {
            lastOffset = .max
            lastEntry = nil
        }
    }
}
