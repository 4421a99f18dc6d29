import Glibc
import XCTest
@testable import Instar

/// A call limit fires once (the checkpoint that sees it throws, the later ones let the call wind down), so code
/// that swallows the errors of a query must let a limit through, or the operation runs to its end.
final class CallLimitTests: XCTestCase {
    /// convert -C asks the block status of each chunk's source range before offloading it (offloadablePieces):
    /// other errors there end the offloadable prefix, a limit stops the convert.
    func testCopyOffloadQueryPassesALimitOn() throws {
        let path = "/tmp/instar-calllimit-\(getpid()).raw"
        let fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(ftruncate(fd, 1 << 20), 0)
        var data = [UInt8](repeating: 0x5a, count: 65536)
        XCTAssertEqual(pwrite(fd, &data, data.count, 0), data.count)
        close(fd)
        defer { unlink(path) }
        let layer = try ImageOpener.open(ImageSpec(filename: path, format: "raw"), options: ImageOpenOptions(),
                                         writable: false)
        // Without a limit: the 64 KiB of data are stored plainly, all offloadable.
        let plain = try ConvertOperation.offloadablePieces([layer], [2048], sector: 0, bytes: 65536)
        XCTAssertEqual(plain.bytes, 65536)
        // A 1 ms deadline, passed before the query: the query's checkpoint throws and the limit comes out.
        let budget = CallBudget.make(timeoutMs: 1, cpuMs: 0)
        let start = CallBudget.now(CLOCK_MONOTONIC)
        while CallBudget.now(CLOCK_MONOTONIC) &- start < 2_000_000 { usleep(1000) }
        try CallBudget.run(budget) {
            XCTAssertThrowsError(try ConvertOperation.offloadablePieces([layer], [2048], sector: 0, bytes: 65536)) {
                XCTAssertEqual(($0 as? InstarError)?.code, .limit)
            }
        }
    }
}
