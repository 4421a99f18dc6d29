"""qcow2 corruption events on images opened read-only: when a lookup finds a damaged L1 or L2 entry, qemu-img
prints "qcow2: Image is corrupt: ...; further non-fatal corruption events will be suppressed" once for the image
(qcow2_signal_corruption), then the operation's own error with the errno's text. instar prints the same lines
(stdout, stderr and exit code compared with qemu-img's) for info, map (human and JSON), convert and compare."""
import os

import pytest

from conftest import assert_same
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


CASES = {
    "zero-entry-v2": ("compat=0.10", zero_entry_in_v2),
    "cluster-unaligned": (None, cluster_unaligned),
    "l2-table-unaligned": (None, l2_table_unaligned),
    "two-events": (None, invalid_entry_twice),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_event_lines(tmp, case):
    opts, damage = CASES[case]
    path = make(tmp, opts=opts, writes=("write -P 1 0 1M",))
    damage(Q(path))
    name = os.path.basename(path)
    for argv in (["info", name], ["map", name], ["map", "--output=json", name],
                 ["convert", "-O", "raw", name, "out.raw"], ["compare", name, name]):
        r = assert_same(*argv, cwd=tmp)
        if argv[0] in ("map", "convert", "compare"):
            assert "qcow2: Image is corrupt: " in r.err and r.err.count("qcow2: ") == 1, (argv, r)
        if os.path.exists(os.path.join(tmp, "out.raw")):
            os.unlink(os.path.join(tmp, "out.raw"))
