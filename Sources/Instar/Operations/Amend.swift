import Glibc

/// `qemu-img amend`: changes creation options of an existing image through the driver's `ImageAmendable`
/// capability, with qemu-img 7.2's option parsing, messages and progress (img_amend).
public enum AmendOperation {
    public struct Options {
        /// -f; nil probes.
        public var format: String?
        /// --image-opts.
        public var imageOpts = false
        /// --object secrets.
        public var open = ImageOpenOptions()
        /// --force.
        public var force = false
        /// Passphrases given directly (the C API) for the options that name a new and an old secret (LUKS key
        /// slots): they fill the ids the options name, or the options are added naming library ids.
        public var newSecret: String?
        public var oldSecret: String?
        /// Receives warnings printed while the operation goes on (the probed-raw warning).
        public var warn: ((String) -> Void)?
        /// Receives the percentages qemu-img -p would print, unfiltered.
        public var progress: ((Double) throws -> Void)?
        public init() {}
    }

    /// The text of `amend -o help` for `format` (print_amend_option_help).
    public static func optionHelp(format: String) throws -> String {
        guard FormatRegistry.descriptor(named: format) != nil else {
            throw InstarError.invalid("Unknown file format '\(format)'")
        }
        guard let specs = AmendOptionTable.byFormat[format] else {
            throw InstarError(.unsupported, "Format driver '\(format)' does not support option amendment")
        }
        var out = "Amend options for '\(format)':\n"
        for l in CreateOptionValues.helpLines(specs) { out += l + "\n" }
        return out
    }

    /// Applies the `-o` list `optionList` to `name`. Returns the help text instead when the list asks for help
    /// (after opening the image, as qemu-img does when no format was given).
    @discardableResult
    public static func run(_ name: String, optionList: String, options: Options) throws -> String? {
        let layer = try ResizeOperation.openForWrite(name, format: options.format, imageOpts: options.imageOpts,
                                                     open: options.open, warn: options.warn)
        var closed = false
        defer { if !closed { try? layer.close() } }
        let format = layer.format.formatName
        if CreateOptionValues.wantsHelp(optionList) { return try optionHelp(format: format) }
        guard let amendable = layer.format as? ImageAmendable, let specs = AmendOptionTable.byFormat[format] else {
            throw InstarError(.unsupported, "Format driver '\(format)' does not support option amendment")
        }
        var optionList = optionList
        var secrets = options.open.secrets
        for (passphrase, suffix) in [(options.newSecret, "new-secret"), (options.oldSecret, "old-secret")] {
            guard let passphrase else { continue }
            guard let name = specs.first(where: { $0.name == suffix || $0.name.hasSuffix("." + suffix) })?.name else {
                throw InstarError.invalid("Invalid parameter '\(suffix)'")
            }
            if let id = try CreateOptionValues.split(optionList).last(where: { $0.0 == name })?.1 {
                secrets[id] = passphrase
            } else {
                let id = "instar-\(suffix)"
                secrets[id] = passphrase
                optionList += ",\(name)=\(id)"
            }
        }
        var values = CreateOptionValues(specs: specs)
        do {
            try values.parse(optionList)
        } catch let e as InstarError {
            // An option creation knows gets qemu's hint.
            if let creator = FormatRegistry.descriptor(named: format)?.creator {
                var all = CreateOptionValues(specs: specs + creator.options)
                if (try? all.parse(optionList)) != nil {
                    throw InstarError(e.code, e.message + "\nThis option is only supported for image creation")
                }
            }
            throw e
        }
        var list: [AmendOption] = []
        for (n, v) in try CreateOptionValues.split(optionList) { list.append(AmendOption(name: n, value: v)) }
        try options.progress?(0)
        do {
            try amendable.amend(options: list, force: options.force, secrets: secrets,
                                backing: layer.backing, progress: options.progress)
        } catch {
            // qemu-img completes the progress line before it reports the driver's error.
            try? options.progress?(100)
            throw error
        }
        try options.progress?(100)
        closed = true
        try layer.close()
        return nil
    }
}
