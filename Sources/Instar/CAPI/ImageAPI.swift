import CInstar
import Glibc

/// What an instar_image_t points at: an open chain and a lock serialising calls on it.
final class ImageHandle {
    let layer: ImageLayer
    private var mutex = pthread_mutex_t()

    init(layer: ImageLayer) {
        self.layer = layer
        pthread_mutex_init(&mutex, nil)
    }

    deinit { pthread_mutex_destroy(&mutex) }

    func locked<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}

/// Translates INSTAR_OPEN_* flags and the key_secret / backing_key_secret fields into engine options.
func openOptions(flags: UInt32, keySecret: UnsafePointer<CChar>? = nil,
                 backingKeySecret: UnsafePointer<CChar>? = nil) -> ImageOpenOptions {
    var o = ImageOpenOptions()
    o.forceShare = flags & UInt32(INSTAR_OPEN_FORCE_SHARE) != 0
    o.direct = flags & UInt32(INSTAR_OPEN_NO_CACHE) != 0
    o.keySecret = optionalString(keySecret)
    o.backingKeySecret = optionalString(backingKeySecret)
    return o
}

/// Hands a key_secret field to an `-o` list (create, measure): when the list names an encrypt.key-secret id,
/// that id gets the passphrase; when it asks for encryption without naming one, it gains the reserved id.
/// Lists that ask for no encryption are left alone, so a passphrase for a plain image is no error.
/// A native luks target (`format` "luks") always encrypts and names its secret with key-secret.
func optionList(_ list: String?, keySecret: String?, secrets: inout [String: String],
                format: String? = nil) -> String? {
    if format == "luks", let key = keySecret {
        let pairs = QemuOptsParser.parse(list ?? "", impliedKey: nil)
        if let id = pairs.last(where: { $0.0 == "key-secret" })?.1 {
            secrets[id] = key
            return list
        }
        secrets[ImageOpenOptions.keySecretID] = key
        let named = "key-secret=" + ImageOpenOptions.keySecretID
        if let l = list, !l.isEmpty { return l + "," + named }
        return named
    }
    guard let key = keySecret, let list else { return list }
    let pairs = QemuOptsParser.parse(list, impliedKey: nil)
    if let id = pairs.last(where: { $0.0 == "encrypt.key-secret" })?.1 {
        secrets[id] = key
        return list
    }
    guard pairs.contains(where: { $0.0.hasPrefix("encrypt.") || $0.0 == "encryption" }) else { return list }
    secrets[ImageOpenOptions.keySecretID] = key
    return list + ",encrypt.key-secret=" + ImageOpenOptions.keySecretID
}

/// The defaults of instar_open_options_t, the values of INSTAR_OPEN_OPTIONS_INIT.
func openOptionsDefaults() -> instar_open_options_t {
    instar_open_options_t(struct_size: UInt32(MemoryLayout<instar_open_options_t>.size), flags: 0, format: nil,
                                 key_secret: nil, limits: nil, backing_key_secret: nil)
}

@_cdecl("instar_open_options_init")
public func instar_open_options_init(_ opts: UnsafeMutablePointer<instar_open_options_t>?) {
    legacyInitOptions(opts, frozenSize: 24, openOptionsDefaults())
}

@_cdecl("instar_open_options_init_sized")
public func instar_open_options_init_sized(_ opts: UnsafeMutablePointer<instar_open_options_t>?,
                                           _ size: UInt32) -> Int32 {
    initOptions(opts, size: size, openOptionsDefaults())
}

@_cdecl("instar_open")
public func instar_open(_ filename: UnsafePointer<CChar>?, _ opts: UnsafePointer<instar_open_options_t>?,
                        _ out: UnsafeMutablePointer<OpaquePointer?>?, _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let out else { throw InstarError.invalid("out must not be NULL") }
        out.pointee = nil
        let name = try cString(filename, "filename")
        let defaults = openOptionsDefaults()
        let o = try readOptions(opts, defaults: defaults)
        let writable = o.flags & UInt32(INSTAR_OPEN_READ_WRITE) != 0
        let spec = try ImageOpener.parseSpec(name, format: optionalString(o.format))
        let layer: ImageLayer
        do {
            layer = try ImageOpener.open(spec, options: openOptions(flags: o.flags, keySecret: o.key_secret,
                                                                      backingKeySecret: o.backing_key_secret), writable: writable,
                                         openBacking: o.flags & UInt32(INSTAR_OPEN_NO_BACKING) == 0)
        } catch let e as InstarError {
            throw e.prepending("Could not open '\(name)': ")
        }
        out.pointee = OpaquePointer(Unmanaged.passRetained(ImageHandle(layer: layer)).toOpaque())
    }
}

func handle(_ p: OpaquePointer?) throws -> ImageHandle {
    guard let p else { throw InstarError.invalid("image must not be NULL") }
    return Unmanaged<ImageHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

@_cdecl("instar_close")
public func instar_close(_ image: OpaquePointer?) {
    guard let image else { return }
    let h = Unmanaged<ImageHandle>.fromOpaque(UnsafeRawPointer(image))
    _ = try? h.takeUnretainedValue().locked { try h.takeUnretainedValue().layer.close() }
    h.release()
}

@_cdecl("instar_get_size")
public func instar_get_size(_ image: OpaquePointer?, _ size: UnsafeMutablePointer<UInt64>?,
                            _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let h = try handle(image)
        guard let size else { throw InstarError.invalid("size must not be NULL") }
        size.pointee = h.locked { h.layer.virtualSize }
    }
}

@_cdecl("instar_read")
public func instar_read(_ image: OpaquePointer?, _ buf: UnsafeMutableRawPointer?, _ count: UInt64, _ offset: UInt64,
                        _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        let h = try handle(image)
        guard let buf else { throw InstarError.invalid("buf must not be NULL") }
        try h.locked {
            let size = h.layer.virtualSize
            guard offset <= size, count <= size - offset, count <= UInt64(Int.max) else {
                throw InstarError(.range, "Read of \(count) bytes at offset \(offset) is beyond the end of the image (\(size) bytes)")
            }
            try h.layer.read(into: UnsafeMutableRawBufferPointer(start: buf, count: Int(count)), at: offset)
        }
    }
}
