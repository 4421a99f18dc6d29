/// A format that takes qemu's copy offloading (bdrv_co_copy_range_to): convert -C copies data into it without
/// looking at the bytes. qemu refuses it for encrypted images; formats without the capability refuse it too,
/// and convert then reads and writes as usual.
public protocol CopyOffloadTarget: ImageFormat {
    var acceptsCopyOffload: Bool { get }
}

extension RawFormat: CopyOffloadTarget {
    public var acceptsCopyOffload: Bool { true }
}

extension Qcow2Format: CopyOffloadTarget {
    public var acceptsCopyOffload: Bool { !encrypted }
}
