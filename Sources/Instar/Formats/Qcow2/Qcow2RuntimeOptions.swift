import Glibc

/// qcow2's runtime options (--image-opts, json: names), checked as qemu 7.2's qcow2 driver checks them when it
/// opens an image (qcow2_update_options): the values of its own options, the cache sizes against each other, the
/// encryption options against the header. instar keeps no settable caches and makes no overlap checks, so the
/// values themselves change nothing here, but a value qemu refuses fails the open with qemu's message.
///
/// A name the driver does not know fails the open too, but only once the backing chain is open, where qemu's
/// block layer looks for options nobody used (`FormatDescriptor.knownOption`, checked in `ImageOpener`).
enum Qcow2RuntimeOptions {
    /// qcow2_runtime_opts (but encrypt.key-secret, which the encryption options below cover).
    private static let kinds: [String: CreateOptionSpec.Kind] = [
        "lazy-refcounts": .bool,
        "pass-discard-request": .bool,
        "pass-discard-snapshot": .bool,
        "pass-discard-other": .bool,
        "overlap-check": .string,
        "overlap-check.template": .string,
        "overlap-check.main-header": .bool,
        "overlap-check.active-l1": .bool,
        "overlap-check.active-l2": .bool,
        "overlap-check.refcount-table": .bool,
        "overlap-check.refcount-block": .bool,
        "overlap-check.snapshot-table": .bool,
        "overlap-check.inactive-l1": .bool,
        "overlap-check.inactive-l2": .bool,
        "overlap-check.bitmap-directory": .bool,
        "cache-size": .size,
        "l2-cache-size": .size,
        "l2-cache-entry-size": .size,
        "refcount-cache-size": .size,
        "cache-clean-interval": .number,
    ]

    /// The options a qcow2 node uses: its runtime options, the encryption options and the data file child.
    static func isKnown(_ key: String) -> Bool {
        kinds[key] != nil || key.hasPrefix("encrypt.") || key == "data-file" || key.hasPrefix("data-file.")
    }

    /// DEFAULT_L2_CACHE_MAX_SIZE on Linux, MIN_REFCOUNT_CACHE_SIZE (clusters), and qemu's smallest cluster.
    private static let defaultL2CacheMax: UInt64 = 32 << 20
    private static let minRefcountCacheClusters: UInt64 = 4
    private static let minClusterBytes: UInt64 = 512
    private static let defaultCleanInterval: UInt64 = 600

    /// The checks of qcow2_update_options_prepare, in its order; throws the first failure.
    static func check(_ options: [String: QObject], header h: Qcow2Header) throws {
        // qemu_opts_absorb_qdict: each option of the driver's list, in the QDict's order, parsed by its type.
        var values: [String: String] = [:]
        let own = options.filter { kinds[$0.key] != nil }.sorted { $0.key < $1.key }
        for (key, value) in QJSON.qdictOrder(own.map { ($0.key, $0.value) }) {
            guard let kind = kinds[key], let text = scalarText(value) else { continue }
            // qemu_opt_parse: the same parsers and messages as creation options.
            try CreateOptionValues.validate(CreateOptionSpec(key, kind, ""), text)
            values[key] = text
        }

        // read_cache_sizes
        let clusterSize = h.clusterSize
        let virtualSize = h.size / 512 * 512
        let l2Entries = virtualSize.divCeil(clusterSize)
        let maxL2Cache = (l2Entries.multipliedReportingOverflow(by: h.l2EntryBytes).partialValue)
            .divCeil(clusterSize).multipliedReportingOverflow(by: clusterSize).partialValue
        let combinedSet = values["cache-size"] != nil
        let l2Set = values["l2-cache-size"] != nil
        let refcountSet = values["refcount-cache-size"] != nil
        let combined = size(values["cache-size"]) ?? 0
        let l2Setting = size(values["l2-cache-size"]) ?? defaultL2CacheMax
        var refcountCache = size(values["refcount-cache-size"]) ?? 0
        var entrySize = size(values["l2-cache-entry-size"]) ?? clusterSize
        var l2Cache = min(maxL2Cache, l2Setting)
        let minRefcountCache = minRefcountCacheClusters * clusterSize
        if combinedSet {
            if l2Set && refcountSet {
                throw InstarError.invalid("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
            } else if l2Set && l2Setting > combined {
                throw InstarError.invalid("l2-cache-size may not exceed cache-size")
            } else if refcountCache > combined {
                throw InstarError.invalid("refcount-cache-size may not exceed cache-size")
            }
            // Unsigned wrap-around where qemu's uint64_t arithmetic wraps.
            if l2Set {
                refcountCache = combined &- l2Cache
            } else if refcountSet {
                l2Cache = combined &- refcountCache
            } else if combined >= maxL2Cache &+ minRefcountCache {
                l2Cache = maxL2Cache
                refcountCache = combined &- l2Cache
            } else {
                refcountCache = min(combined, minRefcountCache)
                l2Cache = combined &- refcountCache
            }
        }
        if l2Cache < maxL2Cache && values["l2-cache-entry-size"] == nil {
            entrySize = min(clusterSize, 4096)
        }
        if entrySize < minClusterBytes || entrySize > clusterSize || entrySize & (entrySize &- 1) != 0 {
            throw InstarError.invalid("L2 cache entry size must be a power of two between \(minClusterBytes) and the "
                                      + "cluster size (\(clusterSize))")
        }
        if l2Cache / entrySize > UInt64(Int32.max) { throw InstarError.invalid("L2 cache size too big") }
        if refcountCache / clusterSize > UInt64(Int32.max) { throw InstarError.invalid("Refcount cache size too big") }

        let interval = values["cache-clean-interval"].flatMap(CreateOptionValues.parseNumber) ?? defaultCleanInterval
        if interval > UInt64(UInt32.max) { throw InstarError.invalid("Cache clean interval too big") }

        let lazy = values["lazy-refcounts"].flatMap(CreateOptionValues.parseBool)
            ?? (h.compatibleFeatures & Qcow2.compatLazyRefcounts != 0)
        if lazy && h.version < 3 {
            throw InstarError.invalid("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
        }

        let overlap = values["overlap-check"]
        let template = values["overlap-check.template"]
        if let o = overlap, let t = template, o != t {
            throw InstarError.invalid("Conflicting values for qcow2 options 'overlap-check' ('\(o)') and "
                                      + "'overlap-check.template' ('\(t)')")
        }
        let mode = overlap ?? template ?? "cached"
        guard ["none", "constant", "cached", "all"].contains(mode) else {
            throw InstarError.invalid("Unsupported value '\(mode)' for qcow2 option 'overlap-check'. Allowed are any of "
                                      + "the following: none, constant, cached, all")
        }

        // The encryption options against the header's method, then the crypto layer's own option names.
        let encrypt = options.filter { $0.key.hasPrefix("encrypt.") }
        let format = encrypt["encrypt.format"].flatMap(scalarText)
        switch h.cryptMethod {
        case Qcow2.cryptNone:
            if let f = format {
                throw InstarError.invalid("No encryption in image header, but options specified format '\(f)'")
            }
        case Qcow2.cryptAES, Qcow2.cryptLUKS:
            let name = h.cryptMethod == Qcow2.cryptAES ? "aes" : "luks"
            if let f = format, f != name {
                throw InstarError.invalid("Header reported '\(name)' encryption format but options specify '\(f)'")
            }
            let unexpected = encrypt.keys.map { String($0.dropFirst("encrypt.".count)) }
                .filter { $0 != "format" && $0 != "key-secret" }.sorted()
            if let first = QJSON.qdictOrder(unexpected.map { ($0, QObject.null) }).first?.0 {
                throw InstarError.invalid("Parameter '\(first)' is unexpected")
            }
        default:
            throw InstarError.unsupported("Unsupported encryption method \(h.cryptMethod)")
        }
    }

    /// The text qemu_opts_from_qdict_entry gives a value; nil for the types it skips (dicts, lists, null).
    private static func scalarText(_ v: QObject) -> String? {
        switch v {
        case let .string(s): return s
        case let .bool(b): return b ? "on" : "off"
        case let .int(n): return String(n)
        case let .uint(n): return String(n)
        case let .double(d): return QJSON.compact(.double(d))
        default: return nil
        }
    }

    private static func size(_ text: String?) -> UInt64? {
        guard let t = text, case .success(let v) = SizeParse.parse(t) else { return nil }
        return v
    }
}
