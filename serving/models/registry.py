"""The models the server holds: loading, atomic reloading, unloading, and repository polling.

Model control follows Triton's modes:

- ``none``: every model in the repository is loaded at start; the repository is not
  watched and the load/unload RPCs are refused;
- ``poll``: as ``none``, then the repository is rescanned every ``poll_seconds``: new
  models load, changed ones reload, removed ones unload;
- ``explicit``: only the models named at start (``*`` for all) load; the
  RepositoryModelLoad / RepositoryModelUnload RPCs load, reload and unload.

A reload builds and warms the new model completely before it replaces the old one in one
step: requests already admitted finish on the old model, which is then drained and closed;
new requests go to the new one. A reload that fails leaves the old model serving and puts
the reason in the repository index. A model that fails to load never affects the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from onnxserve.protos.naming import valid_model_name
from onnxserve.serving.errors import (
    FailedPreconditionError,
    InvalidInputError,
    ModelLoadError,
    NotFoundError,
    UnavailableError,
)
from onnxserve.serving.models.listing import RepositoryListing, check_model_name
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.model import Model, ModelVersion
from onnxserve.serving.models.repository import fingerprint
from onnxserve.serving.observability.logs import event
from onnxserve.serving.observability.metrics import Metrics
from onnxserve.serving.settings import ServerSettings

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"


@dataclass
class ModelEntry:
    name: str
    state: str
    reason: str = ""
    model: Model | None = None
    #: the repository contents this entry was loaded from (see repository.fingerprint)
    fingerprint: tuple = ()
    #: whether the server is meant to serve it (false once unloaded)
    wanted: bool = True


class Registry:
    """Loads models from a repository and answers which model serves a request."""

    def __init__(
        self,
        repository: Path,
        settings: ServerSettings,
        on_change: Callable[[], Awaitable[None]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._repository = repository
        self._settings = settings
        self._entries: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._on_change = on_change
        self._metrics = metrics
        self._retired: set[asyncio.Task] = set()
        #: the repository's models: names, folders, the ones loaded at start
        self.listing = RepositoryListing(repository, settings)
        #: the start-up loads ended (until then the server is not ready, strict or not)
        self.started = False

    @property
    def control_mode(self) -> str:
        return self._settings.model_control_mode

    async def load_initial(self, names: list[str] | None = None) -> None:
        """Load ``names`` (default: ``initial_models()``); a model that fails is UNAVAILABLE."""
        if names is None:
            names = self.listing.initial_models()
        try:
            for name in names:
                try:
                    await self.load(name)
                except (NotFoundError, InvalidInputError) as exc:
                    log.error("model %s: %s", name, exc)
        finally:
            self.started = True

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    async def load(self, name: str) -> ModelEntry:
        """Load ``name``, or reload it when it is loaded; returns its entry afterwards."""
        self.listing.check_folder(name)
        async with self._lock(name):
            old = self._entries.get(name)
            serving = old.model if old is not None else None
            if serving is None:
                self._entries[name] = ModelEntry(name, LOADING)
                await self._changed()
            seen = fingerprint(self.listing.folder(name))
            try:
                model = await asyncio.to_thread(
                    load_model, self._repository, name, self._settings, self._metrics
                )
            except Exception as exc:  # a model must never take the server down
                reason = str(exc) if isinstance(exc, ModelLoadError) else (
                    f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, ModelLoadError):
                    log.error("model %s failed to load", name, exc_info=exc)
                event(log, logging.ERROR, "model_load_failed", model=name,
                      still_serving=serving is not None, reason=reason)
                if serving is not None:
                    entry = ModelEntry(name, READY, f"reload failed, still serving the "
                                       f"previous load: {reason}", serving, seen)
                else:
                    entry = ModelEntry(name, UNAVAILABLE, reason, fingerprint=seen)
            else:
                model.start()
                entry = ModelEntry(name, READY, model=model, fingerprint=seen)
                if serving is not None:
                    event(log, logging.INFO, "model_reloaded", model=name,
                          draining="the previous load")
                    self._retire(serving)
            self._entries[name] = entry
            await self._changed()
            return entry

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests are refused, admitted ones finish."""
        check_model_name(name)
        async with self._lock(name):
            entry = self._entries.get(name)
            if entry is None or not entry.wanted:
                raise NotFoundError(f"model {name!r} is not loaded")
            self._entries[name] = ModelEntry(name, UNLOADING, wanted=False)
            await self._changed()
            if entry.model is not None:
                await self._drain(entry.model)
            self._entries[name] = ModelEntry(name, UNAVAILABLE, "unloaded", wanted=False)
            event(log, logging.INFO, "model_unloaded", model=name)
            await self._changed()

    def _retire(self, model: Model) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(model))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _drain(self, model: Model) -> None:
        if not await model.drain(self._settings.drain_seconds):
            log.warning("model %s: requests still running after %.0fs were failed",
                        model.name, self._settings.drain_seconds)
        await model.close()

    async def poll(self) -> None:
        """Bring the loaded models in line with the repository (poll mode's rescan)."""
        try:
            present = set(self.listing.names())
        except ModelLoadError as exc:
            log.error("cannot poll the model repository: %s", exc)
            return
        for name in sorted(present):
            entry = self._entries.get(name)
            if entry is None or not entry.wanted or (
                    fingerprint(self.listing.folder(name)) != entry.fingerprint):
                await self.load(name)
        for name in sorted(set(self._entries) - present):
            if self._entries[name].wanted:
                await self.unload(name)

    async def watch(self, stop: asyncio.Event) -> None:
        """Poll the repository every ``repository_poll_secs`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self._settings.repository_poll_secs)
            except TimeoutError:
                await self.poll()

    def check_control(self) -> None:
        """Refuse model control RPCs unless the server runs in explicit mode."""
        if self.control_mode != "explicit":
            raise FailedPreconditionError(
                f"model control is off (model control mode {self.control_mode!r}); start the "
                "server with --model-control-mode explicit to load and unload models"
            )

    def get(self, name: str, version: str = "") -> tuple[Model, ModelVersion]:
        """The ready model and version a request names; NotFound / Unavailable otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            if valid_model_name(name) and self.listing.folder(name).is_dir():
                raise UnavailableError(
                    f"model {name!r} is not loaded (model control mode {self.control_mode})")
            known = ", ".join(sorted(self._entries)) or "none"
            raise NotFoundError(f"unknown model {name[:130]!r}; models loaded or tried: {known}")
        if entry.model is None:
            detail = f": {entry.reason}" if entry.reason else ""
            raise UnavailableError(f"model {name!r} is {entry.state}{detail}")
        return entry.model, entry.model.version(version)

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model the server has held or tried (safe as a metric label)."""
        return name in self._entries

    def entries(self) -> list[ModelEntry]:
        return [self._entries[n] for n in sorted(self._entries)]

    def index(self) -> list[ModelEntry]:
        """Every model in the repository or held, with its state ("" if never loaded)."""
        try:
            names = set(self.listing.names())
        except ModelLoadError:
            names = set()
        names |= set(self._entries)
        return [self._entries.get(n) or ModelEntry(n, "", wanted=False) for n in sorted(names)]

    @property
    def all_ready(self) -> bool:
        """Whether the models make the server ready (see ``readiness``)."""
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, str]:
        """Whether the models make the server ready, and the reason in words.

        Strict readiness (``--strict-readiness``, Triton's, on by default): ready when every
        model the server is meant to serve is loaded, and at least one is. A server holding
        no model answers every request NOT_FOUND; reporting it ready would make an
        orchestrator route traffic to it and retire a healthy replica. The one exception
        is explicit mode started without --load-model: it was asked to start empty and
        wait for RepositoryModelLoad. Without strict readiness the models never make the
        server unready once the start-up loads ended (Triton: ready while the server is
        responsive, even if some or all models are unavailable; its endpoints open after
        those loads); the reason still names the models not loaded.
        """
        ready, why = self._strict_readiness()
        if ready:
            return ready, why
        if not self.started:
            return False, f"{why}; the start-up loads have not ended"
        if self._settings.strict_readiness:
            return False, (f"{why}; every model must load for the server to be ready "
                           "(--strict-readiness false: ready while it answers)")
        return True, (f"{why}; ready all the same, as --strict-readiness false asks (requests "
                      "for the models not loaded fail)")

    def strictly_ready(self) -> bool:
        """Whether every model the server is meant to serve is loaded (the readiness of
        ``--strict-readiness true``, whatever the setting)."""
        return self._strict_readiness()[0]

    def _strict_readiness(self) -> tuple[bool, str]:
        wanted = [e for e in self._entries.values() if e.wanted]
        mode = f"model control mode {self.control_mode}"
        if not wanted:
            if self.control_mode == "explicit" and not self._settings.load_models:
                return True, (f"no model loaded, as asked ({mode} without --load-model): "
                              "load models with RepositoryModelLoad")
            return False, (f"no model to serve in {self._repository} ({mode}): "
                           "put a model folder there, then restart or load it")
        loaded = [e for e in wanted if e.state == READY]
        if len(loaded) == len(wanted):
            return True, f"{len(loaded)} of {len(wanted)} models loaded ({mode})"
        pending = [e for e in wanted if e.state != READY]
        shown = ", ".join(f"{e.name} {e.state}" + (f" ({e.reason[:200]})" if e.reason else "")
                          for e in pending[:5])
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        return False, (f"{len(loaded)} of {len(wanted)} models loaded ({mode}); not loaded: "
                       f"{shown}{more}")

    async def close(self) -> None:
        for task in list(self._retired):
            await task
        for entry in self._entries.values():
            if entry.model is not None:
                await entry.model.close()
