"""qcow2 corruption events on images opened read-only: when a lookup finds a damaged L1 or L2 entry, qemu-img
prints "qcow2: Image is corrupt: ...; further non-fatal corruption events will be suppressed" once for the image
(qcow2_signal_corruption), then the operation's own error with the errno's text. instar prints the same lines
(stdout, stderr and exit code compared with qemu-img's) for info, map (human and JSON), convert and compare, in
process and --isolated.
A damaged refcount structure only fails block status's metadata-preallocation probe, which qemu ignores."""
import os
import struct

import pytest

from conftest import INSTAR, assert_same, run
from test_check import Q, make


def zero_entry_in_v2(q):
    """A zero-flag L2 entry in a version 2 image."""
    q.set_l2(1, q.l2(1) | 1)


def cluster_unaligned(q):
    q.set_l2(3, q.l2(3) | 0x200)


def l2_table_unaligned(q):
    q.set_l1(0, q.l1(0) | 0x200)


def invalid_entry_twice(q):
    """Two damaged entries: the second event is suppressed."""
    q.set_l2(2, q.l2(2) | 0x200)
    q.set_l2(5, q.l2(5) | 0x200)


def _reftable_entry(q, value):
    with open(q.path, "r+b") as f:
        f.seek(48)
        (reftable,) = struct.unpack(">Q", f.read(8))
        f.seek(reftable)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek(reftable)
        f.write(struct.pack(">Q", value(entry)))


def refblock_unaligned(q):
    """The first refcount block's offset unaligned: block status's metadata-preallocation probe (which reads
    refcounts) fails with the event, and the status is still answered (qemu takes the failure as "no")."""
    _reftable_entry(q, lambda e: e | 0x200)


def refblock_past_eof(q):
    """A refcount block far past the end of the file (the differential fuzzer's qcow2-v2-122): the probe fails
    without an event, and map, convert and compare still succeed."""
    _reftable_entry(q, lambda e: 0xFFFFFF7F00000000)


# name: (create options, damage, whether map/convert/compare print the event line)
CASES = {
    "zero-entry-v2": ("compat=0.10", zero_entry_in_v2, True),
    "cluster-unaligned": (None, cluster_unaligned, True),
    "l2-table-unaligned": (None, l2_table_unaligned, True),
    "two-events": (None, invalid_entry_twice, True),
    "refblock-unaligned": (None, refblock_unaligned, True),
    "refblock-past-eof": ("compat=0.10", refblock_past_eof, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_event_lines(tmp, case):
    opts, damage, event = CASES[case]
    path = make(tmp, opts=opts, writes=("write -P 1 0 1M",))
    damage(Q(path))
    name = os.path.basename(path)
    for argv in (["info", name], ["map", name], ["map", "--output=json", name],
                 ["convert", "-O", "raw", name, "out.raw"], ["compare", name, name]):
        r = assert_same(*argv, cwd=tmp)
        # --isolated: the helper sends the event line to the caller as it happens, so the output is the same.
        iso = run([INSTAR, argv[0], "--isolated", *argv[1:]], cwd=tmp)
        assert (iso.rc, iso.out, iso.err.replace("instar: ", "qemu-img: ")) == (r.rc, r.out, r.err.replace(
            "instar: ", "qemu-img: ")), (argv, iso, r)
        if os.path.exists(os.path.join(tmp, "out.raw")):
            os.unlink(os.path.join(tmp, "out.raw"))
        if argv[0] in ("map", "convert", "compare"):
            # Once per open image (compare opens the file twice, and may meet it in both).
            assert (r.err.count("qcow2: Image is corrupt: ") >= 1) == event, (argv, r)
        if os.path.exists(os.path.join(tmp, "out.raw")):
            os.unlink(os.path.join(tmp, "out.raw"))
