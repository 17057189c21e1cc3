"""Loading a model, in named steps: read its folder, choose its versions, plan where and how
its instances run, then for each version build its instances, complete its config from the
ONNX file, warm it up and give it a scheduler; finally its labels.

``load_model`` blocks (onnxruntime builds sessions, warm-up runs batches): the registry
calls it in a thread. Whatever a failed load built is released before the error goes up:
the exception's traceback would otherwise keep the sessions, threads and weights alive for
as long as anyone holds it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from onnxserve.serving.batching.queue import QueuePolicy
from onnxserve.serving.batching.scheduler import Scheduler
from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.config_support import check_config_support
from onnxserve.serving.models.external_data import check_external_data
from onnxserve.serving.models.model import Model, ModelVersion
from onnxserve.serving.models.options import model_options
from onnxserve.serving.models.repository import (
    ModelConfig,
    ModelSource,
    complete_config,
    read_labels,
    read_model,
    select_versions,
)
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
from onnxserve.serving.runtime.accelerators import resolve_buckets
from onnxserve.serving.runtime.devices import place_instances
from onnxserve.serving.runtime.instance import SessionInstance
from onnxserve.serving.runtime.plan import (
    ExecutionPlan,
    plan_execution,
    should_run_on_event_loop,
)
from onnxserve.serving.runtime.providers import usable_gpus
from onnxserve.serving.settings import ServerSettings
from onnxserve.serving.types import ModelOptions

log = logging.getLogger(__name__)


def load_model(
    repository: Path, name: str, settings: ServerSettings, metrics: Metrics | None = None
) -> Model:
    """Load and warm up every version the policy selects (blocking: call it from a thread).

    Raises:
        ModelLoadError: naming the model and what is wrong (its folder, config, a version's
            file, the placement of its instances, its warm-up, its labels).
        NotFoundError: the repository has no such model.
    """
    started = time.perf_counter()
    source = _read(repository, name, settings)
    chosen = _choose_versions(source, name)
    options = model_options(source.config)
    plan = _plan(source.config, options, settings)
    config: ModelConfig | None = None
    versions: dict[int, ModelVersion] = {}
    try:
        for number in chosen:
            version, config, plan = _load_version(source, name, number, plan, config,
                                                  settings, metrics)
            versions[number] = version
        assert config is not None
        model = Model(name, config, read_labels(source.path, config), versions, plan, options)
    except BaseException:
        for built in versions.values():
            built.discard()
        raise
    event(log, logging.INFO, "model_loaded", model=name,
          versions=",".join(str(v) for v in chosen), provider=model.provider,
          seconds=round(time.perf_counter() - started, 3), execution=plan.describe())
    return model


def _read(repository: Path, name: str, settings: ServerSettings) -> ModelSource:
    """The model's folder read (config, versions), with a note per config field ignored."""
    source = read_model(repository, name, settings.model_name)
    for note in check_config_support(source.config):
        log.info("model %s: %s", name, note)
    return source


def _choose_versions(source: ModelSource, name: str) -> list[int]:
    """The versions the config's version_policy selects among those found."""
    chosen = select_versions(source.config, list(source.versions))
    if not chosen:
        raise ModelLoadError(
            f"model {name!r} has no version to load: found "
            f"{sorted(source.versions) or 'no <version>/model.onnx folders'}"
        )
    return chosen


def _plan(config: ModelConfig, options: ModelOptions, settings: ServerSettings) -> ExecutionPlan:
    """Where the instances run (instance_group against the usable GPUs) and with how many
    threads each."""
    gpus, why_not = usable_gpus() if settings.providers != "cpu" else (0, "")
    devices = place_instances(config, gpus_usable=gpus, mode=settings.providers,
                              why_not=why_not)
    return plan_execution(config, options, server_intra_op_threads=settings.intra_op_threads,
                          server_spinning=settings.spinning, cores=settings.cores or None,
                          devices=devices)


def _load_version(source: ModelSource, name: str, number: int, plan: ExecutionPlan,
                  config: ModelConfig | None, settings: ServerSettings,
                  metrics: Metrics | None) -> tuple[ModelVersion, ModelConfig, ExecutionPlan]:
    """One version: its instances, its completed config (the same inputs as the versions
    before it, ``config``), its warm-up and its scheduler; the plan comes back with the
    run-on-event-loop choice made (on the first version)."""
    path = source.versions[number]
    check_external_data(path, source.path)
    instances = _build_instances(path, name, plan, settings)
    try:
        version_config = complete_config(source, instances[0].signature)
        if config is not None and version_config.input != config.input:
            raise ModelLoadError(
                f"model {name!r}: version {number} has different inputs than the other versions"
            )
        on_gpu = any(r.provider != "CPUExecutionProvider" for r in instances)
        buckets = resolve_buckets(plan.gpu.buckets, version_config.max_batch_size, on_gpu)
        timings = _warm_up(source, version_config, instances, name, number, buckets, on_gpu,
                           settings)
        if plan.run_on_event_loop is None:
            # Decided once per model, on its first version. Moving onto the event loop keeps
            # the sessions as they are (one instance, same threads): nothing to rebuild.
            smallest, largest = smallest_and_largest(timings)
            on_loop = should_run_on_event_loop(plan, smallest, largest, instances[0].provider)
            plan = replace(plan, run_on_event_loop=on_loop)
        scheduler = _scheduler(version_config, instances, name, number, plan, buckets, settings,
                               metrics)
    except BaseException:
        for instance in instances:
            instance.close()
        raise
    return ModelVersion(number, instances, scheduler, timings), version_config, plan


def _warm_up(source: ModelSource, config: ModelConfig, instances: list[SessionInstance], name: str,
             number: int, buckets: tuple[int, ...], on_gpu: bool,
             settings: ServerSettings) -> list[WarmupResult]:
    """The config's model_warmup samples, else (unless --no-warmup) the default ones; each
    sample's timings logged."""
    samples = (samples_from_config(config, source.path) if config.model_warmup
               else default_samples(config, warmup_sizes(config, buckets, on_gpu))
               if settings.warmup else [])
    timings = warm_up(instances, samples, f"model {name!r} version {number}")
    for result in timings:
        log.info("warm-up of %s version %d: %s, first run %.2f ms, then %.3f ms",
                 name, number, result.name, result.first_s * 1e3, result.typical_s * 1e3)
    return timings


def _scheduler(config: ModelConfig, instances: list[SessionInstance], name: str, number: int,
               plan: ExecutionPlan, buckets: tuple[int, ...], settings: ServerSettings,
               metrics: Metrics | None) -> Scheduler:
    """The version's dynamic batcher, as its config's dynamic_batching says."""
    batching = config.dynamic_batching
    return Scheduler(
        instances,
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


def _build_instances(path: Path, name: str, plan: ExecutionPlan,
                   settings: ServerSettings) -> list[SessionInstance]:
    """One instance per planned device; when one fails, those already built are closed."""
    instances: list[SessionInstance] = []
    try:
        for device in plan.devices:
            instances.append(SessionInstance(
                path, model_name=name, providers=settings.providers,
                settings=plan.session_for(device), device=device, gpu=plan.gpu))
    except BaseException:
        for instance in instances:
            instance.close()
        raise
    return instances


def warmup_sizes(config: ModelConfig, buckets: tuple[int, ...],
                  on_gpu: bool) -> list[int] | None:
    """Batch sizes the default warm-up runs: every shape the GPU can be given (cuDNN picks
    its algorithms per shape); None for the CPU's default (the edges)."""
    if buckets:
        return list(buckets)
    if on_gpu and config.max_batch_size > 0:
        return list(range(1, config.max_batch_size + 1))
    return None
