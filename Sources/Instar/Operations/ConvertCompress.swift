import Glibc

/// convert -c: qemu compresses one cluster at a time on one thread; here a batch of clusters is compressed on
/// several threads at once and then stored strictly in guest order, so the image comes out exactly as qemu's
/// sequential writer lays it out (compressed streams packed one after the other, incompressible clusters
/// stored plainly, qemu's qcow2_co_pwritev_compressed_task).
final class CompressedBatch {
    let target: CompressedClusterWriting
    let clusterBytes: Int
    let threads: Int
    let capacity: Int
    private let storage: UnsafeMutableRawBufferPointer
    private var sectors: [UInt64] = []
    private var lengths: [Int] = []
    /// Per slot: the compressed bytes, nil for an incompressible cluster. Written by the worker threads, one
    /// slot each, through a raw pointer (no shared Swift collection is mutated concurrently).
    private let results: UnsafeMutablePointer<[UInt8]?>
    private let errors: UnsafeMutablePointer<Error?>
    private let compressors: [ClusterCompressor]

    init(writer: CompressedClusterWriting, clusterBytes: Int, threads: Int) {
        target = writer
        self.clusterBytes = clusterBytes
        self.threads = max(1, threads)
        // Enough clusters to keep every thread busy, at most 32 MiB in flight.
        capacity = max(self.threads, min(self.threads * 32, (32 << 20) / max(clusterBytes, 1)))
        storage = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity * clusterBytes, alignment: 4096)
        results = UnsafeMutablePointer<[UInt8]?>.allocate(capacity: capacity)
        results.initialize(repeating: nil, count: capacity)
        errors = UnsafeMutablePointer<Error?>.allocate(capacity: capacity)
        errors.initialize(repeating: nil, count: capacity)
        compressors = (0..<self.threads).map { _ in writer.makeClusterCompressor() }
    }

    deinit {
        storage.deallocate()
        results.deinitialize(count: capacity)
        results.deallocate()
        errors.deinitialize(count: capacity)
        errors.deallocate()
    }

    /// Queues one cluster (`chunk` may be short at the end of the image; it is padded with zeroes).
    func add(_ chunk: UnsafeMutableRawBufferPointer, sector: UInt64, writer: inout ConvertOperation.TargetWriter) throws {
        let slot = sectors.count
        let dst = UnsafeMutableRawBufferPointer(rebasing: storage[(slot * clusterBytes)..<((slot + 1) * clusterBytes)])
        let n = min(chunk.count, clusterBytes)
        if n > 0, let d = dst.baseAddress, let s = chunk.baseAddress { memcpy(d, s, n) }
        if n < clusterBytes {
            UnsafeMutableRawBufferPointer(rebasing: dst[n...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        sectors.append(sector)
        lengths.append(n)
        if sectors.count == capacity { try drain(&writer) }
    }

    /// Compresses everything queued in parallel and stores it in order.
    func drain(_ writer: inout ConvertOperation.TargetWriter) throws {
        let count = sectors.count
        if count == 0 { return }
        runParallel(min(threads, count)) { t, stride in
            var i = t
            while i < count {
                let len = self.target.compressesExactLength ? self.lengths[i] : self.clusterBytes
                let src = UnsafeRawBufferPointer(rebasing: self.storage[(i * self.clusterBytes)..<(i * self.clusterBytes + len)])
                do {
                    self.results[i] = try self.compressors[t].compress(src)
                } catch {
                    self.errors[i] = error
                }
                i += stride
            }
        }
        defer {
            for i in 0..<count {
                results[i] = nil
                errors[i] = nil
            }
            sectors.removeAll(keepingCapacity: true)
            lengths.removeAll(keepingCapacity: true)
        }
        for i in 0..<count {
            let offset = sectors[i] * 512
            do {
                try store(i, offset: offset, writer: &writer)
            } catch {
                throw CompressedWriteFailure(offset: offset, error: error)
            }
        }
    }

    private func store(_ i: Int, offset: UInt64, writer: inout ConvertOperation.TargetWriter) throws {
        // qcow2_co_pwritev_compressed_part: a short cluster is only accepted at the end of the image.
        if lengths[i] < clusterBytes && offset + UInt64(lengths[i]) != writer.target.virtualSize {
            throw InstarError(.invalid, "Invalid argument", errno: EINVAL)
        }
        if let e = errors[i] { throw e }
        writer.admit()
        if let bytes = results[i] {
            try target.writeCompressed(clusterIndex: offset / UInt64(clusterBytes), compressedBytes: bytes)
        } else {
            // Incompressible: qemu writes the request uncompressed (only the image's bytes of a short cluster).
            let src = UnsafeRawBufferPointer(rebasing: storage[(i * clusterBytes)..<(i * clusterBytes + lengths[i])])
            try writer.target.write(src, at: offset, backing: writer.backing)
        }
        try writer.account(UInt64(lengths[i]))
    }
}

/// A queued compressed cluster failed; `offset` is where (the error message names it).
struct CompressedWriteFailure: Error {
    let offset: UInt64
    let error: Error
}

/// A body run on a thread of its own.
private final class ThreadJob {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

/// Runs `body(t, n)` for t in 0..<n, t = 0 on the calling thread and the others on new threads, and waits for
/// all of them. Falls back to running everything on the caller when a thread cannot be started.
func runParallel(_ n: Int, _ body: @escaping (Int, Int) -> Void) {
    if n <= 1 {
        body(0, 1)
        return
    }
    var tids: [pthread_t] = []
    var fallback: [Int] = []
    let budget = CallBudget.current
    for t in 1..<n {
        let job = Unmanaged.passRetained(ThreadJob { CallBudget.run(budget) { body(t, n) } }).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            guard let arg else { return nil }
            Unmanaged<ThreadJob>.fromOpaque(arg).takeRetainedValue().body()
            return nil
        }, job)
        if rc == 0 {
            tids.append(tid)
        } else {
            Unmanaged<ThreadJob>.fromOpaque(job).release()
            fallback.append(t)
        }
    }
    body(0, n)
    for t in fallback { body(t, n) }
    for tid in tids { pthread_join(tid, nil) }
}
