import CNbd
import Glibc

/// The nbd protocol driver (qemu's block/nbd.c) through libnbd: reads, writes, zeroes, trims, flushes and block
/// status of one export.
///
/// Every request goes through a connection's own thread, which sends it with libnbd's aio calls and polls for the
/// replies, so many requests are in flight at once. When the server says several connections see one consistent
/// export (multi-conn) more connections are opened on demand, up to `maxConnections`, and requests go to the one
/// with the fewest outstanding.
///
/// Writes, zeroes and trims are write-behind: a write keeps the caller's buffer when the caller lends it
/// (`WriteLoan`: convert's chunk buffers, at most `borrowBytes` of them at once) or copies its bytes into a pooled
/// buffer (`slotCount` slots of `slotBytes`, allocated at the first such write), and returns once the request is
/// queued; the caller that waits is the next one that needs the result. The first write-like request waits for its reply, so a server that refuses
/// writes fails the call that wrote. Ordering: a request waits until no earlier request overlapping its range is
/// outstanding (so reads see earlier writes and overlapping writes land in order), and a flush waits for every
/// earlier request (qcow2's metadata barriers). A write-behind request that fails is remembered (the lowest
/// failed offset) and thrown, as a StepError naming that offset, from the next write, zero, trim, flush or
/// `finishWrites` after every outstanding request has finished.
final class NbdBackend: ProtocolBackend {
    /// The most connections opened to a multi-conn server: 4, but no more than the processors online (at least
    /// 2). Each connection is a thread here and at least one in the server; on 2 cores, copying 1 GiB into
    /// `nbdkit memory` took 0.77 s with 2 connections against 0.85 s with 4 (nbdcopy too keeps to one
    /// connection per core: 0.85 s, and 0.89 s with 4 threads).
    static let maxConnections: Int = {
        let online = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        return online > 0 ? min(4, max(2, online)) : 4
    }()
    /// NBD_MAX_BUFFER_SIZE: qemu's largest request when the server gives no maximum.
    static let maxBuffer: UInt64 = 32 << 20
    /// qemu's block layer never asks more than about INT_MAX bytes of a zero or trim request.
    static let maxRange: UInt64 = 1 << 30
    /// Large reads and writes go out as requests of at most this size, spread over the connections. Measured
    /// per GiB copied on 2 cores, with the 4 MiB send buffer (`widenSendBuffer`): 1 MiB requests take less CPU
    /// than nbdcopy's 256 KiB (0.5 against 0.6 s) and are faster into both servers (qemu-nbd over a file: 0.76
    /// against 0.87 s); 2 MiB ones, qemu-img's, often send qemu-nbd into seconds of kernel time as it writes its
    /// file (up to 12 s per GiB here).
    static let piece: UInt64 = 1 << 20
    /// Write-behind buffers: at most this many bytes of written data waiting for replies.
    static let behindBytes: UInt64 = 32 << 20
    /// Borrowed buffers: at most this many bytes of the caller's data waiting for replies (32 requests of 1 MiB;
    /// twice that was no faster and kept more of the caller's buffers from it).
    static let borrowBytes: UInt64 = 32 << 20

    let address: NbdAddress
    let exportSize: UInt64
    let readOnly: Bool
    let canFlush: Bool
    let canTrim: Bool
    let canZero: Bool
    /// The meta context block status reads (base:allocation, or x-dirty-bitmap's), nil when the server has none.
    let context: String?
    /// The largest read or write request (the server's maximum block size, at most NBD_MAX_BUFFER_SIZE).
    let maxRequest: UInt64
    let poolLimit: Int
    /// The size of one request of a large read or write, and of one write-behind buffer.
    let slotBytes: Int
    let slotCount: Int

    /// Guards everything below; `changed` is signalled whenever a request finishes.
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let changed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// The first connection, until the first request opens a lane on it.
    private var spare: OpaquePointer?
    private var lanes: [Lane] = []
    /// Requests queued or in flight, in submission order (for the ordering rules).
    private var outstanding: [Request] = []
    /// Write-behind requests not finished yet.
    private var behind = 0
    private var slots: UnsafeMutableRawPointer?
    private var freeSlots: [Int] = []
    /// Bytes of borrowed buffers held by write-behind requests.
    private var borrowedBytes = 0
    /// The write-behind failure with the lowest offset, thrown from the next write-like call.
    private var deferred: (offset: UInt64, error: InstarError)?
    /// A write-like request has been answered: later ones are write-behind.
    private var probed = false
    /// Written since the last flush.
    private var dirty = false
    /// finishWrites was told the cache mode never flushes (cache=unsafe): close does not flush either.
    private var skipCloseFlush = false
    private var closed = false

    init(address: NbdAddress, writable: Bool) throws {
        self.address = address
        // nbd_process_options resolves tls-creds before any attempt; open-timeout then retries the connection.
        _ = try NbdTls.credentials(address)
        let h = try NbdBackend.connect(address, until: address.openTimeout > 0
                                       ? NbdBackend.now() + Double(address.openTimeout) : nil)
        let size = nbd_get_size(h)
        guard size >= 0 else {
            let e = NbdBackend.lastError()
            nbd_close(h)
            throw e
        }
        exportSize = UInt64(size)
        readOnly = nbd_is_read_only(h) == 1
        if writable && readOnly {
            nbd_close(h)
            throw InstarError.system(EACCES, "Could not open image")
        }
        canFlush = nbd_can_flush(h) == 1
        canTrim = nbd_can_trim(h) == 1
        canZero = nbd_can_zero(h) == 1
        let wanted = address.dirtyBitmap ?? "base:allocation"
        if nbd_can_meta_context(h, wanted) == 1 {
            context = wanted
        } else if address.dirtyBitmap != nil {
            nbd_close(h)
            // qemu sets "requested x-dirty-bitmap ... not found" but its open reports only the errno.
            throw InstarError.system(EINVAL, "Could not open image")
        } else {
            context = nil
        }
        let serverMax = nbd_get_block_size(h, Int32(LIBNBD_SIZE_MAXIMUM))
        maxRequest = serverMax > 0 ? min(UInt64(serverMax), NbdBackend.maxBuffer) : NbdBackend.maxBuffer
        poolLimit = nbd_can_multi_conn(h) == 1 ? NbdBackend.maxConnections : 1
        slotBytes = Int(max(4096, min(maxRequest, NbdBackend.piece)))
        slotCount = max(2, Int(NbdBackend.behindBytes) / slotBytes)
        pthread_mutex_init(lock, nil)
        pthread_cond_init(changed, nil)
        spare = h
    }

    deinit {
        close()
        pthread_cond_destroy(changed)
        pthread_mutex_destroy(lock)
        changed.deallocate()
        lock.deallocate()
    }

    /// A new connection to the export, handshake done, base:allocation (or the bitmap) asked for.
    static func connect(_ address: NbdAddress) throws -> OpaquePointer {
        // nbd_process_options resolves tls-creds before connecting.
        let creds = try NbdTls.credentials(address)
        guard let h = nbd_create() else { throw lastError() }
        let export = address.export ?? ""
        var fd: Int32 = -1
        let plan: NbdTls.Plan
        do {
            if nbd_set_export_name(h, export) != 0
                || nbd_add_meta_context(h, address.dirtyBitmap ?? "base:allocation") != 0 {
                throw lastError()
            }
            plan = try NbdTls.plan(address, creds, handle: h)
            if plan == .ownSocket { fd = try NbdSocket.connect(address.server) }
            if let creds { try NbdTls.setUp(h, creds, address: address, plan: plan) }
        } catch {
            nbd_close(h)
            if fd >= 0 { Glibc.close(fd) }
            throw error
        }
        let rc: Int32
        switch plan {
        // libnbd owns the socket from here, failed handshake or not.
        case .ownSocket: rc = nbd_connect_socket(h, fd)
        // libnbd 1.14 checks a certificate's name only against the host it connects to itself (NbdTls.Plan).
        case let .libnbdTcp(host, port): rc = nbd_connect_tcp(h, host, port)
        }
        if rc != 0 {
            var e = handshakeError(export: export, tls: creds != nil)
            nbd_close(h)
            if let creds, NbdTls.isCertificateRejection(e) {
                e = NbdTls.rejectionReason(address, creds, like: e) ?? e
            }
            throw e
        }
        NbdBackend.widenSendBuffer(h)
        return h
    }

    /// A bigger socket send buffer than the default (208 KiB on Linux): a 2 MiB write is then queued in a few
    /// sends instead of a dozen, each a poll and a wakeup of the connection's thread. Best effort; the kernel
    /// caps it at net.core.wmem_max.
    static func widenSendBuffer(_ h: OpaquePointer) {
        let fd = nbd_aio_get_fd(h)
        guard fd >= 0 else { return }
        var bytes: Int32 = 4 << 20
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, socklen_t(MemoryLayout<Int32>.size))
    }

    /// A monotonic clock in seconds.
    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Connects as nbd/client-connection.c's connect thread does with retries on: attempt after attempt, 1, 2, 4,
    /// 8 then 16 s apart, until one succeeds or `deadline` (CLOCK_MONOTONIC seconds) passes, when the last
    /// attempt's error is thrown (qemu's timer cancels the wait with it). Without a deadline, one attempt.
    static func connect(_ address: NbdAddress, until deadline: Double?) throws -> OpaquePointer {
        var pause = 1.0
        while true {
            do {
                return try connect(address)
            } catch {
                guard let deadline else { throw error }
                let left = deadline - now()
                if left <= 0 { throw error }
                let wait = min(pause, left)
                var ts = timespec(tv_sec: Int(wait), tv_nsec: Int((wait - Double(Int(wait))) * 1e9))
                var rest = timespec()
                while nanosleep(&ts, &rest) != 0 && errno == EINTR { ts = rest }
                if now() >= deadline { throw error }
                pause = min(pause * 2, 16)
            }
        }
    }

    /// libnbd's last error on this thread, without its "nbd_call: " prefix.
    static func lastError(_ fallback: Int32 = EIO) -> InstarError {
        let err = nbd_get_errno()
        let code = err != 0 ? err : fallback
        var text = nbd_get_error().map { String(cString: $0) } ?? strerrorString(code)
        if let r = NbdName.find(": ", in: text), text[..<r.lowerBound].hasPrefix("nbd_") {
            text = String(text[r.upperBound...])
        }
        // A request the server failed: qemu reports only the errno.
        if NbdName.find("command failed", in: text) != nil { text = strerrorString(code) }
        return InstarError(code == ENOENT ? .notFound : .io, text, errno: code)
    }

    /// The handshake's failure in qemu's words where qemu's client has its own (an export the server lacks).
    static func handshakeError(export: String, tls: Bool = false) -> InstarError {
        let e = lastError()
        if NbdName.find("server has no export named", in: e.message) != nil {
            return InstarError(.notFound, "Requested export not available\nserver reported: export '\(export)' not present",
                               errno: ENOENT)
        }
        return NbdTls.qemuMessage(for: e, tls: tls) ?? e
    }

    // MARK: requests and connections

    /// One request: the C struct libnbd's callbacks fill in, and what the backend knows about it.
    final class Request {
        let c: UnsafeMutablePointer<instar_nbd_req>
        /// Write-behind: no caller waits for it.
        let isBehind: Bool
        /// The write-behind buffer slot it holds, -1 for none.
        var slot = -1
        /// The caller's buffer it writes from, borrowed (WriteLoan), given back when it is retired.
        var loan: LendableBuffer?
        /// Set under the backend's lock when the connection's thread retires it.
        var finished = false
        var failure: InstarError?
        /// Flushes have no range: they wait for everything before them.
        var isFlush: Bool { c.pointee.kind == Int32(INSTAR_NBD_FLUSH) }

        init(kind: Int, offset: UInt64, length: UInt64, behind: Bool) {
            c = UnsafeMutablePointer<instar_nbd_req>.allocate(capacity: 1)
            c.initialize(to: instar_nbd_req())
            c.pointee.kind = Int32(kind)
            c.pointee.offset = offset
            c.pointee.len = length
            isBehind = behind
        }

        deinit { c.deallocate() }

        func overlaps(_ o: Request) -> Bool {
            if isFlush || o.isFlush { return true }
            return c.pointee.offset < o.c.pointee.offset &+ o.c.pointee.len
                && o.c.pointee.offset < c.pointee.offset &+ c.pointee.len
        }
    }

    /// A connection and the thread that sends its requests and reads its replies.
    final class Lane {
        /// The connection; replaced by the lane's thread when it reconnects (reconnect-delay).
        var handle: OpaquePointer
        /// An eventfd the thread polls beside the socket: written when a request is queued or the lane stops.
        let wake: Int32
        /// Queued by callers, not yet taken by the thread (guarded by the backend's lock).
        var queue: [Request] = []
        /// Queued or in flight (guarded by the backend's lock).
        var load = 0
        var stopping = false
        /// The thread is (about to be) blocked in poll with nothing queued: a new request must wake it.
        var idle = false
        var thread = pthread_t()
        var started = false
        /// Requests failed while libnbd may still hold them (a dead connection): kept alive until the close.
        var graveyard: [Request] = []

        init(handle: OpaquePointer, wake: Int32) {
            self.handle = handle
            self.wake = wake
        }

        func kick() {
            var one: UInt64 = 1
            _ = Glibc.write(wake, &one, 8)
        }
    }

    /// Opens a lane on the spare connection or a new one and starts its thread (lock held).
    private func openLane() throws -> Lane {
        var h: OpaquePointer
        if let s = spare {
            h = s
            spare = nil
        } else {
            h = try NbdBackend.connect(address)
        }
        let fd = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        if fd < 0 {
            let e = InstarError.system(errno, "Could not create an eventfd")
            if lanes.isEmpty { spare = h } else { nbd_close(h) }
            throw e
        }
        let lane = Lane(handle: h, wake: fd)
        let context = Unmanaged.passRetained(LaneStart(backend: self, lane: lane)).toOpaque()
        let rc = pthread_create(&lane.thread, nil, { arg in
            guard let arg else { return nil }
            let start = Unmanaged<LaneStart>.fromOpaque(arg).takeRetainedValue()
            start.backend.serve(start.lane)
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<LaneStart>.fromOpaque(context).release()
            Glibc.close(fd)
            if lanes.isEmpty { spare = h } else { nbd_close(h) }
            throw InstarError.system(rc, "Could not start an NBD connection thread")
        }
        lane.started = true
        lanes.append(lane)
        return lane
    }

    /// What a lane's thread starts with (the backend is not retained: close() joins the thread first).
    final class LaneStart {
        unowned(unsafe) let backend: NbdBackend
        let lane: Lane
        init(backend: NbdBackend, lane: Lane) {
            self.backend = backend
            self.lane = lane
        }
    }

    /// Queues `r` once nothing outstanding overlaps it, on the least loaded lane (opening one while the server
    /// allows more and every lane is busy). Lock held.
    private func enqueueLocked(_ r: Request) throws {
        while outstanding.contains(where: { $0.overlaps(r) }) { pthread_cond_wait(changed, lock) }
        var best = lanes.first
        for l in lanes.dropFirst() where l.load < (best?.load ?? 0) { best = l }
        if lanes.count < poolLimit && (best?.load ?? 1) > 0 {
            do {
                best = try openLane()
            } catch {
                // No more connections: use the ones there are (none: the error is the request's).
                if best == nil { throw error }
            }
        }
        guard let lane = best else { throw InstarError(.io, "NBD connection closed", errno: EIO) }
        lane.queue.append(r)
        lane.load += 1
        outstanding.append(r)
        if r.isBehind { behind += 1 }
        // A busy thread takes the queue before it polls again; only a sleeping one needs the eventfd.
        if lane.idle {
            lane.idle = false
            lane.kick()
        }
    }

    /// Sends `requests` and waits for all of them; throws the first failure (after all have finished).
    private func perform(_ requests: [Request]) throws {
        pthread_mutex_lock(lock)
        var failure: Error?
        var queued = 0
        if closed {
            failure = InstarError(.io, "NBD connection closed", errno: EIO)
        } else {
            for r in requests {
                do { try enqueueLocked(r); queued += 1 } catch { failure = error; break }
            }
        }
        for r in requests.prefix(queued) {
            while !r.finished { pthread_cond_wait(changed, lock) }
            if failure == nil, let e = r.failure { failure = e }
        }
        pthread_mutex_unlock(lock)
        if let failure { throw failure }
    }

    /// A write-like request: the first one (and any while nothing has been answered yet) waits for its reply;
    /// later ones are write-behind. Throws a remembered failure first.
    private func submitWrite(_ make: (Bool) -> Request, bytes: UnsafeRawBufferPointer?) throws {
        try throwDeferred()
        pthread_mutex_lock(lock)
        let isBehind = probed
        pthread_mutex_unlock(lock)
        let r = make(isBehind)
        if !isBehind {
            if let bytes { r.c.pointee.buf = UnsafeMutableRawPointer(mutating: bytes.baseAddress) }
            try perform([r])
            pthread_mutex_lock(lock)
            probed = true
            dirty = true
            pthread_mutex_unlock(lock)
            return
        }
        if let bytes, bytes.baseAddress != nil, let loan = WriteLoan.borrow(bytes) {
            // The caller's buffer stays as it is until the request is retired: no copy.
            pthread_mutex_lock(lock)
            while borrowedBytes > 0 && borrowedBytes + bytes.count > Int(NbdBackend.borrowBytes) && !closed {
                pthread_cond_wait(changed, lock)
            }
            borrowedBytes += bytes.count
            pthread_mutex_unlock(lock)
            r.loan = loan
            r.c.pointee.buf = UnsafeMutableRawPointer(mutating: bytes.baseAddress)
        } else if let bytes, let src = bytes.baseAddress {
            pthread_mutex_lock(lock)
            if slots == nil {
                slots = UnsafeMutableRawPointer.allocate(byteCount: slotBytes * slotCount, alignment: 4096)
                freeSlots = Array((0..<slotCount).reversed())
            }
            while freeSlots.isEmpty && !closed { pthread_cond_wait(changed, lock) }
            let slot = freeSlots.popLast()
            let base = slots
            pthread_mutex_unlock(lock)
            guard let base, let slot else { throw InstarError(.io, "NBD connection closed", errno: EIO) }
            // The slot is this call's alone until the request is queued: the copy runs without the lock.
            let dst = base + slot * slotBytes
            dst.copyMemory(from: src, byteCount: bytes.count)
            r.slot = slot
            r.c.pointee.buf = dst
        }
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        if closed {
            dropBuffersLocked(r)
            throw InstarError(.io, "NBD connection closed", errno: EIO)
        }
        dirty = true
        do {
            try enqueueLocked(r)
        } catch {
            dropBuffersLocked(r)
            throw error
        }
    }

    /// Frees the slot or gives back the borrowed buffer of a write-behind request that is over or never
    /// started (lock held).
    private func dropBuffersLocked(_ r: Request) {
        if r.slot >= 0 { freeSlots.append(r.slot) }
        r.slot = -1
        if let loan = r.loan {
            borrowedBytes -= Int(r.c.pointee.len)
            r.loan = nil
            r.c.pointee.buf = nil
            loan.giveBack()
        }
    }

    /// Waits for every write-behind request; throws the remembered failure, if any.
    private func throwDeferred(waitAll: Bool = false) throws {
        pthread_mutex_lock(lock)
        if deferred != nil || waitAll {
            while behind > 0 { pthread_cond_wait(changed, lock) }
        }
        let d = deferred
        pthread_mutex_unlock(lock)
        if let d { throw StepError(.write, at: d.offset, d.error) }
    }

    /// Marks `r` finished (lock held).
    private func retireLocked(_ r: Request, lane: Lane, failure: InstarError?) {
        r.finished = true
        r.failure = failure
        lane.load -= 1
        if let i = outstanding.firstIndex(where: { $0 === r }) { outstanding.remove(at: i) }
        if r.isBehind {
            behind -= 1
            dropBuffersLocked(r)
            if let e = failure, deferred.map({ r.c.pointee.offset < $0.offset }) ?? true {
                deferred = (r.c.pointee.offset, e)
            }
        }
    }

    /// The error libnbd reported for a finished request.
    private static func requestError(_ code: Int32) -> InstarError {
        InstarError(.io, strerrorString(code), errno: code)
    }

    /// A lane's thread: takes queued requests, sends them, polls the socket and the eventfd, retires what
    /// finished; stops when told to and nothing is outstanding.
    ///
    /// reconnect-delay (qemu's NBD_CLIENT_CONNECTING_WAIT): when the connection drops, the requests in flight and
    /// those queued after them are kept; the next pass connects again, retrying until the delay (counted from
    /// that first attempt) runs out, and sends them again in their order on the new connection. When it runs
    /// out they fail with EIO, and later requests fail too unless one attempt made for them connects.
    private func serve(_ lane: Lane) {
        var h = lane.handle
        var sent: [Request] = []
        var dead = false
        let delay = address.reconnectDelay
        /// The current outage's wait has run out: requests fail unless a single attempt connects.
        var expired = false
        while true {
            pthread_mutex_lock(lock)
            lane.idle = false
            var fresh = lane.queue
            lane.queue.removeAll(keepingCapacity: true)
            let stopping = lane.stopping
            pthread_mutex_unlock(lock)
            if dead && delay > 0 && !(sent.isEmpty && fresh.isEmpty) {
                let deadline = expired ? nil : NbdBackend.now() + Double(delay)
                if let fresh2 = try? NbdBackend.connect(address, until: deadline) {
                    // Closing the old handle runs whatever callbacks it still owes before its requests are reused.
                    _ = nbd_shutdown(h, 0)
                    nbd_close(h)
                    pthread_mutex_lock(lock)
                    lane.handle = fresh2
                    lane.graveyard = []
                    pthread_mutex_unlock(lock)
                    h = fresh2
                    dead = false
                    expired = false
                    for r in sent {
                        r.c.pointee.done = 0
                        r.c.pointee.error = 0
                        r.c.pointee.extent_count = 0
                    }
                    fresh = sent + fresh
                    sent = []
                } else {
                    expired = true
                }
            }
            var failed: [(Request, InstarError)] = []
            for r in fresh {
                if dead && delay > 0 && !expired {
                    sent.append(r)
                } else if dead {
                    failed.append((r, NbdBackend.requestError(EIO)))
                } else if instar_nbd_submit(h, r.c) < 0 {
                    if nbd_aio_is_dead(h) != 0 || nbd_aio_is_closed(h) != 0 {
                        dead = true
                        if delay > 0 {
                            // Kept, with everything after it, for the new connection.
                            expired = false
                            sent.append(r)
                            continue
                        }
                        failed.append((r, NbdBackend.requestError(EIO)))
                    } else {
                        failed.append((r, NbdBackend.lastError()))
                    }
                } else {
                    sent.append(r)
                }
            }
            if !dead && (nbd_aio_is_dead(h) != 0 || nbd_aio_is_closed(h) != 0) {
                dead = true
                expired = false
            }
            let keep = dead && delay > 0 && !expired
            var done: [(Request, InstarError?)] = failed.map { ($0.0, $0.1) }
            sent.removeAll { r in
                guard instar_nbd_req_is_done(r.c) != 0 else { return false }
                let code = r.c.pointee.error
                // A request libnbd aborted with its connection is sent again once reconnected.
                if keep && code != 0 { return false }
                done.append((r, code != 0 ? NbdBackend.requestError(dead ? EIO : code) : nil))
                return true
            }
            if dead && !keep && !sent.isEmpty {
                // libnbd answers nothing more on a dead connection; keep the requests alive in case it still
                // calls their callbacks when the handle closes.
                for r in sent { done.append((r, NbdBackend.requestError(EIO))) }
                pthread_mutex_lock(lock)
                lane.graveyard += sent
                pthread_mutex_unlock(lock)
                sent = []
            }
            if !done.isEmpty {
                pthread_mutex_lock(lock)
                for (r, e) in done { retireLocked(r, lane: lane, failure: e) }
                pthread_cond_broadcast(changed)
                pthread_mutex_unlock(lock)
            }
            if keep && !sent.isEmpty { continue }
            if stopping && sent.isEmpty {
                pthread_mutex_lock(lock)
                let empty = lane.queue.isEmpty
                pthread_mutex_unlock(lock)
                if empty { return }
                continue
            }
            var fds = [pollfd(fd: lane.wake, events: Int16(POLLIN), revents: 0), pollfd(fd: -1, events: 0, revents: 0)]
            if !dead {
                let fd = nbd_aio_get_fd(h)
                let dir = nbd_aio_get_direction(h)
                if fd >= 0 {
                    var ev: Int16 = 0
                    if dir & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 { ev |= Int16(POLLIN) }
                    if dir & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 { ev |= Int16(POLLOUT) }
                    fds[1] = pollfd(fd: fd, events: ev, revents: 0)
                } else {
                    dead = true
                    expired = false
                    continue
                }
            }
            pthread_mutex_lock(lock)
            let sleep = lane.queue.isEmpty && !lane.stopping
            lane.idle = sleep
            pthread_mutex_unlock(lock)
            let n = poll(&fds, 2, sleep ? -1 : 0)
            if n < 0 { continue }
            if fds[0].revents != 0 {
                var value: UInt64 = 0
                _ = Glibc.read(lane.wake, &value, 8)
            }
            let rev = fds[1].revents
            if !dead && rev != 0 {
                var r: Int32 = 0
                if rev & Int16(POLLIN | POLLHUP | POLLERR) != 0 { r = nbd_aio_notify_read(h) }
                if r == 0 && rev & Int16(POLLOUT) != 0 { r = nbd_aio_notify_write(h) }
                if r != 0 || nbd_aio_is_dead(h) != 0 || nbd_aio_is_closed(h) != 0 {
                    dead = true
                    expired = false
                }
            }
        }
    }

    // MARK: ProtocolBackend

    func size() throws -> UInt64 { exportSize }

    /// As qemu-img convert's 8 coroutines: reads from several threads share the lanes, pipelined on each.
    var readsInFlight: Int { 8 }

    func allocatedSize() throws -> UInt64? { nil }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard offset < exportSize, let base = buffer.baseAddress else { return 0 }
        let total = Int(min(UInt64(buffer.count), exportSize - offset))
        var requests: [Request] = []
        var done = 0
        while done < total {
            let n = min(total - done, slotBytes)
            let r = Request(kind: Int(INSTAR_NBD_READ), offset: offset + UInt64(done), length: UInt64(n), behind: false)
            r.c.pointee.buf = base + done
            requests.append(r)
            done += n
        }
        try perform(requests)
        return total
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard buffer.baseAddress != nil else { return }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(buffer.count))
        guard !overflow, end <= exportSize else { throw InstarError.system(EIO, "Could not write past the end of the NBD export") }
        var done = 0
        while done < buffer.count {
            let n = min(buffer.count - done, slotBytes)
            let at = offset + UInt64(done)
            try submitWrite({ Request(kind: Int(INSTAR_NBD_WRITE), offset: at, length: UInt64(n), behind: $0) },
                            bytes: UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)]))
            done += n
        }
    }

    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {
        guard offset < exportSize else { return }
        let total = min(length, exportSize - offset)
        guard canZero else {
            // No NBD_CMD_WRITE_ZEROES: plain writes of zeroes, as qemu's fallback does.
            let chunk = Int(min(total, UInt64(slotBytes)))
            let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: max(chunk, 1), alignment: 4096)
            defer { zeros.deallocate() }
            zeros.initializeMemory(as: UInt8.self, repeating: 0)
            var done: UInt64 = 0
            while done < total {
                let n = Int(min(total - done, UInt64(chunk)))
                try write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: offset + done)
                done += UInt64(n)
            }
            return
        }
        let flags = mayUnmap ? 0 : UInt32(LIBNBD_CMD_FLAG_NO_HOLE)
        var done: UInt64 = 0
        while done < total {
            let n = min(total - done, min(maxRequest, NbdBackend.maxRange))
            let at = offset + done
            try submitWrite({ behind in
                let r = Request(kind: Int(INSTAR_NBD_ZERO), offset: at, length: n, behind: behind)
                r.c.pointee.flags = flags
                return r
            }, bytes: nil)
            done += n
        }
    }

    func discard(at offset: UInt64, length: UInt64) throws {
        guard canTrim, offset < exportSize else { return }
        let total = min(length, exportSize - offset)
        var done: UInt64 = 0
        while done < total {
            let n = min(total - done, NbdBackend.maxRange)
            let at = offset + done
            try submitWrite({ Request(kind: Int(INSTAR_NBD_TRIM), offset: at, length: n, behind: $0) }, bytes: nil)
            done += n
        }
    }

    func flush() throws {
        try throwDeferred()
        guard canFlush, !readOnly else { return }
        // A flush waits for every earlier request; with multi-conn one flush covers all connections.
        try perform([Request(kind: Int(INSTAR_NBD_FLUSH), offset: 0, length: 0, behind: false)])
        pthread_mutex_lock(lock)
        dirty = false
        pthread_mutex_unlock(lock)
        try throwDeferred()
    }

    func drainWrites() throws {
        try throwDeferred(waitAll: true)
    }

    func finishWrites(durable: Bool) throws {
        if !durable {
            pthread_mutex_lock(lock)
            skipCloseFlush = true
            pthread_mutex_unlock(lock)
        }
        try throwDeferred(waitAll: true)
        pthread_mutex_lock(lock)
        let needFlush = durable && dirty
        pthread_mutex_unlock(lock)
        if needFlush { try flush() }
    }

    /// nbd_co_truncate: the size cannot change; the same size (or a smaller one, not exact) is accepted.
    func truncate(to length: UInt64) throws {
        if length == exportSize { return }
        throw InstarError(.unsupported, "Cannot resize NBD nodes", errno: ENOTSUP)
    }

    func extent(at offset: UInt64, length: UInt64) throws -> ProtocolExtent {
        guard offset < exportSize else { return ProtocolExtent(length: 0, data: false, zero: true) }
        let want = min(length, exportSize - offset, NbdBackend.maxRange)
        guard let context, want > 0 else { return ProtocolExtent(length: max(want, 1), data: true, zero: false) }
        let r = Request(kind: Int(INSTAR_NBD_STATUS), offset: offset, length: want, behind: false)
        try context.withCString { ctx in
            r.c.pointee.context = ctx
            try perform([r])
        }
        guard r.c.pointee.extent_count > 0, r.c.pointee.extent_len > 0 else {
            throw InstarError(.io, "Server did not reply with any status extents", errno: EIO)
        }
        let len = min(r.c.pointee.extent_len, want)
        let flags = r.c.pointee.extent_flags
        // With x-dirty-bitmap the bitmap's flags are read as base:allocation's, as qemu reads them: a dirty
        // extent (bit 0) shows as a hole, a clean one as data.
        let hole = flags & UInt64(LIBNBD_STATE_HOLE) != 0
        let zero = flags & UInt64(LIBNBD_STATE_ZERO) != 0
        return ProtocolExtent(length: len, data: !hole, zero: zero)
    }

    /// Waits for everything outstanding, flushes written data (unless the cache mode never flushes), and
    /// closes every connection. Errors here are lost: `finishWrites` is where callers get them.
    func close() {
        pthread_mutex_lock(lock)
        if closed {
            pthread_mutex_unlock(lock)
            return
        }
        while !outstanding.isEmpty { pthread_cond_wait(changed, lock) }
        let flushNow = dirty && canFlush && !readOnly && !skipCloseFlush && !lanes.isEmpty
        pthread_mutex_unlock(lock)
        if flushNow { _ = try? perform([Request(kind: Int(INSTAR_NBD_FLUSH), offset: 0, length: 0, behind: false)]) }
        pthread_mutex_lock(lock)
        closed = true
        let all = lanes
        lanes = []
        let first = spare
        spare = nil
        for l in all {
            l.stopping = true
            l.kick()
        }
        pthread_mutex_unlock(lock)
        for l in all {
            if l.started { pthread_join(l.thread, nil) }
            Glibc.close(l.wake)
            _ = nbd_shutdown(l.handle, 0)
            nbd_close(l.handle)
            l.graveyard = []
        }
        if let h = first {
            _ = nbd_shutdown(h, 0)
            nbd_close(h)
        }
        slots?.deallocate()
        slots = nil
    }
}

/// The protocol descriptor registered in `Protocols.swift`.
enum NbdProtocol {
    static let descriptor: ProtocolDescriptor = {
        var d = ProtocolDescriptor(
            name: "nbd", prefixes: NbdName.prefixes,
            parseName: { try NbdName.parse($0) },
            open: { options, writable in
                try NbdBackend(address: try NbdAddress(options: options), writable: writable)
            })
        d.exactFilename = { options in (try? NbdAddress(options: options))?.exactFilename }
        return d
    }()
}
