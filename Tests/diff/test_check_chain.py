"""`instar check --chain` (an instar extension): every image of the backing chain is checked as `qemu-img check`
checks it alone. Human output: per image, top first, "image: NAME" and qemu-img check's text, blocks separated
by an empty line; JSON: an array of qemu-img check's objects. The exit status is the worst of the images'
(1 > 2 > 3 > 63 > 0)."""
import json
import os

import pytest
from conftest import instar, qemu, qemu_io, qimg
from test_check import Q, corrupt_l2_duplicate, corrupt_leak

RANK = {0: 0, 63: 1, 3: 2, 2: 3, 1: 4}


def worst(codes):
    return max(codes, key=lambda c: RANK.get(c, 4))


def qcow2_chain(tmp, raw_base=False):
    """base <- mid <- top, all qcow2 (or a raw base), each with some data of its own."""
    names = []
    if raw_base:
        base = os.path.join(tmp, "base.raw")
        with open(base, "wb") as f:
            f.truncate(4 << 20)
            f.seek(4096)
            f.write(os.urandom(70000))
        bfmt = "raw"
    else:
        base = os.path.join(tmp, "base.qcow2")
        qimg("create", "-q", "-f", "qcow2", base, "4M")
        qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", base)
        bfmt = "qcow2"
    names.append(base)
    mid = os.path.join(tmp, "mid.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", bfmt, mid, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 2 512k 1M", mid)
    top = os.path.join(tmp, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 3 1M 1M", top)
    names.insert(0, mid)
    names.insert(0, top)
    return names  # top first


def chain_names(tmp, top_arg):
    """The images' names as `qemu-img info --backing-chain` prints them, top first."""
    r = qemu("info", "--backing-chain", "--output=json", top_arg, cwd=tmp)
    assert r.rc == 0, r
    return [d["filename"] for d in json.loads(r.out)]


def expected(tmp, names, extra=(), json_out=False):
    """What check --chain should print, made from qemu-img check of each image on its own."""
    results = [qemu("check", *extra, *(["--output=json"] if json_out else []), n, cwd=tmp) for n in names]
    codes = [r.rc for r in results]
    err = "".join(r.err for r in results)
    if json_out:
        objs = [json.loads(r.out) for r in results if r.out]
        return worst(codes), objs, err
    out = "\n".join(f"image: {n}\n{r.out}" for n, r in zip(names, results))
    return worst(codes), out, err


def run_both(tmp, top_arg, extra=()):
    names = chain_names(tmp, top_arg)
    code, out, err = expected(tmp, names, extra)
    r = instar("check", "--chain", *extra, top_arg, cwd=tmp)
    assert (r.rc, r.out, r.err) == (code, out, err)
    code, objs, err = expected(tmp, names, extra, json_out=True)
    r = instar("check", "--chain", "--output=json", *extra, top_arg, cwd=tmp)
    assert (r.rc, r.err) == (code, err)
    assert json.loads(r.out) == objs
    return code


def test_clean_qcow2_chain(tmp):
    paths = qcow2_chain(tmp)
    assert run_both(tmp, paths[0]) == 0


def test_raw_base_is_63(tmp):
    paths = qcow2_chain(tmp, raw_base=True)
    # The top as given (relative), the rest as the overlays name them (resolved against their directories).
    code = run_both(tmp, "top.qcow2")
    assert code == 63


def test_worst_code_leak_and_corruption(tmp):
    paths = qcow2_chain(tmp)
    corrupt_leak(Q(paths[0]))
    assert run_both(tmp, paths[0]) == 3
    corrupt_l2_duplicate(Q(paths[2]))
    assert run_both(tmp, paths[0]) == 2


def test_leak_beats_unsupported(tmp):
    paths = qcow2_chain(tmp, raw_base=True)
    corrupt_leak(Q(paths[1]))
    assert run_both(tmp, paths[0]) == 3


def test_quiet_and_single_image(tmp):
    paths = qcow2_chain(tmp)
    corrupt_leak(Q(paths[1]))
    code, _, err = expected(tmp, chain_names(tmp, paths[0]), ("-q",))
    r = instar("check", "--chain", "-q", paths[0])
    assert (r.rc, r.out, r.err) == (code, "", err)
    assert code == 3
    # A lone image: the same as check, in chain form.
    lone = os.path.join(tmp, "lone.qcow2")
    qimg("create", "-q", "-f", "qcow2", lone, "1M")
    q = qemu("check", lone)
    r = instar("check", "--chain", lone)
    assert (r.rc, r.out, r.err) == (q.rc, f"image: {lone}\n{q.out}", q.err)


def test_without_chain_unchanged(tmp):
    paths = qcow2_chain(tmp)
    corrupt_leak(Q(paths[1]))
    for extra in ([], ["--output=json"]):
        q = qemu("check", *extra, paths[0])
        r = instar("check", *extra, paths[0])
        assert (r.rc, r.out, r.err) == (q.rc, q.out, q.err)


def test_missing_backing(tmp):
    paths = qcow2_chain(tmp)
    os.unlink(paths[2])
    q = qemu("check", paths[0])
    r = instar("check", "--chain", paths[0])
    assert (r.rc, r.out, r.err) == (q.rc, "", q.err)


def test_repair_leaks_each_image(tmp):
    paths = qcow2_chain(tmp)
    corrupt_leak(Q(paths[0]))
    corrupt_leak(Q(paths[2]))
    saved = {}
    for p in paths:
        with open(p, "rb") as f:
            saved[p] = f.read()
    code, out, err = expected(tmp, chain_names(tmp, paths[0]), ("-r", "leaks"))
    for p in paths:
        with open(p, "wb") as f:
            f.write(saved[p])
    r = instar("check", "--chain", "-r", "leaks", paths[0])
    assert (r.rc, r.out, r.err) == (code, out, err)
    for p in paths:
        assert qemu("check", p).rc == 0


def test_python_and_c_api(tmp):
    import instar as pyinstar
    if not hasattr(pyinstar, "check_chain_json"):
        pytest.skip("no Python wrapper")
    paths = qcow2_chain(tmp, raw_base=True)
    corrupt_leak(Q(paths[1]))
    code, objs, _ = expected(tmp, chain_names(tmp, paths[0]), json_out=True)
    got_code, text = pyinstar.check_chain_json(paths[0])
    assert got_code == code == 3
    assert json.loads(text) == objs
