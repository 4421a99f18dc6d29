"""The nbdkit plugin (plugins/nbdkit/instar.c, docs/nbdkit.md) against qemu-nbd serving the same image.

Each image is served side by side by `nbdkit nbdkit-instar-plugin.so` and by `qemu-nbd` on unix sockets; libnbd's
tools must see the same size (`nbdinfo --size`), the same extents (`nbdinfo --map`, base:allocation) and the same
bytes (`nbdcopy`), for raw, a qcow2 chain, vmdk, vhdx, vpc and a read-only format. Writing goes through both
servers alike: nbdcopy into a qcow2 (alone and over a backing file), and qemu-io's writes, zeroes (with and
without may-trim), trims, FUA writes and flushes into qcow2, vmdk, vhdx and vpc; the images must come out clean
(qemu-img check), with the same contents (qemu-img compare) and the same map.
"""
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import BUILD, ROOT, QemuNbd, check_clean, qemu, qemu_io, qimg, run
from imgs import chain, qcow2_image, sparse_raw

PLUGIN = os.path.join(BUILD, "lib", "nbdkit-instar-plugin.so")
SOURCE = os.path.join(ROOT, "plugins", "nbdkit", "instar.c")
START_SECONDS = 120

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("nbdkit", "nbdinfo", "nbdcopy", "qemu-nbd")),
                                reason="nbdkit, libnbd-bin (nbdinfo, nbdcopy) or qemu-nbd is not installed")


@pytest.fixture(scope="module")
def plugin():
    """The plugin `make` builds; built here from build/ when missing or older than its source."""
    if not os.path.exists(PLUGIN) or os.path.getmtime(PLUGIN) < max(os.path.getmtime(SOURCE),
                                                                    os.path.getmtime(os.path.join(BUILD, "lib", "libinstar.so"))):
        r = run(["make", "-s", "-C", ROOT, "nbdkit-plugin-only", f"OUT={BUILD}"])
        assert r.rc == 0, r
    return PLUGIN


class Nbdkit:
    """nbdkit with the plugin on a unix socket, in the foreground (--exit-with-parent). nbdkit writes its pid file
    once it listens, so start waits for that file on a deadline; stop ends it and waits for it to exit."""

    def __init__(self, plugin, image, *params, readonly=True, cwd=None, pass_fds=()):
        d = os.path.dirname(os.path.abspath(image))
        n = 0
        while os.path.exists(os.path.join(d, f"kit{n}.sock")):
            n += 1
        self.sock = os.path.join(d, f"kit{n}.sock")
        pidfile = os.path.join(d, f"kit{n}.pid")
        argv = ["nbdkit", "--exit-with-parent", "-U", self.sock, "-P", pidfile, *(["-r"] if readonly else []),
                plugin, image, *params]
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     pass_fds=pass_fds)
        end = time.monotonic() + START_SECONDS
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0):
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"nbdkit exited {self.proc.returncode}: {err}")
            assert time.monotonic() < end, f"nbdkit did not listen within {START_SECONDS}s"
            time.sleep(0.01)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=START_SECONDS)
        return err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def nbd_view(sock, tmp, name):
    """What libnbd's tools see of an export: size, map of base:allocation, and the bytes (copied to a file)."""
    size = run(["nbdinfo", "--size", uri(sock)])
    assert size.rc == 0, size
    extents = run(["nbdinfo", "--map", uri(sock)])
    assert extents.rc == 0, extents
    out = os.path.join(tmp, name)
    copy = run(["nbdcopy", uri(sock), out])
    assert copy.rc == 0, copy
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return size.out, extents.out, data


def assert_served_alike(plugin, tmp, image, fmt, kit_params=(), nbd_name=None, nbd_extra=()):
    with QemuNbd(nbd_name or image, fmt, cwd=tmp, extra=("-r", "-t", "-e", "8", *nbd_extra)) as q:
        want = nbd_view(q.sock, tmp, "q.out")
    with Nbdkit(plugin, image, *kit_params, cwd=tmp) as k:
        got = nbd_view(k.sock, tmp, "k.out")
    assert got[0] == want[0], (got[0], want[0])
    assert got[1] == want[1], f"nbdinfo --map\n qemu-nbd:\n{want[1]}\n nbdkit:\n{got[1]}"
    assert got[2] == want[2], "nbdcopy bytes differ"
    return want


def guest_map(path):
    """`qemu-img map --output=json` without host offsets, neighbours of one kind merged: nbdcopy writes through
    several connections at once, so which cluster lands where in the file differs from run to run."""
    m = qemu("map", "--output=json", path)
    assert m.rc == 0, m
    out = []
    for e in json.loads(m.out):
        kind = (e["depth"], e["present"], e["zero"], e["data"])
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], kind)
        else:
            out.append((e["start"], e["length"], kind))
    return out


def _raw(tmp):
    return sparse_raw(tmp), "raw"


def _qcow2_chain(tmp):
    return chain(tmp)[2], "qcow2"


def _converted(fmt, opts=""):
    def make(tmp):
        q, _ = qcow2_image(tmp)
        out = os.path.join(tmp, "img." + fmt)
        qimg("convert", "-O", fmt, *(["-o", opts] if opts else []), q, out)
        qemu_io("-f", fmt, "-c", "write -P 0x66 2M 70000", "-c", "write -z 3M 512k", out)
        return out, fmt
    return make


IMAGES = {
    "raw": _raw,
    "qcow2-chain": _qcow2_chain,
    "vmdk": _converted("vmdk"),
    "vhdx": _converted("vhdx"),
    "vpc": _converted("vpc"),
}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_served_like_qemu_nbd(plugin, tmp, kind):
    image, fmt = IMAGES[kind](tmp)
    assert_served_alike(plugin, tmp, image, fmt, kit_params=(f"format={fmt}",))


def test_probed_format_and_no_backing(plugin, tmp):
    """Without format= the plugin probes as qemu does; backing=false serves the top layer alone, as qemu-nbd
    serves a qcow2 whose backing is null."""
    top = chain(tmp)[2]
    assert_served_alike(plugin, tmp, top, "qcow2")
    assert_served_alike(plugin, tmp, top, "qcow2", kit_params=("backing=false",),
                        nbd_name=f'json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{top}"}}}}')


@pytest.mark.parametrize("backing", [False, True])
def test_write_through_plugin(plugin, tmp, backing):
    """nbdcopy into a qcow2 served writable (zeroes as zero requests, data as writes), over a backing file or not:
    the image is clean and holds what was copied; the same copy through qemu-nbd leaves the same map."""
    src = sparse_raw(tmp, size=4 << 20)
    maps = []
    for server in ("qemu", "kit"):
        dst = os.path.join(tmp, f"{server}.qcow2")
        if backing:
            base = os.path.join(tmp, "base.qcow2")
            if not os.path.exists(base):
                qimg("create", "-q", "-f", "qcow2", base, "4M")
                qemu_io("-f", "qcow2", "-c", "write -P 0x77 0 4M", base)
            qimg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", dst)
        else:
            qimg("create", "-q", "-f", "qcow2", dst, "4M")
        if server == "qemu":
            ctx = QemuNbd(dst, "qcow2", cwd=tmp, extra=("-t", "-e", "8"))
        else:
            ctx = Nbdkit(plugin, dst, "format=qcow2", readonly=False, cwd=tmp)
        with ctx as s:
            r = run(["nbdcopy", src, uri(s.sock)])
            assert r.rc == 0, r
        check_clean(dst)
        c = qemu("compare", "-f", "raw", "-F", "qcow2", src, dst)
        assert c.rc == 0, c
        maps.append(guest_map(dst))
    assert maps[1] == maps[0], f"qemu-img map after nbdcopy\n qemu-nbd:\n{maps[0]}\n nbdkit:\n{maps[1]}"


def test_errors_and_readonly_parameter(plugin, tmp):
    """A missing image fails at start-up with the library's message; readonly=true refuses writes."""
    p = subprocess.run(["nbdkit", "--exit-with-parent", "-U", os.path.join(tmp, "x.sock"), plugin,
                        os.path.join(tmp, "missing.qcow2")], capture_output=True, text=True, timeout=START_SECONDS)
    assert p.returncode != 0 and "No such file or directory" in p.stderr, p
    img = os.path.join(tmp, "a.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "1M")
    with Nbdkit(plugin, img, "readonly=true", readonly=False, cwd=tmp) as k:
        r = run(["nbdinfo", "--can", "write", uri(k.sock)])
        assert r.rc == 2, r  # nbdinfo --can exits 2 when the server cannot
        r = run(["nbdinfo", "--can", "multi-conn", uri(k.sock)])
        assert r.rc == 0, r


def test_python_block_status_is_base_allocation(tmp):
    """instar.Image.block_status (instar_block_status) walked over a chain gives qemu-nbd's base:allocation."""

    import instar
    top = chain(tmp)[2]
    with QemuNbd(top, "qcow2", cwd=tmp, extra=("-r", "-t")) as q:
        r = run(["nbdinfo", "--map", "--json", uri(q.sock)])
        assert r.rc == 0, r
    want = [(e["offset"], e["length"], e["type"]) for e in json.loads(r.out)]
    got = []
    with instar.Image(top) as img:
        off = 0
        while off < img.size:
            s = img.block_status(off, img.size - off)
            kind = (0 if s.data else 1) | (2 if s.zero else 0)
            if got and got[-1][2] == kind:
                got[-1] = (got[-1][0], got[-1][1] + s.length, kind)
            else:
                got.append((off, s.length, kind))
            off += s.length
        assert s.eof
        with pytest.raises(instar.OutOfRange):
            img.block_status(img.size, 1)
    assert got == want


# Writes, zero requests (with and without may-trim), trims, FUA writes and flushes as qemu-io sends them over NBD.
NBD_WRITES = ["write -P 0x11 0 100k", "write -z 192k 128k", "write -z -u 512k 256k", "discard 1M 128k",
              "write -f -P 0x22 1100k 4k", "write -P 0x33 3M 65k", "flush", "write -z -u 3M 64k", "discard 2560k 64k",
              "flush"]


@pytest.mark.parametrize("fmt,backing", [("qcow2", False), ("qcow2", True), ("vmdk", False), ("vhdx", False),
                                         ("vpc", False)])
def test_zero_trim_flush_like_qemu_nbd(plugin, tmp, fmt, backing):
    """The same NBD requests through the plugin and through qemu-nbd (--discard=unmap: it honours trims and
    may-trim zeroes as the plugin does) leave qcow2 images with the same contents and the same map, both clean."""
    base = os.path.join(tmp, "base.qcow2")
    if backing:
        qimg("create", "-q", "-f", "qcow2", base, "4M")
        qemu_io("-f", "qcow2", "-c", "write -P 0x77 0 4M", base)
    maps = []
    for server in ("qemu", "kit"):
        dst = os.path.join(tmp, f"{server}.{fmt}")
        qimg("create", "-q", "-f", fmt, *(["-b", base, "-F", "qcow2"] if backing else []), dst, "4M")
        if server == "qemu":
            ctx = QemuNbd(dst, fmt, cwd=tmp, extra=("-t", "--discard=unmap"))
        else:
            ctx = Nbdkit(plugin, dst, readonly=False, cwd=tmp)
        with ctx as s:
            args = ["qemu-io", "-f", "raw"]
            for c in NBD_WRITES:
                args += ["-c", c]
            r = run([*args, uri(s.sock)])
            assert r.rc == 0 and "error" not in r.out.lower(), r
        if fmt != "vpc":  # qemu-img check: "This image format does not support checks"
            check_clean(dst)
        m = qemu("map", "--output=json", dst)
        assert m.rc == 0, m
        maps.append(m.out.replace(dst, "DST"))
    c = qemu("compare", "-f", fmt, "-F", fmt, os.path.join(tmp, f"qemu.{fmt}"), os.path.join(tmp, f"kit.{fmt}"))
    assert c.rc == 0, c
    assert maps[1] == maps[0], f"qemu-img map after the same requests\n qemu-nbd:\n{maps[0]}\n nbdkit:\n{maps[1]}"


def test_read_only_format_served_read_only(plugin, tmp):
    """A format instar only reads (bochs) is served read-only even without -r, with qemu-nbd's size, extents
    and bytes."""
    from readonly_images import bochs_image, guest_pattern, write
    img = write(os.path.join(tmp, "r.bochs"), bochs_image(guest_pattern(256 << 10)))
    with QemuNbd(img, "bochs", cwd=tmp, extra=("-r", "-t")) as q:
        want = nbd_view(q.sock, tmp, "q.out")
    with Nbdkit(plugin, img, readonly=False, cwd=tmp) as k:
        got = nbd_view(k.sock, tmp, "k.out")
        r = run(["nbdinfo", "--can", "write", uri(k.sock)])
        assert r.rc == 2, r
    assert got == want


PASSPHRASE = "instar-nbdkit-pw"


def _encrypted(tmp, fmt):
    """A 4 MiB LUKS image or LUKS-encrypted qcow2 (small iter-time: fast to open) with data, explicit zeroes and a
    hole, and the --image-opts string that opens it with the secret `sec0`."""
    img = os.path.join(tmp, f"enc.{fmt}")
    secret = ("--object", f"secret,id=sec0,data={PASSPHRASE}")
    if fmt == "luks":
        qimg("create", "-q", *secret, "-f", "luks", "-o", "key-secret=sec0,iter-time=10", img, "4M")
        opts = f"driver=luks,key-secret=sec0,file.filename={img}"
    else:
        qimg("create", "-q", *secret, "-f", "qcow2", "-o",
             "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", img, "4M")
        opts = f"driver=qcow2,encrypt.key-secret=sec0,file.filename={img}"
    qemu_io(*secret, "--image-opts", "-c", "write -P 0x5a 64k 200k", "-c", "write -z 1M 64k",
            "-c", "write -P 0xa5 3M 4k", opts)
    return img, opts, secret


class QemuNbdImageOpts(QemuNbd):
    """qemu-nbd serving --image-opts OPTS with --object definitions (read-only, like assert_served_alike's)."""

    def __init__(self, opts, objects, cwd):
        n = 0
        while os.path.exists(os.path.join(cwd, f"nbd{n}.sock")):
            n += 1
        self.sock = os.path.join(cwd, f"nbd{n}.sock")
        pidfile = os.path.join(cwd, f"nbd{n}.pid")
        r = run(["qemu-nbd", "--fork", "--pid-file", pidfile, "-k", self.sock, "-r", "-t", "-e", "8", *objects,
                 "--image-opts", opts], cwd=cwd)
        assert r.rc == 0, r
        with open(pidfile) as f:
            self.pid = int(f.read().strip())


def test_encrypted_image_password_forms(plugin, tmp):
    """password= unlocks a LUKS image and a LUKS-encrypted qcow2: served with the size, extents and bytes of
    qemu-nbd --object secret,... --image-opts on the same image, for nbdkit's password forms (the passphrase
    itself, +FILE, -FD); a wrong passphrase stops nbdkit at start-up with the library's message. qemu-img's
    LUKS creation benchmarks PBKDF2 for a fixed CPU time whatever iter-time says: both images are made at once."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda fmt: (fmt, *_encrypted(tmp, fmt)), ["luks", "qcow2"]))
    for fmt, img, opts, secret in made:
        _check_password_forms(plugin, tmp, fmt, img, opts, secret)


def _check_password_forms(plugin, tmp, fmt, img, opts, secret):
    """One encrypted image through qemu-nbd and through the plugin with each password form, then a wrong one."""
    with QemuNbdImageOpts(opts, secret, tmp) as q:
        want = nbd_view(q.sock, tmp, "q.out")
    assert want[2][64 << 10:(64 << 10) + 4] == b"\x5a" * 4
    pwfile = os.path.join(tmp, "pw.txt")
    with open(pwfile, "w") as f:
        f.write(PASSPHRASE + "\n")  # nbdkit drops the trailing newline of a +FILE password
    forms = [(f"password={PASSPHRASE}", None), (f"password=+{pwfile}", None)]
    r_fd, w_fd = os.pipe()
    os.write(w_fd, PASSPHRASE.encode())
    os.close(w_fd)
    forms.append((f"password=-{r_fd}", r_fd))
    for param, fd in forms:
        k = Nbdkit(plugin, img, f"format={fmt}", param, cwd=tmp, pass_fds=(fd,) if fd is not None else ())
        with k:
            got = nbd_view(k.sock, tmp, "k.out")
        assert got[0] == want[0], (param, got[0], want[0])
        assert got[1] == want[1], f"{param}: nbdinfo --map\n qemu-nbd:\n{want[1]}\n nbdkit:\n{got[1]}"
        assert got[2] == want[2], f"{param}: nbdcopy bytes differ"
    os.close(r_fd)
    # A wrong passphrase: nbdkit does not start, and says why (qemu's words for the image).
    q = run(["qemu-io", "--object", "secret,id=sec0,data=wrong", "--image-opts", "-c", "read 0 512", opts])
    assert q.rc == 1 and q.err.startswith("qemu-io: can't open: "), q
    reason = q.err.strip().split(": ")[-1]
    p = subprocess.run(["nbdkit", "--exit-with-parent", "-U", os.path.join(tmp, "bad.sock"), plugin, img,
                        f"format={fmt}", "password=wrong"], capture_output=True, text=True, timeout=START_SECONDS)
    assert p.returncode != 0 and reason in p.stderr, (reason, p)
    assert not os.path.exists(os.path.join(tmp, "bad.sock"))
