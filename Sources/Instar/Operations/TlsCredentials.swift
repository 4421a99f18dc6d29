import Glibc

/// `--object tls-creds-x509,...` and `--object tls-creds-psk,...`: the TLS credentials an NBD client names with
/// its `tls-creds` option (qemu's crypto/tlscreds*.c objects). Like qemu's object root, the objects of a process
/// live in one table, filled while the command line is read and consulted when an nbd node opens; the files are
/// checked when the object is created, as qemu loads them then.
public struct TlsCredentials: Equatable {
    public enum Kind: String { case x509 = "tls-creds-x509", psk = "tls-creds-psk" }

    public var kind: Kind
    public var id: String
    /// The directory of the credential files (ca-cert.pem, client-cert.pem, client-key.pem; keys.psk).
    public var dir: String
    /// Whether the object is for the client end (false: endpoint=server, which a client refuses).
    public var isClient: Bool
    /// x509: whether the server's certificate is checked against the CA and the host name (qemu's default).
    public var verifyPeer: Bool
    /// psk: the user name looked up in keys.psk (qemu's default "qemu").
    public var username: String

    /// The PSK file of a psk object.
    public var pskFile: String { dir + "/keys.psk" }

    // MARK: the process's objects

    private static let lock: UnsafeMutablePointer<pthread_mutex_t> = {
        let l = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        pthread_mutex_init(l, nil)
        return l
    }()
    private static var objects: [String: TlsCredentials] = [:]
    /// Ids of objects of other kinds (secrets): a tls-creds option naming one gets qemu's "is not TLS credentials".
    private static var otherIds: Set<String> = []

    /// What `tls-creds=ID` names.
    public enum Lookup: Equatable {
        case credentials(TlsCredentials)
        case otherObject
        case missing
    }

    public static func lookup(_ id: String) -> Lookup {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        if let c = objects[id] { return .credentials(c) }
        return otherIds.contains(id) ? .otherObject : .missing
    }

    /// Records that an object of another kind (a secret) has this id.
    public static func noteOtherObject(id: String) {
        pthread_mutex_lock(lock)
        otherIds.insert(id)
        pthread_mutex_unlock(lock)
    }

    static func register(_ c: TlsCredentials) throws {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        if objects[c.id] != nil || otherIds.contains(c.id) { throw duplicate(c.id) }
        objects[c.id] = c
    }

    /// Drops the object `id` from the table (TLS credentials or another object's id); whether there was one.
    static func remove(id: String) -> Bool {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        let creds = objects.removeValue(forKey: id) != nil
        let other = otherIds.remove(id) != nil
        return creds || other
    }

    /// Whether TLS credentials already have this id (another object may not take it).
    public static func hasCredentials(id: String) -> Bool {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        return objects[id] != nil
    }

    /// qemu's error for a second object with an id already taken.
    static func duplicate(_ id: String) -> InstarError {
        InstarError.invalid("attempt to add duplicate property '\(id)' to object (type 'container')")
    }

    // MARK: creation

    static let commonProperties: Set<String> = ["qom-type", "id", "dir", "endpoint", "verify-peer", "priority"]
    static let x509Properties: Set<String> = commonProperties.union(["sanity-check", "passwordid", "loaded"])
    static let pskProperties: Set<String> = commonProperties.union(["username", "loaded"])

    /// Creates the object `pairs` define (already split, "qom-type" first) and adds it to the table, with qemu's
    /// errors for bad properties and missing files.
    static func add(kind: Kind, pairs: [(String, String)]) throws {
        var fields: [String: String] = [:]
        let known = kind == .x509 ? x509Properties : pskProperties
        for (k, v) in pairs {
            guard known.contains(k) else { throw InstarError.invalid("Parameter '\(k)' is unexpected") }
            fields[k] = v
        }
        guard let id = fields["id"] else { throw InstarError.invalid("Parameter 'id' is missing") }
        guard SecretObjects.isIdentifier(id) else {
            throw InstarError.invalid("Parameter 'id' expects an identifier\n"
                + "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        }
        var isClient = true
        if let e = fields["endpoint"] {
            switch e {
            case "client": isClient = true
            case "server": isClient = false
            default: throw InstarError.invalid("Parameter 'endpoint' does not accept value '\(e)'")
            }
        }
        func bool(_ name: String, _ fallback: Bool) throws -> Bool {
            guard let v = fields[name] else { return fallback }
            switch v {
            case "on", "yes", "true", "y": return true
            case "off", "no", "false", "n": return false
            default: throw InstarError.invalid("Parameter '\(name)' expects 'on' or 'off'")
            }
        }
        let verifyPeer = try bool("verify-peer", true)
        _ = try bool("sanity-check", true)
        if fields["loaded"] != nil { throw InstarError.invalid("Property '\(kind.rawValue).loaded' is not writable") }
        if fields["passwordid"] != nil {
            throw InstarError.unsupported("TLS credentials with a passworded key (passwordid) are not supported")
        }
        // user_creatable_add_type: the id is taken before the object completes (loads its files).
        if case .missing = lookup(id) {} else { throw duplicate(id) }
        let username = fields["username"]
        if kind == .psk, !isClient, username != nil {
            throw InstarError.invalid("username should not be set when endpoint=server")
        }
        guard let dir = fields["dir"] else { throw InstarError.invalid("Missing 'dir' property value") }
        // qcrypto_tls_creds_get_path: each file the endpoint needs must exist; optional ones may be absent.
        func need(_ file: String, required: Bool) throws {
            let path = dir + "/" + file
            var st = stat()
            if stat(path, &st) != 0 {
                let e = errno
                if e == ENOENT && !required { return }
                throw InstarError(e == ENOENT ? .notFound : .io,
                                  "Unable to access credentials \(path): \(strerrorString(e))", errno: e)
            }
        }
        let name = username ?? "qemu"
        switch (kind, isClient) {
        case (.x509, false):
            for (f, r) in [("ca-cert.pem", true), ("ca-crl.pem", false), ("server-cert.pem", true),
                           ("server-key.pem", true), ("dh-params.pem", false)] {
                try need(f, required: r)
            }
        case (.x509, true):
            for (f, r) in [("ca-cert.pem", true), ("client-cert.pem", false), ("client-key.pem", false)] {
                try need(f, required: r)
            }
        case (.psk, false):
            try need("dh-params.pem", required: false)
            try need("keys.psk", required: true)
        case (.psk, true):
            try need("keys.psk", required: true)
            try checkPskUser(file: dir + "/keys.psk", username: name)
        }
        try register(TlsCredentials(kind: kind, id: id, dir: dir, isClient: isClient, verifyPeer: verifyPeer,
                                username: name))
    }

    /// qemu's lookup_key: a "username:key" line for the user must be in the PSK file.
    static func checkPskUser(file path: String, username: String) throws {
        let text: [UInt8]
        do {
            let f = try HostFile.open(path)
            let size = try f.size()
            guard size <= 1 << 20 else { throw InstarError.invalid("Cannot read PSK file \(path): File too large") }
            text = try f.readBytes(at: 0, count: Int(size))
        } catch let e as InstarError {
            // glib's g_file_get_contents wording, which qemu passes on.
            throw InstarError(e.code, "Cannot read PSK file \(path): Failed to open file \u{201C}\(path)\u{201D}: "
                + strerrorString(e.errnoValue), errno: e.errnoValue)
        }
        let user = Array(username.utf8)
        for line in text.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            let l = Array(line)
            if l.count > user.count, Array(l[0..<user.count]) == user, l[user.count] == UInt8(ascii: ":") { return }
        }
        throw InstarError.invalid("Username \(username) not found in PSK file \(path)")
    }
}
