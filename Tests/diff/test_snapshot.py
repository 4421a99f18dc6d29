"""snapshot: differential tests against qemu-img 7.2 for internal snapshots (-l, -c, -a, -d), their messages and
exit codes, and the files both tools leave: byte-identical once the creation times are masked, `qemu-img
check` clean, the same `info` and the same guest data in every snapshot. Also: crashes at every step of create,
apply and delete (SIGKILL through INSTAR_CRASH_AT), damaged snapshot tables under a 1 GiB address-space limit,
and the C API and Python binding."""
import json
import os
import resource
import shutil
import signal
import struct
import subprocess

import pytest

from conftest import INSTAR, LIBINSTAR, ROOT, instar, qemu, qemu_io, qimg, run

MiB = 1 << 20


def snapshot_table_dates_masked(path):
    """The file's bytes with each snapshot's date_sec/date_nsec zeroed (the two tools run at different times)."""
    data = bytearray(open(path, "rb").read())
    count, off = struct.unpack(">IQ", data[60:72])
    for _ in range(count):
        off = (off + 7) & ~7
        _, _, ids, ns, _, _, _, _, extra = struct.unpack(">QIHHIIQII", data[off:off + 40])
        data[off + 16:off + 24] = bytes(8)
        off += 40 + extra + ids + ns
    return bytes(data)


def info_normalised(path, *extra):
    r = qemu("info", "--output=json", "-U", *extra, path)
    assert r.rc == 0, r
    d = json.loads(r.out)
    for k in ("filename", "actual-size"):
        d.pop(k, None)
    for s in d.get("snapshots", []):
        s["date-sec"] = s["date-nsec"] = 0
    return d


def check_no_corruption(path, allow_leaks=False):
    r = qemu("check", "--output=json", path)
    d = json.loads(r.out)
    assert d.get("corruptions", 0) == 0 and d.get("check-errors", 0) == 0, (r, d)
    if not allow_leaks:
        assert r.rc == 0 and d.get("leaks", 0) == 0, d
    return d


def snapshot_ids(path):
    d = info_normalised(path)
    return [(s["id"], s["name"]) for s in d.get("snapshots", [])]


class Twin:
    """One image as two copies, q (changed by qemu-img) and i (changed by instar)."""

    def __init__(self, tmp, src):
        self.tmp = tmp
        self.q = os.path.join(tmp, "q.qcow2")
        self.i = os.path.join(tmp, "i.qcow2")
        shutil.copyfile(src, self.q)
        shutil.copyfile(src, self.i)
        # Once a step failed half-way (as qemu's do, e.g. on refcount overflow), both files keep its leaks.
        self.leaky = False

    def step(self, *args, identical=True):
        """Runs `snapshot ARGS IMG` with both tools; output, exit code and the resulting files must agree."""
        q = qemu("snapshot", *args, self.q, cwd=self.tmp)
        i = instar("snapshot", *args, self.i, cwd=self.tmp)
        assert (i.rc, i.out, i.err.replace(self.i, self.q)) == (q.rc, q.out, q.err), (args, q, i)
        if identical:
            assert snapshot_table_dates_masked(self.i) == snapshot_table_dates_masked(self.q), args
        self.leaky = self.leaky or q.rc != 0
        check_no_corruption(self.i, allow_leaks=self.leaky)
        assert info_normalised(self.i) == info_normalised(self.q)
        return q

    def io(self, cmd):
        for p in (self.q, self.i):
            qemu_io("-f", "qcow2", "-c", cmd, p)

    def listing_matches(self):
        """`snapshot -l` prints the same bytes as qemu-img's on the same file (the dates are the file's)."""
        for p in (self.q, self.i):
            q = qemu("snapshot", "-l", p)
            i = instar("snapshot", "-l", p)
            assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
            assert q.rc == 0 and q.out.startswith("Snapshot list:\n") or q.out == ""

    def same_snapshot_data(self):
        """Every snapshot reads back the same guest data in both files (convert -l of each snapshot)."""
        for sid, _ in snapshot_ids(self.q):
            outs = []
            for p in (self.q, self.i):
                out = os.path.join(self.tmp, "sn_" + os.path.basename(p) + ".raw")
                qimg("convert", "-U", "-O", "raw", "-l", f"snapshot.id={sid}", p, out)
                outs.append(out)
            assert open(outs[0], "rb").read() == open(outs[1], "rb").read(), sid
        r = qemu("compare", "-U", self.q, self.i)
        assert r.rc == 0, r


LAYOUTS = {
    "v3": "",
    "v2": "compat=0.10",
    "cluster512": "cluster_size=512",
    "cluster2M": "cluster_size=2M",
    "extended_l2": "extended_l2=on",
    "refcount1": "refcount_bits=1",
    "refcount64": "refcount_bits=64",
    "lazy": "lazy_refcounts=on",
    "zstd": "compression_type=zstd",
}


def seeded(tmp, opts, size="64M"):
    src = os.path.join(tmp, "src.qcow2")
    args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [src, size]
    qimg(*args)
    clen = "2M" if "2M" in opts else "128k"
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", f"write -c -P 2 4M {clen}", "-c", "write -z 8M 1M",
            "-c", "write -P 3 63M 64k", src)
    return src


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_lifecycle(tmp, layout):
    """Create, overwrite, create again (a duplicate name too), list, revert by name and by id, delete in
    several orders: each step matches qemu-img byte for byte."""
    t = Twin(tmp, seeded(tmp, LAYOUTS[layout]))
    t.step("-c", "s1")
    t.io("write -P 4 512k 1M")
    t.io("write -z 4M 64k")
    t.step("-c", "s2")
    t.io("discard 0 64k")
    t.step("-c", "s1")
    t.listing_matches()
    t.same_snapshot_data()
    t.step("-a", "s1")
    t.io("write -P 5 2M 256k")
    t.step("-a", "2")
    t.step("-a", "3")
    t.same_snapshot_data()
    t.step("-d", "s1")
    t.listing_matches()
    t.step("-d", "s2")
    t.step("-d", "s1")
    t.step("-l")
    t.same_snapshot_data()


def test_many_snapshots_table_growth(tmp):
    """Tables larger than a cluster (long names, many entries) move as they grow and shrink."""
    t = Twin(tmp, seeded(tmp, "cluster_size=512"))
    for k in range(12):
        t.step("-c", f"snapshot-with-a-long-name-{k:02d}-" + "x" * 40)
        if k % 3 == 0:
            t.io(f"write -P {k + 10} {k * 64}k 64k")
    t.listing_matches()
    for k in (5, 0, 11, 3):
        t.step("-d", f"snapshot-with-a-long-name-{k:02d}-" + "x" * 40)
    t.step("-c", "after")
    t.listing_matches()
    t.same_snapshot_data()


def test_apply_other_size(tmp):
    """A snapshot taken at another virtual size brings its size back (the image shrinks or grows, L1 resized)."""
    t = Twin(tmp, seeded(tmp, ""))
    t.step("-c", "small")
    for p in (t.q, t.i):
        qimg("resize", p, "300M")
    t.io("write -P 7 200M 1M")
    t.step("-c", "big")
    t.step("-a", "small")
    t.same_snapshot_data()
    t.step("-a", "big")
    t.same_snapshot_data()
    for p in (t.q, t.i):
        qimg("resize", "--shrink", p, "16M")
    t.step("-a", "small")
    t.step("-d", "big")
    t.same_snapshot_data()


def test_backing_overlay(tmp):
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "32M")
    qemu_io("-f", "qcow2", "-c", "write -P 9 0 4M", base)
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", src)
    qemu_io("-f", "qcow2", "-c", "write -P 1 1M 1M", src)
    t = Twin(tmp, src)
    t.step("-c", "a")
    t.io("write -P 2 1536k 1M")
    t.step("-a", "a")
    t.step("-d", "a")
    t.same_snapshot_data()


def test_bitmaps(tmp):
    """With persistent bitmaps, create and delete work as in qemu; revert is refused ("active dirty bitmaps")."""
    src = seeded(tmp, "")
    qimg("bitmap", "--add", src, "b0")
    qimg("bitmap", "--add", "--disable", src, "b1")
    t = Twin(tmp, src)
    t.step("-c", "s")
    t.io("write -P 8 0 64k")
    t.step("-a", "s")
    t.step("-d", "s")


def test_data_file(tmp):
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=src.data", src, "8M", cwd=tmp)
    q = qemu("snapshot", "-c", "x", src, cwd=tmp)
    i = instar("snapshot", "-c", "x", src, cwd=tmp)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err) and q.rc == 1, (q, i)
    for args in (["-a", "x"], ["-d", "x"], ["-l"]):
        q = qemu("snapshot", *args, src, cwd=tmp)
        i = instar("snapshot", *args, src, cwd=tmp)
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)


def test_encrypted_luks(tmp):
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", src, "8M")
    t = Twin(tmp, src)
    obj = ["--object", "secret,id=s0,data=pw", "--image-opts"]
    for args in (["-c", "e1"], ["-a", "e1"], ["-d", "e1"]):
        ka = [*obj, *args]
        q = qemu("snapshot", *ka, f"driver=qcow2,file.filename={t.q},encrypt.key-secret=s0")
        i = instar("snapshot", *ka, f"driver=qcow2,file.filename={t.i},encrypt.key-secret=s0")
        assert (i.rc, i.out, i.err.replace(t.i, t.q)) == (q.rc, q.out, q.err), (args, q, i)
        assert snapshot_table_dates_masked(t.i) == snapshot_table_dates_masked(t.q)
    # Without the key the opens fail as qemu's do.
    for args in (["-c", "e2"], ["-l"]):
        q = qemu("snapshot", *args, t.q)
        i = instar("snapshot", *args, t.i)
        assert (i.rc, i.out, i.err.replace(t.i, t.q)) == (q.rc, q.out, q.err), (q, i)


ERROR_CASES = [
    [],
    ["IMG", "IMG"],
    ["-l", "-c", "x", "IMG"],
    ["-c", "x", "-d", "x", "IMG"],
    ["-x", "IMG"],
    ["-f", "qcow2", "-l", "IMG"],
    ["-c"],
    ["-a", "nosuch", "IMG"],
    ["-a", "9", "IMG"],
    ["-d", "nosuch", "IMG"],
    ["-d", "1", "IMG"],
    ["-U", "-c", "x", "IMG"],
    ["-U", "-l", "IMG"],
    ["-q", "-c", "quiet", "IMG"],
    ["IMG"],
    ["-l", "missing.qcow2"],
    ["-c", "x", "missing.qcow2"],
    ["--image-opts", "-l", "driver=qcow2,file.filename=IMG"],
    ["--object", "secret,id=s0,data=x", "-c", "obj", "IMG"],
    ["-c", "n" * 300, "IMG"],
    ["-c", "", "IMG"],
]


@pytest.mark.parametrize("args", ERROR_CASES, ids=[" ".join(a)[:60] for a in ERROR_CASES])
def test_messages(tmp, args):
    t = Twin(tmp, seeded(tmp, ""))
    # one snapshot, copied: two made apart can fall in different seconds, which -l shows
    qimg("snapshot", "-c", "first", t.q)
    shutil.copyfile(t.q, t.i)
    q = qemu("snapshot", *[x.replace("IMG", t.q) for x in args], cwd=tmp)
    i = instar("snapshot", *[x.replace("IMG", t.i) for x in args], cwd=tmp)
    assert (i.rc, i.out, i.err.replace(t.i, t.q)) == (q.rc, q.out, q.err), (q, i)
    assert snapshot_table_dates_masked(t.i) == snapshot_table_dates_masked(t.q)
    t.listing_matches()


@pytest.mark.parametrize("args", [["-l"], ["-c", "s"], ["-a", "s"], ["-d", "s"], ["-f", "raw", "-l"], []])
def test_raw(tmp, args):
    imgs = {}
    for tool in ("q", "i"):
        imgs[tool] = os.path.join(tmp, f"{tool}.raw")
        with open(imgs[tool], "wb") as f:
            f.truncate(MiB)
    q = qemu("snapshot", *args, imgs["q"])
    i = instar("snapshot", *args, imgs["i"])
    assert (i.rc, i.out, i.err.replace(imgs["i"], imgs["q"])) == (q.rc, q.out, q.err)


# ---- crashes ----------------------------------------------------------------------------------------------

CRASH_POINTS = {
    "-c": ["snapshot-create:refcounts", "snapshot-create:l1-copied", "snapshot-create:tables-written",
           "snapshot-create:table-before-header", "snapshot-create:header-written"],
    "-d": ["snapshot-delete:table-before-header", "snapshot-delete:header-written", "snapshot-delete:table-written",
           "snapshot-delete:tables-written", "snapshot-delete:refcounts"],
    "-a": ["snapshot-apply:refcounts", "snapshot-apply:l1-written"],
}
# Points inside an update written back without order (the L2 tables on disk, the refcount blocks not yet): the
# refcounts and copied flags disagree there, so the image must carry the dirty bit, which makes qemu repair it
# before any read/write use. At any point an image without the bit must be consistent as it is.
DIRTY_POINTS = {"snapshot-create:tables-written", "snapshot-delete:tables-written"}


@pytest.mark.parametrize("action,point", [(a, p) for a, ps in CRASH_POINTS.items() for p in ps])
def test_crash(tmp, action, point):
    """SIGKILL at each step: afterwards qemu-img check finds no corruption (leaks only), and the image holds
    either the old or the new state."""
    src = seeded(tmp, "")
    qimg("snapshot", "-c", "keep", src)
    qemu_io("-f", "qcow2", "-c", "write -P 6 0 2M", src)
    qimg("snapshot", "-c", "s", src)
    qemu_io("-f", "qcow2", "-c", "write -P 7 1M 2M", src)
    before = os.path.join(tmp, "before.raw")
    qimg("convert", "-O", "raw", src, before)
    img = os.path.join(tmp, "img.qcow2")
    shutil.copyfile(src, img)
    env = dict(os.environ, INSTAR_CRASH_AT=point)
    name = "new" if action == "-c" else "s"
    r = run([INSTAR, "snapshot", action, name, img], env=env)
    assert r.rc == -signal.SIGKILL, r
    dirty = json.loads(qemu("info", "--output=json", "-U", img).out).get("dirty-flag")
    assert dirty or point not in DIRTY_POINTS
    if dirty:
        # what qemu's read/write open does with a dirty image (qcow2_do_open)
        qimg("check", "-q", "-r", "all", img)
    check_no_corruption(img, allow_leaks=True)
    names = [n for _, n in snapshot_ids(img)]
    assert names in (["keep", "s"], ["keep", "s", "new"], ["keep"]), names
    after = os.path.join(tmp, "after.raw")
    qimg("convert", "-O", "raw", img, after)
    if action == "-a":
        # Either still the current data or the snapshot's.
        snap = os.path.join(tmp, "snap.raw")
        qimg("convert", "-O", "raw", "-l", "snapshot.name=s", src, snap)
        assert open(after, "rb").read() in (open(before, "rb").read(), open(snap, "rb").read())
    else:
        assert open(after, "rb").read() == open(before, "rb").read()
    for sid, _ in snapshot_ids(img):
        out = os.path.join(tmp, "sn.raw")
        qimg("convert", "-O", "raw", "-l", f"snapshot.id={sid}", img, out)
    # check -r all leaves it clean, and the operation can be done again.
    qimg("check", "-q", "-r", "all", img)
    check_no_corruption(img)
    if action == "-c" or name in [n for _, n in snapshot_ids(img)]:
        r = instar("snapshot", action, name, img)
        assert r.rc == 0, r
        check_no_corruption(img)


def test_crash_without_flag_change(tmp):
    """A snapshot taken right after another changes no copied flag (every cluster is shared already): the update
    goes without the dirty bit, and a crash in the middle of it leaves a clean image, not a dirty one."""
    img = seeded(tmp, "")
    qimg("snapshot", "-c", "a", img)
    before = os.path.join(tmp, "before.raw")
    qimg("convert", "-O", "raw", img, before)
    r = run([INSTAR, "snapshot", "-c", "b", img], env=dict(os.environ, INSTAR_CRASH_AT="snapshot-create:tables-written"))
    assert r.rc == -signal.SIGKILL, r
    assert json.loads(qemu("info", "--output=json", "-U", img).out).get("dirty-flag") is False
    check_no_corruption(img, allow_leaks=True)
    assert [n for _, n in snapshot_ids(img)] == ["a"]
    for src in (["-l", "snapshot.name=a"], []):
        out = os.path.join(tmp, "out.raw")
        qimg("convert", "-O", "raw", *src, img, out)
        assert open(out, "rb").read() == open(before, "rb").read()


# ---- damaged snapshot tables ------------------------------------------------------------------------------

def _entry_offsets(data):
    count, off = struct.unpack(">IQ", data[60:72])
    out = []
    for _ in range(count):
        off = (off + 7) & ~7
        out.append(off)
        _, _, ids, ns, _, _, _, _, extra = struct.unpack(">QIHHIIQII", data[off:off + 40])
        off += 40 + extra + ids + ns
    return out


def hostile_variants(src):
    data = open(src, "rb").read()
    e0, e1 = _entry_offsets(data)[:2]
    l1_sn = struct.unpack(">Q", data[e0:e0 + 8])[0]
    v = {}

    def put(name, off, fmt, value, base=None):
        b = bytearray(base if base is not None else data)
        struct.pack_into(fmt, b, off, value)
        v[name] = bytes(b)

    put("count-huge", 60, ">I", 0xFFFFFFFF)
    put("count-65537", 60, ">I", 65537)
    put("count-plus1", 60, ">I", 3)
    put("table-unaligned", 64, ">Q", struct.unpack(">Q", data[64:72])[0] + 8)
    put("table-past-eof", 64, ">Q", 1 << 40)
    put("table-huge", 64, ">Q", (1 << 63) - 512)
    put("table-zero", 64, ">Q", 0)
    for k, e in (("0", e0), ("1", e1)):
        put(f"l1off-unaligned-{k}", e, ">Q", 1000)
        put(f"l1off-huge-{k}", e, ">Q", (1 << 62))
        put(f"l1off-zero-{k}", e, ">Q", 0)
        put(f"l1size-huge-{k}", e + 8, ">I", 0xFFFFFFFF)
        put(f"l1size-4M-{k}", e + 8, ">I", 4 << 20)
        put(f"l1size-past-eof-{k}", e + 8, ">I", 100000)
        put(f"idsize-huge-{k}", e + 12, ">H", 0xFFFF)
        put(f"namesize-huge-{k}", e + 14, ">H", 0xFFFF)
        put(f"extra-huge-{k}", e + 36, ">I", 0xFFFFFFFF)
        put(f"extra-1025-{k}", e + 36, ">I", 1025)
        put(f"extra-zero-{k}", e + 36, ">I", 0)
        put(f"disksize-huge-{k}", e + 48, ">Q", (1 << 63) - 512)
        put(f"disksize-odd-{k}", e + 48, ">Q", 12345)
        put(f"vmstate-huge-{k}", e + 40, ">Q", 1 << 62)
        put(f"icount-{k}", e + 56, ">Q", 12345)
    # The snapshot's L1 table names an unaligned L2 table, or an L2 table past the end of the file.
    put("sn-l2-unaligned", l1_sn, ">Q", 0x12345)
    put("sn-l2-past-eof", l1_sn, ">Q", 1 << 40)
    return v


HOSTILE_ACTIONS = [["-l"], ["-c", "new"], ["-a", "a"], ["-a", "2"], ["-d", "a"], ["-d", "b"]]


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_hostile_tables(tmp):
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", src, "16M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", src)
    qimg("snapshot", "-c", "a", src)
    qemu_io("-f", "qcow2", "-c", "write -P 2 512k 1M", src)
    qimg("snapshot", "-c", "b", src)
    failures = []
    for name, content in sorted(hostile_variants(src).items()):
        for action in HOSTILE_ACTIONS:
            res = {}
            for tool, exe in (("q", "qemu-img"), ("i", INSTAR)):
                p = os.path.join(tmp, f"{tool}.qcow2")
                with open(p, "wb") as f:
                    f.write(content)
                try:
                    r = subprocess.run([exe, "snapshot", *action, p], capture_output=True, text=True, timeout=60,
                                       preexec_fn=_limited if tool == "i" else None,
                                       errors="replace")
                    res[tool] = (r.returncode, r.stdout, r.stderr, open(p, "rb").read() == content)
                except subprocess.TimeoutExpired:
                    res[tool] = ("timeout", "", "", None)
            q, i = res["q"], res["i"]
            ok = isinstance(i[0], int) and i[0] >= 0 and i[0] == q[0]
            if ok and i[0] != 0:
                # A clear one-line-per-message error, and nothing written where qemu wrote nothing.
                ok = i[2].count("\n") <= max(1, q[2].count("\n")) and (i[3] or not q[3])
            if ok and i[0] == 0 and action == ["-l"]:
                ok = i[1] == q[1]
            if not ok:
                failures.append((name, action, q, i))
    assert not failures, "\n".join(repr(f)[:700] for f in failures[:20]) + f"\n{len(failures)} failures"


# ---- C API and Python binding -----------------------------------------------------------------------------

C_SOURCE = r"""
#include <instar.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *img = argv[1];
    instar_error_t err;
    instar_snapshot_options_t o;
    instar_snapshot_options_init(&o);
    if (instar_snapshot_create(img, "c1", &o, &err) != 0) { printf("create: %s\n", err.message); return 1; }
    if (instar_snapshot_create(img, "c2", NULL, &err) != 0) { printf("create2: %s\n", err.message); return 1; }
    instar_snapshot_list_t *list = NULL;
    if (instar_snapshot_list(img, &o, &list, &err) != 0) { printf("list: %s\n", err.message); return 1; }
    for (uint64_t k = 0; k < list->count; k++)
        printf("%s %s %llu\n", list->snapshots[k].id, list->snapshots[k].name,
               (unsigned long long)list->snapshots[k].vm_state_size);
    instar_snapshot_list_free(list);
    instar_snapshot_list_free(NULL);
    if (instar_snapshot_apply(img, "c1", &o, &err) != 0) { printf("apply: %s\n", err.message); return 1; }
    if (instar_snapshot_delete(img, "c2", &o, &err) != 0) { printf("delete: %s\n", err.message); return 1; }
    int rc = instar_snapshot_delete(img, "nosuch", &o, &err);
    printf("missing %d %s\n", rc == INSTAR_E_NOT_FOUND, err.message);
    rc = instar_snapshot_apply(img, "nosuch", &o, &err);
    printf("missing-apply %d %s\n", rc == INSTAR_E_NOT_FOUND, err.message);
    return 0;
}
"""


def test_capi(tmp):
    src = os.path.join(tmp, "prog.c")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    exe = os.path.join(tmp, "prog")
    r = run(["cc", "-std=c99", "-Wall", "-Werror", "-I", os.path.join(ROOT, "include"), src, "-o", exe,
             "-L", os.path.dirname(LIBINSTAR), "-linstar", "-Wl,-rpath," + os.path.dirname(LIBINSTAR)])
    assert r.rc == 0, r
    t = Twin(tmp, seeded(tmp, ""))
    r = run([exe, t.i])
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert lines[:2] == ["1 c1 0", "2 c2 0"]
    assert lines[2] == "missing 1 Could not delete snapshot 'nosuch': snapshot not found"
    assert lines[3] == ("missing-apply 1 Could not apply snapshot 'nosuch': Failed to load snapshot: "
                        "No such file or directory")
    for args in (["-c", "c1"], ["-c", "c2"], ["-a", "c1"], ["-d", "c2"]):
        qimg("snapshot", *args, t.q)
    assert snapshot_table_dates_masked(t.i) == snapshot_table_dates_masked(t.q)
    check_no_corruption(t.i)


def test_python(tmp):
    import instar as I
    t = Twin(tmp, seeded(tmp, ""))
    I.snapshot_create(t.i, "p1")
    qimg("snapshot", "-c", "p1", t.q)
    t.io("write -P 9 0 64k")
    I.snapshot_create(t.i, "p2")
    qimg("snapshot", "-c", "p2", t.q)
    got = I.snapshot_list(t.i)
    want = json.loads(qemu("info", "--output=json", t.i).out)["snapshots"]
    assert [s.to_dict() for s in got] == want
    I.snapshot_apply(t.i, "1")
    qimg("snapshot", "-a", "1", t.q)
    I.snapshot_delete(t.i, "p2")
    qimg("snapshot", "-d", "p2", t.q)
    with pytest.raises(I.InstarError) as e:
        I.snapshot_delete(t.i, "p2")
    assert "snapshot not found" in str(e.value)
    assert snapshot_table_dates_masked(t.i) == snapshot_table_dates_masked(t.q)
    assert I.snapshot_list(os.path.join(tmp, "src.qcow2")) == []


def test_image_in_use(tmp):
    """An image a qemu process holds open for writing: -c/-a/-d fail on its lock, -l fails too unless -U, as
    with qemu-img (same messages, exit codes)."""
    import time
    img = seeded(tmp, "")
    qimg("snapshot", "-c", "s", img)
    sock = os.path.join(tmp, "nbd.sock")
    p = subprocess.Popen(["qemu-nbd", "-k", sock, "-f", "qcow2", img], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        before = open(img, "rb").read()
        for args in (["-c", "x"], ["-a", "s"], ["-d", "s"], ["-l"], ["-U", "-l"]):
            q = qemu("snapshot", *args, img)
            i = instar("snapshot", *args, img)
            assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)
        assert open(img, "rb").read() == before
    finally:
        p.terminate()
        p.wait()


def test_unknown_extra_data_kept(tmp):
    """Extra data past the 24 bytes qemu knows is carried over when the table is written anew."""
    src = seeded(tmp, "")
    qimg("snapshot", "-c", "old", src)
    data = bytearray(open(src, "rb").read())
    off = struct.unpack(">Q", data[64:72])[0]
    ids, ns = struct.unpack(">HH", data[off + 12:off + 16])
    tail = bytes(data[off + 64:off + 64 + ids + ns])
    struct.pack_into(">I", data, off + 36, 32)
    data[off + 64:off + 72] = b"UNKNOWN!"
    data[off + 72:off + 72 + ids + ns] = tail
    with open(src, "wb") as f:
        f.write(data)
    t = Twin(tmp, src)
    t.listing_matches()
    t.step("-c", "new")
    assert b"UNKNOWN!" in open(t.i, "rb").read()
    t.step("-d", "new")
    t.step("-a", "old")


def test_listing_of_non_utf8_names(tmp):
    """qemu-img prints a name's stored bytes (padded by bytes), UTF-8 or not."""
    img = seeded(tmp, "")
    for name in (b"a\xffb", "caf\u00e9".encode(), b"x" * 20, b"\xe2\x82"):
        subprocess.run(["qemu-img", "snapshot", "-c", os.fsdecode(name), img], check=True)
    q = subprocess.run(["qemu-img", "snapshot", "-l", img], capture_output=True)
    i = subprocess.run([INSTAR, "snapshot", "-l", img], capture_output=True)
    assert (i.returncode, i.stdout, i.stderr) == (q.returncode, q.stdout, q.stderr)
    assert b"a\xffb" in q.stdout


def test_python_encrypted(tmp):
    """key_secret unlocks a LUKS image for the binding, as --object/--image-opts does for qemu-img."""
    import instar as I
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", src, "8M")
    t = Twin(tmp, src)
    with pytest.raises(I.InstarError):
        I.snapshot_create(t.i, "k")
    I.snapshot_create(t.i, "k", key_secret="pw")
    qimg("snapshot", "--object", "secret,id=s0,data=pw", "--image-opts", "-c", "k",
         f"driver=qcow2,file.filename={t.q},encrypt.key-secret=s0")
    assert snapshot_table_dates_masked(t.i) == snapshot_table_dates_masked(t.q)
    assert [s.name for s in I.snapshot_list(t.i, key_secret="pw")] == ["k"]
    I.snapshot_delete(t.i, "k", key_secret="pw")
    qimg("snapshot", "--object", "secret,id=s0,data=pw", "--image-opts", "-d", "k",
         f"driver=qcow2,file.filename={t.q},encrypt.key-secret=s0")
    assert snapshot_table_dates_masked(t.i) == snapshot_table_dates_masked(t.q)


def test_many_l2_tables(tmp):
    """More L2 tables than the caches hold (512-byte clusters, 300 MiB of data): the caches are written back
    and trimmed during the refcount passes, and the files still match qemu-img's."""
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", src, "1G")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 300M", "-c", "write -c -P 3 400M 64k", src)
    t = Twin(tmp, src)
    t.step("-c", "a")
    t.io("write -P 2 100M 50M")
    t.step("-c", "b")
    t.step("-a", "a")
    t.step("-d", "b")
    t.step("-d", "a")
