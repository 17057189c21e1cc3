"""Progress lines for the long steps of an export: training epochs and conversions.

One line when a step starts, one line per epoch, and, while a step runs longer than
``HEARTBEAT_SECONDS``, a line every ``HEARTBEAT_SECONDS`` saying it is still going, so that
a conversion of VGG19 (minutes) or a slow epoch does not look like a hang.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

#: seconds between "still ..." lines while a step runs
HEARTBEAT_SECONDS = 30.0


def say(line: str, out: TextIO | None = None) -> None:
    """Print one progress line and flush it at once (stdout unless ``out``)."""
    print(line, file=out or sys.stdout, flush=True)


class Heartbeat:
    """While open, prints ``status(elapsed seconds)`` every ``every`` seconds (from a
    daemon thread) to ``out``, or to the sys.stdout of when it was made (so that code
    redirecting stdout meanwhile, as around the quantizer, does not swallow it); prints
    nothing if closed sooner. ``every`` must be positive."""

    def __init__(self, status: Callable[[float], str], every: float = HEARTBEAT_SECONDS,
                 out: TextIO | None = None) -> None:
        if every <= 0:
            raise ValueError(f"heartbeat every {every} s: expected a positive number")
        self._status, self._every, self._out = status, every, out or sys.stdout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> Heartbeat:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="export-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            say(self._status(time.monotonic() - self._started), self._out)


@contextlib.contextmanager
def step(what: str, every: float = HEARTBEAT_SECONDS, out: TextIO | None = None
         ) -> Iterator[None]:
    """Print ``what ...`` now and ``  still <what> (N s)`` every ``every`` seconds until
    the block ends."""
    say(f"{what} ...", out)
    with Heartbeat(lambda seconds: f"  still {what} ({seconds:.0f} s)", every, out):
        yield


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def epoch_line(epoch: int, epochs: int, logs: dict, seconds: float) -> str:
    """``epoch 3/30: loss 0.4123, accuracy 0.8821, val_loss ..., val_accuracy ... (1.2 s)``:
    losses first, training metrics before validation ones. ``epoch`` counts from 1,
    ``logs`` are Keras' epoch-end metrics, ``seconds`` the epoch's wall time."""
    order = sorted(logs, key=lambda name: (name.startswith("val_"), "loss" not in name, name))
    metrics = ", ".join(f"{name} {_number(logs[name])}" for name in order)
    return f"epoch {epoch}/{epochs}: {metrics} ({seconds:.1f} s)"


def epoch_callback(epochs: int, every: float = HEARTBEAT_SECONDS, out: TextIO | None = None):
    """A Keras callback printing one line per epoch (epoch_line). Its ``heartbeat()`` is a
    context manager to wrap ``fit`` in: during an epoch longer than ``every`` seconds it
    prints ``  epoch 3/30: step 400/1250 (30 s)`` every ``every`` seconds. ``epochs``: the
    most the training runs (early stopping may end it sooner)."""
    import keras

    class EpochLines(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epoch: int | None = None  # None: no epoch has begun yet
            self.batch = 0
            self.started = time.monotonic()

        def heartbeat(self) -> Heartbeat:
            return Heartbeat(self._status, every, out)

        def _status(self, seconds: float) -> str:
            if self.epoch is None:
                return f"  still preparing the training ({seconds:.0f} s)"
            steps = (self.params or {}).get("steps")
            of = f"/{steps}" if steps else ""
            return (f"  epoch {self.epoch + 1}/{epochs}: step {self.batch}{of} "
                    f"({time.monotonic() - self.started:.0f} s)")

        def on_epoch_begin(self, epoch: int, logs=None) -> None:
            self.epoch, self.batch, self.started = epoch, 0, time.monotonic()

        def on_train_batch_end(self, batch: int, logs=None) -> None:
            self.batch = batch + 1

        def on_epoch_end(self, epoch: int, logs=None) -> None:
            say(epoch_line(epoch + 1, epochs, dict(logs or {}),
                           time.monotonic() - self.started), out)

    return EpochLines()
