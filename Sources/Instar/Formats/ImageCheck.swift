/// The optional consistency-check capability of a format driver (qemu's bdrv_co_check). Drivers that can check
/// their metadata conform to `ImageCheckable`; operations ask `format as? ImageCheckable`, which is a capability
/// query, never a question about which format an image is.

/// What a check may repair (qemu's BdrvCheckMode).
public struct CheckRepair: OptionSet, Equatable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// BDRV_FIX_LEAKS: drop references nobody holds.
    public static let leaks = CheckRepair(rawValue: 1 << 0)
    /// BDRV_FIX_ERRORS: repair corruptions too.
    public static let errors = CheckRepair(rawValue: 1 << 1)
    /// `-r all`.
    public static let all: CheckRepair = [.leaks, .errors]
}

/// The counters of one check run (qemu's BdrvCheckResult with its BlockFragInfo).
public struct CheckResult: Equatable {
    public var corruptions: Int64 = 0
    public var leaks: Int64 = 0
    public var checkErrors: Int64 = 0
    public var corruptionsFixed: Int64 = 0
    public var leaksFixed: Int64 = 0
    public var imageEndOffset: Int64 = 0
    public var totalClusters: Int64 = 0
    public var allocatedClusters: Int64 = 0
    public var fragmentedClusters: Int64 = 0
    public var compressedClusters: Int64 = 0
    public init() {}

    /// Adds the error counters of `other` (qcow2_add_check_result); with `allocation`, takes its cluster
    /// statistics and end offset as well.
    public mutating func add(_ other: CheckResult, allocation: Bool) {
        corruptions += other.corruptions
        leaks += other.leaks
        checkErrors += other.checkErrors
        corruptionsFixed += other.corruptionsFixed
        leaksFixed += other.leaksFixed
        if allocation {
            imageEndOffset = other.imageEndOffset
            totalClusters = other.totalClusters
            allocatedClusters = other.allocatedClusters
            fragmentedClusters = other.fragmentedClusters
            compressedClusters = other.compressedClusters
        }
    }
}

/// A check that stopped early (qemu's negative return from bdrv_check): the counters gathered so far and the
/// errno qemu-img reports as "Check failed: <strerror>".
public struct CheckFailure: Error {
    public var partial: CheckResult
    public var errnoValue: Int32
    public init(partial: CheckResult, errnoValue: Int32) {
        self.partial = partial
        self.errnoValue = errnoValue
    }
}

/// One line a check prints to stderr.
public struct CheckMessage: Equatable {
    /// The line, without its newline.
    public var text: String
    /// qemu prints it with error_report, i.e. after the program name ("qemu-img: ").
    public var errorReport: Bool
    public init(_ text: String, errorReport: Bool = false) {
        self.text = text
        self.errorReport = errorReport
    }
}

/// A format that can check (and repair) its own metadata.
public protocol ImageCheckable: AnyObject {
    /// Runs one check pass. `report` receives each line qemu prints to stderr during the check (without the
    /// newline), in order. Throws `CheckFailure` where qemu's check returns an error.
    func check(repair: CheckRepair, report: (CheckMessage) -> Void) throws -> CheckResult
}
