"""LUKS-encrypted qcow2: reading and writing with --object secret + encrypt.key-secret, create and measure
with encrypt.format=luks, and qemu's messages for missing or wrong secrets and corrupt LUKS headers.
Images are made with the real qemu-img (iter-time kept small so PBKDF2 stays fast)."""
import json
import os
import struct
import time

import pytest

from conftest import assert_same, both, instar, qemu, qemu_io, qimg, run

SECRET = "secret,id=sec0,data=123456"
OBJ = ["--object", SECRET]


def opts(path, secret="sec0"):
    return f"driver=qcow2,encrypt.key-secret={secret},file.filename={path}"


def qemu_create(path, size="1M", extra=""):
    o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10" + ("," + extra if extra else "")
    qimg("create", "-q", "-f", "qcow2", *OBJ, "-o", o, path, size)


VARIANTS = {
    "xts": "",
    "cbc-essiv": "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
    "cbc-plain": "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1",
    "serpent": "encrypt.cipher-alg=serpent-256",
    "small-clusters": "cluster_size=4096,encrypt.hash-alg=sha512",
}


@pytest.fixture(scope="module")
def qimages(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("luks"))
    out = {}
    for name, extra in VARIANTS.items():
        p = os.path.join(d, name + ".qcow2")
        qemu_create(p, "3M", extra)
        qemu_io(*OBJ, "--image-opts", opts(p), "-c", "write -P 0x5a 0 100k", "-c", "write -P 0x33 300k 8k",
                "-c", "write -P 0x11 1000 777", "-c", "write -z 2M 64k", "-c", "write -P 0x44 3000k 72k")
        out[name] = p
    return d, out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reads_qemu_images(qimages, variant, tmp):
    d, imgs = qimages
    p = imgs[variant]
    a, b = os.path.join(tmp, "q.raw"), os.path.join(tmp, "i.raw")
    qimg("convert", *OBJ, "--image-opts", opts(p), "-O", "raw", a)
    r = instar("convert", *OBJ, "--image-opts", opts(p), "-O", "raw", b)
    assert r.rc == 0, r
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    assert_same("map", "--output=json", *OBJ, "--image-opts", opts(p))
    assert_same("map", *OBJ, "--image-opts", opts(p))
    assert_same("check", *OBJ, "--image-opts", opts(p))
    assert_same("compare", *OBJ, "--image-opts", opts(p), f"driver=raw,file.filename={a}")
    assert_same("info", *OBJ, "--image-opts", opts(p))


def test_json_filename_and_nested_options(qimages):
    d, imgs = qimages
    p = imgs["xts"]
    for spec in (f'json:{{"driver":"qcow2","encrypt.key-secret":"sec0","file":{{"driver":"file","filename":"{p}"}}}}',
                 f'json:{{"driver":"qcow2","encrypt":{{"key-secret":"sec0"}},"file":{{"driver":"file","filename":"{p}"}}}}'):
        assert_same("map", "--output=json", *OBJ, spec)
        assert_same("check", *OBJ, spec)


def test_secret_errors(qimages, tmp):
    d, imgs = qimages
    p = imgs["xts"]
    out = os.path.join(tmp, "o.raw")
    for args in (["map", p], ["check", p], ["compare", p, p], ["convert", "-O", "raw", p, out],
                 ["map", "--object", "secret,id=sec0,data=wrong", "--image-opts", opts(p)],
                 ["check", "--object", "secret,id=sec0,data=wrong", "--image-opts", opts(p)],
                 ["map", *OBJ, "--image-opts", opts(p, "nosuch")],
                 ["convert", *OBJ, "--image-opts", opts(p, "nosuch"), "-O", "raw", out],
                 # info never unlocks (metadata only), so a wrong password is fine there.
                 ["info", "--object", "secret,id=sec0,data=wrong", "--image-opts", opts(p)],
                 ["map", "--object", f"secret,id=sec0,format=base64,data={'MTIzNDU2'}", "--image-opts", opts(p)]):
        assert_same(*args)


def write_secret_file(tmp):
    f = os.path.join(tmp, "pw")
    with open(f, "w") as fh:
        fh.write("123456")
    return f


def test_secret_from_file(qimages, tmp):
    d, imgs = qimages
    f = write_secret_file(tmp)
    assert_same("map", "--output=json", "--object", f"secret,id=sec0,file={f}", "--image-opts", opts(imgs["xts"]))


def strip_random(info):
    enc = info["format-specific"]["data"]["encrypt"]
    enc.pop("uuid")
    enc.pop("master-key-iters")
    for s in enc["slots"]:
        s.pop("iters", None)
    info.pop("filename")
    # The file system's block accounting may differ by an extent block; the layout itself is compared exactly.
    info.pop("actual-size")
    return info


CREATE_CASES = [
    ("1M", ""),
    ("3M", "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv"),
    ("5M", "encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha512"),
    ("2M", "encrypt.cipher-alg=serpent-128,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"),
    ("4M", "cluster_size=4096,preallocation=metadata"),
    ("1M", "compat=0.10,cluster_size=512"),
]


@pytest.mark.parametrize("size,extra", CREATE_CASES)
def test_create_matches_qemu(tmp, size, extra):
    qd, idir = os.path.join(tmp, "q"), os.path.join(tmp, "i")
    os.mkdir(qd)
    os.mkdir(idir)
    o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10" + ("," + extra if extra else "")
    argv = ["create", "-f", "qcow2", *OBJ, "-o", o, "e.qcow2", size]
    q = qimg(*argv, cwd=qd)
    i = instar(*argv, cwd=idir)
    assert i.rc == 0, i
    assert i.out == q.out
    qi = json.loads(qimg("info", "--output=json", "e.qcow2", cwd=qd).out)
    ii = json.loads(qimg("info", "--output=json", "e.qcow2", cwd=idir).out)
    assert abs(ii["actual-size"] - qi["actual-size"]) <= 16384
    assert strip_random(ii) == strip_random(qi)
    assert os.path.getsize(os.path.join(idir, "e.qcow2")) == os.path.getsize(os.path.join(qd, "e.qcow2"))
    img = os.path.join(idir, "e.qcow2")
    r = qemu("check", *OBJ, "--image-opts", opts(img))
    assert r.rc == 0 and "No errors were found" in r.out, r

    # instar writes data into its image; the real qemu-img reads it back.
    src = os.path.join(tmp, "src.raw")
    n = int(size[:-1]) << 20
    with open(src, "wb") as f:
        f.write(os.urandom(n // 2))
        f.write(b"\0" * (n // 4))
        f.write(os.urandom(n - n // 2 - n // 4))
    r = instar("convert", "-n", *OBJ, "-f", "raw", src, "--target-image-opts", opts(img))
    assert r.rc == 0, r
    back = os.path.join(tmp, "back.raw")
    qimg("convert", *OBJ, "--image-opts", opts(img), "-O", "raw", back)
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()
    r = qemu("check", *OBJ, "--image-opts", opts(img))
    assert r.rc == 0 and "No errors were found" in r.out, r

    # qemu writes partial clusters over instar's data; instar reads what qemu reads.
    qemu_io(*OBJ, "--image-opts", opts(img), "-c", "write -P 0x66 1000 3000", "-c", "write -P 0x67 70000 513")
    qimg("convert", *OBJ, "--image-opts", opts(img), "-O", "raw", back)
    mine = os.path.join(tmp, "mine.raw")
    assert instar("convert", *OBJ, "--image-opts", opts(img), "-O", "raw", mine).rc == 0
    with open(mine, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()


def test_create_aes_is_byte_identical(tmp):
    qd, idir = os.path.join(tmp, "q"), os.path.join(tmp, "i")
    os.mkdir(qd)
    os.mkdir(idir)
    for o in ("encrypt.format=aes,encrypt.key-secret=sec0", "encryption=on,encrypt.key-secret=sec0"):
        argv = ["create", "-f", "qcow2", *OBJ, "-o", o, "a.qcow2", "1M"]
        q = qimg(*argv, cwd=qd)
        i = instar(*argv, cwd=idir)
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)
        with open(os.path.join(qd, "a.qcow2"), "rb") as a, open(os.path.join(idir, "a.qcow2"), "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("o", [
    "encrypt.format=luks",
    "encrypt.format=luks,encrypt.key-secret=nosuch",
    "encrypt.format=foo",
    "encrypt.key-secret=sec0",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=foo",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=foo",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=abc",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
    "encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1",
    "encrypt.format=aes",
    "encrypt.format=luks,encryption=on,encrypt.key-secret=sec0",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=serpent-128,encrypt.ivgen-alg=essiv,"
    "encrypt.ivgen-hash-alg=sha512",
])
def test_create_errors(tmp, o):
    qd, idir = os.path.join(tmp, "q"), os.path.join(tmp, "i")
    os.mkdir(qd)
    os.mkdir(idir)
    argv = ["create", "-f", "qcow2", *OBJ, "-o", o, "e.qcow2", "1M"]
    q = qemu(*argv, cwd=qd)
    i = instar(*argv, cwd=idir)
    assert i == q
    assert os.path.exists(os.path.join(idir, "e.qcow2")) == os.path.exists(os.path.join(qd, "e.qcow2"))


@pytest.mark.parametrize("o", [
    "encrypt.format=luks,encrypt.key-secret=sec0",
    "encrypt.format=luks,encrypt.key-secret=sec0,cluster_size=4096",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc",
    "encrypt.format=luks,encrypt.key-secret=nosuch",
    "encrypt.format=luks",
    "encrypt.format=aes",
])
def test_measure(o):
    # qemu's measure runs LUKS creation (with its PBKDF2 benchmark) to size the header; run() waits out its
    # CPU-clock race.
    q, i = both("measure", *OBJ, "-O", "qcow2", "-o", o, "--size", "1G")
    assert i == q


def corrupt(path, rel, data):
    """Overwrites bytes at `rel` inside the LUKS header of a qcow2 image."""
    with open(path, "r+b") as f:
        f.seek(0x70)
        magic, length = struct.unpack(">II", f.read(8))
        assert magic == 0x0537BE77
        off = struct.unpack(">Q", f.read(8))[0]
        f.seek(off + rel)
        f.write(data)


SLOT0 = 208


# Corrupt LUKS headers inside a qcow2 (bench/hostile_budget.py builds these too): (offset in the header, bytes).
CORRUPT_HEADERS = [
    (SLOT0 + 44, struct.pack(">I", 4001)),           # stripes
    (SLOT0 + 44, struct.pack(">I", 0xFFFFFFFF)),
    (SLOT0 + 40, struct.pack(">I", 2)),              # key material over the header
    (SLOT0 + 40, struct.pack(">I", 0xFFFFFF00)),     # key material past the payload
    (SLOT0 + 48 + 40, struct.pack(">I", 8)),         # slots 0 and 1 overlap
    (SLOT0, struct.pack(">I", 0x12345678)),          # slot state
    (SLOT0 + 4, struct.pack(">I", 0)),               # zero iterations
    (104, struct.pack(">I", 1)),                     # payload offset inside the header
    (6, struct.pack(">H", 2)),                       # version
    (8, b"x" * 32),                                  # cipher name without NUL
]


@pytest.mark.parametrize("rel,data", CORRUPT_HEADERS)
def test_corrupt_luks_headers(tmp, rel, data):
    p = os.path.join(tmp, "c.qcow2")
    qemu_create(p)
    corrupt(p, rel, data)
    assert_same("map", *OBJ, "--image-opts", opts(p))
    assert_same("info", p)


def test_huge_iteration_counts_are_refused_quickly(tmp):
    """qemu would run 4 billion PBKDF2 rounds per slot; instar refuses before starting."""
    p = os.path.join(tmp, "h.qcow2")
    qemu_create(p)
    corrupt(p, SLOT0 + 4, struct.pack(">I", 0xFFFFFFFF))
    t = time.time()
    r = instar("map", *OBJ, "--image-opts", opts(p))
    assert time.time() - t < 10
    assert r.rc == 1 and "PBKDF2 iterations" in r.err, r
    corrupt(p, SLOT0 + 4, struct.pack(">I", 1000))
    corrupt(p, 164, struct.pack(">I", 0xFFFFFFFF))
    r = instar("map", *OBJ, "--image-opts", opts(p))
    assert r.rc == 1 and "PBKDF2 iterations" in r.err, r
