"""The images oslo.utils 10.2.0's own tests inspect (oslo_utils/tests/imageutils/test_format_inspector.py), as
files, for Tests/diff/policy_oslo.py (instar inspect's verdict against format_inspector's).

Runs in the consumers' virtualenv (build/consumers/venv), where oslo.utils' test module imports: the images qemu-img
and mkisofs make are made by that module's own builders (TestFormatInspectors._create_img,
_create_allocated_vmdk, _generate_bad_iso; _build_luks_header for the hand-made LUKS headers). The cases its tests
build in memory and feed to one inspector (vmdk descriptor lines, vmdk footers, GPT protective MBR entries, qcow2
feature bits, vmdk signature/version/descriptor location, LUKS headers) are written as files here, each step of the
test a file, so detect_file_format() and instar inspect both see them. Only the LUKS images are made otherwise:
one `qemu-img create -f luks` with `iter-time=10` (rather than qemu's default 2 s of PBKDF2 per key slot) per run,
each size a copy with its payload cut or extended (_luks): iteration counts, keys and the passphrase differ from
what oslo.utils' tests make, and neither inspector reads them.

builders() -> [(name, declared format, fn(dir) -> path)], in a stable order; `full=False` drops the 128 and 129 MiB
sizes of test_format/test_subformat (the 7 MiB one stays), for a quick run.
"""
import os
import shutil
import struct
import subprocess
import tempfile
import threading

MiB = 1 << 20


def _module():
    from oslo_utils.tests.imageutils import test_format_inspector as t
    return t


# tempfile.tempdir is global: one builder of oslo.utils' test module runs at a time.
_LOCK = threading.Lock()


class _Maker:
    """One TestFormatInspectors instance whose builders write into `d` (tempfile.mktemp honours tempfile.tempdir)."""

    def __init__(self, d):
        t = _module()
        self.t = t
        self.case = t.TestFormatInspectors(methodName="test_vdi")
        self.case._created_files = []
        self.d = d

    def __enter__(self):
        _LOCK.acquire()
        self.old = tempfile.tempdir
        tempfile.tempdir = self.d
        return self.case

    def __exit__(self, *exc):
        tempfile.tempdir = self.old
        _LOCK.release()
        return False


def _oslo(d, method, *args, **kw):
    with _Maker(d) as case:
        return getattr(case, method)(*args, **kw)


_LUKS_BASE = {}


def use_luks_base(path):
    """Takes `path`, a LUKS image qemu-img made (`create -f luks`, iter-time=10), as the image the LUKS sizes are
    copied from, instead of making one (qemu-img spends 2-3 s of CPU benchmarking PBKDF2 for each)."""
    _LUKS_BASE["given"] = path


def _luks(d, size):
    """TestFormatInspectors._create_luks / TestLUKSInspector._create_luks: `qemu-img create -f luks` of `size`
    bytes. qemu-img makes one such image per run (iter-time=10: see the module doc), or use_luks_base() names
    one; each size is a copy of it whose payload is cut or extended to `size` (the header is the same for every
    size, and the passphrase plays no part in either inspector; qemu leaves the payload a hole)."""
    from conftest import qimg
    with _LOCK:
        base = _LUKS_BASE.get("given") or _LUKS_BASE.get("path")
        if base is None or not os.path.exists(base):
            base = os.path.join(tempfile.mkdtemp(prefix="oslo-luks-"), "base.luks")
            qimg("create", "-q", "-f", "luks", "--object", "secret,id=sec0,data=secret-passphrase",
                 "-o", "key-secret=sec0,iter-time=10", base, "1M")
            _LUKS_BASE["path"] = base
    with open(base, "rb") as f:
        header = f.read(4096)
    payload = struct.unpack_from(">I", header, 104)[0] * 512
    p = os.path.join(d, "oslo.luks")
    with open(base, "rb") as src, open(p, "wb") as f:
        f.write(src.read(payload))
        f.truncate(payload + int(size))
    return p


def cleanup():
    """Removes what the builders keep between images (the LUKS image sizes are copied from)."""
    _LUKS_BASE.pop("given", None)
    base = _LUKS_BASE.pop("path", None)
    if base:
        shutil.rmtree(os.path.dirname(base), ignore_errors=True)


def _write(d, name, data):
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(bytes(data))
    return p


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


# ---- test_qcow2_feature_flag_checks: a 512-byte header, one file per step ------------------------------------

def _qcow2_flags():
    data = bytearray(512)
    data[0:4] = b"QFI\xfb"
    steps = []

    def snap(name):
        steps.append((name, bytes(data)))

    data[0x07] = 3
    snap("v3-no-features")
    data[0x48] = 0x01
    snap("v3-feature-bit-63")
    data[0x48] = 0x00
    data[0x4F] = 0x01
    snap("v3-dirty-bit")
    data[0x4F] = 0x80
    snap("v3-feature-bit-7")
    data[0x07] = 1
    snap("v1")
    data[0x07] = 4
    snap("v4")
    data[0x07] = 2
    snap("v2-feature-bits-ignored")
    return steps


# ---- test_vmdk_safety_checks: descriptor lines inside a qemu-made monolithicSparse vmdk ----------------------

def _vmdk_descriptor_steps():
    lines = ["# a comment", "createType monolithicFlat", "", " ", "someUnknownThing=foo", "ddb whatever",
             "rw 0 somefile.vmdk"]
    steps = [("broken-createType", list(lines))]
    lines[1] = 'createType="monolithicFlat"'
    steps.append(("monolithicFlat", list(lines)))
    lines[1] = 'createType="monolithicSparse"'
    steps.append(("monolithicSparse-ok", list(lines)))
    lines.append("wronly 2048 somefile2.vmdk")
    steps.append(("bad-access-mode", list(lines)))
    lines[-1] = "rw 2048 /etc/hosts"
    steps.append(("extent-with-slash", list(lines)))
    lines.pop()
    lines.pop()
    steps.append(("no-extents", list(lines)))
    return steps


def _vmdk_with_descriptor(d, lines):
    p = _oslo(d, "_create_img", "vmdk", 5 * MiB)
    with open(p, "r+b") as f:
        h = f.read(512)
        desc_sec, desc_num = struct.unpack_from("<QQ", h, 28)
        data = "\n".join(lines).encode()
        room = desc_num * 512
        assert len(data) <= room
        f.seek(desc_sec * 512)
        f.write(data + bytes(room - len(data)))
    return p


# ---- test_vmdk_footer_checks: footers appended to a streamOptimized vmdk whose header says GD_AT_END ----------

def _footer_variants():
    """(name, {field: value}) of test_vmdk_footer_checks, in its order; the last one is the valid footer."""
    return [
        ("signature", dict(sig=b"leak")),
        ("version", dict(ver=2)),
        ("descriptor-sector", dict(desc_sec_delta=1)),
        ("descriptor-size", dict(desc_num_delta=1)),
        ("another-footer", dict(gdo_at_end=True)),
        ("footer-marker-type", dict(fm_typ=7)),
        ("footer-marker-size", dict(fm_sz=1)),
        ("footer-marker-pad", dict(fm_pad=b"\x01")),
        ("eos-marker-type", dict(eos_typ=7)),
        ("eos-marker-size", dict(eos_sz=1)),
        ("eos-marker-pad", dict(eos_pad=b"\x01")),
        ("valid", dict()),
    ]


def _vmdk_footer(d, v):
    """test_vmdk_with_footer's image (streamOptimized, gdOffset = GD_AT_END) with test_vmdk_footer_checks' footer
    `v`: footer marker, a copy of the header (with v's change), end-of-stream marker."""
    gd_at_end = 0xFFFFFFFFFFFFFFFF
    p = _oslo(d, "_create_img", "vmdk", 5 * MiB, subformat="streamOptimized")
    with open(p, "r+b") as f:
        f.seek(56)
        f.write(struct.pack("<Q", gd_at_end))
        f.seek(0)
        header = bytearray(f.read(512))
        footer = bytearray(header)
        struct.pack_into("<Q", footer, 56, gd_at_end if v.get("gdo_at_end") else 123)
        if "sig" in v:
            footer[0:4] = v["sig"]
        if "ver" in v:
            struct.pack_into("<I", footer, 4, v["ver"])
        # The test's d_sec and d_off: the descriptor's sector (header offset 28) and its size in sectors (36).
        if "desc_sec_delta" in v:
            struct.pack_into("<Q", footer, 28, struct.unpack_from("<Q", footer, 28)[0] + v["desc_sec_delta"])
        if "desc_num_delta" in v:
            struct.pack_into("<Q", footer, 36, struct.unpack_from("<Q", footer, 36)[0] + v["desc_num_delta"])
        region = bytearray(512 * 3)
        region[8] = v.get("fm_sz", 0)
        region[12] = v.get("fm_typ", 3)
        region[16:512] = v.get("fm_pad", b"\x00") * 496
        region[512:1024] = footer
        region[1024 + 8] = v.get("eos_sz", 0)
        region[1024 + 12] = v.get("eos_typ", 0)
        region[1024 + 16:] = v.get("eos_pad", b"\x00") * 496
        f.seek(0, 2)
        f.write(region)
    return p


def _vmdk_zero_footer(d):
    """test_vmdk_with_footer's first image: the header says a footer follows, the last 3 sectors are zeros."""
    p = _oslo(d, "_create_img", "vmdk", 5 * MiB, subformat="streamOptimized")
    with open(p, "r+b") as f:
        f.seek(56)
        f.write(struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))
        f.seek(0, 2)
        f.write(bytes(512 * 3))
    return p


# ---- test_gpt_mbr_check: the protective MBR steps, one 1 KiB file each -------------------------------------

def _gpt_mbr_steps():
    data = bytearray(512 * 2)
    data[510:512] = b"\x55\xaa"
    steps = []

    def mkpte(n=0, boot=0, ostype=0xEE, starth=2, startlba=1):
        data[446 + n * 16:446 + n * 16 + 16] = struct.pack(
            "<BBBBBBBBII", boot, 0, starth, 0, ostype, 0, 0, 0, startlba, 0)

    mkpte()
    steps.append(("efi-ok", bytes(data)))
    mkpte(boot=0xA)
    steps.append(("bad-boot-flag", bytes(data)))
    mkpte(ostype=0)
    steps.append(("no-partitions", bytes(data)))
    mkpte()
    mkpte(n=1)
    steps.append(("extra-partitions", bytes(data)))
    mkpte(n=1, ostype=2)
    mkpte(ostype=0x8E, starth=1)
    steps.append(("non-efi-any-chs", bytes(data)))
    mkpte(starth=1)
    steps.append(("efi-bad-chs", bytes(data)))
    mkpte(ostype=0x8E, startlba=2)
    steps.append(("non-efi-any-lba", bytes(data)))
    mkpte(startlba=2)
    steps.append(("efi-bad-lba", bytes(data)))
    return steps


# ---- test_vmdk_format_checks ------------------------------------------------------------------------------

def _vmdk_format_steps():
    ver1 = bytearray(512)
    ver1[0:5] = b"KDMV\x01"
    return [("zeros", bytes(512)), ("kdmv-version-0", b"KDMV\x00" + bytes(512)),
            ("kdmv-v1-descriptor-at-0", bytes(ver1))]


# ---- TestLUKSInspector: _build_luks_header ---------------------------------------------------------------

def _luks_headers():
    t = _module()
    b = t._build_luks_header
    return [
        ("v1", lambda: b()),
        ("zeros-592", lambda: bytes(592)),
        ("v1-cbc-essiv-sha512", lambda: b(cipher_alg="aes", cipher_mode="cbc-essiv:sha256", hash_spec="sha512",
                                          payload_offset=2048, key_bytes=64, mk_digest_iter=50000)),
        ("v2", lambda: b(version=2)),
        ("v1-no-active-slots", lambda: b(slots=[{"active": False} for _ in range(8)])),
        ("v1-second-slot", lambda: b(key_bytes=32, slots=[
            {"active": False, "key_offset": 8, "stripes": 4000},
            {"active": True, "iterations": 1000, "salt": b"\xcc" * 32, "key_offset": 16, "stripes": 2000}])),
        ("v1-plus-10k", lambda: b(payload_offset=4096) + bytes(10 * 1024)),
    ]


def builders(full=True):
    """[(name, declared, fn(d) -> path)]: every image of test_format_inspector.py, named after its test."""
    out = []
    sizes = (128, 129, 7) if full else (7,)
    for fmt in ("qcow2", "vhd", "vhdx", "vmdk", "luks"):
        for s in sizes:
            if fmt == "luks":
                out.append((f"test_format/luks-{s}M", "luks", lambda d, s=s: _luks(d, s * MiB)))
            else:
                out.append((f"test_format/{fmt}-{s}M", fmt,
                            lambda d, f=fmt, s=s: _oslo(d, "_create_img", f, s * MiB)))
    out.append(("test_format/gpt", "raw", lambda d: _oslo(d, "_create_img", "gpt", 7 * MiB)))
    for fmt, sub in (("iso", "iso9660"), ("iso", "udf"), ("vmdk", "streamOptimized")):
        for s in sizes:
            out.append((f"test_subformat/{fmt}-{sub}-{s}M", fmt,
                        lambda d, f=fmt, sub=sub, s=s: _oslo(d, "_create_img", f, s * MiB, subformat=sub)))
    for s in sizes:
        out.append((f"test_vdi/vdi-{s}M", "vdi", lambda d, s=s: _oslo(d, "_create_img", "vdi", s * MiB)))

    def bad_iso(d):
        qcow, iso, fn = _oslo(d, "_generate_bad_iso")
        for p in (qcow, iso):
            os.unlink(p)
        return fn
    out.append(("test_bad_iso_qcow2/iso+qcow2", "iso", bad_iso))
    out.append(("test_qed_always_unsafe/qed", "qed", lambda d: _oslo(d, "_create_img", "qed", 5 * MiB)))
    out.append(("test_vmdk_non_sparse_unsafe/monolithicFlat", "vmdk",
                lambda d: _oslo(d, "_create_img", "vmdk", 5 * MiB, subformat="monolithicFlat")))
    for sub in (None, "streamOptimized"):
        label = sub or "monolithicSparse"
        out.append((f"test_vmdk_bad_descriptor_offset/{label}", "vmdk",
                    lambda d, sub=sub: _patch(_oslo(d, "_create_img", "vmdk", 5 * MiB, subformat=sub), 0x1C,
                                              struct.pack("<Q", 0x400 // 512))))
        out.append((f"test_vmdk_bad_descriptor_mem_limit/{label}", "vmdk",
                    lambda d, sub=sub: _patch(_oslo(d, "_create_allocated_vmdk", 5, subformat=sub), 0x1C + 8,
                                              struct.pack("<Q", (2 << 20) // 512))))

    def qcow2_safety(kind):
        def make(d):
            backing = os.path.join(d, "backing")
            with open(backing, "w") as f:
                f.write("foobar")
            if kind == "backing-file-text":
                return backing
            if kind == "plain":
                return _oslo(d, "_create_img", "qcow2", 5 * MiB, None)
            if kind == "backing":
                return _oslo(d, "_create_img", "qcow2", 5 * MiB, None, backing_file=backing)
            return _oslo(d, "_create_img", "qcow2", 5 * MiB,
                         options={"data_file": os.path.join(d, "data"), "data_file_raw": "on"})
        return make
    for kind, declared in (("plain", "qcow2"), ("backing", "qcow2"), ("data-file", "qcow2"),
                           ("backing-file-text", "raw")):
        out.append((f"test_qcow2_safety_checks/{kind}", declared, qcow2_safety(kind)))
    for name, data in _qcow2_flags():
        out.append((f"test_qcow2_feature_flag_checks/{name}", "qcow2",
                    lambda d, n=name, x=data: _write(d, n + ".qcow2", x)))

    def invalid_data(d):
        p = os.path.join(d, "test_format_inspector.py")
        shutil.copyfile(_module().__file__, p)
        return p
    out.append(("test_invalid_data/module-source", "raw", invalid_data))
    out.append(("test_vmdk_with_footer/zero-footer", "vmdk", _vmdk_zero_footer))
    for name, v in _footer_variants():
        out.append((f"test_vmdk_footer_checks/{name}", "vmdk", lambda d, v=v: _vmdk_footer(d, v)))
    for name, lines in _vmdk_descriptor_steps():
        out.append((f"test_vmdk_safety_checks/{name}", "vmdk", lambda d, x=lines: _vmdk_with_descriptor(d, x)))
    for name, data in _vmdk_format_steps():
        out.append((f"test_vmdk_format_checks/{name}", "vmdk", lambda d, n=name, x=data: _write(d, n + ".vmdk", x)))
    for name, data in _gpt_mbr_steps():
        out.append((f"test_gpt_mbr_check/{name}", "raw", lambda d, n=name, x=data: _write(d, n + ".raw", x)))
    out.append(("test_params_passed_to_inspector/raw-1k", "raw", lambda d: _oslo(d, "_create_img", "raw", 1024)))
    for name, make in _luks_headers():
        out.append((f"TestLUKSInspector/{name}", "luks", lambda d, n=name, m=make: _write(d, n + ".luks", m())))
    out.append(("TestLUKSInspector/qemu-luks-10M", "luks", lambda d: _luks(d, 10 * MiB)))
    return out


def have_tools():
    """What the builders need beyond qemu-img: mkisofs (genisoimage); udf support of it."""
    try:
        subprocess.run(["mkisofs", "--version"], capture_output=True, check=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False
