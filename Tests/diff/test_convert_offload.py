"""convert -C (copy offloading) and --salvage against qemu-img 7.2: messages, exit codes, and the resulting
files byte for byte with the same `map`. -C copies data ranges unchanged (no zero detection) until a range it
cannot offload (a compressed cluster) turns it off for the rest; --salvage zeroes the sectors it cannot read and
warns about each."""
import os
import struct

import pytest
from conftest import check_clean, convert_both, info_json, instar, qemu, qemu_io, qimg
from imgs import MiB, chain, qcow2_image, sparse_raw


def same_result(tmp, args, srcs, fmt):
    q, qd, idst = convert_both(tmp, args, srcs, fmt=fmt)
    if q.rc == 0:
        with open(qd, "rb") as a, open(idst, "rb") as b:
            assert a.read() == b.read()
        mq = qemu("map", "--output=json", "-f", fmt, qd).out
        mi = qemu("map", "--output=json", "-f", fmt, idst).out.replace(idst, qd)
        assert mi == mq
        assert info_json(idst) == info_json(qd)
        if fmt == "qcow2":
            check_clean(idst)
    return q


def zero_data_raw(tmp, name="z.raw"):
    """Raw with data, a long run of written zero bytes (data to the filesystem) and holes."""
    p = os.path.join(tmp, name)
    with open(p, "wb") as f:
        f.truncate(6 * MiB)
        f.seek(100000)
        f.write(os.urandom(300000))
        f.seek(MiB)
        f.write(b"\0" * (2 * MiB + 4096))
        f.seek(4 * MiB - 512)
        f.write(os.urandom(1024))
    return p


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("args", [["-C"], ["-C", "-p"], ["-C", "-m", "1"], ["-C", "-W"], ["-C", "-t", "writeback"],
                                  ["-C", "-t", "none"], ["-C", "-T", "none"], ["-C", "-t", "directsync"]])
def test_offload_raw_source(tmp, fmt, args):
    src = zero_data_raw(tmp)
    same_result(tmp, [*args, "-O", fmt], [src], fmt)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("m", ["1", "2", "4"])
def test_offload_sparse_raw_and_many_sources(tmp, fmt, m):
    # sparse_raw's partial last sector cannot be offloaded (the request passes the file's end), so qemu falls
    # back there, with the chunks its other coroutines already took still offloaded. How many those are with
    # -m 8 depends on qemu's coroutine timing across several sources; -m 1, 2 and 4 are deterministic.
    a = sparse_raw(tmp)
    b = zero_data_raw(tmp)
    same_result(tmp, ["-C", "-O", fmt], [a], fmt)
    same_result(tmp, ["-C", "-m", m, "-O", fmt], [b, a, b], fmt)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("opts", [None, "cluster_size=4096", "extended_l2=on"])
def test_offload_qcow2_source(tmp, fmt, opts):
    p, c = qcow2_image(tmp, opts=opts)
    qemu_io("-f", "qcow2", "-c", "write -P 0 2M 256k", p)
    same_result(tmp, ["-C", "-O", fmt], [p], fmt)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("m", [[], ["-m", "1"], ["-m", "2"], ["-m", "3"]])
def test_offload_falls_back_at_compressed(tmp, fmt, m):
    # Data first, then a compressed cluster: qemu offloads until it meets it, then reads and writes (and looks
    # for zeroes) for the chunks its coroutines had not taken yet.
    p = os.path.join(tmp, "mix.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "8M")
    qemu_io("-f", "qcow2", "-c", "write -P 0 0 1M", "-c", "write -P 7 1M 64k", p)
    qemu_io("-f", "qcow2", "-c", "write -c -P 9 3M 64k", "-c", "write -P 0 4M 1M", "-c", "write -P 5 6M 64k", p)
    same_result(tmp, ["-C", *m, "-O", fmt], [p], fmt)
    # A compressed image: nothing is offloaded.
    _, c = qcow2_image(tmp)
    same_result(tmp, ["-C", *m, "-O", fmt], [c], fmt)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_offload_chain(tmp, fmt):
    _, _, top = chain(tmp)
    same_result(tmp, ["-C", "-O", fmt], [top], fmt)


def test_offload_existing_target(tmp):
    src = zero_data_raw(tmp)

    def setup(dst):
        qimg("create", "-q", "-f", "qcow2", dst, "6M")
    q, qd, idst = convert_both(tmp, ["-C", "-n", "-O", "qcow2"], [src], setup=setup)
    assert q.rc == 0
    with open(qd, "rb") as a, open(idst, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("args", [["-C", "-c"], ["-c", "-C"], ["-C", "-S", "0"], ["-S", "4k", "-C"],
                                  ["-C", "--salvage"], ["--salvage", "-C"]])
def test_offload_refusals(tmp, args):
    src = zero_data_raw(tmp)
    q = same_result(tmp, [*args, "-O", "qcow2"], [src], "qcow2")
    assert q.rc == 1


# ---- --salvage ---------------------------------------------------------------------------------------------

def broken_compressed(tmp, name="bad.qcow2", cluster_bits=16):
    """A qcow2 of compressed clusters whose second one no longer inflates (its deflate stream is garbage)."""
    p = os.path.join(tmp, "plain_" + name)
    qimg("create", "-q", "-f", "qcow2", p, "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x61 0 256k", "-c", "write -P 0 300k 64k", p)
    c = os.path.join(tmp, name)
    qimg("convert", "-q", "-c", "-O", "qcow2", p, c)
    with open(c, "r+b") as f:
        h = f.read(112)
        cb = struct.unpack(">I", h[20:24])[0]
        l1 = struct.unpack(">Q", h[40:48])[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry & (1 << 62), "cluster 1 is not compressed"
        host = entry & ((1 << (62 - (cb - 8))) - 1)
        f.seek(host)
        f.write(b"\xff" * 64)
    return c


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("args", [[], ["--salvage"], ["--salvage", "-q"], ["--salvage", "-p"],
                                  ["--salvage", "-S", "0"], ["--salvage", "-m", "1"]])
def test_salvage_unreadable_cluster(tmp, fmt, args):
    c = broken_compressed(tmp)
    q = same_result(tmp, [*args, "-O", fmt], [c], fmt)
    if "--salvage" in args:
        assert q.rc == 0
    else:
        assert q.rc == 1


def test_salvage_many_sources(tmp):
    c = broken_compressed(tmp)
    a = sparse_raw(tmp)
    # One request at a time: the warnings come in guest order.
    same_result(tmp, ["--salvage", "-m", "1", "-O", "qcow2"], [a, c, c], "qcow2")
    # qemu's parallel requests interleave the warnings of the two bad clusters: the same lines, the same file.
    qd, idst = os.path.join(tmp, "q.raw"), os.path.join(tmp, "i.raw")
    q = qemu("convert", "--salvage", "-O", "raw", a, c, c, qd)
    r = instar("convert", "--salvage", "-O", "raw", a, c, c, idst)
    assert (r.rc, r.out, sorted(r.err.splitlines())) == (q.rc, q.out, sorted(q.err.splitlines()))
    with open(qd, "rb") as x, open(idst, "rb") as y:
        assert x.read() == y.read()


def test_salvage_compressed_target(tmp):
    c = broken_compressed(tmp)
    same_result(tmp, ["--salvage", "-c", "-O", "qcow2"], [c], "qcow2")


# ---- -C with a backing target, an encrypted source or target, a preallocated target -----------------------

@pytest.mark.parametrize("m", ["1", "8"])
def test_offload_backing_target(tmp, m):
    base, mid, top = chain(tmp)
    same_result(tmp, ["-C", "-m", m, "-O", "qcow2", "-B", mid, "-F", "qcow2"], [top], "qcow2")


def test_offload_encrypted_source_and_target(tmp):
    sec = ["--object", "secret,id=sec0,data=123456"]
    enc = os.path.join(tmp, "enc.qcow2")
    qimg("create", "-q", *sec, "-f", "qcow2", "-o",
         "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", enc, "4M")
    qemu_io(*sec, "--image-opts", "-c", "write -P 0 0 1M", "-c", "write -P 3 1M 64k",
            f"driver=qcow2,encrypt.key-secret=sec0,file.filename={enc}")
    # Encrypted source: qemu cannot offload; zeroes are found and left out as without -C.
    q, qd, idst = convert_both(tmp, ["-C", *sec, "--image-opts", "-O", "raw"],
                               [f"driver=qcow2,encrypt.key-secret=sec0,file.filename={enc}"], fmt="raw")
    assert q.rc == 0
    with open(qd, "rb") as a, open(idst, "rb") as b:
        assert a.read() == b.read()
    assert qemu("map", "--output=json", "-f", "raw", idst).out.replace(idst, qd) == \
        qemu("map", "--output=json", "-f", "raw", qd).out
    # Encrypted target: the same (its reads, not its layout, are compared: LUKS salts differ).
    src = zero_data_raw(tmp)
    for tool, dst in (("q", os.path.join(tmp, "eq.qcow2")), ("i", os.path.join(tmp, "ei.qcow2"))):
        argv = ["convert", "-C", *sec, "-O", "qcow2", "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", src, dst]
        r = qemu(*argv) if tool == "q" else instar(*argv)
        assert (r.rc, r.out, r.err) == (0, "", "")
    maps = [qemu("map", "--output=json", *sec, "--image-opts",
                 f"driver=qcow2,encrypt.key-secret=sec0,file.filename={d}").out.replace(d, "X")
            for d in (os.path.join(tmp, "eq.qcow2"), os.path.join(tmp, "ei.qcow2"))]
    assert maps[0] == maps[1]


@pytest.mark.parametrize("prealloc", ["metadata", "falloc"])
def test_offload_preallocated_target(tmp, prealloc):
    src = zero_data_raw(tmp)
    same_result(tmp, ["-C", "-O", "qcow2", "-o", f"preallocation={prealloc}"], [src], "qcow2")


@pytest.mark.parametrize("m", ["1", "8"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_salvage_block_status_errors(tmp, m, fmt):
    # An unaligned cluster offset in an L2 entry: qemu's block status (and read) of that cluster fail. With
    # --salvage each of its sectors gets a block-status warning in the counting pass, then a block-status
    # warning and a read warning in the copy, and is written as zeroes.
    from test_check import Q, corrupt_l2_unaligned, make
    p = make(tmp, name="una.qcow2", size="8M")
    corrupt_l2_unaligned(Q(p))
    qd, idst = os.path.join(tmp, f"q.{fmt}"), os.path.join(tmp, f"i.{fmt}")
    for args in (["--salvage", "-m", m], ["-m", m]):
        for d in (qd, idst):
            if os.path.exists(d):
                os.unlink(d)
        q = qemu("convert", *args, "-O", fmt, p, qd)
        r = instar("convert", *args, "-O", fmt, p, idst)
        assert (r.rc, r.out) == (q.rc, q.out)
        assert r.err == q.err
        if q.rc == 0:
            with open(qd, "rb") as a, open(idst, "rb") as b:
                assert a.read() == b.read()


# ---- the same through the library (instar_convert flags INSTAR_CONVERT_COPY_RANGE / INSTAR_CONVERT_SALVAGE) ----

def test_library_copy_range_and_salvage(tmp):
    import instar as pyinstar
    src = zero_data_raw(tmp)
    qd = os.path.join(tmp, "q-offload.qcow2")
    qemu("convert", "-C", "-O", "qcow2", src, qd)
    ld = os.path.join(tmp, "l-offload.qcow2")
    pyinstar.convert(src, ld, fmt="qcow2", copy_range=True)
    with open(qd, "rb") as a, open(ld, "rb") as b:
        assert a.read() == b.read()
    check_clean(ld)

    c = broken_compressed(tmp)
    qd = os.path.join(tmp, "q-salvage.raw")
    qemu("convert", "--salvage", "-O", "raw", c, qd)
    ld = os.path.join(tmp, "l-salvage.raw")
    pyinstar.convert(c, ld, fmt="raw", salvage=True)
    with open(qd, "rb") as a, open(ld, "rb") as b:
        assert a.read() == b.read()
    # Without salvage the library fails as qemu-img does, and removes the target it created.
    q = qemu("convert", "-O", "raw", c, os.path.join(tmp, "q-fail.raw"))
    assert q.rc == 1
    with pytest.raises(pyinstar.InstarError):
        pyinstar.convert(c, os.path.join(tmp, "l-fail.raw"), fmt="raw")
    assert not os.path.exists(os.path.join(tmp, "l-fail.raw"))


@pytest.mark.parametrize("kw,msg", [({"copy_range": True, "salvage": True}, "Cannot use copy offloading in salvaging mode"),
                                    ({"copy_range": True, "sparse_size": 0}, "Cannot enable copy offloading when -S is used")])
def test_library_refusals(tmp, kw, msg):
    import instar as pyinstar
    src = zero_data_raw(tmp)
    args = ["-C", "--salvage"] if "salvage" in kw else ["-C", "-S", "0"]
    q = qemu("convert", *args, "-O", "raw", src, os.path.join(tmp, "q.raw"))
    assert q.rc == 1 and msg in q.err
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.convert(src, os.path.join(tmp, "l.raw"), fmt="raw", **kw)
    assert msg in str(e.value)
    assert not os.path.exists(os.path.join(tmp, "l.raw"))
