"""Concurrency of the C API (issue 14): Tests/concurrency/stress.c runs THREADS threads of mixed calls at once, on
handles of their own, on one shared read-only handle and on one shared writable handle, plus error paths and a
convert cancelled from another thread (see the driver's header). The images come from qemu-img/qemu-io here; the
driver checks every read against qemu-img's guest bytes and every other result against the same call made
single-threaded; this test then checks what the threads left behind with qemu-img (compare, check, qemu-io read -P).

`make test` builds the driver without sanitizer against build/lib/libinstar.so. `make tsan`
(Tests/concurrency/tsan.sh) runs this same file with INSTAR_STRESS_EXE set to the driver built together with the
engine under ThreadSanitizer (and more iterations): any ThreadSanitizer report fails it."""
import os
import struct

from conftest import LIBINSTAR, ROOT, qemu_io, qimg, run

SOURCE = os.path.join(ROOT, "Tests", "concurrency", "stress.c")
THREADS = int(os.environ.get("STRESS_THREADS", "8"))
ITERS = int(os.environ.get("STRESS_ITERS", "18"))
SECRET = "stress-secret"
OBJ = f"secret,id=sec0,data={SECRET}"
CHUNK, SLOTS = 65536, 4  # stress.c's SHARED_CHUNK and SHARED_SLOTS


def make_images(d):
    p = lambda n: os.path.join(d, n)  # noqa: E731
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p("base.qcow2"), "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 512k", p("base.qcow2"))
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", p("top.qcow2"))
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 512k 1M", "-c", "write -z 2M 64k", "-c", "write -P 0x34 3M 5k",
            p("top.qcow2"))
    qimg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", p("top.qcow2"), p("comp.qcow2"))
    qimg("convert", "-O", "vmdk", p("top.qcow2"), p("d.vmdk"))
    qimg("create", "-q", "-f", "vhdx", "-o", "block_size=1M,log_size=1M", p("d.vhdx"), "4M")
    qemu_io("-f", "vhdx", "-c", "write -P 0x44 0 700k", "-c", "write -P 0x45 3M 4k", p("d.vhdx"))
    qimg("create", "-q", "--object", OBJ, "-f", "luks", "-o", "key-secret=sec0,iter-time=10", p("d.luks"), "1M")
    luks = ["--object", OBJ, "--image-opts", f"driver=luks,key-secret=sec0,file.filename={p('d.luks')}"]
    qemu_io(*luks, "-c", "write -P 0x55 64k 256k")
    for fmt in ("qed", "vdi", "vpc", "parallels"):
        qimg("convert", "-O", fmt, p("top.qcow2"), p("d." + fmt))
    for n in ("top.qcow2", "comp.qcow2", "d.vmdk", "d.vhdx", "d.qed", "d.vdi", "d.vpc", "d.parallels"):
        qimg("convert", "-O", "raw", p(n), p(n + ".raw"))
    qimg("convert", "-O", "raw", *luks, p("d.luks.raw"))
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p("snap.qcow2"), "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x66 0 64k", p("snap.qcow2"))
    qimg("snapshot", "-c", "s1", p("snap.qcow2"))
    qimg("snapshot", "-c", "s2", p("snap.qcow2"))
    # Hostile: an L1 table of 2^31-1 entries.
    qimg("create", "-q", "-f", "qcow2", p("hostile.qcow2"), "1M")
    with open(p("hostile.qcow2"), "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">I", 0x7FFFFFFF))
    # Its L1 table (4 MiB) is more than the driver's memory limit (1 MiB).
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p("limit.qcow2"), "1T")
    # The convert the canceller stops: big enough for progress reports between 0% and 100%.
    qimg("create", "-q", "-f", "qcow2", p("cancel.qcow2"), "8M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x77 0 8M", p("cancel.qcow2"))
    qimg("create", "-q", "-f", "qcow2", p("shared-rw.qcow2"), "16M")
    os.mkdir(p("out"))


def driver(tmp):
    exe = os.environ.get("INSTAR_STRESS_EXE")
    if exe:
        return exe
    exe = os.path.join(tmp, "stress")
    r = run(["cc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-pthread", "-I", os.path.join(ROOT, "include"),
             SOURCE, "-L", os.path.dirname(LIBINSTAR), "-linstar", "-Wl,-rpath," + os.path.dirname(LIBINSTAR),
             "-o", exe])
    assert r.rc == 0, r
    return exe


def test_threads_mixed_calls(tmp):
    d = os.path.join(tmp, "imgs")
    os.mkdir(d)
    make_images(d)
    # The isolated mode's helper: the release build's (beside libinstar.so; the TSan driver is elsewhere).
    env = dict(os.environ, INSTAR_HELPER=os.path.join(os.path.dirname(os.path.dirname(LIBINSTAR)), "libexec",
                                                      "instar-isolate"))
    r = run([driver(tmp), d, str(THREADS), str(ITERS)], timeout=3600, env=env)
    print(r.out.splitlines()[-1] if r.out else "", r.err[-4000:])
    assert "WARNING: ThreadSanitizer" not in r.err and "ERROR: ThreadSanitizer" not in r.err, r.err[-20000:]
    assert r.rc == 0 and r.out.splitlines()[-1].endswith(", 0 failed"), r
    assert not [line for line in r.out.splitlines() if line.startswith("FAIL")]
    out = os.path.join(d, "out")
    left = sorted(os.listdir(out))
    # Converted outputs equal their sources by qemu-img compare; new images are clean and 2 MiB; cancelled
    # converts left nothing.
    own = ("-new.qcow2", "-bench.raw", "-base.qcow2", "-top.qcow2", "-dd.raw")
    converted = [n for n in left if not n.endswith(own)]
    assert converted and not [n for n in left if "cancelled" in n], left
    for n in converted:
        src = n.split("-", 1)[1].rsplit(".", 1)[0]
        if src == "d.luks":  # --image-opts makes both names option strings
            fmt = n.rsplit(".", 1)[1]
            args = ["--object", OBJ, "--image-opts", f"driver=luks,key-secret=sec0,file.filename={d}/d.luks",
                    f"driver={fmt},file.filename={os.path.join(out, n)}"]
        else:
            args = [os.path.join(d, src), os.path.join(out, n)]
        c = run(["qemu-img", "compare", *args])
        assert c.rc == 0, (n, c)
    new = [n for n in left if n.endswith("-new.qcow2")]
    assert new
    for n in new:
        c = run(["qemu-img", "check", os.path.join(out, n)])
        assert c.rc == 0, (n, c)
        i = run(["qemu-img", "info", "--output=json", os.path.join(out, n)])
        assert '"virtual-size": 2097152' in i.out, i
    # Each thread's own chain after commit, rebase and amend: clean, standalone, the dd copy equals the base.
    for n in [n for n in left if n.endswith("-base.qcow2")]:
        base, top = os.path.join(out, n), os.path.join(out, n.replace("-base", "-top"))
        for img in (base, top):
            c = run(["qemu-img", "check", img])
            assert c.rc == 0, (img, c)
        assert '"backing-filename"' not in run(["qemu-img", "info", "--output=json", top]).out
        assert '"lazy-refcounts": true' in run(["qemu-img", "info", "--output=json", base]).out
        c = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", base, base.replace("-base.qcow2", "-dd.raw")])
        assert c.rc == 0, c
        c = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", base, top])
        assert c.rc == 0, c
    # The shared writable image: clean, and every thread's chunks hold its patterns (what the last write left).
    shared = os.path.join(d, "shared-rw.qcow2")
    c = run(["qemu-img", "check", shared])
    assert c.rc == 0, c
    cmds = []
    for t in range(THREADS):
        for s in range(min(SLOTS, ITERS)):
            cmds += ["-c", f"read -P {(0x80 + t * 4 + s) & 0xff} {(t * SLOTS + s) * CHUNK} {CHUNK}"]
    cmds += ["-c", f"read -P 0 {THREADS * SLOTS * CHUNK} {16 * 2**20 - THREADS * SLOTS * CHUNK}"]
    r = run(["qemu-io", "-f", "qcow2", *cmds, shared])
    assert r.rc == 0 and "Pattern verification failed" not in r.out and "failed" not in r.err, r


def test_close_drops_locks_a_child_inherited(tmp):
    """A child forked while an image is open holds a copy of its descriptor (until it execs, for a spawned
    program: another thread's posix_spawn of the isolated helper, or a host's subprocess); closing the image must
    still release its locks, so the image can be opened for writing again at once, here and by qemu-img. The
    driver above found this: a thread reopening its own image failed with 'Failed to get "write" lock'."""
    import instar
    p = os.path.join(tmp, "a.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "1M")
    img = instar.Image(p, format="qcow2", flags=instar.OPEN_READ_WRITE)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: holds every descriptor of the parent until the parent lets it go
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    try:
        os.close(r)
        img.close()
        with instar.Image(p, format="qcow2", flags=instar.OPEN_READ_WRITE) as again:
            again.write(0, b"\x5a" * 512)
        q = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 4096 512", p])
        assert q.rc == 0 and "lock" not in q.err, q
    finally:
        os.close(w)
        os.waitpid(pid, 0)
    q = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 512", "-c", "read -P 0xa5 4096 512", p])
    assert q.rc == 0 and "verification failed" not in q.out, q
