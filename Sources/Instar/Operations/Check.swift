/// `qemu-img check` (qemu-img.c img_check / collect_image_check / dump_*_image_check): runs the driver's check,
/// repeats it once without repair after a repair, and renders qemu-img's human or JSON report.

/// The image's driver has no check (qemu's -ENOTSUP from bdrv_check).
public struct CheckNotSupported: Error, CustomStringConvertible {
    public init() {}
    public var description: String { "This image format does not support checks" }
}

/// qemu's ImageCheck: what `check --output=json` prints.
public struct ImageCheckReport: Equatable {
    public var filename: String
    public var format: String
    public var result: CheckResult

    public init(filename: String, format: String, result: CheckResult) {
        self.filename = filename
        self.format = format
        self.result = result
    }

    /// The ImageCheck object; optional members are left out when zero, as collect_image_check does.
    public var qobject: QObject {
        let r = result
        var m: [(String, QObject)] = [("filename", .string(filename)), ("format", .string(format)),
                                      ("check-errors", .int(r.checkErrors))]
        func opt(_ key: String, _ v: Int64) { if v != 0 { m.append((key, .int(v))) } }
        opt("image-end-offset", r.imageEndOffset)
        opt("corruptions", r.corruptions)
        opt("leaks", r.leaks)
        opt("corruptions-fixed", r.corruptionsFixed)
        opt("leaks-fixed", r.leaksFixed)
        opt("total-clusters", r.totalClusters)
        opt("allocated-clusters", r.allocatedClusters)
        opt("fragmented-clusters", r.fragmentedClusters)
        opt("compressed-clusters", r.compressedClusters)
        return .dict(m)
    }

    /// `--output=json`, with the trailing newline.
    public var json: String { QJSON.pretty(qobject) + "\n" }

    /// dump_human_image_check.
    public var human: String {
        let r = result
        var out = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            out += "No errors were found on the image.\n"
        } else {
            if r.corruptions != 0 {
                out += "\n\(r.corruptions) errors were found on the image.\n"
                    + "Data may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks != 0 {
                out += "\n\(r.leaks) leaked clusters were found on the image.\n"
                    + "This means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors != 0 {
                out += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let allocated = Double(r.allocatedClusters)
            out += "\(r.allocatedClusters)/\(r.totalClusters) = "
                + cFormat("%0.2f", allocated * 100.0 / Double(r.totalClusters)) + "% allocated, "
                + cFormat("%0.2f", Double(r.fragmentedClusters) * 100.0 / allocated) + "% fragmented, "
                + cFormat("%0.2f", Double(r.compressedClusters) * 100.0 / allocated) + "% compressed clusters\n"
        }
        if r.imageEndOffset != 0 {
            out += "Image end offset: \(r.imageEndOffset)\n"
        }
        return out
    }
}

public enum CheckOperation {
    public struct Options {
        /// -f; nil probes.
        public var format: String?
        /// --image-opts.
        public var imageOpts = false
        /// -r leaks / -r all; empty to only check.
        public var repair: CheckRepair = []
        /// -U, cache mode and --object secrets.
        public var open = ImageOpenOptions()
        /// Receives qemu's warnings about the options (deprecated forms) as they arise; the library drops them.
        public var warn: ((String) -> Void)?
        public init() {}
    }

    /// How a check run ended.
    public struct Outcome {
        /// Set when the first pass repaired something: its counts, which qemu-img prints in the
        /// "The following inconsistencies were found and repaired" banner before checking again.
        public var repaired: (leaks: Int64, corruptions: Int64)?
        /// The report to print; nil when a pass failed (qemu-img then prints nothing on stdout).
        public var report: ImageCheckReport?
        /// errno of a failed pass ("Check failed: <strerror>").
        public var failureErrno: Int32?

        /// qemu-img check's exit status: 1 internal error, 2 corruptions, 3 leaks, 0 clean.
        public var exitCode: Int32 {
            guard let r = report?.result, failureErrno == nil, r.checkErrors == 0 else { return 1 }
            if r.corruptions != 0 { return 2 }
            if r.leaks != 0 { return 3 }
            return 0
        }
    }

    /// The banner qemu-img prints (human output) after a repairing pass.
    public static func repairBanner(leaks: Int64, corruptions: Int64) -> String {
        "The following inconsistencies were found and repaired:\n\n    \(leaks) leaked clusters\n"
            + "    \(corruptions) corruptions\n\nDouble checking the fixed image now...\n"
    }

    /// Opens `name` (writable when repairing) and checks it. Open failures throw InstarError with qemu-img's
    /// full message; a format without checks throws `CheckNotSupported`. `messages` receives the lines the
    /// check prints to stderr.
    public static func run(_ name: String, options: Options, messages: (CheckMessage) -> Void) throws -> Outcome {
        if options.imageOpts && options.format != nil {
            throw InstarError.invalid("--image-opts and --format are mutually exclusive")
        }
        let writable = !options.repair.isEmpty
        var open = options.open
        open.check = true
        let layer: ImageLayer
        do {
            let spec = try ImageOpener.commandLineSpec(name, format: options.format, imageOpts: options.imageOpts,
                                                       warn: options.warn)
            if writable && (open.forceShare || spec.forceShare == true) {
                throw InstarError.invalid("force-share=on can only be used with read-only images")
            }
            if options.imageOpts, open.forceShare, spec.forceShare == false {
                throw InstarError(.invalid, "--force-share/-U conflicts with image options")
            }
            layer = try ImageOpener.open(spec, options: open, writable: writable, openBacking: true)
        } catch let e as InstarError {
            throw e.prepending("Could not open '\(name)': ")
        }
        defer { try? layer.close() }
        guard let checkable = layer.format as? ImageCheckable else { throw CheckNotSupported() }
        let formatName = layer.format.formatName

        var outcome = Outcome()
        var first: CheckResult
        do {
            first = try checkable.check(repair: options.repair, report: messages)
        } catch let f as CheckFailure {
            outcome.failureErrno = f.errnoValue
            return outcome
        }
        if first.corruptionsFixed != 0 || first.leaksFixed != 0 {
            outcome.repaired = (first.leaksFixed, first.corruptionsFixed)
            do {
                var second = try checkable.check(repair: [], report: messages)
                second.leaksFixed = first.leaksFixed
                second.corruptionsFixed = first.corruptionsFixed
                first = second
            } catch let f as CheckFailure {
                outcome.failureErrno = f.errnoValue
                return outcome
            }
        }
        outcome.report = ImageCheckReport(filename: name, format: formatName, result: first)
        return outcome
    }
}

// MARK: - check --chain (an instar extension)

extension CheckOperation {
    /// One image of a backing chain, as `check --chain` checks it.
    public struct ChainMember {
        /// The name to check it by: the top as given, the rest as their overlays resolve them.
        public var filename: String
        /// The format it was opened with (nil for the top: the caller's -f or --image-opts apply).
        public var format: String?
    }

    /// The images of `name`'s backing chain, top first. Opens the chain read-only once (shared) and closes it;
    /// each image is then checked on its own by `run`. Open failures throw like `run` does.
    public static func chainMembers(_ name: String, options: Options) throws -> [ChainMember] {
        if options.imageOpts && options.format != nil {
            throw InstarError.invalid("--image-opts and --format are mutually exclusive")
        }
        var open = options.open
        open.forceShare = true
        let layer: ImageLayer
        do {
            let spec = try ImageOpener.commandLineSpec(name, format: options.format, imageOpts: options.imageOpts,
                                                       warn: options.warn)
            layer = try ImageOpener.open(spec, options: open, writable: false, openBacking: true)
        } catch let e as InstarError {
            throw e.prepending("Could not open '\(name)': ")
        }
        defer { try? layer.close() }
        var out = [ChainMember(filename: name, format: nil)]
        for below in layer.chain.dropFirst() {
            out.append(ChainMember(filename: below.filename, format: below.format.formatName))
        }
        return out
    }

    /// The exit status of a whole chain from its images' `check` statuses: the worst one, where a check that
    /// did not complete (1) is worse than corruptions (2), corruptions worse than leaks (3), leaks worse than an
    /// image whose format has no check (63), and that worse than clean (0).
    public static func worstExitCode(_ codes: [Int32]) -> Int32 {
        func rank(_ c: Int32) -> Int {
            switch c {
            case 0: return 0
            case 63: return 1
            case 3: return 2
            case 2: return 3
            default: return 4
            }
        }
        var worst: Int32 = 0
        for c in codes where rank(c) > rank(worst) { worst = c }
        return worst
    }
}
