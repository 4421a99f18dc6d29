import Glibc

/// Creating vmdk images as qemu 7.2's vmdk_co_create_opts does: monolithicSparse and streamOptimized (one
/// hosted sparse extent with the descriptor at 0x200), monolithicFlat and twoGbMaxExtent{Sparse,Flat} (a
/// descriptor file plus extent files named after it), with qemu's descriptor text and a random CID.
public enum VmdkCreate {
    public static let options: [CreateOptionSpec] = [
        CreateOptionSpec("size", .size, "Virtual disk size"),
        CreateOptionSpec("adapter_type", .string,
                         "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
        CreateOptionSpec("backing_file", .string, "File name of a base image"),
        CreateOptionSpec("backing_fmt", .string, "Must be 'vmdk' if present"),
        CreateOptionSpec("compat6", .bool, "VMDK version 6 image", default: "off"),
        CreateOptionSpec("hwversion", .string, "VMDK hardware version", default: "undefined"),
        CreateOptionSpec("toolsversion", .string, "VMware guest tools version"),
        CreateOptionSpec("subformat", .string,
                         "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | "
                            + "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "),
        CreateOptionSpec("zeroed_grain", .bool, "Enable efficient zero writes using the zeroed-grain GTE feature"),
    ]

    public static let creator = FormatCreator(name: "vmdk", options: options, create: create)

    static let adapterTypes = ["ide", "buslogic", "lsilogic", "legacyESX"]
    static let subformats = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                             "streamOptimized"]

    static func create(_ r: CreateRequest) throws {
        let o = r.options
        if let f = o.text("backing_fmt"), f != "vmdk" {
            throw InstarError(.invalid, "backing_file must be a vmdk image", errno: EINVAL)
        }
        let (path, prefix, postfix) = try decompose(r.filename)
        let size = try (o.size("size") ?? 0).alignedUp(512)
        let adapter = o.text("adapter_type") ?? "ide"
        guard adapterTypes.contains(adapter) else {
            throw InstarError(.invalid, "invalid parameter value: \(adapter)", errno: EINVAL)
        }
        let backingFile = o.text("backing_file")
        var hwVersion = o.string("hwversion")
        if hwVersion == "undefined" { hwVersion = nil }
        let toolsVersion = o.text("toolsversion") ?? "2147483647"
        let compat6 = o.bool("compat6")
        let subformat = o.text("subformat") ?? "monolithicSparse"
        guard subformats.contains(subformat) else {
            throw InstarError(.invalid, "invalid parameter value: \(subformat)", errno: EINVAL)
        }
        let zeroedGrain = o.bool("zeroed_grain")

        if compat6 {
            if hwVersion != nil {
                throw InstarError(.invalid, "compat6 cannot be enabled with hwversion set", errno: EINVAL)
            }
            hwVersion = "6"
        }
        let hw = hwVersion ?? "4"
        let heads: UInt64 = adapter == "ide" ? 16 : 255
        let split = subformat == "twoGbMaxExtentFlat" || subformat == "twoGbMaxExtentSparse"
        let flat = subformat == "monolithicFlat" || subformat == "twoGbMaxExtentFlat"
        let compress = subformat == "streamOptimized"
        if flat && backingFile != nil {
            throw InstarError(.unsupported, "Flat image can't have backing file", errno: ENOTSUP)
        }
        if flat && zeroedGrain {
            throw InstarError(.unsupported, "Flat image can't enable zeroed grain", errno: ENOTSUP)
        }
        let splitSize: UInt64 = 0x8000_0000
        let extentSize = split ? splitSize : size
        let monolithic = !split && !flat
        var created: UInt64 = monolithic ? extentSize : 0
        var extentLines = ""
        func line(_ sectors: UInt64, _ name: String) -> String {
            let base = name.split(separator: "/", omittingEmptySubsequences: false).last.map(String.init) ?? name
            return flat ? "RW \(sectors) FLAT \"\(base)\" 0\n" : "RW \(sectors) SPARSE \"\(base)\"\n"
        }

        let descName = path + prefix + postfix
        let descFile = try createExtent(descName, size: created, flat: flat, compress: compress, zeroedGrain: zeroedGrain)
        if monolithic { extentLines += line(created.divCeil(512), descName) }

        var parentCID: UInt32 = 0xFFFF_FFFF
        var parentLine = ""
        if let b = backingFile {
            let full = ImageOpener.resolveBackingName(b, relativeTo: descName)
            var opts = ImageOpenOptions()
            opts.forceShare = true
            let spec = try ImageOpener.parseSpec(full, format: nil)
            let layer = try ImageOpener.open(spec, options: opts, writable: false)
            defer { try? layer.close() }
            guard let v = layer.format as? VmdkFormat else {
                throw InstarError(.invalid, "Invalid backing file format: \(layer.format.formatName). Must be vmdk",
                                  errno: EINVAL)
            }
            parentCID = v.cid
            parentLine = "parentFileNameHint=\"\(b)\""
        }
        var index = 1
        while created < size {
            let cur = min(size - created, extentSize)
            let rel: String
            if split {
                let n = String(index)
                rel = "\(prefix)-\(flat ? "f" : "s")\(String(repeating: "0", count: max(0, 3 - n.count)))\(n)\(postfix)"
            } else {
                rel = "\(prefix)-flat\(postfix)"
            }
            // Each extent file is complete here: on disk before it is closed, as qemu's close of it flushes.
            try createExtent(path + rel, size: cur, flat: flat, compress: compress, zeroedGrain: zeroedGrain).sync()
            extentLines += line(cur.divCeil(512), path + rel)
            created += cur
            index += 1
        }
        let cylinders = Int64(bitPattern: size) / Int64(63 * heads * 512)
        let desc = "# Disk DescriptorFile\n"
            + "version=1\n"
            + "CID=\(String(UInt32.random(in: 0...UInt32.max), radix: 16))\n"
            + "parentCID=\(String(parentCID, radix: 16))\n"
            + "createType=\"\(subformat)\"\n"
            + parentLine
            + "\n"
            + "# Extent description\n"
            + extentLines
            + "\n"
            + "# The Disk Data Base\n"
            + "#DDB\n"
            + "\n"
            + "ddb.virtualHWVersion = \"\(hw)\"\n"
            + "ddb.geometry.cylinders = \"\(cylinders)\"\n"
            + "ddb.geometry.heads = \"\(heads)\"\n"
            + "ddb.geometry.sectors = \"63\"\n"
            + "ddb.adapterType = \"\(adapter)\"\n"
            + "ddb.toolsVersion = \"\(toolsVersion)\"\n"
        let bytes = Array(desc.utf8)
        if monolithic {
            try descFile.write(bytes, at: 0x200)
        } else {
            try descFile.write(bytes, at: 0)
            try descFile.truncate(to: UInt64(bytes.count))
        }
        // The descriptor (with a monolithic image's header and tables) on disk before create returns.
        try descFile.sync()
    }

    /// filename_decompose: the directory part (with its slash), the base name before its last dot, and the rest.
    static func decompose(_ filename: String) throws -> (String, String, String) {
        if filename.isEmpty { throw InstarError(.invalid, "No filename provided", errno: EINVAL) }
        let chars = Array(filename.utf8)
        var cut: Int?
        for sep in [UInt8(ascii: "/"), UInt8(ascii: "\\"), UInt8(ascii: ":")] {
            if let i = chars.lastIndex(of: sep) { cut = i + 1; break }
        }
        let path = cut.map { String(decoding: chars[..<$0], as: UTF8.self) } ?? ""
        let rest = Array(chars[(cut ?? 0)...])
        if let dot = rest.lastIndex(of: UInt8(ascii: ".")) {
            return (path, String(decoding: rest[..<dot], as: UTF8.self), String(decoding: rest[dot...], as: UTF8.self))
        }
        return (path, String(decoding: rest, as: UTF8.self), "")
    }

    /// vmdk_create_extent + vmdk_init_extent: the file, and for a sparse extent its header and grain directories.
    static func createExtent(_ name: String, size: UInt64, flat: Bool, compress: Bool, zeroedGrain: Bool) throws
        -> HostFile
    {
        try HostFileCreate.create(name, size: 0, preallocation: .off)
        let f = try HostFile.open(name, writable: true)
        try ImageLock.acquireForOpen(f, writable: true, forceShare: false, resize: true)
        if flat {
            try f.truncate(to: size)
            return f
        }
        let version: UInt32 = compress ? 3 : (zeroedGrain ? 2 : 1)
        let flags: UInt32 = VmdkExtent.flagRGD | 1 | (compress ? VmdkExtent.flagCompress | VmdkExtent.flagMarker : 0)
            | (zeroedGrain ? VmdkExtent.flagZeroGrain : 0)
        let capacity = size / 512
        let granularity: UInt64 = 128
        let gtes: UInt32 = 512
        let grains = UInt32(truncatingIfNeeded: capacity.divCeil(granularity))
        let gtSize: UInt32 = (gtes * 4 + 511) / 512
        let gtCount = UInt32(truncatingIfNeeded: (UInt64(grains) + UInt64(gtes) - 1) / UInt64(gtes))
        let gdSectors = UInt32(truncatingIfNeeded: (UInt64(gtCount) * 4 + 511) / 512)
        let descOffset: UInt64 = 1
        let descSize: UInt64 = 20
        let rgdOffset = descOffset + descSize
        let tables = UInt64(gdSectors) + UInt64(gtSize &* gtCount)
        let gdOffset = rgdOffset + tables
        let grainOffset = try (gdOffset + tables).alignedUp(granularity)

        var h = [UInt8](repeating: 0, count: 4 + Vmdk4Header.size)
        h.putU32be(VmdkExtent.magicVMDK4, at: 0)
        h.putU32le(version, at: 4)
        h.putU32le(flags, at: 8)
        h.putU64le(capacity, at: 12)
        h.putU64le(granularity, at: 20)
        h.putU64le(descOffset, at: 28)
        h.putU64le(descSize, at: 36)
        h.putU32le(gtes, at: 44)
        h.putU64le(rgdOffset, at: 48)
        h.putU64le(gdOffset, at: 56)
        h.putU64le(grainOffset, at: 64)
        h[73] = 0x0A
        h[74] = 0x20
        h[75] = 0x0D
        h[76] = 0x0A
        h.putU16le(compress ? 1 : 0, at: 77)
        try f.write(h, at: 0)
        try f.truncate(to: try grainOffset.shifted(left: 9))
        if gdSectors > 0 {
            for (start, table) in [(rgdOffset, rgdOffset), (gdOffset, gdOffset)] {
                var gd = [UInt8](repeating: 0, count: Int(gdSectors) * 512)
                var t = UInt32(truncatingIfNeeded: table) &+ gdSectors
                for i in 0..<Int(gtCount) {
                    gd.putU32le(t, at: i * 4)
                    t = t &+ gtSize
                }
                try f.write(gd, at: start * 512)
            }
        }
        return f
    }
}
