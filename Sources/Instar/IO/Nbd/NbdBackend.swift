import CNbd
import Glibc

/// The nbd protocol driver (qemu's block/nbd.c) through libnbd: reads, writes, zeroes, trims, flushes and block
/// status of one export. libnbd runs one synchronous request per handle at a time, so when the server says
/// several connections see one consistent export (multi-conn) the backend opens more connections on demand,
/// up to `maxConnections`, and convert's threads each get one; otherwise every request goes through the one
/// connection in turn.
final class NbdBackend: ProtocolBackend {
    /// The most connections opened to a multi-conn server.
    static let maxConnections = 4
    /// NBD_MAX_BUFFER_SIZE: qemu's largest request when the server gives no maximum.
    static let maxBuffer: UInt64 = 32 << 20
    /// qemu's block layer never asks more than about INT_MAX bytes of a zero or trim request.
    static let maxRange: UInt64 = 1 << 30
    /// Large reads and writes go out as requests of this size, all in flight at once on one connection.
    static let piece: UInt64 = 512 << 10

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

    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let available = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var idle: [OpaquePointer] = []
    private var opened = 0
    private var closed = false

    init(address: NbdAddress, writable: Bool) throws {
        self.address = address
        let h = try NbdBackend.connect(address)
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
        pthread_mutex_init(lock, nil)
        pthread_cond_init(available, nil)
        idle = [h]
        opened = 1
    }

    deinit {
        close()
        pthread_cond_destroy(available)
        pthread_mutex_destroy(lock)
        available.deallocate()
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
        return h
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

    // MARK: the connection pool

    /// Runs `body` on a connection of the pool: an idle one, a new one while the server allows more, or the
    /// next one freed.
    private func withHandle<T>(_ body: (OpaquePointer) throws -> T) throws -> T {
        pthread_mutex_lock(lock)
        var handle: OpaquePointer?
        var mayOpen = false
        while !closed {
            if let h = idle.popLast() { handle = h; break }
            if opened < poolLimit { opened += 1; mayOpen = true; break }
            pthread_cond_wait(available, lock)
        }
        pthread_mutex_unlock(lock)
        if mayOpen {
            do {
                handle = try NbdBackend.connect(address)
            } catch {
                pthread_mutex_lock(lock)
                opened -= 1
                pthread_cond_signal(available)
                pthread_mutex_unlock(lock)
                throw error
            }
        }
        guard let h = handle else { throw InstarError(.io, "NBD connection closed", errno: EIO) }
        defer {
            pthread_mutex_lock(lock)
            if closed { nbd_close(h) } else { idle.append(h) }
            pthread_cond_signal(available)
            pthread_mutex_unlock(lock)
        }
        return try body(h)
    }

    /// Checks a libnbd call's result.
    private func check(_ r: Int32) throws {
        if r != 0 { throw NbdBackend.lastError() }
    }

    // MARK: ProtocolBackend

    func size() throws -> UInt64 { exportSize }

    func allocatedSize() throws -> UInt64? { nil }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard offset < exportSize, let base = buffer.baseAddress else { return 0 }
        let total = Int(min(UInt64(buffer.count), exportSize - offset))
        try withHandle { h in
            try check(instar_nbd_rw_pipelined(h, base, total, offset, Int(min(maxRequest, NbdBackend.piece)), 0))
        }
        return total
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard let base = buffer.baseAddress else { return }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(buffer.count))
        guard !overflow, end <= exportSize else { throw InstarError.system(EIO, "Could not write past the end of the NBD export") }
        try withHandle { h in
            try check(instar_nbd_rw_pipelined(h, UnsafeMutableRawPointer(mutating: base), buffer.count, offset,
                                              Int(min(maxRequest, NbdBackend.piece)), 1))
        }
    }

    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {
        guard offset < exportSize else { return }
        let total = min(length, exportSize - offset)
        guard canZero else {
            // No NBD_CMD_WRITE_ZEROES: plain writes of zeroes, as qemu's fallback does.
            let chunk = Int(min(total, maxRequest))
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
        try withHandle { h in
            var done: UInt64 = 0
            while done < total {
                let n = min(total - done, min(maxRequest, NbdBackend.maxRange))
                try check(nbd_zero(h, n, offset + done, flags))
                done += n
            }
        }
    }

    func discard(at offset: UInt64, length: UInt64) throws {
        guard canTrim, offset < exportSize else { return }
        let total = min(length, exportSize - offset)
        try withHandle { h in
            var done: UInt64 = 0
            while done < total {
                let n = min(total - done, NbdBackend.maxRange)
                try check(nbd_trim(h, n, offset + done, 0))
                done += n
            }
        }
    }

    func flush() throws {
        guard canFlush, !readOnly else { return }
        // Every connection's writes: with multi-conn one flush covers all, but a flush per idle connection is cheap.
        try withHandle { h in try check(nbd_flush(h, 0)) }
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
        var pairs = [UInt64](repeating: 0, count: 2)
        var count = 0
        try withHandle { h in
            let r = context.withCString { ctx in
                pairs.withUnsafeMutableBufferPointer { p in
                    instar_nbd_block_status(h, want, offset, ctx, p.baseAddress, 1, &count)
                }
            }
            try check(r)
        }
        guard count > 0, pairs[0] > 0 else {
            throw InstarError(.io, "Server did not reply with any status extents", errno: EIO)
        }
        let len = min(pairs[0], want)
        let flags = pairs[1]
        // With x-dirty-bitmap the bitmap's flags are read as base:allocation's, as qemu reads them: a dirty
        // extent (bit 0) shows as a hole, a clean one as data.
        let hole = flags & UInt64(LIBNBD_STATE_HOLE) != 0
        let zero = flags & UInt64(LIBNBD_STATE_ZERO) != 0
        return ProtocolExtent(length: len, data: !hole, zero: zero)
    }

    func close() {
        pthread_mutex_lock(lock)
        if closed {
            pthread_mutex_unlock(lock)
            return
        }
        closed = true
        let handles = idle
        idle = []
        pthread_cond_broadcast(available)
        pthread_mutex_unlock(lock)
        for h in handles {
            if !readOnly && canFlush { _ = nbd_flush(h, 0) }
            _ = nbd_shutdown(h, 0)
            nbd_close(h)
        }
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
