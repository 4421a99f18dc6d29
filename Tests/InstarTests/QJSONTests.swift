import XCTest
@testable import Instar

final class QJSONTests: XCTestCase {
    func testImageInfoKeyOrderMatchesQemu() {
        // Insertion in QAPI ImageInfo order; qemu-img prints them in QDict hash order.
        let keys = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size", "encrypted",
                    "compressed", "backing-filename", "full-backing-filename", "backing-filename-format", "snapshots",
                    "backing-image", "format-specific"]
        let ordered = QJSON.qdictOrder(keys.map { ($0, QObject.null) }).map(\.0)
        XCTAssertEqual(ordered, ["backing-image", "compressed", "backing-filename-format", "snapshots", "virtual-size",
                                 "filename", "cluster-size", "format", "actual-size", "format-specific",
                                 "full-backing-filename", "encrypted", "backing-filename", "dirty-flag"])
    }

    func testPrettyLayout() {
        let v = QObject.dict([("name", .string("a")), ("flags", .list([])), ("n", .int(-3)), ("e", .dict([]))])
        let order = QJSON.qdictOrder([("name", .null), ("flags", .null), ("n", .null), ("e", .null)]).map(\.0)
        var expected = "{"
        for (i, k) in order.enumerated() {
            expected += (i == 0 ? "\n    " : ",\n    ") + "\"\(k)\": "
            switch k {
            case "name": expected += "\"a\""
            case "flags": expected += "[\n    ]"
            case "n": expected += "-3"
            default: expected += "{\n    }"
            }
        }
        expected += "\n}"
        XCTAssertEqual(QJSON.pretty(v), expected)
        XCTAssertEqual(QJSON.pretty(.list([])), "[\n]")
        XCTAssertEqual(QJSON.compact(.list([.int(1), .bool(true)])), "[1, true]")
    }

    func testStringEscaping() {
        XCTAssertEqual(QJSON.quoted("a\"b\\c\n\t\u{1}"), #""a\"b\\c\n\t\u0001""#)
        XCTAssertEqual(QJSON.quoted("é\u{7f}"), #""\u00E9\u007F""#)
        XCTAssertEqual(QJSON.quoted("😀"), #""\uD83D\uDE00""#)
        let nonchars = String(String.UnicodeScalarView([0xFFFE, 0xFDD0].compactMap(Unicode.Scalar.init)))
        XCTAssertEqual(QJSON.quoted(nonchars), #""\uFFFD\uFFFD""#)
        XCTAssertEqual(QJSON.quoted("ab\u{0}cd"), #""ab""#)
    }

    func testNumbers() {
        XCTAssertEqual(QJSON.compact(.uint(UInt64.max)), "18446744073709551615")
        XCTAssertEqual(QJSON.formatDouble(0.1), "0.10000000000000001")
        XCTAssertEqual(QJSON.formatDouble(2), "2")
    }

    func testSizeToString() {
        XCTAssertEqual(SizeFormat.sizeToString(0), "0 B")
        XCTAssertEqual(SizeFormat.sizeToString(1000448), "977 KiB")
        XCTAssertEqual(SizeFormat.sizeToString(1_310_720), "1.25 MiB")
        XCTAssertEqual(SizeFormat.sizeToString(2 << 40), "2 TiB")
        XCTAssertEqual(SizeFormat.sizeToString(1000), "0.977 KiB")
    }

    func testQemuOpts() {
        let p = QemuOptsParser.parse("driver=raw,file.filename=a,,b,nooffset,x", impliedKey: "file")
        XCTAssertEqual(p.map(\.0), ["driver", "file.filename", "offset", "x"])
        XCTAssertEqual(p.map(\.1), ["raw", "a,b", "off", "on"])
        XCTAssertEqual(QemuOptsParser.parse("img.raw,size=1", impliedKey: "file").map(\.0), ["file", "size"])
        var secrets: [String: String] = [:]
        XCTAssertNoThrow(try SecretObjects.add("secret,id=sec0,data=cGFzcw==,format=base64", to: &secrets))
        XCTAssertEqual(secrets["sec0"], "pass")
        XCTAssertThrowsError(try SecretObjects.add("secret,data=x", to: &secrets))
    }

    func testJSONDisplayName() throws {
        let spec = try ImageOpener.parseSpec(#"json:{"driver":"raw","file":{"driver":"file","filename":"r.img"},"offset":512}"#, format: nil)
        XCTAssertEqual(spec.displayName(formatName: "raw"),
                       #"json:{"offset": 512, "driver": "raw", "file": {"driver": "file", "filename": "r.img"}}"#)
        let plain = try ImageOpener.parseSpec(#"json:{"file":{"filename":"r.img"}}"#, format: nil)
        XCTAssertEqual(plain.displayName(formatName: "raw"), "r.img")
    }
}
