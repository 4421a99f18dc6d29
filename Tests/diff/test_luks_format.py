"""The standalone luks format (LUKS1 as qemu 7.2's block/crypto.c): images made by the real qemu-img with every
cipher, mode and IV generator it offers, read by instar (info, map, compare, convert, check); images made and
written by instar read back by qemu-img; create, measure and resize parity; qemu's messages for missing and
wrong secrets and bad options; and hostile headers under a 1 GiB address-space limit.

LUKS creation draws random salts, master keys and UUIDs, so files made by the two tools differ: contents are
compared decrypted (`qemu-img compare` with the secret) and info JSON with the random fields masked.
"""
import json
import os
import struct

import pytest

from conftest import INSTAR, assert_same, both, instar, qemu, qemu_io, qimg, run

SECRET = "secret,id=sec0,data=123456"
OBJ = ["--object", SECRET]
WRONG = ["--object", "secret,id=sec0,data=654321"]


def opts(path, secret="sec0"):
    return f"driver=luks,key-secret={secret},file.filename={path}"


def raw_opts(path):
    return f"driver=raw,file.filename={path}"


def qemu_create(path, size="1M", extra=""):
    o = "key-secret=sec0,iter-time=10" + ("," + extra if extra else "")
    qimg("create", "-q", "-f", "luks", *OBJ, "-o", o, path, size)


# Each cipher, mode and IV generator qemu 7.2 offers through a libgcrypt build (24-byte keys outside XTS make
# qemu abort, see test_create_refuses_what_qemu_aborts_on).
VARIANTS = {
    "default": "",
    "aes128-cbc-essiv": "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
    "aes128-cbc-essiv-sha256": "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "aes192-xts-plain": "cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=plain",
    "aes256-cbc-plain64-sha1": "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1",
    "aes256-ecb": "cipher-alg=aes-256,cipher-mode=ecb,hash-alg=sha512",
    "aes128-ctr": "cipher-alg=aes-128,cipher-mode=ctr,ivgen-alg=plain64,hash-alg=sha384",
    "aes256-ctr-essiv": "cipher-alg=aes-256,cipher-mode=ctr,ivgen-alg=essiv",
    "cast5-cbc": "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=md5",
    "serpent128-cbc-essiv": "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv",
    "serpent192-xts": "cipher-alg=serpent-192,cipher-mode=xts",
    "serpent256-xts-plain": "cipher-alg=serpent-256,cipher-mode=xts,ivgen-alg=plain,hash-alg=ripemd160",
    "twofish128-xts": "cipher-alg=twofish-128,cipher-mode=xts,hash-alg=sha224",
    "twofish256-cbc-essiv": "cipher-alg=twofish-256,cipher-mode=cbc,ivgen-alg=essiv",
    "plain-with-hash": "ivgen-alg=plain,ivgen-hash-alg=sha1",
}

WRITES = ["write -P 0x5a 0 100k", "write -P 0x33 300k 8k", "write -P 0x11 1000 777", "write -z 1M 64k",
          "write -P 0x44 1900k 72k"]


@pytest.fixture(scope="module")
def qimages(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("luksfmt"))
    out = {}
    for name, extra in VARIANTS.items():
        p = os.path.join(d, name + ".luks")
        qemu_create(p, "2M", extra)
        qemu_io(*OBJ, "--image-opts", opts(p), *[a for w in WRITES for a in ("-c", w)])
        out[name] = p
    return d, out


def masked(info):
    """info JSON without the fields LUKS creation draws at random or times (uuid, iteration counts)."""
    d = json.loads(info) if isinstance(info, str) else info
    d.pop("filename", None)
    spec = d.get("format-specific", {}).get("data", {})
    for k in ("uuid", "master-key-iters"):
        if k in spec:
            spec[k] = "*"
    for s in spec.get("slots", []):
        if "iters" in s:
            s["iters"] = "*"
    return d


def same_contents(a_spec, b_spec, extra=()):
    r = qemu("compare", *OBJ, *extra, "--image-opts", a_spec, b_spec)
    assert r.rc == 0 and r.out == "Images are identical.\n", r


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
    assert_same("info", p)
    assert_same("info", "--output=json", p)
    assert_same("info", *OBJ, "--image-opts", opts(p))
    assert_same("info", "--output=json", *OBJ, "--image-opts", opts(p))
    assert_same("info", "-f", "luks", p)
    assert_same("map", "--output=json", *OBJ, "--image-opts", opts(p))
    assert_same("map", *OBJ, "--image-opts", opts(p))
    assert_same("check", *OBJ, "--image-opts", opts(p))
    assert_same("compare", *OBJ, "--image-opts", opts(p), raw_opts(a))
    assert_same("compare", *OBJ, "--image-opts", opts(p), opts(p))


def test_json_filename(qimages):
    d, imgs = qimages
    p = imgs["default"]
    spec = f'json:{{"driver":"luks","key-secret":"sec0","file":{{"driver":"file","filename":"{p}"}}}}'
    assert_same("map", "--output=json", *OBJ, spec)
    assert_same("info", *OBJ, spec)
    assert_same("compare", *OBJ, spec, spec)


@pytest.mark.parametrize("variant", ["default", "aes128-cbc-essiv", "twofish256-cbc-essiv", "cast5-cbc"])
def test_convert_from_luks_to_qcow2(qimages, variant, tmp):
    d, imgs = qimages
    p = imgs[variant]
    q, i = os.path.join(tmp, "q.qcow2"), os.path.join(tmp, "i.qcow2")
    qimg("convert", *OBJ, "--image-opts", opts(p), "-O", "qcow2", q)
    r = instar("convert", *OBJ, "--image-opts", opts(p), "-O", "qcow2", i)
    assert r.rc == 0, r
    with open(q, "rb") as fq, open(i, "rb") as fi:
        assert fq.read() == fi.read()


def test_secret_errors(qimages, tmp):
    d, imgs = qimages
    p = imgs["default"]
    out = os.path.join(tmp, "o.raw")
    for args in (["map", p], ["check", p], ["compare", p, p], ["convert", "-O", "raw", p, out],
                 ["map", *WRONG, "--image-opts", opts(p)],
                 ["check", *WRONG, "--image-opts", opts(p)],
                 ["compare", *WRONG, "--image-opts", opts(p), opts(p)],
                 ["convert", *WRONG, "--image-opts", opts(p), "-O", "raw", out],
                 ["map", *OBJ, "--image-opts", opts(p, "nosuch")],
                 ["map", "--image-opts", opts(p)],
                 ["map", *OBJ, "--image-opts", f"driver=luks,encrypt.key-secret=sec0,file.filename={p}"],
                 ["info", *WRONG, "--image-opts", opts(p)],
                 ["resize", p, "4M"],
                 ["resize", *WRONG, "--image-opts", opts(p), "4M"]):
        assert_same(*args)
        if os.path.exists(out):
            os.unlink(out)


def test_probe_and_versions(qimages, tmp):
    d, imgs = qimages
    src = imgs["default"]
    with open(src, "rb") as f:
        data = bytearray(f.read())
    v2 = os.path.join(tmp, "v2.img")
    data[6:8] = struct.pack(">H", 2)
    with open(v2, "wb") as f:
        f.write(data)
    for args in (["info", v2], ["info", "-f", "luks", v2], ["info", "--output=json", v2],
                 ["map", *OBJ, "--image-opts", opts(v2)]):
        assert_same(*args)
    # Fewer than the 8 bytes the probe needs, and a file shorter than the header.
    short = os.path.join(tmp, "short.img")
    with open(short, "wb") as f:
        f.write(bytes(data[:7]))
    assert_same("info", short)
    assert_same("info", "-f", "luks", short)


# MARK: create

CREATE_SETS = ["", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
               "cipher-alg=serpent-256,cipher-mode=xts,ivgen-alg=plain,hash-alg=sha512",
               "cipher-alg=cast5-128,cipher-mode=ecb", "cipher-alg=twofish-128,cipher-mode=ctr,hash-alg=sha1",
               "cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sha256",
               "ivgen-alg=plain64,ivgen-hash-alg=md5", "preallocation=full", "preallocation=falloc",
               "preallocation=metadata"]


@pytest.mark.parametrize("extra", CREATE_SETS)
@pytest.mark.parametrize("size", ["1M", "1000", "0"])
def test_create_parity(extra, size, tmp):
    q, i = os.path.join(tmp, "q.luks"), os.path.join(tmp, "i.luks")
    o = "key-secret=sec0,iter-time=10" + ("," + extra if extra else "")
    rq = qimg("create", "-f", "luks", *OBJ, "-o", o, q, size)
    ri = instar("create", "-f", "luks", *OBJ, "-o", o, i, size)
    assert (ri.rc, ri.out.replace(i, q), ri.err) == (rq.rc, rq.out, rq.err)
    assert os.path.getsize(i) == os.path.getsize(q)
    assert masked(qemu("info", "--output=json", i).out) == masked(qemu("info", "--output=json", q).out)
    assert masked(instar("info", "--output=json", i).out) == masked(qemu("info", "--output=json", i).out)
    # The same blocks are allocated (header, slot 0's key material, preallocated payload).
    assert abs(os.stat(i).st_blocks - os.stat(q).st_blocks) <= 128  # the filesystem may add a few blocks
    # A new payload is not zeroed (unwritten sectors decrypt to noise under each image's own key), so the two
    # cannot be compared by contents; qemu unlocks instar's image and reads it the same as instar does.
    r = qemu("convert", *OBJ, "--image-opts", opts(i), "-O", "raw", os.path.join(tmp, "q.raw"))
    assert r.rc == 0, r
    r = instar("convert", *OBJ, "--image-opts", opts(i), "-O", "raw", os.path.join(tmp, "i.raw"))
    assert r.rc == 0, r
    with open(os.path.join(tmp, "q.raw"), "rb") as fq, open(os.path.join(tmp, "i.raw"), "rb") as fi:
        assert fq.read() == fi.read()


def test_cinder_create_and_convert(tmp):
    """Cinder's calls: create with the cipher triple and --object secret, then convert -O luks onto it."""
    q, i = os.path.join(tmp, "q.luks"), os.path.join(tmp, "i.luks")
    o = "key-secret=sec0,iter-time=10,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64"
    rq = qimg("create", "-f", "luks", *OBJ, "-o", o, q, "3M")
    ri = instar("create", "-f", "luks", *OBJ, "-o", o, i, "3M")
    assert ri.out.replace(i, q) == rq.out and ri.rc == 0
    src = os.path.join(tmp, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", src, "3M")
    qemu_io("-f", "qcow2", src, "-c", "write -P 0x77 0 1M", "-c", "write -P 0x12 2M 4k")
    for target in (q, i):
        r = instar("convert", "-n", "-O", "luks", *OBJ, src, "--target-image-opts", opts(target))
        assert r.rc == 0, r
        same_contents(opts(target), f"driver=qcow2,file.filename={src}")


@pytest.mark.parametrize("extra", ["", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
                                   "cipher-alg=serpent-128,cipher-mode=xts,hash-alg=sha1"])
def test_convert_to_luks(extra, tmp):
    src = os.path.join(tmp, "src.raw")
    qimg("create", "-q", "-f", "raw", src, "2M")
    qemu_io("-f", "raw", src, "-c", "write -P 0x61 0 70k", "-c", "write -P 0x62 1M 3000", "-c", "write -P 0x63 1500k 10k")
    o = "key-secret=sec0,iter-time=10" + ("," + extra if extra else "")
    q, i = os.path.join(tmp, "q.luks"), os.path.join(tmp, "i.luks")
    rq = qimg("convert", "-O", "luks", *OBJ, "-o", o, src, q)
    ri = instar("convert", "-O", "luks", *OBJ, "-o", o, src, i)
    assert (ri.rc, ri.out, ri.err) == (rq.rc, rq.out, rq.err)
    assert os.path.getsize(i) == os.path.getsize(q)
    same_contents(opts(i), raw_opts(src))
    same_contents(opts(i), opts(q))
    assert masked(qemu("info", "--output=json", i).out) == masked(qemu("info", "--output=json", q).out)
    # Every payload sector is written, so unwritten ones do not decrypt to noise.
    assert abs(os.stat(i).st_blocks - os.stat(q).st_blocks) <= 128  # the filesystem may add a few blocks


def test_convert_errors(tmp):
    src = os.path.join(tmp, "src.raw")
    qimg("create", "-q", "-f", "raw", src, "1M")
    for o in ("iter-time=10", "key-secret=nosuch,iter-time=10", "key-secret=sec0,cipher-alg=sm4",
              "key-secret=sec0,cipher-mode=bogus", "key-secret=sec0,cipher-alg=des,iter-time=10"):
        dst = os.path.join(tmp, "o.luks")
        q = qemu("convert", "-O", "luks", *OBJ, "-o", o, src, dst)
        qexists = os.path.exists(dst)
        if qexists:
            os.unlink(dst)
        i = instar("convert", "-O", "luks", *OBJ, "-o", o, src, dst)
        assert i == q, (o, q, i)
        assert os.path.exists(dst) == qexists
        if os.path.exists(dst):
            os.unlink(dst)


CREATE_ERRORS = ["", "key-secret=nosuch", "key-secret=sec0,cipher-alg=des", "key-secret=sec0,cipher-alg=3des",
                 "key-secret=sec0,cipher-alg=sm4", "key-secret=sec0,cipher-alg=bogus",
                 "key-secret=sec0,cipher-mode=gcm", "key-secret=sec0,ivgen-alg=benbi",
                 "key-secret=sec0,ivgen-hash-alg=sha3", "key-secret=sec0,hash-alg=whirlpool",
                 "key-secret=sec0,iter-time=abc", "key-secret=sec0,preallocation=bogus",
                 "key-secret=sec0,cipher-alg=cast5-128,ivgen-alg=essiv",
                 "key-secret=sec0,cipher-alg=aes-128,ivgen-alg=essiv,ivgen-hash-alg=sha1",
                 "key-secret=sec0,cipher-alg=serpent-256,ivgen-alg=essiv,ivgen-hash-alg=sha384",
                 "key-secret=sec0,cipher-alg=twofish-128,ivgen-alg=essiv,ivgen-hash-alg=md5",
                 "key-secret=sec0,bogus=1"]


@pytest.mark.parametrize("o", CREATE_ERRORS)
def test_create_errors(o, tmp):
    p = os.path.join(tmp, "e.luks")
    args = ["create", "-f", "luks", *OBJ] + (["-o", o] if o else []) + [p, "1M"]
    q = qemu(*args)
    qexists = os.path.exists(p)
    if qexists:
        os.unlink(p)
    i = instar(*args)
    assert i == q
    assert os.path.exists(p) == qexists


def test_create_help():
    assert_same("create", "-f", "luks", "-o", "help")


def test_create_refuses_what_qemu_aborts_on(tmp):
    """qemu 7.2 aborts on an assertion when the split key does not fill whole sectors (24-byte keys outside
    XTS); instar refuses such a volume with an error and leaves no file."""
    p = os.path.join(tmp, "x.luks")
    r = instar("create", "-f", "luks", *OBJ, "-o", "key-secret=sec0,iter-time=10,cipher-alg=aes-192,cipher-mode=cbc",
               p, "1M")
    assert r.rc == 1 and "not supported" in r.err, r
    assert not os.path.exists(p)


# MARK: writing

def test_qemu_reads_what_instar_writes(tmp):
    from instar import Image, OPEN_READ_WRITE
    p, ref = os.path.join(tmp, "w.luks"), os.path.join(tmp, "ref.raw")
    r = instar("create", "-q", "-f", "luks", *OBJ, "-o", "key-secret=sec0,iter-time=10,cipher-mode=cbc,"
               "cipher-alg=aes-128,ivgen-alg=essiv", p, "1M")
    assert r.rc == 0, r
    qimg("convert", *OBJ, "--image-opts", opts(p), "-O", "raw", ref)
    pieces = [(0, b"\x01" * 512), (700, b"\x02" * 1000), (4095, b"\x03" * 3), (65536 + 17, b"\x04" * 200000),
              ((1 << 20) - 5, b"\x05" * 5)]
    with Image(p, format="luks", flags=OPEN_READ_WRITE, key_secret="123456") as img:
        assert img.size == 1 << 20
        for off, data in pieces:
            img.write(off, data)
        img.write_zeroes(300000, 70000)
        assert img.read(700, 1000) == b"\x02" * 1000
    with open(ref, "r+b") as f:
        for off, data in pieces:
            f.seek(off)
            f.write(data)
        f.seek(300000)
        f.write(bytes(70000))
    same_contents(opts(p), raw_opts(ref))
    # And instar reads back what qemu-io writes over it.
    qemu_io(*OBJ, "--image-opts", opts(p), "-c", "write -P 0x66 512 1536")
    with open(ref, "r+b") as f:
        f.seek(512)
        f.write(b"\x66" * 1536)
    assert_same("compare", *OBJ, "--image-opts", opts(p), raw_opts(ref))


def test_instar_reads_with_key_secret_api(qimages):
    from instar import Image
    d, imgs = qimages
    with Image(imgs["default"], key_secret="123456") as img:
        assert img.read(0, 4) == b"\x5a" * 4
        assert img.read(1000, 777) == b"\x11" * 777


# MARK: measure and resize

@pytest.mark.parametrize("extra", ["", ",cipher-alg=aes-128,cipher-mode=cbc", ",cipher-alg=cast5-128,cipher-mode=ecb",
                                   ",preallocation=full"])
def test_measure(extra, qimages):
    d, imgs = qimages
    # Each LUKS measure costs qemu-img its PBKDF2 benchmark (a second or more): the sizes are walked once, with the
    # default cipher; the other options change only the header, which one size shows.
    for size in ("1M", "1000", "1G", "0") if not extra else ("1000",):
        for out in ([], ["--output=json"]):
            assert_same("measure", *out, "-O", "luks", *OBJ, "-o", "key-secret=sec0,iter-time=10" + extra,
                        "--size", size)
    assert_same("measure", "-O", "luks", *OBJ, "-o", "key-secret=sec0,iter-time=10" + extra,
                "--image-opts", opts(imgs["default"]))
    assert_same("measure", "-O", "qcow2", *OBJ, "--image-opts", opts(imgs["default"]))
    assert_same("measure", "-O", "raw", *OBJ, "--image-opts", opts(imgs["default"]))


def test_measure_errors():
    for o in ([], ["-o", "key-secret=nosuch"], ["-o", "key-secret=sec0,cipher-alg=des,iter-time=10"],
              ["-o", "key-secret=sec0,cipher-alg=bogus"], ["-o", "key-secret=sec0,cipher-alg=cast5-128,ivgen-alg=essiv"]):
        assert_same("measure", "-O", "luks", *OBJ, *o, "--size", "1M")
    assert_same("measure", "-O", "luks", "-o", "iter-time=10", *OBJ, "--size", "1M")


@pytest.mark.parametrize("steps", [["+1M"], ["3M", "--shrink 1M"], ["--preallocation=full 5M"],
                                   ["--preallocation=falloc 3M"], ["--preallocation=metadata 3M"],
                                   ["1M"], ["--shrink 1000"], ["+1000"], ["0"], ["--shrink 0"]])
def test_resize(qimages, steps, tmp):
    d, imgs = qimages
    src = imgs["aes128-cbc-essiv"]
    q, i = os.path.join(tmp, "q.luks"), os.path.join(tmp, "i.luks")
    for p in (q, i):
        with open(src, "rb") as f, open(p, "wb") as g:
            g.write(f.read())
    for step in steps:
        words = step.split()
        rq = qemu("resize", *OBJ, *words[:-1], "--image-opts", opts(q), words[-1])
        ri = instar("resize", *OBJ, *words[:-1], "--image-opts", opts(i), words[-1])
        assert (ri.rc, ri.out, ri.err.replace(i, q)) == (rq.rc, rq.out, rq.err), step
        assert os.path.getsize(i) == os.path.getsize(q)
        assert abs(os.stat(i).st_blocks - os.stat(q).st_blocks) <= 128  # the filesystem may add a few blocks
    same_contents(opts(i), opts(q))
    assert_same("info", "--output=json", i.replace(i, q))


# MARK: hostile headers

def _hostile_variants(src):
    with open(src, "rb") as f:
        base = bytes(f.read(1 << 22))

    def put(data, off, fmt, value):
        d = bytearray(data)
        struct.pack_into(fmt, d, off, value)
        return bytes(d)

    def slot(i):
        return 208 + 48 * i

    def text(off, value, size=32):
        d = bytearray(base)
        d[off:off + size] = value.ljust(size, b"\0")[:size]
        return bytes(d)

    v = {
        "payload-zero": put(base, 104, ">I", 0),
        "payload-huge": put(base, 104, ">I", 0xFFFFFFFF),
        "payload-in-slot": put(base, 104, ">I", 100),
        "key-bytes-huge": put(base, 108, ">I", 0xFFFFFFFF),
        "key-bytes-zero": put(base, 108, ">I", 0),
        "key-bytes-odd": put(base, 108, ">I", 48),
        "mk-iters-zero": put(base, 164, ">I", 0),
        "slot-stripes-huge": put(base, slot(0) + 44, ">I", 0x7FFFFFFF),
        "slot-stripes-one": put(base, slot(0) + 44, ">I", 1),
        "slot-state-bad": put(base, slot(0), ">I", 0x12345678),
        "slot-iters-zero": put(base, slot(0) + 4, ">I", 0),
        "slot-offset-zero": put(base, slot(0) + 40, ">I", 0),
        "slot-offset-huge": put(base, slot(1) + 40, ">I", 0xFFFFFFF0),
        "slot-overlap": put(base, slot(1) + 40, ">I", 16),
        "slot1-active-garbage": put(base, slot(1), ">I", 0x00AC71F3),
        "cipher-unterminated": text(8, b"a" * 32),
        "cipher-unknown": text(8, b"blowfish"),
        "cipher-des": text(8, b"des"),
        "mode-no-dash": text(40, b"xtsplain64"),
        "mode-unknown": text(40, b"gcm-plain64"),
        "mode-empty": text(40, b"-plain64"),
        "ivgen-unknown": text(40, b"xts-benbi"),
        "essiv-no-hash": text(40, b"xts-essiv"),
        "essiv-bad-hash": text(40, b"xts-essiv:sha3"),
        "essiv-big-hash": text(40, b"xts-essiv:sha512"),
        "hash-unknown": text(72, b"whirlpool"),
        "mode-unterminated": text(40, b"x" * 32),
        "hash-unterminated": text(72, b"s" * 32),
        "truncated-header": base[:300],
        "truncated-key-material": base[:8192],
        "uuid-odd": text(168, b"not a uuid, and exactly forty bytes long", 40),
    }
    return v


HOSTILE_COMMANDS = {
    "info": lambda p: ["info", p],
    "info-json": lambda p: ["info", "--output=json", p],
    "info-luks": lambda p: ["info", "-f", "luks", p],
    "map": lambda p: ["map", "--output=json", *OBJ, "--image-opts", opts(p)],
    "compare": lambda p: ["compare", *OBJ, "--image-opts", opts(p), opts(p)],
}


def test_hostile_headers(qimages, tmp):
    d, imgs = qimages
    failures = []
    for name, data in _hostile_variants(imgs["default"]).items():
        p = os.path.join(tmp, name + ".luks")
        with open(p, "wb") as f:
            f.write(data)
        for cname, cmd in HOSTILE_COMMANDS.items():
            args = cmd(p)
            i = run(["prlimit", f"--as={1 << 30}", f"--cpu=60", "--", INSTAR, *args], timeout=600)
            if i.rc < 0 or i.rc > 3:
                failures.append((name, cname, "instar died", i))
                continue
            q = qemu(*args)
            if (i.rc, i.out, i.err) != (q.rc, q.out, q.err):
                failures.append((name, cname, q, i))
    assert not failures, "\n".join(map(repr, failures))


def test_hostile_iterations_bounded(qimages, tmp):
    """Iteration counts qemu would spin on for hours are refused (qemu has no limit: not compared)."""
    d, imgs = qimages
    with open(imgs["default"], "rb") as f:
        data = bytearray(f.read())
    for off in (164, 208 + 4):
        bad = bytearray(data)
        struct.pack_into(">I", bad, off, 0xFFFFFFFF)
        p = os.path.join(tmp, f"iters{off}.luks")
        with open(p, "wb") as f:
            f.write(bad)
        r = run(["prlimit", f"--as={1 << 30}", "--cpu=60", "--", INSTAR, "map", *OBJ, "--image-opts", opts(p)])
        assert r.rc == 1 and "iterations" in r.err, r
        assert_same("info", p)
