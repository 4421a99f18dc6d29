import XCTest
@testable import Instar

final class UtilTests: XCTestCase {
    func testByteReaderBounds() throws {
        let r = ByteReader([0x12, 0x34, 0x56, 0x78, 0x9a], what: "test")
        XCTAssertEqual(try r.u32be(at: 0), 0x1234_5678)
        XCTAssertEqual(try r.u16le(at: 3), 0x9a78)
        XCTAssertThrowsError(try r.u32be(at: 2))
        XCTAssertThrowsError(try r.u8(at: -1))
        XCTAssertThrowsError(try r.slice(at: 4, count: Int.max))
    }

    func testCheckedArithmetic() throws {
        XCTAssertEqual(try UInt64(5).adding(6), 11)
        XCTAssertThrowsError(try UInt64.max.adding(1))
        XCTAssertThrowsError(try UInt64(1).shifted(left: 64))
        XCTAssertEqual(try UInt64(1).shifted(left: 63), 1 << 63)
        XCTAssertThrowsError(try (UInt64(1) << 40).multiplied(by: 1 << 30))
        XCTAssertEqual(try UInt64(1000).alignedUp(512), 1024)
    }

    func testJSONParser() throws {
        let v = try JSONParser.parse(#"{"driver": "raw", "file": {"driver": "file", "filename": "a b"}, "offset": 512}"#)
        XCTAssertEqual(v["driver"], .string("raw"))
        XCTAssertEqual(v["file"]?["filename"], .string("a b"))
        XCTAssertEqual(v["offset"]?.int64Value, 512)
        XCTAssertThrowsError(try JSONParser.parse(String(repeating: "[", count: 1000)))
        XCTAssertThrowsError(try JSONParser.parse("{\"a\": 1"))
    }

    func testBackingNameResolution() {
        XCTAssertEqual(ImageOpener.resolveBackingName("base.qcow2", relativeTo: "sub/top.qcow2"), "sub/base.qcow2")
        XCTAssertEqual(ImageOpener.resolveBackingName("../b", relativeTo: "sub/top"), "sub/../b")
        XCTAssertEqual(ImageOpener.resolveBackingName("/abs", relativeTo: "sub/top"), "/abs")
        XCTAssertEqual(ImageOpener.resolveBackingName("b", relativeTo: "top"), "b")
    }
}
