"""Thread safety of the library: several threads open, read, info, map, check and compare different images and
the same images at once (ctypes drops the GIL around each call, so the calls really overlap in libinstar), and
every result equals the single-threaded one, which in turn equals what qemu-img says."""
import hashlib
import json
import os
import random
import threading

import pytest

from conftest import qimg, qemu_io, run

import instar

THREADS = 8
ROUNDS = 12
PASS = "123456"
OBJ = f"secret,id=sec0,data={PASS}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("threads"))
    p = lambda n: os.path.join(d, n)  # noqa: E731
    qimg("create", "-q", "-f", "qcow2", p("base.qcow2"), "8M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 512k", p("base.qcow2"))
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("top.qcow2"))
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 512k 1M", "-c", "write -z 3M 64k", p("top.qcow2"))
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p("small.qcow2"), "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x44 0 3M", "-c", "discard 1M 64k", p("small.qcow2"))
    qimg("convert", "-c", "-O", "qcow2", p("top.qcow2"), p("comp.qcow2"))
    qimg("convert", "-O", "raw", p("top.qcow2"), p("flat.raw"))
    qimg("create", "-q", "--object", OBJ, "-f", "qcow2", "-o",
         "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", p("enc.qcow2"), "2M")
    qemu_io("--object", OBJ, "--image-opts", f"driver=qcow2,encrypt.key-secret=sec0,file.filename={p('enc.qcow2')}",
            "-c", "write -P 0x55 64k 256k")
    names = ["base.qcow2", "top.qcow2", "small.qcow2", "comp.qcow2", "flat.raw", "enc.qcow2"]
    return d, [p(n) for n in names]


def key_for(path):
    return PASS if path.endswith("enc.qcow2") else None


def digest(path, chunk=300 * 1024 + 7):
    """Reads the whole guest in odd-sized chunks and hashes it."""
    h = hashlib.sha256()
    with instar.Image(path, key_secret=key_for(path)) as img:
        off = 0
        while off < img.size:
            n = min(chunk, img.size - off)
            h.update(img.read(off, n))
            off += n
    return h.hexdigest()


def results(path):
    """Everything the threads compute for one image."""
    key = key_for(path)
    out = {"digest": digest(path), "info": instar.info_json(path, backing_chain=True, key_secret=key),
           "map": instar.map(path, key_secret=key)}
    if path.endswith(".qcow2"):
        out["check"] = instar.check_json(path, key_secret=key)
    return out


def qemu_results(path, tmp):
    key = key_for(path)
    spec = [path] if key is None else ["--object", OBJ, "--image-opts",
                                       f"driver=qcow2,encrypt.key-secret=sec0,file.filename={path}"]
    raw = os.path.join(tmp, os.path.basename(path) + ".raw")
    qimg("convert", "-O", "raw", *spec, raw)
    with open(raw, "rb") as f:
        d = hashlib.sha256(f.read()).hexdigest()
    return d, json.loads(qimg("map", "--output=json", *spec).out)


def run_threads(worker):
    """Runs worker(0) .. worker(THREADS - 1) on their own threads and waits for all of them."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_single_threaded_matches_qemu(images, tmp):
    d, paths = images
    for p in paths:
        r = results(p)
        digest_q, map_q = qemu_results(p, tmp)
        assert r["digest"] == digest_q, p
        assert r["map"] == map_q, p
        if key_for(p) is None:
            assert r["info"] == qimg("info", "--output=json", "--backing-chain", p).out, p
            if "check" in r:
                assert r["check"] == qimg("check", "--output=json", p).out, p


def test_concurrent_equals_single_threaded(images):
    _, paths = images
    expected = {p: results(p) for p in paths}
    compare_expected = instar.compare(paths[1], paths[4])
    missing = os.path.join(os.path.dirname(paths[0]), "missing.qcow2")
    with pytest.raises(instar.InstarError) as ei:
        instar.Image(missing)
    missing_error = (ei.value.code, ei.value.message)
    failures = []
    start = threading.Barrier(THREADS)

    def worker(seed):
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(ROUNDS):
                # Half the threads hammer the same image, the others pick any.
                p = paths[1] if seed % 2 == 0 else rng.choice(paths)
                what = rng.choice(["digest", "info", "map", "check", "compare", "missing"])
                if what == "compare":
                    got, want = instar.compare(paths[1], paths[4]), compare_expected
                elif what == "missing":
                    try:
                        instar.Image(missing)
                        got = None
                    except instar.InstarError as e:
                        got = (e.code, e.message)
                    want = missing_error
                elif what == "check" and "check" not in expected[p]:
                    continue
                else:
                    got = results(p)[what] if what != "digest" else digest(p)
                    want = expected[p][what]
                if got != want:
                    failures.append((seed, what, p))
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append((seed, "exception", repr(e)))

    run_threads(worker)
    assert failures == []


def test_one_handle_shared_by_threads(images):
    """Calls on one handle are serialised by the library, so threads may share it."""
    _, paths = images
    p = paths[1]
    with instar.Image(p) as img:
        size = img.size
        whole = img.read(0, size)
        failures = []

        def worker(seed):
            rng = random.Random(seed)
            for _ in range(200):
                off = rng.randrange(0, size - 1)
                n = rng.randrange(1, min(size - off, 200000) + 1)
                if img.read(off, n) != whole[off:off + n]:
                    failures.append((seed, off, n))

        run_threads(worker)
        assert failures == []
