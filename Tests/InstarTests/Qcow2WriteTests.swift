import Glibc
import XCTest
@testable import Instar

/// The compressed-cluster write entry point (for convert -c): clusters compressed with zlib or zstd are packed
/// into shared host clusters; qemu-img check must find the image clean and qemu-img must read back the data.
final class Qcow2WriteTests: XCTestCase {
    func shell(_ cmd: String) -> (Int32, String) {
        guard let p = popen(cmd + " 2>&1", "r") else { return (-1, "") }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&buf, 1, buf.count, p)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return (pclose(p), String(decoding: out, as: UTF8.self))
    }

    func testCompressedWritesReadBackByQemu() throws {
        guard shell("qemu-img --version").0 == 0 else { throw XCTSkip("qemu-img not installed") }
        let dir = "/tmp/instar-qcow2w-\(getpid())"
        _ = shell("mkdir -p \(dir)")
        defer { _ = shell("rm -rf \(dir)") }
        for opts in ["compression_type=zlib", "compression_type=zstd", "cluster_size=4096,refcount_bits=1"] {
            let path = "\(dir)/c.qcow2"
            XCTAssertEqual(shell("rm -f \(path); qemu-img create -q -f qcow2 -o \(opts) \(path) 1M").0, 0)
            let expected = try writeClusters(path)
            let check = shell("qemu-img check \(path)")
            XCTAssertEqual(check.0, 0, check.1)
            XCTAssertTrue(check.1.contains("compressed clusters"))
            XCTAssertEqual(shell("qemu-img convert -O raw \(path) \(dir)/c.raw").0, 0)
            let f = try HostFile.open("\(dir)/c.raw")
            XCTAssertEqual(try f.readBytes(at: 0, count: 1 << 20), expected, opts)
        }
    }

    /// Writes the clusters and closes the image (dropping its locks) before qemu-img looks at it.
    func writeClusters(_ path: String) throws -> [UInt8] {
        let layer = try ImageOpener.open(ImageSpec(filename: path, format: "qcow2"), options: ImageOpenOptions(),
                                         writable: true)
        guard let q = layer.format as? Qcow2Format else { XCTFail("not qcow2"); return [] }
        let cs = Int(q.header.clusterSize)
        let compressor = q.makeCompressor()
        var expected = [UInt8](repeating: 0, count: 1 << 20)
        var seed: UInt32 = 7
        for c in 0..<((1 << 20) / cs) where c % 3 != 2 {
            var cluster = [UInt8](repeating: UInt8(c & 0xff), count: cs)
            if c % 5 == 4 {
                // Incompressible: stored as a normal cluster.
                for i in 0..<cs { seed = seed &* 1_103_515_245 &+ 12345; cluster[i] = UInt8(seed >> 24) }
            } else {
                for i in stride(from: 0, to: cs, by: 97) { cluster[i] = UInt8(i & 0xff) }
            }
            expected.replaceSubrange((c * cs)..<((c + 1) * cs), with: cluster)
            let packed = try cluster.withUnsafeBytes { try compressor.compress($0) }
            if let packed {
                try q.writeCompressed(clusterIndex: UInt64(c), compressedBytes: packed)
            } else {
                try cluster.withUnsafeBytes { try q.write($0, at: UInt64(c * cs), backing: nil) }
            }
        }
        try layer.close()
        return expected
    }
}
