import Glibc

/// qemu's progress meter (util/qemu-progress.c) as the operations drive it: a percentage kept in single
/// precision, reported only when it moved by more than `minSkip` points since the last report, or sits at 0 or
/// 100. `report` receives each value qemu-img would print; it throws (e.g. `.cancelled`) to stop the operation.
public struct ProgressMeter {
    private let minSkip: Float
    private var current: Float = 0
    private var lastPrint: Float = 0
    private let report: ((Double) throws -> Void)?

    /// `minSkip` is 1.0 for convert, commit and amend, 2.0 for compare and rebase (their qemu_progress_init calls).
    public init(minSkip: Float, report: ((Double) throws -> Void)?) {
        self.minSkip = minSkip
        self.report = report
    }

    /// qemu_progress_print(delta, max): with `max` 0 `delta` is the new percentage, otherwise `delta` percent of
    /// `max` is added to the current value.
    public mutating func advance(_ delta: Float, max: Int) throws {
        try CallBudget.checkpoint()
        var value: Float = max == 0 ? delta : current + delta / 100 * Float(max)
        if value > 100 { value = 100 }
        current = value
        if value > lastPrint + minSkip || value < lastPrint - minSkip || value == 0 || value == 100 {
            lastPrint = current
            try report?(Double(current))
        }
    }

    /// Sets the percentage to `done / total` of the way (qemu's `100.0 * done / total` passed with max 0).
    public mutating func set(done: UInt64, total: UInt64) throws {
        try advance(Float(100.0 * Double(done) / Double(total)), max: 0)
    }

    /// The text qemu prints for one report: `    (NN.NN/100%)\r`.
    public static func record(_ percent: Double) -> String {
        var buf = [CChar](repeating: 0, count: 64)
        _ = withVaList([percent]) { vsnprintf(&buf, buf.count, "    (%3.2f/100%%)\r", $0) }
        return String(cString: buf)
    }
}
