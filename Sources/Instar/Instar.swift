/// The engine's version, as instar_version() returns it.
public enum Instar {
    public static let version = "0.1.0"
}
