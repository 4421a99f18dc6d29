/// The protocol drivers `ProtocolRegistry` knows, besides "file". Each driver adds one line.
func protocolDescriptors() -> [ProtocolDescriptor] {
    var all: [ProtocolDescriptor] = []
    all.reserveCapacity(2)
    all.append(RbdProtocol.descriptor)
    all.append(NbdProtocol.descriptor)
    return all
}
