"""What TensorFlow, tf2onnx, Keras and onnxruntime print during an export, and when.

An export shows its own steps; the libraries' logs (TensorFlow's C++ log, absl, Python
warnings, onnxruntime's C++ logger, onnxruntime.quantization's log and prints, tf2onnx's
log) are shown only with ``--verbose``. Without it, messages at ERROR and above still
reach the console, and so do onnxserve's own warnings.

``configure`` must run before TensorFlow is imported: TensorFlow reads
TF_CPP_MIN_LOG_LEVEL once, when its shared libraries load, and logs a few lines at import
time before any level applies (absl's "All log messages before absl::InitializeLog()",
oneDNN's notice, CUDA factory registrations on GPU builds), which only capturing the
process's stderr (file descriptor 2) during the import keeps off the console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

#: TF_CPP_MIN_LOG_LEVEL without --verbose: 3 drops INFO, WARNING and ERROR (FATAL stays).
QUIET_TF_LEVEL = "3"
#: onnxruntime's logger severity without --verbose: 3 is ERROR (0 verbose ... 4 fatal).
QUIET_ORT_SEVERITY = 3
#: Python loggers of the libraries, quietened by level too (in case one has its own handler).
LIBRARY_LOGGERS = ("tensorflow", "absl", "keras", "h5py", "onnxruntime", "onnxconverter_common",
                   "py.warnings")
OWN_LOGGER = "onnxserve"


class _OwnWarningsAndAnyError(logging.Filter):
    """Passes onnxserve's records at WARNING and above, and anyone's at ERROR and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        return own and record.levelno >= logging.WARNING


def configure(verbose: bool) -> None:
    """Set up this process's library logging for an export (once, before TensorFlow loads).

    ``verbose``: leave every library's log at its default (TF_CPP_MIN_LOG_LEVEL as the
    environment has it). Otherwise: TF_CPP_MIN_LOG_LEVEL=3, onnxruntime's default logger
    at ERROR, Python warnings routed to logging, and the root logger's handlers pass only
    onnxserve's warnings and anyone's errors (a handler is added when there is none).
    """
    if verbose:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_TF_LEVEL
    import onnxruntime as ort

    ort.set_default_logger_severity(QUIET_ORT_SEVERITY)
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for handler in root.handlers:
        if not any(isinstance(f, _OwnWarningsAndAnyError) for f in handler.filters):
            handler.addFilter(_OwnWarningsAndAnyError())
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _native_stderr_to(file: io.BufferedRandom) -> Iterator[None]:
    """Point file descriptor 2 (where C++ code writes) at ``file`` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(file.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow(verbose: bool) -> None:
    """Import TensorFlow and Keras; without ``verbose``, what they print while loading is
    dropped, unless the import fails: then it is written to stderr and the import's error
    is raised."""
    if verbose or "tensorflow" in sys.modules:
        import keras  # (imports TensorFlow)
        return
    error: BaseException | None = None
    with tempfile.TemporaryFile() as captured:
        with _native_stderr_to(captured):
            try:
                import keras  # noqa: F401
                import tensorflow  # noqa: F401
            except BaseException as exc:
                error = exc
        if error is not None:
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            sys.stderr.flush()
            raise error


@contextlib.contextmanager
def library_prints_hidden(verbose: bool) -> Iterator[None]:
    """Drop what library code prints to stdout meanwhile (onnxruntime.quantization's
    calibrators print their progress), unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
