"""The format-specific data of vmdk (cid, parent-cid, create-type, every extent) and LUKS (the header's algorithms
and every key slot, for luks images and LUKS-encrypted qcow2) as fields of instar_info_t, equal to what qemu-img
info --output=json prints for the same image."""
import ctypes
import json
import os

import pytest

from instar.info import _Info, _setup
from instar._lib import Error, check
from conftest import qemu, qimg

SECRET = ["--object", "secret,id=s0,data=pw"]


def c_info(path, key_secret=None):
    """instar_info through ctypes: the root node's fields as a dict (strings decoded), then freed."""
    L = _setup()
    from instar.info import _InfoOptions
    o = _InfoOptions(ctypes.sizeof(_InfoOptions), 0, None, 0, key_secret.encode() if key_secret else None)
    out = ctypes.POINTER(_Info)()
    err = Error()
    check(L.instar_info(path.encode(), ctypes.byref(o), ctypes.byref(out), ctypes.byref(err)), err)
    try:
        n = out.contents
        d = {"vmdk_cid": n.vmdk_cid, "vmdk_parent_cid": n.vmdk_parent_cid,
             "vmdk_create_type": n.vmdk_create_type and n.vmdk_create_type.decode(),
             "extents": [dict(filename=n.extents[k].filename.decode(), format=n.extents[k].format.decode(),
                              virtual_size=n.extents[k].virtual_size, cluster_size=n.extents[k].cluster_size,
                              compressed=n.extents[k].compressed) for k in range(n.extent_count)],
             "luks": {k: getattr(n, "luks_" + k) and getattr(n, "luks_" + k).decode()
                      for k in ("cipher_alg", "cipher_mode", "ivgen_alg", "ivgen_hash_alg", "hash_alg", "uuid")},
             "payload_offset": n.luks_payload_offset, "master_key_iters": n.luks_master_key_iters,
             "slots": [dict(active=bool(n.luks_slots[k].active), iters=n.luks_slots[k].iters,
                            stripes=n.luks_slots[k].stripes, key_offset=n.luks_slots[k].key_offset)
                       for k in range(n.luks_slot_count)]}
        return d
    finally:
        L.instar_info_free(out)


def q_spec(path, *extra):
    r = qemu("info", "--output=json", *extra, path)
    assert r.rc == 0, r
    return json.loads(r.out).get("format-specific")


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse",
                                       "twoGbMaxExtentFlat", "monolithicFlat"])
def test_vmdk_fields(tmp, subformat):
    p = os.path.join(tmp, "v.vmdk")
    qimg("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", p, "5G")
    spec = q_spec(p)["data"]
    c = c_info(p)
    assert (c["vmdk_cid"], c["vmdk_parent_cid"], c["vmdk_create_type"]) == \
        (spec["cid"], spec["parent-cid"], spec["create-type"])
    want = [dict(filename=e["filename"], format=e.get("format", ""), virtual_size=e["virtual-size"],
                 cluster_size=e.get("cluster-size", -1),
                 compressed={None: -1, False: 0, True: 1}[e.get("compressed")]) for e in spec["extents"]]
    assert c["extents"] == want
    assert c["slots"] == [] and c["luks"]["cipher_alg"] is None and c["payload_offset"] == -1


def _luks_expect(data):
    return ({k: data.get(k.replace("_", "-")) for k in ("cipher_alg", "cipher_mode", "ivgen_alg", "ivgen_hash_alg",
                                                        "hash_alg", "uuid")},
            data["payload-offset"], data["master-key-iters"],
            [dict(active=s["active"], iters=s.get("iters", -1), stripes=s.get("stripes", -1),
                  key_offset=s["key-offset"]) for s in data["slots"]])


@pytest.mark.parametrize("opts", ["iter-time=10", "iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,"
                                  "ivgen-hash-alg=sha256,hash-alg=sha1"])
def test_luks_fields(tmp, opts):
    p = os.path.join(tmp, "l.luks")
    qimg("create", "-q", "-f", "luks", *SECRET, "-o", "key-secret=s0," + opts, p, "4M")
    data = q_spec(p)["data"]
    c = c_info(p)
    assert (c["luks"], c["payload_offset"], c["master_key_iters"], c["slots"]) == _luks_expect(data)
    assert c["vmdk_cid"] == -1 and c["extents"] == []


def test_qcow2_luks_fields(tmp):
    p = os.path.join(tmp, "e.qcow2")
    qimg("create", "-q", "-f", "qcow2", *SECRET, "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
         p, "4M")
    enc = q_spec(p)["data"]["encrypt"]
    c = c_info(p)
    assert (c["luks"], c["payload_offset"], c["master_key_iters"], c["slots"]) == _luks_expect(enc)


def test_plain_qcow2_has_neither(tmp):
    p = os.path.join(tmp, "p.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "1M")
    c = c_info(p)
    assert c["vmdk_cid"] == -1 and c["vmdk_create_type"] is None and c["extents"] == []
    assert c["slots"] == [] and c["luks"]["uuid"] is None and c["master_key_iters"] == -1
