/// Optional capability: the image's own header names its backing file, and the name can be rewritten in place
/// (qemu's `bdrv_change_backing_file` driver callback, which `qemu-img rebase` ends with). Formats without it
/// (raw) make the operation fail with qemu's "Operation not supported".
public protocol BackingFileChangeable: ImageFormat {
    /// Stores `name` (nil: no backing file) and `format` (nil: no backing format) in the image header,
    /// verbatim, as the new backing reference. Everything written so far reaches the disk before the header
    /// changes. Errors carry the errno qemu's driver returns (EINVAL for a name the header cannot take,
    /// ENOSPC when the header cluster is full); nothing is changed then.
    func changeBackingFile(_ name: String?, format: String?) throws
}
