"""instar_inspect (C API, `instar inspect`, instar.inspect) against oslo.utils 10.2.0's format_inspector.

For every image the reference is what Glance does with oslo.utils: `detect_file_format(path)` (several formats
matching is an ImageFormatError) and then `safety_check()` on the detected inspector. instar's default policy
(preset glance) must give the same verdict (refused or accepted) and the same detected format, and the same
virtual size where oslo.utils reads one. Images: every format qemu-img makes (with backing files, data files,
json: backing names, encryption), hand-made hostile ones (vmdk extents naming /etc/passwd or devices, text
descriptors, polyglot ISO+qcow2 and MBR+qcow2 files, MBR/GPT table variants, LUKS version 2, huge virtual
sizes, truncated headers) and every damaged qcow2/vpc variant of hostile_images.py. Then the presets, the
declared format, the limits, the CLI's JSON and exit codes, and the C ABI's struct_size handling.
"""
import ctypes
import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import INSTAR, ROOT, qimg
import compat_helpers
import hostile_images as H

sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
import instar  # noqa: E402
from instar import policy as P  # noqa: E402

MiB = 1 << 20


@pytest.fixture(scope="module")
def fi():
    compat_helpers.ensure_oslo()
    from oslo_utils.imageutils import format_inspector
    return format_inspector


def oslo_verdict(fi, path):
    """(detected format or None when several matched, refused?, virtual size or None)."""
    try:
        det = fi.detect_file_format(path)
    except fi.ImageFormatError:
        return None, True, None
    try:
        det.safety_check()
        refused = False
    except (fi.SafetyCheckFailed, fi.ImageFormatError):
        refused = True
    size = None
    try:
        size = det.virtual_size
    except Exception:
        pass
    return det.NAME, refused, size


def instar_verdict(path, **kw):
    r = instar.inspect(path, **kw)
    fmt = r.format if len(r.formats) < 2 else None
    return fmt, r.fatal, r


def assert_same_as_oslo(fi, path):
    o_fmt, o_refused, o_size = oslo_verdict(fi, path)
    i_fmt, i_refused, rep = instar_verdict(path)
    assert (i_fmt, i_refused) == (o_fmt, o_refused), (os.path.basename(path), rep)
    # Sizes oslo.utils reads from a header (raw and luks count the bytes it happened to read).
    if o_fmt not in (None, "raw", "luks") and o_size is not None and o_size < (1 << 63):
        assert rep.virtual_size == o_size, (os.path.basename(path), rep)
    return rep


# ---- images --------------------------------------------------------------------------------------------------

def mk(d, name, *create):
    p = os.path.join(d, name)
    qimg("create", "-q", *create[:-1], p, create[-1])
    return p


def write(d, name, data):
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def patch(path, offset, data, name=None):
    with open(path, "rb") as f:
        b = bytearray(f.read())
    if len(b) < offset + len(data):
        b += bytes(offset + len(data) - len(b))
    b[offset:offset + len(data)] = data
    out = path if name is None else os.path.join(os.path.dirname(path), name)
    with open(out, "wb") as f:
        f.write(b)
    return out


def vmdk_desc(create_type, extents, extra=""):
    lines = ["# Disk DescriptorFile", "version=1", "CID=12345678", "parentCID=ffffffff",
             'createType="%s"' % create_type, ""]
    lines += extents + ["", "ddb.virtualHWVersion = \"4\"", extra, ""]
    return "\n".join(lines).encode()


def vmdk_sparse_with(d, name, descriptor):
    """A qemu-made monolithicSparse vmdk whose embedded descriptor is replaced by `descriptor`."""
    p = mk(d, name, "-f", "vmdk", "4M")
    with open(p, "rb") as f:
        b = bytearray(f.read())
    desc_sector, desc_count = struct.unpack_from("<QQ", b, 28)
    at, room = desc_sector * 512, desc_count * 512
    assert len(descriptor) <= room
    b[at:at + room] = descriptor + bytes(room - len(descriptor))
    with open(p, "wb") as f:
        f.write(b)
    return p


def mbr(entries, sig=True, fat=False):
    b = bytearray(512)
    for i, (boot, ostype, chs, lba) in enumerate(entries):
        e = 446 + 16 * i
        b[e] = boot
        b[e + 1:e + 4] = bytes(chs)
        b[e + 4] = ostype
        struct.pack_into("<II", b, e + 8, lba, 1000)
    if sig:
        b[510:512] = b"\x55\xaa"
    if fat:
        b[0x10], b[0x15] = 2, 0xF8
    return bytes(b)


def iso_descriptor(blocks=100):
    d = bytearray(2048)
    d[0] = 1
    d[1:6] = b"CD001"
    struct.pack_into("<I", d, 80, blocks)
    struct.pack_into("<H", d, 128, 2048)
    return bytes(d)


def luks_header(version):
    h = bytearray(4096)
    h[0:6] = b"LUKS\xba\xbe"
    struct.pack_into(">H", h, 6, version)
    h[8:8 + 3] = b"aes"
    h[40:40 + 3] = b"xts"
    h[72:72 + 6] = b"sha256"
    struct.pack_into(">I", h, 104, 8)
    struct.pack_into(">I", h, 108, 32)
    return bytes(h) + bytes(8192)


def build_images(d):
    imgs = {}
    imgs["raw"] = write(d, "plain.raw", b"\x01" * 3 * MiB)
    imgs["empty"] = write(d, "empty.raw", b"")
    imgs["text"] = write(d, "text.raw", b"hello world\n" * 100)
    imgs["qcow2"] = mk(d, "a.qcow2", "-f", "qcow2", "64M")
    imgs["qcow2-v2"] = mk(d, "v2.qcow2", "-f", "qcow2", "-o", "compat=0.10", "64M")
    imgs["qcow2-backing"] = mk(d, "b.qcow2", "-f", "qcow2", "-b", imgs["qcow2"], "-F", "qcow2", "64M")
    imgs["qcow2-backing-rel"] = mk(d, "b2.qcow2", "-f", "qcow2", "-b", "../x/../a.qcow2", "-F", "qcow2", "-u", "64M")
    imgs["qcow2-json"] = mk(d, "j.qcow2", "-f", "qcow2", "-b",
                            'json:{"file":{"driver":"file","filename":"/etc/passwd"}}', "-F", "raw", "-u", "1M")
    imgs["qcow2-nbd"] = mk(d, "n.qcow2", "-f", "qcow2", "-b", "nbd://127.0.0.1:10809/x", "-F", "raw", "-u", "1M")
    imgs["qcow2-datafile"] = mk(d, "df.qcow2", "-f", "qcow2", "-o", "data_file=" + os.path.join(d, "df.data"), "8M")
    imgs["qcow2-extl2"] = mk(d, "el2.qcow2", "-f", "qcow2", "-o", "extended_l2=on", "8M")
    imgs["qcow2-luks"] = os.path.join(d, "enc.qcow2")
    qimg("create", "-q", "--object", "secret,id=s0,data=pw", "-f", "qcow2", "-o",
         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", imgs["qcow2-luks"], "8M")
    imgs["qcow2-small"] = write(d, "small.qcow2", open(imgs["qcow2"], "rb").read()[:300])
    imgs["qcow2-huge"] = patch(imgs["qcow2"], 24, struct.pack(">Q", 1 << 62), "huge.qcow2")
    imgs["qcow2-v1"] = patch(imgs["qcow2"], 4, struct.pack(">I", 1), "v1.qcow2")
    imgs["qcow2-unknown-feature"] = patch(imgs["qcow2"], 72, struct.pack(">Q", 1 << 40), "uf.qcow2")
    imgs["qed"] = mk(d, "a.qed", "-f", "qed", "8M")
    imgs["vpc"] = mk(d, "a.vhd", "-f", "vpc", "8M")
    imgs["vpc-fixed"] = mk(d, "fixed.vhd", "-f", "vpc", "-o", "subformat=fixed", "8M")
    imgs["vhdx"] = mk(d, "a.vhdx", "-f", "vhdx", "8M")
    imgs["vhdx-short"] = write(d, "short.vhdx", open(imgs["vhdx"], "rb").read()[:100000])
    imgs["vdi"] = mk(d, "a.vdi", "-f", "vdi", "8M")
    imgs["luks"] = os.path.join(d, "a.luks")
    qimg("create", "-q", "--object", "secret,id=s0,data=pw", "-f", "luks", "-o", "key-secret=s0,iter-time=10",
         imgs["luks"], "8M")
    imgs["luks2"] = write(d, "v2.luks", luks_header(2))
    imgs["vmdk"] = mk(d, "a.vmdk", "-f", "vmdk", "8M")
    imgs["vmdk-stream"] = mk(d, "s.vmdk", "-f", "vmdk", "-o", "subformat=streamOptimized", "8M")
    imgs["vmdk-flat"] = mk(d, "f.vmdk", "-f", "vmdk", "-o", "subformat=monolithicFlat", "1M")
    imgs["vmdk-2gb"] = mk(d, "t.vmdk", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "1M")
    imgs["vmdk-passwd-text"] = write(d, "passwd.vmdk", vmdk_desc("monolithicFlat", ['RW 8 FLAT "/etc/passwd" 0']))
    imgs["vmdk-device-text"] = write(d, "dev.vmdk", vmdk_desc("monolithicFlat", ['RW 8 FLAT "/dev/sda" 0']))
    imgs["vmdk-sparse-passwd"] = vmdk_sparse_with(d, "sp-passwd.vmdk", vmdk_desc(
        "monolithicSparse", ['RW 8192 SPARSE "sp-passwd.vmdk"', 'RW 8 FLAT "/etc/passwd" 0']))
    imgs["vmdk-sparse-dotdot"] = vmdk_sparse_with(d, "sp-dot.vmdk", vmdk_desc(
        "monolithicSparse", ['RW 8192 SPARSE "sp-dot.vmdk"', 'RW 8 FLAT "../../etc/shadow" 0']))
    imgs["vmdk-two-extents"] = vmdk_sparse_with(d, "sp-two.vmdk", vmdk_desc(
        "monolithicSparse", ['RW 8192 SPARSE "sp-two.vmdk"', 'RW 8 FLAT "other.img" 0']))
    imgs["vmdk-bad-line"] = vmdk_sparse_with(d, "sp-bad.vmdk", vmdk_desc(
        "monolithicSparse", ['RW 8192 SPARSE "sp-bad.vmdk"', "garbage line here"]))
    imgs["vmdk-no-extents"] = vmdk_sparse_with(d, "sp-none.vmdk", vmdk_desc("monolithicSparse", []))
    imgs["vmdk-parent"] = vmdk_sparse_with(d, "sp-parent.vmdk", vmdk_desc(
        "monolithicSparse", ['RW 8192 SPARSE "sp-parent.vmdk"'], 'parentFileNameHint="/srv/other/tenant.vmdk"'))
    imgs["qed-backing"] = mk(d, "b.qed", "-f", "qed", "-b", "nbd:127.0.0.1:10809", "-F", "raw", "-u", "8M")
    imgs["vmdk-huge"] = patch(imgs["vmdk"], 12, struct.pack("<Q", 1 << 60), "huge.vmdk")
    imgs["vmdk-badversion"] = patch(imgs["vmdk"], 4, struct.pack("<I", 9), "bv.vmdk")
    imgs["vmdk-truncated"] = write(d, "trunc.vmdk", open(imgs["vmdk"], "rb").read()[:2048])
    with open(imgs["qcow2"], "rb") as f:
        q = bytearray(f.read())
    imgs["iso+qcow2"] = write(d, "poly-iso.qcow2", bytes(q[:32768]) + iso_descriptor() + bytes(q[34816:]))
    imgs["mbr+qcow2"] = write(d, "poly-mbr.qcow2", bytes(q[:446]) + mbr([(0, 0x83, (0, 2, 0), 2048)])[446:]
                              + bytes(q[512:]))
    genisoimage = subprocess.run(["genisoimage", "-quiet", "-o", os.path.join(d, "a.iso"), ROOT + "/include"],
                                 capture_output=True)
    if genisoimage.returncode == 0:
        imgs["iso"] = os.path.join(d, "a.iso")
    gpt_ok = mbr([(0, 0xEE, (0, 2, 0), 1)])
    imgs["gpt"] = write(d, "gpt.raw", gpt_ok + bytes(MiB))
    imgs["mbr-linux"] = write(d, "mbr.raw", mbr([(0x80, 0x83, (1, 1, 0), 2048)]) + bytes(MiB))
    imgs["mbr-bad-boot"] = write(d, "mbr-boot.raw", mbr([(0x12, 0x83, (1, 1, 0), 2048)]) + bytes(MiB))
    imgs["gpt-bad-chs"] = write(d, "gpt-chs.raw", mbr([(0, 0xEE, (1, 2, 3), 1)]) + bytes(MiB))
    imgs["gpt-bad-lba"] = write(d, "gpt-lba.raw", mbr([(0, 0xEE, (0, 2, 0), 7)]) + bytes(MiB))
    imgs["gpt-extra"] = write(d, "gpt-extra.raw", mbr([(0, 0xEE, (0, 2, 0), 1), (0, 0x83, (1, 1, 0), 9)])
                              + bytes(MiB))
    imgs["mbr-empty"] = write(d, "mbr-empty.raw", mbr([]) + bytes(MiB))
    imgs["fat"] = write(d, "fat.raw", mbr([], fat=True) + bytes(MiB))
    return imgs


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return build_images(str(tmp_path_factory.mktemp("inspect")))


IMAGE_NAMES = [
    "raw", "empty", "text", "qcow2", "qcow2-v2", "qcow2-backing", "qcow2-backing-rel", "qcow2-json", "qcow2-nbd",
    "qcow2-datafile", "qcow2-extl2", "qcow2-luks", "qcow2-small", "qcow2-huge", "qcow2-v1", "qcow2-unknown-feature",
    "qed", "vpc", "vpc-fixed", "vhdx", "vhdx-short", "vdi", "luks", "luks2", "vmdk", "vmdk-stream", "vmdk-flat",
    "vmdk-2gb", "vmdk-passwd-text", "vmdk-device-text", "vmdk-sparse-passwd", "vmdk-sparse-dotdot",
    "vmdk-two-extents", "vmdk-bad-line", "vmdk-no-extents", "vmdk-huge", "vmdk-badversion", "vmdk-truncated",
    "iso+qcow2", "mbr+qcow2", "iso", "gpt", "mbr-linux", "mbr-bad-boot", "gpt-bad-chs", "gpt-bad-lba", "gpt-extra",
    "mbr-empty", "fat",
]


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_same_verdict_as_oslo(fi, images, name):
    if name not in images:
        pytest.skip("genisoimage failed")
    assert_same_as_oslo(fi, images[name])


def test_hostile_variants_same_verdict_as_oslo(fi, tmp_path):
    """Every damaged image of hostile_images.py: the same format and verdict as oslo.utils."""
    ctx = H.Context(str(tmp_path / "_base"))
    differ = []
    count = 0
    for name in sorted(H.VARIANTS):
        d = tmp_path / name
        d.mkdir()
        try:
            path = H.VARIANTS[name](ctx, str(d))
        except Exception as e:  # a builder that needs a tool this machine lacks
            pytest.fail("variant %s could not be built: %s" % (name, e))
        count += 1
        o_fmt, o_refused, _ = oslo_verdict(fi, path)
        i_fmt, i_refused, rep = instar_verdict(path)
        if (o_fmt, o_refused) != (i_fmt, i_refused):
            differ.append((name, (o_fmt, o_refused), (i_fmt, i_refused), rep.violations))
    assert count >= 250
    assert differ == []


def codes(rep, fatal_only=False):
    return sorted({v.code for v in rep.violations if v.fatal or not fatal_only})


def test_findings_beyond_oslo(images):
    """Names and extents oslo.utils does not read: reported (not fatal under the default preset)."""
    r = instar.inspect(images["qcow2-json"])
    assert {"backing-file", "protocol-name"} <= set(codes(r))
    assert codes(r, fatal_only=True) == ["backing-file"]
    r = instar.inspect(images["qcow2-nbd"])
    assert "protocol-name" in codes(r)
    r = instar.inspect(images["qcow2-backing-rel"])
    assert "unsafe-path" in codes(r) and "protocol-name" not in codes(r)
    r = instar.inspect(images["qcow2-datafile"])
    assert {"data-file", "unsafe-path"} <= set(codes(r))
    assert [v.offset for v in r.violations if v.code == "data-file"] == [72]
    r = instar.inspect(images["qcow2-luks"])
    assert codes(r) == ["encrypted"] and not r.fatal
    r = instar.inspect(images["luks"])
    assert codes(r) == ["encrypted"] and not r.fatal
    r = instar.inspect(images["luks2"])
    assert "unsupported-version" in codes(r, fatal_only=True)
    r = instar.inspect(images["vmdk-device-text"])
    assert {"vmdk-device", "vmdk-descriptor", "unsafe-path"} <= set(codes(r))
    r = instar.inspect(images["vmdk-sparse-passwd"])
    assert "vmdk-extent-path" in codes(r, fatal_only=True) and "unsafe-path" in codes(r)
    r = instar.inspect(images["vmdk-sparse-dotdot"])
    assert {"vmdk-extent-path", "unsafe-path"} <= set(codes(r))
    r = instar.inspect(images["iso+qcow2"])
    assert r.formats == ["qcow2", "iso"] and codes(r, fatal_only=True) == ["multiple-formats"]
    r = instar.inspect(images["mbr+qcow2"])
    assert sorted(r.formats) == ["gpt", "qcow2"] and r.fatal


def test_vmdk_parent_is_a_backing_file(fi, images):
    """A deliberate difference: qemu opens a vmdk's parentFileNameHint as a vmdk backing file (whatever parentCID
    says), and oslo.utils' descriptor check accepts that line as a field; instar reports it as a backing file,
    fatal under every preset."""
    p = images["vmdk-parent"]
    assert oslo_verdict(fi, p)[:2] == ("vmdk", False)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", p], capture_output=True,
                                     text=True).stdout or "{}")
    assert info.get("backing-filename") == "/srv/other/tenant.vmdk"
    for preset in ("glance", "nova", "cinder", "vdsm", "pve"):
        r = instar.inspect(p, preset=preset)
        assert r.format == "vmdk" and "backing-file" in codes(r, fatal_only=True), preset
    assert "unsafe-path" in codes(instar.inspect(p))


def test_qed_backing(images):
    """qed is refused by every preset but pve, which refuses it for its backing file (a protocol name too)."""
    r = instar.inspect(images["qed-backing"], preset="pve")
    assert codes(r, fatal_only=True) == ["backing-file", "protocol-name"]
    assert not instar.inspect(images["qed"], preset="pve").fatal


def test_declared_format(images):
    r = instar.inspect(images["qcow2"], declared_format="raw")
    assert r.fatal and codes(r) == ["format-mismatch"]
    assert r.violations[0].message == "Image content is qcow2, not the declared raw"
    assert not instar.inspect(images["qcow2"], declared_format="qcow2").fatal
    assert not instar.inspect(images["vpc"], declared_format="vpc").fatal
    assert not instar.inspect(images["gpt"], declared_format="raw").fatal
    assert instar.inspect(images["raw"], declared_format="qcow2").fatal
    # A polyglot declared as one of its formats: refused for matching several, not for the declared format.
    r = instar.inspect(images["iso+qcow2"], declared_format="iso")
    assert codes(r, fatal_only=True) == ["multiple-formats"]
    r = instar.inspect(images["mbr+qcow2"], declared_format="raw")
    assert codes(r, fatal_only=True) == ["multiple-formats"]
    r = instar.inspect(images["iso+qcow2"], declared_format="vmdk")
    assert codes(r, fatal_only=True) == ["format-mismatch", "multiple-formats"]


def test_limits_and_presets(images):
    r = instar.inspect(images["qcow2"], max_virtual_size=MiB)
    assert codes(r) == ["virtual-size"] and r.fatal
    assert not instar.inspect(images["qcow2"], max_virtual_size=64 * MiB).fatal
    r = instar.inspect(images["vmdk-huge"], max_virtual_size=1 << 40)
    assert "virtual-size" in codes(r, fatal_only=True)
    # Two extents without a '/': oslo.utils (glance) accepts; Proxmox refuses more than one.
    assert not instar.inspect(images["vmdk-two-extents"]).fatal
    r = instar.inspect(images["vmdk-two-extents"], preset="pve")
    assert codes(r, fatal_only=True) == ["vmdk-extents"]
    assert not instar.inspect(images["vmdk-two-extents"], preset="pve", max_vmdk_extents=0).fatal
    assert instar.inspect(images["vmdk-two-extents"], max_vmdk_extents=1).fatal
    # pve ignores oslo.utils' MBR checks and qed ban, refuses json: names and data files.
    assert not instar.inspect(images["mbr-bad-boot"], preset="pve").fatal
    assert not instar.inspect(images["qed"], preset="pve").fatal
    assert instar.inspect(images["qcow2-datafile"], preset="pve").fatal
    assert "protocol-name" in codes(instar.inspect(images["qcow2-json"], preset="pve"), fatal_only=True)
    # cinder refuses encryption, nova does not.
    assert instar.inspect(images["qcow2-luks"], preset="cinder").fatal
    assert not instar.inspect(images["qcow2-luks"], preset="nova").fatal
    assert "unsafe-path" in codes(instar.inspect(images["qcow2-backing-rel"], preset="vdsm"), fatal_only=True)
    # A chosen fatal set replaces the preset's; an empty one makes nothing fatal.
    r = instar.inspect(images["qcow2-backing"], fatal=[])
    assert not r.fatal and codes(r) == ["backing-file", "unsafe-path"]
    assert instar.inspect(images["qcow2-luks"], fatal=["encrypted"]).fatal
    with pytest.raises(instar.PolicyViolation) as e:
        instar.inspect(images["qcow2-backing"], raise_on_fatal=True)
    assert e.value.code == -14 and e.value.message == "Image has a backing file"
    assert e.value.report.format == "qcow2"


def test_missing_file(tmp_path):
    with pytest.raises(instar.NotFound):
        instar.inspect(str(tmp_path / "nope"))


def test_cli_json_and_exit_codes(images):
    p = subprocess.run([INSTAR, "inspect", "--output=json", images["qcow2-backing"]], capture_output=True, text=True)
    assert p.returncode == 2, p
    j = json.loads(p.stdout)
    assert j["format"] == "qcow2" and j["fatal"] is True and j["policy"] == "glance"
    assert j["violations"][0] == {"code": "backing-file", "field": "qcow2.backing_file_offset", "offset": 8,
                                  "message": "Image has a backing file", "fatal": True}
    p = subprocess.run([INSTAR, "inspect", "--output=json", images["qcow2"]], capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["violations"] == []
    assert json.loads(p.stdout)["virtual-size"] == 64 * MiB
    p = subprocess.run([INSTAR, "inspect", "--policy=pve", "-f", "raw", images["qcow2"]], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "fatal: format-mismatch" in p.stdout and "policy: pve" in p.stdout
    p = subprocess.run([INSTAR, "inspect", "--fatal=none", images["qcow2-backing"]], capture_output=True, text=True)
    assert p.returncode == 0 and "note: backing-file" in p.stdout
    p = subprocess.run([INSTAR, "inspect", "--policy=nope", images["qcow2"]], capture_output=True, text=True)
    assert p.returncode == 1 and "Unknown policy" in p.stderr
    p = subprocess.run([INSTAR, "inspect", images["qcow2"] + ".missing"], capture_output=True, text=True)
    assert p.returncode == 1 and "Could not inspect" in p.stderr


def test_capi_policy_init_writes_only_callers_size(images):
    """instar_inspect_policy_init_sized writes min(struct_size, library size) bytes: an older, smaller caller's struct
    is not overrun; a policy read with a short struct_size ignores the fields past it."""
    L = instar.lib()
    L.instar_inspect_policy_init_sized.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    L.instar_inspect_policy_init_sized.restype = ctypes.c_int
    buf = (ctypes.c_uint8 * 64)(*([0xAB] * 64))
    assert L.instar_inspect_policy_init_sized(buf, 8) == 0
    assert struct.unpack_from("<II", bytes(buf), 0) == (8, 0)
    assert bytes(buf)[8:] == b"\xab" * 56
    full = ctypes.sizeof(P._Policy)
    buf = (ctypes.c_uint8 * 64)(*([0xAB] * 64))
    assert L.instar_inspect_policy_init_sized(buf, 64) == 0
    assert struct.unpack_from("<I", bytes(buf), 0)[0] == full
    assert bytes(buf)[full:] == b"\xab" * (64 - full)
    assert L.instar_inspect_policy_init_sized(None, 64) == -1
    assert L.instar_inspect_policy_init_sized(buf, 2) == -1
    # A struct_size of 8 (struct_size + preset only): fatal, limits and declared format past it are not read.
    pol = P._Policy()
    L.instar_inspect_policy_init_sized(ctypes.byref(pol), ctypes.sizeof(pol))
    pol.struct_size = 8
    pol.fatal = P.FATAL_NONE
    pol.declared_format = b"raw"
    L.instar_inspect.argtypes = [ctypes.c_char_p, ctypes.POINTER(P._Policy), ctypes.POINTER(ctypes.POINTER(P._Report)),
                                 ctypes.POINTER(instar._lib.Error)]
    out = ctypes.POINTER(P._Report)()
    err = instar._lib.Error()
    rc = L.instar_inspect(images["qcow2-backing"].encode(), ctypes.byref(pol), ctypes.byref(out), ctypes.byref(err))
    assert rc == -14 and out
    got = [P.CODES[out.contents.violations[i].code] for i in range(out.contents.count)]
    assert got == ["backing-file", "unsafe-path"]   # the absolute backing name; no format-mismatch
    assert err.message == b"Image has a backing file"
    L.instar_inspect_report_free(out)
    pol.struct_size = ctypes.sizeof(pol)
    rc = L.instar_inspect(images["qcow2-backing"].encode(), ctypes.byref(pol), ctypes.byref(out), ctypes.byref(err))
    got = [P.CODES[out.contents.violations[i].code] for i in range(out.contents.count)]
    assert rc == 0 and not out.contents.fatal and got == ["format-mismatch", "backing-file", "unsafe-path"]
    L.instar_inspect_report_free(out)


def test_mutations_same_verdict_as_oslo(fi, images, tmp_path):
    """Random byte edits (a fixed seed) of the images above, some truncated: the same format and verdict as
    oslo.utils, and never a crash. oslo.utils itself raises AttributeError on some (a text start whose first
    4 KiB are not ASCII: docs/inspect.md); those have no verdict to compare."""
    import logging
    import random
    rnd = random.Random(20261205)
    bases = [p for n, p in sorted(images.items()) if n in IMAGE_NAMES and 0 < os.path.getsize(p) < 20 * MiB]
    differ, compared = [], 0
    logging.disable(logging.CRITICAL)
    try:
        for n in range(300):
            data = bytearray(open(rnd.choice(bases), "rb").read())
            for _ in range(rnd.randint(1, 8)):
                limit = min(len(data), rnd.choice([64, 512, 4096, 65536, len(data)]))
                data[rnd.randrange(limit)] = rnd.randrange(256)
            if rnd.random() < 0.2:
                data = data[:rnd.randrange(len(data))]
            p = write(str(tmp_path), "m%d" % n, bytes(data))
            try:
                o = oslo_verdict(fi, p)[:2]
            except AttributeError:
                continue
            i_fmt, i_refused, rep = instar_verdict(p)
            compared += 1
            if o != (i_fmt, i_refused):
                differ.append((n, o, (i_fmt, i_refused), rep.violations))
            os.unlink(p)
    finally:
        logging.disable(logging.NOTSET)
    assert compared >= 250 and differ == []


def test_reports_do_not_leak(images):
    """20,000 inspections of an image with several violations (long messages) leave resident memory flat: a
    report, its strings or its array left unfreed would add megabytes."""
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    p = images["qcow2-json"]
    assert len(instar.inspect(p).violations) >= 2
    for _ in range(2000):
        instar.inspect(p)
    before = rss()
    for _ in range(20000):
        instar.inspect(p)
    assert rss() - before < (2 << 20)


def test_python_policy_object(images):
    pol = instar.InspectPolicy(preset="pve", declared_format="qcow2", max_virtual_size=1 << 30)
    r = instar.inspect(images["vmdk-two-extents"], policy=pol)
    assert r.preset == "pve" and r.format == "vmdk"
    assert codes(r, fatal_only=True) == ["format-mismatch", "vmdk-extents"]
    assert [v.field for v in r.violations if v.code == "vmdk-extents"] == ["vmdk.extents"]
    assert pol.preset == "pve"   # keyword overrides do not change the caller's policy
    assert instar.inspect(images["vmdk-two-extents"], policy=pol, preset="glance").preset == "glance"
    with pytest.raises(ValueError):
        instar.inspect(images["qcow2"], preset="nope")
    with pytest.raises(ValueError):
        instar.inspect(images["qcow2"], fatal=["no-such-code"])
    d = instar.inspect(images["qcow2-backing"]).as_dict()
    assert d["violations"][0]["code"] == "backing-file" and d["format"] == "qcow2"
