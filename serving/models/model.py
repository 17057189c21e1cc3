"""A loaded model: its completed config, labels, and one runner + scheduler per version."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from onnxserve.protos.naming import parse_version
from onnxserve.serving.batching.queue import QueuePolicy
from onnxserve.serving.batching.scheduler import Scheduler
from onnxserve.serving.errors import (
    InferenceFailedError,
    InvalidInputError,
    ModelLoadError,
    NotFoundError,
)
from onnxserve.serving.models.accelerators import resolve_buckets
from onnxserve.serving.models.config_support import check_config_support
from onnxserve.serving.models.execution import (
    ExecutionPlan,
    plan_execution,
    should_run_on_event_loop,
)
from onnxserve.serving.models.external_data import check_external_data
from onnxserve.serving.models.images import EncodedImageInput, encoded_image_input
from onnxserve.serving.models.options import ModelOptions, model_options
from onnxserve.serving.models.repository import (
    ModelConfig,
    complete_config,
    read_labels,
    read_model,
    select_versions,
)
from onnxserve.serving.models.validation import InputRules
from onnxserve.serving.models.warmup import (
    WarmupResult,
    default_samples,
    samples_from_config,
    smallest_and_largest,
    warm_up,
)
from onnxserve.serving.observability.logs import event
from onnxserve.serving.observability.metrics import Metrics
from onnxserve.serving.observability.statistics import ModelStats
from onnxserve.serving.runtime.devices import place_instances
from onnxserve.serving.runtime.providers import usable_gpus
from onnxserve.serving.runtime.runner import Runner
from onnxserve.serving.settings import ServerSettings
from onnxserve.serving.types import OutputValue

log = logging.getLogger(__name__)



@dataclass
class ModelVersion:
    version: int
    runners: list[Runner]
    scheduler: Scheduler
    warmup: list[WarmupResult] = field(default_factory=list)

    @property
    def provider(self) -> str:
        return self.runners[0].provider

    async def close(self) -> None:
        """Release the version: its scheduler stops (failing what is still queued, joining
        its threads), then its instances' onnxruntime sessions, threads and buffers go and
        its metrics are handed back. Done explicitly because whatever still refers to a
        retired version (a traceback, a finished task, a caller) would otherwise keep all
        of that until Python's cyclic garbage collector runs."""
        await self.scheduler.close()
        for runner in self.runners:
            runner.close()

    def discard(self) -> None:
        """Release a version whose scheduler never started (a load that failed later on):
        its instances' sessions and its metrics."""
        self.scheduler.stats.close()
        for runner in self.runners:
            runner.close()

    def instances(self) -> str:
        """Each instance's device, provider and I/O path, counted."""
        counts: dict[str, int] = {}
        for runner in self.runners:
            counts[runner.describe()] = counts.get(runner.describe(), 0) + 1
        return ", ".join(f"{n} x {what}" for what, n in counts.items())


@dataclass
class Model:
    name: str
    config: ModelConfig
    labels: dict[str, list[str]]
    versions: dict[int, ModelVersion]
    plan: ExecutionPlan | None = None
    #: the config's parameters, parsed (read from the config when not given)
    options: ModelOptions | None = None
    rules: InputRules = field(init=False)
    #: the BYTES input of encoded images that stands for the image input, if any
    images: EncodedImageInput | None = field(init=False)

    #: inputs the config reshapes: name -> the model's per-sample shape
    input_reshapes: dict[str, tuple[int, ...]] = field(init=False)
    #: outputs the config reshapes: name -> the clients' per-sample shape (dims)
    output_reshapes: dict[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        if self.options is None:
            self.options = model_options(self.config)
        self.images = encoded_image_input(self.config, self.options)
        substitutes = {self.images.name: self.images.target} if self.images else {}
        self.rules = InputRules(self.config, substitutes)
        self.input_reshapes = {t.name: tuple(t.reshape.shape) for t in self.config.input
                               if t.HasField("reshape")}
        self.output_reshapes = {t.name: tuple(t.dims) for t in self.config.output
                                if t.HasField("reshape")}

    def to_model_inputs(self, inputs: dict[str, np.ndarray],
                        batch_size: int) -> dict[str, np.ndarray]:
        """Request inputs (config ``dims``) in the shapes the model takes (``reshape``).

        Raises:
            InvalidInputError: a variable-size input whose elements do not fill the shape.
        """
        if not self.input_reshapes:
            return inputs
        reshaped = dict(inputs)
        for name, shape in self.input_reshapes.items():
            if name in inputs:
                target = (batch_size, *shape) if self.config.max_batch_size > 0 else shape
                try:
                    reshaped[name] = inputs[name].reshape(target)
                except ValueError:
                    raise InvalidInputError(
                        f"input {name!r}: shape {list(inputs[name].shape)} cannot be reshaped "
                        f"to the model's {list(target)} (config reshape)") from None
        return reshaped

    def to_client_outputs(self, outputs: dict[str, OutputValue]) -> dict[str, OutputValue]:
        """Model outputs (``reshape``) in the shapes clients get (config ``dims``); top-k
        results are per class and stay as they are.

        Raises:
            InferenceFailedError: an output whose elements do not fill its dims.
        """
        if not self.output_reshapes:
            return outputs
        reshaped = dict(outputs)
        for name, dims in self.output_reshapes.items():
            value = outputs.get(name)
            if isinstance(value, np.ndarray):
                target = (len(value), *dims) if self.config.max_batch_size > 0 else dims
                try:
                    reshaped[name] = value.reshape(target)
                except ValueError:
                    raise InferenceFailedError(
                        f"output {name!r}: the model returned shape {list(value.shape)}, which "
                        f"cannot be reshaped to dims {list(target)} (config reshape)") from None
        return reshaped

    def version(self, requested: str) -> ModelVersion:
        """The version a request names, or the newest loaded one when it names none.

        Raises:
            NotFoundError: no loaded version is ``requested``, or it is not a version
                number at all (onnxserve.protos.naming.parse_version: ASCII digits only).
        """
        if not requested:
            return self.versions[max(self.versions)]
        number = parse_version(requested)
        if number is None or number not in self.versions:
            raise NotFoundError(
                f"model {self.name!r} has no version {requested[:40]!r}; loaded versions are "
                f"{', '.join(str(v) for v in sorted(self.versions))}"
            )
        return self.versions[number]

    @property
    def provider(self) -> str:
        return self.versions[max(self.versions)].provider

    def parameters(self) -> dict[str, str]:
        """Details shown in model metadata: the config's parameters and the provider in use."""
        params = {k: v.string_value for k, v in self.config.parameters.items()}
        newest = self.versions[max(self.versions)]
        params["execution_provider"] = self.provider
        params["instances"] = newest.instances()
        if newest.scheduler.buckets:
            params["batch_buckets"] = ",".join(str(b) for b in newest.scheduler.buckets)
        if self.plan is not None:
            params["execution"] = self.plan.describe()
        if self.images is not None:
            params["encoded_image_input"] = self.images.describe()
        return params

    def start(self) -> None:
        for version in self.versions.values():
            version.scheduler.start()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait for the admitted ones; True when all finished."""
        results = await asyncio.gather(
            *(v.scheduler.drain(timeout) for v in self.versions.values())
        )
        return all(results)

    async def close(self) -> None:
        """Release every version (see ModelVersion.close); once its drain has ended."""
        for version in self.versions.values():
            await version.close()


def queue_policy(config: ModelConfig, default_max_queue_size: int = 0) -> QueuePolicy:
    """The scheduler's queue policy from dynamic_batching.default_queue_policy."""
    batching = config.dynamic_batching
    if batching.priority_levels or batching.priority_queue_policy or \
            batching.default_priority_level:
        raise ModelLoadError(
            f"model {config.name!r}: dynamic_batching.priority_levels / priority_queue_policy / "
            "default_priority_level "
            "are not supported; remove them (every request shares one queue)"
        )
    source = batching.default_queue_policy
    action = "delay" if source.timeout_action == source.DELAY else "reject"
    return QueuePolicy(
        max_queue_size=source.max_queue_size or default_max_queue_size,
        timeout_s=source.default_timeout_microseconds / 1e6,
        timeout_action=action,
        allow_timeout_override=source.allow_timeout_override,
    )


def _build_runners(path: Path, name: str, plan: ExecutionPlan,
                   settings: ServerSettings) -> list[Runner]:
    """One runner per planned device; when one fails, those already built are closed."""
    runners: list[Runner] = []
    try:
        for device in plan.devices:
            runners.append(Runner(path, model_name=name, providers=settings.providers,
                                  settings=plan.session_for(device), device=device,
                                  gpu=plan.gpu))
    except BaseException:
        for runner in runners:
            runner.close()
        raise
    return runners


def _warmup_sizes(config: ModelConfig, buckets: tuple[int, ...],
                  on_gpu: bool) -> list[int] | None:
    """Batch sizes the default warm-up runs: every shape the GPU can be given (cuDNN picks
    its algorithms per shape); None for the CPU's default (the edges)."""
    if buckets:
        return list(buckets)
    if on_gpu and config.max_batch_size > 0:
        return list(range(1, config.max_batch_size + 1))
    return None


def load_model(
    repository: Path, name: str, settings: ServerSettings, metrics: Metrics | None = None
) -> Model:
    """Load and warm up every version the policy selects (blocking: call it from a thread)."""
    started = time.perf_counter()
    source = read_model(repository, name, settings.model_name)
    for note in check_config_support(source.config):
        log.info("model %s: %s", name, note)
    chosen = select_versions(source.config, list(source.versions))
    if not chosen:
        raise ModelLoadError(
            f"model {name!r} has no version to load: found "
            f"{sorted(source.versions) or 'no <version>/model.onnx folders'}"
        )
    gpus, why_not = usable_gpus() if settings.providers != "cpu" else (0, "")
    devices = place_instances(source.config, gpus_usable=gpus, mode=settings.providers,
                              why_not=why_not)
    options = model_options(source.config)
    plan = plan_execution(source.config, options,
                          server_intra_op_threads=settings.intra_op_threads,
                          server_spinning=settings.spinning, cores=settings.cores or None,
                          devices=devices)
    config: ModelConfig | None = None
    versions: dict[int, ModelVersion] = {}
    #: the instances of the version being loaded, until its ModelVersion holds them
    building: list[Runner] = []
    try:
        for number in chosen:
            path = source.versions[number]
            check_external_data(path, source.path)
            runners = _build_runners(path, name, plan, settings)
            building = runners
            version_config = complete_config(source, runners[0].signature)
            if config is not None and version_config.input != config.input:
                raise ModelLoadError(
                    f"model {name!r}: version {number} has different inputs than the other versions"
                )
            config = version_config
            on_gpu = any(r.provider != "CPUExecutionProvider" for r in runners)
            buckets = resolve_buckets(plan.gpu.buckets, config.max_batch_size, on_gpu)
            samples = (samples_from_config(config, source.path) if config.model_warmup
                       else default_samples(config, _warmup_sizes(config, buckets, on_gpu))
                       if settings.warmup else [])
            where = f"model {name!r} version {number}"
            timings = warm_up(runners, samples, where)
            if plan.run_on_event_loop is None:
                # Decided once per model, on its first version. Moving onto the event loop keeps
                # the sessions as they are (one instance, same threads): nothing to rebuild.
                smallest, largest = smallest_and_largest(timings)
                on_loop = should_run_on_event_loop(plan, smallest, largest, runners[0].provider)
                plan = replace(plan, run_on_event_loop=on_loop)
            for result in timings:
                log.info("warm-up of %s version %d: %s, first run %.2f ms, then %.3f ms",
                         name, number, result.name, result.first_s * 1e3, result.typical_s * 1e3)
            batching = config.dynamic_batching
            scheduler = Scheduler(
                runners,
                max_batch_size=config.max_batch_size,
                batching=config.HasField("dynamic_batching"),
                max_queue_delay_us=batching.max_queue_delay_microseconds,
                preferred_batch_sizes=list(batching.preferred_batch_size),
                name=f"{name}:{number}",
                run_on_event_loop=bool(plan.run_on_event_loop),
                queue_policy=queue_policy(config, settings.max_queue_size),
                batch_buckets=buckets,
                stats=ModelStats(metrics.for_version(name, number) if metrics else None),
            )
            versions[number] = ModelVersion(number, runners, scheduler, timings)
            building = []
        assert config is not None
        labels = read_labels(source.path, config)
        model = Model(name, config, labels, versions, plan, options)
    except BaseException:
        # Release what was built now: the exception's traceback holds these frames
        # (and the sessions, threads and weights) for as long as it is kept.
        for runner in building:
            runner.close()
        for built in versions.values():
            built.discard()
        raise
    event(log, logging.INFO, "model_loaded", model=name,
          versions=",".join(str(v) for v in chosen), provider=model.provider,
          seconds=round(time.perf_counter() - started, 3), execution=plan.describe())
    return model
