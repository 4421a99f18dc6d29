import CInstar
import Glibc

/// Early writeback of a long stream of writes into a host file (sync_file_range): an operation that writes a lot
/// of data and ends with a flush (commit) asks the kernel to start writing each stretch out as soon as it is
/// complete, so the disk works while the copy goes on and the final flush finds little left to write. Without
/// it the data sits in the page cache until the flush (the kernel's background writeback only starts at a
/// share of the memory), and the copy and the disk's work add up instead of overlapping.
///
/// Safety: starting writeback only does early what the kernel may do to any dirty page at any time, so the
/// order in which data and metadata become durable, and what a crash leaves, are those of the same writes
/// without it; durability still comes from the flushes the operation makes. The one thing to keep is error
/// reporting: a writeback error the kernel reports to `sync_file_range` is consumed there (a later fdatasync on
/// the same descriptor no longer sees it), so it is kept on the file and every later flush of it fails with it.
///
/// Stretches: writes merge into one of a few open stretches when they land within `gap` of it; a stretch is
/// handed to the kernel (SYNC_FILE_RANGE_WRITE) once it holds `kickBytes`. When more than `windowBytes` have
/// been handed over and not waited for, the oldest stretch is waited for (SYNC_FILE_RANGE_WAIT_BEFORE), which
/// bounds the dirty and in-flight memory without draining the disk's queue.
final class WritebackPacer {
    static let kickBytes: UInt64 = 16 << 20
    static let windowBytes: UInt64 = 64 << 20
    static let gap: UInt64 = 4 << 20
    static let openStretches = 4
    static let syncWrite: UInt32 = 2        // SYNC_FILE_RANGE_WRITE
    static let syncWaitBefore: UInt32 = 1   // SYNC_FILE_RANGE_WAIT_BEFORE

    struct Stretch {
        var start: UInt64
        var end: UInt64
        var bytes: UInt64
    }

    let fd: Int32
    private var open: [Stretch] = []
    private var submitted: [Stretch] = []
    private var submittedBytes: UInt64 = 0
    /// How many stretches were handed to the kernel (for tests and benchmarks).
    private(set) var kicks = 0

    init(fd: Int32) {
        self.fd = fd
    }

    /// Notes `length` bytes written at `offset`. Returns 0, or the errno of a failed request: ENOSYS, EINVAL and
    /// ESPIPE mean the file does not take such requests (nothing was lost), anything else is a writeback error.
    func wrote(at offset: UInt64, length: UInt64) -> Int32 {
        if length == 0 { return 0 }
        let end = offset &+ min(length, UInt64(Int64.max) - min(offset, UInt64(Int64.max)))
        var k = open.firstIndex { s in
            offset <= s.end &+ WritebackPacer.gap && end &+ WritebackPacer.gap >= s.start
        }
        if let i = k {
            open[i].start = min(open[i].start, offset)
            open[i].end = max(open[i].end, end)
            open[i].bytes &+= length
        } else {
            if open.count >= WritebackPacer.openStretches, let least = open.indices.min(by: { open[$0].bytes < open[$1].bytes }) {
                // Too many scattered stretches: the smallest is left to the final flush.
                open.remove(at: least)
            }
            open.append(Stretch(start: offset, end: end, bytes: length))
            k = open.count - 1
        }
        guard let i = k, open[i].bytes >= WritebackPacer.kickBytes else { return 0 }
        let s = open.remove(at: i)
        let r = instar_shim_sync_file_range(fd, Int64(s.start), Int64(s.end - s.start), WritebackPacer.syncWrite)
        if r != 0 { return -r }
        kicks += 1
        submitted.append(s)
        submittedBytes &+= s.bytes
        while submittedBytes > WritebackPacer.windowBytes, let oldest = submitted.first {
            submitted.removeFirst()
            submittedBytes -= oldest.bytes
            let w = instar_shim_sync_file_range(fd, Int64(oldest.start), Int64(oldest.end - oldest.start),
                                                WritebackPacer.syncWaitBefore)
            if w != 0 { return -w }
        }
        return 0
    }
}

extension HostFile {
    /// Starts early writeback (see `WritebackPacer`) of what is written to this file from now on, until
    /// `endEarlyWriteback`. Does nothing for protocol nodes, O_DIRECT files (no page cache) and files whose
    /// flushes are off (cache=unsafe: nothing is made durable, so nothing should be written early either).
    public func beginEarlyWriteback() {
        let root = hostLocation(0).file
        guard root.remote == nil, root.fd >= 0, !root.direct, !root.noFlush, root.writable, root.pacer == nil else {
            return
        }
        root.pacer = WritebackPacer(fd: root.fd)
    }

    /// Stops early writeback; what was written since the last request is left to the next flush.
    public func endEarlyWriteback() {
        hostLocation(0).file.pacer = nil
    }

    /// How many stretches early writeback has handed to the kernel since `beginEarlyWriteback` (0 when off).
    public var earlyWritebackRequests: Int { hostLocation(0).file.pacer?.kicks ?? 0 }

    /// Tells the pacer of this (root) file that `length` bytes were written at `offset`.
    func paceWrite(at offset: UInt64, length: UInt64) {
        guard let p = pacer else { return }
        let err = p.wrote(at: offset, length: length)
        if err == 0 { return }
        pacer = nil
        if err != ENOSYS && err != EINVAL && err != ESPIPE && writebackError == 0 {
            writebackError = err
        }
    }
}
