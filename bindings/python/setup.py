"""Only the wheel's tag lives here (everything else is in pyproject.toml): a wheel that carries
instar/_native/libinstar.so is tagged for this platform (py3-none-linux_x86_64, any Python 3), one without it
stays pure (py3-none-any) and finds the library installed on the system."""
import os
import sysconfig

from setuptools import setup

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 takes it from the wheel package
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.exists(os.path.join(HERE, "instar", "_native", "libinstar.so"))


class PlatformWheel(bdist_wheel):
    def get_tag(self):
        if BUNDLED:  # pure Python code beside a native library that any Python 3 loads through ctypes
            return "py3", "none", sysconfig.get_platform().replace("-", "_").replace(".", "_")
        return super().get_tag()


setup(cmdclass={"bdist_wheel": PlatformWheel})
