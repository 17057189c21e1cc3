"""Helpers the test modules share (``from support.served import start_server``, ...): a test
module imports its helpers from here, never from another test module or from conftest.py.

Some of these files are scripts the tests run in their own process (``triton_interop.py``,
``keepalive_client.py``, ...: each says why); ``SUPPORT / name`` is their path.
"""

from __future__ import annotations

from pathlib import Path

#: this package's folder: the scripts the tests run as subprocesses live here
SUPPORT = Path(__file__).resolve().parent
#: the repository's root
ROOT = SUPPORT.parent.parent
