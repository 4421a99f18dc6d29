import Glibc
import Instar

/// Process-wide helpers for the qemu-img-compatible command line.
enum CLI {
    /// The program name qemu-img prints before its messages: the basename of argv[0].
    static var programName = "instar"

    /// Prints "PROGRAM: message" to stderr, as qemu's error_report().
    static func error(_ message: String) {
        out.flush()
        fputs("\(programName): \(ownName(message))\n", stderr)
    }

    /// qemu's hints name "qemu-img check"; ours name this program.
    static func ownName(_ message: String) -> String {
        // A byte scan first: the generic replacing(_:with:) costs microseconds a call, and a check can print
        // millions of lines (one per bad table entry) that never name qemu-img.
        guard namesQemuImgCheck(message) else { return message }
        return message.replacing("qemu-img check -r", with: "\(programName) check -r")
    }

    private static let qemuImgCheck = Array("qemu-img check -r".utf8)

    private static func namesQemuImgCheck(_ message: String) -> Bool {
        message.utf8.withContiguousStorageIfAvailable { bytes -> Bool in
            qemuImgCheck.withUnsafeBytes { needle -> Bool in
                guard let base = bytes.baseAddress, let first = needle.first, bytes.count >= needle.count else {
                    return false
                }
                // memchr to each candidate first byte, memcmp for the rest.
                var at = 0
                let last = bytes.count - needle.count
                while at <= last, let hit = memchr(base + at, Int32(first), last - at + 1) {
                    let i = UnsafeRawPointer(hit) - UnsafeRawPointer(base)
                    if let n = needle.baseAddress, memcmp(base + i, n, needle.count) == 0 { return true }
                    at = i + 1
                }
                return false
            }
        } ?? message.contains("qemu-img check -r")
    }

    /// Prints `line` and a newline to stderr in one write, as qemu's fprintf to its unbuffered stderr does,
    /// after flushing stdout. For lines a check can print millions of (one per bad table entry): no joined
    /// copy of the line, no stdio.
    static func stderrLine(_ line: String) {
        out.flush()
        var line = line
        line.withUTF8 { text in
            var newline: UInt8 = 10
            withUnsafeMutablePointer(to: &newline) { nl in
                var iov = [iovec(iov_base: UnsafeMutableRawPointer(mutating: text.baseAddress), iov_len: text.count),
                           iovec(iov_base: UnsafeMutableRawPointer(nl), iov_len: 1)]
                var n = writev(2, &iov, 2)
                while n < 0 && errno == EINTR { n = writev(2, &iov, 2) }
                guard n >= 0, n < text.count + 1 else { return }
                // A short write: the rest with plain writes.
                var done = n
                while done < text.count + 1 {
                    let m = done < text.count ? write(2, text.baseAddress! + done, text.count - done) : write(2, nl, 1)
                    if m < 0 && errno == EINTR { continue }
                    if m <= 0 { return }
                    done += m
                }
            }
        }
    }

    /// Prints without the trailing newline (a few qemu messages end without one).
    static func errorNoNewline(_ message: String) {
        out.flush()
        fputs("\(programName): \(message)", stderr)
    }

    /// Prints a warning line as qemu's warn_report() callers see it: stdout flushed first, no program prefix.
    static func warnLine(_ message: String) {
        stderrLine(message)
    }

    /// Runs a subcommand's work: 0 when it succeeds, else its error printed as error() does and 1.
    static func exitStatus(_ body: () throws -> Void) -> Int32 {
        do {
            try body()
            return 0
        } catch let e as InstarError {
            error(e.message)
            return 1
        } catch {
            self.error("\(error)")
            return 1
        }
    }

    /// The "Try 'qemu-img --help'" hint after a usage error.
    static func usageError(_ message: String) -> Int32 {
        error("\(message)\nTry '\(programName) --help' for more information")
        return 1
    }

    /// qemu-img's handling of getopt's '?' and ':' results.
    static func badOption(_ c: Int32, _ arg: String?) -> Int32 {
        if c == Int32.opt(":") { return usageError("missing argument for option '\(arg ?? "")'") }
        return usageError("unrecognized option '\(arg ?? "")'")
    }

    static var out = StdoutBuffer()

    /// qemu-img's --output parsing: nil (absent) or "human" → false, "json" → true; anything else prints
    /// qemu-img's error and gives nil.
    static func outputIsJSON(_ output: String?) -> Bool? {
        switch output {
        case nil, "human": return false
        case "json": return true
        default:
            error("--output must be used with human or json as argument.")
            return nil
        }
    }
}

/// Buffered stdout writer; flushed before anything goes to stderr and at exit.
struct StdoutBuffer {
    private var buffer: [UInt8] = []
    mutating func write(_ s: String) {
        buffer.append(contentsOf: s.utf8)
        if buffer.count > 1 << 16 { flush() }
    }
    /// Bytes as they are (text from an image that need not be UTF-8).
    mutating func write(bytes: [UInt8]) {
        buffer.append(contentsOf: bytes)
        if buffer.count > 1 << 16 { flush() }
    }
    mutating func flush() {
        if buffer.isEmpty { return }
        buffer.withUnsafeBytes { p in
            var done = 0
            while done < p.count {
                let n = Glibc.write(1, p.baseAddress! + done, p.count - done)
                if n <= 0 { if errno == EINTR { continue }; break }
                done += n
            }
        }
        buffer.removeAll(keepingCapacity: true)
    }
}

/// A subcommand: takes argv shifted so that args[0] is the subcommand name; returns the exit status.
typealias Command = ([String]) -> Int32

/// Secrets defined with `--object secret,...`, by id; qemu-img creates these objects while parsing options and
/// every image the command opens can name them (encrypt.key-secret).
var cliSecrets: [String: String] = [:]

/// Adds one `--object` definition; prints qemu's message and returns false when it is refused.
func cliAddObject(_ text: String) -> Bool { cliAddObject(text, to: &cliSecrets) }

/// Adds an --object secret to `secrets`; prints qemu-img's error and returns false when it is malformed.
func cliAddObject(_ text: String, to secrets: inout [String: String]) -> Bool {
    do {
        try SecretObjects.add(text, to: &secrets)
        return true
    } catch let e as InstarError {
        CLI.error(e.message)
    } catch {
        CLI.error("\(error)")
    }
    return false
}
