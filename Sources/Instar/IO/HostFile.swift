import CInstar
import Glibc

/// The protocol layer under every format driver: an open host file (qemu's "file" protocol), or a
/// `ProtocolBackend` (nbd, rbd) that the same methods forward to, so drivers never ask which one they have.
/// Reads and writes are positional (pread/pwrite) so one handle serves any offset; with `direct` the file is
/// opened O_DIRECT and unaligned requests go through an aligned bounce buffer.
public final class HostFile {
    public let path: String
    /// The host file descriptor; -1 when the node is a protocol backend (`remote`).
    public let fd: Int32
    /// The protocol backend when the node is not a host file.
    public let remote: ProtocolBackend?
    /// The protocol node's driver and options, for a remote node.
    public let address: ProtocolAddress?
    /// qemu's cache=unsafe (BDRV_O_NO_FLUSH): flushes of this file return at once.
    public var noFlush = false
    /// Early writeback of what is written (EarlyWriteback.swift), while an operation asks for it.
    var pacer: WritebackPacer?
    /// A writeback error the kernel reported to an early-writeback request (and so no longer reports to
    /// fdatasync): every later flush of the file fails with it.
    var writebackError: Int32 = 0
    /// qemu's write_gen/flushed_gen: a change to the file (write, truncate, punch, fallocate, or a kernel copy
    /// into it, see `noteChange`) bumps `changeGeneration`; a successful fdatasync records the generation it
    /// started at, and a flush with no change since the last one returns at once (qemu's bdrv_co_flush skips
    /// it the same way). Starts unsynced, so the first flush of every open file is made.
    /// Atomic: a shared handle is written and flushed from several threads.
    private let changeGeneration = AtomicCounter(1)
    private let syncedGeneration = AtomicCounter(0)
    public let writable: Bool
    public let direct: Bool
    /// O_DIRECT alignment for offsets, lengths and buffers.
    public static let directAlignment = 4096

    /// For a window (qemu's raw node with "offset"/"size" under a format): the node it reads through.
    private let base: HostFile?
    private let windowOffset: UInt64
    private let windowSize: UInt64

    private init(path: String, fd: Int32, writable: Bool, direct: Bool) {
        self.path = path
        self.fd = fd
        self.remote = nil
        self.address = nil
        self.writable = writable
        self.direct = direct
        self.base = nil
        self.windowOffset = 0
        self.windowSize = 0
    }

    private init(remote: ProtocolBackend, address: ProtocolAddress, name: String, writable: Bool) {
        self.path = name
        self.fd = -1
        self.remote = remote
        self.address = address
        self.writable = writable
        self.direct = false
        self.base = nil
        self.windowOffset = 0
        self.windowSize = 0
    }

    private init(window base: HostFile, offset: UInt64, size: UInt64, name: String) {
        self.path = name
        self.fd = base.fd
        self.remote = nil
        self.address = nil
        self.writable = base.writable
        self.direct = base.direct
        self.base = base
        self.windowOffset = offset
        self.windowSize = size
    }

    deinit {
        if base != nil { return }
        if let remote {
            remote.close()
        } else {
            // Drop the image locks (OFD locks belong to the open file description) before closing: a child that
            // another thread of the host is forking or spawning (our isolated helper, a host's subprocess) holds
            // a copy of every descriptor until it execs, and would keep the description, and with it the
            // locks, alive after this close, so a reopen of the image at once failed with "Failed to get "write"
            // lock" (found by Tests/concurrency/stress.c).
            if fd >= 0 { _ = instar_shim_ofd_lock(fd, 0, 0, 0) }
            Glibc.close(fd)
        }
    }

    /// Whether this node is a host file (with a descriptor, locks, SEEK_DATA) rather than a protocol backend.
    public var isHostFile: Bool { hostLocation(0).file.remote == nil }

    /// Opens the protocol node `address` names; `name` is how messages call it.
    public static func open(address: ProtocolAddress, name: String, writable: Bool,
                            secrets: [String: String] = [:]) throws -> HostFile {
        if instar_broker_fd >= 0 {
            // In the isolated helper (docs/isolated.md) there is no network: say so rather than die by seccomp.
            throw InstarError.unsupported("Protocol '\(address.driver)' is not available in isolated mode")
        }
        guard let d = ProtocolRegistry.descriptor(named: address.driver) else {
            throw InstarError.unsupported("Unknown protocol '\(address.driver)'")
        }
        let backend = try d.open(address.options(secrets: secrets), writable)
        // The node's own name as qemu's bdrv_refresh_filename gives it (map's File column, messages about it).
        let nodeName = d.exactFilename?(address.options) ?? "json:" + QJSON.compact(address.node)
        return HostFile(remote: backend, address: address, name: nodeName, writable: writable)
    }

    /// A window of `base` (qemu's raw protocol-level node): `offset` and, if given, `size` checked as qemu's
    /// raw_apply_options checks them against the containing node's length (whole 512-byte sectors for a file).
    /// `name` is the node's name as qemu prints it (its json: name). Reads past the window read as zeroes;
    /// writes past it fail.
    public static func window(of base: HostFile, offset: UInt64, size: UInt64?, name: String) throws -> HostFile {
        let real = try base.nodeLength()
        if offset > real {
            throw InstarError.invalid("Offset (\(offset)) cannot be greater than size of the containing file (\(real))")
        }
        if let size, real - offset < size {
            throw InstarError.invalid("The sum of offset (\(offset)) and size (\(size)) has to be smaller or equal to "
                                      + "the  actual size of the containing file (\(real))")
        }
        if let size, size % 512 != 0 { throw InstarError.invalid("Specified size is not multiple of 512") }
        return HostFile(window: base, offset: offset, size: size ?? real - offset, name: name)
    }

    /// The length the block layer gives this node: a file's length in whole 512-byte sectors, a window's size.
    public func nodeLength() throws -> UInt64 {
        if base != nil { return windowSize }
        return try size().alignedUp(512)
    }

    /// Where `offset` of this node lies in the host file under every window (qemu's BDRV_BLOCK_RAW recursion).
    public func hostLocation(_ offset: UInt64) -> (file: HostFile, offset: UInt64) {
        guard let base else { return (self, offset) }
        return base.hostLocation(windowOffset &+ offset)
    }

    /// `length` bytes at `offset` of a window as an offset of its base, refusing ranges past the window's end.
    private func windowed(_ offset: UInt64, _ length: UInt64) throws -> UInt64 {
        guard offset <= windowSize, length <= windowSize - offset else {
            throw InstarError.system(ENOSPC, "Could not write to '\(path)'")
        }
        return try windowOffset.adding(offset)
    }

    /// Opens `path`. Errors carry qemu's file-posix wording: "Could not open 'PATH': <strerror>".
    public static func open(_ path: String, writable: Bool = false, create: Bool = false, truncate: Bool = false,
                            direct: Bool = false) throws -> HostFile {
        if let address = try ProtocolAddress.fromPlainName(path) {
            return try open(address: address, name: path, writable: writable)
        }
        var flags = writable ? O_RDWR : O_RDONLY
        if create { flags |= O_CREAT }
        if truncate { flags |= O_TRUNC }
        if direct { flags |= instar_shim_o_direct() }
        var fd = instar_shim_open(path, flags, 0o644)
        if fd < 0 && direct && errno == EINVAL {
            // The filesystem refuses O_DIRECT (tmpfs); qemu fails the same way, so report it.
            throw InstarError.system(EINVAL, "Could not open '\(path)'")
        }
        if fd < 0 {
            throw InstarError.system(errno, "Could not open '\(path)'")
        }
        var st = stat()
        if fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR {
            Glibc.close(fd)
            fd = -1
            throw InstarError(.invalid, "'file' driver requires '\(path)' to be a regular file", errno: EINVAL)
        }
        return HostFile(path: path, fd: fd, writable: writable, direct: direct)
    }

    /// A whole file of this host, opened by its name (not a window of another file, not a protocol node): its
    /// bytes at an offset are the file's own (isolated convert reads plain ranges through the broker's copy).
    var isWholeLocalFile: Bool { base == nil && remote == nil && fd >= 0 }

    /// The file length in bytes.
    public func size() throws -> UInt64 {
        if base != nil { return windowSize }
        if let remote { return try remote.size() }
        var st = stat()
        if fstat(fd, &st) != 0 { throw InstarError.system(errno, "Could not stat '\(path)'") }
        return UInt64(max(0, st.st_size))
    }

    /// Bytes allocated on the host (st_blocks * 512), as qemu's "actual-size"/"disk size".
    public func allocatedSize() throws -> UInt64 {
        if let base { return try base.allocatedSize() }
        if let remote {
            guard let n = try remote.allocatedSize() else {
                throw InstarError.unsupported("'\(path)' cannot report its allocation")
            }
            return n
        }
        var st = stat()
        if fstat(fd, &st) != 0 { throw InstarError.system(errno, "Could not stat '\(path)'") }
        return UInt64(max(0, st.st_blocks)) &* 512
    }

    /// Reads up to `buffer.count` bytes at `offset`; returns how many were read (fewer only at end of file).
    @discardableResult
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        if buffer.count == 0 { return 0 }
        try CallBudget.checkpoint()
        if let base {
            guard offset < windowSize else { return 0 }
            let n = Int(min(UInt64(buffer.count), windowSize - offset))
            return try base.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]),
                                 at: try windowOffset.adding(offset))
        }
        guard offset <= UInt64(Int64.max) else { throw InstarError.corrupt("read offset out of range") }
        if let remote { return try remote.read(into: buffer, at: offset) }
        if direct { return try directRead(into: buffer, at: offset) }
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw InstarError.system(errno, "Could not read '\(path)'")
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Reads exactly `buffer.count` bytes; the part past end of file reads as zeroes (as qemu's file driver does).
    public func readZeroPadded(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let n = try read(into: buffer, at: offset)
        if n < buffer.count { memset(buffer.baseAddress! + n, 0, buffer.count - n) }
    }

    /// Reads `count` bytes at `offset` into a new array; bytes past end of file read as zeroes.
    public func readBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try readZeroPadded(into: $0, at: offset) }
        return out
    }

    /// `readBytes` of metadata the image keeps (a table, a directory, a descriptor): reserves `count` bytes of the
    /// call's memory budget for `what` first (see `CallBudget.reserve`).
    public func readMetadata(at offset: UInt64, count: Int, what: @autoclosure () -> String) throws -> [UInt8] {
        try CallBudget.reserve(count, what: what())
        return try readBytes(at: offset, count: count)
    }

    /// Reads `count` bytes at `offset`; fails with `.corrupt("<what> is truncated")` if the file ends first.
    public func readExactly(at offset: UInt64, count: Int, what: String) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        if n < count { throw InstarError.corrupt("\(what) is truncated") }
        return out
    }

    /// Records a change made to the file other than through this type's methods (a kernel copy into its
    /// descriptor, a fallocate call): the next `sync` must reach the disk.
    func noteChange() {
        if let base { return base.noteChange() }
        changeGeneration.increment()
    }

    /// Writes all of `buffer` at `offset`.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if buffer.count == 0 { return }
        if let base { return try base.write(buffer, at: try windowed(offset, UInt64(buffer.count))) }
        guard offset <= UInt64(Int64.max) else { throw InstarError.invalid("write offset out of range") }
        if let remote { return try remote.write(buffer, at: offset) }
        changeGeneration.increment()
        if direct { return try directWrite(buffer, at: offset) }
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw InstarError.system(errno, "Could not write to '\(path)'")
            }
            done += n
        }
        if pacer != nil { paceWrite(at: offset, length: UInt64(buffer.count)) }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    public func truncate(to length: UInt64) throws {
        guard length <= UInt64(Int64.max) else { throw InstarError.invalid("size out of range") }
        if base != nil { throw InstarError.unsupported("Cannot resize fixed-size raw disks") }
        if let remote { return try remote.truncate(to: length) }
        changeGeneration.increment()
        if ftruncate(fd, off_t(length)) != 0 { throw InstarError.system(errno, "Could not resize file") }
    }

    /// fdatasync(2), as qemu's flush on a file with a writeback cache. A protocol backend with write-behind
    /// still waits for its writes (and reports their failure) under cache=unsafe.
    public func sync() throws {
        if let base { return try base.sync() }
        if noFlush {
            if let remote { try remote.finishWrites(durable: false) }
            return
        }
        if let remote { return try remote.flush() }
        if writebackError != 0 { throw InstarError.system(writebackError, "Could not flush '\(path)'") }
        let generation = changeGeneration.value
        if generation == syncedGeneration.value { return }
        if fdatasync(fd) != 0 { throw InstarError.system(errno, "Could not flush '\(path)'") }
        syncedGeneration.store(generation)
    }

    /// Waits for the writes a protocol backend has accepted and not finished (NBD's write-behind) and throws the
    /// first that failed; flushes them unless the cache mode is unsafe. Nothing to do for a host file (its writes
    /// finish before `write` returns). Writers' close paths call it so a late failure is never lost.
    public func finishWrites() throws {
        if let base { return try base.finishWrites() }
        if let remote { try remote.finishWrites(durable: !noFlush) }
    }

    /// Waits for the protocol's write-behind requests and throws the first failure (`ProtocolBackend.drainWrites`);
    /// nothing to wait for on a host file.
    public func drainWrites() throws {
        if let base { return try base.drainWrites() }
        if let remote { try remote.drainWrites() }
    }

    /// The start of the next data extent at or after `offset`, or nil when only a hole follows (SEEK_DATA).
    /// Falls back to "all data" where the filesystem lacks SEEK_DATA.
    public func nextData(from offset: UInt64) -> UInt64? {
        if let base {
            guard offset < windowSize, let d = base.nextData(from: windowOffset &+ offset), d >= windowOffset,
                  d - windowOffset < windowSize else { return nil }
            return max(d, windowOffset &+ offset) - windowOffset
        }
        if let remote {
            // The first extent at or after `offset` that holds data, walked through the backend's block status.
            guard let end = try? remote.size() else { return offset }
            var pos = offset
            while pos < end {
                guard let e = try? remote.extent(at: pos, length: end - pos), e.length > 0 else { return pos }
                if e.data { return pos }
                pos += min(e.length, end - pos)
            }
            return nil
        }
        let r = lseek(fd, off_t(offset), 3 /* SEEK_DATA */)
        if r < 0 { return errno == ENXIO ? nil : offset }
        return UInt64(r)
    }

    /// The start of the next hole at or after `offset` (end of file counts as a hole) (SEEK_HOLE).
    public func nextHole(from offset: UInt64) -> UInt64 {
        if let base {
            guard offset < windowSize else { return offset }
            let h = base.nextHole(from: windowOffset &+ offset)
            return h < windowOffset &+ offset ? offset : min(h - windowOffset, windowSize)
        }
        if let remote {
            guard let end = try? remote.size() else { return offset }
            var pos = offset
            while pos < end {
                guard let e = try? remote.extent(at: pos, length: end - pos), e.length > 0 else { return end }
                if !e.data { return pos }
                pos += min(e.length, end - pos)
            }
            return max(end, offset)
        }
        let r = lseek(fd, off_t(offset), 4 /* SEEK_HOLE */)
        if r < 0 { return (try? size()) ?? offset }
        return UInt64(r)
    }

    /// Punches a hole (deallocates) or, failing that, writes zeroes over the range.
    public func punchHole(at offset: UInt64, length: UInt64) throws {
        if length == 0 { return }
        if let base { return try base.punchHole(at: try windowed(offset, length), length: length) }
        if let remote { return try remote.writeZeroes(at: offset, length: length, mayUnmap: true) }
        changeGeneration.increment()
        if instar_shim_punch_hole(fd, Int64(offset), Int64(length)) == 0 { return }
        try writeZeroes(at: offset, length: length)
    }

    /// Writes explicit zeroes over the range.
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        if let base { return try base.writeZeroes(at: try windowed(offset, length), length: length) }
        if let remote { return try remote.writeZeroes(at: offset, length: length, mayUnmap: false) }
        let chunk = 1 << 20
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: HostFile.directAlignment)
        defer { zeros.deallocate() }
        memset(zeros.baseAddress!, 0, chunk)
        var pos = offset
        let end = try offset.adding(length)
        while pos < end {
            let n = Int(min(UInt64(chunk), end - pos))
            try write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: pos)
            pos += UInt64(n)
        }
    }

    /// posix_fallocate(3) over the range (preallocation=falloc).
    public func allocate(at offset: UInt64, length: UInt64) throws {
        if length == 0 { return }
        if let base { return try base.allocate(at: try windowed(offset, length), length: length) }
        if remote != nil { return try writeZeroes(at: offset, length: length) }
        changeGeneration.increment()
        let r = posix_fallocate(fd, off_t(offset), off_t(length))
        if r != 0 { throw InstarError.system(r, "Could not preallocate data for the new file") }
    }

    /// Reads worth keeping in flight for a sequential copy (`ProtocolBackend.readsInFlight`); 1 for a host file,
    /// which the kernel reads ahead by itself.
    public var readsInFlight: Int {
        if let base { return base.readsInFlight }
        return remote?.readsInFlight ?? 1
    }

    /// The protocol backend's block status for the extent at `offset` (at most `length` bytes), or nil for a
    /// host file, whose status comes from `nextData`/`nextHole`.
    public func protocolExtent(at offset: UInt64, length: UInt64) throws -> ProtocolExtent? {
        if let base {
            guard offset < windowSize else { return nil }
            guard var e = try base.protocolExtent(at: try windowOffset.adding(offset),
                                                  length: min(length, windowSize - offset)) else { return nil }
            e.length = min(e.length, windowSize - offset)
            return e
        }
        guard let remote else { return nil }
        return try remote.extent(at: offset, length: length)
    }

    /// Deallocates the range without promising zeroes (a discard), where the node can.
    public func discard(at offset: UInt64, length: UInt64) throws {
        if length == 0 { return }
        if let base { return try base.discard(at: try windowed(offset, length), length: length) }
        if let remote { return try remote.discard(at: offset, length: length) }
        changeGeneration.increment()
        _ = instar_shim_punch_hole(fd, Int64(offset), Int64(length))
    }

    // MARK: O_DIRECT

    private func directRead(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let align = UInt64(HostFile.directAlignment)
        let start = offset.alignedDown(align)
        let end = try (offset + UInt64(buffer.count)).alignedUp(align)
        let len = Int(end - start)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: len, alignment: HostFile.directAlignment)
        defer { bounce.deallocate() }
        var done = 0
        while done < len {
            let n = pread(fd, bounce.baseAddress! + done, len - done, off_t(start) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw InstarError.system(errno, "Could not read '\(path)'")
            }
            if n == 0 { break }
            done += n
        }
        let skip = Int(offset - start)
        let avail = max(0, min(buffer.count, done - skip))
        if avail > 0 { memcpy(buffer.baseAddress!, bounce.baseAddress! + skip, avail) }
        return avail
    }

    private func directWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let align = UInt64(HostFile.directAlignment)
        let start = offset.alignedDown(align)
        let end = try (offset + UInt64(buffer.count)).alignedUp(align)
        let len = Int(end - start)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: len, alignment: HostFile.directAlignment)
        defer { bounce.deallocate() }
        memset(bounce.baseAddress!, 0, len)
        let fileSize = try size()
        if start != offset || end != offset + UInt64(buffer.count) {
            // Read-modify-write of the partial blocks at either end.
            let n = try directRead(into: bounce, at: start)
            _ = n
        }
        memcpy(bounce.baseAddress! + Int(offset - start), buffer.baseAddress!, buffer.count)
        var done = 0
        while done < len {
            let n = pwrite(fd, bounce.baseAddress! + done, len - done, off_t(start) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw InstarError.system(errno, "Could not write to '\(path)'")
            }
            done += n
        }
        // An aligned write may have grown the file past the logical end; restore it.
        let logicalEnd = max(fileSize, offset + UInt64(buffer.count))
        if end > logicalEnd { try truncate(to: logicalEnd) }
    }
}
