import CRbd
import Glibc

/// Write-behind for an open RBD image: writes, zero writes and discards go to librbd as AIO requests and the
/// call returns once the request is queued (the data copied, or borrowed when the caller lends its buffer:
/// `WriteLoan`), so many requests are in flight at once as in
/// qemu's rbd driver, where a single-threaded writer (convert's) would otherwise wait out one round trip per
/// chunk.
///
/// - At most `maxRequests` requests and `maxBytes` bytes of copied data are in flight; a new request waits.
/// - A request overlapping one in flight waits for it, so overlapping writes land in call order.
/// - Reads, block status, resizes, flushes and close first wait for the requests they could observe.
/// - The first failed completion is kept and thrown by every later call (and by `finishWrites`), so no error is lost.
final class RbdWriteBehind {
    static let maxRequests = 32
    static let maxBytes = 64 << 20

    /// One request in flight: its range, its copied data (freed on completion), and the queue to report to.
    final class Request {
        let queue: RbdWriteBehind
        let id: Int
        let data: UnsafeMutableRawPointer?
        let bytes: Int
        let what: String
        /// The caller's buffer `data` points into (not a copy), given back on completion.
        let loan: LendableBuffer?
        init(queue: RbdWriteBehind, id: Int, data: UnsafeMutableRawPointer?, bytes: Int, what: String,
             loan: LendableBuffer? = nil) {
            self.queue = queue
            self.id = id
            self.data = data
            self.bytes = bytes
            self.what = what
            self.loan = loan
        }
    }

    let name: String
    private let monitor = ConditionLock()
    /// Requests in flight by id: (start, end) in bytes. Guarded by `monitor`.
    private var ranges: [Int: (UInt64, UInt64)] = [:]
    private var bytesInFlight = 0
    private var nextID = 0
    private var failure: InstarError?
    /// Data buffers of finished requests (pointer, capacity), kept for the next requests: a fresh multi-MiB
    /// malloc per request costs page faults (and an arena trim when librbd's thread frees it). At most
    /// `maxRequests` buffers and `maxBytes` bytes are kept.
    private var spare: [(UnsafeMutableRawPointer, Int)] = []
    private var spareBytes = 0

    init(name: String) {
        self.name = name
    }

    deinit {
        for (p, _) in spare { free(p) }
    }

    private func overlaps(_ start: UInt64, _ end: UInt64) -> Bool {
        ranges.values.contains { $0.0 < end && start < $0.1 }
    }

    /// Throws the first failure seen so far.
    func check() throws {
        monitor.lock()
        defer { monitor.unlock() }
        if let f = failure { throw f }
    }

    /// Waits until no request in flight overlaps [start, end) (everything when `end` is nil), then throws the
    /// first failure seen, if any.
    func wait(from start: UInt64 = 0, to end: UInt64? = nil) throws {
        monitor.lock()
        defer { monitor.unlock() }
        if let end {
            while overlaps(start, end) { monitor.wait() }
        } else {
            while !ranges.isEmpty { monitor.wait() }
        }
        if let f = failure { throw f }
    }

    /// Waits for room for a request on [start, end) carrying `bytes` of data and registers it; throws the first
    /// failure seen instead of queueing more.
    private func admit(_ start: UInt64, _ end: UInt64, bytes: Int) throws -> Int {
        monitor.lock()
        defer { monitor.unlock() }
        while failure == nil && (ranges.count >= RbdWriteBehind.maxRequests
                                 || (bytes > 0 && bytesInFlight > 0 && bytesInFlight + bytes > RbdWriteBehind.maxBytes)
                                 || overlaps(start, end)) {
            monitor.wait()
        }
        if let f = failure { throw f }
        let id = nextID
        nextID &+= 1
        ranges[id] = (start, end)
        bytesInFlight += bytes
        return id
    }

    /// A request is over (librbd's callback thread, or a submission that failed): records the first failure.
    fileprivate func finish(_ req: Request, result: Int) {
        monitor.lock()
        if let loan = req.loan {
            loan.giveBack()
        } else if let d = req.data {
            if spare.count < RbdWriteBehind.maxRequests && spareBytes + req.bytes <= RbdWriteBehind.maxBytes {
                spare.append((d, req.bytes))
                spareBytes += req.bytes
            } else {
                free(d)
            }
        }
        ranges[req.id] = nil
        bytesInFlight -= req.bytes
        if result < 0 && failure == nil {
            failure = InstarError.system(Int32(truncatingIfNeeded: -result), "error \(req.what) \(name)")
        }
        monitor.broadcast()
        monitor.unlock()
    }

    /// A buffer of exactly `bytes` (a request's `bytes` is what `finish` keeps it as): a spare one of that size,
    /// else a new one.
    private func takeBuffer(_ bytes: Int) -> UnsafeMutableRawPointer? {
        monitor.lock()
        if let i = spare.firstIndex(where: { $0.1 == bytes }) {
            let p = spare.remove(at: i).0
            spareBytes -= bytes
            monitor.unlock()
            return p
        }
        monitor.unlock()
        return malloc(bytes)
    }

    /// Queues one request on [offset, offset + length): `data` (copied here) for a write, none for zeroes and
    /// discards; `submit` starts it on librbd with the completion and the data's copy.
    func queue(offset: UInt64, length: UInt64, data: UnsafeRawBufferPointer?, what: String,
               submit: (rbd_completion_t?, UnsafeMutablePointer<CChar>?) -> Int32) throws {
        let end = try offset.adding(length)
        let bytes = data?.count ?? 0
        let id = try admit(offset, end, bytes: bytes)
        var copy: UnsafeMutableRawPointer?
        var loan: LendableBuffer?
        if let data, let src = data.baseAddress, bytes > 0, let lent = WriteLoan.borrow(data) {
            loan = lent
            copy = UnsafeMutableRawPointer(mutating: src)
        } else if let data, let src = data.baseAddress, bytes > 0 {
            guard let p = takeBuffer(bytes) else {
                finish(Request(queue: self, id: id, data: nil, bytes: bytes, what: what), result: Int(-ENOMEM))
                try check()
                return
            }
            memcpy(p, src, bytes)
            copy = p
        }
        let req = Request(queue: self, id: id, data: copy, bytes: bytes, what: what, loan: loan)
        let arg = Unmanaged.passRetained(req).toOpaque()
        var completion: rbd_completion_t?
        var r = rbd_aio_create_completion(arg, { c, arg in
            guard let arg else { return }
            let req = Unmanaged<Request>.fromOpaque(arg).takeRetainedValue()
            let result = rbd_aio_get_return_value(c)
            rbd_aio_release(c)
            req.queue.finish(req, result: result)
        }, &completion)
        if r >= 0 {
            r = submit(completion, copy?.assumingMemoryBound(to: CChar.self))
            if r < 0 { rbd_aio_release(completion) }
        }
        if r < 0 {
            // Never started: no callback comes, so the request is over here.
            Unmanaged<Request>.fromOpaque(arg).release()
            finish(req, result: Int(r))
            try check()
        }
    }
}
