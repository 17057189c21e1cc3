"""Dispatch: run a formed batch on one instance and answer each of its requests.

A batch runs in the instance's thread (or on the event loop's own thread for a scheduler
made with ``run_on_event_loop=True``). Each request is answered with its own rows of the
outputs, or with its failure: a ServingError as raised; anything else (a bug, or the
runtime's own error) logged with its traceback and answered as InferenceFailedError naming
the model. A batch that fails on one request's input (InvalidInputError) is rerun request
by request, so only the culprits fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from onnxserve.serving.batching.assembly import BatchPlan, Buffers, run_batch
from onnxserve.serving.batching.queue import QueuedRequest
from onnxserve.serving.errors import (
    InferenceFailedError,
    InvalidInputError,
    ServingError,
    UnavailableError,
)
from onnxserve.serving.observability.statistics import ModelStats
from onnxserve.serving.types import Instance, OutputValue

log = logging.getLogger(__name__)

#: what one request of a batch is answered with: its outputs, or its failure
Outcome = dict[str, OutputValue] | Exception
Run = Callable[[Instance, Buffers, list[QueuedRequest]], Sequence[Outcome]]


def fail(batch: Sequence[QueuedRequest], exc: Exception) -> None:
    """Fail every request of ``batch`` not answered yet with ``exc``."""
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)


def settle(batch: Sequence[QueuedRequest], results: Sequence[Outcome]) -> None:
    """Answer each request of ``batch`` not answered yet with its result (outputs or
    failure), by position."""
    for request, result in zip(batch, results, strict=True):
        if request.future.done():
            continue
        if isinstance(result, Exception):
            request.future.set_exception(result)
        else:
            request.future.set_result(result)


class Dispatcher:
    """Runs the batches of one model version on its instances and answers their requests.

    ``threads`` is how many batches may run at once (one per instance); 0 runs each batch
    on the calling (event loop) thread.
    """

    def __init__(self, plan: BatchPlan, stats: ModelStats, name: str, *, threads: int) -> None:
        self._plan = plan
        self._stats = stats
        self._name = name
        self._executor = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"run-{name}")
                          if threads else None)

    def failure(self, exc: Exception) -> ServingError:
        """What a request is failed with when its run raised ``exc``: a ServingError as it
        is; anything else logged with its traceback and answered as InferenceFailedError
        naming the model."""
        if isinstance(exc, ServingError):
            return exc
        log.error("batch of model %s failed", self._name, exc_info=exc)
        return InferenceFailedError(f"model {self._name} failed: {exc}")

    def unloaded(self) -> UnavailableError:
        """What a request still waiting when its model is unloaded is failed with."""
        return UnavailableError(f"model {self._name} was unloaded")

    def run_now(self, instance: Instance, buffers: Buffers,
                request: QueuedRequest) -> dict[str, OutputValue]:
        """Run one request alone on this thread and return its outputs.

        Raises:
            ServingError: the run failed (see ``failure``).
        """
        request.started_ns = time.perf_counter_ns()
        try:
            (result,) = self._run(instance, buffers, [request])
        except ServingError:
            raise
        except Exception as exc:
            raise self.failure(exc) from exc
        return result

    async def dispatch(self, instance: Instance, buffers: Buffers,
                       batch: list[QueuedRequest]) -> None:
        """Run ``batch`` and answer each of its requests with its outputs or its failure."""
        started = time.perf_counter_ns()
        for request in batch:
            request.started_ns = started
        results: Sequence[Outcome]
        try:
            results = await self._call(self._run, instance, buffers, batch)
        except InvalidInputError as exc:
            # One request's input the model cannot compute must not fail the others
            # batched with it: run each alone, so only the culprits fail (and not those
            # whose callers left meanwhile).
            if len(batch) == 1:
                settle(batch, [exc])
                return
            batch = [request for request in batch if not request.future.done()]
            if not batch:
                return
            results = await self._call(self._run_each, instance, buffers, batch)
        except Exception as exc:
            fail(batch, self.failure(exc))
            return
        settle(batch, results)

    async def close(self) -> None:
        """Wait, off the event loop, for the runs still in their threads to end."""
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _call(self, run: Run, instance: Instance, buffers: Buffers,
                    batch: list[QueuedRequest]) -> Sequence[Outcome]:
        if self._executor is None:
            return run(instance, buffers, batch)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, run, instance, buffers, batch)

    def _run(self, instance: Instance, buffers: Buffers,
             batch: list[QueuedRequest]) -> list[dict[str, OutputValue]]:
        return run_batch(self._plan, instance, buffers, batch, self._stats, f"model {self._name}")

    def _run_each(self, instance: Instance, buffers: Buffers,
                  batch: list[QueuedRequest]) -> list[Outcome]:
        """Run each request of a failed batch alone: its outputs, or its own failure."""
        results: list[Outcome] = []
        for request in batch:
            try:
                results.extend(self._run(instance, buffers, [request]))
            except Exception as exc:
                results.append(self.failure(exc))
        return results
