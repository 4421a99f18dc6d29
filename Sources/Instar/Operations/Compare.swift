import Glibc

/// `qemu-img compare`: guest contents of two images (any formats and chains), with qemu-img's chunking so the
/// reported mismatch offset is the same.

public struct CompareResult: Equatable {
    public var identical: Bool
    public var sizeMismatch: Bool
    /// The offset qemu-img reports in "Content mismatch at offset N!", if any.
    public var mismatchOffset: UInt64?
    /// What qemu-img prints on stdout without -q (each line ends in "\n").
    public var message: String
}

public enum CompareOperation {
    static let bufferSize: UInt64 = 2 << 20

    /// Compares `a` and `b`. `strict` also fails on a size mismatch or differing block status. Progress values
    /// go to `progress` (compare's meter skips 2 points).
    public static func compare(_ a: ImageLayer, _ b: ImageLayer, strict: Bool,
                               progress: ((Double) throws -> Void)?) throws -> CompareResult {
        let size1 = a.virtualSize
        let size2 = b.virtualSize
        let total = min(size1, size2)
        let progressBase = max(size1, size2)
        var meter = ProgressMeter(minSkip: 2.0, report: progress)
        try meter.advance(0, max: 100)
        var message = ""
        func mismatch(_ offset: UInt64) -> CompareResult {
            message += "Content mismatch at offset \(offset)!\n"
            return CompareResult(identical: false, sizeMismatch: size1 != size2, mismatchOffset: offset, message: message)
        }
        if strict && size1 != size2 {
            return CompareResult(identical: false, sizeMismatch: true, mismatchOffset: nil,
                                 message: "Strict mode: Image size mismatch!\n")
        }
        let buf1 = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(bufferSize), alignment: 4096)
        let buf2 = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(bufferSize), alignment: 4096)
        defer { buf1.deallocate(); buf2.deallocate() }

        var offset: UInt64 = 0
        while offset < total {
            let s1 = try StepError.wrap(.blockStatus, at: offset, operand: 0) {
                try ChainStatus.aboveStatus(a, at: offset, length: size1 - offset)
            }
            let s2 = try StepError.wrap(.blockStatus, at: offset, operand: 1) {
                try ChainStatus.aboveStatus(b, at: offset, length: size2 - offset)
            }
            var chunk = min(s1.length, s2.length)
            if strict && !sameFlags(s1, s2) {
                return CompareResult(identical: false, sizeMismatch: false, mismatchOffset: nil,
                                     message: "Strict mode: Offset \(offset) block status mismatch!\n")
            }
            if s1.zero && s2.zero {
                // Both read as zeroes.
            } else if s1.allocated == s2.allocated {
                if s1.allocated {
                    chunk = min(chunk, bufferSize)
                    let n = Int(chunk)
                    let p1 = UnsafeMutableRawBufferPointer(rebasing: buf1[0..<n])
                    let p2 = UnsafeMutableRawBufferPointer(rebasing: buf2[0..<n])
                    try StepError.wrap(.read, at: offset, operand: 0) { try a.read(into: p1, at: offset) }
                    try StepError.wrap(.read, at: offset, operand: 1) { try b.read(into: p2, at: offset) }
                    if let at = firstDifference(p1, p2) { return mismatch(offset + at) }
                }
            } else {
                chunk = min(chunk, bufferSize)
                let p = UnsafeMutableRawBufferPointer(rebasing: buf1[0..<Int(chunk)])
                try StepError.wrap(.read, at: offset, operand: s1.allocated ? 0 : 1) {
                    try (s1.allocated ? a : b).read(into: p, at: offset)
                }
                if let at = firstNonZeroSector(p) { return mismatch(offset + at) }
            }
            offset += chunk
            try meter.advance(Float(chunk) / Float(progressBase) * 100, max: 100)
        }
        if size1 != size2 {
            message += "Warning: Image size mismatch!\n"
            let over = size1 > size2 ? a : b
            let overOperand = size1 > size2 ? 0 : 1
            while offset < progressBase {
                let s = try StepError.wrap(.blockStatus, at: offset, operand: overOperand) {
                    try ChainStatus.aboveStatus(over, at: offset, length: progressBase - offset)
                }
                var chunk = s.length
                if s.allocated && !s.zero {
                    chunk = min(chunk, bufferSize)
                    let p = UnsafeMutableRawBufferPointer(rebasing: buf1[0..<Int(chunk)])
                    try StepError.wrap(.read, at: offset, operand: overOperand) { try over.read(into: p, at: offset) }
                    if let at = firstNonZeroSector(p) { return mismatch(offset + at) }
                }
                offset += chunk
                try meter.advance(Float(chunk) / Float(progressBase) * 100, max: 100)
            }
        }
        message += "Images are identical.\n"
        return CompareResult(identical: true, sizeMismatch: size1 != size2, mismatchOffset: nil, message: message)
    }

    /// Strict mode compares the whole status word (allocated, data, zero, offset-valid, EOF), as qemu does.
    static func sameFlags(_ x: ChainBlockStatus, _ y: ChainBlockStatus) -> Bool {
        x.allocated == y.allocated && x.data == y.data && x.zero == y.zero
            && (x.hostOffset == nil) == (y.hostOffset == nil) && x.eof == y.eof
    }

    /// qemu-img's compare_buffers() with 512-byte chunks: nil when equal, else the offset of the first
    /// differing 512-byte chunk (or the end of the equal prefix).
    static func firstDifference(_ a: UnsafeMutableRawBufferPointer, _ b: UnsafeMutableRawBufferPointer) -> UInt64? {
        guard let pa = a.baseAddress, let pb = b.baseAddress else { return nil }
        let n = a.count
        if memcmp(pa, pb, n) == 0 { return nil }
        var i = 0
        while i < n {
            let len = min(512, n - i)
            if memcmp(pa + i, pb + i, len) != 0 { return UInt64(i) }
            i += len
        }
        return nil
    }

    /// qemu-img's find_nonzero(): the offset of the first 512-byte sector holding a nonzero byte.
    static func firstNonZeroSector(_ p: UnsafeMutableRawBufferPointer) -> UInt64? {
        guard let base = p.baseAddress else { return nil }
        if ConvertOperation.isZero(UnsafeRawPointer(base), p.count) { return nil }
        var i = 0
        while i < p.count {
            let len = min(512, p.count - i)
            if !ConvertOperation.isZero(UnsafeRawPointer(base + i), len) { return UInt64(i) }
            i += len
        }
        return nil
    }
}
