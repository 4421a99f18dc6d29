import Glibc

/// convert's read side on a thread of its own: the block-status iterator and the source reads run ahead of the
/// writer into a small ring of aligned chunk buffers, so reading the next chunks overlaps writing the current
/// one (qemu overlaps them with its coroutines). The writer still takes the chunks strictly in guest order, one
/// at a time, so the sequence of target writes — and with it a qcow2 target's layout — is the same as a
/// sequential loop's. A failed block-status query or read is handed over in the chunk where it happened and the
/// reader stops there; the writer throws it when it gets that far, after writing everything before it.
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
    /// Guards `produced`, `consumed` and `stopping`; broadcast whenever one of them moves.
    private let monitor = ConditionLock()
    private var produced = 0
    private var consumed = 0
    private var stopping = false
    /// Where the reader continues (reader side only).
    private var nextSector: UInt64 = 0
    private var thread: pthread_t?

    /// `depth` chunk buffers of `bufSectors` sectors each, allocated once.
    init(iterator: ConvertOperation.Iterator, sources: [ImageLayer], sourceSectors: [UInt64], totalSectors: UInt64,
         bufSectors: UInt64, minSparse: UInt64, depth: Int) {
        self.iterator = iterator
        self.sources = sources
        self.sourceSectors = sourceSectors
        self.totalSectors = totalSectors
        self.bufSectors = bufSectors
        self.minSparse = minSparse
        self.depth = max(2, depth)
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
    }

    /// Starts the reader thread; without one (pthread_create failed) `next()` reads each chunk itself.
    func start() {
        let me = Unmanaged.passRetained(self).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            guard let arg else { return nil }
            Unmanaged<ChunkReader>.fromOpaque(arg).takeRetainedValue().run()
            return nil
        }, me)
        if rc == 0 {
            thread = tid
        } else {
            Unmanaged<ChunkReader>.fromOpaque(me).release()
        }
    }

    /// Stops the reader (it finishes the read in progress) and waits for it. Safe to call more than once.
    func stop() {
        guard let tid = thread else { return }
        monitor.lock()
        stopping = true
        monitor.broadcast()
        monitor.unlock()
        pthread_join(tid, nil)
        thread = nil
    }

    /// The next chunk in guest order, waiting for the reader when it has not got there yet. The writer must
    /// call `release()` before asking for the one after.
    func next() -> UnsafeMutablePointer<Chunk> {
        let slot = chunks + (consumed % depth)
        if thread == nil {
            produce(into: slot)
            return slot
        }
        monitor.lock()
        while produced == consumed { monitor.wait() }
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
        monitor.broadcast()
        monitor.unlock()
    }

    /// The reader thread: fills free slots in order until the end, an error, or `stop()`.
    private func run() {
        CallBudget.run(budget) { runLoop() }
    }

    private func runLoop() {
        while true {
            monitor.lock()
            while produced - consumed == depth && !stopping { monitor.wait() }
            let quit = stopping || nextSector >= totalSectors
            let slot = chunks + (produced % depth)
            monitor.unlock()
            if quit { return }
            let ok = produce(into: slot)
            monitor.lock()
            produced += 1
            monitor.broadcast()
            monitor.unlock()
            if !ok { return }
        }
    }

    /// One step of the sequential loop's read side (convert_iteration_sectors and convert_co_read) into `slot`;
    /// false when it failed and nothing after it may be read.
    @discardableResult
    private func produce(into slot: UnsafeMutablePointer<Chunk>) -> Bool {
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
            return false
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
        let chunk = UnsafeMutableRawBufferPointer(
            rebasing: slot.pointee.buffer[0..<Int(min(n, bufSectors) * ConvertOperation.sectorSize)])
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
                return false
            }
            slot.pointee.offloadBytes = plain.bytes - plain.bytes % ConvertOperation.sectorSize
            if slot.pointee.offloadBytes < UInt64(chunk.count) {
                // qemu copies what it can, then falls back to reading for this chunk and the ones after those
                // already taken.
                if offloadUntil == nil { offloadUntil = max(coroutines - 1, index + coroutines - 2) }
            } else if kernelCopy {
                slot.pointee.unread = true
                slot.pointee.pieces = plain.pieces
                return true
            }
        }
        if status == .data {
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
            if slot.pointee.readError != nil {
                nextSector = totalSectors
                return false
            }
            if minSparse > 0, let base = chunk.baseAddress {
                let size = Int(ConvertOperation.sectorSize)
                var at = 0
                while at < chunk.count && !ConvertOperation.isZero(UnsafeRawPointer(base + at), size) { at += size }
                slot.pointee.noZeroSector = at >= chunk.count
            }
        } else if minSparse == 0 && status == .zero {
            chunk.initializeMemory(as: UInt8.self, repeating: 0)
        }
        return true
    }
}
