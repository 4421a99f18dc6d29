import Glibc

/// The socket under an NBD connection, connected as qemu's util/qemu-sockets.c connects (so a refused or
/// unreachable server gets qemu's words); libnbd then runs the handshake over it.
enum NbdSocket {
    static func connect(_ server: NbdAddress.Server) throws -> Int32 {
        switch server {
        case let .unix(path): return try connectUnix(path)
        case let .inet(host, port): return try connectInet(host: host, port: port)
        }
    }

    static func connectUnix(_ path: String) throws -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { throw InstarError.invalid("UNIX socket path '\(path)' is too long") }
        if path.isEmpty { throw InstarError.invalid("unix connect: no path specified") }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw InstarError.system(errno, "Failed to create socket") }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        var rc: Int32
        repeat {
            rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
        } while rc < 0 && errno == EINTR
        if rc < 0 {
            let e = errno
            Glibc.close(fd)
            throw InstarError.system(e, "Failed to connect to '\(path)'")
        }
        return fd
    }

    static func connectInet(host: String, port: String) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_flags = AI_CANONNAME | AI_ADDRCONFIG | AI_V4MAPPED
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, port, &hints, &res)
        if rc != 0 {
            let text = String(cString: gai_strerror(rc))
            throw InstarError(.io, "address resolution failed for \(host):\(port): \(text)", errno: EINVAL)
        }
        defer { freeaddrinfo(res) }
        var lastError = InstarError(.io, "Failed to connect to '\(host):\(port)'", errno: EIO)
        var entry = res
        var count = 0
        while let e = entry, count < 64 {
            count += 1
            entry = e.pointee.ai_next
            let fd = socket(e.pointee.ai_family, e.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue),
                            e.pointee.ai_protocol)
            if fd < 0 {
                lastError = InstarError.system(errno, "Failed to create socket family \(e.pointee.ai_family)")
                continue
            }
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            var r: Int32
            repeat { r = Glibc.connect(fd, e.pointee.ai_addr, e.pointee.ai_addrlen) } while r < 0 && errno == EINTR
            if r == 0 { return fd }
            let err = errno
            Glibc.close(fd)
            lastError = InstarError.system(err, "Failed to connect to '\(host):\(port)'")
        }
        throw lastError
    }
}
