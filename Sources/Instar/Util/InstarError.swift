import CInstar
import Glibc

/// The one error type of the engine. `message` is the text qemu-img prints after its "qemu-img: " prefix.
/// Codes map one to one onto the INSTAR_E_* values of instar.h.
public struct InstarError: Error, CustomStringConvertible {
    public enum Code: Int32, Sendable {
        case invalid = -1
        case io = -2
        case notFound = -3
        case corrupt = -4
        case unsupported = -5
        case locked = -6
        case noMemory = -7
        case cancelled = -8
        case permission = -9
        case encrypted = -10
        case chain = -11
        case range = -12
        case limit = -13
        case policy = -14
        case isolation = -15
    }

    public var code: Code
    public var message: String
    public var errnoValue: Int32

    public init(_ code: Code, _ message: String, errno: Int32 = 0) {
        self.code = code
        self.message = message
        self.errnoValue = errno
    }

    public var description: String { message }

    public static func invalid(_ message: String) -> InstarError { InstarError(.invalid, message) }
    public static func corrupt(_ message: String) -> InstarError { InstarError(.corrupt, message) }
    public static func unsupported(_ message: String) -> InstarError { InstarError(.unsupported, message) }

    /// An error from a failed system call: `what` followed by strerror, as qemu words them.
    public static func system(_ err: Int32, _ what: String) -> InstarError {
        let code: Code
        switch err {
        case ENOENT: code = .notFound
        case EACCES, EPERM, EROFS: code = .permission
        case ENOMEM: code = .noMemory
        default: code = .io
        }
        return InstarError(code, "\(what): \(strerrorString(err))", errno: err)
    }

    /// The same error with `prefix` put before the message (qemu's error_prepend).
    public func prepending(_ prefix: String) -> InstarError {
        InstarError(code, prefix + message, errno: errnoValue)
    }
}

/// strerror(3) as a Swift string, with glibc's wording (which qemu prints). Goes through strerror_r: library
/// callers may fail on several threads at once.
public func strerrorString(_ err: Int32) -> String {
    var buf = [CChar](repeating: 0, count: 256)
    let text = buf.withUnsafeMutableBufferPointer { b -> String? in
        guard let base = b.baseAddress, let s = instar_shim_strerror(err, base, b.count) else { return nil }
        return String(cString: s)
    }
    return text ?? "Unknown error \(err)"
}
