import Glibc

/// An engine error together with the step of an operation it interrupted (reading guest data, writing it,
/// querying block status) and where. The library reports `instarError` (the engine's own message with the step
/// before it); a qemu-img compatible front end words the failure from `step`, `offset` and `errnoValue`, as
/// qemu-img prints only strerror of the block layer's return code there.
public struct StepError: Error, CustomStringConvertible {
    public enum Step: Sendable { case read, write, blockStatus }

    public var step: Step
    /// Guest offset in bytes where the failed request began.
    public var offset: UInt64
    /// Which operand the step worked on (compare: 0 for the first image, 1 for the second).
    public var operand: Int
    /// What the engine threw.
    public var error: InstarError
    /// convert: the failed reads of later chunks that were in flight beside this one, in guest order (each of
    /// qemu's coroutines reports its own failure).
    public var alsoFailed: [StepError] = []

    public init(_ step: Step, at offset: UInt64, operand: Int = 0, _ error: InstarError) {
        self.step = step
        self.offset = offset
        self.operand = operand
        self.error = error
    }

    /// The errno qemu's block layer would return: the engine's own, else EIO (qemu's qcow2 driver fails
    /// corrupt metadata and undecompressable clusters with -EIO).
    public var errnoValue: Int32 { error.errnoValue != 0 ? error.errnoValue : EIO }

    /// The engine error with the step and offset before its message, for the library's error struct.
    public var instarError: InstarError {
        let what: String
        switch step {
        case .read: what = "error while reading at byte \(offset): "
        case .write: what = "error while writing at byte \(offset): "
        case .blockStatus: what = "error while reading block status at offset \(offset): "
        }
        return InstarError(error.code, what + error.message, errno: errnoValue)
    }

    public var description: String { instarError.message }

    /// Runs `body`, wrapping an engine error thrown by it into a StepError (one already wrapped passes through).
    static func wrap<T>(_ step: Step, at offset: UInt64, operand: Int = 0, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as InstarError {
            throw StepError(step, at: offset, operand: operand, e)
        }
    }
}
