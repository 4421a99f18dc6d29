import Glibc
import Instar

private let optObject: Int32 = 257
private let optImageOpts: Int32 = 258
private let optTargetImageOpts: Int32 = 259
private let optSalvage: Int32 = 260
private let optTargetIsZero: Int32 = 261
private let optBitmaps: Int32 = 262
private let optSkipBrokenBitmaps: Int32 = 263

/// Prints qemu's progress records to stdout as they come.
func progressPrinter(_ enabled: Bool) -> ((Double) throws -> Void)? {
    guard enabled else { return nil }
    return { percent in
        CLI.out.write(ProgressMeter.record(percent))
        CLI.out.flush()
    }
}

/// qemu_progress_end(): the newline after the last record.
func progressEnd(_ enabled: Bool) {
    if enabled { CLI.out.write("\n") }
}

/// `convert [-c] [-f FMT] [-O FMT] [-n] [-S SIZE] [-t CACHE] [-T CACHE] [-p] [-q] [-U] ... SRC... DST`
func convertCommand(_ args: [String]) -> Int32 {
    let parsed = GetOpt(args, shortOpts: ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", longOpts: [
        LongOption(name: "help", argument: .none, value: .opt("h")),
        LongOption(name: "object", argument: .required, value: optObject),
        LongOption(name: "image-opts", argument: .none, value: optImageOpts),
        LongOption(name: "target-image-opts", argument: .none, value: optTargetImageOpts),
        LongOption(name: "salvage", argument: .none, value: optSalvage),
        LongOption(name: "target-is-zero", argument: .none, value: optTargetIsZero),
        LongOption(name: "bitmaps", argument: .none, value: optBitmaps),
        LongOption(name: "skip-broken-bitmaps", argument: .none, value: optSkipBrokenBitmaps),
        LongOption(name: "force-share", argument: .none, value: .opt("U")),
    ])
    var sourceFormat: String?
    var targetFormat: String?
    var options = ConvertOptions()
    var progress = false
    var quiet = false
    var forceShare = false
    var imageOpts = false
    var targetImageOpts = false
    var createOptions: String?
    var sourceCache = "writeback"
    var targetCache = "unsafe"
    var backing: String?
    var bitmaps = false
    for (c, arg) in parsed.options {
        let a = arg ?? ""
        switch c {
        case .opt(":"), .opt("?"): return optionError(c, arg)
        case .opt("h"): CLI.out.write(helpText); return 0
        case .opt("f"): sourceFormat = a
        case .opt("O"): targetFormat = a
        case .opt("B"): backing = a
        case .opt("c"): options.compress = true
        case .opt("o"): createOptions = createOptions.map { $0 + "," + a } ?? a
        case .opt("S"):
            guard let v = cvtnum("buffer size for sparse output", a) else { return 1 }
            if let msg = ConvertOperation.sparseSizeError(UInt64(v)) { CLI.error(msg); return 1 }
            options.sparseSize = UInt64(v)
        case .opt("p"): progress = true
        case .opt("t"): targetCache = a
        case .opt("T"): sourceCache = a
        case .opt("q"): quiet = true
        case .opt("n"): options.noCreate = true
        case .opt("m"):
            guard let m = Int(a), m >= 1, m <= 16 else {
                CLI.error("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
                return 1
            }
        case .opt("U"): forceShare = true
        case .opt("r"):
            guard cvtnum("rate limit", a) != nil else { return 1 }
        case optImageOpts: imageOpts = true
        case optTargetImageOpts: targetImageOpts = true
        case optObject: if !cliAddObject(a) { return 1 }
        case optTargetIsZero: options.targetIsZero = true
        case optBitmaps: bitmaps = true
        default: break
        }
    }
    if quiet { progress = false }
    if options.targetIsZero && !options.noCreate {
        CLI.error("--target-is-zero requires use of -n flag")
        return 1
    }
    if targetImageOpts && !options.noCreate {
        CLI.error("--target-image-opts requires use of -n flag")
        return 1
    }
    if options.noCreate && createOptions != nil {
        CLI.error("-o has no effect when skipping image creation")
        return 1
    }
    let files = parsed.operands
    guard files.count >= 2 else {
        CLI.error("Must specify image file name")
        return 1
    }
    let target = files[files.count - 1]
    let sourceNames = files.dropLast()
    guard let srcCache = CacheMode(qemuName: sourceCache) else {
        CLI.error("Invalid source cache option: \(sourceCache)")
        return 1
    }
    options.progress = progressPrinter(progress)
    var meter = ProgressMeter(minSkip: 1.0, report: options.progress)
    try? meter.advance(0, max: 100)
    let status = runConvert(sourceNames: Array(sourceNames), target: target, sourceFormat: sourceFormat,
                            targetFormat: targetFormat ?? "raw", options: &options, imageOpts: imageOpts,
                            forceShare: forceShare, sourceCache: srcCache, targetCache: targetCache,
                            backing: backing, bitmaps: bitmaps, progress: progress, targetImageOpts: targetImageOpts)
    progressEnd(progress)
    return status
}

private func runConvert(sourceNames: [String], target: String, sourceFormat: String?, targetFormat: String,
                        options: inout ConvertOptions, imageOpts: Bool, forceShare: Bool, sourceCache: CacheMode,
                        targetCache: String, backing: String?, bitmaps: Bool, progress: Bool,
                        targetImageOpts: Bool = false) -> Int32 {
    var sources: [ImageLayer] = []
    defer { for s in sources { try? s.close() } }
    for name in sourceNames {
        guard let s = cliOpenImage(name, format: sourceFormat, imageOpts: imageOpts, forceShare: forceShare,
                                   direct: sourceCache.direct, noShareWrite: true) else { return 1 }
        sources.append(s)
    }
    if bitmaps {
        CLI.error("Source lacks bitmap support")
        return 1
    }
    guard FormatRegistry.descriptor(named: targetFormat) != nil else {
        CLI.error("Unknown file format '\(targetFormat)'")
        return 1
    }
    // Only raw targets can be created so far; other formats arrive with the create work.
    guard targetFormat == "raw" || options.noCreate else {
        CLI.error("Format driver '\(targetFormat)' does not support image creation")
        return 1
    }
    if backing != nil && !options.noCreate {
        CLI.error("Backing file not supported for file format '\(targetFormat)'")
        return 1
    }
    if options.compress {
        CLI.error("Compression not supported for this file format")
        return 1
    }
    let totalBytes = sources.reduce(UInt64(0)) { $0 + $1.virtualSize.divCeil(512) * 512 }
    var created = false
    if !options.noCreate {
        do {
            try ConvertOperation.createRawTarget(target, size: totalBytes)
            created = true
        } catch {
            CLI.error("\(target): error while converting \(targetFormat): \((error as? InstarError)?.message ?? "\(error)")")
            return 1
        }
    }
    guard let cache = CacheMode(qemuName: targetCache) else {
        // qemu has created the target by now and leaves it behind.
        CLI.error("Invalid cache option: \(targetCache)")
        return 1
    }
    options.targetCache = cache
    let targetImage: ImageLayer
    do {
        if targetImageOpts || !cliSecrets.isEmpty {
            // An existing target (-n) may be encrypted: it is opened with the option string and the secrets.
            let spec = targetImageOpts ? try imageOptsSpec(target) : try ImageOpener.parseSpec(target, format: targetFormat)
            var o = ImageOpenOptions()
            o.direct = cache.direct
            o.secrets = cliSecrets
            targetImage = try ImageOpener.open(spec, options: o, writable: true, openBacking: false)
        } else {
            targetImage = try ConvertOperation.openTarget(target, format: targetFormat, cache: cache)
        }
    } catch {
        CLI.error("Could not open '\(target)': \((error as? InstarError)?.message ?? "\(error)")")
        if created { unlink(target) }
        return 1
    }
    do {
        defer { try? targetImage.close() }
        try ConvertOperation.copy(sources: sources, into: targetImage, targetCreated: created, options: options)
    } catch let e as StepError {
        // qemu-img names the step and the chunk, then strerror of the block layer's code.
        switch e.step {
        case .read: CLI.error("error while reading at byte \(e.offset): \(strerrorString(e.errnoValue))")
        case .write: CLI.error("error while writing at byte \(e.offset): \(strerrorString(e.errnoValue))")
        case .blockStatus:
            CLI.error("error while reading block status at offset \(e.offset): \(strerrorString(e.errnoValue))")
        }
        if created && options.removeTargetOnFailure { unlink(target) }
        return 1
    } catch let e as InstarError {
        if e.code == .invalid && e.message == "output file is smaller than input file" {
            CLI.error(e.message)
        } else {
            CLI.error("error while writing at byte 0: \(e.message)")
        }
        if created && options.removeTargetOnFailure { unlink(target) }
        return 1
    } catch {
        CLI.error("\(error)")
        if created && options.removeTargetOnFailure { unlink(target) }
        return 1
    }
    return 0
}
