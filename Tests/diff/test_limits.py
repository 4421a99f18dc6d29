"""Per-call limits (instar_limits_t through instar.limits): a call past its time or CPU limit fails with
LimitReached and leaves every image it was writing free of corruption; within the limits the results are the same
as without them. Each workload that must pass a 1 ms limit is one that takes far longer on any machine (opening
4096 extent files, copying or compressing 256 MiB), so the outcomes do not depend on the machine's speed."""
import ctypes
import os
import shutil

import pytest

import instar
from instar import _lib
from instar.info import _InfoOptions, _setup as _info_setup
from conftest import qemu, qemu_io, qimg


@pytest.fixture(scope="module")
def many_extents(tmp_path_factory):
    """A vmdk of 4096 flat extents (twoGbMaxExtentFlat, 8 TiB), made by qemu-img."""
    d = str(tmp_path_factory.mktemp("vx"))
    p = os.path.join(d, "t.vmdk")
    qimg("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", p, "8T")
    yield p
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def big_raw(tmp):
    p = os.path.join(tmp, "big.raw")
    qimg("create", "-f", "raw", p, "256M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 256M", p)
    return p


def test_info_past_its_time_limit(many_extents):
    with pytest.raises(instar.LimitReached) as e:
        with instar.limits(timeout=0.001):
            instar.info(many_extents)
    assert e.value.code == _lib.E_LIMIT
    assert "Operation stopped: its time limit of 1 ms is reached" in str(e.value)


def test_within_the_limits_the_result_is_qemus(many_extents):
    with instar.limits(timeout=600, cpu=300):
        text = instar.info_json(many_extents)
    assert text == qemu("info", "--output=json", many_extents).out


def test_the_limits_end_with_the_block(many_extents):
    with pytest.raises(instar.LimitReached):
        with instar.limits(timeout=0.001):
            instar.info(many_extents)
    assert instar.info(many_extents).virtual_size == 8 << 40


def test_a_caller_struct_without_the_limits_member_has_no_limits(many_extents):
    """An options struct from a header older than `limits` (struct_size stops before it): the library reads only
    what struct_size declares, so a limits pointer past it is never looked at."""
    L = _info_setup()
    lim = _lib.Limits(ctypes.sizeof(_lib.Limits), 0, 1, 0)
    o = _InfoOptions(_InfoOptions.limits.offset, 0, None, 0, None)
    o.limits = ctypes.pointer(lim)
    out = ctypes.c_void_p()
    err = _lib.Error()
    L.instar_info_json.restype = ctypes.c_int32
    rc = L.instar_info_json(many_extents.encode(), ctypes.byref(o), ctypes.byref(out), ctypes.byref(err))
    assert rc == 0, err.message
    _lib.take_string(out)
    # The same struct with struct_size covering the member: the 1 ms limit applies.
    o.struct_size = ctypes.sizeof(_InfoOptions)
    rc = L.instar_info_json(many_extents.encode(), ctypes.byref(o), ctypes.byref(out), ctypes.byref(err))
    assert rc == _lib.E_LIMIT


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_past_its_time_limit(big_raw, tmp, fmt):
    dst = os.path.join(tmp, "o." + fmt)
    with pytest.raises(instar.LimitReached):
        with instar.limits(timeout=0.001):
            instar.convert(big_raw, dst, fmt=fmt)
    if os.path.exists(dst) and fmt == "qcow2":
        assert qemu("check", dst).rc == 0
    # and the same conversion without the limit matches the source
    if os.path.exists(dst):
        os.unlink(dst)
    instar.convert(big_raw, dst, fmt=fmt)
    assert qemu("compare", big_raw, dst).rc == 0


def test_compressing_past_its_cpu_limit(big_raw, tmp):
    dst = os.path.join(tmp, "c.qcow2")
    with pytest.raises(instar.LimitReached) as e:
        with instar.limits(cpu=0.001):
            instar.convert(big_raw, dst, fmt="qcow2", compress=True)
    assert "CPU time limit of 1 ms" in str(e.value)
    if os.path.exists(dst):
        assert qemu("check", dst).rc == 0


def test_commit_past_its_time_limit_leaves_the_chain_valid(tmp):
    base, top, ref = (os.path.join(tmp, n) for n in ("b.qcow2", "t.qcow2", "ref.qcow2"))
    qimg("create", "-f", "qcow2", base, "256M")
    qemu_io("-c", "write -P 1 0 256M", base)
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
    qemu_io("-c", "write -P 7 0 256M", top)
    shutil.copy(base, os.path.join(tmp, "b-ref.qcow2"))
    shutil.copy(top, ref)
    qimg("rebase", "-u", "-F", "qcow2", "-b", os.path.join(tmp, "b-ref.qcow2"), ref)
    with pytest.raises(instar.LimitReached):
        with instar.limits(timeout=0.001):
            instar.commit(top)
    assert qemu("check", base).rc == 0
    assert qemu("check", top).rc == 0
    assert qemu("compare", top, ref).rc == 0


def test_convert_with_copy_offload_past_its_time_limit(big_raw, tmp):
    """convert -C asks the block status of each chunk's source range before offloading it (the kernel copies the
    data, nothing reads it): a limit firing inside that query stops the copy (it fires once, so swallowing it there
    could let the copy run to the end; CallLimitTests checks that query alone)."""
    dst = os.path.join(tmp, "o.raw")
    with pytest.raises(instar.LimitReached):
        with instar.limits(timeout=0.001):
            instar.convert(big_raw, dst, source_format="raw", fmt="raw", copy_range=True)
    if os.path.exists(dst):
        os.unlink(dst)
    instar.convert(big_raw, dst, source_format="raw", fmt="raw", copy_range=True)
    assert qemu("compare", big_raw, dst).rc == 0


def test_vdsm_untrusted_info_runs_under_the_cpu_limit(tmp, monkeypatch):
    from instar.compat import vdsm
    p = os.path.join(tmp, "a.qcow2")
    qimg("create", "-f", "qcow2", p, "1G")
    seen = []
    real = instar.limits

    def spy(**kw):
        seen.append(kw)
        return real(**kw)
    monkeypatch.setattr(vdsm, "limits", spy)
    assert vdsm.info(p, trusted_image=False) == vdsm.info(p)
    assert seen == [{"cpu": vdsm.UNTRUSTED_CPU_SECONDS, "memory": vdsm.UNTRUSTED_MEMORY_BYTES}]
