"""convert -O qcow2 (and -O raw from qcow2 sources): for each command both tools write their own target; the
results must read back identical (qemu-img compare), pass qemu-img check, be no larger than qemu-img's by more
than a few clusters, and have qemu-img's map layout. Messages and exit codes equal qemu-img's."""
import json
import os

import pytest
from conftest import INSTAR, convert_both, qemu, qemu_io, qimg, run
from imgs import MiB, chain, qcow2_image, sparse_raw

import instar as pyinstar


def mixed_raw(d, name="m.raw", size=6 * MiB + 1536):
    """Random (incompressible) data, compressible patterns, explicit zeroes and holes, a partial last cluster."""
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(os.urandom(300000))
        f.seek(MiB)
        f.write(b"pattern!" * (192 * 1024))
        f.seek(3 * MiB)
        f.write(b"\0" * (256 * 1024))
        f.seek(4 * MiB + 4096)
        f.write(os.urandom(256 * 1024))
        f.seek(5 * MiB + 65536)
        f.write(b"abc" * 50000)
        f.seek(size - 700)
        f.write(b"t" * 700)
    return p


def cluster_size(path):
    info = json.loads(qemu("info", "--output=json", path).out)
    return info.get("cluster-size", 65536)


def same_convert(tmp, args, srcs, fmt="qcow2", setup=None, layout=True, slack_clusters=3, actual=True):
    """Runs qemu-img and instar into out_q / out_i and checks the results against each other."""
    q, qd, idst = convert_both(tmp, args, srcs, fmt=fmt, setup=setup)
    if q.rc != 0:
        return q, qd, idst
    cmp = qemu("compare", "-f", fmt, "-F", fmt, qd, idst)
    assert cmp.rc == 0, cmp
    if fmt == "qcow2":
        chk = qemu("check", idst)
        assert chk.rc == 0, chk
        assert "No errors were found" in chk.out, chk
        slack = slack_clusters * cluster_size(qd)
        assert os.path.getsize(idst) <= os.path.getsize(qd) + slack
        iq = json.loads(qemu("info", "--output=json", qd).out)
        ii = json.loads(qemu("info", "--output=json", idst).out)
        # actual-size counts host blocks, so allow at least a few of them.
        if actual:
            assert ii["actual-size"] <= iq["actual-size"] + max(slack, 16384)
        for k in ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format",
                  "format-specific"):
            assert ii.get(k) == iq.get(k), k
    if layout:
        mq = qemu("map", "--output=json", qd).out
        mi = qemu("map", "--output=json", idst).out.replace(idst, qd)
        assert mi == mq
    return q, qd, idst


@pytest.fixture
def src(tmp):
    return mixed_raw(tmp)


@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=4k", "cluster_size=64k", "cluster_size=2M",
                                  "extended_l2=on", "extended_l2=on,cluster_size=16k",
                                  "extended_l2=on,cluster_size=2M", "compat=0.10", "lazy_refcounts=on",
                                  "refcount_bits=1", "refcount_bits=64", "preallocation=metadata",
                                  "preallocation=falloc", "compression_type=zstd"])
def test_raw_to_qcow2_options(tmp, src, opts):
    same_convert(tmp, ["-O", "qcow2", "-o", opts], [src])


def test_round_trip_to_raw(tmp, src):
    q, qd, idst = same_convert(tmp, ["-O", "qcow2"], [src])
    back = os.path.join(tmp, "back.raw")
    assert run([INSTAR, "convert", "-O", "raw", idst, back]).rc == 0
    qback = os.path.join(tmp, "qback.raw")
    qimg("convert", "-O", "raw", qd, qback)
    with open(back, "rb") as a, open(qback, "rb") as b, open(src, "rb") as c:
        data = a.read()
        assert data == b.read()
        orig = c.read()
        assert data[:len(orig)] == orig


@pytest.mark.parametrize("opts", ["compression_type=zlib", "compression_type=zstd", "cluster_size=4k",
                                  "cluster_size=4k,compression_type=zstd", "extended_l2=on",
                                  "refcount_bits=1", "cluster_size=2M"])
def test_compressed(tmp, src, opts):
    same_convert(tmp, ["-c", "-O", "qcow2", "-o", opts], [src])


def test_compressed_sparse_zero(tmp, src):
    same_convert(tmp, ["-c", "-S", "0", "-O", "qcow2"], [src])


@pytest.mark.parametrize("args", [["-S", "0"], ["-S", "64k"], ["-S", "512"], ["-S", "0", "-o", "cluster_size=4k"]])
def test_sparse_sizes(tmp, src, args):
    same_convert(tmp, ["-O", "qcow2", *args], [src])


def test_qcow2_sources(tmp):
    p, c = qcow2_image(tmp, opts="cluster_size=4k")
    same_convert(tmp, ["-O", "qcow2"], [p])
    same_convert(tmp, ["-O", "qcow2"], [c])
    same_convert(tmp, ["-O", "qcow2", "-c"], [c])
    same_convert(tmp, ["-O", "raw"], [c], fmt="raw")


def test_chain_source(tmp):
    base, mid, top = chain(tmp)
    same_convert(tmp, ["-O", "qcow2"], [top])
    same_convert(tmp, ["-O", "qcow2", "-o", "extended_l2=on"], [top])


@pytest.mark.parametrize("extra", [[], ["-c"], ["-o", "cluster_size=4k"], ["-S", "0"], ["-o", "compat=0.10"]])
def test_backing_target(tmp, extra):
    base, mid, top = chain(tmp)
    # Only what top allocates is written; mid stays the target's backing file.
    same_convert(tmp, ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", *extra], [top])
    # A raw source has no backing: everything but zeroes past the backing file's end is written.
    s = mixed_raw(tmp, size=5 * MiB)
    same_convert(tmp, ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", *extra], [s])
    same_convert(tmp, ["-O", "qcow2", "-o", "backing_file=mid.qcow2,backing_fmt=qcow2", *extra], [top])


def host_allocation(path):
    """actual-size and the host file's data/hole map, which show where clusters were punched out."""
    info = json.loads(qemu("info", "--output=json", path).out)
    return info["actual-size"], qemu("map", "-f", "raw", "--output=json", path).out.replace(path, "X")


@pytest.mark.parametrize("cluster", ["512", "4k", "16k", "64k"])
def test_existing_target_punches_freed_clusters(tmp, src, cluster):
    # Zero runs of the source unmap the target's old clusters; with discard pass-through qemu punches them out
    # of the file, so the host allocation must come out the same, block for block.
    size = str(os.path.getsize(src) + 512 - os.path.getsize(src) % 512)

    def dirty(dst):
        qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", dst, size)
        qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 6M", dst)

    _, qd, idst = same_convert(tmp, ["-n", "-O", "qcow2"], [src], setup=dirty)
    assert host_allocation(idst) == host_allocation(qd)
    with open(qd, "rb") as a, open(idst, "rb") as b:
        assert a.read() == b.read()


def test_existing_target(tmp, src):
    size = str(os.path.getsize(src) + 512 - os.path.getsize(src) % 512)

    def fresh(dst):
        qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", dst, size)

    def dirty(dst):
        fresh(dst)
        qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 6M", dst)

    same_convert(tmp, ["-n", "-O", "qcow2"], [src], setup=fresh)
    same_convert(tmp, ["-n", "-O", "qcow2"], [src], setup=dirty)
    same_convert(tmp, ["-n", "--target-is-zero", "-O", "qcow2"], [src], setup=fresh)
    same_convert(tmp, ["-n", "-S", "0", "-O", "qcow2"], [src], setup=dirty)
    same_convert(tmp, ["-n", "-c", "-O", "qcow2"], [src], setup=fresh)

    def small(dst):
        qimg("create", "-q", "-f", "qcow2", dst, "1M")
    same_convert(tmp, ["-n", "-O", "qcow2"], [src], setup=small)


def test_snapshots(tmp):
    p, _ = qcow2_image(tmp)
    qimg("snapshot", "-c", "first", p)
    qemu_io("-f", "qcow2", "-c", "write -P 0x77 0 2M", p)
    qimg("snapshot", "-c", "second", p)
    qemu_io("-f", "qcow2", "-c", "write -z 1M 1M", p)
    for sel in (["-l", "first"], ["-l", "1"], ["-l", "second"], ["-l", "snapshot.name=second"],
                ["-l", "snapshot.id=1"], ["-l", "snapshot.id=1,snapshot.name=first"], ["-l", "nosuch"],
                ["-l", "snapshot.id=1,snapshot.name=second"], ["-l", "snapshot.foo=1"]):
        same_convert(tmp, ["-O", "qcow2", *sel], [p])
    same_convert(tmp, ["-O", "raw", "-l", "first"], [p], fmt="raw")
    s = sparse_raw(tmp)
    same_convert(tmp, ["-O", "qcow2", "-l", "first"], [s])
    same_convert(tmp, ["-O", "qcow2", "-l", "first"], [p, s])


def test_multiple_sources(tmp, src):
    s = sparse_raw(tmp)
    p, c = qcow2_image(tmp)
    same_convert(tmp, ["-O", "qcow2"], [src, s, p, c])
    same_convert(tmp, ["-O", "qcow2", "-c"], [s, c, src])


@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "-o", "foo=1"], ["-O", "qcow2", "-o", "cluster_size=3k"], ["-O", "qcow2", "-o", ","],
    ["-O", "nosuch"], ["-c", "-O", "raw"], ["-c", "-O", "qcow2", "-o", "preallocation=metadata"],
    ["-O", "qcow2", "-B", "b.qcow2"], ["-O", "qcow2", "-o", "backing_file=b.qcow2"],
    ["-O", "raw", "-B", "b.qcow2", "-F", "qcow2"], ["-O", "qcow2", "--bitmaps"],
    ["-O", "qcow2", "--skip-broken-bitmaps"], ["-O", "qcow2", "-m", "0"], ["-O", "qcow2", "-m", "17"],
    ["-O", "qcow2", "-r", "1x"], ["-O", "qcow2", "-n", "-o", "cluster_size=4k"], ["-O", "qcow2", "-C", "-c"],
    ["-O", "qcow2", "--target-is-zero"], ["-O", "qcow2", "-T", "bogus"],
    ["-O", "qcow2", "-o", "backing_file=nonexist,backing_fmt=qcow2"],
    ["-O", "qcow2", "-B", "bad.qcow2", "-F", "qcow2"],
])
def test_errors(tmp, src, args):
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "b.qcow2"), "1M")
    bad = os.path.join(tmp, "bad.qcow2")
    qimg("create", "-q", "-f", "qcow2", bad, "1M")
    with open(bad, "r+b") as f:
        f.seek(4)
        f.write(b"\0\0\0\5")   # qcow2 version 5
    same_convert(tmp, args, [src])


def test_errors_with_backing_and_sources(tmp, src):
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "b.qcow2"), "1M")
    same_convert(tmp, ["-O", "qcow2", "-B", "b.qcow2", "-F", "qcow2"], [src, src])
    same_convert(tmp, ["-O", "qcow2", "-n", "--target-is-zero", "-B", "b.qcow2"], [src],
                 setup=lambda d: qimg("create", "-q", "-f", "qcow2", d, "8M"))
    same_convert(tmp, ["-O", "raw", "--bitmaps"], [os.path.join(tmp, "b.qcow2")], fmt="raw")


def test_target_cache_error_leaves_target(tmp, src):
    q, qd, idst = same_convert(tmp, ["-O", "qcow2", "-t", "bogus"], [src])
    assert os.path.exists(qd) and os.path.exists(idst)


def test_options_and_progress(tmp, src):
    for extra in (["-m", "1"], ["-m", "16", "-W"], ["-r", "1G"], ["-t", "writeback", "-T", "none"],
                  ["-p", "-c"], ["-p"], ["-p", "-S", "0"], ["-q", "-p"]):
        # qemu's -W layout depends on which request finishes first.
        same_convert(tmp, ["-O", "qcow2", *extra], [src], layout="-W" not in extra)


def test_option_help(tmp, src):
    for args in (["-O", "qcow2", "-o", "help"], ["-O", "qcow2", "-o", "?"]):
        q = qemu("convert", *args, src, "x.qcow2", cwd=tmp)
        i = run([INSTAR, "convert", *args, src, "x.qcow2"], cwd=tmp)
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err)


def test_python_api(tmp, src):
    q = os.path.join(tmp, "q.qcow2")
    qimg("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=16k", src, q)
    i = os.path.join(tmp, "i.qcow2")
    pyinstar.convert(src, i, fmt="qcow2", options="compression_type=zstd,cluster_size=16k", compress=True)
    assert qemu("compare", q, i).rc == 0
    assert qemu("check", i).rc == 0
    assert qemu("map", "--output=json", q).out == qemu("map", "--output=json", i).out.replace(i, q)
    # -B / -F and -l through the binding.
    base, mid, top = chain(tmp)
    qb = os.path.join(tmp, "qb.qcow2")
    ib = os.path.join(tmp, "ib.qcow2")
    qimg("convert", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", top, qb)
    pyinstar.convert(top, ib, fmt="qcow2", backing_file="mid.qcow2", backing_format="qcow2")
    assert qemu("compare", qb, ib).rc == 0
    assert qemu("map", "--output=json", qb).out == qemu("map", "--output=json", ib).out.replace(ib, qb)
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.convert(src, os.path.join(tmp, "x.qcow2"), fmt="qcow2", options="foo=1")
    assert "Invalid parameter 'foo'" in str(e.value)
    with pytest.raises(pyinstar.InstarError):
        pyinstar.convert(src, os.path.join(tmp, "y.qcow2"), fmt="qcow2", coroutines=0)


def test_c_api_old_struct_size(tmp, src):
    """A caller built against the struct without the appended fields gets their defaults."""
    import ctypes
    from instar import ops
    from instar._lib import Error
    L = ops._setup()
    old_size = ops.ConvertOptions.options.offset
    opts = ops.ConvertOptions(old_size, 0, None, b"raw", None, None, -1, ops.PROGRESS_FN(), None,
                              b"ignored=1", None, None, None, 0, -5)
    err = Error()
    dst = os.path.join(tmp, "old.raw")
    assert L.instar_convert(src.encode(), dst.encode(), ctypes.byref(opts), ctypes.byref(err)) == 0
    qd = os.path.join(tmp, "q.raw")
    qimg("convert", "-O", "raw", src, qd)
    with open(dst, "rb") as a, open(qd, "rb") as b:
        assert a.read() == b.read()


def test_bitmaps(tmp, src):
    p = os.path.join(tmp, "bm.qcow2")
    qimg("convert", "-O", "qcow2", src, p)
    # A v3 source without bitmaps: --bitmaps copies nothing and succeeds, as in qemu.
    same_convert(tmp, ["-O", "qcow2", "--bitmaps"], [p])
    same_convert(tmp, ["-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps"], [p])
    v2 = os.path.join(tmp, "v2.qcow2")
    qimg("convert", "-O", "qcow2", "-o", "compat=0.10", src, v2)
    same_convert(tmp, ["-O", "qcow2", "--bitmaps"], [v2])
    # With a bitmap it is copied (test_convert_bitmaps.py covers the contents).
    qimg("bitmap", "--add", p, "b0")
    same_convert(tmp, ["-O", "qcow2", "--bitmaps"], [p])


def test_rate_limit(tmp):
    """-r throttles writes to the target like qemu's leaky bucket: 4 MiB at 2 MiB/s in 2 MiB requests."""
    import time
    s = os.path.join(tmp, "r.raw")
    with open(s, "wb") as f:
        f.write(os.urandom(4 * MiB))
    took = {}
    for tool in ("qemu-img", INSTAR):
        t = time.monotonic()
        r = run([tool, "convert", "-O", "qcow2", "-r", "2M", s, os.path.join(tmp, "r.qcow2")])
        took[tool] = time.monotonic() - t
        assert r.rc == 0, r
        assert qemu("compare", s, os.path.join(tmp, "r.qcow2")).rc == 0
    assert took[INSTAR] >= 0.7
    assert abs(took[INSTAR] - took["qemu-img"]) < 0.5, took
