import CInstar
import Glibc

/// instar_object_add / instar_object_del: the process's objects (qemu's --object), `ObjectRegistry`.

@_cdecl("instar_object_add")
public func instar_object_add(_ definition: UnsafePointer<CChar>?, _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let definition else { throw InstarError.invalid("definition must not be NULL") }
        try ObjectRegistry.add(String(cString: definition))
    }
}

@_cdecl("instar_object_del")
public func instar_object_del(_ id: UnsafePointer<CChar>?, _ err: UnsafeMutablePointer<instar_error_t>?) -> Int32 {
    capiCall(err) {
        guard let id else { throw InstarError.invalid("id must not be NULL") }
        try ObjectRegistry.delete(String(cString: id))
    }
}
