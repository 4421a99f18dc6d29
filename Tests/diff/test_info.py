"""`instar info` against `qemu-img info` 7.2: stdout, stderr and exit code, human and JSON, single images and
--backing-chain, plus the C API (instar.info_json / instar.info) against qemu-img's JSON.

The corpus is made once per module with the real qemu-img/qemu-io. Every comparison runs qemu-img on the spot.
"""
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import INSTAR, QemuNbd, assert_same, qemu, qemu_io, qimg, run

import instar

SECRET = "secret,id=sec0,data=pass123"

# name -> how to make it (run in the corpus directory). Raw first, then qcow2 variants.
RAW = {
    "empty.raw": [["create", "-f", "raw", "empty.raw", "0"]],
    "s512.raw": [["create", "-f", "raw", "s512.raw", "512"]],
    "odd.raw": [["create", "-f", "raw", "odd.raw", "1000000"]],
    "sparse.raw": [["create", "-f", "raw", "sparse.raw", "64M"]],
    "full.raw": [["create", "-f", "raw", "-o", "preallocation=full", "full.raw", "3M"]],
    "big.raw": [["create", "-f", "raw", "big.raw", "2T"]],
}

QCOW2 = {
    "q_default.qcow2": [["create", "-f", "qcow2", "q_default.qcow2", "64M"]],
    "q_compat010.qcow2": [["create", "-f", "qcow2", "-o", "compat=0.10", "q_compat010.qcow2", "64M"]],
    "q_compat11.qcow2": [["create", "-f", "qcow2", "-o", "compat=1.1", "q_compat11.qcow2", "64M"]],
    "q_c512.qcow2": [["create", "-f", "qcow2", "-o", "cluster_size=512", "q_c512.qcow2", "8M"]],
    "q_c4k.qcow2": [["create", "-f", "qcow2", "-o", "cluster_size=4096", "q_c4k.qcow2", "64M"]],
    "q_c2m.qcow2": [["create", "-f", "qcow2", "-o", "cluster_size=2M", "q_c2m.qcow2", "64M"]],
    "q_l2ext.qcow2": [["create", "-f", "qcow2", "-o", "extended_l2=on", "q_l2ext.qcow2", "64M"]],
    "q_lazy.qcow2": [["create", "-f", "qcow2", "-o", "lazy_refcounts=on", "q_lazy.qcow2", "64M"]],
    "q_rc1.qcow2": [["create", "-f", "qcow2", "-o", "refcount_bits=1", "q_rc1.qcow2", "64M"]],
    "q_rc64.qcow2": [["create", "-f", "qcow2", "-o", "refcount_bits=64", "q_rc64.qcow2", "64M"]],
    "q_zstd.qcow2": [["create", "-f", "qcow2", "-o", "compression_type=zstd", "q_zstd.qcow2", "64M"]],
    "q_meta.qcow2": [["create", "-f", "qcow2", "-o", "preallocation=metadata", "q_meta.qcow2", "64M"]],
    "q_falloc.qcow2": [["create", "-f", "qcow2", "-o", "preallocation=falloc", "q_falloc.qcow2", "16M"]],
    "q_odd.qcow2": [["create", "-f", "qcow2", "q_odd.qcow2", "1000001"]],
    "q_data.qcow2": [["create", "-f", "qcow2", "-o", "data_file=q_data.dat", "q_data.qcow2", "16M"]],
    "q_dataraw.qcow2": [["create", "-f", "qcow2", "-o", "data_file=q_dataraw.dat,data_file_raw=on",
                         "q_dataraw.qcow2", "16M"]],
    "q_snap.qcow2": [["create", "-f", "qcow2", "q_snap.qcow2", "64M"],
                     ["snapshot", "-c", "snap1", "q_snap.qcow2"],
                     ["snapshot", "-c", "a much longer snapshot name", "q_snap.qcow2"],
                     ["snapshot", "-c", "snap1", "q_snap.qcow2"]],
    "q_snapdel.qcow2": [["create", "-f", "qcow2", "q_snapdel.qcow2", "64M"],
                        ["snapshot", "-c", "s1", "q_snapdel.qcow2"],
                        ["snapshot", "-c", "s2", "q_snapdel.qcow2"],
                        ["snapshot", "-d", "s1", "q_snapdel.qcow2"]],
    "q_bitmaps.qcow2": [["create", "-f", "qcow2", "q_bitmaps.qcow2", "64M"],
                        ["bitmap", "--add", "q_bitmaps.qcow2", "bm0"],
                        ["bitmap", "--add", "--disable", "q_bitmaps.qcow2", "bm1"],
                        ["bitmap", "--add", "-g", "1M", "q_bitmaps.qcow2", "b-\u00e9"]],
    "q_luks.qcow2": [["create", "-f", "qcow2", "--object", SECRET, "-o",
                      "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=200", "q_luks.qcow2", "16M"]],
    "base.qcow2": [["create", "-f", "qcow2", "base.qcow2", "64M"]],
    "base.raw": [["create", "-f", "raw", "base.raw", "64M"]],
    "mid.qcow2": [["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"]],
    "top.qcow2": [["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]],
    "sub/over.qcow2": [["create", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "sub/over.qcow2"]],
    "dotted.qcow2": [["create", "-f", "qcow2", "-b", "sub/../base.qcow2", "-F", "qcow2", "-u", "dotted.qcow2",
                      "64M"]],
    "over_raw.qcow2": [["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "over_raw.qcow2"]],
    "abs.qcow2": None,  # made in the fixture: needs the absolute path
    "missing.qcow2": [["create", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "-u", "missing.qcow2", "64M"]],
    "bigger.qcow2": [["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "bigger.qcow2", "128M"]],
    "q_dirty.qcow2": None,  # made in the fixture: qemu-io killed after an allocating write
    "q_aes.qcow2": [["create", "-f", "qcow2", "--object", SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=sec0",
                     "q_aes.qcow2", "16M"]],
    "q010_snap.qcow2": [["create", "-f", "qcow2", "-o", "compat=0.10", "q010_snap.qcow2", "16M"],
                        ["snapshot", "-c", "old", "q010_snap.qcow2"]],
    "q_jsonback.qcow2": [["create", "-f", "qcow2", "-u", "-F", "raw", "-b",
                          'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"}}',
                          "q_jsonback.qcow2", "1M"]],
    "q_jsonwin.qcow2": [["create", "-f", "qcow2", "-u", "-F", "raw", "-b",
                         'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"},"offset":512}',
                         "q_jsonwin.qcow2", "1M"]],
    "nofmt.qcow2": None,  # made in the fixture: backing format extension hidden
    "q_nodata.qcow2": [["create", "-f", "qcow2", "-o", "data_file=q_nodata.dat", "q_nodata.qcow2", "1M"],
                       ["info", "q_nodata.qcow2"]],  # the data file is removed in the fixture
    "sp ace \u00e9.raw": [["create", "-f", "raw", "sp ace \u00e9.raw", "1M"]],
    'q"uo\\te.raw': [["create", "-f", "raw", 'q"uo\\te.raw', "1M"]],
    "tab\there.raw": [["create", "-f", "raw", "tab\there.raw", "1M"]],
    "q_written.qcow2": None,  # made in the fixture: some data and a compressed cluster
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("info"))
    os.mkdir(os.path.join(d, "sub"))
    for table in (RAW, QCOW2):
        for name, steps in table.items():
            for step in steps or []:
                _make(step, d)
    with open(os.path.join(d, "data.raw"), "wb") as f:
        f.write(os.urandom(1 << 20))
        f.seek(5 << 20)
        f.write(b"tail")
    qimg("create", "-f", "qcow2", "-b", os.path.join(d, "base.qcow2"), "-F", "qcow2", "abs.qcow2", cwd=d)
    qimg("create", "-f", "qcow2", "-o", "lazy_refcounts=on", "q_dirty.qcow2", "64M", cwd=d)
    subprocess.run(["qemu-io", "-c", "write 0 64k", "-c", "sigraise 9", "q_dirty.qcow2"], cwd=d,
                   capture_output=True)
    qimg("create", "-f", "qcow2", "q_written.qcow2", "64M", cwd=d)
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -c 4M 64k", "-c", "write -z 8M 64k",
            "q_written.qcow2", cwd=d)
    qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "nofmt.qcow2", cwd=d)
    _hide_backing_format(os.path.join(d, "nofmt.qcow2"))
    os.remove(os.path.join(d, "q_nodata.dat"))
    qimg("create", "-f", "qcow2", "chain_missing.qcow2", "1M", cwd=d)
    qimg("create", "-f", "qcow2", "-b", "chain_missing.qcow2", "-F", "qcow2", "chain_top.qcow2", cwd=d)
    os.remove(os.path.join(d, "chain_missing.qcow2"))
    return d


def _make(step, cwd):
    """Runs one qemu-img setup step (through qimg, which waits out qemu's LUKS CPU-clock race)."""
    qimg(*step, cwd=cwd)


def _hide_backing_format(path):
    """Renames the backing-format header extension (qcow2.txt: magic 0xe2792aca) to an unknown one, which qemu
    ignores: the image then names its backing file without a format."""
    with open(path, "r+b") as f:
        hdr = f.read(4096)
        pos = int.from_bytes(hdr[100:104], "big")  # header_length (version 3)
        while pos + 8 <= len(hdr):
            magic = int.from_bytes(hdr[pos:pos + 4], "big")
            length = int.from_bytes(hdr[pos + 4:pos + 8], "big")
            if magic == 0:
                break
            if magic == 0xE2792ACA:
                f.seek(pos)
                f.write((0x12345678).to_bytes(4, "big"))
                return
            pos += 8 + (length + 7) // 8 * 8
    raise AssertionError("no backing format extension")


RAW_NAMES = sorted(RAW) + ["data.raw"]
QCOW2_NAMES = sorted(QCOW2) + ["chain_top.qcow2"]
for _n in [n for n in QCOW2_NAMES if n.endswith(".raw")]:
    QCOW2_NAMES.remove(_n)
    RAW_NAMES.append(_n)
ALL = RAW_NAMES + QCOW2_NAMES
OUTPUTS = [[], ["--output=json"], ["--output=human"], ["--backing-chain"], ["--backing-chain", "--output=json"]]


def _same(corpus, *args):
    return assert_same("info", *args, cwd=corpus)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("out", OUTPUTS, ids=["human", "json", "human2", "chain", "chainjson"])
def test_info_corpus(corpus, name, out):
    _same(corpus, *out, name)


@pytest.mark.parametrize("name", ["odd.raw", "q_default.qcow2", "top.qcow2", "q_snap.qcow2"])
def test_info_with_format(corpus, name):
    fmt = "raw" if name.endswith(".raw") else "qcow2"
    _same(corpus, "-f", fmt, "--output=json", name)
    _same(corpus, "--format", fmt, "--backing-chain", name)


def test_luks_with_secret(corpus):
    for out in ([], ["--output=json"]):
        _same(corpus, "--object", SECRET, *out, "q_luks.qcow2")
        _same(corpus, "--object", SECRET, "--image-opts", *out,
              "driver=qcow2,file.filename=q_luks.qcow2,encrypt.key-secret=sec0")


def test_subdirectory_paths(corpus):
    # The backing name is resolved against the directory of the image as the user named it.
    for out in ([], ["--output=json"], ["--backing-chain"]):
        _same(corpus, *out, "sub/over.qcow2")
        _same(corpus, *out, "./sub/../sub/over.qcow2")
        _same(corpus, *out, os.path.join(corpus, "sub", "over.qcow2"))
    assert_same("info", "--backing-chain", "info/sub/over.qcow2", cwd=os.path.dirname(corpus))
    # Data files are not opened by info, so a relative data file name works from any directory.
    for name in ("q_data.qcow2", "q_dataraw.qcow2", "q_nodata.qcow2"):
        _same(os.path.join(corpus, "sub"), "--output=json", "../" + name)


JSON_NAMES = [
    'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"},"offset":512,"size":1024}',
    'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"},"offset":4096}',
    'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"},"size":65536}',
    'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"},"offset":0}',
    'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"},"offset":"512"}',
    'json:{"file":{"driver":"file","filename":"data.raw"},"offset":512}',
    'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"}}',
    'json:{"driver":"raw","file":{"filename":"data.raw"}}',
    'json:{"file":{"filename":"odd.raw"}}',
    'json:{"driver":"raw","file.driver":"file","file.filename":"data.raw","size":512}',
    'json:{"driver":"raw","file":{"driver":"file","filename":"data.raw"},"offset":512,"size":99999999}',
    'json:{"driver":"raw","file":"data.raw"}',
    'json:{"driver":"raw"}',
    'json:{}',
    'json:[1]',
    'json:{"driver":"raw","file":{"driver":"file","filename":"nosuch.raw"}}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"q_default.qcow2"}}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"sub/over.qcow2"}}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"},"backing":null}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"q_luks.qcow2"},"encrypt":{"key-secret":"sec0"}}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"q_luks.qcow2"},"encrypt.key-secret":"sec0"}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"q_default.qcow2"},"lazy-refcounts":true}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"q_default.qcow2"},"read-only":true}',
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"q_default.qcow2","locking":"off"}}',
    'json:{"driver":"raw","file":{"driver":"file","filename":"odd.raw"},"detect-zeroes":"on"}',
    'json:',
    'json:{"driver":"raw","file":{"driver":"file","filename":""}}',
    'json:{"driver":1,"file":{"filename":"odd.raw"}}',
    'json:{"driver":"raw","file":{"filename":"odd.raw"},"offset":-1}',
    'json:{"driver":"raw","file":{"filename":"odd.raw"},"offset":"abc"}',
    'json:{"driver":"raw","file":{"filename":"odd.raw"},"offset":"1k"}',
    'json:{"driver":"raw","file":{"filename":"odd.raw"},"bogus":1}',
    'json:{"driver":"bogus","file":{"filename":"odd.raw"}}',
]


@pytest.mark.parametrize("name", JSON_NAMES)
@pytest.mark.parametrize("out", [[], ["--output=json"], ["--backing-chain", "--output=json"]],
                         ids=["human", "json", "chain"])
def test_json_filenames(corpus, name, out):
    _same(corpus, "--object", SECRET, *out, name)


IMAGE_OPTS = [
    "driver=raw,file.filename=data.raw",
    "driver=raw,file.driver=file,file.filename=data.raw,offset=512",
    "file.filename=data.raw,driver=raw,size=512",
    "driver=raw,file.filename=data.raw,offset=4096,size=8192",
    "file.filename=odd.raw",
    "driver=raw,file.filename=data.raw,force-share=on",
    "driver=qcow2,file.filename=top.qcow2",
    "driver=raw,file.filename=data.raw,,x",
    "driver=raw,file.filename=nosuch",
    "data.raw",
    "=x",
    "driver=raw,file.filename=data.raw,offset=1k,size=2K",
    "driver=raw,file.filename=data.raw,nooffset",
]


@pytest.mark.parametrize("opts", IMAGE_OPTS)
def test_image_opts(corpus, opts):
    _same(corpus, "--image-opts", opts)
    _same(corpus, "--image-opts", "--output=json", opts)
    _same(corpus, "--image-opts", "--backing-chain", "--output=json", opts)


@pytest.mark.parametrize("obj", [
    SECRET, "secret,id=sec0", "secret,data=x", "secret", "bogus,id=x", "id=x,data=y",
    "secret,id=s,data=eA==,format=base64", "secret,id=s,data=x,format=hex", "secret,id=s,file=/nonexist",
    "secret,id=s,data=x,bogus=1", "secret,id=1bad,data=x", "secret,id=a_b-c.d,data=x", "",
])
def test_object_definitions(corpus, obj):
    _same(corpus, "--object", obj, "odd.raw")


@pytest.mark.parametrize("args", [
    ["nosuch.img"],
    [""],
    ["--output=json", "nosuch.img"],
    ["-f", "qcow2", "odd.raw"],
    ["-f", "bogus", "odd.raw"],
    ["--output=xml", "odd.raw"],
    ["--output", "odd.raw"],
    ["--output=", "odd.raw"],
    ["-f"],
    [],
    ["odd.raw", "s512.raw"],
    ["-t", "none", "odd.raw"],
    ["--bogus", "odd.raw"],
    ["sub"],
    ["--backing-chain", "missing.qcow2"],
    ["--backing-chain", "--output=json", "missing.qcow2"],
    ["--backing-chain", "chain_top.qcow2"],
    ["--image-opts", "-f", "raw", "file.filename=odd.raw"],
    ["--image-opts", "-U", "driver=raw,file.filename=odd.raw,force-share=off"],
    ["-U", "--force-share", "odd.raw"],
    ["odd.raw", "--output=json"],
])
def test_info_errors_and_options(corpus, args):
    _same(corpus, *args)


@pytest.mark.parametrize("name", ALL)
def test_capi_json_text(corpus, name):
    q = qemu("info", "--output=json", name, cwd=corpus)
    if q.rc != 0:
        return
    cwd = os.getcwd()
    os.chdir(corpus)
    try:
        assert instar.info_json(name) == q.out
        assert instar.info(name).to_dict() == json.loads(q.out)
        qc = qemu("info", "--output=json", "--backing-chain", name, cwd=corpus)
        if qc.rc == 0:
            assert instar.info_json(name, backing_chain=True) == qc.out
            assert [i.to_dict() for i in instar.info(name, backing_chain=True)] == json.loads(qc.out)
        qh = qemu("info", name, cwd=corpus)
        assert instar.info_human(name) == qh.out
    finally:
        os.chdir(cwd)


def test_capi_errors(corpus):
    q = qemu("info", "nosuch.img", cwd=corpus)
    with pytest.raises(instar.InstarError) as e:
        instar.info(os.path.join(corpus, "nosuch.img"))
    assert e.value.code == -3
    assert "instar: " + e.value.message.replace(corpus + "/", "") + "\n" == q.err


@pytest.mark.parametrize("name,fmt", [("odd.raw", "raw"), ("q_default.qcow2", "qcow2")])
def test_force_share_against_qemu_nbd(corpus, name, fmt):
    p = QemuNbd(name, fmt, cwd=corpus)
    try:
        # Without -U the lock held by qemu-nbd is refused; with -U info goes ahead.
        _same(corpus, name)
        _same(corpus, "-U", name)
        _same(corpus, "-U", "--output=json", name)
        _same(corpus, "--force-share", "--backing-chain", name)
    finally:
        p.stop()


@pytest.mark.parametrize("name,fmt", [("odd.raw", "raw"), ("q_default.qcow2", "qcow2")])
def test_capi_force_share_against_qemu_nbd(corpus, name, fmt):
    p = QemuNbd(name, fmt, cwd=corpus)
    path = os.path.join(corpus, name)
    try:
        q = qemu("info", "-U", "--output=json", path)
        assert instar.info_json(path, force_share=True) == q.out
        # raw shares writes with qemu-nbd; qcow2 does not: the library must fail exactly when qemu-img does.
        q = qemu("info", "--output=json", path)
        if q.rc == 0:
            assert instar.info_json(path) == q.out
        else:
            with pytest.raises(instar.InstarError) as e:
                instar.info(path)
            assert e.value.code == -6
            assert "instar: " + e.value.message + "\n" == q.err
    finally:
        p.stop()


def test_infinite_loop(corpus):
    # Two images naming each other (made with -u so that create does not open them).
    qimg("create", "-f", "qcow2", "-u", "-b", "loop_b.qcow2", "-F", "qcow2", "loop_a.qcow2", "1M", cwd=corpus)
    qimg("create", "-f", "qcow2", "-u", "-b", "loop_a.qcow2", "-F", "qcow2", "loop_b.qcow2", "1M", cwd=corpus)
    _same(corpus, "loop_a.qcow2")
    _same(corpus, "--backing-chain", "loop_a.qcow2")
    _same(corpus, "--backing-chain", "--output=json", "loop_a.qcow2")


def test_corrupt_flag(corpus):
    # Set the "corrupt" incompatible feature bit (qcow2.txt: header bytes 72-79, bit 1).
    shutil.copy(os.path.join(corpus, "q_default.qcow2"), os.path.join(corpus, "q_corrupt.qcow2"))
    with open(os.path.join(corpus, "q_corrupt.qcow2"), "r+b") as f:
        f.seek(72)
        v = int.from_bytes(f.read(8), "big") | 2
        f.seek(72)
        f.write(v.to_bytes(8, "big"))
    _same(corpus, "q_corrupt.qcow2")
    _same(corpus, "--output=json", "q_corrupt.qcow2")


@pytest.mark.parametrize("name", ["q_bitmaps.qcow2", "q_luks.qcow2", "q_aes.qcow2", "q_dataraw.qcow2",
                                  "q_compat010.qcow2", "q_zstd.qcow2", "q_snap.qcow2", "top.qcow2", "odd.raw"])
def test_capi_struct_fields(corpus, name):
    """The typed members of instar_info_t agree with qemu-img's JSON."""
    import ctypes
    import importlib
    m = importlib.import_module("instar.info")
    q = json.loads(qemu("info", "--output=json", "--backing-chain", name, cwd=corpus).out)
    L = m._setup()
    opts = m._options(None, False, True)
    err = m.Error()
    out = ctypes.POINTER(m._Info)()
    path = os.path.join(corpus, name)
    assert L.instar_info(path.encode(), ctypes.byref(opts), ctypes.byref(out), ctypes.byref(err)) == 0
    try:
        node = out
        for expect in q:
            n = node.contents
            assert n.virtual_size == expect["virtual-size"]
            assert n.cluster_size == expect.get("cluster-size", -1)
            assert n.dirty_flag == int(expect.get("dirty-flag", -1))
            assert n.encrypted == int(expect.get("encrypted", -1))
            assert m._s(n.backing_format) == expect.get("backing-filename-format")
            assert n.snapshot_count == len(expect.get("snapshots", []))
            for k, s in enumerate(expect.get("snapshots", [])):
                assert m._s(n.snapshots[k].name) == s["name"] and m._s(n.snapshots[k].id) == s["id"]
                assert n.snapshots[k].date_sec == s["date-sec"]
            spec = expect.get("format-specific")
            assert m._s(n.specific_type) == (spec and spec["type"])
            data = (spec or {}).get("data", {})
            assert m._s(n.compat) == data.get("compat")
            assert m._s(n.compression_type) == data.get("compression-type")
            assert n.refcount_bits == data.get("refcount-bits", -1)
            assert n.lazy_refcounts == int(data.get("lazy-refcounts", -1))
            assert n.corrupt == int(data.get("corrupt", -1))
            assert n.extended_l2 == int(data.get("extended-l2", -1))
            assert m._s(n.data_file) == data.get("data-file")
            assert n.data_file_raw == int(data.get("data-file-raw", -1))
            assert m._s(n.encrypt_format) == data.get("encrypt", {}).get("format")
            assert n.has_bitmaps == int("bitmaps" in data)
            assert n.bitmap_count == len(data.get("bitmaps", []))
            for k, b in enumerate(data.get("bitmaps", [])):
                flags = (1 if "in-use" in b["flags"] else 0) | (2 if "auto" in b["flags"] else 0)
                assert (m._s(n.bitmaps[k].name), n.bitmaps[k].granularity, n.bitmaps[k].flags) == \
                    (b["name"], b["granularity"], flags)
            node = n.backing
        assert not node
    finally:
        L.instar_info_free(out)


@pytest.mark.parametrize("tag", ["é", "ünïcödé-näme", "日本語のスナップ", "\U0001F600 smile"])
def test_snapshot_tag_padding_multibyte(tmp, tag):
    """printf("%-16s") pads the TAG column by bytes, so multibyte UTF-8 names line up as in qemu-img (names not
    valid UTF-8 are covered by test_hostile.py's snap-entry-name-not-utf8)."""
    p = os.path.join(tmp, "t.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "1M")
    qimg("snapshot", "-c", tag, p)
    for args in (["info", p], ["info", "--output=json", p]):
        q = subprocess.run(["qemu-img", *args], capture_output=True)
        i = subprocess.run([INSTAR, *args], capture_output=True)
        assert (i.returncode, i.stdout) == (q.returncode, q.stdout), (q, i)
