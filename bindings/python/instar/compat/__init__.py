"""Drop-in replacements for the qemu-img wrappers of oVirt and OpenStack, built on libinstar's calls instead of
running qemu-img: ``instar.compat.vdsm`` (vdsm.storage.qemuimg), ``instar.compat.nova`` and
``instar.compat.cinder`` (their image utilities), ``instar.compat.oslo`` (oslo_utils.imageutils: QemuImgInfo and
format_inspector), and the others listed in the README."""
