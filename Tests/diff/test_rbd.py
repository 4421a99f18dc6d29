"""RBD (issue 15): qemu-img 7.2 with Debian's qemu-block-extra and instar on the same single-node Ceph cluster
(scripts/ceph-single-node.sh): same output and exit codes, and the resulting RBD images read back with
`rbd export` and compared byte for byte.

`make test` starts the cluster beside pytest (INSTAR_CEPH_CONF names its ceph.conf, which appears once it
serves); run alone, this module starts and stops its own. Skipped only where Ceph's packages are missing."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from conftest import LIBINSTAR, ROOT, assert_same, both, instar, qemu, qemu_io, qimg, run

SCRIPT = os.path.join(ROOT, "scripts", "ceph-single-node.sh")
START_DEADLINE = 240
# Image names carry this run's tag, so runs against a cluster that outlives them never meet old images.
RUN = uuid.uuid4().hex[:6]


def _wait_for_shared(conf):
    d = os.path.dirname(conf)
    end = time.monotonic() + START_DEADLINE
    while not os.path.exists(conf):
        if os.path.exists(os.path.join(d, "no-ceph")):
            pytest.skip("Ceph packages (ceph-mon ceph-osd ceph-common) are not installed: RBD suite skipped")
        if os.path.exists(os.path.join(d, "start-failed")):
            pytest.fail("the single-node Ceph cluster failed to start (see make's output)")
        if time.monotonic() > end:
            pytest.fail(f"the single-node Ceph cluster was not up within {START_DEADLINE}s")
        time.sleep(0.1)
    return conf


@pytest.fixture(scope="module")
def conf():
    shared = os.environ.get("INSTAR_CEPH_CONF")
    if shared:
        yield _wait_for_shared(shared)
        return
    if not all(shutil.which(t) for t in ("ceph-mon", "ceph-osd", "ceph", "rbd", "uuidgen")):
        pytest.skip("Ceph packages (ceph-mon ceph-osd ceph-common uuid-runtime) are not installed: RBD suite skipped")
    d = tempfile.mkdtemp(prefix="instar-ceph.")
    r = subprocess.run(["bash", SCRIPT, "start", d], capture_output=True, text=True, timeout=START_DEADLINE)
    try:
        assert r.returncode == 0, r
        yield os.path.join(d, "ceph.conf")
    finally:
        subprocess.run(["bash", SCRIPT, "stop", d], capture_output=True, timeout=START_DEADLINE)


def rbd(conf, *args):
    r = run(["rbd", "-c", conf, *args])
    assert r.rc == 0, r
    return r


def name(conf, image):
    return f"rbd:rbd/{image}:conf={conf}"


def img(test):
    return f"{test}{RUN}"


def export(conf, image, tmp):
    """The bytes of an RBD image, read back with `rbd export`."""
    path = os.path.join(tmp, image + ".export")
    rbd(conf, "export", "--no-progress", f"rbd/{image}", path)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def used(conf, image):
    """Bytes the cluster holds for an image (`rbd du`, object granularity)."""
    d = json.loads(rbd(conf, "du", "--format", "json", f"rbd/{image}").out)
    return [i["used_size"] for i in d["images"] if i["name"] == image]


def source(tmp):
    """A qcow2 with data, a zeroed range and holes (64 MiB; RBD objects are 4 MiB)."""
    path = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io("-c", "write -P 0xab 1M 3M", "-c", "write -P 0xcd 20M 1M", "-c", "write -z 40M 4M",
            "-c", "write -P 0x11 63M 512", path)
    return path


def pair(test, conf):
    """Image names for qemu-img's and instar's runs of one test."""
    return f"{test}{RUN}_q", f"{test}{RUN}_i"


def assert_same_renamed(conf, argv_of, images):
    """Runs qemu-img with argv_of(images[0]) and instar with argv_of(images[1]); results must match once the
    image names are made the same."""
    q = qemu(*argv_of(images[0]))
    i = instar(*argv_of(images[1]))
    fix = lambda s: s.replace(images[1], images[0])
    assert (i.rc, fix(i.out), fix(i.err)) == (q.rc, q.out, q.err), (q, i)
    return q


def test_info_names_and_errors(conf, tmp):
    info1 = img("info")
    qimg("create", "-q", "-f", "raw", name(conf, info1), "40M")
    qimg("snapshot", "-c", "s1", name(conf, info1))
    keyring = os.path.join(os.path.dirname(conf), "keyring")
    mon = open(conf).read().split("mon host = ")[1].split("\n")[0]
    v1 = mon.split("v1:")[1].rstrip("]")
    mon_host = v1.replace(":", "\\:")
    for n in (name(conf, info1), f"rbd:rbd/{info1}@s1:conf={conf}",
              f"rbd:rbd/{info1}:id=admin:keyring={keyring}:mon_host={mon_host}",
              'json:{"driver":"raw","file":{"driver":"rbd","pool":"rbd","image":"%s","conf":"%s"}}' % (info1, conf),
              'json:{"driver":"rbd","pool":"rbd","image":"%s","conf":"%s"}' % (info1, conf),
              name(conf, "missing"), f"rbd:rbd/{info1}:conf=/nonexistent.conf", f"rbd:{info1}", f"rbd:rbd/{info1}:conf"):
        assert_same("info", n)
        assert_same("info", "--output=json", n)
    assert_same("info", "--image-opts", f"driver=rbd,pool=rbd,image={info1},conf={conf}")
    assert_same("map", "--output=json", "--image-opts", f"driver=rbd,pool=rbd,image={info1},conf={conf}")
    env = dict(os.environ, CEPH_CONF=conf)
    assert_same("info", "-f", "raw", f"rbd:rbd/{info1}", env=env)


UNLOAD = r"""
import ctypes, _ctypes, os, sys, time
def threads():
    return len(os.listdir("/proc/self/task"))
lib = ctypes.CDLL(sys.argv[1])
lib.instar_info_json.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
lib.instar_string_free.argtypes = [ctypes.c_void_p]
out = ctypes.c_void_p()
assert lib.instar_info_json(sys.argv[2].encode(), None, ctypes.byref(out), None) == 0
assert b'"format": "raw"' in ctypes.string_at(out.value)
lib.instar_string_free(out)
print("threads before", threads(), flush=True)
handle = lib._handle
del lib
_ctypes.dlclose(handle)
print("mapped after", any("libinstar" in line for line in open("/proc/self/maps")), flush=True)
print("threads after", threads(), flush=True)
time.sleep(float(sys.argv[3]))
print("alive", flush=True)
"""


def test_unload_with_a_parked_cluster_handle(conf, tmp):
    """A host that unloads libinstar (dlclose) right after an RBD call: the cluster handle parked for the next
    call is shut down and the cache's reaper thread joined before the code is unmapped, so no librados or reaper
    thread is left running in unmapped code (the process lives on past the reaper's 5 s period)."""
    image = img("unload")
    qimg("create", "-q", "-f", "raw", name(conf, image), "8M")
    r = subprocess.run([sys.executable, "-c", UNLOAD, LIBINSTAR, name(conf, image), "6"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert int(lines[0].split()[-1]) > 1, r.stdout  # librados' threads and the reaper were running
    assert lines[1:] == ["mapped after False", "threads after 1", "alive"], r.stdout


def test_create_resize_and_errors(conf, tmp):
    imgs = pair("cr", conf)
    assert_same_renamed(conf, lambda n: ("create", "-f", "raw", name(conf, n), "24M"), imgs)
    assert_same_renamed(conf, lambda n: ("create", "-f", "raw", name(conf, n), "24M"), imgs)  # exists
    assert_same_renamed(conf, lambda n: ("resize", "-f", "raw", name(conf, n), "+8M"), imgs)
    assert_same_renamed(conf, lambda n: ("info", name(conf, n)), imgs)
    assert_same("create", "-f", "raw", f"rbd:nopool/x:conf={conf}", "1M")
    assert_same_renamed(conf, lambda n: ("create", "-f", "raw", f"rbd:rbd/{n}@s:conf={conf}", "1M"), pair("cs", conf))
    assert export(conf, imgs[0], tmp) == export(conf, imgs[1], tmp)
    # The protocol's create options (qemu_rbd_create_opts) beside raw's: object size, and qemu's refusals.
    assert_same("create", "-f", "raw", "-o", "help", name(conf, "any"))
    obj = pair("co", conf)
    assert_same_renamed(conf, lambda n: ("create", "-f", "raw", "-o", "cluster_size=1M", name(conf, n), "8M"), obj)
    orders = [json.loads(rbd(conf, "info", "--format", "json", f"rbd/{n}").out)["order"] for n in obj]
    assert orders == [20, 20]
    for o in ("cluster_size=1000", "cluster_size=2k", "preallocation=full"):
        assert_same("create", "-f", "raw", "-o", o, name(conf, img("bad")), "8M")


def test_convert_to_rbd_sparse(conf, tmp):
    src = source(tmp)
    imgs = pair("cv", conf)
    assert_same_renamed(conf, lambda n: ("convert", "-O", "raw", src, name(conf, n)), imgs)
    ref = os.path.join(tmp, "ref.raw")
    qimg("convert", "-O", "raw", src, ref)
    with open(ref, "rb") as f:
        want = f.read()
    assert export(conf, imgs[0], tmp) == want
    assert export(conf, imgs[1], tmp) == want
    assert used(conf, imgs[0]) == used(conf, imgs[1])
    assert_same_renamed(conf, lambda n: ("map", "-f", "raw", "--output=json", name(conf, n)), imgs)
    # -n into images full of data: the zero ranges must be zeroed (write zeroes / discard), as qemu does.
    for n in imgs:
        qemu_io("-f", "raw", "-c", "write -P 0x77 0 64M", name(conf, n))
    assert_same_renamed(conf, lambda n: ("convert", "-n", "-O", "raw", src, name(conf, n)), imgs)
    assert export(conf, imgs[0], tmp) == want
    assert export(conf, imgs[1], tmp) == want
    assert used(conf, imgs[0]) == used(conf, imgs[1])


def test_convert_from_rbd_and_compare(conf, tmp):
    src = source(tmp)
    from1 = img("from")
    qimg("convert", "-O", "raw", src, name(conf, from1))
    outs = {}
    for tool, fn in (("q", qemu), ("i", instar)):
        outs[tool] = os.path.join(tmp, f"out_{tool}.qcow2")
        r = fn("convert", "-f", "raw", "-O", "qcow2", name(conf, from1), outs[tool])
        assert r.rc == 0 and r.out == "" and r.err == "", r
    with open(outs["q"], "rb") as a, open(outs["i"], "rb") as b:
        assert a.read() == b.read()
    assert_same("compare", "-f", "qcow2", "-F", "raw", src, name(conf, from1))
    qemu_io("-f", "raw", "-c", "write -P 0x42 30M 4k", name(conf, from1))
    assert_same("compare", "-f", "qcow2", "-F", "raw", src, name(conf, from1))
    assert_same("compare", "-s", "-f", "raw", "-F", "raw", name(conf, from1), name(conf, from1))


def test_snapshots(conf, tmp):
    imgs = pair("sn", conf)
    for n in imgs:
        qimg("create", "-q", "-f", "raw", name(conf, n), "8M")
        qemu_io("-f", "raw", "-c", "write -P 0x01 0 1M", name(conf, n))
    steps = [("-c", "a"), ("-c", "b"), ("-c", "a"), ("-l",), ("-a", "a"), ("-d", "b"), ("-d", "nope"), ("-l",),
             ("-a", "nope")]
    for i, step in enumerate(steps):
        if i == 2:
            for n in imgs:
                qemu_io("-f", "raw", "-c", "write -P 0x02 0 2M", name(conf, n))
        assert_same_renamed(conf, lambda n: ("snapshot", "-f", "raw", *step, name(conf, n)), imgs)
    assert_same_renamed(conf, lambda n: ("info", "--output=json", name(conf, n)), imgs)
    assert export(conf, imgs[0], tmp) == export(conf, imgs[1], tmp)


def test_dd_and_bench(conf, tmp):
    src = source(tmp)
    raw = os.path.join(tmp, "src.raw")
    qimg("convert", "-O", "raw", src, raw)
    imgs = pair("dd", conf)
    assert_same_renamed(conf, lambda n: ("dd", "-f", "raw", "-O", "raw", "bs=1M", f"if={raw}",
                                         f"of={name(conf, n)}"), imgs)
    with open(raw, "rb") as f:
        want = f.read()
    assert export(conf, imgs[0], tmp) == want == export(conf, imgs[1], tmp)
    outs = []
    for tool, fn in (("q", qemu), ("i", instar)):
        out = os.path.join(tmp, f"dd_{tool}.raw")
        r = fn("dd", "-f", "raw", "-O", "raw", "bs=1M", f"if={name(conf, imgs[0])}", f"of={out}")
        assert r.rc == 0, r
        with open(out, "rb") as f:
            outs.append(f.read())
    assert outs[0] == outs[1] == want
    q, i = both("bench", "-f", "raw", "-c", "64", "-s", "64k", "-w", name(conf, imgs[0]))
    assert (i.rc, i.err) == (q.rc, q.err)
    assert i.out.splitlines()[0] == q.out.splitlines()[0]


def test_qcow2_and_luks_on_rbd(conf, tmp):
    src = source(tmp)
    imgs = pair("q2", conf)
    assert_same_renamed(conf, lambda n: ("create", "-f", "qcow2", name(conf, n), "64M"), imgs)
    assert_same_renamed(conf, lambda n: ("convert", "-n", "-O", "qcow2", src, name(conf, n)), imgs)
    for n in imgs:
        assert_same("compare", "-f", "qcow2", "-F", "qcow2", src, name(conf, n))
        r = qemu("check", "-f", "qcow2", name(conf, n))
        assert r.rc == 0, r
    assert_same_renamed(conf, lambda n: ("info", "-f", "qcow2", name(conf, n)), imgs)
    pw = os.path.join(tmp, "pw")
    with open(pw, "w") as f:
        f.write("secret")
    sec = f"secret,id=sec0,file={pw}"
    # LUKS encrypts every sector it writes, zeroes included: a small source keeps this quick.
    small = os.path.join(tmp, "small.qcow2")
    qimg("create", "-q", "-f", "qcow2", small, "6M")
    qemu_io("-c", "write -P 0x5a 1M 1M", "-c", "write -P 0x11 5M 4k", small)
    # instar writes LUKS into RBD (the PBKDF makes a second writer too slow for the suite); qemu-img and instar
    # must then both read it back as the source.
    lk = img("lk")
    r = instar("convert", "--object", sec, "-O", "luks", "-o", "key-secret=sec0,iter-time=10", small, name(conf, lk))
    assert r.rc == 0 and r.out == "" and r.err == "", r
    opts = f"driver=luks,key-secret=sec0,file.driver=rbd,file.pool=rbd,file.image={lk},file.conf={conf}"
    r = assert_same("compare", "--object", sec, "--image-opts", opts, f"driver=qcow2,file.filename={small}")
    assert r.rc == 0, r
    assert_same("info", "--object", sec, "--image-opts", opts)


def _admin_key(conf):
    """client.admin's cephx key (base64) from the cluster's keyring."""
    text = open(os.path.join(os.path.dirname(conf), "keyring")).read()
    return text.split("[client.admin]")[1].split("key = ")[1].split()[0]


def test_server_key_secret_and_auth(conf, tmp):
    """The json/--image-opts connection options: "server" (mon_host), "key-secret" (the cephx key from a
    secret), "auth-client-required", legacy "password-secret"; qemu's errors for bad values."""
    image = img("auth")
    qimg("create", "-q", "-f", "raw", name(conf, image), "8M")
    qemu_io("-f", "raw", "-c", "write -P 0x3c 1M 64k", name(conf, image))
    port = open(conf).read().split("mon host = ")[1].split("v1:127.0.0.1:")[1].split("]")[0]
    key = f"secret,id=k0,data={_admin_key(conf)},format=base64"
    base = '"driver":"rbd","pool":"rbd","image":"%s"' % image
    srv = '"server":[{"host":"127.0.0.1","port":"%s"}]' % port
    # No conf: the monitor and the key come from the options alone.
    env = {k: v for k, v in os.environ.items() if k != "CEPH_CONF"}
    good = 'json:{"driver":"raw","file":{%s,%s,"key-secret":"k0","auth-client-required":["cephx"]}}' % (base, srv)
    r = assert_same("info", "--output=json", "--object", key, good, env=env)
    assert r.rc == 0, r
    assert_same("info", "--object", key, "--image-opts",
                f"driver=rbd,pool=rbd,image={image},server.0.host=127.0.0.1,server.0.port={port},key-secret=k0,"
                "auth-client-required.0=cephx", env=env)
    # A numeric port, a user: the name shows the flattened server list in qemu's order.
    assert_same("info", "--object", key, 'json:{%s,"server":[{"host":"127.0.0.1","port":%s}],"user":"admin",'
                '"key-secret":"k0"}' % (base, port), env=env)
    out = os.path.join(tmp, "auth.raw")
    for fn in (qemu, instar):
        r = fn("convert", "-O", "raw", "--object", key, good, out, env=env)
        assert r.rc == 0 and r.err == "", r
        with open(out, "rb") as f:
            assert f.read() == export(conf, image, tmp)
    # The key as a secret's raw text is base64-encoded again by qemu: cephx refuses it.
    for extra in ('"key-secret":"k0"', '"key-secret":"nokey"', '"password-secret":"k0","key-secret":"k0"',
                  '"password-secret":"k0"', '"auth-client-required":["bogus"]', '"auth-client-required":"cephx"',
                  '"server":[{"host":"127.0.0.1"}]', '"server":{"host":"127.0.0.1","port":"1"}', '"server":[]',
                  '"server":[{"host":"h","port":"1","x":1}]',
                  '"encrypt":"luks"', '"encrypt":{"format":"luks"}', '"encrypt":{"key-secret":"k0"}',
                  '"encrypt":{"format":"luks-any","key-secret":"k0"}', '"encrypt":{"format":"luks2","key-secret":"s9"}',
                  '"encrypt":{"format":"luks","key-secret":"k0","cipher-alg":"aes-128"}'):
        assert_same("info", "--object", f"secret,id=k0,data={_admin_key(conf)}",
                    'json:{%s,"conf":"%s",%s}' % (base, conf, extra))
    for extra in ("encrypt.format=luks2,encrypt.key-secret=s9", "server.0.host=h,server.0.port=1,server.0.x=1",
                  "server.1.host=h,server.1.port=1", "auth-client-required.1=none"):
        assert_same("info", "--object", key, "--image-opts", f"driver=rbd,pool=rbd,image={image},conf={conf},{extra}")


def test_encrypt_create_errors(conf, tmp):
    """rbd's encrypt.* create options: qemu's refusals, and a failed format leaves no image behind (librbd's
    PBKDF makes a successful luks format take tens of seconds here, too slow for the suite)."""
    pw = os.path.join(tmp, "pw")
    with open(pw, "w") as f:
        f.write("secret")
    for i, o in enumerate(("encrypt.format=luks", "encrypt.format=luks,encrypt.key-secret=s9",
                           "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-192",
                           "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=bogus",
                           "encrypt.format=bogus,encrypt.key-secret=s0", "encrypt.cipher-alg=aes-128")):
        imgs = pair(f"ec{i}", conf)
        assert_same_renamed(conf, lambda n: ("create", "-f", "raw", "--object", f"secret,id=s0,file={pw}", "-o", o,
                                             name(conf, n), "16M"), imgs)
        listed = rbd(conf, "ls").out.split()
        assert [n in listed for n in imgs] == [False, False]


def test_convert_n_into_json_targets(conf, tmp):
    """convert -n with a json: target (raw over an rbd file node, and a top-level rbd node under -O raw): qemu-img's
    result, output and bytes."""
    src = source(tmp)
    imgs = pair("js", conf)
    for n in imgs:
        rbd(conf, "create", "--size", "64M", f"rbd/{n}")

    def node(n):
        return {"driver": "rbd", "pool": "rbd", "image": n, "conf": conf}
    r = assert_same_renamed(conf, lambda n: ("convert", "-n", src, "json:" + json.dumps({"driver": "raw",
                                                                                         "file": node(n)})), imgs)
    assert (r.rc, r.out, r.err) == (0, "", ""), r
    assert export(conf, imgs[0], tmp) == export(conf, imgs[1], tmp)
    r = assert_same_renamed(conf, lambda n: ("convert", "-n", src, "json:" + json.dumps(node(n))), imgs)
    assert r.rc == 1, r
