"""NBD over TLS: the nbd driver's tls-creds (an --object tls-creds-x509 or tls-creds-psk) and tls-hostname, against
qemu-nbd servers that require TLS (x509 certificates made here with openssl, and a PSK file), through instar next
to qemu-img: info, map, convert from and into the export (same output, exit codes and bytes), and qemu's errors
for a client without TLS, a wrong CA, a wrong PSK, and tls-creds naming nothing, a server's credentials, or
another kind of object."""
import json
import os
import secrets

import pytest

from conftest import assert_same, instar, qemu, qemu_io, qimg, run
from test_nbd import Server, servers  # noqa: F401 (the fixture)

DAYS = "2"


def openssl(*args, cwd):
    r = run(["openssl", *args], cwd=cwd)
    assert r.rc == 0, r


def _cert(d, name, subject, ext, ca="ca"):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
            "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", DAYS, "-extfile", f"{name}.ext", cwd=d)


def _ca(d, name, subject):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", DAYS, "-subj", subject,
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)


def _link(src_dir, src, dst_dir, dst):
    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(src_dir, src), "rb") as f, open(os.path.join(dst_dir, dst), "wb") as g:
        g.write(f.read())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Credential directories laid out as qemu reads them: `server` (ca-cert, server-cert/key for localhost,
    dh-params so that no DH group is generated), `client` (ca-cert, client-cert/key), `other` (the
    certificate of another CA only), and PSK files `psk` (server and client) and `pskbad` (another key)."""
    d = str(tmp_path_factory.mktemp("pki"))
    _ca(d, "ca", "/CN=instar test CA")
    _ca(d, "other", "/CN=another CA")
    _cert(d, "server", "/CN=localhost", "basicConstraints=critical,CA:FALSE\n"
          "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
          "subjectAltName=DNS:localhost\n")
    _cert(d, "client", "/O=instar/CN=client", "basicConstraints=critical,CA:FALSE\n"
          "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
    openssl("genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048", "-out", "dh.pem", cwd=d)
    dirs = {k: os.path.join(d, k) for k in ("server", "client", "other", "psk", "pskbad")}
    for src, dst in (("ca-cert.pem", "ca-cert.pem"), ("server-cert.pem", "server-cert.pem"),
                     ("server-key.pem", "server-key.pem"), ("dh.pem", "dh-params.pem")):
        _link(d, src, dirs["server"], dst)
    for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        _link(d, f, dirs["client"], f)
    _link(d, "other-cert.pem", dirs["other"], "ca-cert.pem")
    for k in ("psk", "pskbad"):
        os.makedirs(dirs[k])
        with open(os.path.join(dirs[k], "keys.psk"), "w") as f:
            f.write(f"qemu:{secrets.token_hex(32)}\n")
        _link(d, "dh.pem", dirs[k], "dh-params.pem")
    return dirs


def x509_server(servers, tmp, pki, path, tcp=True):
    s = Server(tmp, ["qemu-nbd", "--persistent", "-f", "raw", "--object",
                     f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server", "--tls-creds", "tls0", path],
               tcp=tcp)
    servers.append(s)
    return s


def psk_server(servers, tmp, pki, path):
    s = Server(tmp, ["qemu-nbd", "--persistent", "-f", "raw", "--object",
                     f"tls-creds-psk,id=tls0,dir={pki['psk']},endpoint=server", "--tls-creds", "tls0", path])
    servers.append(s)
    return s


def opts(s, *extra, prefix="", host="localhost"):
    """--image-opts of the server's export (an nbd node named by itself, or under `prefix`); a TCP server is
    named by `host` (its certificate is for localhost, not 127.0.0.1)."""
    o = ",".join([s.image_opts(prefix=prefix)] + [prefix + e for e in extra])
    return o.replace("server.host=127.0.0.1", f"server.host={host}")


def x509_client(pki, d="client", *extra):
    return ["--object", ",".join([f"tls-creds-x509,id=tls0,dir={pki[d]},endpoint=client", *extra])]


def psk_client(pki, d="psk"):
    return ["--object", f"tls-creds-psk,id=tls0,dir={pki[d]},endpoint=client,username=qemu"]


def sparse_raw(tmp, name="disk.raw"):
    p = os.path.join(tmp, name)
    with open(p, "wb") as f:
        f.truncate(4 << 20)
    qemu_io("-f", "raw", "-c", "write -P 0xa5 0 300k", "-c", "write -P 0x3c 2M 64k", p)
    return p


def read_file(p):
    with open(p, "rb") as f:
        return f.read()


@pytest.mark.parametrize("kind", ["x509-tcp", "psk-unix"])
def test_info_map_convert_over_tls(tmp, servers, pki, kind):
    """info, map and convert from the export (--image-opts and json:), and convert -n into it: the same output
    as qemu-img, the same bytes read, the same bytes written on the server's file."""
    disk = sparse_raw(tmp)
    if kind == "x509-tcp":
        s, obj = x509_server(servers, tmp, pki, disk), x509_client(pki)
    else:
        s, obj = psk_server(servers, tmp, pki, disk), psk_client(pki)
    o = opts(s, "tls-creds=tls0")
    assert_same("info", *obj, "--image-opts", o)
    assert_same("map", "--output=json", *obj, "--image-opts", o)
    node = dict(s.node(), **{"tls-creds": "tls0"})
    if node["server"].get("host"):
        node["server"]["host"] = "localhost"
    assert_same("info", "--output=json", *obj, "json:" + json.dumps({"driver": "raw", "file": node}))
    got = {}
    for name, tool in (("qemu", qemu), ("instar", instar)):
        out = os.path.join(tmp, f"out_{name}.raw")
        got[name] = tool("convert", *obj, "--image-opts", o, "-O", "raw", out)
        got[name + " bytes"] = read_file(out)
    assert got["instar"] == got["qemu"] and got["qemu"].rc == 0, got
    assert got["instar bytes"] == got["qemu bytes"] == read_file(disk)
    # into the export: convert -n of a qcow2 over it, by each tool in turn on the same starting bytes
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", src, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x77 64k 1M", "-c", "write -z 0 64k", src)
    original = read_file(disk)
    written = {}
    for name, tool in (("qemu-img", qemu), ("instar", instar)):
        with open(disk, "r+b") as f:
            f.write(original)
        r = tool("convert", "-n", *obj, "-f", "qcow2", "--target-image-opts", src, o)
        assert r.rc == 0 and r.out == "" and r.err == "", (name, r)
        written[name] = read_file(disk)
    assert written["instar"] == written["qemu-img"]
    assert written["instar"][64 << 10:(64 << 10) + 4] == b"\x77" * 4


def test_tls_errors_like_qemu(tmp, servers, pki):
    """What fails at open, with qemu's message and exit code: no TLS against a server that requires it, a wrong
    CA, a certificate for another name than the host's, a wrong PSK, tls-creds naming no object, a server's
    credentials or a secret, and an x509 connection on a Unix socket without tls-hostname; with verify-peer=off
    that connection works."""
    disk = sparse_raw(tmp)
    x = x509_server(servers, tmp, pki, disk)
    p = psk_server(servers, tmp, pki, sparse_raw(tmp, "p.raw"))
    xu = x509_server(servers, tmp, pki, sparse_raw(tmp, "u.raw"), tcp=False)
    cases = [
        ([], opts(x)),
        ([], opts(p)),
        (x509_client(pki, "other"), opts(x, "tls-creds=tls0")),
        (x509_client(pki), opts(x, "tls-creds=tls0", host="127.0.0.1")),
        (psk_client(pki, "pskbad"), opts(p, "tls-creds=tls0")),
        (x509_client(pki), opts(x, "tls-creds=nosuch")),
        (["--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server"], opts(x, "tls-creds=tls0")),
        (["--object", f"tls-creds-psk,id=tls0,dir={pki['psk']},endpoint=server"], opts(p, "tls-creds=tls0")),
        (["--object", "secret,id=tls0,data=x"], opts(x, "tls-creds=tls0")),
        (x509_client(pki), opts(xu, "tls-creds=tls0")),
    ]
    for obj, o in cases:
        r = assert_same("info", *obj, "--image-opts", o)
        assert r.rc == 1, (obj, o, r)
    r = assert_same("map", "--output=json", *x509_client(pki, "client", "verify-peer=off"), "--image-opts",
                    opts(xu, "tls-creds=tls0"))
    assert r.rc == 0, r
    # Debian 12's libnbd (1.14) checks a certificate only against the host of a TCP connection it makes itself
    # (nbd_set_tls_hostname came later): a certificate check on a Unix socket is refused rather than skipped.
    o = opts(xu, "tls-creds=tls0", "tls-hostname=localhost")
    if qemu("info", *x509_client(pki), "--image-opts", o).rc == 0:
        r = instar("info", *x509_client(pki), "--image-opts", o)
        assert r.rc == 0 or (r.rc == 1 and "tls-hostname 'localhost'" in r.err and "verify-peer=off" in r.err), r


def test_credential_objects_checked_when_created(tmp, pki):
    """The --object definitions themselves: missing directory or files, a PSK user not in the file, bad
    property values, an id already taken; qemu-img refuses them before opening anything."""
    img = os.path.join(tmp, "a.raw")
    qimg("create", "-q", "-f", "raw", img, "1M")
    for obj in [
        "tls-creds-x509,id=t,endpoint=client",
        f"tls-creds-x509,id=t,dir={tmp}/nowhere,endpoint=client",
        f"tls-creds-x509,id=t,dir={pki['client']},endpoint=server",
        f"tls-creds-x509,id=t,dir={pki['client']},endpoint=sideways",
        f"tls-creds-x509,id=t,dir={pki['client']},verify-peer=maybe",
        f"tls-creds-x509,id=t,dir={pki['client']},username=bob",
        f"tls-creds-psk,id=t,dir={pki['client']}",
        f"tls-creds-psk,id=t,dir={pki['psk']},username=bob",
        f"tls-creds-psk,id=t,dir={pki['psk']},endpoint=server,username=bob",
        f"tls-creds-psk,dir={pki['psk']}",
    ]:
        r = assert_same("info", "--object", obj, img)
        assert r.rc == 1, (obj, r)
    psk = f"tls-creds-psk,id=t,dir={pki['psk']}"
    for objs in (["secret,id=t,data=x", f"tls-creds-psk,id=t,dir={tmp}/nowhere"], [psk, "secret,id=t,data=x"],
                 [psk, f"tls-creds-x509,id=t,dir={pki['client']}"]):
        r = assert_same("info", *[a for o in objs for a in ("--object", o)], img)
        assert r.rc == 1 and "duplicate" in r.err, (objs, r)
    r = assert_same("info", "--object", psk, "-f", "raw", img)
    assert r.rc == 0, r


def test_objects_added_through_the_library(tmp, servers, pki):
    """A library caller's --object: TLS credentials added with instar.object_add (instar_object_add) serve an nbd
    node's tls-creds in info and convert from a qemu-nbd export that requires TLS (x509 over TCP, PSK over a Unix
    socket), the same output and bytes as qemu-img with --object; a secret added the same way unlocks an
    encrypted image's encrypt.key-secret, in process and in an isolated helper; a duplicate id, an unknown type and a deleted object fail with qemu-img's messages."""
    import instar
    disk = sparse_raw(tmp)
    x = x509_server(servers, tmp, pki, disk)
    p = psk_server(servers, tmp, pki, sparse_raw(tmp, "p.raw"))
    x509 = f"tls-creds-x509,id=apitls,dir={pki['client']},endpoint=client"
    psk = f"tls-creds-psk,id=apipsk,dir={pki['psk']},endpoint=client,username=qemu"
    instar.object_add(x509)
    instar.object_add(psk)
    try:
        for s, obj, oid in ((x, x509, "apitls"), (p, psk, "apipsk")):
            node = dict(s.node(), **{"tls-creds": oid})
            if node["server"].get("host"):
                node["server"]["host"] = "localhost"
            name = "json:" + json.dumps({"driver": "raw", "file": node})
            assert instar.info_json(name) == qemu("info", "--output=json", "--object", obj, name).out
            out = os.path.join(tmp, f"out_{oid}.raw")
            instar.convert(name, out, fmt="raw")
            assert read_file(out) == read_file(disk)
        # qemu-img's --object errors for a second object with a taken id and for a type it does not have
        for definition, taken in ((x509, x509), ("secret,id=apitls,data=x", x509), ("nosuchtype,id=t9", None)):
            with pytest.raises(instar.InstarError) as e:
                instar.object_add(definition)
            q = qemu("info", *([] if taken is None else ["--object", taken]), "--object", definition, disk)
            assert q.rc == 1 and q.err == f"instar: {e.value.message}\n", (q, e.value.message)
        # a secret for an encrypted image's encrypt.key-secret (qcow2's legacy AES: no PBKDF to wait for)
        enc = os.path.join(tmp, "enc.qcow2")
        qimg("create", "-q", "--object", "secret,id=s0,data=pw", "-f", "qcow2", "-o",
             "encrypt.format=aes,encrypt.key-secret=s0", enc, "1M")
        qemu_io("--object", "secret,id=s0,data=pw", "--image-opts",
                f"driver=qcow2,encrypt.key-secret=s0,file.filename={enc}", "-c", "write -P 0x5a 4k 64k")
        name = "json:" + json.dumps({"driver": "qcow2", "encrypt.key-secret": "apisec",
                                     "file": {"driver": "file", "filename": enc}})
        instar.object_add("secret,id=apisec,data=pw")
        plain = {}
        for tool in ("qemu", "instar"):
            out = os.path.join(tmp, f"plain_{tool}.raw")
            if tool == "qemu":
                assert qemu("convert", "--object", "secret,id=apisec,data=pw", "-O", "raw", name, out).rc == 0
            else:
                instar.convert(name, out, fmt="raw")
            plain[tool] = read_file(out)
        assert plain["instar"] == plain["qemu"] and plain["qemu"][4096:4100] == b"\x5a" * 4
        # isolated: the helper process that parses the image gets the caller's registered secrets too
        out = os.path.join(tmp, "plain_isolated.raw")
        instar.convert(name, out, fmt="raw", isolated=True)
        assert read_file(out) == plain["qemu"]
        instar.object_del("apisec")
        with pytest.raises(instar.InstarError):
            instar.convert(name, os.path.join(tmp, "gone.raw"), fmt="raw")
    finally:
        instar.object_del("apitls")
        instar.object_del("apipsk")
    with pytest.raises(instar.NotFound):
        instar.object_del("apitls")
    # once deleted, the node names nothing: qemu's error without the --object
    node = dict(p.node(), **{"tls-creds": "apipsk"})
    name = "json:" + json.dumps({"driver": "raw", "file": node})
    with pytest.raises(instar.InstarError) as e:
        instar.info_json(name)
    q = qemu("info", name)
    assert q.rc == 1 and q.err == f"instar: Could not open '{name}': {e.value.message}\n" \
        or q.err == f"instar: {e.value.message}\n", (q, e.value.message)
