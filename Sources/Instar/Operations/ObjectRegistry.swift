import Glibc

/// The objects a library caller adds with `instar_object_add` (qemu's `--object`, its QOM objects under
/// /objects): TLS credentials, kept in `TlsCredentials`' table where an nbd node's tls-creds finds them, and
/// secrets, which every open and create consults after the secrets of its own call (key-secret,
/// password-secret, encrypt.key-secret, rbd's key-secret). One table per process, as qemu has one object root.
public enum ObjectRegistry {
    private static let lock: UnsafeMutablePointer<pthread_mutex_t> = {
        let l = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        pthread_mutex_init(l, nil)
        return l
    }()
    /// Secret id → its text, plus `SecretObjects.base64Key(id)` → its exact bytes (as `SecretObjects.add` keeps them).
    private static var secrets: [String: String] = [:]

    /// Adds the object `text` defines (`--object`'s syntax), with qemu's errors: a bad or missing qom-type, bad
    /// properties, missing credential files, an id already taken by any object.
    public static func add(_ text: String) throws {
        var local: [String: String] = [:]
        let pairs = QemuOptsParser.parse(text, impliedKey: "qom-type")
        let type = pairs.last { $0.0 == "qom-type" }?.1
        if type != "secret" {
            // TLS credentials check their own ids against every object (secrets are noted there too).
            try SecretObjects.add(text, to: &local)
            return
        }
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        try SecretObjects.add(text, to: &local)
        if let id = pairs.last(where: { $0.0 == "id" })?.1, secrets[id] != nil { throw TlsCredentials.duplicate(id) }
        secrets.merge(local) { old, _ in old }
    }

    /// Removes object `id` (qemu's object-del): "object 'ID' not found" when there is none.
    public static func delete(_ id: String) throws {
        pthread_mutex_lock(lock)
        let secret = secrets.removeValue(forKey: id) != nil
        if secret { secrets.removeValue(forKey: SecretObjects.base64Key(id)) }
        pthread_mutex_unlock(lock)
        if TlsCredentials.remove(id: id) || secret { return }
        throw InstarError(.notFound, "object '\(id)' not found", errno: ENOENT)
    }

    /// Every registered secret (ids and their exact-bytes entries), for an isolated helper to install.
    static func allSecrets() -> [String: String] {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        return secrets
    }

    /// The isolated helper's side: the caller's registered secrets become this process's (it has no others).
    static func install(_ entries: [String: String]) {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        secrets.merge(entries) { old, _ in old }
    }

    /// `own` with the registered secrets added under the ids it does not set itself.
    public static func secrets(adding own: [String: String]) -> [String: String] {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        if secrets.isEmpty { return own }
        return own.merging(secrets) { mine, _ in mine }
    }
}
