"""The nbd driver's reconnect-delay and open-timeout, against qemu-img 7.2 doing the same: a server that dies in the
middle of a convert (reading the source, or writing the target with requests in flight) and comes back on the same
Unix socket within the delay (the copy completes with the right bytes), one that does not come back (qemu's error
and exit code once the delay has run out), and an open that waits for a server. The dying server is an nbdkit sh
script that kills its own nbdkit when a request reaches a given offset, so the drop always lands mid-request; the
test waits for it on a deadline and never sleeps a fixed time."""
import json
import os
import subprocess
import time

from conftest import INSTAR, run
from test_nbd import DEADLINE, Server, qemu_nbd, servers  # noqa: F401 (the fixture)

MIB = 1 << 20
QEMU_IMG = "qemu-img"


def _random_file(path, mib):
    with open(path, "wb") as f:
        f.write(os.urandom(mib * MIB))
    return path


def _dying_script(tmp, disk, trigger, writable):
    """An nbdkit sh plugin serving `disk` that kills its nbdkit (SIGKILL, the connection just drops) when a read
    (or, `writable`, a write) reaches `trigger`, leaving the request unanswered."""
    path = os.path.join(tmp, "dying.sh")
    kill = f'if [ "$4" -ge {trigger} ]; then kill -9 $PPID; exit 1; fi'
    with open(path, "w") as f:
        f.write(f"""#!/bin/sh
case "$1" in
  get_size) stat -c %s {disk} ;;
  pread) {kill if not writable else ''}
         dd if={disk} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  can_write) exit {0 if writable else 3} ;;
  pwrite) {kill if writable else ''}
          dd of={disk} seek=$4 oflag=seek_bytes conv=notrunc status=none ;;
  can_flush) exit 0 ;;
  flush) sync {disk} ;;
  can_trim|can_zero|can_extents|can_multi_conn|can_fast_zero) exit 3 ;;
  *) exit 2 ;;
esac
""")
    os.chmod(path, 0o755)
    return path


def _node(sock, **extra):
    return "json:" + json.dumps({"driver": "raw", "file": dict({"driver": "nbd", "server": {"type": "unix",
                                                                                          "path": sock}}, **extra)})


def _qemu_nbd_at(tmp, servers, sock, disk, writable=True):
    """qemu-nbd serving `disk` on the Unix socket `sock` (a name a client already uses), not waited for."""
    b = Server.__new__(Server)
    argv = ["qemu-nbd", "--persistent", "--shared=8", "-f", "raw", "-k", sock]
    if not writable:
        argv.append("-r")
    b.tmp, b.export, b.port, b.sock = tmp, None, None, sock
    b.log = open(os.path.join(tmp, f"back{len(servers)}.log"), "w+")
    b.proc = subprocess.Popen(argv + [disk], stdout=subprocess.DEVNULL, stderr=b.log)
    servers.append(b)
    return b


def _wait_exit(proc):
    proc.wait(timeout=DEADLINE)


def _run_through_drop(tmp, servers, argv_of, disk, trigger, writable, comes_back, delay):
    """Runs each tool's command (argv_of(tool, sock)) against a dying server on a fresh socket; when it has died,
    starts qemu-nbd on the same socket (comes_back) or not. Returns {tool: (rc, out, err)}."""
    results = {}
    original = open(disk, "rb").read()
    for tool in (QEMU_IMG, INSTAR):
        with open(disk, "wb") as f:
            f.write(original)
        s = Server(tmp, ["nbdkit", "-f", "sh", _dying_script(tmp, disk, trigger, writable)])
        servers.append(s)
        p = subprocess.Popen(argv_of(tool, s.sock), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_exit(s.proc)
        if comes_back:
            os.unlink(s.sock)
            b = _qemu_nbd_at(tmp, servers, s.sock, disk, writable)
        out, err = p.communicate(timeout=DEADLINE + delay)
        results[tool] = (p.returncode, out, err.replace(os.path.basename(tool) + ": ", "PROG: "),
                         open(disk, "rb").read())
        if comes_back:
            b.stop()
    return results


def test_read_source_across_a_restart(tmp, servers):
    """convert from an export whose server dies mid-read and is back within reconnect-delay: the read is sent
    again and the copy completes, the same bytes and output as qemu-img."""
    src = _random_file(os.path.join(tmp, "src.raw"), 4)

    def argv(tool, sock):
        return [tool, "convert", "-O", "raw", _node(sock, **{"reconnect-delay": 30}),
                os.path.join(tmp, os.path.basename(tool) + ".out")]
    r = _run_through_drop(tmp, servers, argv, src, 2 * MIB, writable=False, comes_back=True, delay=30)
    q, i = r[QEMU_IMG], r[INSTAR]
    assert q[:3] == (0, "", "") and i[:3] == q[:3], r
    for tool in (QEMU_IMG, INSTAR):
        assert open(os.path.join(tmp, os.path.basename(tool) + ".out"), "rb").read() == q[3]


def test_write_target_across_a_restart(tmp, servers):
    """convert -n into an export whose server dies with writes in flight (write-behind) and is back within
    reconnect-delay: the unanswered writes are sent again in order, the target ends equal to the source, as
    qemu-img's does."""
    src = _random_file(os.path.join(tmp, "src.raw"), 4)
    target = os.path.join(tmp, "target.raw")
    with open(target, "wb") as f:
        f.truncate(4 * MIB)

    def argv(tool, sock):
        return [tool, "convert", "-n", "-f", "raw", "-O", "raw", src, _node(sock, **{"reconnect-delay": 30})]
    r = _run_through_drop(tmp, servers, argv, target, 2 * MIB, writable=True, comes_back=True, delay=30)
    q, i = r[QEMU_IMG], r[INSTAR]
    assert q[:3] == (0, "", "") and i[:3] == q[:3], r
    assert i[3] == q[3] == open(src, "rb").read()


def test_server_that_does_not_come_back(tmp, servers):
    """The server dies and stays away: once reconnect-delay has run out the requests fail as qemu's do (its
    message, exit code 1), for a read of the source and for writes to the target."""
    src = _random_file(os.path.join(tmp, "src.raw"), 4)
    target = os.path.join(tmp, "target.raw")
    with open(target, "wb") as f:
        f.truncate(4 * MIB)

    def reader(tool, sock):
        return [tool, "convert", "-O", "raw", _node(sock, **{"reconnect-delay": 1}),
                os.path.join(tmp, "out.raw")]

    def writer(tool, sock):
        return [tool, "convert", "-n", "-f", "raw", "-O", "raw", src, _node(sock, **{"reconnect-delay": 1})]
    for argv, disk, writable in ((reader, src, False), (writer, target, True)):
        r = _run_through_drop(tmp, servers, argv, disk, 2 * MIB, writable=writable, comes_back=False, delay=1)
        q, i = r[QEMU_IMG], r[INSTAR]
        assert q[0] == 1 and q[1] == "" and q[2].endswith(": Input/output error\n"), q
        what = "reading" if not writable else "writing"
        assert q[2].startswith(f"PROG: error while {what} at byte "), q
        assert i[:2] == q[:2] and i[2].startswith(f"PROG: error while {what} at byte ") \
            and i[2].endswith(": Input/output error\n"), (q, i)


def test_open_timeout(tmp, servers):
    """open-timeout: with no server the open fails, after the timeout, with the last attempt's error as qemu's;
    an open that starts before its server does succeeds once the server listens."""
    sock = os.path.join(tmp, "late.sock")
    name = _node(sock, **{"open-timeout": 1})
    q = run([QEMU_IMG, "info", "--output=json", name])
    i = run([INSTAR, "info", "--output=json", name])
    assert q.rc == 1 and (i.rc, i.out, i.err.replace("instar: ", "qemu-img: ")) == (q.rc, q.out, q.err), (q, i)
    disk = _random_file(os.path.join(tmp, "late.raw"), 1)
    name = _node(sock, **{"open-timeout": 30})
    outs = {}
    for tool in (QEMU_IMG, INSTAR):
        p = subprocess.Popen([tool, "info", "--output=json", name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        b = _qemu_nbd_at(tmp, servers, sock, disk, writable=False)
        outs[tool] = (p.communicate(timeout=DEADLINE * 2), p.returncode)
        b.stop()
        assert outs[tool][1] == 0, outs
    assert outs[QEMU_IMG] == outs[INSTAR]


def test_json_numbers_as_qemu_reads_them(tmp):
    """qemu turns a JSON number of an nbd node into text as "%.17g" prints it: 2.0 and 1e0 are whole seconds,
    1.5 is refused where a number is expected, and a number where a string goes is that text. No server listens:
    the open fails at the connection, or before it."""
    sock = os.path.join(tmp, "nobody.sock")
    for extra in ('"reconnect-delay":1.5', '"reconnect-delay":2.0', '"open-timeout":1e0', '"export":1.5'):
        name = 'json:{"driver":"nbd","server":{"type":"unix","path":"%s"},%s}' % (sock, extra)
        q = run([QEMU_IMG, "info", name])
        i = run([INSTAR, "info", name])
        assert q.rc == 1 and (i.rc, i.out, i.err.replace("instar: ", "qemu-img: ")) == (q.rc, q.out, q.err), (q, i)
    name = 'json:{"driver":"nbd","server":{"type":"unix","path":1.5}}'
    q = run([QEMU_IMG, "info", name], cwd=tmp)
    i = run([INSTAR, "info", name], cwd=tmp)
    assert q.rc == 1 and (i.rc, i.err.replace("instar: ", "qemu-img: ")) == (q.rc, q.err), (q, i)
