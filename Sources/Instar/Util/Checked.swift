/// Checked arithmetic for numbers that come from image bytes. Every operation throws `.corrupt` instead of
/// trapping, so a hostile header can never bring down the host process.
extension UInt64 {
    @inline(__always)
    public func adding(_ other: UInt64, _ what: @autoclosure () -> String = "offset overflow") throws -> UInt64 {
        let (r, o) = addingReportingOverflow(other)
        if o { throw InstarError.corrupt(what()) }
        return r
    }

    @inline(__always)
    public func subtracting(_ other: UInt64, _ what: @autoclosure () -> String = "offset underflow") throws -> UInt64 {
        let (r, o) = subtractingReportingOverflow(other)
        if o { throw InstarError.corrupt(what()) }
        return r
    }

    @inline(__always)
    public func multiplied(by other: UInt64, _ what: @autoclosure () -> String = "size overflow") throws -> UInt64 {
        let (r, o) = multipliedReportingOverflow(by: other)
        if o { throw InstarError.corrupt(what()) }
        return r
    }

    /// `self << bits`, failing when bits set are lost.
    @inline(__always)
    public func shifted(left bits: UInt64, _ what: @autoclosure () -> String = "shift overflow") throws -> UInt64 {
        if bits >= 64 { if self == 0 { return 0 }; throw InstarError.corrupt(what()) }
        let r = self << bits
        if r >> bits != self { throw InstarError.corrupt(what()) }
        return r
    }

    /// Rounds up to a multiple of `alignment` (a power of two or any nonzero value).
    @inline(__always)
    public func alignedUp(_ alignment: UInt64) throws -> UInt64 {
        if alignment == 0 { throw InstarError.invalid("zero alignment") }
        let rem = self % alignment
        if rem == 0 { return self }
        return try adding(alignment - rem, "alignment overflow")
    }

    /// Rounds down to a multiple of `alignment`.
    @inline(__always)
    public func alignedDown(_ alignment: UInt64) -> UInt64 {
        alignment == 0 ? self : self - self % alignment
    }

    /// Ceiling division; `divisor` must be nonzero.
    @inline(__always)
    public func divCeil(_ divisor: UInt64) -> UInt64 {
        divisor == 0 ? 0 : self / divisor + (self % divisor == 0 ? 0 : 1)
    }
}

/// Converts an image-derived UInt64 to Int, failing instead of trapping.
@inline(__always)
public func checkedInt(_ v: UInt64, _ what: @autoclosure () -> String = "value too large") throws -> Int {
    guard v <= UInt64(Int.max) else { throw InstarError.corrupt(what()) }
    return Int(v)
}

/// True when `v` is a power of two.
@inline(__always)
public func isPowerOfTwo(_ v: UInt64) -> Bool { v != 0 && (v & (v - 1)) == 0 }
