"""The control-plane handlers beside the data plane (as MLServer keeps its
``ModelRepositoryHandlers`` apart from its ``DataPlane``): the model repository extension
(index, load, unload) and the logging and trace extensions. Both front ends call them
through ``DataPlane.repository``, ``DataPlane.logging`` and ``DataPlane.trace``; Triton's
system shared memory
extension is ``DataPlane.shared_memory`` (serving/shared_memory.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping, Sequence
from typing import TypeVar

from onnxserve.serving.contract import IndexEntry
from onnxserve.serving.errors import InvalidInputError, ModelLoadError, ServingError
from onnxserve.serving.models.registry import READY, ModelEntry, Registry
from onnxserve.serving.observability import logs
from onnxserve.serving.observability.logs import LogSettingValue, event
from onnxserve.serving.observability.tracing import Tracing

log = logging.getLogger(__name__)
T = TypeVar("T")


class RepositoryHandlers:
    """Triton's model repository extension over a registry: the index, and loads and
    unloads (explicit model control only)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        #: repository changes (load, unload) running, kept to their end
        self._changes: set[asyncio.Future] = set()

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        rows: list[IndexEntry] = []
        for entry in self.registry.index():
            if ready_only and entry.state != READY:
                continue
            versions = sorted(entry.model.versions) if entry.model else [None]
            rows.extend(IndexEntry(entry.name, "" if v is None else str(v), entry.state,
                                   entry.reason) for v in versions)
        return rows

    async def load(self, name: str, parameters: Sequence[str] = ()) -> ModelEntry:
        """Load or reload ``name`` (explicit mode only).

        Raises:
            FailedPreconditionError: model control is off.
            InvalidInputError: load parameters were given, or the load failed (its reason).
        """
        self.registry.check_control()
        if parameters:
            raise InvalidInputError(
                f"load parameters are not supported (got {', '.join(parameters)}); change the "
                "model's files in the repository instead")
        entry = await self._to_the_end(self.registry.load(name))
        if entry.reason:  # failed, or a failed reload that left the old model serving
            raise ModelLoadError(f"model {name!r}: {entry.reason}")
        return entry

    async def unload(self, name: str) -> None:
        self.registry.check_control()
        await self._to_the_end(self.registry.unload(name))

    async def _to_the_end(self, change: Awaitable[T]) -> T:
        """Await a repository change that runs to its end even if the caller leaves (a
        cancelled gRPC call, a closed HTTP connection): cancelled halfway, a load would
        leave its model LOADING for good (the registry logs how a load ended)."""
        task = asyncio.ensure_future(change)
        self._changes.add(task)
        task.add_done_callback(self._change_done)
        return await asyncio.shield(task)

    def _change_done(self, task: asyncio.Future) -> None:
        self._changes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that left is not there to see it


class LogHandlers:
    """Triton's logging extension (this process's log settings)."""

    @staticmethod
    def settings(
        updates: Mapping[str, object] | None = None
    ) -> dict[str, LogSettingValue]:
        """The logging extension: this process's log settings under Triton's keys
        (log_file, log_info, log_warning, log_error, log_verbose_level, log_format), after
        applying ``updates`` (plain bool / int / str values; None or empty: only read).

        A change applies to this process's loggers at once and is logged. With
        ``--workers N`` that is the worker whose connection carried the call (each worker is
        its own process; the others keep theirs). observability/logs.update_log_settings
        says how the keys map onto onnxserve's level threshold and formats.

        Raises:
            InvalidInputError: an unknown key, a wrong value, or contradicting settings.
        """
        if not updates:
            return logs.log_settings()
        before = logs.log_settings()
        after = logs.update_log_settings(updates)
        changed = {key: value for key, value in after.items() if before[key] != value}
        if changed:  # at WARNING: still shown when info logs were just turned off
            event(log, logging.WARNING, "log_settings_changed", **changed)
        return after


class TraceHandlers:
    """Triton's trace extension: the trace settings, global or of one model, read and
    changed at run time (serving/observability/tracing.py)."""

    def __init__(self, tracing: Tracing, registry: Registry) -> None:
        self._tracing = tracing
        self._registry = registry

    def settings(self, model: str = "",
                 updates: Mapping[str, Sequence[str] | None] | None = None
                 ) -> dict[str, list[str]]:
        """The settings in force for ``model`` ("" for the global ones) after applying
        ``updates`` (key -> values; None or an empty list clears the key; None or empty:
        only read), every key as a list of strings, as TraceSetting answers.

        Raises:
            InvalidInputError: ``model`` is not loaded (Triton's wording), or an update
                Triton would refuse.
            UnimplementedError: trace_file or log_frequency, Triton's file mode's.
        """
        if model:
            try:
                self._registry.get(model)  # loaded and ready, as ModelReady asks
            except ServingError:
                raise InvalidInputError(f"Request for unknown model : {model}") from None
        if updates:
            self._tracing.update(model, updates)
            event(log, logging.WARNING, "trace_settings_changed", model=model or "(all)",
                  **{key: ",".join(values or ("(cleared)",)) for key, values in updates.items()})
        return self._tracing.settings(model)
