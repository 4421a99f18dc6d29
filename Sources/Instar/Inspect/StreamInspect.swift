// oslo.utils' format_inspector stream model, run by the library over a file: every format's inspector is fed
// the same 4 KiB chunks, keeps the regions it asks for, reads them with the probes of Probe.swift, and may fail
// (an inspector that throws is dropped from the feed but still counts in the decision, as in
// InspectWrapper). `StreamDetect.run` gives what detect_file_format() and safety_check() would say: the matched
// formats and, per matched format, its safety findings or why it cannot be checked. Inspect.swift builds
// instar_inspect's report from that plus the checks oslo.utils does not make.

/// oslo.utils' ImageFormatError: an inspector cannot go on (malformed structure).
struct StreamFormatError: Error {
    var message: String
}

/// A range of the stream an inspector keeps (CaptureRegion), or its last `length` bytes (EndCaptureRegion).
final class StreamRegion {
    var offset: UInt64
    var length: UInt64
    let minLength: UInt64?
    let atEnd: Bool
    var ended = false
    var data: [UInt8] = []

    init(offset: UInt64, length: UInt64, minLength: UInt64? = nil) {
        self.offset = offset
        self.length = length
        self.minLength = minLength
        atEnd = false
    }

    init(last length: UInt64) {
        offset = length
        self.length = length
        minLength = nil
        atEnd = true
    }

    var complete: Bool {
        if atEnd { return ended && UInt64(data.count) == length }
        if let m = minLength { return UInt64(data.count) >= m }
        return UInt64(data.count) == length
    }

    /// Takes what it wants of `chunk`, which ends at `position` in the stream.
    func capture(_ chunk: ArraySlice<UInt8>, position: UInt64) {
        if atEnd {
            let keep = Int(min(length, 1 << 20))
            var joined = data
            joined.append(contentsOf: chunk)
            data = Array(joined.suffix(keep))
            offset = position &- UInt64(data.count)
            return
        }
        let start = position &- UInt64(chunk.count)
        let (regionEnd, o) = offset.addingReportingOverflow(length)
        let overlaps = (start <= offset && offset <= position) || (offset <= start && (o || start <= regionEnd))
        guard overlaps else { return }
        let skip = start < offset ? offset - start : 0
        guard skip < UInt64(chunk.count), UInt64(data.count) < length else { return }
        let room = length - UInt64(data.count)
        let take = Int(min(room, UInt64(chunk.count) - skip))
        let from = chunk.startIndex + Int(skip)
        data.append(contentsOf: chunk[from..<(from + take)])
    }
}

/// One failed safety check.
struct StreamFinding {
    var code: InspectCode
    var check: String
    var field: String
    var offset: UInt64
    var message: String
}

/// The verdict of safety_check() on one inspector.
enum StreamVerdict {
    case checked([StreamFinding])
    case formatError(String)
}

/// One format's inspector (FileInspector): named regions in insertion order, fed chunk by chunk.
class StreamInspector {
    let name: String
    var regions: [(name: String, region: StreamRegion)] = []
    var total: UInt64 = 0
    var finished = false
    var errored = false

    init(name: String) { self.name = name }

    func region(_ n: String) -> StreamRegion? { regions.first { $0.name == n }?.region }
    func has(_ n: String) -> Bool { region(n) != nil }

    func newRegion(_ n: String, _ r: StreamRegion) throws {
        guard !has(n) else { throw StreamFormatError(message: "Inspector re-added region \(n)") }
        regions.append((n, r))
    }

    func deleteRegion(_ n: String) { regions.removeAll { $0.name == n } }

    func eat(_ chunk: ArraySlice<UInt8>) throws {
        // The region objects themselves are held (not their identifiers): a deleted region's memory may be reused
        // by the one that replaces it.
        let before = regions.map { $0.region }
        let doneBefore = before.filter { $0.complete }
        total &+= UInt64(chunk.count)
        capture(chunk, only: nil)
        try postProcess()
        let added = regions.map { $0.region }.filter { r in !before.contains { $0 === r } }
        if !added.isEmpty { capture(chunk, only: added) }
        let newlyComplete = regions.filter { e in e.region.complete && !doneBefore.contains { $0 === e.region } }
        for r in newlyComplete { try regionComplete(r.name) }
    }

    private func capture(_ chunk: ArraySlice<UInt8>, only: [StreamRegion]?) {
        for (_, r) in regions {
            if let only, !only.contains(where: { $0 === r }) { continue }
            if r.atEnd || !r.complete { r.capture(chunk, position: total) }
        }
    }

    func finish() {
        finished = true
        for (_, r) in regions where r.atEnd { r.ended = true }
    }

    var complete: Bool { regions.allSatisfy { $0.region.complete } }

    /// The first byte a region still waiting for data wants, nil when none waits (end regions excepted).
    var nextWanted: UInt64? {
        regions.filter { !$0.region.atEnd && !$0.region.complete }
            .map { $0.region.offset &+ UInt64($0.region.data.count) }.min()
    }
    var wantsEnd: Bool { regions.contains { $0.region.atEnd } }

    // Per-format behaviour.
    func postProcess() throws {}
    func regionComplete(_ name: String) throws {}
    var formatMatch: Bool { false }
    /// The virtual size oslo.utils reports; nil when it does not fit in 64 bits.
    var virtualSize: UInt64? { total }
    func checks() -> [StreamFinding] { [] }

    func safetyCheck() -> StreamVerdict {
        guard complete else { return .formatError("Incomplete file cannot be safety checked") }
        guard formatMatch else {
            return .formatError("Unable to safety check format \(name) because content does not match")
        }
        return .checked(checks())
    }

    /// The probe of `part` over region `n`, nil without the region; a malformed structure throws.
    func probe(_ n: String, part: String = "header", options: ProbeOptions = ProbeOptions()) throws -> ProbeReport? {
        guard let r = region(n) else { return nil }
        do {
            return try Probe.run(format: name, part: part, regions: ProbeRegions(regions: [ProbeRegion(offset: r.offset, bytes: r.data)]),
                                 options: options)
        } catch let e as InstarError {
            throw StreamFormatError(message: e.message)
        }
    }

    func matches(_ n: String, part: String = "header") -> Bool {
        ((try? probe(n, part: part)) ?? nil)?.match == true
    }
}

final class Qcow2Stream: StreamInspector {
    var header: ProbeReport?
    init() throws {
        super.init(name: "qcow2")
        try newRegion("header", StreamRegion(offset: 0, length: 512))
    }
    func read() -> ProbeReport? {
        var o = ProbeOptions()
        o.qcow2KnownFeatures = 4
        return (try? probe("header", options: o)) ?? nil
    }
    override func regionComplete(_ n: String) throws { if n == "header" { header = read() } }
    override var formatMatch: Bool { region("header")?.complete == true && header?.match == true }
    override var virtualSize: UInt64? { header?.match == true ? (header?.virtualSize ?? 0) : 0 }
    override func checks() -> [StreamFinding] {
        guard let h = read() else { return [] }
        var out: [StreamFinding] = []
        if h.violations.contains(.backingFile) {
            out.append(StreamFinding(code: .backingFile, check: "backing_file", field: "qcow2.backing_file_offset", offset: 8,
                                     message: "Image has a backing file"))
        }
        if h.violations.contains(.dataFile) {
            out.append(StreamFinding(code: .dataFile, check: "data_file", field: "qcow2.incompatible_features", offset: 72,
                                     message: "Image has data_file set"))
        }
        if h.violations.contains(.unsupportedVersion) {
            out.append(StreamFinding(code: .unsupportedVersion, check: "unknown_features", field: "qcow2.version", offset: 4,
                                     message: "Unsupported qcow2 version"))
        } else if h.violations.contains(.unknownFeatures) {
            out.append(StreamFinding(code: .unknownFeatures, check: "unknown_features", field: "qcow2.incompatible_features",
                                     offset: 72, message: "Unknown QCOW2 features found"))
        }
        return out
    }
}

final class QedStream: StreamInspector {
    init() throws {
        super.init(name: "qed")
        try newRegion("header", StreamRegion(offset: 0, length: 512))
    }
    override var formatMatch: Bool { region("header")?.complete == true && matches("header") }
    override func checks() -> [StreamFinding] {
        [StreamFinding(code: .bannedFormat, check: "banned", field: "qed", offset: 0, message: "This file format is not allowed")]
    }
}

final class VhdStream: StreamInspector {
    init() throws {
        super.init(name: "vhd")
        try newRegion("header", StreamRegion(offset: 0, length: 512))
    }
    override var formatMatch: Bool { matches("header") }
    override var virtualSize: UInt64? {
        guard region("header")?.complete == true, let r = (try? probe("header")) ?? nil, r.match == true else { return 0 }
        return r.virtualSize ?? 0
    }
}

final class VhdxStream: StreamInspector {
    init() throws {
        super.init(name: "vhdx")
        try newRegion("ident", StreamRegion(offset: 0, length: 32))
        try newRegion("header", StreamRegion(offset: VhdxProbe.regionTableOffset, length: 64 * 1024))
    }
    override func postProcess() throws {
        if region("header")?.complete == true && !has("metadata") {
            if let r = try probe("header"), r.match == true, let need = r.need {
                try newRegion("metadata", StreamRegion(offset: need.offset, length: VhdxProbe.metadataTableBytes))
            }
        } else if let meta = region("metadata"), !has("vds") {
            guard meta.data.count >= 32 else { return }
            let r = try probe("metadata", part: "metadata")
            guard let r, r.match == true, let need = r.need else { return }
            meta.length = UInt64(meta.data.count)
            try newRegion("vds", StreamRegion(offset: need.offset, length: need.length))
        }
    }
    override var formatMatch: Bool { matches("ident", part: "ident") }
    override var virtualSize: UInt64? {
        guard region("vds")?.complete == true, let r = (try? probe("vds", part: "item")) ?? nil else { return 0 }
        return r.virtualSize ?? 0
    }
}

final class VmdkStream: StreamInspector {
    var descText: [UInt8]?
    var vmdkType = "formatnotfound"
    var descriptor: ProbeReport?
    var hasFooterCheck = false

    init() throws {
        super.init(name: "vmdk")
        try newRegion("header", StreamRegion(offset: 0, length: 512, minLength: UInt64(VmdkProbe.headerBytes)))
        try newRegion("descriptor", StreamRegion(offset: 0, length: VmdkProbe.descriptorMax, minLength: 4))
    }

    override func postProcess() throws {
        guard let hr = region("header"), hr.complete else { return }
        guard let h = try probe("header") else { return }
        if h.text {
            deleteRegion("header")
            return
        }
        if h.footer && !has("footer") {
            try newRegion("footer", StreamRegion(last: 1536))
            hasFooterCheck = true
        }
        if region("descriptor")?.offset == 0, let need = h.need {
            deleteRegion("descriptor")
            try newRegion("descriptor", StreamRegion(offset: need.offset, length: need.length))
        }
    }

    override func regionComplete(_ n: String) throws {
        guard n == "descriptor", let r = region("descriptor") else { return }
        guard let rep = try probe("descriptor", part: "descriptor"), rep.match == true else { return }
        var text = r.data
        if let nul = text.firstIndex(of: 0) { text = Array(text[0..<nul]) }
        descText = text
        vmdkType = rep.subformat
        descriptor = rep
    }

    override var formatMatch: Bool {
        if let hr = region("header") {
            let first4 = Array(hr.data.prefix(4))
            return first4.count == 4 && first4 == VmdkProbe.magic
        }
        return vmdkType != "formatnotfound"
    }

    override var virtualSize: UInt64? {
        guard let d = descText, !d.isEmpty, vmdkType == "monolithicsparse" || vmdkType == "streamoptimized" else { return 0 }
        guard let r = (try? probe("header")) ?? nil else { return 0 }
        let (v, o) = r.sectors.multipliedReportingOverflow(by: 512)
        return o ? nil : v
    }

    override func checks() -> [StreamFinding] {
        var out: [StreamFinding] = []
        let descAt = region("descriptor")?.offset ?? 0
        if descText?.isEmpty != false || descriptor == nil {
            out.append(StreamFinding(code: .vmdkDescriptor, check: "descriptor", field: "vmdk.descriptor", offset: descAt,
                                     message: "No descriptor found"))
        } else if let d = descriptor, !d.violations.isEmpty {
            let code: InspectCode = d.violations.contains(.extentPath) ? .vmdkExtentPath : .vmdkDescriptor
            out.append(StreamFinding(code: code, check: "descriptor", field: "vmdk.descriptor", offset: descAt, message: d.message))
        }
        if hasFooterCheck, let h = region("header"), let f = region("footer") {
            let rep = VmdkProbe.footer(ProbeRegions(regions: [ProbeRegion(offset: 0, bytes: h.data),
                                                              ProbeRegion(offset: f.offset, bytes: f.data)]))
            if !rep.violations.isEmpty {
                out.append(StreamFinding(code: .vmdkFooter, check: "footer", field: "vmdk.footer", offset: f.offset,
                                         message: rep.message))
            }
        }
        return out
    }
}

final class VdiStream: StreamInspector {
    init() throws {
        super.init(name: "vdi")
        try newRegion("header", StreamRegion(offset: 0, length: 512))
    }
    override var formatMatch: Bool { region("header")?.complete == true && matches("header") }
    override var virtualSize: UInt64? {
        guard formatMatch, let r = (try? probe("header")) ?? nil else { return 0 }
        return r.virtualSize ?? 0
    }
}

final class IsoStream: StreamInspector {
    init() throws {
        super.init(name: "iso")
        try newRegion("system_area", StreamRegion(offset: 0, length: 32 * 1024))
        try newRegion("header", StreamRegion(offset: 32 * 1024, length: 2 * 1024))
    }
    override var formatMatch: Bool { complete && matches("header") }
    override var virtualSize: UInt64? {
        guard formatMatch, let r = (try? probe("header")) ?? nil else { return 0 }
        return r.virtualSize ?? 0
    }
}

final class GptStream: StreamInspector {
    init() throws {
        super.init(name: "gpt")
        try newRegion("mbr", StreamRegion(offset: 0, length: 512))
    }
    override var formatMatch: Bool { region("mbr")?.complete == true && matches("mbr", part: "mbr") }
    override func checks() -> [StreamFinding] {
        guard let r = (try? probe("mbr", part: "mbr")) ?? nil, !r.violations.isEmpty else { return [] }
        return [StreamFinding(code: .partitions, check: "mbr", field: "mbr.partition_table", offset: 446, message: r.message)]
    }
}

final class LuksStream: StreamInspector {
    init() throws {
        super.init(name: "luks")
        try newRegion("header", StreamRegion(offset: 0, length: 592))
    }
    override var formatMatch: Bool { matches("header") }
    override var virtualSize: UInt64? {
        let payload = UInt64(((try? probe("header")) ?? nil)?.payloadOffset ?? 0) * 512
        return total > payload ? total - payload : 0
    }
    override func checks() -> [StreamFinding] {
        guard let r = (try? probe("header")) ?? nil, r.violations.contains(.unsupportedVersion) else { return [] }
        return [StreamFinding(code: .unsupportedVersion, check: "version", field: "luks.version", offset: 6, message: r.message)]
    }
}

/// detect_file_format() over a file: the inspectors that matched once the decision is reached.
struct StreamDetection {
    var matches: [StreamInspector]
    var fileSize: UInt64
}

enum StreamDetect {
    static let chunkSize = 4096
    /// The formats in oslo.utils' ALL_FORMATS order (raw aside).
    static let order = ["qcow2", "vhd", "vhdx", "vmdk", "vdi", "qed", "iso", "gpt", "luks"]

    static func makeInspectors() throws -> [StreamInspector] {
        [try Qcow2Stream(), try VhdStream(), try VhdxStream(), try VmdkStream(), try VdiStream(), try QedStream(),
         try IsoStream(), try GptStream(), try LuksStream()]
    }

    /// Feeds `file` through every inspector, 4 KiB at a time, until each one is complete (or the file ends).
    /// Stretches no inspector waits for are skipped whole, chunk-aligned, so every inspector sees the same
    /// chunk boundaries as a full read.
    static func run(_ file: HostFile) throws -> StreamDetection {
        let size = try file.size()
        let inspectors = try makeInspectors()
        var pos: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: chunkSize)
        func feed(_ chunk: ArraySlice<UInt8>) {
            for i in inspectors where !i.errored {
                do { try i.eat(chunk) } catch { i.errored = true }
            }
        }
        while true {
            if inspectors.allSatisfy({ $0.complete }) { break }
            // Skip ahead when no live inspector wants the bytes in between.
            let live = inspectors.filter { !$0.errored }
            let wanted = live.compactMap { $0.nextWanted }.min()
            var target = wanted ?? size
            if live.contains(where: { $0.wantsEnd }) && size > 1536 + UInt64(chunkSize) {
                target = min(target, size - 1536 - UInt64(chunkSize))
            }
            target -= target % UInt64(chunkSize)
            if min(target, size) > pos {
                let gap = min(target, size) - pos
                let skip = gap - gap % UInt64(chunkSize)
                if skip > 0 {
                    for i in live { i.total &+= skip }
                    pos += skip
                }
            }
            let n = try buffer.withUnsafeMutableBytes { try file.read(into: $0, at: pos) }
            pos += UInt64(n)
            feed(buffer[0..<n])
            if n == 0 { break }
        }
        for i in inspectors { i.finish() }
        return StreamDetection(matches: inspectors.filter { $0.formatMatch }, fileSize: size)
    }
}
