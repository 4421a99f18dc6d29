import CInstar
import Glibc

// libFuzzer entry for the image open/read path. fuzz/run.sh compiles this file together with every engine
// source (one module), so it reaches the same code the library and the CLI run. Each input is written to a
// private temporary file, opened as qcow2 (the format whose metadata an attacker controls), then driven the way
// `qemu-img info`, `map` and `convert` drive it, and last opened writable and written to, as the writers do. Any
// Swift trap or sanitizer report is a finding: hostile bytes must only ever produce a thrown InstarError.

/// The per-process scratch file the inputs are written to (libFuzzer runs inputs one at a time).
private let scratchPath: String = {
    let dir = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
    return "\(dir)/instar-fuzz-\(getpid()).img"
}()

/// Upper bounds that keep one input cheap whatever sizes its header claims.
private let maxReadBytes = 1 << 16
private let maxStatusCalls = 256

@_cdecl("LLVMFuzzerTestOneInput")
public func instarFuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard writeScratch(data, size) else { return 0 }
    for format in ["qcow2", "dmg", nil] as [String?] {
        exercise(format: format)
    }
    // Last, as it changes the file.
    exerciseWrites(format: "qcow2")
    return 0
}

private func writeScratch(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Bool {
    let fd = Glibc.open(scratchPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    guard fd >= 0 else { return false }
    defer { Glibc.close(fd) }
    var done = 0
    while done < size, let data {
        let n = Glibc.write(fd, data + done, size - done)
        if n <= 0 { return false }
        done += n
    }
    return true
}

/// Opens the scratch file (forced to `format`, or probed) without its backing chain, so an input cannot make
/// the fuzzer open arbitrary host files, and walks it.
private func exercise(format: String?) {
    var spec = ImageSpec(filename: scratchPath, format: format)
    spec.displayName = "fuzz"
    var options = ImageOpenOptions()
    options.forceShare = true
    guard let layer = try? ImageOpener.open(spec, options: options, writable: false, openBacking: false) else {
        return
    }
    defer { try? layer.close() }
    let image = layer.format
    _ = try? image.formatInfo()
    _ = image.backingReference
    let size = image.virtualSize
    guard size > 0 else { return }

    // Block status from the start, the way map walks an image (bounded number of calls).
    var offset: UInt64 = 0
    var calls = 0
    while offset < size, calls < maxStatusCalls {
        calls += 1
        guard let st = try? image.blockStatus(at: offset, length: size - offset), st.length > 0 else { break }
        let (next, overflow) = offset.addingReportingOverflow(st.length)
        if overflow { break }
        offset = next
    }

    // Reads at the start, the middle, the last bytes, and an unaligned range spanning a cluster boundary.
    let span = UInt64(maxReadBytes)
    var starts: [UInt64] = [0, size / 2, size > span ? size - span : 0, 65536 - 512, 1 << 20 | 77]
    starts = starts.filter { $0 < size }
    var buffer = [UInt8](repeating: 0, count: maxReadBytes)
    for start in starts {
        let count = Int(min(span, size - start))
        buffer.withUnsafeMutableBytes { raw in
            let slice = UnsafeMutableRawBufferPointer(rebasing: raw[0..<count])
            _ = try? layer.read(into: slice, at: start)
        }
    }
    exerciseCAPI()
}

/// The writable open the writers take (dirty-image repair, bitmaps marked in use), a write, a zero write and a
/// discard near the start, then the close that stores the bitmaps again. The scratch file is rewritten for
/// every input, so changing it is harmless.
private func exerciseWrites(format: String?) {
    var spec = ImageSpec(filename: scratchPath, format: format)
    spec.displayName = "fuzz"
    guard let layer = try? ImageOpener.open(spec, options: ImageOpenOptions(), writable: true, openBacking: false) else {
        return
    }
    defer { try? layer.close() }
    let image = layer.format
    let size = image.virtualSize
    guard size > 0 else { return }
    let n = Int(min(UInt64(4096), size))
    let data = [UInt8](repeating: 0x5a, count: n)
    _ = try? data.withUnsafeBytes { try image.write($0, at: 0, backing: nil) }
    if size > 65536 {
        _ = try? image.writeZeroes(at: 65536 - 512, length: min(8192, size - 65536 + 512), mayUnmap: true, backing: nil)
        _ = try? image.discard(at: 0, length: min(size, 1 << 20))
    }
}

/// The C API entry points that parse the same file: they add the operations layer (info) on top of the driver.
private func exerciseCAPI() {
    #if INSTAR_FUZZ_INFO_JSON
    var opts = instar_info_options_t()
    instar_info_options_init(&opts)
    opts.open_flags = UInt32(INSTAR_OPEN_FORCE_SHARE) | UInt32(INSTAR_OPEN_NO_BACKING)
    var json: UnsafeMutablePointer<CChar>?
    if instar_info_json(scratchPath, &opts, &json, nil) == 0 {
        instar_string_free(json)
    }
    #endif
}
