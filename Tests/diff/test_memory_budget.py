"""The per-call memory budget (instar_limits_t.memory_bytes, through instar.limits(memory=...)): metadata whose
size comes from an image's headers (tables, caches, descriptors, catalogs, key material, decompression buffers)
is reserved before it is allocated, and a call whose image asks for more than its budget fails with LimitReached
naming what it was allocating. Under a modest budget, everything reads as without one, and as qemu-img reads it.

The images are made at test time: valid images qemu-img creates with big tables (large virtual sizes, small
clusters), and the hostile builders of the other tests (hostile_images.py, test_bochs.py) and the cloop and dmg image builders."""
import ctypes
import json
import os
import shutil

import pytest

import instar
from instar import _lib
from instar.info import _InfoOptions, _setup as _info_setup
from conftest import qemu, qimg, qemu_io
import hostile_images as H
import readonly_images as R

KiB, MiB = 1 << 10, 1 << 20
SECRET = "membudget"


def _qemu_made(fmt, size, *opts, data=True):
    def make(d):
        p = os.path.join(d, "big." + fmt)
        args = ["create", "-q", "-f", fmt]
        for o in opts:
            args += ["-o", o]
        if fmt == "luks":
            args = ["create", "-q", "--object", f"secret,id=s0,data={SECRET}", "-f", "luks",
                    "-o", "key-secret=s0,iter-time=10"]
        qimg(*args, p, size)
        if data and fmt != "luks":
            qemu_io("-f", fmt, "-c", "write -P 0x5a 0 64k", "-c", "write -P 0xa5 1M 4k", p)
        return p, fmt
    return make


def _cloop_many_blocks(d):
    # 1 Mi blocks: an offsets table of 8 MiB (read as zeroes past the end of the file, which qemu refuses).
    return R.write(os.path.join(d, "t.cloop"), R.cloop_image(b"", block_size=65536, n_blocks=1 << 20, chunks=[],
                                                              offsets=[])), "cloop"


def _vmdk_descriptor(d):
    # A descriptor file of 128 KiB (a monolithicFlat descriptor padded with comment lines).
    p = os.path.join(d, "t.vmdk")
    qimg("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", p, "1M")
    with open(p, "a") as f:
        f.write(("#" + "x" * 1022 + "\n") * 128)
    return p, "vmdk"


def _dmg_many_chunks(d):
    # 20000 zero chunks in one block table: 720 KB of chunk table.
    import dmg_images as D
    return R.write(os.path.join(d, "t.dmg"), D.Image([("zero", 1)] * 20000).layout()), "dmg"


def _bochs_max_catalog(d):
    import test_bochs
    return R.write(os.path.join(d, "t.bochs"), test_bochs.HOSTILE["max-catalog"][0]()), "bochs"


def _hostile(name):
    def make(d):
        ctx = _context(d)
        return H.VARIANTS[name](ctx, d), None
    return make


_CTX = {}


def _context(d):
    if "ctx" not in _CTX:
        _CTX["ctx"] = H.Context(os.path.join(d, "ctx"))
    return _CTX["ctx"]


# name -> (maker(dir) -> (path, format), budget in bytes, what the message names, the call to make)
LARGE = {
    "qcow2-l1": (_qemu_made("qcow2", "1G", "cluster_size=512"), 128 * KiB, "the L1 table", "info"),
    "qcow2-compressed": (None, 196 * KiB + 8, "the decompression buffers of a compressed cluster", "convert"),
    "qcow-l1": (_qemu_made("qcow", "1T"), 1 * MiB, "the L1 table", "info"),
    "qed-l1": (_qemu_made("qed", "1T"), 128 * KiB, "the L1 table", "info"),
    "vdi-block-map": (_qemu_made("vdi", "1T"), 1 * MiB, "the block map", "info"),
    "vpc-bat": (_qemu_made("vpc", "1T"), 1 * MiB, "the block allocation table", "info"),
    "vhdx-bat": (_qemu_made("vhdx", "2T", "block_size=8M"), 1 * MiB, "the BAT", "info"),
    "parallels-bat": (_qemu_made("parallels", "1T", "cluster_size=1M"), 1 * MiB, "the header and BAT", "info"),
    "vmdk-grain-directory": (_qemu_made("vmdk", "1T"), 64 * KiB, "the grain directory of extent '{path}'", "info"),
    "vmdk-descriptor": (_vmdk_descriptor, 64 * KiB, "the descriptor", "info"),
    "luks-key-material": (_qemu_made("luks", "16M"), 256 * KiB, "the LUKS key material of key slot 0", "map"),
    "cloop-offsets": (_cloop_many_blocks, 1 * MiB, "the offsets table", "info"),
    "bochs-catalog": (_bochs_max_catalog, 1 * MiB, "the catalog", "info"),
    "dmg-chunk-table": (_dmg_many_chunks, 512 * KiB, "the chunk table", "info"),
    "hostile-vpc-big-table": (_hostile("vpc-big-table-small-blocks"), 16 * MiB, "the block allocation table", "info"),
}


def _compressed(d):
    ctx = _context(d)
    return ctx.path("zlib"), "qcow2"


def _maker(name):
    make = LARGE[name][0]
    return _compressed if make is None else make


def _call(kind, path, fmt, tmp):
    key = SECRET if fmt == "luks" else None
    if kind == "info":
        return instar.info_json(path, format=fmt)
    if kind == "map":
        return json.dumps(instar.map(path, format=fmt, key_secret=key))
    out = os.path.join(tmp, "out.raw")
    instar.convert(path, out, source_format=fmt, fmt="raw")
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


@pytest.fixture(scope="module")
def imgdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mb"))
    yield d
    _CTX.clear()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(LARGE))
def test_a_small_budget_stops_the_allocation(imgdir, tmp, name):
    _, budget, what, kind = LARGE[name]
    d = os.path.join(imgdir, name)
    os.makedirs(d, exist_ok=True)
    path, fmt = _maker(name)(d)
    what = what.replace("{path}", path)
    with pytest.raises(instar.LimitReached) as e:
        with instar.limits(memory=budget):
            _call(kind, path, fmt, tmp)
    assert e.value.code == _lib.E_LIMIT
    assert f"Operation stopped: its memory limit of {budget} bytes is reached (allocating {what}, " in str(e.value)
    # A budget of 64 MiB holds it: the call gives what it gives without a budget.
    with instar.limits(memory=64 * MiB):
        within = _call(kind, path, fmt, tmp)
    assert within == _call(kind, path, fmt, tmp)
    if kind == "info" and fmt is not None and name != "bochs-catalog":
        assert json.loads(within) == json.loads(qemu("info", "--output=json", "-f", fmt, path).out)


def test_normal_images_under_a_modest_budget_read_as_qemu(imgdir, tmp):
    """info, map and convert -O raw of the valid hostile_images bases and of each qemu-made image above, under a
    budget of 8 MiB (the budget counts image metadata only, not the copy buffers)."""
    ctx = _context(imgdir)
    images = [(ctx.path(n), "qcow2") for n in ("base", "v2", "snap", "ext2", "zlib", "zstd")]
    for fmt, size, opts in (("qcow", "8M", ()), ("qed", "8M", ()), ("vdi", "8M", ()), ("vpc", "8M", ()),
                            ("vhdx", "8M", ()), ("vmdk", "8M", ()), ("parallels", "8M", ())):
        d = os.path.join(imgdir, "small-" + fmt)
        os.makedirs(d, exist_ok=True)
        images.append(_qemu_made(fmt, size, *opts)(d))
    for path, fmt in images:
        with instar.limits(memory=8 * MiB):
            text = instar.info_json(path, format=fmt)
            entries = instar.map(path, format=fmt)
            out = os.path.join(tmp, "o.raw")
            instar.convert(path, out, source_format=fmt, fmt="raw")
        assert json.loads(text) == json.loads(qemu("info", "--output=json", "-f", fmt, path).out), path
        assert entries == json.loads(qemu("map", "--output=json", "-f", fmt, path).out), path
        ref = os.path.join(tmp, "r.raw")
        qemu("convert", "-f", fmt, "-O", "raw", path, ref)
        with open(out, "rb") as a, open(ref, "rb") as b:
            assert a.read() == b.read(), path
        os.unlink(out)
        os.unlink(ref)
        with instar.limits(memory=8 * MiB):
            checked = instar.check_json(path, format=fmt) if fmt in ("qcow2", "qed", "vdi", "vhdx", "vmdk",
                                                                     "parallels") else None
        if checked is not None:
            assert checked == qemu("check", "--output=json", "-f", fmt, path).out, path


def _outcome(path):
    try:
        return ("ok", instar.info_json(path))
    except instar.InstarError as e:
        return (type(e).__name__, e.message)


# Variants a budget of 8 MiB stops (their tables are larger); every other variant reads as without a budget.
OVER_8_MIB = {"vpc-big-table-small-blocks"}
SLOW = {"vpc-max-table-entries-sparse-2g"}


def test_hostile_variants_under_a_modest_budget(imgdir):
    ctx = _context(imgdir)
    stopped = set()
    for name in sorted(set(H.VARIANTS) - SLOW):
        d = os.path.join(imgdir, "hv")
        os.makedirs(d, exist_ok=True)
        path = H.VARIANTS[name](ctx, d)
        free = _outcome(path)
        with instar.limits(memory=8 * MiB):
            limited = _outcome(path)
        if limited[0] == "LimitReached":
            assert "Operation stopped: its memory limit of 8388608 bytes is reached (allocating " in limited[1]
            stopped.add(name)
        else:
            assert limited == free, name
        shutil.rmtree(d)
    assert stopped == OVER_8_MIB


def test_a_caller_limits_struct_without_memory_bytes_has_no_memory_limit(imgdir):
    """instar_limits_t from a header older than memory_bytes (struct_size stops before it): the library reads only
    what struct_size declares, so a memory_bytes past it is never looked at."""
    d = os.path.join(imgdir, "abi")
    os.makedirs(d, exist_ok=True)
    path, _ = _qemu_made("qcow", "1T")(d)
    L = _info_setup()
    lim = _lib.Limits(_lib.Limits.memory_bytes.offset, 0, 0, 0, 1024)
    o = _InfoOptions(ctypes.sizeof(_InfoOptions), 0, None, 0, None)
    o.limits = ctypes.pointer(lim)
    out = ctypes.c_void_p()
    err = _lib.Error()
    L.instar_info_json.restype = ctypes.c_int32
    rc = L.instar_info_json(path.encode(), ctypes.byref(o), ctypes.byref(out), ctypes.byref(err))
    assert rc == 0, err.message
    _lib.take_string(out)
    # The same struct with struct_size covering the member: the 1 KiB budget applies.
    lim.struct_size = ctypes.sizeof(_lib.Limits)
    rc = L.instar_info_json(path.encode(), ctypes.byref(o), ctypes.byref(out), ctypes.byref(err))
    assert rc == _lib.E_LIMIT
    assert b"memory limit of 1024 bytes" in err.message


def test_the_budget_ends_with_each_call(imgdir):
    """The budget counts per call: many calls in one block each start from zero."""
    ctx = _context(imgdir)
    with instar.limits(memory=1 * MiB):
        for _ in range(50):
            instar.info_json(ctx.path("base"))


def test_memory_must_be_a_positive_number_of_bytes():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            with instar.limits(memory=bad):
                pass


def test_vdsm_untrusted_info_runs_under_the_memory_budget(imgdir, monkeypatch):
    from instar.compat import vdsm
    ctx = _context(imgdir)
    seen = []
    real = instar.limits

    def spy(**kw):
        seen.append(kw)
        return real(**kw)
    monkeypatch.setattr(vdsm, "limits", spy)
    p = ctx.path("base")
    assert vdsm.info(p, trusted_image=False) == vdsm.info(p)
    assert seen == [{"cpu": vdsm.UNTRUSTED_CPU_SECONDS, "memory": vdsm.UNTRUSTED_MEMORY_BYTES}]
    assert vdsm.UNTRUSTED_MEMORY_BYTES == 256 * MiB
