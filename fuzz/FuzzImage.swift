import CInstar
import Glibc

// libFuzzer entry for the image paths, one target per format. fuzz/run.sh compiles this file together with every
// engine source (one module), once, so it reaches the same code the library and the CLI run; the format a run
// fuzzes is chosen at run time by INSTAR_FUZZ_FORMAT (read in LLVMFuzzerInitialize), so every format shares the
// one slow sanitizer build. Each input is written to a private scratch file, opened as that format and probed,
// driven the way `qemu-img info`, `map`, `check` and `convert` drive it, and last opened writable, written to,
// flushed, closed and opened again, as the writers do. Any Swift trap or sanitizer report is a finding: hostile
// bytes must only ever produce a thrown InstarError.

/// The format this process fuzzes (INSTAR_FUZZ_FORMAT, default qcow2).
private var targetFormat = "qcow2"

/// The passphrase the seeds of encrypted formats are made with (run.sh's FUZZ_SECRET). Handed to every open:
/// an image that is not encrypted ignores it.
private let fuzzSecret = "instar-fuzz-secret"

/// A private directory for the scratch file (libFuzzer runs inputs one at a time). Names an input stores
/// (a data file, an extent, a backing file) resolve against it, so they land in it too.
private let scratchDir: String = {
    let base = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
    let dir = "\(base)/instar-fuzz-\(getpid())"
    mkdir(dir, 0o700)
    return dir
}()
private let scratchPath = scratchDir + "/input.img"

/// Upper bounds that keep one input cheap whatever sizes its header claims.
private let maxReadBytes = 1 << 16
private let maxStatusCalls = 256

@_cdecl("LLVMFuzzerInitialize")
public func instarFuzzInitialize(_ argc: UnsafeMutablePointer<Int32>?,
                                 _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?)
    -> Int32
{
    if let f = getenv("INSTAR_FUZZ_FORMAT"), f.pointee != 0 { targetFormat = String(cString: f) }
    guard FormatRegistry.openDescriptor(named: targetFormat) != nil else {
        let known = FormatRegistry.supportedFormatNames.joined(separator: " ")
        fputs("instar-fuzz: INSTAR_FUZZ_FORMAT=\(targetFormat) is no format instar opens (\(known))\n", stderr)
        exit(2)
    }
    fputs("instar-fuzz: target format \(targetFormat), scratch \(scratchPath)\n", stderr)
    atexit { _ = unlink(scratchPath); _ = rmdir(scratchDir) }
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func instarFuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard writeScratch(data, size) else { return 0 }
    for format in [targetFormat, nil] as [String?] {
        exercise(format: format)
    }
    exerciseCAPI(format: targetFormat)
    // Last, as it changes the file.
    exerciseWrites(format: targetFormat)
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

private func openOptions() -> ImageOpenOptions {
    var options = ImageOpenOptions()
    options.keySecret = fuzzSecret
    return options
}

private func openScratch(format: String?, writable: Bool) -> ImageLayer? {
    var spec = ImageSpec(filename: scratchPath, format: format)
    spec.displayName = "fuzz"
    var options = openOptions()
    options.forceShare = !writable
    // Without the backing chain, so an input cannot make the fuzzer open arbitrary host files as images.
    return try? ImageOpener.open(spec, options: options, writable: writable, openBacking: false)
}

/// Opens the scratch file (forced to `format`, or probed) and walks it the way info, map and convert do.
private func exercise(format: String?) {
    guard let layer = openScratch(format: format, writable: false) else { return }
    defer { try? layer.close() }
    let image = layer.format
    _ = try? image.formatInfo()
    _ = image.backingReference
    _ = image.allocatedFileSize()
    walk(layer)
}

/// Block status from the start, the way map walks an image (a bounded number of calls), then bounded reads at
/// the start, the middle, the last bytes, and unaligned ranges spanning cluster boundaries.
private func walk(_ layer: ImageLayer, statusCalls: Int = maxStatusCalls) {
    let image = layer.format
    let size = image.virtualSize
    guard size > 0 else { return }
    var offset: UInt64 = 0
    var calls = 0
    while offset < size, calls < statusCalls {
        calls += 1
        guard let st = try? image.blockStatus(at: offset, length: size - offset), st.length > 0 else { break }
        let (next, overflow) = offset.addingReportingOverflow(st.length)
        if overflow { break }
        offset = next
    }
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
}

/// The host files the image opened all lie in the scratch directory: only then may the fuzzer write to it (an
/// input can name an external data file or an extent by an absolute path).
private func confined(_ layer: ImageLayer) -> Bool {
    guard let dir = realpath(scratchDir, nil) else { return false }
    defer { free(dir) }
    let prefix = String(cString: dir) + "/"
    for file in layer.format.hostFiles {
        guard let real = realpath(file.path, nil) else { return false }
        defer { free(real) }
        if !String(cString: real).hasPrefix(prefix) { return false }
    }
    return true
}

/// The writable open the writers take (dirty-image repair, bitmaps marked in use), writes, a zero write and a
/// discard near the start, a write at the end, a flush and the close that stores metadata again; then the
/// image is opened again and walked. The scratch file is rewritten for every input, so changing it is harmless.
private func exerciseWrites(format: String) {
    guard let probe = openScratch(format: format, writable: false) else { return }
    let safe = confined(probe)
    try? probe.close()
    guard safe, let layer = openScratch(format: format, writable: true) else { return }
    let image = layer.format
    let size = image.virtualSize
    if size > 0 {
        let n = Int(min(UInt64(4096), size))
        let data = [UInt8](repeating: 0x5a, count: n)
        _ = try? data.withUnsafeBytes { try image.write($0, at: 0, backing: nil) }
        if size > 65536 {
            _ = try? image.writeZeroes(at: 65536 - 512, length: min(8192, size - 65536 + 512), mayUnmap: true,
                                       backing: nil)
            _ = try? image.discard(at: 0, length: min(size, 1 << 20))
            let tail = Int(min(UInt64(1536), size))
            let end = [UInt8](repeating: 0xa5, count: tail)
            _ = try? end.withUnsafeBytes { try image.write($0, at: size - UInt64(tail), backing: nil) }
        }
        _ = try? image.flush()
    }
    try? layer.close()
    guard let again = openScratch(format: format, writable: false) else { return }
    walk(again, statusCalls: 16)
    try? again.close()
}

/// The C API entry points that parse the same file: they add the operations layer (info, check) on top of the
/// driver.
private func exerciseCAPI(format: String) {
    format.withCString { fmt in
        fuzzSecret.withCString { secret in
            var opts = instar_info_options_t()
            instar_info_options_init(&opts)
            opts.open_flags = UInt32(INSTAR_OPEN_FORCE_SHARE) | UInt32(INSTAR_OPEN_NO_BACKING)
            opts.format = fmt
            opts.key_secret = secret
            var json: UnsafeMutablePointer<CChar>?
            if instar_info_json(scratchPath, &opts, &json, nil) == 0 {
                instar_string_free(json)
            }

            var copts = instar_check_options_t()
            instar_check_options_init(&copts)
            copts.open_flags = UInt32(INSTAR_OPEN_FORCE_SHARE)
            copts.format = fmt
            copts.key_secret = secret
            // The JSON form: an input can make a check report millions of lines (one per bad table entry, as
            // qemu does), which instar_check_report would gather into one string.
            var cjson: UnsafeMutablePointer<CChar>?
            if instar_check_json(scratchPath, &copts, &cjson, nil) == 0 {
                instar_string_free(cjson)
            }
        }
    }
}
