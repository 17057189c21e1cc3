"""Builds the native gRPC transport (serving/frontends/native/transport.cc) when gRPC C++
is found; everything else is declared in pyproject.toml.

gRPC C++ is found through pkg-config (`grpc++`: Debian and Ubuntu's libgrpc++-dev, see
docs/serving.md). Without it the package installs without the extension and the python
transport serves. ONNXSERVE_NATIVE=on makes a missing gRPC C++ an install error, =off skips
the build; ONNXSERVE_NATIVE_SANITIZE=1 builds it with AddressSanitizer and
UndefinedBehaviorSanitizer (`make test-native-asan`).
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

SOURCE = "serving/frontends/native/transport.cc"
MODULE = "onnxserve.serving.frontends.native._transport"
WARNINGS = ["-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Wconversion", "-Werror"]


def _grpc_flags() -> list[str] | None:
    try:
        found = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"],
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return found.stdout.split()


def native_extensions() -> list:
    wanted = os.environ.get("ONNXSERVE_NATIVE", "auto")
    if wanted == "off":
        return []
    flags = _grpc_flags()
    if flags is None:
        message = ("onnxserve: gRPC C++ not found (pkg-config grpc++): installing without the "
                   "native gRPC transport; install libgrpc++-dev and pkg-config for it")
        if wanted == "on":
            raise SystemExit(message)
        print(message, file=sys.stderr)
        return []
    import sysconfig

    import pybind11
    from pybind11.setup_helpers import Pybind11Extension

    # Their headers as system headers: the warnings are for this project's code.
    headers = [pybind11.get_include(), sysconfig.get_paths()["include"]]
    compile_args = [arg for path in headers for arg in ("-isystem", path)]
    compile_args += [f for f in flags if not f.startswith(("-l", "-L"))] + WARNINGS
    link_args = [f for f in flags if f.startswith(("-l", "-L"))]
    if os.environ.get("ONNXSERVE_NATIVE_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                    "-fno-sanitize-recover=undefined"]
        compile_args += [*sanitize, "-O1", "-g"]
        link_args += sanitize
    return [Pybind11Extension(MODULE, [SOURCE], cxx_std=17, extra_compile_args=compile_args,
                              extra_link_args=link_args)]


class BuildAlways(build_ext):
    """Compile even when build/ holds an object newer than the source: it may come from a
    build with other flags (ONNXSERVE_NATIVE_SANITIZE), which setuptools does not compare."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.force = True


setup(ext_modules=native_extensions(), cmdclass={"build_ext": BuildAlways})
