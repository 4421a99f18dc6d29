/// raw reads and writes are positioned reads and writes of the file (pread/pwrite): safe in parallel.
extension RawFormat: ConcurrentGuestIO {
    public var readsInFlight: Int { file.readsInFlight }
}
