"""Legacy AES-encrypted qcow2 (crypt_method 1, qemu's "qcow" crypto): the passphrase's first 16 bytes are the
AES-128-CBC key and each 512-byte sector's IV is its GUEST sector number. Images are made at test time with
qemu-img/qemu-io; every path (reads, convert both ways, map, check, compare, measure, resize, amend, writes
through the Python binding and the C API, COW over a backing file, a wrong passphrase) is compared with qemu's
output and, where a file is written, byte for byte with the file qemu writes."""
import os
import json
import shutil

import pytest

from conftest import assert_same, both, convert_both, instar, qemu, qemu_io, qimg, run
from imgs import apply_ops, make_ops, qemu_io_script

import instar as instar_py

PW = "hunter2"
OBJ = ["--object", f"secret,id=s0,data={PW}"]
AES = "encrypt.format=aes,encrypt.key-secret=s0"
KiB = 1024
MiB = 1 << 20


def opts(path, secret="s0"):
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={secret}"


def json_spec(path):
    return f'json:{{"driver":"qcow2","encrypt.key-secret":"s0","file":{{"driver":"file","filename":"{path}"}}}}'


# name: (size, extra -o options, cluster size)
VARIANTS = {
    "v3": ("4M", "", 64 * KiB),
    "v2": ("4M", "compat=0.10", 64 * KiB),
    "c512": ("1M", "cluster_size=512", 512),
    "c2M": ("10M", "cluster_size=2M", 2 * MiB),
    "unaligned": (str(3 * MiB + 1536), "", 64 * KiB),
    "extl2": ("4M", "extended_l2=on,cluster_size=128k", 128 * KiB),
}


def create(path, size, extra="", obj=OBJ):
    o = AES + ("," + extra if extra else "")
    qimg("create", "-q", "-f", "qcow2", *obj, "-o", o, path, size)


def fill(path, size, cluster, v2=False, obj=OBJ):
    """Data at odd offsets, a zero write, a compressed cluster and data near the image's end."""
    n = int(size[:-1]) * MiB if size.endswith("M") else int(size)
    cmds = ["write -P 0x5a 0 100k", "write -P 0x11 1000 777", "write -P 0x33 %d 5000" % (n - 5000),
            "write -z %d %d" % (cluster * 3 if cluster < MiB else 2 * MiB, cluster),
            "write -P 0x44 %d 3000" % (n // 2 + 100)]
    if not v2 and cluster >= 4096:
        # Compressed clusters are stored unencrypted (qemu neither encrypts nor decrypts them).
        cmds.append("write -c -P 0x22 %d %d" % (cluster * 5 if cluster < MiB else 6 * MiB, cluster))
    args = []
    for c in cmds:
        args += ["-c", c]
    qemu_io(*obj, "--image-opts", opts(path), *args)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("aes"))
    out = {}
    for name, (size, extra, cluster) in VARIANTS.items():
        p = os.path.join(d, name + ".qcow2")
        create(p, size, extra)
        fill(p, size, cluster, v2="compat=0.10" in extra)
        out[name] = p
    return d, out


def read_file(p):
    with open(p, "rb") as f:
        return f.read()


def to_raw_both(tmp, spec, obj=OBJ, image_opts=True):
    a, b = os.path.join(tmp, "q.raw"), os.path.join(tmp, "i.raw")
    src = ["--image-opts", spec] if image_opts else [spec]
    q, i = qemu("convert", *obj, *src, "-O", "raw", a), instar("convert", *obj, *src, "-O", "raw", b)
    assert i == q
    assert q.rc == 0, q
    assert read_file(a) == read_file(b)
    return a


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reads_match_qemu(images, variant, tmp):
    _, imgs = images
    p = imgs[variant]
    raw = to_raw_both(tmp, opts(p))
    for out in ("json", "human"):
        assert_same("map", f"--output={out}", *OBJ, "--image-opts", opts(p))
        assert_same("check", f"--output={out}", *OBJ, "--image-opts", opts(p))
    assert_same("compare", *OBJ, "--image-opts", opts(p), f"driver=raw,file.filename={raw}")
    assert_same("compare", "-s", *OBJ, "--image-opts", opts(p), f"driver=raw,file.filename={raw}")
    assert_same("info", "--output=json", *OBJ, "--image-opts", opts(p))
    assert_same("measure", "--output=json", *OBJ, "-O", "qcow2", "--image-opts", opts(p))
    assert_same("measure", *OBJ, "-O", "qcow2", "-o", AES, "--image-opts", opts(p))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_convert_to_aes_is_byte_identical(images, variant, tmp):
    _, imgs = images
    p = imgs[variant]
    size, extra, _ = VARIANTS[variant]
    o = AES + ("," + extra if extra else "")
    # From the AES image itself (decrypting and re-encrypting), and from a plain raw copy of it.
    q, qd, idst = convert_both(tmp, [*OBJ, "-O", "qcow2", "-o", o, "--image-opts"], [opts(p)])
    assert q.rc == 0, q
    assert read_file(qd) == read_file(idst)
    raw = os.path.join(tmp, "src.raw")
    qimg("convert", *OBJ, "--image-opts", opts(p), "-O", "raw", raw)
    q, qd, idst = convert_both(tmp, [*OBJ, "-f", "raw", "-O", "qcow2", "-o", o], [raw])
    assert q.rc == 0, q
    assert read_file(qd) == read_file(idst)
    assert_same("compare", *OBJ, "--image-opts", opts(idst), f"driver=raw,file.filename={raw}")


def test_json_filename(images, tmp):
    _, imgs = images
    p = imgs["v3"]
    to_raw_both(tmp, json_spec(p), image_opts=False)
    for args in (["map", "--output=json"], ["check"], ["info"]):
        assert_same(*args, *OBJ, json_spec(p))


def test_compare_two_aes_images(images):
    _, imgs = images
    assert_same("compare", *OBJ, "--image-opts", opts(imgs["v3"]), opts(imgs["extl2"]))
    assert_same("compare", *OBJ, "--image-opts", opts(imgs["v3"]), opts(imgs["v3"]))


@pytest.mark.parametrize("pw", ["wrong", "hunter", "hunter2\u00e9", "x" * 40])
def test_wrong_passphrase_reads_garbage_like_qemu(images, tmp, pw):
    """No key check exists: qemu decrypts with whatever key it is given."""
    _, imgs = images
    p = imgs["v3"]
    obj = ["--object", f"secret,id=s0,data={pw}"]
    to_raw_both(tmp, opts(p), obj=obj)
    assert_same("map", "--output=json", *obj, "--image-opts", opts(p))
    assert_same("check", *obj, "--image-opts", opts(p))
    raw = os.path.join(tmp, "right.raw")
    qimg("convert", *OBJ, "--image-opts", opts(p), "-O", "raw", raw)
    assert_same("compare", *obj, "--image-opts", opts(p), f"driver=raw,file.filename={raw}")


@pytest.mark.parametrize("pw", ["0123456789abcdef", "0123456789abcdefTAIL", "k"])
def test_passphrase_lengths(tmp, pw):
    """Only the first 16 bytes are the key: a longer passphrase with the same start reads the same."""
    obj = ["--object", f"secret,id=s0,data={pw}"]
    p = os.path.join(tmp, "p.qcow2")
    create(p, "1M", obj=obj)
    qemu_io(*obj, "--image-opts", opts(p), "-c", "write -P 0x77 512 70000")
    to_raw_both(tmp, opts(p), obj=obj)
    other = ["--object", f"secret,id=s0,data={pw[:16]}{'zz' if len(pw) >= 16 else ''}"]
    to_raw_both(tmp, opts(p), obj=other)


@pytest.mark.parametrize("args", [
    ["map", "{p}"],
    ["check", "{p}"],
    ["compare", "{p}", "{p}"],
    ["convert", "-O", "raw", "{p}", "{tmp}/o.raw"],
    ["map", *OBJ, "--image-opts", "driver=qcow2,file.filename={p},encrypt.key-secret=nosuch"],
    ["map", "--image-opts", "driver=qcow2,file.filename={p},encrypt.key-secret=s0"],
    ["info", "{p}"],
    ["resize", "{p}", "8M"],
    ["amend", "-o", "lazy_refcounts=on", "{p}"],
])
def test_missing_key_messages(images, tmp, args):
    _, imgs = images
    p = os.path.join(tmp, "m.qcow2")
    shutil.copy(imgs["v3"], p)
    assert_same(*[a.format(p=p, tmp=tmp) for a in args])
    assert read_file(p) == read_file(imgs["v3"])


def twin(images, variant, tmp):
    """Two copies of a variant image: one for qemu, one for instar."""
    _, imgs = images
    a, b = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    shutil.copy(imgs[variant], a)
    shutil.copy(imgs[variant], b)
    return a, b


@pytest.mark.parametrize("variant,size,flags", [
    ("v3", "8M", []), ("v3", "3M", ["--shrink"]), ("v2", "+1M", []), ("unaligned", "5000000", []),
    ("c512", "2M", []),
])
def test_resize_is_byte_identical(images, tmp, variant, size, flags):
    a, b = twin(images, variant, tmp)
    q = qemu("resize", *flags, *OBJ, "--image-opts", opts(a), size)
    i = instar("resize", *flags, *OBJ, "--image-opts", opts(b), size)
    assert i == q
    assert read_file(a) == read_file(b)


@pytest.mark.parametrize("variant,o", [
    ("v3", "lazy_refcounts=on"), ("v3", "compat=0.10"), ("v2", "compat=1.1"), ("extl2", "refcount_bits=8"),
])
def test_amend_is_byte_identical(images, tmp, variant, o):
    a, b = twin(images, variant, tmp)
    q = qemu("amend", *OBJ, "-o", o, "--image-opts", opts(a))
    i = instar("amend", *OBJ, "-o", o, "--image-opts", opts(b))
    assert i == q
    assert read_file(a) == read_file(b)
    if q.rc == 0:
        to_raw_both(tmp, opts(b))




def apply_qemu(path, ops):
    r = run(["qemu-io", *OBJ, "-d", "unmap", "--image-opts", opts(path)], input=qemu_io_script(ops))
    assert r.rc == 0, r
    assert "error" not in r.out.lower() and "failed" not in r.out.lower(), r.out[-2000:]


def apply_instar(path, ops, key=PW):
    with instar_py.Image(path, flags=instar_py.OPEN_READ_WRITE, key_secret=key) as img:
        apply_ops(img, ops)


@pytest.mark.parametrize("variant", ["v3", "v2", "c512", "unaligned", "extl2"])
def test_writes_are_byte_identical(images, tmp, variant):
    a, b = twin(images, variant, tmp)
    with instar_py.Image(b, key_secret=PW) as img:
        vsize = img.size
    ops = make_ops(sum(variant.encode()), vsize, VARIANTS[variant][2])
    apply_qemu(a, ops)
    apply_instar(b, ops)
    assert read_file(a) == read_file(b)
    to_raw_both(tmp, opts(b))


@pytest.mark.parametrize("extra", ["", "compat=0.10", "cluster_size=4096"])
def test_cow_over_backing_file_is_byte_identical(tmp, extra):
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io("-f", "qcow2", base, "-c", "write -P 0x61 0 4M")
    files = []
    for tool in ("q", "i"):
        p = os.path.join(tmp, f"{tool}.qcow2")
        o = AES + ",backing_file=base.qcow2,backing_fmt=qcow2" + ("," + extra if extra else "")
        qimg("create", "-q", "-f", "qcow2", *OBJ, "-o", o, p, "4M")
        files.append(p)
    # Partial clusters: the rest of each cluster is copied up from the backing file and encrypted.
    ops = [("write", 1000, 3000, 0x71), ("write", 70000, 513, 0x72), ("write", 200000, 140000, 0x73),
           ("zero", 1 << 20, 5000, False), ("write", 4 * MiB - 700, 700, 0x74)]
    apply_qemu(files[0], ops)
    apply_instar(files[1], ops)
    assert read_file(files[0]) == read_file(files[1])
    to_raw_both(tmp, opts(files[1]))
    assert_same("map", "--output=json", *OBJ, "--image-opts", opts(files[1]))


def test_binding_reads_and_c_api_operations(images, tmp):
    _, imgs = images
    p = imgs["v3"]
    expected = read_file(to_raw_both(tmp, opts(p)))
    with instar_py.Image(p, key_secret=PW) as img:
        assert img.read(0, img.size) == expected
        assert img.read(1001, 70000) == expected[1001:71001]
    qm = json.loads(qimg("map", "--output=json", *OBJ, "--image-opts", opts(p)).out)
    assert instar_py.map(p, key_secret=PW) == qm
    qc = json.loads(qimg("check", "--output=json", *OBJ, "--image-opts", opts(p)).out)
    ic = instar_py.check(p, key_secret=PW)
    qc.pop("filename"), ic.pop("filename")
    assert ic == qc
    # A wrong passphrase opens and reads garbage, as in qemu.
    with instar_py.Image(p, key_secret="wrong") as img:
        assert img.read(0, 512) != expected[:512]


def test_c_api_create_then_qemu_reads(tmp):
    a, b = os.path.join(tmp, "a.qcow2"), os.path.join(tmp, "b.qcow2")
    instar_py.create(a, "qcow2", 2 * MiB, key_secret=PW, **{"encrypt.format": "aes"})
    qimg("create", "-q", "-f", "qcow2", *OBJ, "-o", AES, b, str(2 * MiB))
    assert read_file(a) == read_file(b)
    ops = [("write", 4096, 8192, 0x42), ("write", 2 * MiB - 512, 512, 0x17), ("write", 100, 50, 0x18)]
    apply_instar(a, ops)
    apply_qemu(b, ops)
    assert read_file(a) == read_file(b)


@pytest.mark.parametrize("extra", ["", "compat=0.10", "extended_l2=on"])
def test_random_writes_over_backing_file_are_byte_identical(tmp, extra):
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "3M")
    qemu_io("-f", "qcow2", base, "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 2M 1M")
    o = AES + ",backing_file=base.qcow2,backing_fmt=qcow2" + ("," + extra if extra else "")
    a, b = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    qimg("create", "-q", "-f", "qcow2", *OBJ, "-o", o, a, "3M")
    shutil.copy(a, b)
    ops = make_ops(7 + len(extra), 3 * MiB, 64 * KiB, count=30)
    apply_qemu(a, ops)
    apply_instar(b, ops)
    assert read_file(a) == read_file(b)
    to_raw_both(tmp, opts(b))


def test_luks_zero_writes_pad_sectors_like_qemu(tmp):
    """Zero writes to any encrypted image go through the 512-byte sector padding (shared with LUKS)."""
    a, b = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    qimg("create", "-q", "-f", "qcow2", *OBJ, "-o",
         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", a, "2M")
    shutil.copy(a, b)
    ops = make_ops(99, 2 * MiB, 64 * KiB, count=30)
    apply_qemu(a, ops)
    apply_instar(b, ops)
    assert read_file(a) == read_file(b)


def test_convert_into_existing_aes_target(images, tmp):
    _, imgs = images
    raw = to_raw_both(tmp, opts(imgs["v3"]))

    def setup(dst):
        qimg("create", "-q", "-f", "qcow2", *OBJ, "-o", AES, dst, "4M")
    outs = {}
    for tool in ("q", "i"):
        dst = os.path.join(tmp, f"n_{tool}.qcow2")
        setup(dst)
        argv = ["convert", "-n", *OBJ, "-f", "raw", raw, "--target-image-opts", opts(dst)]
        outs[tool] = (qemu(*argv) if tool == "q" else instar(*argv)), dst
    assert outs["i"][0] == outs["q"][0]
    assert read_file(outs["q"][1]) == read_file(outs["i"][1])


@pytest.mark.parametrize("args", [
    ["convert", "-c", *OBJ, "-O", "qcow2", "-o", AES, "{raw}", "{tmp}/c.qcow2"],
    ["convert", *OBJ, "-O", "qcow2", "-o", "encrypt.format=aes", "{raw}", "{tmp}/c.qcow2"],
    ["convert", *OBJ, "-O", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=nosuch", "{raw}", "{tmp}/c.qcow2"],
    ["amend", *OBJ, "-o", "encrypt.new-secret=s0", "--image-opts", "driver=qcow2,file.filename={p},encrypt.key-secret=s0"],
    ["amend", *OBJ, "-o", "encrypt.format=luks", "--image-opts", "driver=qcow2,file.filename={p},encrypt.key-secret=s0"],
    ["measure", *OBJ, "-O", "qcow2", "-o", "encrypt.format=aes", "{raw}"],
])
def test_error_messages(images, tmp, args):
    _, imgs = images
    p = os.path.join(tmp, "e.qcow2")
    shutil.copy(imgs["v3"], p)
    raw = os.path.join(tmp, "s.raw")
    qimg("create", "-q", "-f", "raw", raw, "1M")
    argv = [a.format(p=p, tmp=tmp, raw=raw) for a in args]
    target = os.path.join(tmp, "c.qcow2")
    q = qemu(*argv)
    q_left = os.path.exists(target)
    if q_left:
        os.unlink(target)
    i = instar(*argv)
    assert i == q
    assert os.path.exists(target) == q_left
    assert read_file(p) == read_file(imgs["v3"])


def test_binding_without_key_refuses_like_qemu(images):
    _, imgs = images
    p = imgs["v3"]
    r = run(["qemu-img", "map", p])
    want = r.err.strip().split("': ", 1)[1]
    with pytest.raises(instar_py.InstarError) as ei:
        instar_py.Image(p, flags=instar_py.OPEN_READ_WRITE)
    assert ei.value.message.endswith(want)


def test_c_api_convert_to_and_from_aes(images, tmp):
    _, imgs = images
    p = imgs["unaligned"]
    a, b = os.path.join(tmp, "a.qcow2"), os.path.join(tmp, "b.qcow2")
    instar_py.convert(p, a, key_secret=PW, fmt="qcow2", options="encrypt.format=aes", target_key_secret=PW)
    qimg("convert", *OBJ, "--image-opts", opts(p), "-O", "qcow2", "-o", AES, b)
    assert read_file(a) == read_file(b)
    r1, r2 = os.path.join(tmp, "r1.raw"), os.path.join(tmp, "r2.raw")
    instar_py.convert(a, r1, key_secret=PW, fmt="raw")
    qimg("convert", *OBJ, "--image-opts", opts(b), "-O", "raw", r2)
    assert read_file(r1) == read_file(r2)
