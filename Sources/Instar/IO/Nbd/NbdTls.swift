import CNbd
import Glibc

/// NBD over TLS (qemu's tls-creds and tls-hostname options of the nbd driver) through libnbd's TLS calls: x509
/// certificates from the credentials' directory or a PSK file, TLS required once credentials are named.
enum NbdTls {
    /// How the connection is made. libnbd checks a server certificate's name only against a host it was told:
    /// the host of its own TCP connection, or nbd_set_tls_hostname's (newer libnbd). Where the second is
    /// missing (Debian 12's libnbd 1.14), a verified x509 connection is a TCP connection libnbd makes itself.
    enum Plan: Equatable {
        /// instar connects the socket (qemu's connect errors) and hands it to libnbd.
        case ownSocket
        /// libnbd connects to host:port and checks the certificate against host.
        case libnbdTcp(host: String, port: String)
    }

    /// nbd_get_tls_creds: the credentials `tls-creds` names, nil without the option; qemu's errors for an id
    /// naming nothing, another kind of object or a server's credentials.
    static func credentials(_ address: NbdAddress) throws -> TlsCredentials? {
        guard let id = address.tlsCreds else { return nil }
        switch TlsCredentials.lookup(id) {
        case .missing: throw InstarError.invalid("No TLS credentials with id '\(id)'")
        case .otherObject: throw InstarError.invalid("Object with id '\(id)' is not TLS credentials")
        case let .credentials(c):
            guard c.isClient else { throw InstarError.invalid("Expected TLS credentials for a client endpoint") }
            return c
        }
    }

    /// The way to connect `address` with `creds` on handle `h` (libnbd loaded).
    static func plan(_ address: NbdAddress, _ creds: TlsCredentials?, handle h: OpaquePointer) throws -> Plan {
        guard let creds, creds.kind == .x509, creds.verifyPeer else { return .ownSocket }
        if instar_nbd_has_tls_hostname() != 0 { return .ownSocket }
        switch address.server {
        case let .inet(host, port):
            if address.tlsHostname == nil || address.tlsHostname == host { return .libnbdTcp(host: host, port: port) }
        case .unix:
            // Without a name qemu fails after connecting ("No hostname..."): setUp says so then.
            if address.tlsHostname == nil { return .ownSocket }
        }
        throw InstarError.unsupported(
            "This libnbd cannot check the server's certificate against tls-hostname '\(address.tlsHostname ?? "")' "
            + "(this needs a libnbd with nbd_set_tls_hostname); connect over TCP to that host name, "
            + "or set verify-peer=off")
    }

    /// Asks libnbd for TLS with `creds` (before the connection is made).
    static func setUp(_ h: OpaquePointer, _ creds: TlsCredentials, address: NbdAddress, plan: Plan) throws {
        func check(_ r: Int32) throws { if r != 0 { throw NbdBackend.lastError() } }
        try check(nbd_set_tls(h, Int32(LIBNBD_TLS_REQUIRE)))
        switch creds.kind {
        case .x509:
            try check(nbd_set_tls_certificates(h, creds.dir))
            try check(nbd_set_tls_verify_peer(h, creds.verifyPeer))
            if creds.verifyPeer, plan == .ownSocket {
                // qcrypto_tls_session_check_certificate: a client checks the server's name, so it needs one.
                guard let name = address.tlsHostname else {
                    throw InstarError.invalid("No hostname for certificate validation")
                }
                if instar_nbd_set_tls_hostname(h, name) == -1 { throw NbdBackend.lastError() }
            }
        case .psk:
            try check(nbd_set_tls_psk_file(h, creds.pskFile))
            try check(nbd_set_tls_username(h, creds.username))
        }
    }

    /// Whether libnbd's handshake failed because gnutls refused the server's certificate (its only words for it).
    static func isCertificateRejection(_ e: InstarError) -> Bool {
        NbdName.find("Error in the certificate verification", in: e.message) != nil
    }

    /// The reason qemu gives for the certificate libnbd refused (qcrypto_tls_session_check_certificate's: an
    /// unknown issuer, a name that does not match, an expired certificate...), learnt by a TLS handshake of our
    /// own on a new connection; nil when it cannot be learnt (libnbd's message stands then).
    static func rejectionReason(_ address: NbdAddress, _ creds: TlsCredentials, like e: InstarError) -> InstarError? {
        guard creds.kind == .x509, let fd = try? NbdSocket.connect(address.server) else { return nil }
        var buf = [CChar](repeating: 0, count: 512)
        let rc = buf.withUnsafeMutableBufferPointer { b in
            instar_nbd_tls_diagnose(fd, creds.dir, address.tlsHostname, b.baseAddress, b.count)
        }
        guard rc == 0 else { return nil }
        let reason = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return InstarError(e.code, reason, errno: e.errnoValue)
    }

    /// qemu's words for a handshake libnbd failed, where they differ; nil keeps libnbd's.
    static func qemuMessage(for e: InstarError, tls: Bool) -> InstarError? {
        let m = e.message
        func error(_ text: String) -> InstarError { InstarError(e.code, text, errno: e.errnoValue) }
        if NbdName.find("server requires TLS encryption first", in: m) != nil {
            // nbd_receive_option_reply's hint; libnbd keeps the server's own text to its debug log, so the
            // line qemu-nbd sends is given.
            return error("TLS negotiation required before option 7 (go)\nDid you forget a valid tls-creds?\n"
                         + "server reported: Option 0x7 not permitted before TLS")
        }
        guard tls else { return nil }
        if m.hasPrefix("gnutls_handshake: ") {
            var reason = String(m.dropFirst("gnutls_handshake: ".count))
            // libnbd appends the handshake's last message types, "(in/out)".
            if reason.hasSuffix(")"), let open = reason.lastIndex(of: "(") {
                reason = String(reason[..<open])
                while reason.hasSuffix(" ") { reason.removeLast() }
            }
            return error("TLS handshake failed: " + reason)
        }
        if m.hasPrefix("gnutls_record_recv: ") {
            return error("Failed to read option reply: Cannot read from TLS channel: Input/output error")
        }
        if m.hasPrefix("gnutls_record_send: ") {
            return error("Failed to send option request header: Cannot write to TLS channel: Input/output error")
        }
        // libnbd's own TCP connection (Plan.libnbdTcp): qemu's wording of inet_connect's failures.
        if m.hasPrefix("connect: "), let r = NbdName.find(": could not connect to remote host: ", in: m) {
            let target = m[m.index(m.startIndex, offsetBy: 9)..<r.lowerBound]
            return error("Failed to connect to '\(target)': \(m[r.upperBound...])")
        }
        if m.hasPrefix("getaddrinfo: "), let r = NbdName.find(": ", in: String(m.dropFirst(13))) {
            let rest = String(m.dropFirst(13))
            return error("address resolution failed for \(rest[..<r.lowerBound]): \(rest[r.upperBound...])")
        }
        return nil
    }
}
