"""The native gRPC transport: C++ (transport.cc, grpc++) moves the calls and their bytes;
Python (server.py here, and the same servicers the grpcio server runs) decides everything.

``transport`` is the compiled module, or None when the package was installed without it
(``BUILD_PROBLEM`` then says why: gRPC C++ was not found at install time, see
docs/serving.md).
"""

from __future__ import annotations

import importlib
from types import ModuleType

transport: ModuleType | None
BUILD_PROBLEM: str
try:
    transport = importlib.import_module(f"{__name__}._transport")
    BUILD_PROBLEM = ""
except ImportError as exc:  # not built: the python transport serves
    transport = None
    BUILD_PROBLEM = str(exc)
