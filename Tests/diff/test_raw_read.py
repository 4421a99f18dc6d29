"""Reading raw images through the C API matches the file's bytes, and locking matches qemu's."""
import os
import subprocess
import time

import pytest
from conftest import instar, qimg

import instar as pyinstar


def test_library_loads_without_swift_toolchain(tmp):
    env = {"PATH": "/usr/bin:/bin", "INSTAR_LIBRARY": os.environ["INSTAR_LIBRARY"]}
    r = subprocess.run(["/usr/bin/python3", "-c",
                        "import ctypes,os; l=ctypes.CDLL(os.environ['INSTAR_LIBRARY']); "
                        "l.instar_version.restype=ctypes.c_char_p; print(l.instar_version().decode())"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == pyinstar.version()
    ldd = subprocess.run(["ldd", os.environ["INSTAR_LIBRARY"]], capture_output=True, text=True).stdout
    assert "swift" not in ldd


def test_raw_read_matches_file(tmp):
    p = os.path.join(tmp, "a.raw")
    data = os.urandom(70000)
    with open(p, "wb") as f:
        f.write(data)
    with pyinstar.Image(p) as img:
        # qemu rounds a raw file's size up to 512 bytes; the tail reads as zeroes.
        assert img.size == 70144
        assert img.read(0, 70000) == data
        assert img.read(69990, 154) == data[69990:] + b"\0" * 144
        with pytest.raises(pyinstar.InstarError) as e:
            img.read(70000, 1000)
        assert e.value.code == -12


def test_missing_file_error(tmp):
    with pytest.raises(pyinstar.InstarError) as e:
        pyinstar.Image(os.path.join(tmp, "nosuch.img"))
    assert e.value.code == -3
    assert e.value.message.endswith("No such file or directory")
