"""The set of models the server holds, with each one's state and failure reason."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError, NotFoundError, UnavailableError
from .model import Model, ModelVersion, load_model
from .repository import list_models
from .settings import ServerSettings

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"


@dataclass
class ModelEntry:
    name: str
    state: str
    reason: str = ""
    model: Model | None = None


class Registry:
    """Loads models from a repository and answers which model serves a request."""

    def __init__(self, repository: Path, settings: ServerSettings) -> None:
        self._repository = repository
        self._settings = settings
        self._entries: dict[str, ModelEntry] = {}

    async def load_all(self) -> None:
        """Load every model in the repository; a model that fails is marked UNAVAILABLE."""
        names = list_models(self._repository)
        if not names:
            log.warning("model repository %s holds no model folders", self._repository)
        for name in names:
            await self.load(name)

    async def load(self, name: str) -> ModelEntry:
        entry = ModelEntry(name, LOADING)
        self._entries.setdefault(name, entry)
        try:
            model = await asyncio.to_thread(load_model, self._repository, name, self._settings)
        except ModelLoadError as exc:
            entry = ModelEntry(name, UNAVAILABLE, str(exc))
            log.error("model %s failed to load: %s", name, exc)
        except Exception as exc:  # a model must never take the server down
            entry = ModelEntry(name, UNAVAILABLE, f"{type(exc).__name__}: {exc}")
            log.exception("model %s failed to load", name)
        else:
            model.start()
            entry = ModelEntry(name, READY, model=model)
        self._entries[name] = entry
        return entry

    def get(self, name: str, version: str = "") -> tuple[Model, ModelVersion]:
        """The ready model and version a request names; NotFound / Unavailable otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise NotFoundError(f"unknown model {name!r}; models in the repository: {known}")
        if entry.model is None:
            detail = f": {entry.reason}" if entry.reason else ""
            raise UnavailableError(f"model {name!r} is {entry.state}{detail}")
        return entry.model, entry.model.version(version)

    def entries(self) -> list[ModelEntry]:
        return [self._entries[n] for n in sorted(self._entries)]

    @property
    def all_ready(self) -> bool:
        """True when every model in the repository loaded (strict readiness)."""
        return all(e.state == READY for e in self._entries.values())

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.model is not None:
                await entry.model.close()
