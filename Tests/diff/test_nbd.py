"""The nbd protocol driver against real NBD servers (qemu-nbd, nbdkit) on loopback TCP and Unix sockets: every
name form qemu 7.2 takes, info/map/convert/compare/dd/check/resize through instar next to qemu-img, and a server
that fails or goes away in the middle of a copy."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import INSTAR, assert_same, both, instar, qemu, qemu_io, qimg, run

DEADLINE = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc, addr, family):
    """Waits, on a deadline, until `addr` accepts a connection (or the server process died)."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.args} rc={proc.returncode} {proc.stderr.read()!r}")
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(addr)
                return
            except OSError:
                pass
        time.sleep(0.01)
    raise AssertionError(f"server did not listen within {DEADLINE}s: {proc.args}")


class Server:
    """An NBD server process in the foreground (qemu-nbd or nbdkit), on a Unix socket or a free loopback TCP
    port; `names` are the ways qemu names its export."""

    def __init__(self, tmp, argv, tcp=False, export=None):
        self.tmp, self.export = tmp, export
        n = 0
        while os.path.exists(os.path.join(tmp, f"srv{n}.sock")) or os.path.exists(os.path.join(tmp, f"srv{n}.log")):
            n += 1
        self.log = open(os.path.join(tmp, f"srv{n}.log"), "w+")
        end = time.monotonic() + DEADLINE
        while True:
            if tcp:
                self.port = free_port()
                self.sock = None
                where = self._tcp_args(argv[0], self.port)
            else:
                self.port = None
                self.sock = os.path.join(tmp, f"srv{n}.sock")
                where = ["-k", self.sock] if argv[0] == "qemu-nbd" else ["-U", self.sock]
            self.proc = subprocess.Popen([argv[0], *where, *argv[1:]], stdout=subprocess.DEVNULL, stderr=self.log)
            try:
                if tcp:
                    wait_listening(self.proc, ("127.0.0.1", self.port), socket.AF_INET)
                else:
                    wait_listening(self.proc, self.sock, socket.AF_UNIX)
                return
            except AssertionError:
                # A TCP port taken between our probe and the server's bind: another port, until the deadline.
                self.stop()
                if not tcp or time.monotonic() > end:
                    raise

    @staticmethod
    def _tcp_args(prog, port):
        if prog == "qemu-nbd":
            return ["-b", "127.0.0.1", "-p", str(port)]
        return ["-i", "127.0.0.1", "-p", str(port)]

    @property
    def url(self):
        e = self.export or ""
        if self.sock:
            return f"nbd+unix:///{e}?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/{e}" if e else f"nbd://127.0.0.1:{self.port}"

    @property
    def legacy(self):
        tail = f":exportname={self.export}" if self.export else ""
        if self.sock:
            return f"nbd:unix:{self.sock}{tail}"
        return f"nbd:127.0.0.1:{self.port}{tail}"

    @property
    def server_node(self):
        if self.sock:
            return {"type": "unix", "path": self.sock}
        return {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}

    def node(self):
        d = {"driver": "nbd", "server": self.server_node}
        if self.export:
            d["export"] = self.export
        return d

    def image_opts(self, prefix="file."):
        s = self.server_node
        parts = [f"{prefix}driver=nbd"] + [f"{prefix}server.{k}={v}" for k, v in s.items()]
        if self.export:
            parts.append(f"{prefix}export={self.export}")
        return ",".join(parts)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE)
        self.log.close()


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.stop()


def qemu_nbd(servers, tmp, path, fmt="raw", tcp=False, export=None, extra=()):
    argv = ["qemu-nbd", "--persistent", "-f", fmt, *extra]
    if export:
        argv += ["-x", export]
    s = Server(tmp, argv + [path], tcp=tcp, export=export)
    servers.append(s)
    return s


def nbdkit(servers, tmp, *args, tcp=False):
    s = Server(tmp, ["nbdkit", "-f", *args], tcp=tcp)
    servers.append(s)
    return s


def make_source(tmp, name="src.qcow2", size="64M"):
    """A qcow2 with data, zero clusters and holes."""
    p = os.path.join(tmp, name)
    qimg("create", "-f", "qcow2", p, size)
    qemu_io("-f", "qcow2", "-c", "write -P 0xa5 0 1M", "-c", "write -P 0x11 3M 2M", "-c", "write -z 8M 4M",
            "-c", "write -P 0x5a 40M 192k", p)
    return p


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_info_and_map_every_name_form(tmp, servers, tcp):
    """A qcow2 served as raw bytes opens as qcow2 through every name form, as in qemu; a raw export too."""
    src = make_source(tmp)
    raw = os.path.join(tmp, "plain.raw")
    qimg("convert", "-O", "raw", src, raw)
    q = qemu_nbd(servers, tmp, src, tcp=tcp, export="exp")
    r = qemu_nbd(servers, tmp, raw, tcp=tcp)
    names = [
        ([], q.url),
        ([], q.legacy),
        ([], "json:" + json.dumps({"file": q.node()})),
        ([], "json:" + json.dumps(q.node())),
        (["-f", "nbd"], q.legacy),
        (["-f", "raw"], q.url),
        (["--image-opts"], "driver=qcow2," + q.image_opts()),
        (["--image-opts"], q.image_opts(prefix="")),
        ([], r.url),
        ([], r.legacy),
        ([], "json:" + json.dumps({"driver": "raw", "file": r.node()})),
    ]
    if tcp:
        names.append(([], q.url.replace("nbd://", "nbd+tcp://")))
    for extra, name in names:
        assert_same("info", *extra, name)
        assert_same("info", "--output=json", *extra, name)
        assert_same("map", "--output=json", *extra, name)
    assert_same("map", r.url)
    assert_same("info", "--backing-chain", "--output=json", q.url)


def test_name_and_connection_errors(tmp, servers):
    s = qemu_nbd(servers, tmp, make_source(tmp), export="exp")
    closed = free_port()
    missing = os.path.join(tmp, "nothing.sock")
    names = [
        "nbd:", "nbd:127.0.0.1", "nbd:[::1", "nbd:localhost:no-such-service", "nbd://", "nbd:///x",
        "nbd+unix:///exp", f"nbd+unix://host/exp?socket={s.sock}", f"nbd+unix:///exp?socket={s.sock}&x=y",
        "nbd://127.0.0.1/exp?socket=x", "nbd+bad://127.0.0.1/", f"nbd:unix:{s.sock}:exportname=",
        f"nbd:127.0.0.1:{closed}", f"nbd://127.0.0.1:{closed}/exp", f"nbd:unix:{missing}", f"nbd+unix:///x?socket={missing}",
        f"nbd+unix:///nope?socket={s.sock}", f"nbd:unix:{s.sock}",
        'json:{"driver":"nbd"}', 'json:{"driver":"nbd","path":"/x","host":"h"}',
        'json:{"driver":"nbd","path":"/x","port":"1"}', 'json:{"driver":"nbd","server":{"type":"unix"}}',
        'json:{"driver":"nbd","server":{"type":"inet","host":"x"}}', 'json:{"driver":"nbd","server":{"type":"bad"}}',
        'json:{"driver":"nbd","server":{"path":"x"}}',
        'json:{"file":{"driver":"nbd","server":{"type":"unix","path":"%s"},"export":"exp","foo":1}}' % s.sock,
        'json:{"file":{"driver":"nbd","path":"%s","server":{"type":"unix","path":"%s"}}}' % (s.sock, s.sock),
    ]
    for name in names:
        q = assert_same("info", name)
        assert q.rc == 1, name


def _convert_to(tmp, servers, src, target_of, compare_file):
    """convert -n into a fresh target per tool; the results must match qemu's and the source."""
    results = {}
    for tool in ("qemu", "instar"):
        target, path = target_of(tool)
        argv = ["convert", "-n", "-O", "raw", src, target]
        r = qemu(*argv) if tool == "qemu" else run([INSTAR, *argv])
        results[tool] = (r.rc, r.out, r.err.replace(target, "TARGET"))
        assert qemu("compare", "-f", "qcow2", "-F", "raw", src, target).rc == 0
        if path:
            results[tool + "-map"] = qemu("map", "--output=json", "-f", "raw", path).out
            results[tool + "-bytes"] = open(path, "rb").read()
    assert results["instar"] == (0, "", "")
    assert results["instar"] == results["qemu"]
    if compare_file:
        assert results["instar-bytes"] == results["qemu-bytes"]
        assert results["instar-map"] == results["qemu-map"]


def test_convert_to_qemu_nbd_file(tmp, servers):
    """Into a qemu-nbd over a sparse file on a Unix socket: same bytes, same holes (zeroes sent as unmapping
    WRITE_ZEROES)."""
    src = make_source(tmp)

    def target(tool):
        path = os.path.join(tmp, f"t_{tool}.raw")
        with open(path, "wb") as f:
            f.truncate(64 << 20)
        return qemu_nbd(servers, tmp, path, extra=["--discard=unmap"]).legacy, path
    _convert_to(tmp, servers, src, target, compare_file=True)


def test_convert_to_nbdkit_memory_tcp(tmp, servers):
    """Into nbdkit memory over TCP (multi-conn: several connections)."""
    src = make_source(tmp)

    def target(tool):
        return nbdkit(servers, tmp, "memory", "64M", tcp=True).url, None
    _convert_to(tmp, servers, src, target, compare_file=False)


def test_convert_to_nbdkit_file_over_dirty_data(tmp, servers):
    """nbdkit file over a file full of old data: zero ranges of the source must become zeroes on the target."""
    src = make_source(tmp)

    def target(tool):
        path = os.path.join(tmp, f"k_{tool}.raw")
        with open(path, "wb") as f:
            f.write(b"\xee" * (64 << 20))
        return nbdkit(servers, tmp, "file", path).url, path
    _convert_to(tmp, servers, src, target, compare_file=True)


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk"])
def test_convert_from_nbd(tmp, servers, fmt):
    src = make_source(tmp)
    s = qemu_nbd(servers, tmp, src, fmt="qcow2", tcp=True, extra=["-r", "-e", "4"])
    outs = {}
    for tool in ("q", "i"):
        out = os.path.join(tmp, f"from_{tool}.{fmt}")
        argv = ["convert", "-O", fmt, s.url, out]
        outs[tool] = (qemu(*argv) if tool == "q" else run([INSTAR, *argv])), out
    (q, qout), (i, iout) = outs["q"], outs["i"]
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err) == (0, "", "")
    assert qemu("compare", qout, iout).rc == 0
    assert qemu("compare", src, iout).rc == 0
    if fmt != "vmdk":
        assert open(qout, "rb").read() == open(iout, "rb").read()
    if fmt == "qcow2":
        assert qemu("check", iout).rc == 0


def test_compare_dd_check_resize(tmp, servers):
    src = make_source(tmp)
    other = os.path.join(tmp, "other.qcow2")
    qimg("convert", "-O", "qcow2", src, other)
    qemu_io("-f", "qcow2", "-c", "write -P 1 50M 4k", other)
    raw = os.path.join(tmp, "rw.raw")
    qimg("convert", "-O", "raw", src, raw)
    a = qemu_nbd(servers, tmp, src, fmt="qcow2", extra=["-r"])
    b = qemu_nbd(servers, tmp, other, fmt="qcow2", tcp=True, extra=["-r"])
    w = qemu_nbd(servers, tmp, raw, export="w")
    assert assert_same("compare", a.url, src).rc == 0
    assert assert_same("compare", a.url, b.url).rc == 1
    assert assert_same("compare", "-s", a.legacy, b.legacy).rc == 1
    assert_same("compare", "-f", "raw", "-F", "raw", w.url, a.url)
    assert_same("check", a.url)
    assert_same("check", "--output=json", a.url)
    # qcow2 served as bytes: check runs over nbd
    q = qemu_nbd(servers, tmp, other, extra=["-r"])
    assert_same("check", q.url)
    for args in (["resize", w.url, "128M"], ["resize", "-f", "raw", w.url, "64M"], ["resize", "-f", "raw", w.url, "+1M"],
                 ["resize", "-f", "raw", "--shrink", w.url, "32M"], ["resize", a.url, "1G"]):
        assert_same(*args)
    for tool, run_ in (("q", qemu), ("i", lambda *a: run([INSTAR, *a]))):
        out = os.path.join(tmp, f"dd_{tool}.raw")
        r = run_("dd", "-O", "raw", f"if={a.url}", f"of={out}", "bs=1M", "count=6", "skip=1")
        assert (r.rc, r.out, r.err) == (0, "", ""), r
    assert open(os.path.join(tmp, "dd_q.raw"), "rb").read() == open(os.path.join(tmp, "dd_i.raw"), "rb").read()


def test_create_over_nbd(tmp, servers):
    """qemu's generic protocol create: the existing export is opened and formatted in place."""
    outs = {}
    for tool in ("q", "i"):
        path = os.path.join(tmp, f"c_{tool}.raw")
        with open(path, "wb") as f:
            f.write(b"\xee" * (8 << 20))
        s = qemu_nbd(servers, tmp, path)
        argv = ["create", "-f", "qcow2", s.legacy, "4M"]
        r = qemu(*argv) if tool == "q" else run([INSTAR, *argv])
        outs[tool] = (r.rc, r.out.replace(s.legacy, "T"), r.err.replace(s.legacy, "T"))
        assert qemu("check", s.url).rc == 0
        assert_same("info", s.url)
        s.stop()
    assert outs["i"] == outs["q"]
    assert open(os.path.join(tmp, "c_q.raw"), "rb").read() == open(os.path.join(tmp, "c_i.raw"), "rb").read()


def test_convert_to_qcow2_over_nbd(tmp, servers):
    """convert -O qcow2 into an export (created in place as qemu does): same bytes on the server's file."""
    src = make_source(tmp)
    for tool in ("q", "i"):
        path = os.path.join(tmp, f"cq_{tool}.raw")
        with open(path, "wb") as f:
            f.truncate(64 << 20)
        s = qemu_nbd(servers, tmp, path)
        argv = ["convert", "-O", "qcow2", src, s.legacy]
        r = qemu(*argv) if tool == "q" else run([INSTAR, *argv])
        assert (r.rc, r.out, r.err) == (0, "", ""), r
        assert qemu("compare", src, s.url).rc == 0
        s.stop()
    assert open(os.path.join(tmp, "cq_q.raw"), "rb").read() == open(os.path.join(tmp, "cq_i.raw"), "rb").read()


def test_server_write_errors(tmp, servers):
    """A server that fails every write: a clear error and exit 1, as qemu-img."""
    src = make_source(tmp)
    s = nbdkit(servers, tmp, "--filter=error", "memory", "64M", "error-pwrite-rate=100%", "error-pwrite=EIO",
               "error-zero-rate=100%", "error-zero=EIO", "error-trim-rate=100%")
    r = assert_same("convert", "-n", "-O", "raw", src, s.url)
    assert r.rc == 1 and r.out == "" and "Input/output error" in r.err, r
    r = assert_same("dd", "-O", "raw", f"if={src}", f"of={s.url}", "bs=1M", "count=2")
    assert r.rc == 1, r


def test_server_dies_mid_copy(tmp, servers):
    """The server goes away while a convert writes to it: a clear error, a nonzero exit, no success reported."""
    src = os.path.join(tmp, "big.raw")
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    path = os.path.join(tmp, "dies.raw")
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    s = nbdkit(servers, tmp, "--filter=delay", "file", path, "wdelay=50ms")
    p = subprocess.Popen([INSTAR, "convert", "-p", "-n", "-f", "raw", "-O", "raw", src, s.url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + DEADLINE
    # The copy has begun once the server has stored data.
    while os.stat(path).st_blocks == 0 and p.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    s.proc.kill()
    s.proc.wait(timeout=DEADLINE)
    out, err = p.communicate(timeout=DEADLINE)
    assert p.returncode == 1, (p.returncode, out, err)
    assert err.startswith("instar: error while writing at byte ") or "error while writing" in err, err
    assert "100.00/100%" not in out


def test_dirty_bitmap_map(tmp, servers):
    """qemu-img's --image-opts ...,x-dirty-bitmap=qemu:dirty-bitmap:NAME map over qemu-nbd -B (oVirt's incremental
    backup read): the bitmap's extents in place of base:allocation."""
    p = os.path.join(tmp, "bm.qcow2")
    qimg("create", "-f", "qcow2", p, "16M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 4M", p)
    qimg("bitmap", "--add", p, "b0")
    qemu_io("-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -P 3 8M 1M", p)
    s = qemu_nbd(servers, tmp, p, fmt="qcow2", export="e", extra=["-r", "-B", "b0"])
    for bitmap in ("b0", "nope"):
        opts = "driver=raw," + s.image_opts() + f",file.x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
        assert_same("map", "--output=json", "--image-opts", opts)
        assert_same("map", "--image-opts", opts)


def test_python_info_over_nbd_unix(tmp, servers):
    import instar
    src = make_source(tmp)
    s = qemu_nbd(servers, tmp, src, export="py")
    assert json.loads(instar.info_json(s.url)) == json.loads(qemu("info", "--output=json", s.url).out)
    i = instar.info(s.url)
    assert (i.format, i.virtual_size) == ("qcow2", 64 << 20)


def _max_in_flight(log_path):
    """From nbdkit's log filter: the most write-like requests the server had at once, and the connections used."""
    cur = best = 0
    conns = set()
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4 or not parts[2].startswith("connection="):
                continue
            if parts[3] in ("Write", "Zero", "Trim"):
                cur += 1
                best = max(best, cur)
                conns.add(parts[2])
            elif parts[3] in ("...Write", "...Zero", "...Trim"):
                cur -= 1
    return best, len(conns)


def _data_source(tmp, mib):
    src = os.path.join(tmp, "data.raw")
    with open(src, "wb") as f:
        for i in range(mib):
            f.write((i.to_bytes(4, "little") + bytes(range(1, 253))) * 4096)
    # a hole and a zero run in the middle: zero requests mixed with the writes
    with open(src, "r+b") as f:
        f.seek(5 << 20)
        f.write(bytes(3 << 20))
    return src


@pytest.mark.parametrize("target", ["nbdkit", "qemu-nbd"])
def test_convert_many_requests_in_flight(tmp, servers, target):
    """convert keeps many writes in flight (write-behind over several connections where the server allows
    multi-conn): the server sees several at once, and the export holds the source's bytes."""
    src = _data_source(tmp, 24)
    log = os.path.join(tmp, "req.log")
    if target == "nbdkit":
        s = nbdkit(servers, tmp, "--filter=log", "--filter=delay", "memory", "24M", f"logfile={log}", "wdelay=10ms",
                   "delay-zero=10ms")
    else:
        path = os.path.join(tmp, "qn.raw")
        with open(path, "wb") as f:
            f.write(b"\xee" * (24 << 20))
        s = qemu_nbd(servers, tmp, path)
    r = run([INSTAR, "convert", "-n", "-f", "raw", "-O", "raw", src, s.url])
    assert (r.rc, r.out, r.err) == (0, "", ""), r
    assert qemu("compare", "-f", "raw", "-F", "raw", src, s.url).rc == 0
    if target == "nbdkit":
        in_flight, conns = _max_in_flight(log)
        assert in_flight >= 4 and conns >= 2, (in_flight, conns)


def test_server_fails_writes_mid_copy(tmp, servers):
    """Writes start failing after the copy has begun (write-behind has requests in flight): the failure of a
    request nobody waited for still ends the convert with qemu's error and exit 1, no success reported."""
    src = _data_source(tmp, 32)
    path = os.path.join(tmp, "fails.raw")
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    trigger = os.path.join(tmp, "fail-now")
    s = nbdkit(servers, tmp, "--filter=error", "--filter=delay", "file", path, "wdelay=20ms", "error-pwrite=EIO",
               "error-pwrite-rate=100%", f"error-pwrite-file={trigger}", "error-zero=EIO", "error-zero-rate=100%",
               f"error-zero-file={trigger}")
    p = subprocess.Popen([INSTAR, "convert", "-p", "-n", "-f", "raw", "-O", "raw", src, s.url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + DEADLINE
    while os.stat(path).st_blocks == 0 and p.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    open(trigger, "w").close()
    out, err = p.communicate(timeout=DEADLINE)
    assert p.returncode == 1, (p.returncode, out, err)
    assert err.startswith("instar: error while writing at byte ") and err.endswith(": Input/output error\n"), err
    assert "100.00/100%" not in out


def test_qcow2_over_multi_conn_nbd(tmp, servers):
    """A qcow2 written through write-behind over several connections (nbdkit memory, multi-conn): its metadata
    ordering holds (qemu-img check clean through the server) and it reads back as the source."""
    src = make_source(tmp, size="48M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x77 16M 20M", src)
    s = nbdkit(servers, tmp, "memory", "64M")
    r = run([INSTAR, "convert", "-O", "qcow2", "-o", "cluster_size=65536", src, s.url])
    assert (r.rc, r.out, r.err) == (0, "", ""), r
    assert qemu("check", s.url).rc == 0
    assert qemu("compare", src, s.url).rc == 0
    i = json.loads(qemu("info", "--output=json", s.url).out)
    assert (i["format"], i["virtual-size"]) == ("qcow2", 48 << 20)


def test_convert_n_into_a_json_target(tmp, servers):
    """convert -n with a json: target name (img_open_file: -O's format, raw by default, is the top driver and wins
    over the name's): raw over an nbd file node is written as qemu-img writes it; -O qcow2 over it, a top-level
    nbd node under the default raw, and a json: target without -n fail with qemu's messages."""
    src = make_source(tmp)
    target = os.path.join(tmp, "t.raw")
    with open(target, "wb") as f:
        f.truncate(64 << 20)
    s = qemu_nbd(servers, tmp, target, extra=("--shared=4",))
    raw = "json:" + json.dumps({"driver": "raw", "file": s.node()})
    top = "json:" + json.dumps(s.node())
    written = {}
    for tool in ("qemu", "instar"):
        with open(target, "r+b") as f:
            f.write(b"\xee" * (64 << 20))
        r = (qemu if tool == "qemu" else instar)("convert", "-n", src, raw)
        assert (r.rc, r.out, r.err) == (0, "", ""), r
        written[tool] = open(target, "rb").read()
    assert written["instar"] == written["qemu"]
    for args in (("-n", "-O", "qcow2", src, raw), ("-n", src, top), (src, raw)):
        r = assert_same("convert", *args)
        assert r.rc == 1, r


def test_source_read_error_mid_copy(tmp, servers):
    """A source export whose reads fail from one offset on: convert reads it on several threads (8 reads in
    flight, as qemu-img's coroutines) and reports each failed read of the chunks in flight, in guest order, as each
    of qemu's coroutines does; exit 1. The source is 8 chunks, all taken by qemu's 8 coroutines before any read
    ends, so which reads were in flight does not depend on timing. Reads fail from the third chunk on, then from
    the first."""
    data = os.path.join(tmp, "readerr.raw")
    with open(data, "wb") as f:
        for i in range(16):
            f.write(bytes([i + 1]) * (1 << 20))
    script = os.path.join(tmp, "readerr.sh")
    for bad in (5 << 20, 0):
        with open(script, "w") as f:
            f.write(f"""#!/bin/bash
case "$1" in
  get_size) echo {16 << 20} ;;
  can_write) exit 3 ;;
  pread)
    if [ $(( $4 + $3 )) -gt {bad} ]; then echo "EIO injected" >&2; exit 1; fi
    dd if={data} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none ;;
  *) exit 2 ;;
esac
""")
        os.chmod(script, 0o755)
        s = nbdkit(servers, tmp, "-r", "sh", script)
        outs = []
        for tool in ("q", "i"):
            out = os.path.join(tmp, f"readerr_{tool}.raw")
            argv = ["convert", "-f", "raw", "-O", "raw", s.url, out]
            outs.append(qemu(*argv) if tool == "q" else run([INSTAR, *argv]))
        q, i = outs
        # Every chunk from the bad one to the end fails: one line each.
        lines = q.err.splitlines()
        assert q.rc == 1 and len(lines) == (6 if bad else 8), q
        assert all(line.startswith("instar: error while reading at byte ") for line in lines), q
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (q, i)
        s.stop()
