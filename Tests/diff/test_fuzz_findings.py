"""Inputs the libFuzzer targets (fuzz/run.sh) found, rebuilt here from qemu-img's own images and run next to
qemu-img: instar must answer the same, and not take far more work to do it."""
import os
import resource
import struct
import subprocess

from conftest import INSTAR, normalize, qimg


def cpu_run(argv):
    """Runs argv to completion; returns (exit code, stdout, stderr, CPU seconds it used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(argv, capture_output=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return p.returncode, p.stdout, p.stderr, cpu


def make_dup_vdi(img):
    """A VDI header claiming 2^20 blocks whose block map lies past the end of the file."""
    qimg("create", "-q", "-f", "vdi", img, "1M")
    with open(img, "r+b") as f:
        f.seek(0x180)
        f.write(struct.pack("<I", 1 << 20))  # blocks_in_image
    return img


def make_sparse_qcow2(img):
    """A small qcow2 with 512-byte clusters grown by truncate into a 64 GiB sparse file."""
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4k", img], check=True, capture_output=True)
    os.truncate(img, 64 << 30)
    return img


def test_vdi_check_many_duplicate_blocks(tmp):
    # A VDI header claiming 2^20 blocks whose block map lies past the end of the file: every entry reads as 0,
    # i.e. "allocated at data block 0", and qemu-img check prints one line per duplicate. instar printed the
    # same lines but spent ~3 µs on each (a generic string replace per line): 20 times qemu's time, and a
    # timeout for the fuzzer on an image of 414 bytes.
    img = make_dup_vdi(os.path.join(tmp, "dup.vdi"))
    q = cpu_run(["qemu-img", "check", "-f", "vdi", img])
    i = cpu_run([INSTAR, "check", "-f", "vdi", img])
    assert q[0] == 2 and q[2].count(b"\n") > 1 << 19, q[:3]
    assert (i[0], i[1], i[2]) == (q[0], normalize(q[1]), normalize(q[2]))
    # CPU time, which a loaded machine does not stretch much: about 1.5 times qemu's now, 6 times before.
    assert i[3] <= 3 * q[3] + 0.5, f"instar {i[3]:.2f}s CPU, qemu-img {q[3]:.2f}s"


def test_qcow2_map_of_huge_sparse_file(tmp):
    # The fuzzer's qcow2 target wrote through a hostile refcount table entry pointing 325 GiB into the file, which
    # left a sparse file that size; map then looked for metadata preallocation (qemu's
    # qcow2_detect_metadata_preallocation) one cluster at a time over all of it: 680 million refcount lookups.
    # Clusters no refcount block covers are now skipped a block at a time. A plain image grown sparse by
    # truncate shows the same walk.
    img = make_sparse_qcow2(os.path.join(tmp, "sparse.qcow2"))
    q = cpu_run(["qemu-img", "map", "--output=json", img])
    i = cpu_run([INSTAR, "map", "--output=json", img])
    assert q[0] == 0, q[:3]
    assert (i[0], i[1], i[2]) == (q[0], normalize(q[1]), normalize(q[2]))
    assert i[3] <= 3 * q[3] + 0.5, f"instar {i[3]:.2f}s CPU, qemu-img {q[3]:.2f}s"


def make_vmdk_2t(img):
    """A monolithicSparse vmdk whose header claims 2 TiB and whose grain directory lies past the end of the
    file: all 64 Ki directory entries read as 0 (no grain tables)."""
    qimg("create", "-q", "-f", "vmdk", img, "8M")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 64k", img], check=True, capture_output=True)
    size = os.path.getsize(img)
    with open(img, "r+b") as f:
        f.seek(12)
        f.write(struct.pack("<Q", (2 << 40) // 512))  # capacity, in sectors
        f.seek(56)
        f.write(struct.pack("<Q", size // 512 + 64))  # gd_offset, in sectors
    return img


def test_vmdk_check_of_2t_capacity(tmp):
    # check looked up each of the 32 Mi grains of a 2 TiB vmdk one at a time, tables or not: 0.73 s against
    # qemu's 0.18 s. A grain directory entry of 0 now passes its whole span in one step.
    img = make_vmdk_2t(os.path.join(tmp, "big.vmdk"))
    q = cpu_run(["qemu-img", "check", img])
    i = cpu_run([INSTAR, "check", img])
    assert (i[0], i[1], i[2]) == (q[0], normalize(q[1]), normalize(q[2]))
    assert i[3] <= q[3] + 0.1, f"instar {i[3]:.2f}s CPU, qemu-img {q[3]:.2f}s"


def make_huge_parallels(img, sectors):
    """A 1 MiB parallels image with one data cluster whose header declares `sectors` sectors: its BAT covers
    only the first MiB and everything past it reads as zeroes."""
    qimg("create", "-q", "-f", "parallels", "-o", "cluster_size=4k", img, "1M")
    subprocess.run(["qemu-io", "-f", "parallels", "-c", "write -P 0x11 64k 4k", img], check=True,
                   capture_output=True)
    with open(img, "r+b") as f:
        f.seek(36)  # nb_sectors
        f.write(struct.pack("<Q", sectors))
    return img


def test_parallels_map_of_a_huge_declared_size(tmp):
    # The parallels fuzzer found headers declaring exabytes past their BAT: map walked them in 1 GiB queries, as
    # qemu-img does, i.e. for days (qemu-img 7.2 itself fails an assertion there, and on real parallels images of
    # 1 TiB and more). The walk now widens its query while each answer covers all of it. On a real 64 GiB image
    # (its BAT covers it all) the output stays qemu-img's.
    img = os.path.join(tmp, "p64g.prl")
    qimg("create", "-q", "-f", "parallels", img, "64G")
    subprocess.run(["qemu-io", "-f", "parallels", "-c", "write -P 0x11 40G 4k", "-c", "write -P 0x22 1023M 2M", img],
                   check=True, capture_output=True)
    for out in ("human", "json"):
        q = subprocess.run(["qemu-img", "map", "-f", "parallels", f"--output={out}", img], capture_output=True,
                           timeout=600)
        i = subprocess.run([INSTAR, "map", "-f", "parallels", f"--output={out}", img], capture_output=True,
                           timeout=600)
        assert q.returncode == 0, q
        assert (i.returncode, i.stdout, i.stderr) == (q.returncode, q.stdout, q.stderr)
    # 7.75 EiB declared over a 1 MiB BAT: 2^33 queries of 1 GiB. instar answers in a few dozen, ending with one
    # entry for everything past the BAT; compare and measure get through as quickly.
    img = make_huge_parallels(os.path.join(tmp, "p8e.prl"), 0x3E04000000000000 >> 9)
    rc, out, err, cpu = cpu_run([INSTAR, "map", "-f", "parallels", "--output=json", img])
    assert rc == 0, err
    last = out.decode().strip().splitlines()[-1]
    assert '"present": false, "zero": true, "data": false' in last and last.endswith("}]"), last
    assert cpu < 5, cpu
    for argv in (["compare", "-f", "parallels", "-F", "parallels", img, img],
                 ["measure", "-f", "parallels", "-O", "qcow2", img]):
        rc, out, err, cpu = cpu_run([INSTAR, *argv])
        assert rc in (0, 1) and b"Fatal error" not in err and cpu < 5, (argv, rc, err, cpu)
