import CRbd
import Glibc

/// The rbd protocol driver (qemu's block/rbd.c): an image of a Ceph pool through librados/librbd.
/// Names: `rbd:pool[/namespace]/image[@snapshot][:key=value...]`, where `conf` and `id` are options of the node
/// and every other key is set on the cluster handle (rados_conf_set: keyring, mon_host, auth_supported...);
/// a backslash escapes the next character. json:/--image-opts give pool, image, namespace, snapshot, conf, user.
public enum RbdProtocol {
    public static let descriptor: ProtocolDescriptor = {
        var d = ProtocolDescriptor(
            name: "rbd", prefixes: ["rbd:"], parseName: parseName,
            open: { options, writable in try RbdImage(options: RbdLocation(options: options), writable: writable) },
            create: { options, size, values in
                let loc = try RbdLocation(options: options)
                let encrypt = try EncryptionCreate(values)
                try create(loc, size: size, objectSize: values?.size("cluster_size"), encrypt: encrypt,
                           legacySecret: values?.text("password-secret"))
            })
        d.nameOptions = RbdLocation.nameOptions
        d.takesSecrets = true
        // qemu_rbd_create_opts, in its order (the order of create's "Formatting" line).
        d.createOptions = [
            CreateOptionSpec("size", .size, "Virtual disk size"),
            CreateOptionSpec("cluster_size", .size, "RBD object size"),
            CreateOptionSpec("password-secret", .string, "ID of secret providing the password"),
            CreateOptionSpec("encrypt.format", .string, "Encrypt the image, format choices: 'luks', 'luks2'"),
            CreateOptionSpec("encrypt.cipher-alg", .string,
                             "Name of encryption cipher algorithm (allowed values: aes-128, aes-256)"),
            CreateOptionSpec("encrypt.key-secret", .string, "ID of secret providing LUKS passphrase"),
        ]
        return d
    }()

    /// The key under which a plain name's extra key=value pairs travel (never printed in a json: name).
    static let keyvaluePairs = "=keyvalue-pairs"

    // MARK: names

    /// The next token of `s` up to the unescaped `delim`: (token, rest after the delimiter or nil).
    static func nextToken(_ s: Substring, _ delim: Character) -> (Substring, Substring?) {
        var i = s.startIndex
        while i < s.endIndex {
            let c = s[i]
            if c == delim { return (s[s.startIndex..<i], s[s.index(after: i)...]) }
            if c == "\\" {
                let n = s.index(after: i)
                if n < s.endIndex { i = n }
            }
            i = s.index(after: i)
        }
        return (s, nil)
    }

    /// Drops each backslash that escapes a following character.
    static func unescape(_ s: Substring) -> String {
        var out = ""
        var i = s.startIndex
        while i < s.endIndex {
            var c = s[i]
            if c == "\\" {
                let n = s.index(after: i)
                if n < s.endIndex { i = n; c = s[i] }
            }
            out.append(c)
            i = s.index(after: i)
        }
        return out
    }

    /// qemu_rbd_parse_filename: the options a plain name stands for, in its order.
    static func parseName(_ name: String) throws -> [(String, QObject)] {
        guard name.hasPrefix("rbd:") else { throw InstarError.invalid("File name must start with 'rbd:'") }
        var out: [(String, QObject)] = []
        let (pool, afterPool) = nextToken(name.dropFirst(4), "/")
        guard var p = afterPool else { throw InstarError.invalid("Pool name is required") }
        out.append(("pool", .string(unescape(pool))))
        var imageName: Substring
        var rest: Substring?
        var snapshot: String?
        if nextToken(p, "@").1 != nil {
            let (img, r) = nextToken(p, "@")
            imageName = img
            let (snap, r2) = nextToken(r ?? "", ":")
            snapshot = unescape(snap)
            rest = r2
        } else {
            (imageName, rest) = nextToken(p, ":")
        }
        if let s = snapshot { out.append(("snapshot", .string(s))) }
        let (ns, afterNs) = nextToken(imageName, "/")
        if let img = afterNs {
            out.append(("namespace", .string(unescape(ns))))
            imageName = img
        } else {
            out.append(("namespace", .string("")))
        }
        out.append(("image", .string(unescape(imageName))))
        var pairs: [String] = []
        while let r = rest {
            p = r
            let (key, afterKey) = nextToken(p, "=")
            guard let v = afterKey else { throw InstarError.invalid("conf option \(key) has no value") }
            let k = unescape(key)
            let (value, afterValue) = nextToken(v, ":")
            rest = afterValue
            let val = unescape(value)
            switch k {
            case "conf": out.append(("conf", .string(val)))
            case "id": out.append(("user", .string(val)))
            default: pairs += [k, val]
            }
        }
        if !pairs.isEmpty {
            out.append((keyvaluePairs, .string(QJSON.compact(.list(pairs.map { .string($0) })))))
        }
        return out
    }

    // MARK: create

    /// qemu_rbd_co_create_opts: rbd_create with the size and librbd's default object size; a snapshot in the
    /// name is ignored (qemu builds the location without it).
    static func create(_ loc: RbdLocation, size: UInt64, objectSize: UInt64? = nil, encrypt: EncryptionCreate? = nil,
                       legacySecret: String? = nil) throws {
        var order: Int32 = 0
        if let objsize = objectSize {
            if objsize & (objsize &- 1) != 0 { throw InstarError(.invalid, "obj size needs to be power of 2", errno: EINVAL) }
            if objsize < 4096 { throw InstarError(.invalid, "obj size too small", errno: EINVAL) }
            order = Int32(objsize.trailingZeroBitCount)
        }
        let conn = try RbdConnection(loc, legacySecret: legacySecret)
        defer { conn.close() }
        let r = rbd_create(conn.ioctx, loc.image, size, &order)
        if r < 0 { throw InstarError.system(-r, "error rbd create") }
        guard let encrypt else { return }
        var img: rbd_image_t?
        let o = rbd_open(conn.ioctx, loc.image, &img, nil)
        if o < 0 { throw InstarError.system(-o, "error opening image '\(loc.image)' for encryption format") }
        do {
            try formatEncryption(img, encrypt, loc: loc)
            rbd_close(img)
        } catch {
            // As qemu: a failed format removes the image it made.
            rbd_close(img)
            rbd_remove(conn.ioctx, loc.image)
            throw error
        }
    }

    /// The `encrypt.*` create options (qemu's RbdEncryptionCreateOptions), checked in qemu's order; nil when
    /// none is given.
    struct EncryptionCreate {
        var format: rbd_encryption_format_t
        var keySecret: String
        /// encrypt.cipher-alg as QCryptoCipherAlgorithm's index (nil: librbd's AES-256 default).
        var cipher: Int?

        /// QCryptoCipherAlgorithm's names, in enum order (qemu prints an unsupported one by its number).
        static let cipherNames = ["aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128",
                                  "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256"]

        init?(_ values: CreateOptionValues?) throws {
            guard let values, ["encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg"].contains(where: values.isSet)
            else { return nil }
            switch values.text("encrypt.format") {
            case nil: throw InstarError.invalid("Parameter 'format' is missing")
            case "luks": format = RBD_ENCRYPTION_FORMAT_LUKS1
            case "luks2": format = RBD_ENCRYPTION_FORMAT_LUKS2
            case let f?: throw InstarError.invalid("Parameter 'format' does not accept value '\(f)'")
            }
            guard let ks = values.text("encrypt.key-secret") else {
                throw InstarError.invalid("Parameter 'key-secret' is missing")
            }
            keySecret = ks
            if let alg = values.text("encrypt.cipher-alg") {
                guard let n = EncryptionCreate.cipherNames.firstIndex(of: alg) else {
                    throw InstarError.invalid("Parameter 'cipher-alg' does not accept value '\(alg)'")
                }
                cipher = n
            }
        }
    }

    /// qemu_rbd_encryption_format: formats the image with librbd's LUKS and grows it by the header's size, so
    /// the encrypted image shows the size asked for.
    static func formatEncryption(_ img: rbd_image_t?, _ e: EncryptionCreate, loc: RbdLocation) throws {
        var rawSize: UInt64 = 0
        var r = rbd_get_size(img, &rawSize)
        if r < 0 { throw InstarError.system(-r, "cannot get raw image size") }
        let passphrase = try loc.secretBytes(e.keySecret)
        var algorithm = RBD_ENCRYPTION_ALGORITHM_AES256
        switch e.cipher {
        case nil, 2?: break
        case 0?: algorithm = RBD_ENCRYPTION_ALGORITHM_AES128
        case let n?: throw InstarError.system(ENOTSUP, "unknown encryption algorithm: \(n)")
        }
        r = passphrase.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { c in
                var opts = rbd_encryption_luks1_format_options_t(alg: algorithm, passphrase: c.baseAddress,
                                                                 passphrase_size: c.count)
                // The luks1 and luks2 option structs have the same layout.
                return rbd_encryption_format(img, e.format, &opts, MemoryLayout<rbd_encryption_luks1_format_options_t>.size)
            }
        }
        if r < 0 { throw InstarError.system(-r, "encryption format fail") }
        var effective: UInt64 = 0
        r = rbd_get_size(img, &effective)
        if r < 0 { throw InstarError.system(-r, "cannot get effective image size") }
        r = rbd_resize(img, rawSize &+ (rawSize &- effective))
        if r < 0 { throw InstarError.system(-r, "cannot resize image after format") }
    }

    /// qemu_rbd_encryption_load: librbd decrypts the image from here on (its size is the payload's).
    static func loadEncryption(_ img: rbd_image_t?, format: String, passphrase bytes: [UInt8]) throws {
        let f = format == "luks2" ? RBD_ENCRYPTION_FORMAT_LUKS2 : RBD_ENCRYPTION_FORMAT_LUKS1
        let r = bytes.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { c in
                var opts = rbd_encryption_luks1_format_options_t(alg: RBD_ENCRYPTION_ALGORITHM_AES256,
                                                                 passphrase: c.baseAddress, passphrase_size: c.count)
                return rbd_encryption_load(img, f, &opts, MemoryLayout<rbd_encryption_luks1_format_options_t>.size)
            }
        }
        if r < 0 { throw InstarError.system(-r, "encryption load fail") }
    }
}

/// Where an RBD image is and how to reach its cluster (qemu's BlockdevOptionsRbd).
struct RbdLocation {
    var pool = ""
    var namespace = ""
    var image = ""
    var snapshot: String?
    var conf: String?
    var user: String?
    /// Cluster settings from a plain name (key, value), set in order.
    var pairs: [(String, String)] = []
    /// "server": monitors (host, port), in order; set as mon_host.
    var servers: [(String, String)]?
    /// "key-secret" (or the legacy "password-secret"): the id of the secret holding the cephx key.
    var keySecret: String?
    var passwordSecret: String?
    /// "auth-client-required": "cephx" / "none", in order.
    var authClientRequired: [String]?
    /// "encrypt": the format ("luks", "luks2") and the id of the passphrase's secret, for rbd_encryption_load.
    var encryptFormat: String?
    var encryptKeySecret: String?
    /// `--object secret` values by id ("=secrets", given by the opener).
    var secrets: [String: String] = [:]

    init(options: [(String, QObject)]) throws {
        var havePool = false, haveImage = false
        var encryptKeys: [String: String] = [:]
        var serverFields: [Int: [String: String]] = [:]
        var authFields: [Int: String] = [:]
        var authList: [String]?
        func text(_ k: String, _ v: QObject) throws -> String {
            switch v {
            case let .string(s): return s
            case let .int(n): return String(n)
            case let .uint(n): return String(n)
            case let .bool(b): return b ? "on" : "off"
            default: throw InstarError.invalid("Invalid parameter type for '\(k)', expected: string")
            }
        }
        /// "server.N.field" / "auth-client-required.N" (flattened, as --image-opts gives them): N.
        func index(_ s: Substring) throws -> Int {
            guard let n = Int(s), n >= 0, n < 1 << 16 else { throw InstarError.invalid("Invalid parameter 'server.\(s)'") }
            return n
        }
        for (k, v) in options {
            switch k {
            case "pool": pool = try text(k, v); havePool = true
            case "image": image = try text(k, v); haveImage = true
            case "namespace": namespace = try text(k, v)
            case "snapshot": snapshot = try text(k, v)
            case "conf": conf = try text(k, v)
            case "user": user = try text(k, v)
            case "key-secret": keySecret = try text(k, v)
            case "password-secret": passwordSecret = try text(k, v)
            case "=secrets":
                if case let .dict(items) = v {
                    for (id, value) in items { if let t = value.stringValue { secrets[id] = t } }
                }
            case "encrypt":
                throw InstarError.invalid("Invalid parameter type for 'encrypt', expected: object")
            case "server":
                guard case let .list(items) = v else {
                    throw InstarError.invalid("Invalid parameter type for 'server', expected: array")
                }
                for (i, item) in items.prefix(1 << 16).enumerated() {
                    guard case let .dict(fields) = item else {
                        throw InstarError.invalid("Invalid parameter type for 'server.\(i)', expected: object")
                    }
                    for (f, fv) in fields { serverFields[i, default: [:]][f] = try text("server.\(i).\(f)", fv) }
                    if fields.isEmpty { serverFields[i] = [:] }
                }
            case "auth-client-required":
                guard case let .list(items) = v else {
                    throw InstarError.invalid("Invalid parameter type for 'auth-client-required', expected: array")
                }
                authList = try items.enumerated().map { try text("auth-client-required.\($0.offset)", $0.element) }
            case RbdProtocol.keyvaluePairs:
                guard case let .list(items) = try JSONParser.parse(try text(k, v)), items.count % 2 == 0 else {
                    throw InstarError.invalid("Invalid key-value pairs")
                }
                let strings = items.compactMap { $0.stringValue }
                guard strings.count == items.count else { throw InstarError.invalid("Invalid key-value pairs") }
                var i = 0
                while i + 1 < strings.count {
                    pairs.append((strings[i], strings[i + 1]))
                    i += 2
                }
            default:
                if k.hasPrefix("encrypt.") {
                    let f = String(k.dropFirst(8))
                    guard f == "format" || f == "key-secret" else {
                        throw InstarError.invalid("Parameter '\(k)' is unexpected")
                    }
                    encryptKeys[f] = try text(k, v)
                } else if k.hasPrefix("server.") {
                    let parts = k.split(separator: ".", omittingEmptySubsequences: false)
                    // {"server": {...}} arrives flattened (server.host): not the array qemu wants.
                    if Int(parts[1]) == nil {
                        throw InstarError.invalid("Invalid parameter type for 'server', expected: array")
                    }
                    guard parts.count == 3 else { throw InstarError.invalid("Invalid parameter '\(k)'") }
                    serverFields[try index(parts[1]), default: [:]][String(parts[2])] = try text(k, v)
                } else if k.hasPrefix("auth-client-required.") {
                    authFields[try index(k.dropFirst(21))] = try text(k, v)
                } else {
                    throw InstarError.invalid("Invalid parameter '\(k)'")
                }
            }
        }
        // QAPI's order: pool, namespace, image, conf, snapshot, encrypt, user, auth-client-required, key-secret,
        // server.
        if !havePool { throw InstarError.invalid("Parameter 'pool' is missing") }
        if !haveImage { throw InstarError.invalid("Parameter 'image' is missing") }
        if !encryptKeys.isEmpty {
            guard let f = encryptKeys["format"] else { throw InstarError.invalid("Parameter 'encrypt.format' is missing") }
            guard f == "luks" || f == "luks2" else {
                throw InstarError.invalid("Parameter 'format' does not accept value '\(f)'")
            }
            guard let ks = encryptKeys["key-secret"] else {
                throw InstarError.invalid("Parameter 'encrypt.key-secret' is missing")
            }
            encryptFormat = f
            encryptKeySecret = ks
        }
        /// qdict_crumple's check of a flattened list's indices.
        func contiguous(_ indices: [Int]) throws {
            if let top = indices.max(), top >= indices.count {
                throw InstarError.invalid("List indices are not contiguous, saw \(indices.count) elements but \(top) largest index")
            }
        }
        try contiguous(Array(serverFields.keys))
        try contiguous(Array(authFields.keys))
        if authList == nil && !authFields.isEmpty {
            authList = try (0..<authFields.count).map { i in
                guard let a = authFields[i] else { throw InstarError.invalid("Parameter 'auth-client-required.\(i)' is missing") }
                return a
            }
        }
        if let list = authList {
            for a in list where a != "cephx" && a != "none" {
                throw InstarError.invalid("Parameter 'null' does not accept value '\(a)'")
            }
            authClientRequired = list
        }
        if !serverFields.isEmpty || options.contains(where: { $0.0 == "server" }) {
            var list: [(String, String)] = []
            for i in 0..<serverFields.count {
                guard let fields = serverFields[i] else { throw InstarError.invalid("Parameter 'server.\(i)' is missing") }
                guard let host = fields["host"] else { throw InstarError.invalid("Parameter 'server.\(i).host' is missing") }
                guard let port = fields["port"] else { throw InstarError.invalid("Parameter 'server.\(i).port' is missing") }
                if let extra = fields.keys.sorted().first(where: { $0 != "host" && $0 != "port" }) {
                    throw InstarError.invalid("Parameter 'server.\(i).\(extra)' is unexpected")
                }
                list.append((host, port))
            }
            servers = list
        }
    }

    /// A secret by id, or qemu's error.
    func secret(_ id: String) throws -> String {
        guard let s = secrets[id] else { throw InstarError.invalid("No secret with id '\(id)'") }
        return s
    }

    /// A secret's exact bytes (qcrypto_secret_lookup).
    func secretBytes(_ id: String) throws -> [UInt8] {
        let s = try secret(id)
        return secrets[SecretObjects.base64Key(id)].flatMap { SecretObjects.base64Decode($0) } ?? Array(s.utf8)
    }

    /// qcrypto_secret_lookup_as_base64: the secret's bytes in base64.
    func secretBase64(_ id: String) throws -> String {
        let s = try secret(id)
        return secrets[SecretObjects.base64Key(id)] ?? SecretObjects.base64Encode(Array(s.utf8))
    }

    /// qemu_rbd_mon_host: "host:port" joined by ";", IPv6 hosts in brackets; nil without servers or with none.
    var monHost: String? {
        guard let servers, !servers.isEmpty else { return nil }
        return servers.map { $0.0.contains(":") ? "[\($0.0)]:\($0.1)" : "\($0.0):\($0.1)" }.joined(separator: ";")
    }

    /// The options a json: name shows (qemu's strong_runtime_opts: pool, namespace, image, conf, snapshot,
    /// user, server.*, password-secret), the server list flattened as qemu's QDict holds it.
    static func nameOptions(_ options: [(String, QObject)]) -> [(String, QObject)] {
        var out: [(String, QObject)] = []
        for (k, v) in options {
            switch k {
            case "pool", "namespace", "image", "conf", "snapshot", "user", "password-secret": out.append((k, v))
            case "server":
                if case let .list(items) = v {
                    for (i, item) in items.enumerated() {
                        if case let .dict(fields) = item {
                            for (f, fv) in fields { out.append(("server.\(i).\(f)", fv)) }
                        }
                    }
                }
            default:
                if k.hasPrefix("server.") { out.append((k, v)) }
            }
        }
        return out
    }
}

/// A connected cluster handle and an I/O context on the pool (qemu_rbd_connect).
///
/// Connecting costs round trips to the monitors (about a third of a second each on a loaded machine), and one
/// convert connects twice (the create, then the open of the new image), as does an open after a probe: a handle
/// whose connection is over is parked in `RbdClusterCache` for a few seconds and the next connection with the
/// same cluster settings takes it instead of connecting again.
final class RbdConnection {
    var cluster: rados_t?
    var ioctx: rados_ioctx_t?
    /// The cluster settings the handle was made with (RbdClusterCache's key).
    private var key = ""

    init(_ loc: RbdLocation, legacySecret: String? = nil) throws {
        var keySecret = loc.keySecret
        if let legacy = legacySecret ?? loc.passwordSecret {
            if keySecret != nil { throw InstarError.invalid("Legacy 'password-secret' clashes with 'key-secret'") }
            keySecret = legacy
        }
        var r: Int32 = 0
        // Everything rados_connect depends on: the user, the conf file (or the default search, which reads
        // $CEPH_CONF), the settings, the monitors, the key and the auth modes.
        var parts = ["user=\(loc.user ?? "\u{0}")", "conf=\(loc.conf ?? "\u{0}")",
                     "env=\(getenv("CEPH_CONF").map { String(cString: $0) } ?? "\u{0}")",
                     "mon=\(loc.monHost ?? "\u{0}")"]
        for (k, v) in loc.pairs { parts.append("pair=\(k)=\(v)") }
        // A key that cannot be had fails below, in its turn: no cached handle then.
        var cacheable = true
        if let id = keySecret {
            if let k = try? loc.secretBase64(id) { parts.append("key=\(k)") } else { cacheable = false }
        }
        if let modes = loc.authClientRequired { parts.append("auth=\(modes.joined(separator: ";"))") }
        let settings = cacheable ? parts.joined(separator: "\u{1}") : ""
        if !settings.isEmpty, let parked = RbdClusterCache.take(settings) {
            cluster = parked
            key = settings
            do {
                try openPool(loc)
            } catch {
                close()
                throw error
            }
            return
        }
        var c: rados_t?
        r = rados_create(&c, loc.user)
        if r < 0 { throw InstarError.system(-r, "error initializing") }
        cluster = c
        do {
            // With no conf the default places are tried and failure is ignored, as qemu does.
            r = rados_conf_read_file(c, loc.conf)
            if let conf = loc.conf, r < 0 { throw InstarError.system(-r, "error reading conf file \(conf)") }
            for (k, v) in loc.pairs {
                r = rados_conf_set(c, k, v)
                if r < 0 { throw InstarError(.invalid, "invalid conf option \(k)", errno: -r) }
            }
            if let mon = loc.monHost {
                r = rados_conf_set(c, "mon_host", mon)
                if r < 0 { throw InstarError.system(-r, "Could not set 'mon_host'") }
            }
            // qemu_rbd_set_auth: the cephx key from a secret (base64 of its bytes), the allowed auth modes.
            if let id = keySecret {
                r = rados_conf_set(c, "key", try loc.secretBase64(id))
                if r < 0 { throw InstarError.system(-r, "Could not set 'key'") }
            }
            if let modes = loc.authClientRequired {
                r = rados_conf_set(c, "auth_client_required", modes.joined(separator: ";"))
                if r < 0 { throw InstarError.system(-r, "Could not set 'auth_client_required'") }
            }
            rados_conf_set(c, "rbd_cache", "true")
            r = rados_connect(c)
            if r < 0 { throw InstarError.system(-r, "error connecting") }
            // Connected: parked at the close from here on.
            key = settings
            try openPool(loc)
        } catch {
            close()
            throw error
        }
    }

    /// The I/O context on the pool and namespace of `loc` (a parked handle's too: it is made fresh each time).
    private func openPool(_ loc: RbdLocation) throws {
        guard let c = cluster else { throw InstarError.system(EIO, "error connecting") }
        var r: Int32 = 0
        var io: rados_ioctx_t?
        r = rados_ioctx_create(c, loc.pool, &io)
        if r < 0 { throw InstarError.system(-r, "error opening pool \(loc.pool)") }
        ioctx = io
        if !loc.namespace.isEmpty {
            var exists = false
            r = rbd_namespace_exists(io, loc.namespace, &exists)
            if r < 0 { throw InstarError.system(-r, "error checking namespace") }
            if !exists { throw InstarError(.notFound, "namespace '\(loc.namespace)' does not exist", errno: ENOENT) }
        }
        rados_ioctx_set_namespace(io, loc.namespace)
    }

    /// Destroys the I/O context and parks the cluster handle (a connected one) for the next connection.
    func close() {
        if let io = ioctx { rados_ioctx_destroy(io) }
        ioctx = nil
        if let c = cluster {
            if key.isEmpty { rados_shutdown(c) } else { RbdClusterCache.park(key, c) }
        }
        cluster = nil
    }
}

/// Connected cluster handles nobody uses, by their settings, each kept `idleSeconds` for the next connection
/// (then shut down by a reaper thread, or at exit).
///
/// At exit, and when a host unloads libinstar (dlclose): `shutdownAll` runs from an `atexit` hook, which glibc
/// ties to this library (atexit comes from libc_nonshared, with libinstar's __dso_handle), so it runs before the
/// code is unmapped, and before librados' own destructors at exit. It stops the reaper and joins it, so no
/// thread is left running libinstar's code.
enum RbdClusterCache {
    static let idleSeconds = 5
    private static let monitor = ConditionLock()
    private static var idle: [(key: String, handle: rados_t, until: Int)] = []
    /// The reaper thread while one runs (joined by `shutdownAll`, or by the next `park` once it ended).
    private static var reaper: pthread_t?
    private static var reaperRunning = false
    private static var shuttingDown = false
    private static var atExit = false

    /// A parked handle made with `key`, taken out of the cache.
    static func take(_ key: String) -> rados_t? {
        monitor.lock()
        defer { monitor.unlock() }
        guard let i = idle.firstIndex(where: { $0.key == key }) else { return nil }
        return idle.remove(at: i).handle
    }

    static func park(_ key: String, _ handle: rados_t) {
        monitor.lock()
        if shuttingDown {
            monitor.unlock()
            rados_shutdown(handle)
            return
        }
        idle.append((key, handle, monotonicSeconds() + idleSeconds))
        if !atExit {
            atExit = true
            // Registered after librados was loaded: runs before its static destructors.
            atexit { RbdClusterCache.shutdownAll() }
        }
        var ended: pthread_t?
        let start = !reaperRunning
        if start {
            // A reaper that ran out of handles has ended (or is about to): join it before starting the next.
            ended = reaper
            reaper = nil
            reaperRunning = true
        }
        monitor.broadcast()
        monitor.unlock()
        guard start else { return }
        if let ended { pthread_join(ended, nil) }
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { _ in
            RbdClusterCache.reap()
            return nil
        }, nil)
        monitor.lock()
        if rc == 0 { reaper = tid } else { reaperRunning = false }
        monitor.unlock()
    }

    /// The reaper thread: shuts handles down once their time is up; ends when none is left, or at shutdown.
    private static func reap() {
        monitor.lock()
        while !idle.isEmpty && !shuttingDown {
            let now = monotonicSeconds()
            let expired = idle.filter { $0.until <= now }
            idle.removeAll { $0.until <= now }
            if !expired.isEmpty {
                monitor.unlock()
                for e in expired { rados_shutdown(e.handle) }
                monitor.lock()
                continue
            }
            monitor.wait(seconds: 1)
        }
        reaperRunning = false
        monitor.broadcast()
        monitor.unlock()
    }

    /// Shuts every parked handle down and waits for the reaper to end; handles parked later are shut down at
    /// once.
    static func shutdownAll() {
        monitor.lock()
        shuttingDown = true
        let all = idle
        idle = []
        let tid = reaper
        reaper = nil
        monitor.broadcast()
        monitor.unlock()
        if let tid, pthread_equal(tid, pthread_self()) == 0 { pthread_join(tid, nil) }
        for e in all { rados_shutdown(e.handle) }
    }

    private static func monotonicSeconds() -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return ts.tv_sec
    }
}

/// An open RBD image (qemu_rbd_open): librbd serves concurrent requests on one handle.
final class RbdImage: ProtocolBackend, ProtocolSnapshotting {
    let conn: RbdConnection
    var image: rbd_image_t?
    let name: String
    let snapshotName: String?
    let objectSize: UInt64
    /// The size as last seen (qemu's image_size), guarded by `lock`: writes past it grow the image first.
    private var cachedSize: UInt64
    private let lock: UnsafeMutablePointer<pthread_mutex_t>
    /// Writes, zero writes and discards in flight (RbdWriteBehind).
    private let pending: RbdWriteBehind

    init(options loc: RbdLocation, writable: Bool) throws {
        pending = RbdWriteBehind(name: loc.image)
        lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        lock.initialize(to: pthread_mutex_t())
        pthread_mutex_init(lock, nil)
        conn = try RbdConnection(loc)
        name = loc.image
        snapshotName = loc.snapshot
        var img: rbd_image_t?
        let r = rbd_open(conn.ioctx, loc.image, &img, loc.snapshot)
        if r < 0 {
            conn.close()
            throw InstarError.system(-r, "error reading header from \(loc.image)")
        }
        image = img
        if let format = loc.encryptFormat, let id = loc.encryptKeySecret {
            do {
                try RbdProtocol.loadEncryption(img, format: format, passphrase: try loc.secretBytes(id))
            } catch {
                rbd_close(img)
                conn.close()
                throw error
            }
        }
        var info = rbd_image_info_t()
        let s = rbd_stat(img, &info, MemoryLayout<rbd_image_info_t>.size)
        if s < 0 {
            rbd_close(img)
            conn.close()
            throw InstarError.system(-s, "error getting image info from \(loc.image)")
        }
        cachedSize = info.size
        objectSize = info.obj_size
        if loc.snapshot != nil && writable {
            rbd_close(img)
            conn.close()
            throw InstarError(.permission, "rbd snapshots are read-only", errno: EROFS)
        }
    }

    deinit {
        pthread_mutex_destroy(lock)
        lock.deallocate()
    }

    /// qemu_rbd_start_co: librbd refuses writes past the end, so a write that reaches further resizes first.
    private func growForWrite(to end: UInt64) throws {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        if end <= cachedSize { return }
        try pending.wait()
        let r = rbd_resize(image, end)
        if r < 0 { throw InstarError.system(-r, "error growing \(name)") }
        cachedSize = end
    }

    func size() throws -> UInt64 {
        var n: UInt64 = 0
        let r = rbd_get_size(image, &n)
        if r < 0 { throw InstarError.system(-r, "error getting size of \(name)") }
        return n
    }

    func allocatedSize() throws -> UInt64? { nil }

    var clusterSize: UInt64? { objectSize }

    /// qemu-img convert keeps 8 requests going (its coroutines); each RBD read waits for an OSD.
    var readsInFlight: Int { 8 }

    /// qemu_rbd_get_specific_info: "encryption-format" when the image starts with a LUKS header librbd wrote.
    func formatSpecific() throws -> QObject? {
        var head = [UInt8](repeating: 0, count: 8)
        if try size() >= 8 {
            _ = try head.withUnsafeMutableBytes { try read(into: $0, at: 0) }
        }
        var data: [(String, QObject)] = []
        if head == [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0x00, 0x01] { data.append(("encryption-format", .string("luks"))) }
        if head == [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0x00, 0x02] { data.append(("encryption-format", .string("luks2"))) }
        return .dict([("type", .string("rbd")), ("data", .dict(data))])
    }
    var snapshots: ProtocolSnapshotting? { self }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let end = try size()
        guard offset < end, let base = buffer.baseAddress else { return 0 }
        let want = Int(min(UInt64(buffer.count), end - offset))
        try pending.wait(from: offset, to: offset + UInt64(want))
        var done = 0
        while done < want {
            let n = rbd_read(image, offset + UInt64(done), want - done, (base + done).assumingMemoryBound(to: CChar.self))
            if n < 0 { throw InstarError.system(Int32(truncatingIfNeeded: -n), "error reading \(name)") }
            if n == 0 { break }
            done += n
        }
        return done
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard let base = buffer.baseAddress else { return }
        try pending.check()
        try growForWrite(to: try offset.adding(UInt64(buffer.count)))
        let img = image
        try pending.queue(offset: offset, length: UInt64(buffer.count), data: UnsafeRawBufferPointer(start: base, count: buffer.count),
                          what: "writing") { c, data in
            rbd_aio_write(img, offset, buffer.count, data, c)
        }
    }

    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {
        // qemu_rbd_co_pwrite_zeroes: thick provisioning (zeroes written, objects kept) unless the range may be
        // unmapped.
        let flags: Int32 = mayUnmap ? 0 : Int32(RBD_WRITE_ZEROES_FLAG_THICK_PROVISION)
        var pos = offset
        let end = try offset.adding(length)
        try pending.check()
        try growForWrite(to: end)
        let img = image
        while pos < end {
            let n = min(end - pos, 1 << 30)
            let at = pos
            try pending.queue(offset: at, length: n, data: nil, what: "writing zeroes to") { c, _ in
                rbd_aio_write_zeroes(img, at, Int(n), c, flags, 0)
            }
            pos += n
        }
    }

    func discard(at offset: UInt64, length: UInt64) throws {
        let img = image
        try pending.queue(offset: offset, length: length, data: nil, what: "discarding in") { c, _ in
            rbd_aio_discard(img, offset, length, c)
        }
    }

    /// Waits for the AIO requests in flight and throws the first that failed (rbd_close flushes librbd's cache
    /// itself, so `durable` asks for nothing more).
    func finishWrites(durable: Bool) throws {
        try pending.wait()
    }

    func drainWrites() throws {
        try pending.wait()
    }

    func flush() throws {
        try pending.wait()
        let r = rbd_flush(image)
        if r < 0 { throw InstarError.system(-r, "error flushing \(name)") }
    }

    func truncate(to length: UInt64) throws {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        try pending.wait()
        let r = rbd_resize(image, length)
        if r < 0 { throw InstarError.system(-r, "Failed to resize file") }
        cachedSize = length
    }

    /// qemu_rbd_co_block_status: allocation from rbd_diff_iterate2 over whole objects when fast-diff is
    /// enabled and valid; otherwise everything is data. librbd before 1.17 gets the offset rounded down to an
    /// object boundary (and no answer for striped or cloned images), as qemu works around its bug.
    func extent(at offset: UInt64, length: UInt64) throws -> ProtocolExtent {
        let all = ProtocolExtent(length: length, data: true, zero: false)
        try pending.wait()
        var features: UInt64 = 0
        if rbd_get_features(image, &features) < 0 || features & UInt64(RBD_FEATURE_FAST_DIFF) == 0 { return all }
        var flags: UInt64 = 0
        if rbd_get_flags(image, &flags) < 0 || flags & UInt64(RBD_FLAG_FAST_DIFF_INVALID) != 0 { return all }
        if features & UInt64(RBD_FEATURE_STRIPINGV2) != 0 { return all }
        if RbdImage.hasParent(image) { return all }
        guard objectSize > 0, objectSize & (objectSize - 1) == 0 else { return all }
        let head = offset & (objectSize - 1)
        var req = DiffRequest(offs: offset - head, bytes: 0, exists: false)
        let bytes = length > UInt64.max - head ? UInt64.max : length + head
        let r = withUnsafeMutablePointer(to: &req) { p in
            rbd_diff_iterate2(image, nil, p.pointee.offs, bytes, 1, 1, { offs, len, exists, opaque in
                guard let req = opaque?.assumingMemoryBound(to: DiffRequest.self) else { return -1 }
                if exists == 0 { return 0 }
                if !req.pointee.exists && offs > req.pointee.offs {
                    req.pointee.bytes = offs - req.pointee.offs
                    return RbdImage.stopIteration
                }
                if req.pointee.exists && offs > req.pointee.offs &+ req.pointee.bytes { return RbdImage.stopIteration }
                req.pointee.bytes &+= UInt64(len)
                req.pointee.exists = true
                return 0
            }, p)
        }
        if r < 0 && r != RbdImage.stopIteration { return all }
        var status = ProtocolExtent(length: 0, data: true, zero: false)
        if !req.exists {
            if r == 0 { req.bytes = bytes }
            status.data = false
            status.zero = true
        }
        // The callback counts whole objects: keep inside what was asked, and past the rounded-down head.
        let got = min(req.bytes, bytes)
        guard got > head else { return all }
        status.length = got - head
        return status
    }

    static let stopIteration: Int32 = -9000

    struct DiffRequest {
        var offs: UInt64
        var bytes: UInt64
        var exists: Bool
    }

    static func hasParent(_ image: rbd_image_t?) -> Bool {
        var parent = rbd_linked_image_spec_t()
        var snap = rbd_snap_spec_t()
        let r = rbd_get_parent(image, &parent, &snap)
        if r == 0 {
            rbd_linked_image_spec_cleanup(&parent)
            rbd_snap_spec_cleanup(&snap)
        }
        return r != -ENOENT
    }

    func close() {
        // Whatever failed was thrown by finishWrites/flush already, or is lost with the handle as in any close.
        try? pending.wait()
        if let img = image { rbd_close(img) }
        image = nil
        conn.close()
    }

    // MARK: snapshots (qemu_rbd_snap_*): the name is also the id; dates and clocks are zero.

    func listSnapshots() throws -> [SnapshotInfo] {
        var max: Int32 = 16
        // librbd says how many it needs when the array is too small: a few rounds at most, bounded.
        for _ in 0..<8 {
            guard max > 0, max <= 1 << 20 else { break }
            var snaps = [rbd_snap_info_t](repeating: rbd_snap_info_t(), count: Int(max) + 1)
            let n = rbd_snap_list(image, &snaps, &max)
            if n == -ERANGE { continue }
            guard n <= Int32(snaps.count) else { return [] }
            if n <= 0 { return [] }
            var out: [SnapshotInfo] = []
            for s in snaps.prefix(Int(n)) {
                let name = s.name.map { String(cString: $0) } ?? ""
                // qemu copies the name into 128-byte fields (pstrcpy).
                let clipped = String(decoding: Array(name.utf8.prefix(127)), as: UTF8.self)
                out.append(SnapshotInfo(id: clipped, name: clipped, vmStateSize: s.size, dateSec: 0, dateNsec: 0,
                                        vmClockNsec: 0, icount: 0))
            }
            rbd_snap_list_end(&snaps)
            return out
        }
        return []
    }

    func createSnapshot(name: String) throws {
        if name.isEmpty { throw InstarError(.invalid, "snapshot name required", errno: EINVAL) }
        if name.utf8.count >= 128 { throw InstarError(.range, "snapshot name too long", errno: ERANGE) }
        let r = rbd_snap_create(image, name)
        if r < 0 { throw InstarError.system(-r, "failed to create snap") }
    }

    func deleteSnapshot(id: String, name: String) throws {
        if id != name {
            throw InstarError(.invalid, "rbd do not support snapshot id, it should be NULL or equal to snapshot name",
                              errno: EINVAL)
        }
        let r = rbd_snap_remove(image, name)
        if r < 0 { throw InstarError.system(-r, "Failed to remove the snapshot") }
    }

    func revertSnapshot(name: String) throws {
        let r = rbd_snap_rollback(image, name)
        if r < 0 { throw InstarError(.io, strerrorString(-r), errno: -r) }
    }
}
