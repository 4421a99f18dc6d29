"""pytest plugin loaded into ovirt-imageio's own test run (`-p ovirt_adapt`), adapting it to this machine
without editing its files.

- Its `test/distro.py` reads /etc/redhat-release at collection time (nbd_test.py's skipif), which Debian does
  not have: no such file means "not Fedora, CentOS or RHEL".
- Its helpers wait for qemu's and qemu-nbd's sockets with short fixed timeouts (1 s for qemu-system, 10 s for
  qemu-nbd). On a loaded 2-core machine those races make results depend on the load, so every wait for a
  socket to appear after starting qemu or qemu-nbd gets at least DEADLINE seconds. A wait still ends as soon as
  the socket appears, so nothing is slower; a zero timeout ("is it there now?") stays zero, and other waits
  (tests that expect no socket) keep theirs.
"""

import os
import sys

DEADLINE = 120.0
WAITERS = ("ovirt_imageio._internal.qemu_nbd", "test.qemu")


def pytest_configure(config):
    from test import distro  # ovirt-imageio's test package (the run's cwd is its source tree)

    if not os.path.exists("/etc/redhat-release"):
        distro._check = lambda text: False

    from ovirt_imageio._internal import sockutil

    wait_for_socket = sockutil.wait_for_socket

    def wait_with_deadline(addr, timeout, step=0.02):
        # Only the waits for a freshly started qemu or qemu-nbd; tests that wait for a socket not to appear
        # keep their timeouts.
        caller = sys._getframe(1).f_globals.get("__name__")
        if caller in WAITERS and timeout > 0:
            timeout = max(timeout, DEADLINE)
        return wait_for_socket(addr, timeout, step)

    sockutil.wait_for_socket = wait_with_deadline
