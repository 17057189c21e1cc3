"""Which models a repository holds, as the registry sees them: their names, each one's
folder, the names requests may use, and the models a control mode loads at start.

A repository folder whose name cannot be a model name (onnxserve.protos.naming) is skipped
and logged once each time the set of skipped folders changes, not at every poll. A
repository in KServe's single-file layout holds one model, named by ``--model-name``
(models/repository.py reads both layouts).
"""

from __future__ import annotations

import logging
from pathlib import Path

from onnxserve.protos.naming import MODEL_NAME_RULE, model_name_problem
from onnxserve.serving.errors import InvalidInputError, ModelLoadError, NotFoundError
from onnxserve.serving.models.repository import (
    describe_skipped,
    list_models,
    model_folder,
    scan_folders,
)
from onnxserve.serving.settings import ServerSettings

log = logging.getLogger(__name__)


def check_model_name(name: str) -> None:
    """Refuse ``name`` when it cannot be a model name, before it comes near a path.

    Raises:
        InvalidInputError: naming what is wrong with it and the rule.
    """
    problem = model_name_problem(name)
    if problem is not None:
        raise InvalidInputError(
            f"invalid model name {name[:130]!r}: it {problem}; a model name is "
            f"{MODEL_NAME_RULE}")


class RepositoryListing:
    """The models of the repository at ``repository`` (``settings.model_name`` names the
    one model of a single-file repository)."""

    def __init__(self, repository: Path, settings: ServerSettings) -> None:
        self.repository = repository
        self._settings = settings
        #: the repository's folders skipped for their names, as last logged
        self._skipped: dict[str, str] = {}

    def names(self) -> list[str]:
        """The repository's models, sorted; logs the folders it skips for their names
        whenever that set changes.

        Raises:
            ModelLoadError: the repository cannot be listed.
        """
        try:
            skipped = scan_folders(self.repository)[1]
        except (ModelLoadError, OSError):
            skipped = {}
        if skipped and skipped != self._skipped:
            log.warning("model repository %s: skipped folder(s) whose names cannot be model "
                        "names: %s", self.repository, describe_skipped(skipped))
        self._skipped = skipped
        return list_models(self.repository, self._settings.model_name)

    def folder(self, name: str) -> Path:
        """Model ``name``'s folder (it may not exist)."""
        return model_folder(self.repository, name, self._settings.model_name)

    def check_folder(self, name: str) -> None:
        """Refuse a name that is no model name or has no folder.

        Raises:
            InvalidInputError: ``name`` cannot be a model name.
            NotFoundError: the repository has no folder of that name.
        """
        check_model_name(name)
        if not self.folder(name).is_dir():
            raise NotFoundError(f"model {name!r} has no folder in the model repository")

    def initial_models(self) -> list[str]:
        """The models the control mode loads at start, checked before anything loads.

        Raises:
            NotFoundError: a ``--load-model`` name has no folder in the repository (a typo
                would otherwise leave a server that starts, serves nothing and says why only
                in its log).
        """
        names = self.names()
        if self._settings.model_control_mode == "explicit":
            requested = self._settings.load_models
            if "*" in requested:
                return names
            missing = [n for n in dict.fromkeys(requested) if n not in names]
            if missing:
                raise NotFoundError(
                    f"--load-model {', '.join(repr(n) for n in missing)}: no such model in "
                    f"the model repository {self.repository}; it holds "
                    f"{', '.join(names) or 'no model folders'}" + self._skipped_note())
            return list(dict.fromkeys(requested))
        if not names:
            log.warning("model repository %s holds no model folders (nor a single .onnx "
                        "file)%s: the server stays not ready", self.repository,
                        self._skipped_note())
        return names

    def _skipped_note(self) -> str:
        if not self._skipped:
            return ""
        return f" (skipped for their names: {', '.join(map(repr, self._skipped))})"
