import Glibc
import Instar

private let optObject: Int32 = 257
private let optImageOpts: Int32 = 258
private let optTargetImageOpts: Int32 = 259
private let optSalvage: Int32 = 260
private let optTargetIsZero: Int32 = 261
private let optBitmaps: Int32 = 262
private let optSkipBrokenBitmaps: Int32 = 263
private let optIsolated: Int32 = 264

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
        LongOption(name: "isolated", argument: .none, value: optIsolated),
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
    var copyRange = false
    var explicitSparse = false
    var salvage = false
    var snapshot: ConvertOperation.SnapshotSelector?
    var isolated = false
    for (c, arg) in parsed.options {
        let a = arg ?? ""
        switch c {
        case .opt(":"), .opt("?"): return optionError(c, arg)
        case .opt("h"): CLI.out.write(helpText); return 0
        case .opt("f"): sourceFormat = a
        case .opt("O"): targetFormat = a
        case .opt("B"): options.backingFile = a
        case .opt("F"): options.backingFormat = a
        case .opt("C"): copyRange = true
        case .opt("c"): options.compress = true
        case .opt("o"):
            if !accumulateOptions(&createOptions, a) { return 1 }
        case .opt("l"):
            do {
                snapshot = try ConvertOperation.SnapshotSelector(parsing: a)
            } catch let e as InstarError {
                CLI.error(e.message)
                CLI.error("Failed in parsing snapshot param '\(a)'")
                return 1
            } catch { return 1 }
        case .opt("S"):
            guard let v = cvtnum("buffer size for sparse output", a) else { return 1 }
            if let msg = ConvertOperation.sparseSizeError(UInt64(v)) { CLI.error(msg); return 1 }
            options.sparseSize = UInt64(v)
            explicitSparse = true
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
            options.coroutines = m
        case .opt("W"): options.unorderedWrites = true
        case .opt("U"): forceShare = true
        case .opt("r"):
            guard let r = cvtnum("rate limit", a) else { return 1 }
            options.rateLimit = UInt64(r)
        case optImageOpts: imageOpts = true
        case optTargetImageOpts: targetImageOpts = true
        case optObject: if !cliAddObject(a) { return 1 }
        case optSalvage: salvage = true
        case optTargetIsZero: options.targetIsZero = true
        case optBitmaps: options.bitmaps = true
        case optSkipBrokenBitmaps: options.skipBrokenBitmaps = true
        case optIsolated: isolated = true
        default: break
        }
    }
    if options.skipBrokenBitmaps && !options.bitmaps {
        CLI.error("Use of --skip-broken-bitmaps requires --bitmaps")
        return 1
    }
    if copyRange && options.compress {
        CLI.error("Cannot enable copy offloading when -c is used")
        return 1
    }
    if explicitSparse && copyRange {
        CLI.error("Cannot enable copy offloading when -S is used")
        return 1
    }
    if copyRange && salvage {
        CLI.error("Cannot use copy offloading in salvaging mode")
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
    if options.targetIsZero && !options.noCreate {
        CLI.error("--target-is-zero requires use of -n flag")
        return 1
    }
    let files = parsed.operands
    let fmt = targetFormat ?? "raw"
    if let o = createOptions, CreateOptionValues.wantsHelp(o) {
        return printOptionHelp(filename: files.count >= 2 ? files.last : nil, format: fmt)
    }
    guard files.count >= 2 else {
        CLI.error("Must specify image file name")
        return 1
    }
    let target = files[files.count - 1]
    let sourceNames = Array(files.dropLast())
    guard let srcCache = CacheMode(qemuName: sourceCache) else {
        CLI.error("Invalid source cache option: \(sourceCache)")
        return 1
    }
    if quiet { progress = false }
    options.targetFormat = fmt
    options.createOptions = createOptions
    options.targetCacheName = targetCache
    // qemu-img leaves whatever it created behind when it fails.
    options.removeTargetOnFailure = false
    options.progress = progressPrinter(progress)
    options.secrets = cliSecrets
    options.warning = { CLI.error("warning: \($0)") }
    options.copyRange = copyRange
    options.salvage = salvage
    if !quiet { options.salvageWarning = { CLI.error("warning: \($0)") } }
    if targetImageOpts {
        do {
            options.targetSpec = try ImageOpener.commandLineSpec(target, format: nil, imageOpts: true,
                                                                 warn: { CLI.error("warning: \($0)") })
        } catch let e as InstarError {
            CLI.error("Could not open '\(target)': \(e.message)")
            return 1
        } catch { return 1 }
    }
    var meter = ProgressMeter(minSkip: 1.0, report: options.progress)
    try? meter.advance(0, max: 100)
    let status = runConvert(sourceNames: sourceNames, target: target, sourceFormat: sourceFormat,
                            options: options, imageOpts: imageOpts, forceShare: forceShare, sourceCache: srcCache,
                            snapshot: snapshot, isolated: isolated)
    progressEnd(progress)
    return status
}

private func runConvert(sourceNames: [String], target: String, sourceFormat: String?, options: ConvertOptions,
                        imageOpts: Bool, forceShare: Bool, sourceCache: CacheMode,
                        snapshot: ConvertOperation.SnapshotSelector?, isolated: Bool = false) -> Int32 {
    var sources: [ImageLayer] = []
    var isolatedSources: IsolatedSources?
    defer {
        for s in sources { try? s.close() }
        isolatedSources?.close()
    }
    if isolated {
        // --isolated: the sources are parsed in the confined helper (which loads -l's snapshot too) and read
        // through it; the target is written here (docs/isolated.md).
        var open = ImageOpenOptions()
        open.forceShare = forceShare
        open.direct = sourceCache.direct
        open.secrets = cliSecrets
        do {
            let s = try IsolatedMode.openSources(sourceNames, format: sourceFormat, commandLine: true,
                                                 imageOpts: imageOpts, open: open, snapshot: snapshot,
                                                 warn: { CLI.error("warning: \($0)") })
            isolatedSources = s
            sources = s.layers
        } catch let e as InstarError {
            CLI.error(e.message)
            return 1
        } catch {
            CLI.error("\(error)")
            return 1
        }
    } else {
        for name in sourceNames {
            guard let s = cliOpenImage(name, format: sourceFormat, imageOpts: imageOpts, forceShare: forceShare,
                                       direct: sourceCache.direct, noShareWrite: true) else { return 1 }
            sources.append(s)
        }
    }
    if let sel = snapshot, !isolated {
        do {
            try ConvertOperation.loadSnapshot(sel, sources: sources)
        } catch let e as InstarError {
            CLI.error(e.message)
            return 1
        } catch { return 1 }
    }
    do {
        try ConvertOperation.convert(sources: sources, target: target, options: options)
    } catch let e as ConvertStopped {
        CLI.error(e.message)
        var meter = ProgressMeter(minSkip: 1.0, report: options.progress)
        try? meter.advance(100, max: 0)
        return 0
    } catch is CompressedEndRefused {
        // The copy is complete, but the end-of-stream compressed write failed: qemu-img exits 1 silently.
        return 1
    } catch let e as StepError where isolated && (e.error.code == .isolation || e.error.code == .limit) {
        // The helper ended (crashed, misbehaved, overran its deadline): how, instead of a meaningless errno.
        CLI.error(e.instarError.message)
        return 1
    } catch let e as StepError {
        // qemu-img names the step and the chunk, then strerror of the block layer's code.
        switch e.step {
        case .read:
            CLI.error("error while reading at byte \(e.offset): \(strerrorString(e.errnoValue))")
            for more in e.alsoFailed {
                CLI.error("error while reading at byte \(more.offset): \(strerrorString(more.errnoValue))")
            }
        case .write: CLI.error("error while writing at byte \(e.offset): \(strerrorString(e.errnoValue))")
        case .blockStatus:
            CLI.error("error while reading block status at offset \(e.offset): \(strerrorString(e.errnoValue))")
        }
        return 1
    } catch let e as InstarError where e.message.hasPrefix(ConvertOperation.inconsistentBitmapPrefix) {
        CLI.error(e.message)
        fputs("Try --skip-broken-bitmaps, or use '\(CLI.programName) bitmap --remove' to delete it\n", stderr)
        return 1
    } catch let e as InstarError {
        printCreateError(e)
        return 1
    } catch {
        CLI.error("\(error)")
        return 1
    }
    return 0
}
