"""pytest plugin: swaps a consumer's qemu-img wrapper module for instar's drop-in before any test imports it.

run.py loads it (`-p instar_dropin`) for the drop-in runs, with INSTAR_DROPIN naming the consumer and
PYTHONPATH reaching bindings/python. Each alias below puts instar's module in sys.modules under the consumer's
module name, so `from oslo_utils.imageutils import format_inspector` in the consumer's own tests gets ours. A
drop-in that cannot be imported fails the run at once (pytest reports the plugin's ImportError).
"""

import importlib
import os
import sys

# consumer -> [(the consumer's module name, instar's module)]
ALIASES = {
    "oslo": [
        ("oslo_utils.imageutils.qemu", "instar.compat.oslo"),
        ("oslo_utils.imageutils.format_inspector", "instar.compat.oslo.format_inspector"),
    ],
    "imageio": [
        ("ovirt_imageio._internal.qemu_img", "instar.compat.imageio"),
    ],
}


def _install(consumer):
    if consumer not in ALIASES:
        raise ImportError("INSTAR_DROPIN=%r: not one of %s" % (consumer, ", ".join(sorted(ALIASES))))
    for alias, target in ALIASES[consumer]:
        sys.modules[alias] = importlib.import_module(target)


_install(os.environ.get("INSTAR_DROPIN", ""))
