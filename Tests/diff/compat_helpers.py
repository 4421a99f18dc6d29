"""Helpers of the drop-in tests (test_compat_*.py): images made alike in two folders, outcomes compared once
one folder's paths read as the other's, and oslo.utils / oslo.concurrency for the Nova and Cinder references."""
import fcntl
import os
import random
import shutil
import struct
import subprocess
import sys

from conftest import BUILD, info_json, qemu, qemu_io, qimg

MiB = 1 << 20

# The references of test_compat_nova/cinder run qemu-img through oslo.concurrency's processutils.execute and
# read it with oslo.utils' QemuImgInfo, as Nova and Cinder do. Where they are not importable they are installed
# from PyPI (pinned; the version of Tests/consumers/requirements.txt) into build/compat-deps, once.
OSLO_PINS = ["oslo.utils==10.2.0", "oslo.concurrency==7.6.1"]


def ensure_oslo():
    try:
        import oslo_concurrency.processutils  # noqa: F401
        import oslo_utils.imageutils  # noqa: F401
        return
    except ImportError:
        pass
    target = os.path.join(BUILD, "compat-deps")
    stamp = os.path.join(target, ".ready-" + "-".join(OSLO_PINS))
    os.makedirs(BUILD, exist_ok=True)
    with open(os.path.join(BUILD, ".compat-deps.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two xdist workers may get here at once
        if not os.path.exists(stamp):
            part = target + ".part"
            subprocess.run(["rm", "-rf", part, target], check=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "--target", part, *OSLO_PINS], check=True, timeout=900)
            os.rename(part, target)
            open(stamp, "w").close()
    if target not in sys.path:
        sys.path.append(target)  # after everything else: its copies never shadow the system's packages


def mk_qcow2(d, name="q.qcow2", size="4M", opts="compat=1.1", writes=True, backing=None, backing_fmt=None):
    p = os.path.join(d, name)
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing, "-F", backing_fmt]
    qimg(*args, p, *([size] if size else []))
    if writes:
        qemu_io("-f", "qcow2", "-c", "write -P 0x11 1000 70000", "-c", "write -z 196608 131072",
                "-c", "write -P 0x22 1M 512k", p)
    return p


def mk_raw(d, name="r.raw", size=3 * MiB):
    """A sparse raw file; the same bytes every time (the two folders of a Pair must start alike)."""
    rnd = random.Random(name)
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.truncate(size)
        f.seek(5000)
        f.write(bytes(rnd.getrandbits(8) for _ in range(3000)))
        f.seek(MiB + 17)
        f.write(bytes(rnd.getrandbits(8) for _ in range(100000)))
    return p


class Pair:
    """Two folders made alike by `setup(folder)`: qemu-img (VDSM's way) works in q/, instar.compat.vdsm in i/."""

    def __init__(self, tmp, setup, outcome):
        self.outcome = outcome
        self.q, self.i = os.path.join(tmp, "q"), os.path.join(tmp, "i")
        for d in (self.q, self.i):
            os.mkdir(d)
            setup(d)

    def run(self, ref, ours, *names, **kw):
        """ref(*paths in q/, **kw) and ours(*paths in i/, **kw); outcomes must match once i/ reads as q/."""
        q = self.outcome(ref, *[os.path.join(self.q, n) for n in names], **kw)
        i = self.outcome(ours, *[os.path.join(self.i, n) for n in names], **kw)
        assert _swap(i, self.i, self.q) == q, "\n qemu-img (the original's way): %r\n instar.compat: %r" % (q, i)
        return q

    def assert_alike(self, name, byte_equal=False, check=True):
        qp, ip = os.path.join(self.q, name), os.path.join(self.i, name)
        assert os.path.exists(qp) == os.path.exists(ip)
        if not os.path.exists(qp):
            return
        qi, ii = info_json(qp), _swap(info_json(ip), self.i, self.q)
        for d in (qi, ii):
            d.pop("full-backing-filename", None)
        assert ii == qi
        r = qemu("compare", qp, ip)
        # (an image whose backing file is missing opens in neither: its bytes are compared below)
        assert r.rc == 0 or (r.rc == 2 and "backing" in str(qi)), r
        if check and qi["format"] == "qcow2" and r.rc == 0:
            r = qemu("check", ip)
            assert r.rc == 0, r
        if byte_equal:
            # (a backing file named by its absolute path names the other folder, of the same length)
            with open(qp, "rb") as a, open(ip, "rb") as b:
                assert _swap(b.read(), self.i, self.q) == a.read()


def _swap(v, a, b):
    if isinstance(v, str):
        return v.replace(a, b)
    if isinstance(v, bytes):
        return v.replace(a.encode(), b.encode())
    if isinstance(v, (list, tuple)):
        return type(v)(_swap(x, a, b) for x in v)
    if isinstance(v, dict):
        return {k: _swap(x, a, b) for k, x in v.items()}
    return v


def leak_one_cluster(path):
    """Grows the qcow2 file by a cluster and marks it used in the refcounts (a leak qemu-img check reports)."""
    with open(path, "r+b") as f:
        hdr = f.read(104)
        cs = 1 << struct.unpack(">I", hdr[20:24])[0]
        f.seek(struct.unpack(">Q", hdr[48:56])[0])
        refblock = struct.unpack(">Q", f.read(8))[0]
        n = (os.path.getsize(path) + cs - 1) // cs
        f.truncate((n + 1) * cs)
        f.seek(refblock + n * 2)
        f.write(struct.pack(">H", 1))


def zero_l1_refcount(path):
    """Sets the refcount of the L1 table's cluster to 0 (a corruption)."""
    with open(path, "r+b") as f:
        hdr = f.read(104)
        cs = 1 << struct.unpack(">I", hdr[20:24])[0]
        l1 = struct.unpack(">Q", hdr[40:48])[0]
        f.seek(struct.unpack(">Q", hdr[48:56])[0])
        refblock = struct.unpack(">Q", f.read(8))[0]
        f.seek(refblock + (l1 // cs) * 2)
        f.write(struct.pack(">H", 0))


def masked_luks_info(d):
    """info JSON without what LUKS creation draws at random or times (uuid, PBKDF iteration counts)."""
    data = d.get("format-specific", {}).get("data", {})
    for spec in (data, data.get("encrypt", {})):
        for k in ("uuid", "master-key-iters"):
            if k in spec:
                spec[k] = "*"
        for s in spec.get("slots", []):
            if "iters" in s:
                s["iters"] = "*"
    return d


def assert_alike_encrypted(pair, name, secret):
    """Pair.assert_alike for encrypted images (qcow2 with LUKS, luks): the same info but for LUKS's random fields,
    identical guest contents by `qemu-img compare --object secret`, and a clean check."""
    qp, ip = os.path.join(pair.q, name), os.path.join(pair.i, name)
    assert os.path.exists(qp) == os.path.exists(ip)
    if not os.path.exists(qp):
        return
    qi, ii = masked_luks_info(info_json(qp)), masked_luks_info(info_json(ip))
    assert ii == qi
    fmt = qi["format"]
    key = "encrypt.key-secret" if fmt == "qcow2" else "key-secret"
    obj = ["--object", "secret,id=s0,data=%s" % secret]
    r = qemu("compare", *obj, "--image-opts", "driver=%s,file.filename=%s,%s=s0" % (fmt, qp, key),
             "driver=%s,file.filename=%s,%s=s0" % (fmt, ip, key))
    assert r.rc == 0 and r.out == "Images are identical.\n", r
    if fmt == "qcow2":
        r = qemu("check", *obj, "--image-opts", "driver=qcow2,file.filename=%s,encrypt.key-secret=s0" % ip)
        assert r.rc == 0, r


def make_encrypted_sources(d, passphrase):
    """e.luks and e.qcow2 (LUKS, `passphrase`, a 10 ms PBKDF) holding the same guest data, written all over (what
    a LUKS container never had written reads as its own key's noise). Made once per test file and copied into
    each folder (`copy_encrypted_sources`): creating LUKS costs qemu's PBKDF benchmark every time."""
    obj = "secret,id=s0,data=" + passphrase
    for name, fmt, opts, key in (("e.luks", "luks", "key-secret=s0,iter-time=10", "key-secret"),
                                 ("e.qcow2", "qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                                  "encrypt.key-secret")):
        p = os.path.join(d, name)
        qimg("create", "-q", "--object", obj, "-f", fmt, "-o", opts, p, "3M")
        qemu_io("--object", obj, "--image-opts", "driver=%s,file.filename=%s,%s=s0" % (fmt, p, key),
                "-c", "write -P 0x33 0 3M", "-c", "write -P 0x11 1000 70000", "-c", "write -z 2M 512k")
    return d


def copy_encrypted_sources(src, d):
    for name in ("e.luks", "e.qcow2"):
        shutil.copyfile(os.path.join(src, name), os.path.join(d, name))
