// swift-tools-version:5.9
// instar: a disk-image engine compatible with qemu-img 7.2, shipped as libinstar.so with a C ABI.
// The Makefile builds release with `-static-stdlib` so libinstar.so carries the Swift runtime.
import PackageDescription

let package = Package(
    name: "instar",
    products: [
        .library(name: "instar", type: .dynamic, targets: ["Instar"]),
        .executable(name: "instar-cli", targets: ["instar-cli"]),
        .executable(name: "instar-isolate", targets: ["instar-isolate"]),
    ],
    targets: [
        .target(name: "CInstar"),
        .target(name: "Instar", dependencies: ["CInstar"]),
        .executableTarget(name: "instar-cli", dependencies: ["Instar", "CInstar"]),
        .executableTarget(name: "instar-isolate", dependencies: ["Instar", "CInstar"]),
        .testTarget(name: "InstarTests", dependencies: ["Instar", "CInstar"]),
    ]
)
