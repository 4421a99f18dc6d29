import Glibc

/// Text that qemu prints on stderr from inside its block layer while an image is open: warnings about an
/// image's bitmaps extension, and the lines of the automatic check that repairs a dirty image. Operations have
/// no return channel for these (they happen inside an open), so they go to one process-wide sink.
///
/// The `instar` executable sets `sink` to its stderr writer. The library leaves it unset, so a host process
/// (VDSM, Nova) never sees instar write to its stderr; the C API does not expose it.
public enum Diagnostics {
    /// One piece of stderr text. `text` carries its own newlines (some of qemu's end without one);
    /// `prefixed` asks for the program name first, as qemu's error_report and warn_report print it.
    public struct Message: Equatable {
        public var text: String
        public var prefixed: Bool
        public init(_ text: String, prefixed: Bool) {
            self.text = text
            self.prefixed = prefixed
        }
    }

    private static let lock: UnsafeMutablePointer<pthread_mutex_t> = {
        let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        m.initialize(to: pthread_mutex_t())
        pthread_mutex_init(m, nil)
        return m
    }()
    private static var installed: ((Message) -> Void)?

    /// Where messages go; nil drops them.
    public static var sink: ((Message) -> Void)? {
        get {
            pthread_mutex_lock(lock)
            defer { pthread_mutex_unlock(lock) }
            return installed
        }
        set {
            pthread_mutex_lock(lock)
            installed = newValue
            pthread_mutex_unlock(lock)
        }
    }

    /// qemu's warn_report: "PROGRAM: warning: TEXT\n".
    static func warning(_ text: String) {
        sink?(Message("warning: \(text)\n", prefixed: true))
    }

    /// qemu's error_report: "PROGRAM: TEXT\n".
    static func error(_ text: String) {
        sink?(Message("\(text)\n", prefixed: true))
    }

    /// Text printed as it is (qemu's error_printf and fprintf(stderr)).
    static func plain(_ text: String) {
        sink?(Message(text, prefixed: false))
    }
}
