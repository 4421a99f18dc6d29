import Glibc

/// qemu's qcow2_do_open ends by repairing an image whose header still carries the dirty bit (a writer with lazy
/// refcounts stopped without closing): on a read/write open that is not an open for `check` (BDRV_O_CHECK), it
/// runs its own check with errors and leaks fixed, printing the same lines `qemu-img check -r all` prints. The
/// open fails when the check fails or counts internal errors; corruptions the check could not fix do not fail
/// it, they only leave the image dirty until it is closed.
extension Qcow2Format {
    /// Repairs the image in place when qemu would, before anything else touches it.
    func repairIfDirty(request: OpenRequest) throws {
        guard writable, !request.options.check, header.incompatibleFeatures & Qcow2.incompatDirty != 0 else { return }
        let result: CheckResult
        do {
            result = try check(repair: .all) { message in
                Diagnostics.sink?(Diagnostics.Message(message.text + "\n", prefixed: message.errorReport))
            }
        } catch let failure as CheckFailure {
            abandonRepairWriter()
            throw Self.repairFailure(failure.errnoValue)
        } catch let error as InstarError {
            abandonRepairWriter()
            throw Self.repairFailure(error.errnoValue)
        } catch {
            abandonRepairWriter()
            throw Self.repairFailure(EIO)
        }
        // qemu counts internal errors of a check that ran to its end as EIO.
        if result.checkErrors != 0 {
            abandonRepairWriter()
            throw Self.repairFailure(EIO)
        }
        // With corruptions left the check does not mark the image clean; close does (`markCleanOnClose`). The
        // check has read the repaired metadata again (`check(repair:report:)`).
    }

    /// qcow2_inactivate: closing an image opened read/write marks it clean, whatever left the dirty bit set
    /// (a repair that could not fix everything, a check of a dirty image), unless a corruption was signalled
    /// while it was open.
    func markCleanOnClose() throws {
        guard writable, !corruptionSignalled, !keepDirtyAfterFailure, header.version >= 3 else { return }
        let r = ByteReader(try file.readBytes(at: 72, count: 8))   // qcow2.txt: bytes 72-79 incompatible_features
        let bits = try r.u64be(at: 0)
        guard bits & Qcow2.incompatDirty != 0 else { return }
        var be = (bits & ~Qcow2.incompatDirty).bigEndian
        try withUnsafeBytes(of: &be) { try file.write($0, at: 72) }
        try file.sync()
        header.incompatibleFeatures = bits & ~Qcow2.incompatDirty
    }

    private static func repairFailure(_ err: Int32) -> InstarError {
        let e = err > 0 ? err : EIO
        return InstarError(.corrupt, "Could not repair dirty image: \(strerrorString(e))", errno: e)
    }

    /// A repair of the snapshot table goes through the write side; its caches are written back and it is
    /// dropped, so the next change starts from what is on disk.
    private func dropRepairWriter() throws {
        guard let w = writer else { return }
        writer = nil
        try w.close()
    }

    /// A failed open: qemu drops its metadata caches unwritten.
    private func abandonRepairWriter() {
        writer = nil
        mapper.l2Provider = nil
        mapper.cache.removeAll()
    }

    /// The check wrote through its own view of the file (header bits, a rebuilt refcount structure, copied
    /// flags in L1 and L2 tables, a new snapshot table): everything this image read at open is read again.
    func reloadAfterRepair() throws {
        try dropRepairWriter()
        let h = try Qcow2Header(bytes: try file.readBytes(at: 0, count: Qcow2.decodedHeaderBytes))
        header = h
        mapper.l1 = try Qcow2Mapper.readL1(header: h, file: file)
        mapper.cache.removeAll()
        refcounts = Qcow2RefcountReader(header: h, file: file)
        snapshots = try Qcow2Snapshots.read(header: h, file: file)
        forgetDecompressed()
    }
}
