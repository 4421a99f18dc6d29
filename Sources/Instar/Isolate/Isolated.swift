import CInstar
import Glibc

// Isolated mode (INSTAR_OPEN_ISOLATED, `instar --isolated`; docs/isolated.md): the image is parsed by a
// short-lived helper process, `instar-isolate`, which the library starts with posix_spawn. The helper has no
// filesystem access: every file it wants (the image, its backing files, extents) it asks the calling process
// for over its socket, and the caller opens it read-only and passes the descriptor (SCM_RIGHTS). Before it reads
// a byte of an image the helper locks itself down (rlimits on address space and CPU, no core dumps, no new
// privileges, a seccomp-BPF allowlist). Its result crosses back as bytes (IsolateWire.swift) decoded into the same
// Swift values the in-process call produces, so every output (C structs, qemu's JSON, human text) is built by the
// same code. A helper that crashes, is killed or overruns its deadline is an error of the call.

/// One operation a helper runs.
enum IsolatedOp: UInt8 {
    case info = 1
    case check = 2
    case map = 3
    case measure = 4
    case compare = 5
    /// The reading side of convert: the helper opens the sources and then answers block-status, read and bitmap
    /// requests until the caller closes it (IsolatedSource.swift).
    case source = 6
}

/// Frame types on the helper's socket: a frame is u32 type, u64 length, then the payload.
enum IsolateFrame: UInt32 {
    case open = 1      // helper -> caller: u32 flags, path (instar_broker_open)
    case request = 2   // caller -> helper
    case result = 3    // helper -> caller: the operation's encoded result
    case failure = 4   // helper -> caller: an InstarError
    case progress = 5  // helper -> caller: f64 percent (the caller's progress callback may cancel)
    case plain = 6     // helper -> caller, answering a convert source's read: path, u64 offset (IsolatedSource)
    case diagnostic = 7 // helper -> caller, before the answer: a Diagnostics message (text, prefixed) to replay
}

/// The caller could not read a plain range the helper pointed it to: it asks for the bytes instead.
struct PlainRangeUnreadable: Error {}

public enum IsolatedMode {
    /// The helper's address-space limit when the caller gives none (INSTAR_ISOLATE_AS_MB overrides it).
    static let defaultAddressSpace: UInt64 = 1 << 30
    /// The helper's CPU seconds and wall-clock time when the call has no limits (INSTAR_ISOLATE_TIMEOUT_MS
    /// overrides the wall-clock default).
    static let defaultCPUSeconds: UInt64 = 30
    static let defaultTimeoutMs: Int64 = 60_000
    /// Bounds on what a helper may ask for or send back.
    static let maxOpens = 8192
    static let maxResultBytes: UInt64 = 256 << 20

    // MARK: operations (caller side)

    /// InfoOperation.collect, run in a helper.
    public static func collectInfo(_ name: String, options: InfoOperation.Options) throws -> [ImageInfo] {
        var w = WireWriter()
        w.str(name)
        w.optStr(options.format)
        w.bool(options.backingChain)
        w.bool(options.imageOpts)
        options.open.encodeIsolated(&w)
        var r = try call(.info, w.bytes)
        try replayWarnings(&r, options.warn)
        let n = try r.count(minSize: 30)
        var list: [ImageInfo] = []
        for _ in 0..<n { list.append(try ImageInfo.decode(&r)) }
        try r.finish()
        return list
    }

    /// CheckOperation.run, read-only, in a helper: the messages the check printed are replayed to `messages`.
    /// Repairs need a writable image and are refused.
    public static func runCheck(_ name: String, options: CheckOperation.Options,
                                messages: (CheckMessage) -> Void) throws -> CheckOperation.Outcome {
        guard options.repair.isEmpty else {
            throw InstarError.invalid("Isolated mode is read-only: it cannot repair an image")
        }
        var w = WireWriter()
        w.str(name)
        w.optStr(options.format)
        w.bool(options.imageOpts)
        options.open.encodeIsolated(&w)
        var r = try call(.check, w.bytes)
        try replayWarnings(&r, options.warn)
        let nm = try r.count(minSize: 9)
        for _ in 0..<nm {
            let text = try r.str()
            messages(CheckMessage(text, errorReport: try r.bool()))
        }
        switch try r.u8() {
        case 0: break
        case 1: throw CheckNotSupported()
        default: throw WireReader.malformed()
        }
        var outcome = CheckOperation.Outcome()
        if try r.bool() { outcome.repaired = (try r.i64(), try r.i64()) }
        if try r.bool() {
            let filename = try r.str()
            let format = try r.str()
            outcome.report = ImageCheckReport(filename: filename, format: format, result: try CheckResult.decode(&r))
        }
        if try r.bool() { outcome.failureErrno = Int32(bitPattern: try r.u32()) }
        try r.finish()
        return outcome
    }

    /// What a map walk produced in a helper: its entries, and the error that stopped the walk, if one did.
    public struct MapWalk {
        public var entries: [MapEntry]
        public var error: InstarError?
    }

    /// Opens `name` read-only and walks its map (MapOperation.walk) in a helper. Open errors throw with
    /// qemu-img's "Could not open 'NAME': " prefix; an error of the walk comes back in `error` after the entries
    /// emitted before it.
    public static func mapWalk(_ name: String, format: String?, imageOpts: Bool, open: ImageOpenOptions,
                               start: UInt64, maxLength: UInt64?, humanCoalescing: Bool, openBacking: Bool = true,
                               warn: ((String) -> Void)? = nil) throws -> MapWalk {
        var w = WireWriter()
        w.str(name)
        w.optStr(format)
        w.bool(imageOpts)
        open.encodeIsolated(&w)
        w.u64(start)
        w.optU64(maxLength)
        w.bool(humanCoalescing)
        w.bool(openBacking)
        var r = try call(.map, w.bytes)
        try replayWarnings(&r, warn)
        let n = try r.count(minSize: 20)
        var entries: [MapEntry] = []
        entries.reserveCapacity(n)
        for _ in 0..<n { entries.append(try MapEntry.decode(&r)) }
        let error = try r.bool() ? try r.error() : nil
        try r.finish()
        return MapWalk(entries: entries, error: error)
    }

    /// Measure.measure in a helper (only when it reads an image: a measure by size parses nothing and runs in
    /// the caller).
    public static func measure(_ p: Measure.Parameters) throws -> MeasureResult {
        guard p.filename != nil else { return try Measure.measure(p) }
        var w = WireWriter()
        w.optStr(p.filename)
        w.optStr(p.sourceFormat)
        w.bool(p.imageOpts)
        w.str(p.outputFormat)
        w.optStr(p.options)
        w.optU64(p.size)
        w.bool(p.forceShare)
        w.optStr(p.keySecret)
        w.strMap(p.secrets)
        var r = try call(.measure, w.bytes)
        try replayWarnings(&r, p.warn)
        let required = try r.u64()
        let full = try r.u64()
        let bitmaps = try r.optU64()
        try r.finish()
        return MeasureResult(required: required, fullyAllocated: full, bitmaps: bitmaps)
    }

    /// How an isolated compare ended: its result, or qemu-img compare's exit status and stderr line for the
    /// failure together with the error the call returns.
    public enum CompareOutcome {
        case result(CompareResult)
        case failure(status: Int32, line: String, error: InstarError)
    }

    /// Opens both images read-only and compares them (instar_compare) in a helper; its progress reports reach
    /// `progress`, which may throw to cancel (the helper is then killed).
    /// `commandLine` opens as the CLI does (--image-opts names, `open.secrets` from --object, O_DIRECT) instead
    /// of as the C API does.
    public static func compare(_ names: (String, String), formats: (String?, String?), flags: UInt32,
                               keys: (String?, String?), strict: Bool, commandLine: Bool = false,
                               imageOpts: Bool = false, open: ImageOpenOptions = ImageOpenOptions(),
                               backingKeys: (String?, String?) = (nil, nil),
                               progress: ((Double) throws -> Void)?) throws -> CompareOutcome {
        var w = WireWriter()
        w.str(names.0)
        w.str(names.1)
        w.optStr(formats.0)
        w.optStr(formats.1)
        w.u32(flags & ~UInt32(INSTAR_OPEN_ISOLATED))
        w.optStr(keys.0)
        w.optStr(keys.1)
        w.bool(strict)
        w.bool(commandLine)
        w.bool(imageOpts)
        open.encodeIsolated(&w)
        w.optStr(backingKeys.0)
        w.optStr(backingKeys.1)
        var r = try call(.compare, w.bytes, progress: progress)
        switch try r.u8() {
        case 0:
            let identical = try r.bool()
            let sizeMismatch = try r.bool()
            let offset = try r.optU64()
            let message = try r.str()
            try r.finish()
            return .result(CompareResult(identical: identical, sizeMismatch: sizeMismatch, mismatchOffset: offset,
                                         message: message))
        case 1:
            let status = Int32(bitPattern: try r.u32())
            let line = try r.str()
            let e = try r.error()
            try r.finish()
            return .failure(status: status, line: line, error: e)
        default:
            throw WireReader.malformed()
        }
    }

    private static func replayWarnings(_ r: inout WireReader, _ warn: ((String) -> Void)?) throws {
        let n = try r.count(minSize: 8)
        for _ in 0..<n {
            let s = try r.str()
            warn?(s)
        }
    }

    // MARK: the helper process (caller side)

    /// Where the helper is: $INSTAR_HELPER, then beside the library or program that holds this code
    /// (`../libexec/instar-isolate`, then the same directory), then the install prefixes' libexec.
    static func helperPath() throws -> String {
        if let p = getenv("INSTAR_HELPER") {
            let s = String(cString: p)
            if !s.isEmpty { return s }
        }
        var candidates: [String] = []
        for dir in [ownDirectory(), executableDirectory()].compactMap({ $0 }) {
            candidates.append(dir + "/../libexec/instar-isolate")
            candidates.append(dir + "/instar-isolate")
        }
        candidates.append("/usr/local/libexec/instar-isolate")
        candidates.append("/usr/libexec/instar-isolate")
        for c in candidates where access(c, X_OK) == 0 { return c }
        throw InstarError(.isolation, "Could not find the isolated helper instar-isolate (set INSTAR_HELPER)")
    }

    /// The directory of the shared object (or program) this code was loaded from.
    private static func ownDirectory() -> String? {
        guard let f = instar_isolate_own_path() else { return nil }
        let path = String(cString: f)
        guard path.hasPrefix("/"), let slash = path.lastIndex(of: "/") else { return nil }
        return String(path[..<slash])
    }

    private static func executableDirectory() -> String? {
        guard let p = realpath("/proc/self/exe", nil) else { return nil }
        defer { free(p) }
        let path = String(cString: p)
        guard let slash = path.lastIndex(of: "/") else { return nil }
        return String(path[..<slash])
    }

    static func envNumber(_ name: String) -> Int64? {
        guard let p = getenv(name) else { return nil }
        return Int64(String(cString: p))
    }

    /// Runs `op` in a new helper and returns its encoded result (or throws the helper's error, or an error
    /// saying how the helper ended).
    static func call(_ op: IsolatedOp, _ payload: [UInt8],
                     progress: ((Double) throws -> Void)? = nil) throws -> WireReader {
        let (session, request) = try spawn(op, payload)
        defer { session.finish() }
        return try session.run(request: request, progress: progress)
    }

    /// Starts a helper for `op` and returns it with the request to send it first (the call's limits, the test
    /// hook and `payload`). The caller must `finish()` the session. A convert source has no CPU rlimit unless
    /// the call sets one (a long copy may rightly use minutes of CPU); each of its requests has the wall-clock
    /// deadline instead.
    static func spawn(_ op: IsolatedOp, _ payload: [UInt8]) throws -> (HelperSession, [UInt8]) {
        let budget = CallBudget.current
        let timeoutMs = budget.map { $0.timeoutMs > 0 ? $0.timeoutMs : 0 } ?? 0
        let cpuMs = budget.map { $0.cpuMs > 0 ? $0.cpuMs : 0 } ?? 0
        let wallMs = timeoutMs > 0 ? timeoutMs : (envNumber("INSTAR_ISOLATE_TIMEOUT_MS") ?? defaultTimeoutMs)
        let cpuSeconds = cpuMs > 0 ? UInt64(cpuMs + 999) / 1000 : (op == .source ? 0 : defaultCPUSeconds)
        var addressSpace = defaultAddressSpace
        if let mb = envNumber("INSTAR_ISOLATE_AS_MB"), mb > 0, mb < 1 << 24 { addressSpace = UInt64(mb) << 20 }

        var w = WireWriter()
        w.u8(op.rawValue)
        w.u64(addressSpace)
        w.u64(cpuSeconds)
        w.i64(timeoutMs)
        w.i64(cpuMs)
        w.str(getenv("INSTAR_ISOLATE_TEST").map { String(cString: $0) } ?? "")
        // The caller's instar_object_add secrets, which its in-process opens would consult (TLS credentials are
        // not passed: a helper opens no network connection).
        w.strMap(ObjectRegistry.allSecrets())
        w.bytes.append(contentsOf: payload)

        let helper = try helperPath()
        var fds: [Int32] = [-1, -1]
        let rc = instar_isolate_socketpair(&fds)
        if rc < 0 { throw InstarError.system(-rc, "Could not start the isolated helper") }
        var pid: Int32 = 0
        let src = instar_isolate_spawn(helper, fds[1], &pid)
        Glibc.close(fds[1])
        if src < 0 {
            Glibc.close(fds[0])
            throw InstarError(.isolation, "Could not start the isolated helper '\(helper)': \(strerrorString(-src))",
                              errno: -src)
        }
        let session = HelperSession(sock: fds[0], pid: pid, deadline: CallBudget.now(CLOCK_MONOTONIC)
                                        &+ UInt64(max(1, wallMs)) &* 1_000_000, wallMs: wallMs)
        return (session, w.bytes)
    }

    // MARK: the helper process (helper side)

    /// The helper's main (the `instar-isolate` program): reads one request from fd 3, locks itself down, runs the
    /// request and sends the result. Returns the process's exit status.
    public static func helperMain() -> Int32 {
        instar_isolate_die_at_parent_exit()
        let sock = Int32(INSTAR_ISOLATE_SOCK_FD)
        guard let (type, payload) = try? readFrameBlocking(sock), type == IsolateFrame.request.rawValue else {
            return 2
        }
        var r = WireReader(payload)
        var out = WireWriter()
        var frame = IsolateFrame.result
        do {
            guard let op = IsolatedOp(rawValue: try r.u8()) else { throw WireReader.malformed() }
            let addressSpace = try r.u64()
            let cpuSeconds = try r.u64()
            let timeoutMs = try r.i64()
            let cpuMs = try r.i64()
            let test = try r.str()
            ObjectRegistry.install(try r.strMap())
            // Libraries that read files on first use (libgcrypt's FIPS check) get that done before the lockdown.
            Gcrypt.ensureReady()
            instar_broker_fd = sock
            let lrc = instar_isolate_lockdown(addressSpace, cpuSeconds)
            if lrc < 0 {
                throw InstarError(.isolation, "The isolated helper could not confine itself: \(strerrorString(-lrc))")
            }
            try runTestHook(test)
            // What the drivers print while they work (a qcow2 corruption event, qemu's warn_report lines) goes
            // to the caller as it happens, to be printed there in its place among the answers.
            Diagnostics.sink = diagnosticFrames(sock)
            if op == .source {
                // Sends its own frames: the sources' description, then one answer per request until closed.
                try CallBudget.run(CallBudget.make(timeoutMs: timeoutMs, cpuMs: cpuMs)) {
                    try serveSources(&r, test: test)
                }
                return 0
            }
            try CallBudget.run(CallBudget.make(timeoutMs: timeoutMs, cpuMs: cpuMs)) {
                try runOp(op, &r, &out)
            }
        } catch let e as InstarError {
            out = WireWriter()
            out.error(e)
            frame = .failure
        } catch {
            out = WireWriter()
            out.error(InstarError(.io, "\(error)"))
            frame = .failure
        }
        var head = WireWriter()
        head.u32(frame.rawValue)
        head.u64(UInt64(out.bytes.count))
        guard sendAll(sock, head.bytes), sendAll(sock, out.bytes) else { return 2 }
        return 0
    }

    /// The most diagnostic frames a helper sends (and a caller replays) in one session.
    static let maxDiagnostics = 1024

    /// A Diagnostics sink for the helper: each message as a `.diagnostic` frame on `sock`, up to
    /// `maxDiagnostics` of them.
    static func diagnosticFrames(_ sock: Int32) -> (Diagnostics.Message) -> Void {
        let sent = AtomicCounter()
        return { m in
            guard sent.value < UInt64(maxDiagnostics) else { return }
            sent.increment()
            var w = WireWriter()
            w.str(m.text)
            w.bool(m.prefixed)
            _ = sendFrame(sock, .diagnostic, w.bytes)
        }
    }

    /// Test hooks (INSTAR_ISOLATE_TEST in the caller's environment), run after the lockdown: "abort" crashes the
    /// helper, "hang" spins until it is killed, "open" calls open(2), which the filter must kill.
    private static func runTestHook(_ test: String) throws {
        switch test {
        case "abort":
            abort()
        case "hang":
            // An opaque call each round, so the optimizer keeps the loop.
            while instar_shim_o_direct() != -12345 {}
        case "open":
            let fd = instar_isolate_test_open("/etc/passwd")
            throw InstarError(.isolation, "open(2) in the isolated helper returned \(fd): the filter is not enforced")
        default:
            break
        }
    }

    private static func runOp(_ op: IsolatedOp, _ r: inout WireReader, _ out: inout WireWriter) throws {
        let collected = WarningBox()
        let warn: (String) -> Void = { collected.items.append($0) }
        var warnings: [String] { collected.items }
        switch op {
        case .source:
            throw WireReader.malformed()
        case .measure:
            try runMeasure(&r, &out, warn) { collected.items }
        case .compare:
            try runCompare(&r, &out)
        case .info:
            let name = try r.str()
            var o = InfoOperation.Options()
            o.format = try r.optStr()
            o.backingChain = try r.bool()
            o.imageOpts = try r.bool()
            o.open = try ImageOpenOptions.decodeIsolated(&r)
            try r.finish()
            o.warn = warn
            let list = try InfoOperation.collect(name, options: o)
            writeWarnings(&out, warnings)
            out.u64(UInt64(list.count))
            for i in list { i.encode(&out) }
        case .check:
            let name = try r.str()
            var o = CheckOperation.Options()
            o.format = try r.optStr()
            o.imageOpts = try r.bool()
            o.open = try ImageOpenOptions.decodeIsolated(&r)
            try r.finish()
            o.warn = warn
            var messages: [CheckMessage] = []
            var outcome: CheckOperation.Outcome?
            do {
                outcome = try CheckOperation.run(name, options: o) { messages.append($0) }
            } catch is CheckNotSupported {
                outcome = nil
            }
            writeWarnings(&out, warnings)
            out.u64(UInt64(messages.count))
            for m in messages {
                out.str(m.text)
                out.bool(m.errorReport)
            }
            guard let outcome else {
                out.u8(1)
                return
            }
            out.u8(0)
            out.bool(outcome.repaired != nil)
            if let fixed = outcome.repaired {
                out.i64(fixed.leaks)
                out.i64(fixed.corruptions)
            }
            out.bool(outcome.report != nil)
            if let rep = outcome.report {
                out.str(rep.filename)
                out.str(rep.format)
                rep.result.encode(&out)
            }
            out.bool(outcome.failureErrno != nil)
            if let e = outcome.failureErrno { out.u32(UInt32(bitPattern: e)) }
        case .map:
            let name = try r.str()
            let format = try r.optStr()
            let imageOpts = try r.bool()
            let open = try ImageOpenOptions.decodeIsolated(&r)
            let start = try r.u64()
            let maxLength = try r.optU64()
            let human = try r.bool()
            let openBacking = try r.bool()
            try r.finish()
            if imageOpts && format != nil {
                throw InstarError.invalid("--image-opts and --format are mutually exclusive")
            }
            let layer: ImageLayer
            do {
                let spec = try ImageOpener.commandLineSpec(name, format: format, imageOpts: imageOpts, warn: warn)
                layer = try ImageOpener.open(spec, options: open, writable: false, openBacking: openBacking)
            } catch let e as InstarError {
                throw e.prepending("Could not open '\(name)': ")
            }
            defer { try? layer.close() }
            var entries: [MapEntry] = []
            var walkError: InstarError?
            do {
                try MapOperation.walk(layer, start: start, maxLength: maxLength, humanCoalescing: human) { e, _ in
                    entries.append(e)
                }
            } catch let e as InstarError {
                walkError = e
            }
            writeWarnings(&out, warnings)
            out.u64(UInt64(entries.count))
            for e in entries { e.encode(&out) }
            out.bool(walkError != nil)
            if let walkError { out.error(walkError) }
        }
    }

    private static func runMeasure(_ r: inout WireReader, _ out: inout WireWriter, _ warn: @escaping (String) -> Void,
                                   _ warnings: () -> [String]) throws {
        var p = Measure.Parameters()
        p.filename = try r.optStr()
        p.sourceFormat = try r.optStr()
        p.imageOpts = try r.bool()
        p.outputFormat = try r.str()
        p.options = try r.optStr()
        p.size = try r.optU64()
        p.forceShare = try r.bool()
        p.keySecret = try r.optStr()
        p.secrets = try r.strMap()
        try r.finish()
        p.warn = warn
        let m = try Measure.measure(p)
        writeWarnings(&out, warnings())
        out.u64(m.required)
        out.u64(m.fullyAllocated)
        out.optU64(m.bitmaps)
    }

    private static func runCompare(_ r: inout WireReader, _ out: inout WireWriter) throws {
        let names = (try r.str(), try r.str())
        let formats = (try r.optStr(), try r.optStr())
        let flags = try r.u32()
        let keys = (try r.optStr(), try r.optStr())
        let strict = try r.bool()
        let commandLine = try r.bool()
        let imageOpts = try r.bool()
        let cliOpen = try ImageOpenOptions.decodeIsolated(&r)
        let backingKeys = (try r.optStr(), try r.optStr())
        try r.finish()
        var opening = true
        func openOne(_ name: String, _ format: String?, _ key: String?, _ backingKey: String?) throws -> ImageLayer {
            guard commandLine else {
                return try key.withOptionalCString { k in
                    try backingKey.withOptionalCString { b in
                        try openForOperation(name, format: format, flags: flags, keySecret: k, backingKeySecret: b)
                    }
                }
            }
            do {
                let spec = try ImageOpener.commandLineSpec(name, format: format, imageOpts: imageOpts, warn: nil)
                return try ImageOpener.open(spec, options: cliOpen, writable: false)
            } catch let e as InstarError {
                throw e.prepending("Could not open '\(name)': ")
            }
        }
        do {
            let a = try openOne(names.0, formats.0, keys.0, backingKeys.0)
            defer { try? a.close() }
            let b = try openOne(names.1, formats.1, keys.1, backingKeys.1)
            defer { try? b.close() }
            opening = false
            let sock = Int32(INSTAR_ISOLATE_SOCK_FD)
            let c = try CompareOperation.compare(a, b, strict: strict, progress: { percent in
                var f = WireWriter()
                f.u32(IsolateFrame.progress.rawValue)
                f.u64(8)
                f.u64(percent.bitPattern)
                if !sendAll(sock, f.bytes) { throw InstarError(.cancelled, "Operation cancelled") }
            })
            out.u8(0)
            out.bool(c.identical)
            out.bool(c.sizeMismatch)
            out.optU64(c.mismatchOffset)
            out.str(c.message)
        } catch {
            let (status, line) = compareFailure(error, opening: opening, names: names)
            out.u8(1)
            out.u32(UInt32(bitPattern: status))
            out.str(line)
            out.error((error as? InstarError) ?? (error as? StepError)?.instarError ?? InstarError(.io, "\(error)"))
        }
    }

    static func writeWarnings(_ out: inout WireWriter, _ warnings: [String]) {
        out.u64(UInt64(warnings.count))
        for s in warnings { out.str(s) }
    }

    // MARK: socket plumbing

    static func sendAll(_ sock: Int32, _ bytes: [UInt8], fd: Int32 = -1) -> Bool {
        var off = 0
        var passFd = fd
        if bytes.isEmpty { return true }
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { b in
                instar_isolate_send(sock, b.baseAddress! + off, b.count - off, passFd)
            }
            if n == -Int(EAGAIN) {
                var p = pollfd(fd: sock, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 1000)
                continue
            }
            if n <= 0 { return false }
            passFd = -1
            off += n
        }
        return true
    }

    /// One whole frame from a blocking socket (the helper's side).
    static func readFrameBlocking(_ sock: Int32) throws -> (UInt32, [UInt8]) {
        func exact(_ n: Int) throws -> [UInt8] {
            var buf = [UInt8](repeating: 0, count: n)
            var got = 0
            while got < n {
                var fd: Int32 = -1
                let k = buf.withUnsafeMutableBytes { b in
                    instar_isolate_recv(sock, b.baseAddress! + got, n - got, &fd)
                }
                if fd >= 0 { Glibc.close(fd) }
                if k <= 0 { throw InstarError(.isolation, "The isolated helper's socket closed") }
                got += k
            }
            return buf
        }
        var head = WireReader(try exact(12))
        let type = try head.u32()
        let len = try head.u64()
        guard len <= maxResultBytes else { throw WireReader.malformed() }
        return (type, try exact(Int(len)))
    }
}

/// The warnings an operation in the helper gave, collected for the caller.
final class WarningBox {
    var items: [String] = []
}

/// One helper process seen from the caller: serves its open requests and collects its result before the
/// deadline, then kills and reaps it whatever happened.
final class HelperSession {
    let sock: Int32
    let pid: Int32
    var deadline: UInt64
    var wallMs: Int64
    var timedOut = false
    var reaped = false

    init(sock: Int32, pid: Int32, deadline: UInt64, wallMs: Int64) {
        self.sock = sock
        self.pid = pid
        self.deadline = deadline
        self.wallMs = wallMs
        _ = fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK)
    }

    /// The last `run` ended with an error the helper sent (a failure frame): the helper itself is fine.
    var answeredWithError = false
    private var finished = false

    /// Closes the socket and kills and reaps the helper; later calls do nothing.
    func finish() {
        if finished { return }
        finished = true
        Glibc.close(sock)
        for fd in brokered.values { Glibc.close(fd) }
        brokered = [:]
        if !reaped {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
    }

    /// Files the helper opened through the broker, over the whole session.
    var opens = 0
    /// Diagnostic frames received over the whole session (those past `maxDiagnostics` are not replayed).
    var diagnostics = 0

    /// Sends `request` and serves the helper's open requests until its answer: the result (or its error). With
    /// `into`, the result must be exactly `into.count` bytes and is received straight into it (an empty reader
    /// is returned).
    func run(request: [UInt8], progress: ((Double) throws -> Void)?,
             into: UnsafeMutableRawBufferPointer? = nil) throws -> WireReader {
        var head = WireWriter()
        head.u32(IsolateFrame.request.rawValue)
        head.u64(UInt64(request.count))
        answeredWithError = false
        try send(head.bytes + request)
        while true {
            let h = try receive(12)
            var hr = WireReader(h)
            let type = try hr.u32()
            let len = try hr.u64()
            guard len <= IsolatedMode.maxResultBytes else { throw WireReader.malformed() }
            if let buffer = into, type == IsolateFrame.result.rawValue {
                guard len == UInt64(buffer.count) else { throw WireReader.malformed() }
                try receive(into: buffer)
                return WireReader([])
            }
            if let buffer = into, type == IsolateFrame.plain.rawValue {
                // The bytes are stored plainly in a file the broker opened: read them from the caller's copy
                // of that descriptor (no parsing; the helper could read them itself).
                guard len <= 1 << 16 else { throw WireReader.malformed() }
                var r = WireReader(try receive(Int(len)))
                let path = try r.str()
                let offset = try r.u64()
                try r.finish()
                guard readBrokered(path, at: offset, into: buffer) else { throw PlainRangeUnreadable() }
                return WireReader([])
            }
            let body = try receive(Int(len))
            switch IsolateFrame(rawValue: type) {
            case .open?:
                opens += 1
                guard opens <= IsolatedMode.maxOpens else {
                    throw InstarError(.isolation, "The isolated helper asked for too many files")
                }
                try serveOpen(body)
            case .diagnostic?:
                var dr = WireReader(body)
                let text = try dr.str()
                let prefixed = try dr.bool()
                try dr.finish()
                diagnostics += 1
                if diagnostics <= IsolatedMode.maxDiagnostics {
                    Diagnostics.sink?(Diagnostics.Message(text, prefixed: prefixed))
                }
            case .progress?:
                var pr = WireReader(body)
                let percent = Double(bitPattern: try pr.u64())
                try pr.finish()
                try progress?(percent)
            case .result?:
                return WireReader(body)
            case .failure?:
                var r = WireReader(body)
                let e = try r.error()
                try r.finish()
                answeredWithError = true
                throw e
            default:
                throw WireReader.malformed()
            }
        }
    }

    /// The descriptors the broker opened, by name, kept (when `keepsBrokeredFiles`) for plain-range reads.
    var keepsBrokeredFiles = false
    private var brokered: [String: Int32] = [:]

    /// Exactly `buffer.count` bytes of the brokered file `path` at `offset`; false when it is not one, or it is
    /// shorter.
    private func readBrokered(_ path: String, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        guard let fd = brokered[path], let base = buffer.baseAddress, offset <= UInt64(Int64.max),
              UInt64(buffer.count) <= UInt64(Int64.max) - offset else { return false }
        var done = 0
        while done < buffer.count {
            let n = pread(fd, base + done, buffer.count - done, off_t(offset + UInt64(done)))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    /// The broker: a read-only open of the name the helper asks for, or a refusal (-errno).
    private func serveOpen(_ body: [UInt8]) throws {
        var r = WireReader(body)
        let flags = Int32(bitPattern: try r.u32())
        let pathBytes = try r.take(r.remaining)
        var result: Int32 = 0
        var fd: Int32 = -1
        let allowed = O_RDONLY | O_CLOEXEC | instar_shim_o_direct()
        if pathBytes.contains(0) || pathBytes.isEmpty {
            result = -ENOENT
        } else if flags & O_ACCMODE != O_RDONLY || flags & ~allowed != 0 {
            result = -EROFS
        } else {
            let path = String(decoding: pathBytes, as: UTF8.self)
            fd = Glibc.open(path, (flags & allowed) | O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
            if fd < 0 { result = -errno } else {
                var st = stat()
                let kind = fstat(fd, &st) == 0 ? st.st_mode & S_IFMT : 0
                let nullDevice = kind == S_IFCHR && path == "/dev/null"
                if kind != S_IFREG && kind != S_IFBLK && kind != S_IFDIR && !nullDevice {
                    // Only regular files and block devices are images (a directory is refused by the helper
                    // with qemu's message, /dev/null stands under fileless nodes); FIFOs, sockets and other
                    // character devices could block the helper or hand it a terminal.
                    Glibc.close(fd)
                    fd = -1
                    result = -EACCES
                } else {
                    // Back to blocking I/O for the helper's reads.
                    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
                }
            }
        }
        var w = WireWriter()
        w.u32(UInt32(bitPattern: result))
        var keep = false
        if fd >= 0 && keepsBrokeredFiles && flags & instar_shim_o_direct() == 0 {
            let path = String(decoding: pathBytes, as: UTF8.self)
            if brokered[path] == nil {
                brokered[path] = fd
                keep = true
            }
        }
        defer { if fd >= 0 && !keep { Glibc.close(fd) } }
        guard IsolatedMode.sendAll(sock, w.bytes, fd: fd) else { throw ended() }
    }

    private func remainingMs() -> Int32 {
        let now = CallBudget.now(CLOCK_MONOTONIC)
        if now >= deadline { return 0 }
        return Int32(clamping: (deadline - now + 999_999) / 1_000_000)
    }

    private func send(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { b in instar_isolate_send(sock, b.baseAddress! + off, b.count - off, -1) }
            if n == -Int(EAGAIN) {
                try wait(Int16(POLLOUT))
                continue
            }
            if n <= 0 { throw ended() }
            off += n
        }
    }

    /// Exactly `buffer.count` bytes, straight into `buffer`.
    private func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        guard let base = buffer.baseAddress else { return }
        var got = 0
        while got < buffer.count {
            var fd: Int32 = -1
            let k = instar_isolate_recv(sock, base + got, buffer.count - got, &fd)
            if fd >= 0 { Glibc.close(fd) }
            if k == -Int(EAGAIN) {
                try wait(Int16(POLLIN))
                continue
            }
            if k <= 0 { throw ended() }
            got += k
        }
    }

    /// `n` bytes, read in chunks so that a length the helper claims costs memory only as its bytes arrive.
    private func receive(_ n: Int) throws -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(min(n, 1 << 20))
        var chunk = [UInt8](repeating: 0, count: min(n, 1 << 16))
        while out.count < n {
            var fd: Int32 = -1
            let want = min(chunk.count, n - out.count)
            let k = chunk.withUnsafeMutableBytes { b in instar_isolate_recv(sock, b.baseAddress!, want, &fd) }
            if fd >= 0 { Glibc.close(fd) }
            if k == -Int(EAGAIN) {
                try wait(Int16(POLLIN))
                continue
            }
            if k <= 0 { throw ended() }
            out.append(contentsOf: chunk[0..<k])
        }
        return out
    }

    private func wait(_ events: Int16) throws {
        while true {
            let ms = remainingMs()
            if ms == 0 {
                timedOut = true
                throw ended()
            }
            var p = pollfd(fd: sock, events: events, revents: 0)
            let rc = poll(&p, 1, ms)
            if rc > 0 { return }
            if rc < 0 && errno != EINTR { throw ended() }
        }
    }

    /// The error for a helper that stopped talking: kills it if it still runs and says how it ended.
    private func ended() -> InstarError {
        kill(pid, SIGKILL)
        var status: Int32 = 0
        var rc: Int32
        repeat { rc = waitpid(pid, &status, 0) } while rc < 0 && errno == EINTR
        reaped = true
        if timedOut {
            return InstarError(.limit, "The isolated helper did not finish within \(wallMs) ms and was killed")
        }
        if rc < 0 { return InstarError(.isolation, "The isolated helper ended without a result") }
        let sig = status & 0x7f
        if sig != 0 && sig != 0x7f {
            if sig == SIGXCPU {
                return InstarError(.limit, "The isolated helper reached its CPU time limit and was killed")
            }
            if sig == SIGSYS {
                return InstarError(.isolation,
                                   "The isolated helper was killed by its seccomp filter (a forbidden system call)")
            }
            if sig == SIGKILL {
                return InstarError(.isolation, "The isolated helper was killed (signal \(sig))")
            }
            return InstarError(.isolation, "The isolated helper crashed (signal \(sig): \(signalName(sig)))")
        }
        return InstarError(.isolation,
                           "The isolated helper exited with status \((status >> 8) & 0xff) without a result")
    }

    private func signalName(_ sig: Int32) -> String {
        guard let p = strsignal(sig) else { return "unknown" }
        return String(cString: p)
    }
}

extension Optional where Wrapped == String {
    /// `body` with a C string of the value, or with nil.
    func withOptionalCString<T>(_ body: (UnsafePointer<CChar>?) throws -> T) rethrows -> T {
        guard let s = self else { return try body(nil) }
        return try s.withCString { try body($0) }
    }
}
