import Glibc

extension Qcow2Format: BackingFileChangeable {
    /// qcow2_change_backing_file: a raw external data file cannot gain a backing file, names are capped at 1023
    /// bytes, then qcow2_update_header rewrites the header cluster with the new backing format extension and
    /// name. The caches are written back and synced first, so a crash leaves either the old header over data
    /// that reads the same, or the new header over all the data it needs.
    public func changeBackingFile(_ name: String?, format: String?) throws {
        if name != nil && header.hasDataFile && header.dataFileRaw {
            throw InstarError(.invalid, strerrorString(EINVAL), errno: EINVAL)
        }
        if let n = name, n.utf8.count > Int(Qcow2.maxBackingNameLength) {
            throw InstarError(.invalid, strerrorString(EINVAL), errno: EINVAL)
        }
        guard writable else { throw InstarError(.permission, "Image is read-only", errno: EACCES) }
        let old = backingReference
        backingReference = name.map { BackingReference(filename: $0, format: format) }
        do {
            if let w = writer {
                try w.flush()
                try writeHeaderCluster(w.header, bitmaps: w.bitmapsExtension)
            } else {
                try writeHeaderCluster(header, bitmaps: extensions.bitmaps)
            }
        } catch {
            backingReference = old
            throw error
        }
    }
}
