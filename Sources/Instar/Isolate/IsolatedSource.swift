import CInstar
import Glibc

// Isolated mode as the reading side of convert (docs/isolated.md). The helper opens the untrusted sources (their
// files passed by the broker, as for the other operations), describes each layer of each source's chain, and
// then answers requests until the caller is done: a layer's block status, guest bytes of a layer, a persistent
// bitmap's bits. The caller sees each helper layer as an `ImageLayer` whose driver is a `RemoteSourceFormat`, so
// convert's pipeline (block-status iterator, sparseness, -B, -n, --target-is-zero, -c, -S, --salvage) runs
// unchanged over it while the target is written in the calling process. Each answer is a bounded frame, read as
// hostile: a helper that crashes, stops answering before its deadline or sends anything malformed ends the
// source, and every later request fails with the same INSTAR_E_ISOLATION (or INSTAR_E_LIMIT) error.

/// Requests of a source session (caller -> helper, after the sources' description).
enum SourceRequest: UInt8 {
    case status = 1   // u32 layer, u64 offset, u64 length -> u64 length, u8 bits (1 data, 2 zero)
    case read = 2     // u32 layer, u64 offset, u64 length -> exactly length bytes
    case bitmap = 3   // u32 layer, name -> the bitmap's bits (raw)
}

/// The sources of one isolated convert, open in a helper. Close them (or drop them) when the convert is done:
/// the helper is then killed and reaped.
public final class IsolatedSources {
    /// The top layer of each source, in order; their backing chains are the helper's layers below.
    public let layers: [ImageLayer]
    let link: SourceLink

    init(layers: [ImageLayer], link: SourceLink) {
        self.layers = layers
        self.link = link
    }

    public func close() { link.close() }

    deinit { link.close() }
}

/// The caller's end of a source session: one request at a time (the convert's reader thread and its writer may
/// both ask), each with the per-request deadline, and the error that ended the helper kept for later requests.
final class SourceLink {
    /// The largest read one request asks for (convert reads at most 16 MiB at once).
    static let maxRead = 8 << 20

    private let session: HelperSession
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    /// Set once the helper is gone or misbehaved: every later request throws it.
    private var failure: InstarError?
    private var closed = false
    /// The call's own deadline (its timeout_ms), if it has one.
    private let callDeadline: UInt64?
    private let callMs: Int64
    /// Each request's deadline: INSTAR_ISOLATE_TIMEOUT_MS, else 60 s.
    private let requestMs: Int64

    init(session: HelperSession, callTimeoutMs: Int64) {
        self.session = session
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        callMs = callTimeoutMs
        callDeadline = callTimeoutMs > 0 ? CallBudget.now(CLOCK_MONOTONIC) &+ UInt64(callTimeoutMs) &* 1_000_000 : nil
        requestMs = max(1, IsolatedMode.envNumber("INSTAR_ISOLATE_TIMEOUT_MS") ?? IsolatedMode.defaultTimeoutMs)
    }

    deinit {
        close()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Sends `payload` and returns the helper's answer (with `into`, received straight into it). An error the
    /// helper answered with is thrown and the session goes on; any other failure ends it.
    func request(_ payload: [UInt8], into: UnsafeMutableRawBufferPointer? = nil) throws -> WireReader {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        if let f = failure { throw f }
        if closed { throw InstarError(.isolation, "The isolated helper's sources are closed") }
        var deadline = CallBudget.now(CLOCK_MONOTONIC) &+ UInt64(requestMs) &* 1_000_000
        var ms = requestMs
        if let c = callDeadline, c < deadline {
            deadline = c
            ms = callMs
        }
        session.deadline = deadline
        session.wallMs = ms
        do {
            return try session.run(request: payload, progress: nil, into: into)
        } catch {
            if session.answeredWithError || error is PlainRangeUnreadable { throw error }
            let e = (error as? InstarError) ?? InstarError(.isolation, "\(error)")
            failure = e
            session.finish()
            throw e
        }
    }

    /// Kills and reaps the helper (once).
    func close() {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        if closed { return }
        closed = true
        session.finish()
    }
}

/// One layer of a source chain open in the helper, as a format driver of the calling process.
final class RemoteSourceFormat: ImageFormat {
    let link: SourceLink
    let id: UInt32
    let formatName: String
    let virtualSize: UInt64
    let backingReference: BackingReference?
    let supportsBacking: Bool
    let clusterSize: UInt64?
    private let bitmapStore: RemoteBitmapStore?

    init(link: SourceLink, id: UInt32, formatName: String, virtualSize: UInt64, backingReference: BackingReference?,
         supportsBacking: Bool, clusterSize: UInt64?, bitmaps: [PersistentBitmap]?) {
        self.link = link
        self.id = id
        self.formatName = formatName
        self.virtualSize = virtualSize
        self.backingReference = backingReference
        self.supportsBacking = supportsBacking
        self.clusterSize = clusterSize
        bitmapStore = bitmaps.map { RemoteBitmapStore(link: link, id: id, virtualSize: virtualSize, bitmaps: $0) }
    }

    /// The helper holds the files; the calling process has none (so convert's -C never offloads from them).
    var hostFiles: [HostFile] { [] }
    func allocatedFileSize() -> UInt64? { nil }
    var persistentBitmapStore: PersistentBitmapStore? { bitmapStore }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, backing: GuestReader?) throws {
        guard offset <= virtualSize, UInt64(buffer.count) <= virtualSize - offset else {
            throw InstarError(.range, "read past the end of the image")
        }
        var done = 0
        var allowPlain = true
        while done < buffer.count {
            try CallBudget.checkpoint()
            let n = min(buffer.count - done, SourceLink.maxRead)
            var w = WireWriter()
            w.u8(SourceRequest.read.rawValue)
            w.u32(id)
            w.u64(offset + UInt64(done))
            w.u64(UInt64(n))
            w.bool(allowPlain)
            do {
                _ = try link.request(w.bytes, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)]))
            } catch is PlainRangeUnreadable {
                allowPlain = false
                continue
            }
            allowPlain = true
            done += n
        }
    }

    func blockStatus(at offset: UInt64, length: UInt64) throws -> BlockStatus {
        var w = WireWriter()
        w.u8(SourceRequest.status.rawValue)
        w.u32(id)
        w.u64(offset)
        w.u64(length)
        var r = try link.request(w.bytes)
        let n = try r.u64()
        let bits = try r.u8()
        try r.finish()
        guard n > 0, n <= length, bits < 4 else { throw WireReader.malformed() }
        let data = bits & 1 != 0
        let zero = bits & 2 != 0
        return BlockStatus(length: n, allocated: data || zero, data: data, zero: zero)
    }

    func formatInfo() throws -> FormatInfo { FormatInfo(clusterSize: clusterSize) }
}

/// A source's persistent bitmaps (convert --bitmaps): listed in the description, bits read on request.
final class RemoteBitmapStore: PersistentBitmapStore {
    let link: SourceLink
    let id: UInt32
    let virtualSize: UInt64
    let persistentBitmaps: [PersistentBitmap]

    init(link: SourceLink, id: UInt32, virtualSize: UInt64, bitmaps: [PersistentBitmap]) {
        self.link = link
        self.id = id
        self.virtualSize = virtualSize
        persistentBitmaps = bitmaps
    }

    func readBitmap(named name: String) throws -> [UInt8] {
        guard let bm = persistentBitmaps.first(where: { $0.name == name }), bm.granularity > 0 else {
            throw InstarError(.notFound, "Bitmap '\(name)' not found")
        }
        var w = WireWriter()
        w.u8(SourceRequest.bitmap.rawValue)
        w.u32(id)
        w.str(name)
        var r = try link.request(w.bytes)
        let bits = try r.raw()
        try r.finish()
        // The serialized form: one bit per granule, padded to 64-bit words.
        let granules = virtualSize / bm.granularity + (virtualSize % bm.granularity == 0 ? 0 : 1)
        let expected = (granules / 64 + (granules % 64 == 0 ? 0 : 1)) * 8
        guard UInt64(bits.count) <= expected else { throw WireReader.malformed() }
        return bits
    }

    func addBitmap(_ bitmap: PersistentBitmap, bits: [UInt8]) throws {
        throw InstarError(.permission, "Image is read-only")
    }
}

/// The diagnostics a source's open gave in the helper, for the caller to replay.
final class DiagnosticsBox {
    var items: [Diagnostics.Message] = []
}

extension ConvertOperation.SnapshotSelector {
    init(options: Bool, id: String?, name: String?) {
        self.options = options
        self.id = id
        self.name = name
    }
}

extension IsolatedMode {
    /// Opens convert's sources in a helper. `commandLine` opens as the CLI does (--image-opts, `open.secrets`
    /// from --object, O_DIRECT from -T), otherwise as the C API does (`flags`, `keySecret`). `snapshot` (-l) is
    /// loaded there too. Errors are the messages the in-process open prints ("Could not open 'NAME': ...").
    public static func openSources(_ names: [String], format: String?, commandLine: Bool, imageOpts: Bool = false,
                                   flags: UInt32 = 0, keySecret: String? = nil, backingKeySecret: String? = nil,
                                   open: ImageOpenOptions = ImageOpenOptions(),
                                   snapshot: ConvertOperation.SnapshotSelector? = nil,
                                   warn: ((String) -> Void)? = nil) throws -> IsolatedSources {
        var w = WireWriter()
        w.u64(UInt64(names.count))
        for n in names { w.str(n) }
        w.optStr(format)
        w.bool(commandLine)
        w.bool(imageOpts)
        w.u32(flags & ~UInt32(INSTAR_OPEN_ISOLATED))
        w.optStr(keySecret)
        w.optStr(backingKeySecret)
        open.encodeIsolated(&w)
        w.bool(snapshot != nil)
        if let s = snapshot {
            w.bool(s.options)
            w.optStr(s.id)
            w.optStr(s.name)
        }
        let timeoutMs = CallBudget.current.map { $0.timeoutMs > 0 ? $0.timeoutMs : 0 } ?? 0
        let (session, request) = try spawn(.source, w.bytes)
        session.keepsBrokeredFiles = true
        let link = SourceLink(session: session, callTimeoutMs: timeoutMs)
        var sources: [ImageLayer] = []
        do {
            var r = try link.request(request)
            let nw = try r.count(minSize: 8)
            for _ in 0..<nw {
                let s = try r.str()
                warn?(s)
            }
            // What the drivers reported while opening (qemu's warn_report lines), as the in-process open prints.
            let nd = try r.count(minSize: 9)
            for _ in 0..<nd {
                let text = try r.str()
                Diagnostics.sink?(Diagnostics.Message(text, prefixed: try r.bool()))
            }
            let ns = try r.count(minSize: 8)
            guard ns == names.count else { throw WireReader.malformed() }
            var id: UInt32 = 0
            for _ in 0..<ns {
                let nl = try r.count(minSize: 30)
                guard nl >= 1, nl <= ImageOpener.maxChainDepth + 1 else { throw WireReader.malformed() }
                var formats: [(RemoteSourceFormat, String, String?)] = []
                for depth in 0..<nl {
                    let formatName = try r.str()
                    let size = try r.u64()
                    let supportsBacking = try r.bool()
                    let filename = try r.str()
                    let full = try r.optStr()
                    let backingName = try r.optStr()
                    let backingFormat = try r.optStr()
                    let cluster = try r.optU64()
                    var bitmaps: [PersistentBitmap]?
                    if try r.bool() {
                        let nb = try r.count(minSize: 19)
                        var list: [PersistentBitmap] = []
                        for _ in 0..<nb {
                            let name = try r.str()
                            let granularity = try r.u64()
                            let enabled = try r.bool()
                            let inconsistent = try r.bool()
                            guard granularity > 0 else { throw WireReader.malformed() }
                            list.append(PersistentBitmap(name: name, granularity: granularity, enabled: enabled,
                                                         inconsistent: inconsistent))
                        }
                        bitmaps = list
                    }
                    if depth > 0 && bitmaps != nil { throw WireReader.malformed() }
                    let f = RemoteSourceFormat(link: link, id: id, formatName: formatName, virtualSize: size,
                                               backingReference: backingName.map {
                                                   BackingReference(filename: $0, format: backingFormat)
                                               },
                                               supportsBacking: supportsBacking, clusterSize: cluster,
                                               bitmaps: bitmaps)
                    formats.append((f, filename, full))
                    id += 1
                }
                // The chain from the bottom up.
                var below: ImageLayer?
                for (f, filename, full) in formats.reversed() {
                    below = ImageLayer(format: f, filename: filename, backing: below, fullBackingFilename: full,
                                       writable: false)
                }
                guard let top = below else { throw WireReader.malformed() }
                sources.append(top)
            }
            try r.finish()
        } catch {
            link.close()
            throw error
        }
        return IsolatedSources(layers: sources, link: link)
    }

    // MARK: the helper's side

    /// The helper's work for `.source`: opens the sources, sends their description, then answers requests until
    /// the caller closes the socket. Throws only before the description is sent (helperMain sends the error).
    static func serveSources(_ r: inout WireReader, test: String) throws {
        let nn = try r.count(minSize: 8)
        var names: [String] = []
        for _ in 0..<nn { names.append(try r.str()) }
        let format = try r.optStr()
        let commandLine = try r.bool()
        let imageOpts = try r.bool()
        let flags = try r.u32()
        let keySecret = try r.optStr()
        let backingKeySecret = try r.optStr()
        var open = try ImageOpenOptions.decodeIsolated(&r)
        open.noShareWrite = true
        // Data stored plainly in a file is read by the caller from its copy of the descriptor (not with O_DIRECT,
        // whose alignment rules the caller's buffers need not meet).
        let plainReads = !open.direct && flags & UInt32(INSTAR_OPEN_NO_CACHE) == 0
        var snapshot: ConvertOperation.SnapshotSelector?
        if try r.bool() {
            let options = try r.bool()
            snapshot = ConvertOperation.SnapshotSelector(options: options, id: try r.optStr(), name: try r.optStr())
        }
        try r.finish()
        let warnings = WarningBox()
        let diagnostics = DiagnosticsBox()
        Diagnostics.sink = { m in
            if diagnostics.items.count < 1024 { diagnostics.items.append(m) }
        }
        var sources: [ImageLayer] = []
        defer { for s in sources { try? s.close() } }
        for name in names {
            if commandLine {
                do {
                    let spec = try ImageOpener.commandLineSpec(name, format: format, imageOpts: imageOpts,
                                                               warn: { warnings.items.append($0) })
                    sources.append(try ImageOpener.open(spec, options: open, writable: false))
                } catch let e as InstarError {
                    throw e.prepending("Could not open '\(name)': ")
                }
            } else {
                sources.append(try keySecret.withOptionalCString { k in
                    try backingKeySecret.withOptionalCString { b in
                        try openForOperation(name, format: format, flags: flags, noShareWrite: true, keySecret: k,
                                             backingKeySecret: b)
                    }
                })
            }
        }
        if let sel = snapshot { try ConvertOperation.loadSnapshot(sel, sources: sources) }

        // From here on, what the drivers print while serving reads goes to the caller as frames.
        let sock = Int32(INSTAR_ISOLATE_SOCK_FD)
        Diagnostics.sink = IsolatedMode.diagnosticFrames(sock)
        var out = WireWriter()
        writeWarnings(&out, warnings.items)
        out.u64(UInt64(diagnostics.items.count))
        for m in diagnostics.items {
            out.str(m.text)
            out.bool(m.prefixed)
        }
        out.u64(UInt64(sources.count))
        var layers: [ImageLayer] = []
        for s in sources {
            let chain = s.chain
            out.u64(UInt64(chain.count))
            for (depth, layer) in chain.enumerated() {
                let f = layer.format
                out.str(f.formatName)
                out.u64(layer.virtualSize)
                out.bool(f.supportsBacking)
                out.str(layer.filename)
                out.optStr(layer.fullBackingFilename)
                out.optStr(f.backingReference?.filename)
                out.optStr(f.backingReference?.format)
                out.optU64(depth == 0 ? ((try? f.formatInfo().clusterSize) ?? nil) : nil)
                let store = depth == 0 ? f.persistentBitmapStore : nil
                out.bool(store != nil)
                if let store {
                    out.u64(UInt64(store.persistentBitmaps.count))
                    for b in store.persistentBitmaps {
                        out.str(b.name)
                        out.u64(b.granularity)
                        out.bool(b.enabled)
                        out.bool(b.inconsistent)
                    }
                }
                layers.append(layer)
            }
        }
        guard sendFrame(sock, .result, out.bytes) else { return }

        // Test hooks of the serving phase: "abort-read:N", "hang-read:N", "garbage-read:N",
        // "unreadable-plain-read:N" act on the N-th read.
        var hookAction = ""
        var hookAt = 0
        if let colon = test.firstIndex(of: ":"), test[..<colon].hasSuffix("-read"), let n = Int(test[test.index(after: colon)...]) {
            hookAction = String(test[..<colon])
            hookAt = n
        }
        var reads = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: SourceLink.maxRead, alignment: 4096)
        defer { buffer.deallocate() }
        while true {
            guard let (type, payload) = try? readFrameBlocking(sock), type == IsolateFrame.request.rawValue else {
                return
            }
            var q = WireReader(payload)
            do {
                guard let kind = SourceRequest(rawValue: try q.u8()) else { throw WireReader.malformed() }
                let index = Int(try q.u32())
                guard index < layers.count else { throw InstarError.invalid("no such layer") }
                let layer = layers[index]
                switch kind {
                case .status:
                    let offset = try q.u64()
                    let length = try q.u64()
                    try q.finish()
                    let s = try layerOnlyStatus(layer, at: offset, length: length)
                    var a = WireWriter()
                    a.u64(s.length)
                    a.u8((s.data ? 1 : 0) | (s.zero ? 2 : 0))
                    guard sendFrame(sock, .result, a.bytes) else { return }
                case .read:
                    let offset = try q.u64()
                    let length = try q.u64()
                    let allowPlain = try q.bool()
                    try q.finish()
                    guard length <= UInt64(SourceLink.maxRead) else { throw InstarError.invalid("read too large") }
                    reads += 1
                    if reads == hookAt {
                        switch hookAction {
                        case "abort-read": abort()
                        case "hang-read": while instar_shim_o_direct() != -12345 {}
                        case "garbage-read":
                            var g = WireWriter()
                            g.u32(77)
                            g.u64(4)
                            g.u32(0xdead_beef)
                            _ = sendAll(sock, g.bytes)
                            continue
                        case "unreadable-plain-read":
                            // A plain range in a file the caller does not hold: it must ask again for the bytes.
                            var a = WireWriter()
                            a.str("/nonexistent/plain-range")
                            a.u64(0)
                            guard sendFrame(sock, .plain, a.bytes) else { return }
                            continue
                        default: break
                        }
                    }
                    if plainReads && allowPlain, let (path, host) = plainRange(layer, at: offset, length: length) {
                        var a = WireWriter()
                        a.str(path)
                        a.u64(host)
                        guard sendFrame(sock, .plain, a.bytes) else { return }
                        continue
                    }
                    let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(length)])
                    try layer.read(into: part, at: offset)
                    var head = WireWriter()
                    head.u32(IsolateFrame.result.rawValue)
                    head.u64(length)
                    guard sendAll(sock, head.bytes), sendRaw(sock, UnsafeRawBufferPointer(part)) else { return }
                case .bitmap:
                    let name = try q.str()
                    try q.finish()
                    guard let store = layer.format.persistentBitmapStore else {
                        throw InstarError.unsupported("Source lacks bitmap support")
                    }
                    var a = WireWriter()
                    a.raw(try store.readBitmap(named: name))
                    guard sendFrame(sock, .result, a.bytes) else { return }
                }
            } catch {
                var f = WireWriter()
                f.error((error as? InstarError) ?? (error as? StepError)?.instarError ?? InstarError(.io, "\(error)"))
                guard sendFrame(sock, .failure, f.bytes) else { return }
            }
        }
    }

    /// One layer's status as its driver gives it, with a data range over a hole of the host file (RECURSE) seen
    /// as zero: the caller's chain walk adds the generic rules (backing, supportsBacking) itself.
    static func layerOnlyStatus(_ layer: ImageLayer, at offset: UInt64, length: UInt64) throws -> ChainBlockStatus {
        let total = layer.virtualSize
        guard offset < total, length > 0 else {
            throw InstarError(.range, "block status queried past the end of the image")
        }
        let bytes = min(length, total - offset)
        let s = try layer.format.blockStatus(at: offset, length: bytes)
        guard s.length > 0 else { throw InstarError.corrupt("block status of offset \(offset) reported no bytes") }
        var out = ChainBlockStatus(length: min(s.length, bytes), allocated: s.data || s.zero, data: s.data,
                                   zero: s.zero, hostOffset: nil, hostFile: nil, depth: 0, eof: false)
        if s.recurse, s.data, !s.zero, let host = s.hostOffset, let name = s.hostFile,
           let file = layer.format.hostFiles.first(where: { $0.path == name }) {
            try ChainStatus.recurseIntoHostFile(file, hostOffset: host, status: &out)
        }
        return out
    }

    /// Where the guest range [offset, +length) of `layer`'s chain is stored plainly, in one piece, inside one
    /// whole file (data, not zero, not past the file's end): the file's name as the broker opened it, and the
    /// offset. Nil when it is not (compressed, encrypted, split, a hole), or on any error (the read then reports it).
    static func plainRange(_ layer: ImageLayer, at offset: UInt64, length: UInt64) -> (String, UInt64)? {
        guard length > 0, offset < layer.virtualSize, length <= layer.virtualSize - offset,
              let st = try? ChainStatus.aboveStatus(layer, at: offset, length: length),
              st.data, !st.zero, st.length >= length, let host = st.hostOffset, let name = st.hostFile else {
            return nil
        }
        let chain = layer.chain
        guard st.depth < chain.count,
              let file = chain[st.depth].format.hostFiles.first(where: { $0.path == name }),
              file.isWholeLocalFile, !file.direct,
              let size = try? file.size(), host <= size, length <= size - host else { return nil }
        return (name, host)
    }

    static func sendFrame(_ sock: Int32, _ type: IsolateFrame, _ payload: [UInt8]) -> Bool {
        var head = WireWriter()
        head.u32(type.rawValue)
        head.u64(UInt64(payload.count))
        return sendAll(sock, head.bytes + payload)
    }

    static func sendRaw(_ sock: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        var off = 0
        while off < bytes.count {
            let n = instar_isolate_send(sock, base + off, bytes.count - off, -1)
            if n == -Int(EAGAIN) {
                var p = pollfd(fd: sock, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 1000)
                continue
            }
            if n <= 0 { return false }
            off += n
        }
        return true
    }
}
