import Glibc

/// convert's read side on a thread of its own: the block-status iterator and the source reads run ahead of the
/// writer into a small ring of aligned chunk buffers, so reading the next chunks overlaps writing the current
/// one (qemu overlaps them with its coroutines). The writer still takes the chunks strictly in guest order, one
/// at a time, so the sequence of target writes — and with it a qcow2 target's layout — is the same as a
/// sequential loop's. A failed block-status query is handed over in the chunk where it happened and the reader
/// stops there; the writer throws it when it gets that far, after writing everything before it. A failed read
/// is handed over the same way; with worker threads, the reader goes on to the end of qemu's coroutine window
/// (the chunks its other coroutines hold when one fails, `coroutines` in all) and each of those reads that fails
/// is reported too (`readErrors(after:)`), as each of qemu's coroutines prints its own.
///
/// Over a network (`ConcurrentGuestIO.readsInFlight` above 1: RBD, NBD) one read at a time waits a round trip
/// each; there the reader thread only walks the block status and hands each data chunk's read (and its zero
/// scan) to one of `readers` worker threads, as qemu's coroutines keep several reads going. The chunks still
/// reach the writer in guest order: it waits for the next one's read, whatever finished after it.
final class ChunkReader {
    /// One chunk as the writer sees it.
    struct Chunk {
        var sector: UInt64 = 0
        /// Sectors this step covers (may exceed the buffer for holes and backing ranges).
        var count: UInt64 = 0
        /// The iterator's classification (before -S 0 turns zero into data).
        var status: ConvertOperation.Status = .data
        /// The block-status query failed: nothing else in the chunk is valid.
        var statusError: Error?
        /// The read failed (reported after the progress step, as the sequential loop did).
        var readError: Error?
        /// Data read with -S on and no all-zero sector in it: the writer can skip its zero scan (the scan would find
        /// one allocated run covering the chunk). Worked out here so the writer thread only writes.
        var noZeroSector = false
        /// The bytes read (or zeroed for -S 0): the first min(count, bufSectors) sectors of the slot's buffer.
        var buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
        /// The pool buffer `buffer` lies in, which the writer lends to the backends (WriteLoan).
        var owner: LendableBuffer?
        /// -C: the leading bytes of a data chunk that qemu's copy offload would copy (stored plainly in the
        /// sources, so written unchanged, without looking for zeroes); 0 when the chunk is not offloaded.
        var offloadBytes: UInt64 = 0
        /// -C: the whole chunk is offloadable and was not read; `pieces` says where its bytes are in the
        /// sources' host files, in guest order.
        var unread = false
        var pieces: [ConvertOperation.HostPiece] = []
        /// --salvage: qemu's warnings for the sectors that failed to read (and were zeroed), in order.
        var warnings: [String] = []
    }

    /// -C as qemu-img's copy_range flag: on until a chunk cannot be offloaded (reader side only).
    var offload = false
    /// -m: qemu's coroutines. When chunk k cannot be offloaded, the chunks its peers had already taken (up to
    /// k + m - 2, and all of the first m, which qemu's coroutines take before any I/O completes) were decided
    /// with copy offloading still on; the rest go through reads.
    var coroutines = 8
    private var chunkIndex = 0
    private var offloadUntil: Int?
    /// -C into a target whose guest bytes are a plain host file: wholly offloadable chunks are not read, the
    /// writer has the kernel copy them.
    var kernelCopy = false
    /// --salvage: failed reads are retried sector by sector; sectors that still fail read as zeroes.
    var salvage = false

    private var iterator: ConvertOperation.Iterator
    /// The limits of the call that made this reader; its thread works under them too.
    private let budget = CallBudget.current
    private let sources: [ImageLayer]
    private let sourceSectors: [UInt64]
    private let totalSectors: UInt64
    private let bufSectors: UInt64
    private let minSparse: UInt64
    private let depth: Int
    /// The chunk buffers: a slot takes a fresh one for each chunk, so buffers a write-behind backend still
    /// borrows are left alone (beyond the slots, at most about 64 MiB of them: what NBD's and RBD's write-behind
    /// keep in flight).
    private let pool: LendingPool
    private let chunks: UnsafeMutablePointer<Chunk>
    /// Guards `produced`, `consumed`, `stopping` and the workers' state. Each kind of thread sleeps on a
    /// condition of its own, so a change wakes only who waits for it (not eight idle workers each time).
    private let monitor: ConditionLock
    /// The writer waits here for its next chunk (and `readErrors` for the window's reads).
    private let toWriter: LockCondition
    /// The reader thread waits here for a free slot.
    private let toReader: LockCondition
    /// Workers wait here for jobs.
    private let toWorkers: LockCondition
    private var produced = 0
    private var consumed = 0
    private var stopping = false
    /// Where the reader continues (reader side only).
    private var nextSector: UInt64 = 0
    private var thread: pthread_t?
    /// Worker threads for the reads (none: the reader thread reads each chunk itself).
    private let readers: Int
    private var workers: [pthread_t] = []
    /// Per slot: its chunk is complete (read, or needing no read). Guarded by `monitor`.
    private let ready: UnsafeMutablePointer<Bool>
    /// Chunks (by their number, `produced` counting) whose read a worker has still to do, in guest order.
    /// Guarded by `monitor`.
    private var jobs: [Int] = []
    private var jobsTaken = 0
    /// The number of the first chunk whose read failed: the reader stops at the end of its window. Guarded by
    /// `monitor`.
    private var failedAt: Int?
    /// The reader thread is done: no more jobs come. Guarded by `monitor`.
    private var dispatchDone = false

    /// `depth` chunk buffers of `bufSectors` sectors each, allocated once.
    init(iterator: ConvertOperation.Iterator, sources: [ImageLayer], sourceSectors: [UInt64], totalSectors: UInt64,
         bufSectors: UInt64, minSparse: UInt64, depth: Int, readers: Int = 1) {
        let monitor = ConditionLock()
        self.monitor = monitor
        toWriter = LockCondition(monitor)
        toReader = LockCondition(monitor)
        toWorkers = LockCondition(monitor)
        self.iterator = iterator
        self.sources = sources
        self.sourceSectors = sourceSectors
        self.totalSectors = totalSectors
        self.bufSectors = bufSectors
        self.minSparse = minSparse
        self.readers = max(1, min(readers, 16))
        // Room for every worker's chunk, the writer's, and one the reader is setting up.
        self.depth = max(2, depth, self.readers + 2)
        ready = UnsafeMutablePointer<Bool>.allocate(capacity: self.depth)
        ready.initialize(repeating: false, count: self.depth)
        let bytes = Int(bufSectors * ConvertOperation.sectorSize)
        pool = LendingPool(bytes: bytes, alignment: HostFile.directAlignment,
                           limit: self.depth + max(2, (64 << 20) / max(bytes, 1)))
        chunks = UnsafeMutablePointer<Chunk>.allocate(capacity: self.depth)
        for i in 0..<self.depth {
            (chunks + i).initialize(to: Chunk())
        }
    }

    deinit {
        // The writer stops the reader before letting go of it; the reader's own last reference is dropped on
        // its thread, which must not wait for itself.
        if let tid = thread {
            if pthread_equal(tid, pthread_self()) != 0 { pthread_detach(tid) } else { stop() }
        }
        chunks.deinitialize(count: depth)
        chunks.deallocate()
        ready.deallocate()
    }

    /// Starts the reader thread (and the workers, with `readers` above 1); without it (pthread_create failed)
    /// `next()` reads each chunk itself. With fewer workers than asked for, those there are share the reads;
    /// with none, the reader thread reads.
    func start() {
        if readers > 1 {
            for _ in 0..<readers {
                guard let tid = spawn({ $0.work() }) else { break }
                workers.append(tid)
            }
        }
        thread = spawn({ $0.run() })
        if thread == nil { stopWorkers() }
    }

    /// A thread running `body` on this reader (which it keeps alive until it ends); nil when none could start.
    private func spawn(_ body: @escaping (ChunkReader) -> Void) -> pthread_t? {
        final class Start {
            let reader: ChunkReader
            let body: (ChunkReader) -> Void
            init(_ reader: ChunkReader, _ body: @escaping (ChunkReader) -> Void) {
                self.reader = reader
                self.body = body
            }
        }
        let start = Unmanaged.passRetained(Start(self, body)).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            guard let arg else { return nil }
            let s = Unmanaged<Start>.fromOpaque(arg).takeRetainedValue()
            s.body(s.reader)
            return nil
        }, start)
        if rc != 0 {
            Unmanaged<Start>.fromOpaque(start).release()
            return nil
        }
        return tid
    }

    /// Stops the reader and the workers (each finishes the read in progress) and waits for them. Safe to call
    /// more than once.
    func stop() {
        guard let tid = thread else { return }
        monitor.lock()
        stopping = true
        wakeAll()
        monitor.unlock()
        pthread_join(tid, nil)
        thread = nil
        stopWorkers()
    }

    private func stopWorkers() {
        monitor.lock()
        stopping = true
        wakeAll()
        monitor.unlock()
        for tid in workers {
            // A worker dropping the last reference stops the others from its own thread.
            if pthread_equal(tid, pthread_self()) != 0 { pthread_detach(tid) } else { pthread_join(tid, nil) }
        }
        workers = []
    }

    /// Every waiter, for a stop (lock held).
    private func wakeAll() {
        toWriter.broadcast()
        toReader.broadcast()
        toWorkers.broadcast()
    }

    /// The next chunk in guest order, waiting for the reader when it has not got there yet. The writer must
    /// call `release()` before asking for the one after.
    func next() -> UnsafeMutablePointer<Chunk> {
        let slot = chunks + (consumed % depth)
        if thread == nil {
            if produce(into: slot) == .needsRead && !read(slot) { nextSector = totalSectors }
            return slot
        }
        monitor.lock()
        while produced == consumed || !ready[consumed % depth] { toWriter.wait() }
        monitor.unlock()
        return slot
    }

    /// Hands the chunk from `next()` back to the reader.
    func release() {
        if thread == nil {
            consumed += 1
            return
        }
        monitor.lock()
        consumed += 1
        toReader.signal()
        monitor.unlock()
    }

    /// The reader thread: fills free slots in order until the end, an error, or `stop()`.
    private func run() {
        CallBudget.run(budget) { runLoop() }
    }

    private func runLoop() {
        defer {
            monitor.lock()
            dispatchDone = true
            toWorkers.broadcast()
            toWriter.signal()
            monitor.unlock()
        }
        let hand = !workers.isEmpty
        while true {
            monitor.lock()
            while produced - consumed == depth && !stopping && !windowClosed { toReader.wait() }
            let quit = stopping || windowClosed || nextSector >= totalSectors
            let number = produced
            let index = number % depth
            monitor.unlock()
            if quit { return }
            var step = produce(into: chunks + index)
            var readFailed = false
            if step == .needsRead && !hand {
                readFailed = !read(chunks + index)
                step = .ready
            }
            monitor.lock()
            produced += 1
            if step == .needsRead {
                ready[index] = false
                jobs.append(number)
                toWorkers.signal()
            } else {
                ready[index] = true
            }
            if readFailed && failedAt.map({ number < $0 }) ?? true { failedAt = number }
            toWriter.signal()
            monitor.unlock()
            if step == .failed { return }
        }
    }

    /// A read failed and the reader has set up every chunk of its window (lock held).
    private var windowClosed: Bool {
        guard let f = failedAt else { return false }
        return produced >= f + errorWindow
    }

    /// The chunks a failed read's error shares the report with: qemu's coroutines (at most the ring) when the
    /// reads run in parallel as theirs do; the failed chunk alone when the reader thread reads one at a time.
    private var errorWindow: Int { workers.isEmpty ? 1 : max(1, min(coroutines, depth)) }

    /// The read errors of the chunks after `chunk` (the writer's, whose read failed) in its window, in guest
    /// order, once the reads in flight there are over: what qemu's other coroutines print after the first.
    func readErrors(after chunk: UnsafeMutablePointer<Chunk>) -> [Error] {
        let first = consumed
        guard chunk == chunks + (first % depth), thread != nil, !workers.isEmpty else { return [] }
        monitor.lock()
        defer { monitor.unlock() }
        // The reader has got as far as it goes, or fills the ring (the writer holds this chunk).
        while !dispatchDone && !windowClosed && produced - consumed < depth && !stopping { toWriter.wait() }
        var errors: [Error] = []
        var number = first + 1
        while number < min(produced, first + errorWindow) {
            let index = number % depth
            while !ready[index] && !stopping { toWriter.wait() }
            if !ready[index] { break }
            if let e = chunks[index].readError { errors.append(e) }
            number += 1
        }
        return errors
    }

    /// A worker thread: reads the chunks handed to it, oldest first, until the reader is done and no job is
    /// left, or `stop()`.
    private func work() {
        CallBudget.run(budget) {
            monitor.lock()
            while true {
                while jobsTaken == jobs.count && !stopping && !dispatchDone { toWorkers.wait() }
                if stopping || jobsTaken == jobs.count { break }
                let number = jobs[jobsTaken]
                let index = number % depth
                jobsTaken += 1
                if jobsTaken == jobs.count {
                    jobs.removeAll(keepingCapacity: true)
                    jobsTaken = 0
                }
                monitor.unlock()
                let ok = read(chunks + index)
                monitor.lock()
                ready[index] = true
                if !ok && failedAt.map({ number < $0 }) ?? true {
                    failedAt = number
                    // The reader may now have its window and stop.
                    toReader.signal()
                }
                toWriter.signal()
            }
            monitor.unlock()
        }
    }

    enum Step { case ready, needsRead, failed }

    /// One step of the sequential loop's read side (convert_iteration_sectors and convert_co_read) into `slot`,
    /// but the data read itself (`read`); `.failed` when the block status failed and nothing after it may be
    /// read.
    private func produce(into slot: UnsafeMutablePointer<Chunk>) -> Step {
        let sector = nextSector
        if let old = slot.pointee.owner { pool.put(old) }
        let fresh = pool.take()
        slot.pointee.owner = fresh
        slot.pointee.buffer = fresh.memory
        slot.pointee.sector = sector
        slot.pointee.statusError = nil
        slot.pointee.readError = nil
        slot.pointee.noZeroSector = false
        slot.pointee.offloadBytes = 0
        slot.pointee.unread = false
        slot.pointee.pieces = []
        slot.pointee.warnings = []
        let index = chunkIndex
        chunkIndex += 1
        if let last = offloadUntil, index > last { offload = false }
        var n: UInt64
        do {
            n = try iterator.next(sector)
        } catch {
            slot.pointee.statusError = error
            slot.pointee.count = 0
            nextSector = totalSectors
            return .failed
        }
        let status = iterator.status
        if !iterator.warnings.isEmpty {
            slot.pointee.warnings = iterator.warnings
            iterator.warnings = []
        }
        if minSparse == 0 && status == .zero { n = min(n, bufSectors) }
        slot.pointee.count = n
        slot.pointee.status = status
        nextSector = sector + n
        let chunk = bytes(of: slot)
        if status == .data && offload {
            let plain: (bytes: UInt64, pieces: [ConvertOperation.HostPiece])
            do {
                plain = try ConvertOperation.offloadablePieces(sources, sourceSectors, sector: sector,
                                                               bytes: UInt64(chunk.count))
            } catch {
                // Only a call limit comes here (other errors end the offloadable prefix): it stops the copy.
                slot.pointee.statusError = error
                slot.pointee.count = 0
                nextSector = totalSectors
                return .failed
            }
            slot.pointee.offloadBytes = plain.bytes - plain.bytes % ConvertOperation.sectorSize
            if slot.pointee.offloadBytes < UInt64(chunk.count) {
                // qemu copies what it can, then falls back to reading for this chunk and the ones after those
                // already taken.
                if offloadUntil == nil { offloadUntil = max(coroutines - 1, index + coroutines - 2) }
            } else if kernelCopy {
                slot.pointee.unread = true
                slot.pointee.pieces = plain.pieces
                return .ready
            }
        }
        if status == .data { return .needsRead }
        if minSparse == 0 && status == .zero {
            chunk.initializeMemory(as: UInt8.self, repeating: 0)
        }
        return .ready
    }

    /// The chunk's bytes in its buffer: the first min(count, bufSectors) sectors.
    private func bytes(of slot: UnsafeMutablePointer<Chunk>) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(
            rebasing: slot.pointee.buffer[0..<Int(min(slot.pointee.count, bufSectors) * ConvertOperation.sectorSize)])
    }

    /// convert_co_read for a data chunk `produce` set up, and the zero scan of what it read; false when the read
    /// failed (the error is in the chunk). Runs on the reader thread or on a worker.
    private func read(_ slot: UnsafeMutablePointer<Chunk>) -> Bool {
        let sector = slot.pointee.sector
        let chunk = bytes(of: slot)
        do {
            if salvage {
                slot.pointee.warnings += try ConvertOperation.readSalvaging(sources, sourceSectors, sector: sector,
                                                                           into: chunk)
            } else {
                try ConvertOperation.readSources(sources, sourceSectors, sector: sector, into: chunk)
            }
        } catch let e as InstarError {
            slot.pointee.readError = StepError(.read, at: sector * ConvertOperation.sectorSize, e)
        } catch {
            slot.pointee.readError = error
        }
        if slot.pointee.readError != nil { return false }
        if minSparse > 0, let base = chunk.baseAddress {
            let size = Int(ConvertOperation.sectorSize)
            var at = 0
            while at < chunk.count && !ConvertOperation.isZero(UnsafeRawPointer(base + at), size) { at += size }
            slot.pointee.noZeroSector = at >= chunk.count
        }
        return true
    }
}
