"""instar.compat.oslo against oslo.utils 10.2.0's own oslo_utils.imageutils, on the same images.

The original module runs in the consumers' virtualenv (build/consumers/venv, made by `make consumer-test`) and
ours in this interpreter's path with bindings/python; one driver script (DRIVER) runs in both and prints what
each module says of every image: detect_file_format, each inspector's from_file (match, virtual size, safety
verdict with the failed checks' names and messages), a streamed InspectWrapper read, and QemuImgInfo (oslo's
from `qemu-img info --output=json` text, ours from the library through QemuImgInfo.from_path). Images are made
with qemu-img (every format oslo knows, with and without backing file and data file), genisoimage, and by hand
for MBR/GPT tables and hostile headers.
"""
import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import BUILD, LIBINSTAR, ROOT, qimg

VENV_PYTHON = os.path.join(BUILD, "consumers", "venv", "bin", "python")
BINDINGS = os.path.join(ROOT, "bindings", "python")

DRIVER = r'''
import json, subprocess, sys
mode = sys.argv[1]
if mode == "oslo":
    from oslo_utils.imageutils import format_inspector as fi
    from oslo_utils.imageutils import QemuImgInfo
    def qinfo(path):
        out = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True)
        return QemuImgInfo(out.stdout, format="json") if out.returncode == 0 else None
else:
    from instar.compat.oslo import format_inspector as fi
    from instar.compat.oslo import QemuImgInfo
    def qinfo(path):
        try:
            return QemuImgInfo.from_path(path)
        except Exception:
            return None

def err(e):
    # The order of "Multiple formats detected: a,b" follows a set's iteration, in oslo.utils as in ours.
    text = str(e)
    head = "Multiple formats detected: "
    if text.startswith(head):
        text = head + ",".join(sorted(text[len(head):].split(",")))
    return "ImageFormatError: " + text

def verdict(ins):
    try:
        ins.safety_check()
        return "safe"
    except fi.SafetyCheckFailed as e:
        return sorted("%s: %s" % (k, v) for k, v in e.failures.items())
    except fi.ImageFormatError as e:
        return "ImageFormatError"

def describe(ins):
    return {"name": ins.NAME, "match": bool(ins.format_match), "virtual_size": ins.virtual_size,
            "safety": verdict(ins)}

out = {}
for path in sys.argv[2:]:
    r = {}
    try:
        det = fi.detect_file_format(path)
        r["detect"] = describe(det) if det is not None else None
    except fi.ImageFormatError as e:
        r["detect"] = err(e)
    for name in sorted(fi.ALL_FORMATS):
        try:
            r["from_file " + name] = describe(fi.get_inspector(name).from_file(path))
        except fi.ImageFormatError:
            r["from_file " + name] = "ImageFormatError"
    with open(path, "rb") as f:
        w = fi.InspectWrapper(f)
        while w.read(65536):
            pass
        w.close()
        try:
            r["stream"] = describe(w.format)
        except fi.ImageFormatError as e:
            r["stream"] = err(e)
    q = qinfo(path)
    r["QemuImgInfo"] = None if q is None else {k: getattr(q, k) for k in (
        "image", "backing_file", "backing_file_format", "file_format", "virtual_size", "cluster_size",
        "disk_size", "snapshots", "encrypted", "format_specific")}
    out[path] = r
print(json.dumps(out, sort_keys=True))
'''


def run_driver(mode, paths):
    if mode == "oslo":
        python, env = VENV_PYTHON, dict(os.environ)
    else:
        python, env = sys.executable, dict(os.environ, PYTHONPATH=BINDINGS, INSTAR_LIBRARY=LIBINSTAR)
    r = subprocess.run([python, "-c", DRIVER, mode] + paths, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def same(paths, info=True):
    """Both modules say the same of every image. info=False leaves QemuImgInfo out: instar's engine does not
    open vpc, vhdx, vmdk, luks, vdi or qed yet (issues 10 and 13), though its probes read them."""
    if not os.path.exists(VENV_PYTHON):
        pytest.skip("oslo.utils' virtualenv is missing: run `make consumer-test` once")
    theirs = run_driver("oslo", paths)
    ours = run_driver("instar", paths)
    for p in paths:
        if not info:
            theirs[p].pop("QemuImgInfo")
            ours[p].pop("QemuImgInfo")
        assert ours[p] == theirs[p], p
    return ours


def img(tmp, name, fmt, size="16M", *opts):
    path = os.path.join(tmp, name)
    qimg("create", "-q", "-f", fmt, *opts, path, size)
    return path


def test_qcow2_images(tmp):
    raw = img(tmp, "base.raw", "raw")
    plain = img(tmp, "plain.qcow2", "qcow2", "129M")
    v2 = img(tmp, "v2.qcow2", "qcow2", "7M", "-o", "compat=0.10")
    backed = os.path.join(tmp, "backed.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", raw, "-F", "raw", backed)
    datafile = img(tmp, "df.qcow2", "qcow2", "16M", "-o", "data_file=" + os.path.join(tmp, "df.data"))
    extl2 = img(tmp, "extl2.qcow2", "qcow2", "16M", "-o", "extended_l2=on")
    zstd = img(tmp, "zstd.qcow2", "qcow2", "16M", "-o", "compression_type=zstd")
    res = same([raw, plain, v2, backed, datafile, extl2, zstd])
    # The verdicts themselves: what Glance relies on.
    assert res[plain]["detect"]["safety"] == "safe"
    assert res[plain]["detect"]["virtual_size"] == 129 << 20
    assert any(f.startswith("backing_file") for f in res[backed]["detect"]["safety"])
    assert any(f.startswith("data_file") for f in res[datafile]["detect"]["safety"])
    assert any(f.startswith("unknown_features") for f in res[extl2]["detect"]["safety"])
    assert res[raw]["detect"]["name"] == "raw"


def test_other_formats(tmp):
    paths = [
        img(tmp, "a.vhd", "vpc", "17M"),
        img(tmp, "fixed.vhd", "vpc", "17M", "-o", "subformat=fixed"),
        img(tmp, "a.vhdx", "vhdx", "33M"),
        img(tmp, "a.vdi", "vdi", "9M"),
        img(tmp, "a.qed", "qed", "9M"),
        img(tmp, "sparse.vmdk", "vmdk", "20M"),
        img(tmp, "stream.vmdk", "vmdk", "20M", "-o", "subformat=streamOptimized"),
        img(tmp, "flat.vmdk", "vmdk", "4M", "-o", "subformat=monolithicFlat"),
        img(tmp, "split.vmdk", "vmdk", "4M", "-o", "subformat=twoGbMaxExtentSparse"),
    ]
    res = same(paths, info=False)
    assert res[paths[0]]["detect"]["name"] == "vhd"
    assert res[paths[2]]["detect"]["name"] == "vhdx"
    assert res[paths[4]]["detect"]["safety"] != "safe"     # qed is always refused
    assert res[paths[5]]["detect"]["safety"] == "safe"
    assert res[paths[7]]["detect"]["safety"] != "safe"     # a flat descriptor names an extent file


def test_luks(tmp):
    path = os.path.join(tmp, "a.luks")
    qimg("create", "-q", "-f", "luks", "--object", "secret,id=s0,data=secret-passphrase",
         "-o", "key-secret=s0,iter-time=10", path, "8M")
    res = same([path], info=False)   # a LUKS volume of its own is not a format instar's engine opens yet
    assert res[path]["detect"]["name"] == "luks"


def test_iso(tmp):
    src = os.path.join(tmp, "content")
    with open(src, "wb") as f:
        f.write(b"x" * (3 << 20))
    paths = []
    for name, extra in (("a.iso", []), ("udf.iso", ["-udf"])):
        out = os.path.join(tmp, name)
        subprocess.run(["genisoimage", "-quiet"] + extra + ["-V", "TEST", "-o", out, src], check=True)
        paths.append(out)
    # An ISO carrying a qcow2 header in its system area: two formats match, oslo's polyglot refusal.
    poly = os.path.join(tmp, "poly.iso")
    with open(paths[0], "rb") as f:
        data = bytearray(f.read())
    with open(img(tmp, "inner.qcow2", "qcow2"), "rb") as f:
        data[0:512] = f.read(512)
    with open(poly, "wb") as f:
        f.write(data)
    res = same(paths + [poly])
    assert res[paths[0]]["detect"]["name"] == "iso"
    assert res[poly]["detect"].startswith("ImageFormatError")


def mbr_disk(path, entries, size=1 << 20):
    data = bytearray(size)
    data[510:512] = b"\x55\xaa"
    for i, (boot, chs, ostype, lba, count) in enumerate(entries):
        data[446 + 16 * i:462 + 16 * i] = struct.pack("<B3BB3BII", boot, *chs, ostype, 0, 0, 0, lba, count)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_partition_tables(tmp):
    paths = [
        mbr_disk(os.path.join(tmp, "gpt.img"), [(0, (0, 2, 0), 0xEE, 1, 2047)]),
        mbr_disk(os.path.join(tmp, "dos.img"), [(0x80, (0, 1, 1), 0x83, 63, 100), (0, (1, 1, 1), 0x82, 200, 100)]),
        mbr_disk(os.path.join(tmp, "badboot.img"), [(0x12, (0, 2, 0), 0xEE, 1, 2047)]),
        mbr_disk(os.path.join(tmp, "gptextra.img"), [(0, (0, 2, 0), 0xEE, 1, 2047), (0, (0, 2, 0), 0x83, 9, 9)]),
        mbr_disk(os.path.join(tmp, "badlba.img"), [(0, (0, 2, 0), 0xEE, 2, 2047)]),
        mbr_disk(os.path.join(tmp, "badchs.img"), [(0, (0, 3, 0), 0xEE, 1, 2047)]),
        mbr_disk(os.path.join(tmp, "empty.img"), []),
    ]
    res = same(paths)
    assert res[paths[0]]["detect"]["name"] == "gpt"
    assert res[paths[0]]["detect"]["safety"] == "safe"
    assert res[paths[2]]["detect"]["safety"] != "safe"


def test_hostile_headers(tmp):
    """Headers edited to lie: a vmdk whose descriptor names a host file, a vmdk claiming a footer that is not
    there, a qcow2 of version 1 and 4, a vhdx whose region table is garbage, and random bytes."""
    paths = []
    sparse = img(tmp, "evil.vmdk", "vmdk", "4M")
    with open(sparse, "r+b") as f:
        f.seek(512)
        desc = f.read(1024)
        f.seek(512)
        f.write(desc.replace(b'"evil-flat.vmdk"', b'"/etc/hosts"').replace(b'SPARSE "evil.vmdk"',
                                                                             b'SPARSE "/etc/passwd"'))
    paths.append(sparse)
    footer = img(tmp, "footer.vmdk", "vmdk", "4M", "-o", "subformat=streamOptimized")
    with open(footer, "r+b") as f:
        f.seek(56)
        f.write(struct.pack("<Q", (1 << 64) - 1))
    paths.append(footer)
    for v in (1, 4):
        q = img(tmp, "v%d.qcow2" % v, "qcow2")
        with open(q, "r+b") as f:
            f.seek(4)
            f.write(struct.pack(">I", v))
        paths.append(q)
    vhdx = img(tmp, "bad.vhdx", "vhdx", "8M")
    with open(vhdx, "r+b") as f:
        f.seek(192 * 1024)
        f.write(b"\xff" * 64)
    paths.append(vhdx)
    rnd = os.path.join(tmp, "random.bin")
    with open(rnd, "wb") as f:
        f.write(bytes((i * 7919 + 13) % 251 for i in range(300000)))
    paths.append(rnd)
    res = same(paths, info=False)
    assert res[sparse]["detect"]["safety"] != "safe"
    assert res[rnd]["detect"]["name"] == "raw"


def test_from_path_without_json(tmp):
    """QemuImgInfo.from_path fills the properties from the library's structs: equal to oslo's reading of
    qemu-img's JSON (the driver compares every property), including snapshots and an encrypted image."""
    q = img(tmp, "snap.qcow2", "qcow2")
    qimg("snapshot", "-c", "first", q)
    enc = os.path.join(tmp, "enc.qcow2")
    qimg("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", enc, "4M")
    res = same([q, enc])
    assert res[q]["QemuImgInfo"]["snapshots"][0]["name"] == "first"
    assert res[enc]["QemuImgInfo"]["encrypted"] == "yes"


def test_mutated_headers(tmp):
    """Seeded random byte changes in the structures the inspectors read (the first 1.5 KiB, the vhdx region and
    metadata tables) of qemu-img-made images of each format: both modules say the same of all 70 images."""
    import random
    seeds = [img(tmp, "seed.qcow2", "qcow2", "8M"), img(tmp, "seed.vmdk", "vmdk", "8M"),
             img(tmp, "seed-so.vmdk", "vmdk", "8M", "-o", "subformat=streamOptimized"),
             img(tmp, "seed.vhdx", "vhdx", "8M"), img(tmp, "seed.vhd", "vpc", "8M"), img(tmp, "seed.vdi", "vdi", "8M"),
             img(tmp, "seed.qed", "qed", "8M")]
    rnd = random.Random(1234)
    paths = []
    for seed in seeds:
        with open(seed, "rb") as f:
            data = f.read()
        for k in range(10):
            d = bytearray(data)
            for _ in range(rnd.randint(1, 6)):
                lo, hi = rnd.choice([(0, 1536), (0, 80), (192 << 10, (192 << 10) + 256), (256 << 10, (256 << 10) + 256),
                                     (1 << 20, (1 << 20) + 512)])
                if hi > len(d):
                    lo, hi = 0, min(1536, len(d))
                d[rnd.randrange(lo, hi)] = rnd.randrange(256)
            path = "%s.m%d" % (seed, k)
            with open(path, "wb") as f:
                f.write(d)
            paths.append(path)
    same(paths, info=False)
