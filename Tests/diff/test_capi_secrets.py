"""Encrypted (LUKS) qcow2 through the C API and the Python binding: the key_secret fields reach the engine's
encrypt.key-secret, and what the library reads, writes, creates and reports matches qemu-img given the same
passphrase through --object secret + --image-opts. Old callers (a struct_size without the new fields) keep
working."""
import ctypes
import importlib
import json
import os

import pytest

from conftest import qimg, qemu_io, run

import instar
create_mod = importlib.import_module("instar.create")  # the package's `create` attribute is the function
image_mod = importlib.import_module("instar.image")
ops_mod = importlib.import_module("instar.ops")
from instar._lib import Error, encode, lib

PASS = "123456"
OBJ = f"secret,id=sec0,data={PASS}"
LUKS = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
SIZE = 2 * 1024 * 1024
E_ENCRYPTED = -10


def opts(path, secret="sec0"):
    return f"driver=qcow2,encrypt.key-secret={secret},file.filename={path}"


def make_luks(path, size=SIZE, extra="", obj=OBJ):
    o = LUKS + ("," + extra if extra else "")
    qimg("create", "-q", "--object", obj, "-f", "qcow2", "-o", o, path, str(size))


def fill(path, obj=OBJ):
    qemu_io("--object", obj, "--image-opts", opts(path), "-c", "write -P 0x5a 0 64k",
            "-c", "write -P 0xa5 1M 4k", "-c", "write -z 192k 64k")


def qemu_raw(path, tmp, obj=OBJ):
    out = os.path.join(tmp, os.path.basename(path) + ".raw")
    qimg("convert", "--object", obj, "--image-opts", opts(path), "-O", "raw", out)
    with open(out, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("capi_secrets"))
    p = os.path.join(d, "enc.qcow2")
    make_luks(p)
    fill(p)
    return d, p


def test_read_matches_qemu(enc):
    d, p = enc
    expected = qemu_raw(p, d)
    with instar.Image(p, key_secret=PASS) as img:
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected
        # Unaligned reads inside and across encrypted sectors.
        assert img.read(1000, 70000) == expected[1000:71000]


def qemu_open_error(*args):
    """qemu-img's message for an open failure, without its 'Could not open 'NAME': ' prefix."""
    r = run(["qemu-img", *args])
    assert r.rc != 0
    line = r.err.strip().splitlines()[0]
    return line.split("': ", 1)[1]


@pytest.mark.parametrize("key", ["wrong", None])
def test_missing_or_wrong_passphrase(enc, key):
    _, p = enc
    if key is None:
        want = qemu_open_error("map", "-f", "qcow2", p)
    else:
        want = qemu_open_error("map", "--object", f"secret,id=sec0,data={key}", "--image-opts", opts(p))
    with pytest.raises(instar.InstarError) as ei:
        instar.Image(p, key_secret=key)
    assert ei.value.code == E_ENCRYPTED
    assert ei.value.message == f"Could not open '{p}': {want}"
    # The operations that read guest data refuse the same way.
    with pytest.raises(instar.InstarError) as ei:
        instar.map(p, key_secret=key)
    assert ei.value.code == E_ENCRYPTED and ei.value.message.endswith(want)


def test_write_then_qemu_reads(tmp):
    p = os.path.join(tmp, "w.qcow2")
    make_luks(p)
    with instar.Image(p, flags=instar.OPEN_READ_WRITE, key_secret=PASS) as img:
        img.write(4096, b"\x42" * 8192)
        img.write(SIZE - 512, b"\x17" * 512)
        img.flush()
    qemu_io("--object", OBJ, "--image-opts", opts(p), "-c", "read -P 0x42 4096 8192",
            "-c", "read -P 0x17 %d 512" % (SIZE - 512), "-c", "read -P 0 0 4096")
    r = run(["qemu-img", "check", "--object", OBJ, "--image-opts", opts(p)])
    assert r.rc == 0, r
    with instar.Image(p, key_secret=PASS) as img:
        assert img.read(0, SIZE) == qemu_raw(p, tmp)


@pytest.mark.parametrize("named_id", [False, True])
def test_create_then_qemu_opens(tmp, named_id):
    p = os.path.join(tmp, "c.qcow2")
    o = {"encrypt.format": "luks", "encrypt.iter-time": 10}
    if named_id:
        o["encrypt.key-secret"] = "mine"
    instar.create(p, "qcow2", SIZE, key_secret="pass word", **o)
    obj = "secret,id=sec0,data=pass word"
    q = json.loads(qimg("info", "--output=json", p).out)
    assert q["encrypted"] is True and q["format-specific"]["data"]["encrypt"]["format"] == "luks"
    assert qemu_raw(p, tmp, obj=obj) == b"\0" * SIZE
    qemu_io("--object", obj, "--image-opts", opts(p), "-c", "write -P 0x33 0 4k")
    with instar.Image(p, key_secret="pass word") as img:
        assert img.read(0, 4096) == b"\x33" * 4096
    # The wrong passphrase does not open what was created.
    r = run(["qemu-img", "convert", "--object", "secret,id=sec0,data=nope", "--image-opts", opts(p), "-O", "raw",
             os.path.join(tmp, "x.raw")])
    assert r.rc != 0 and "Invalid password" in r.err


def test_create_plain_ignores_secret(tmp):
    p = os.path.join(tmp, "plain.qcow2")
    instar.create(p, "qcow2", SIZE, key_secret=PASS)
    q = os.path.join(tmp, "plainq.qcow2")
    qimg("create", "-q", "-f", "qcow2", q, str(SIZE))
    assert open(p, "rb").read() == open(q, "rb").read()


def test_info_map_check_match_qemu(enc):
    d, p = enc
    q = json.loads(qimg("info", "--output=json", "--object", OBJ, "--image-opts", opts(p)).out)
    i = instar.info(p, key_secret=PASS).to_dict()
    # qemu names an image opened with options by a json: filename; the library keeps the caller's name.
    q.pop("filename"), i.pop("filename")
    q.pop("actual-size", None), i.pop("actual-size", None)
    assert i == q
    qm = json.loads(qimg("map", "--output=json", "--object", OBJ, "--image-opts", opts(p)).out)
    assert instar.map(p, key_secret=PASS) == qm
    qc = json.loads(qimg("check", "--output=json", "--object", OBJ, "--image-opts", opts(p)).out)
    ic = instar.check(p, key_secret=PASS)
    qc.pop("filename"), ic.pop("filename")
    assert ic == qc


def test_compare_two_passphrases(enc, tmp):
    _, p = enc
    p2 = os.path.join(tmp, "other.qcow2")
    obj2 = "secret,id=sec1,data=other"
    make_luks(p2, obj="secret,id=sec0,data=other")
    qemu_io("--object", "secret,id=sec0,data=other", "--image-opts", opts(p2), "-c", "write -P 0x5a 0 64k",
            "-c", "write -P 0xa5 1M 4k")
    for strict in (False, True):
        args = ["qemu-img", "compare"] + (["-s"] if strict else []) + [
            "--object", OBJ, "--object", obj2, "--image-opts", opts(p), opts(p2, "sec1")]
        q = run(args)
        r = instar.compare(p, p2, strict=strict, key_secret1=PASS, key_secret2="other")
        assert r["message"] == q.out
        assert r["identical"] == (q.rc == 0)


def test_measure_matches_qemu(enc):
    _, p = enc
    q = json.loads(qimg("measure", "--output=json", "--object", OBJ, "-O", "qcow2", "--image-opts",
                        opts(p)).out)
    assert instar.measure(p, "qcow2", key_secret=PASS) == q
    q = json.loads(qimg("measure", "--output=json", "--object", OBJ, "-O", "qcow2", "-o", LUKS,
                        "--size", "1G").out)
    assert instar.measure(None, "qcow2", size=1 << 30, key_secret=PASS,
                          **{"encrypt.format": "luks", "encrypt.iter-time": 10}) == q


def test_resize_and_amend_match_qemu(tmp):
    a, b = os.path.join(tmp, "a.qcow2"), os.path.join(tmp, "b.qcow2")
    make_luks(a)
    fill(a)
    with open(a, "rb") as f, open(b, "wb") as g:
        g.write(f.read())
    instar.resize(a, 4 * SIZE, key_secret=PASS)
    qimg("resize", "-q", "--object", OBJ, "--image-opts", opts(b), str(4 * SIZE))
    instar.amend(a, "lazy_refcounts=on", key_secret=PASS)
    qimg("amend", "--object", OBJ, "-o", "lazy_refcounts=on", "--image-opts", opts(b))

    def info(path):
        j = json.loads(qimg("info", "--output=json", path).out)
        j.pop("filename"), j.pop("actual-size", None)
        return j
    assert info(a) == info(b)
    assert qemu_raw(a, tmp) == qemu_raw(b, tmp)


# ---- old callers: struct_size without the new fields -------------------------------------------------------

def short(struct_type, field):
    """An instance whose struct_size stops before `field`, as a caller built against the older header sets it."""
    s = struct_type()
    s.struct_size = getattr(struct_type, field).offset
    return s


def test_old_struct_size_open(enc, tmp):
    d, p = enc
    plain = os.path.join(tmp, "plain.qcow2")
    qimg("create", "-q", "-f", "qcow2", plain, "1M")
    L = image_mod._setup()
    for path, ok in ((plain, True), (p, False)):
        o = short(image_mod.OpenOptions, "key_secret")
        o.key_secret = encode(PASS)  # beyond struct_size: must not be read
        h, err = ctypes.c_void_p(), Error()
        rc = L.instar_open(encode(path), ctypes.byref(o), ctypes.byref(h), ctypes.byref(err))
        if ok:
            assert rc == 0, err.message
            L.instar_close(h)
        else:
            assert rc == E_ENCRYPTED and b"encrypt.key-secret" in err.message


def test_old_struct_size_operations(enc, tmp):
    _, p = enc
    plain = os.path.join(tmp, "plain2.qcow2")
    qimg("create", "-q", "-f", "qcow2", plain, "1M")
    L = ops_mod._setup()
    # map: the old struct still maps a plain image, and the secret past its end is ignored.
    for path, want in ((plain, 0), (p, E_ENCRYPTED)):
        o = short(ops_mod.MapOptions, "key_secret")
        o.max_length = -1
        o.key_secret = encode(PASS)
        out, err = ctypes.POINTER(ops_mod.Map)(), Error()
        assert L.instar_map(encode(path), ctypes.byref(o), ctypes.byref(out), ctypes.byref(err)) == want
        L.instar_map_free(out)
    # compare: the old struct ends at progress_data.
    o = short(ops_mod.CompareOptions, "key_secret1")
    o.key_secret1 = o.key_secret2 = encode(PASS)
    res, err = ops_mod.CompareResult(), Error()
    res.struct_size = ctypes.sizeof(res)
    assert L.instar_compare(encode(plain), encode(plain), ctypes.byref(o), ctypes.byref(res), ctypes.byref(err)) == 0
    assert res.identical == 1
    assert L.instar_compare(encode(p), encode(p), ctypes.byref(o), ctypes.byref(res),
                            ctypes.byref(err)) == E_ENCRYPTED
    # create: without the key_secret field an encrypted creation lacks its secret, as qemu-img without --object.
    C = create_mod._setup()
    o = short(create_mod.CreateOptions, "key_secret")
    o.format, o.size, o.options, o.key_secret = b"qcow2", SIZE, b"encrypt.format=luks,encrypt.iter-time=10", b"x"
    target = os.path.join(tmp, "old.qcow2")
    assert C.instar_create(encode(target), ctypes.byref(o), ctypes.byref(err)) != 0
    q = run(["qemu-img", "create", "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.iter-time=10", target,
             str(SIZE)])
    assert q.rc != 0 and q.err == "qemu-img: " + err.message.decode() + "\n"
    o.options = None
    assert C.instar_create(encode(target), ctypes.byref(o), ctypes.byref(err)) == 0


def test_convert_with_passphrases(tmp):
    """instar.convert decrypts a LUKS source with key_secret and encrypts a new target with target_key_secret;
    qemu-img reads the target back with the same passphrase and finds the same guest bytes."""
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "--object", "secret,id=sec0,data=srcpass", "-f", "qcow2", "-o",
         "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", src, "4M")
    run(["qemu-io", "--object", "secret,id=sec0,data=srcpass", "--image-opts",
         f"driver=qcow2,encrypt.key-secret=sec0,file.filename={src}", "-c", "write -P 0x5a 64k 300k"])
    dst = os.path.join(tmp, "dst.qcow2")
    instar.convert(src, dst, fmt="qcow2", options="encrypt.format=luks,encrypt.iter-time=10",
                   key_secret="srcpass", target_key_secret="dstpass")
    q_src = os.path.join(tmp, "q_src.raw")
    q_dst = os.path.join(tmp, "q_dst.raw")
    qimg("convert", "--object", "secret,id=s,data=srcpass", "--image-opts",
         f"driver=qcow2,encrypt.key-secret=s,file.filename={src}", "-O", "raw", q_src)
    qimg("convert", "--object", "secret,id=s,data=dstpass", "--image-opts",
         f"driver=qcow2,encrypt.key-secret=s,file.filename={dst}", "-O", "raw", q_dst)
    with open(q_src, "rb") as a, open(q_dst, "rb") as b:
        assert a.read() == b.read()
    r = run(["qemu-img", "check", "--object", "secret,id=s,data=dstpass", "--image-opts",
             f"driver=qcow2,encrypt.key-secret=s,file.filename={dst}"])
    assert r.rc == 0, r
    with pytest.raises(instar.InstarError) as e:
        instar.convert(src, os.path.join(tmp, "x.raw"), key_secret="wrong")
    assert e.value.code == -10
