import Glibc

/// Human-readable sizes as qemu prints them (size_to_str in util/cutils.c): three significant digits and a
/// binary suffix, switching to the next unit once the number would reach 1000 ("977 KiB", "1.25 MiB", "0 B").
public enum SizeFormat {
    static let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]

    public static func sizeToString(_ value: UInt64) -> String {
        // frexp of value*1024/1000 gives floor(log2)+1; every 10 binary orders is one unit.
        var exponent: Int32 = 0
        _ = frexp(Double(value) / (1000.0 / 1024.0), &exponent)
        let unit = min(max(Int((exponent - 1) / 10), 0), suffixes.count - 1)
        let divisor = Double(UInt64(1) << UInt64(unit * 10))
        return cFormat("%0.3g", Double(value) / divisor) + " " + suffixes[unit] + "B"
    }
}
