"""Drop-in replacements for the qemu-img wrappers of oVirt and OpenStack, built on libinstar's calls instead of
running qemu-img: ``instar.compat.vdsm`` (vdsm.storage.qemuimg), ``instar.compat.nova`` and
``instar.compat.cinder`` (their image utilities), and the others listed in the README."""
