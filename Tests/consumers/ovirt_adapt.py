"""pytest plugin loaded into ovirt-imageio's own test run (`-p ovirt_adapt`), adapting it to this machine
without editing its files.

- Its `test/distro.py` reads /etc/redhat-release at collection time (nbd_test.py's skipif), which Debian does
  not have: no such file means "not Fedora, CentOS or RHEL".
- Its helpers wait for qemu's and qemu-nbd's sockets with short fixed timeouts (1 s for qemu-system, 10 s for
  qemu-nbd). On a loaded 2-core machine those races make results depend on the load, so every wait for a
  socket to appear gets at least DEADLINE seconds. A wait still ends as soon as the socket appears, so nothing
  is slower; a zero timeout ("is it there now?", used to check that a socket is gone) stays zero.
"""

import os

DEADLINE = 120.0


def pytest_configure(config):
    from test import distro  # ovirt-imageio's test package (the run's cwd is its source tree)

    if not os.path.exists("/etc/redhat-release"):
        distro._check = lambda text: False

    from ovirt_imageio._internal import sockutil

    wait_for_socket = sockutil.wait_for_socket

    def wait_with_deadline(addr, timeout, step=0.02):
        return wait_for_socket(addr, max(timeout, DEADLINE) if timeout > 0 else timeout, step)

    sockutil.wait_for_socket = wait_with_deadline
