"""A loaded model: its completed config, labels, and one runner + scheduler per version."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError, NotFoundError
from .repository import (
    ModelConfig,
    complete_config,
    read_labels,
    read_model,
    select_versions,
)
from .runner import Runner
from .scheduler import Scheduler
from .settings import ServerSettings
from .validation import InputRules

log = logging.getLogger(__name__)


@dataclass
class ModelVersion:
    version: int
    runners: list[Runner]
    scheduler: Scheduler

    @property
    def provider(self) -> str:
        return self.runners[0].provider


@dataclass
class Model:
    name: str
    config: ModelConfig
    labels: dict[str, list[str]]
    versions: dict[int, ModelVersion]
    rules: InputRules = field(init=False)

    def __post_init__(self) -> None:
        self.rules = InputRules(self.config)

    def version(self, requested: str) -> ModelVersion:
        """The version a request names, or the newest loaded one when it names none."""
        if not requested:
            return self.versions[max(self.versions)]
        if not requested.isdigit() or int(requested) not in self.versions:
            raise NotFoundError(
                f"model {self.name!r} has no version {requested!r}; loaded versions are "
                f"{', '.join(str(v) for v in sorted(self.versions))}"
            )
        return self.versions[int(requested)]

    @property
    def provider(self) -> str:
        return self.versions[max(self.versions)].provider

    def parameters(self) -> dict[str, str]:
        """Details shown in model metadata: the config's parameters and the provider in use."""
        params = {k: v.string_value for k, v in self.config.parameters.items()}
        params["execution_provider"] = self.provider
        return params

    def start(self) -> None:
        for version in self.versions.values():
            version.scheduler.start()

    async def close(self) -> None:
        for version in self.versions.values():
            await version.scheduler.close()


def _instance_count(config: ModelConfig) -> int:
    count = sum(max(group.count, 1) for group in config.instance_group)
    return max(count, 1)


def load_model(repository: Path, name: str, settings: ServerSettings) -> Model:
    """Load every version the policy selects (blocking: call it from a thread)."""
    started = time.perf_counter()
    source = read_model(repository, name)
    chosen = select_versions(source.config, list(source.versions))
    if not chosen:
        raise ModelLoadError(
            f"model {name!r} has no version to load: found "
            f"{sorted(source.versions) or 'no <version>/model.onnx folders'}"
        )
    config: ModelConfig | None = None
    versions: dict[int, ModelVersion] = {}
    instances = _instance_count(source.config)
    # Instances share the cores: each gets its share of threads. By default no pool spins
    # waiting for work: a spinning pool steals the cores that the event loop (decoding,
    # encoding, batching) and the other instances need (see --allow-spinning).
    threads = settings.intra_op_threads or max(1, (os.cpu_count() or 1) // instances)
    for number in chosen:
        runners = [
            Runner(
                source.versions[number],
                model_name=name,
                providers=settings.providers,
                intra_op_threads=threads,
                allow_spinning=settings.allow_spinning,
            )
            for _ in range(instances)
        ]
        version_config = complete_config(source, runners[0].signature)
        if config is not None and version_config.input != config.input:
            raise ModelLoadError(
                f"model {name!r}: version {number} has different inputs than the other versions"
            )
        config = version_config
        batching = config.dynamic_batching
        scheduler = Scheduler(
            runners,
            max_batch_size=config.max_batch_size,
            batching=config.HasField("dynamic_batching"),
            max_queue_delay_us=batching.max_queue_delay_microseconds,
            preferred_batch_sizes=list(batching.preferred_batch_size),
            name=f"{name}:{number}",
        )
        versions[number] = ModelVersion(number, runners, scheduler)
    assert config is not None
    labels = read_labels(source.path, config)
    model = Model(name, config, labels, versions)
    log.info(
        "loaded model %s versions %s on %s in %.2fs",
        name,
        ",".join(str(v) for v in chosen),
        model.provider,
        time.perf_counter() - started,
    )
    return model
