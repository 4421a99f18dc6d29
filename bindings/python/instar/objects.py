"""qemu's ``--object`` for library callers: ``object_add("tls-creds-x509,id=tls0,dir=...")`` adds TLS credentials
or a secret to the process's object table (instar_object_add), which every later open, create and convert consults
(an nbd node's ``tls-creds=ID``, ``key-secret=ID`` and ``encrypt.key-secret=ID`` in json: names and option
lists); ``object_del(id)`` removes one. Errors are qemu-img's ``--object`` messages."""
from __future__ import annotations

import ctypes
from typing import Any

from ._lib import Error, check, encode, lib


def _fn(name: str) -> Any:
    f = getattr(lib(), name)
    f.argtypes = [ctypes.c_char_p, ctypes.POINTER(Error)]
    f.restype = ctypes.c_int
    return f


def object_add(definition: str) -> None:
    """Adds the object `definition` defines, in ``--object``'s syntax (``secret,id=sec0,data=...``,
    ``tls-creds-x509,id=tls0,dir=DIR,endpoint=client``, ``tls-creds-psk,id=tls0,dir=DIR,username=NAME``)."""
    err = Error()
    check(_fn("instar_object_add")(encode(definition), ctypes.byref(err)), err)


def object_del(id: str) -> None:
    """Removes object `id` (``NotFound`` when there is none)."""
    err = Error()
    check(_fn("instar_object_del")(encode(id), ctypes.byref(err)), err)
