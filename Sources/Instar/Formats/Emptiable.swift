/// A format whose contents can be dropped in one step (qemu's bdrv_make_empty), so that every guest range reads
/// from the backing file again: commit empties the top image this way. A format without this capability answers
/// as qemu's drivers without `bdrv_make_empty` do (raw): the caller skips the step.
public protocol ImageEmptiable: ImageFormat {
    /// Drops every guest cluster of an image opened read/write.
    func makeEmpty() throws
}
