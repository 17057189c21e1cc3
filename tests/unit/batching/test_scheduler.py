"""The dynamic batcher: batches form, results split back exactly, failures stay contained."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from onnxserve.serving.batching.scheduler import Scheduler
from onnxserve.serving.errors import InferenceFailedError


class FakeRunner:
    """Doubles its input; records the batch sizes it ran; can be held or made to fail."""

    provider = "fake"

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_when = None

    def prepare(self, inputs):
        return inputs

    def host_buffer(self, shape, dtype):
        return np.empty(shape, dtype)

    def run(self, inputs, output_names=None):
        self.gate.wait(10)
        x = inputs["x"]
        if self.fail_when is not None and self.fail_when(x):
            raise InferenceFailedError("boom")
        self.batches.append(len(x))
        return {"y": x * 2, "n": np.full((len(x), 1), len(x))}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _behind_a_held_batch(scheduler, instance, first_x, requests):
    """Run ``first_x`` while holding the instance, queue ``requests`` (coroutine factories)
    behind it, then let everything go; returns the first result and the others'."""
    instance.gate.clear()
    first = asyncio.ensure_future(scheduler.infer({"x": first_x}, ["y"], len(first_x)))
    await asyncio.sleep(0.05)
    others = [asyncio.ensure_future(make()) for make in requests]
    await asyncio.sleep(0.05)
    instance.gate.set()
    return await first, await asyncio.gather(*others)


async def _with_scheduler(instance, body, **kwargs):
    scheduler = Scheduler([instance], name="t", **kwargs)
    scheduler.start()
    try:
        return await body(scheduler)
    finally:
        await scheduler.close()


def test_queued_requests_batch_together_and_split_exactly() -> None:
    instance = FakeRunner()

    async def body(scheduler):
        _, others = await _behind_a_held_batch(scheduler, instance, np.zeros((1, 2)), [
            lambda i=i: scheduler.infer({"x": np.full((i, 2), float(i))}, ["y", "n"], i)
            for i in (1, 2, 3)])
        return others

    results = run(_with_scheduler(instance, body, max_batch_size=8))
    assert instance.batches == [1, 6]
    for i, result in zip((1, 2, 3), results, strict=True):
        np.testing.assert_array_equal(result["y"], np.full((i, 2), 2.0 * i))
        assert result["n"].ravel().tolist() == [6] * i


def test_batches_respect_max_batch_size_and_shapes() -> None:
    instance = FakeRunner()

    async def body(scheduler):
        instance.gate.clear()
        first = asyncio.ensure_future(scheduler.infer({"x": np.zeros((1, 2))}, ["y"], 1))
        await asyncio.sleep(0.05)
        reqs = [scheduler.infer({"x": np.zeros((3, 2))}, ["y"], 3) for _ in range(2)]
        reqs.append(scheduler.infer({"x": np.zeros((1, 5))}, ["y"], 1))  # other shape
        futures = [asyncio.ensure_future(r) for r in reqs]
        await asyncio.sleep(0.05)
        instance.gate.set()
        await first
        return await asyncio.gather(*futures)

    results = run(_with_scheduler(instance, body, max_batch_size=4))
    assert instance.batches == [1, 3, 3, 1]
    assert results[2]["y"].shape == (1, 5)


def test_max_queue_delay_waits_for_more() -> None:
    instance = FakeRunner()

    async def body(scheduler):
        a = asyncio.ensure_future(scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1))
        await asyncio.sleep(0.02)
        b = asyncio.ensure_future(scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1))
        return await asyncio.gather(a, b)

    run(_with_scheduler(instance, body, max_batch_size=8, max_queue_delay_us=300_000))
    assert instance.batches == [2]


def test_cancelled_requests_are_not_computed() -> None:
    instance = FakeRunner()

    async def body(scheduler):
        instance.gate.clear()
        first = asyncio.ensure_future(scheduler.infer({"x": np.zeros((1, 2))}, ["y"], 1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(scheduler.infer({"x": np.zeros((5, 2))}, ["y"], 5))
        kept = asyncio.ensure_future(scheduler.infer({"x": np.zeros((2, 2))}, ["y"], 2))
        await asyncio.sleep(0.01)
        gone.cancel()
        instance.gate.set()
        await first
        return await kept

    result = run(_with_scheduler(instance, body, max_batch_size=8))
    assert instance.batches == [1, 2]
    assert result["y"].shape == (2, 2)


def test_a_failing_batch_fails_only_its_requests() -> None:
    instance = FakeRunner()
    instance.fail_when = lambda x: bool((x < 0).any())

    async def body(scheduler):
        bad = scheduler.infer({"x": -np.ones((1, 2))}, ["y"], 1)
        with pytest.raises(InferenceFailedError, match="boom"):
            await bad
        return await scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1)

    result = run(_with_scheduler(instance, body, max_batch_size=0))
    np.testing.assert_array_equal(result["y"], [[2.0, 2.0]])


def _queued_then_released(instance, scheduler_kwargs, sizes):
    """Hold the instance, queue requests of ``sizes`` samples behind a first one, release."""

    async def body(scheduler):
        instance.gate.clear()
        first = asyncio.ensure_future(scheduler.infer({"x": np.zeros((1, 2))}, ["y"], 1))
        await asyncio.sleep(0.05)
        futures = [
            asyncio.ensure_future(scheduler.infer({"x": np.full((n, 2), float(i))}, ["y"], n))
            for i, n in enumerate(sizes)
        ]
        await asyncio.sleep(0.05)
        instance.gate.set()
        await first
        return await asyncio.gather(*futures), scheduler.stats

    return run(_with_scheduler(instance, body, **scheduler_kwargs))


def test_preferred_batch_size_caps_batches() -> None:
    instance = FakeRunner()
    results, _ = _queued_then_released(
        instance, {"max_batch_size": 16, "preferred_batch_sizes": [4]}, [1] * 10
    )
    assert instance.batches == [1, 4, 4, 2]
    assert [r["y"][0, 0] for r in results] == [2.0 * i for i in range(10)]


def test_batching_off_runs_each_request_alone() -> None:
    instance = FakeRunner()
    _queued_then_released(instance, {"max_batch_size": 16, "batching": False}, [2, 3, 1])
    assert instance.batches == [1, 2, 3, 1]


def test_statistics_count_samples_executions_and_queue_time() -> None:
    instance = FakeRunner()
    _, stats = _queued_then_released(instance, {"max_batch_size": 16}, [2, 3])
    assert stats.execution_count == 2 and stats.inference_count == 6
    assert stats.success.count == 3 and stats.fail.count == 0
    assert stats.queue.count == 3 and stats.queue.ns > 40_000_000  # held ~50 ms
    assert set(stats.batches) == {1, 5}


def test_buffers_are_reused_between_batches() -> None:
    from onnxserve.serving.batching.assembly import Buffers

    made = []

    def allocate(shape, dtype):
        made.append(shape)
        return np.empty(shape, dtype)

    buffers = Buffers(8, allocate)
    a = buffers.concatenate("x", [np.ones((2, 3)), np.zeros((1, 3))], 3)
    b = buffers.concatenate("x", [np.ones((4, 3))], 4)
    assert a.base is b.base and b.shape == (4, 3)
    assert made == [(8, 3)]  # one buffer, from the instance's allocator
    assert buffers.concatenate("x", [np.ones((9, 3))], 9).shape == (9, 3)  # over capacity
    for width in range(4, 4 + Buffers.KEEP):  # varying sample shapes: only the last kept
        buffers.concatenate("x", [np.ones((1, width))], 1)
    assert len(buffers) == Buffers.KEEP and not buffers.holds("x", np.dtype("<f8"), (3,))
    assert buffers.holds("x", np.dtype("<f8"), (4 + Buffers.KEEP - 1,))


def test_buffers_pad_with_zero_rows() -> None:
    from onnxserve.serving.batching.assembly import Buffers

    buffers = Buffers(8, lambda shape, dtype: np.full(shape, 7, dtype))
    padded = buffers.concatenate("x", [np.ones((2, 3)), np.full((1, 3), 2.0)], 4)
    np.testing.assert_array_equal(padded, [[1] * 3, [1] * 3, [2] * 3, [0] * 3])
    big = buffers.concatenate("x", [np.ones((9, 3))], 12)  # over capacity: a new array
    assert big.shape == (12, 3) and not big[9:].any()
    text = buffers.concatenate("s", [np.array([[b"a"]], dtype=object)], 2)
    assert text.tolist() == [[b"a"], [""]]


def test_batches_are_padded_up_to_the_next_bucket() -> None:
    instance = FakeRunner()

    async def body(scheduler):
        return await _behind_a_held_batch(scheduler, instance, np.ones((1, 2)), [
            lambda i=i, n=n: scheduler.infer({"x": np.full((n, 2), float(i + 1))},
                                             ["y", "n"], n)
            for i, n in enumerate((2, 1, 2))])

    first, results = run(_with_scheduler(instance, body, max_batch_size=16,
                                         batch_buckets=(1, 4, 8, 16)))
    # 1 runs alone (a bucket of its own); 2 + 1 + 2 = 5 samples run as a bucket of 8
    assert instance.batches == [1, 8]
    np.testing.assert_array_equal(first["y"], [[2.0, 2.0]])
    for i, (n, result) in enumerate(zip((2, 1, 2), results, strict=True)):
        np.testing.assert_array_equal(result["y"], np.full((n, 2), 2.0 * (i + 1)))
        assert result["n"].ravel().tolist() == [8] * n


def test_a_single_request_is_padded_too() -> None:
    instance = FakeRunner()

    async def body(scheduler):
        return await scheduler.infer({"x": np.ones((3, 2))}, ["y"], 3)

    result = run(_with_scheduler(instance, body, max_batch_size=8, batch_buckets=(4, 8)))
    assert instance.batches == [4] and result["y"].shape == (3, 2)


def test_top_k_is_asked_of_the_runner_once_per_batch_and_split_per_request() -> None:
    from onnxserve.serving.runtime.topk import best_k

    instance = FakeRunner()
    calls = []

    def run_with_top_k(inputs, output_names, top_k):
        calls.append((len(inputs["x"]), list(output_names), dict(top_k)))
        outputs = instance.run(inputs, output_names)
        return outputs, {name: best_k(outputs[name], k) for name, k in top_k.items()}

    instance.run_with_top_k = run_with_top_k
    rng = np.random.default_rng(3)
    xs = [rng.random((n, 6)) for n in (1, 2, 1)]

    async def body(scheduler):
        _, others = await _behind_a_held_batch(scheduler, instance, np.zeros((1, 6)), [
            lambda: scheduler.infer({"x": xs[0]}, [], 1, top_k={"y": 2}),
            lambda: scheduler.infer({"x": xs[1]}, ["y"], 2),
            lambda: scheduler.infer({"x": xs[2]}, [], 1, top_k={"y": 4})])
        return others

    a, b, c = run(_with_scheduler(instance, body, max_batch_size=8))
    assert calls == [(4, ["y"], {"y": 4})]  # one run, the largest k
    for result, x, k in ((a, xs[0], 2), (c, xs[2], 4)):
        expected = np.argsort(-(x * 2), axis=1)[:, :k]
        np.testing.assert_array_equal(result["y"].indices, expected)
        np.testing.assert_allclose(result["y"].values, np.take_along_axis(x * 2, expected, 1))
    np.testing.assert_array_equal(b["y"], xs[1] * 2)


def test_top_k_needs_a_batch_dimension() -> None:
    async def body(scheduler):
        with pytest.raises(ValueError, match="batch dimension"):
            await scheduler.infer({"x": np.ones((2,))}, [], 0, top_k={"y": 1})

    run(_with_scheduler(FakeRunner(), body, max_batch_size=0))


def test_inline_scheduler_runs_on_the_event_loop_thread() -> None:
    instance = FakeRunner()
    threads = []
    real_run = instance.run

    def run_and_note(inputs, output_names=None):
        threads.append(threading.current_thread())
        return real_run(inputs, output_names)

    instance.run = run_and_note

    async def body(scheduler):
        futures = [asyncio.ensure_future(scheduler.infer({"x": np.full((1, 2), float(i))},
                                                         ["y"], 1)) for i in range(5)]
        return await asyncio.gather(*futures), scheduler.stats

    # Nothing queued when each arrives: each runs at once, without the worker's round trip.
    results, stats = run(_with_scheduler(instance, body, max_batch_size=8, run_on_event_loop=True))
    assert threads and all(t is threading.main_thread() for t in threads)
    assert instance.batches == [1] * 5 and stats.success.count == 5
    assert [r["y"][0, 0] for r in results] == [2.0 * i for i in range(5)]
    # With a queue delay, inline requests wait for each other and batch.
    instance.batches.clear()
    results, _ = run(_with_scheduler(instance, body, max_batch_size=8, run_on_event_loop=True,
                                     max_queue_delay_us=50_000))
    assert instance.batches == [5]
    assert [r["y"][0, 0] for r in results] == [2.0 * i for i in range(5)]


def test_inline_requests_that_know_of_others_batch_on_the_next_turn() -> None:
    """Requests that arrive together, each knowing others are in progress (the native
    transport's OTHERS_IN_PROGRESS), wait one event loop turn and run as one batch, with
    no queue delay; then one alone runs at once again."""
    instance = FakeRunner()

    async def body(scheduler):
        together = [asyncio.ensure_future(scheduler.infer(
            {"x": np.full((1, 2), float(i))}, ["y"], 1, alone=False)) for i in range(5)]
        results = await asyncio.gather(*together)
        batches = list(instance.batches)
        last = await scheduler.infer({"x": np.full((2, 2), 7.0)}, ["y"], 2, alone=False)
        alone = await scheduler.infer({"x": np.full((1, 2), 9.0)}, ["y"], 1)
        return results, batches, last, alone, scheduler.stats

    results, batches, last, alone, stats = run(
        _with_scheduler(instance, body, max_batch_size=8, run_on_event_loop=True))
    assert batches == [5]
    assert [r["y"][0, 0] for r in results] == [2.0 * i for i in range(5)]
    assert instance.batches == [5, 2, 1]
    assert last["y"].tolist() == [[14.0, 14.0]] * 2 and alone["y"].tolist() == [[18.0, 18.0]]
    assert stats.success.count == 7


def test_inline_failures_fail_only_that_request() -> None:
    instance = FakeRunner()
    instance.fail_when = lambda x: bool((x < 0).any())

    async def body(scheduler):
        with pytest.raises(InferenceFailedError, match="boom"):
            await scheduler.infer({"x": -np.ones((1, 2))}, ["y"], 1)
        return await scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1), scheduler.stats

    result, stats = run(_with_scheduler(instance, body, max_batch_size=4, run_on_event_loop=True))
    assert result["y"].tolist() == [[2.0, 2.0]]
    assert (stats.success.count, stats.fail.count) == (1, 1)


def test_inline_scheduler_takes_one_runner() -> None:
    with pytest.raises(ValueError, match="exactly one instance"):
        Scheduler([FakeRunner(), FakeRunner()], max_batch_size=4, run_on_event_loop=True)


def _held(instance, scheduler_kwargs, body_after_hold):
    """Hold the instance on a first request, run ``body_after_hold``, then release."""

    async def body(scheduler):
        instance.gate.clear()
        first = asyncio.ensure_future(scheduler.infer({"x": np.zeros((1, 2))}, ["y"], 1))
        await asyncio.sleep(0.05)
        try:
            return await body_after_hold(scheduler)
        finally:
            instance.gate.set()
            await first

    return run(_with_scheduler(instance, body, **scheduler_kwargs))


def test_a_full_queue_refuses_at_once() -> None:
    from onnxserve.serving.batching.queue import QueuePolicy
    from onnxserve.serving.errors import QueueFullError

    instance = FakeRunner()

    async def body(scheduler):
        queued = [asyncio.ensure_future(scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1))
                  for _ in range(2)]
        await asyncio.sleep(0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(QueueFullError, match="queue is full"):
            await scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1)
        assert asyncio.get_running_loop().time() - started < 0.01
        instance.gate.set()
        return await asyncio.gather(*queued)

    results = _held(instance, {"max_batch_size": 0, "queue_policy": QueuePolicy(max_queue_size=2)},
                    body)
    assert len(results) == 2


@pytest.mark.parametrize("source", ["policy", "override", "caller"])
def test_requests_past_their_deadline_are_dropped_not_computed(source: str) -> None:
    """The caller's deadline fails a queued request DEADLINE_EXCEEDED; the queue policy's
    REJECT timeout fails it UNAVAILABLE "Request timeout expired", as Triton does."""
    from onnxserve.serving.batching.queue import QueuePolicy
    from onnxserve.serving.errors import DeadlineExceededError, QueueTimeoutError

    instance = FakeRunner()
    policy = {"policy": QueuePolicy(timeout_s=0.03),
              "override": QueuePolicy(timeout_s=60, allow_timeout_override=True),
              "caller": QueuePolicy()}[source]
    kwargs = {"override": {"timeout_us": 30_000}, "caller": {"time_remaining": 0.03}}.get(
        source, {})

    async def body(scheduler):
        late = asyncio.ensure_future(
            scheduler.infer({"x": np.full((1, 2), 5.0)}, ["y"], 1, **kwargs))
        await asyncio.sleep(0.1)
        instance.gate.set()
        if source == "caller":
            with pytest.raises(DeadlineExceededError, match="dropped after"):
                await late
        else:
            with pytest.raises(QueueTimeoutError, match="Request timeout expired"):
                await late

    _held(instance, {"max_batch_size": 4, "queue_policy": policy}, body)
    assert instance.batches == [1]  # only the first request ran


def test_delay_moves_an_expired_request_behind_the_others() -> None:
    from onnxserve.serving.batching.queue import QueuePolicy

    instance = FakeRunner()
    order = []
    real_run = instance.run

    def note(inputs, output_names=None):
        order.append(float(inputs["x"][0, 0]))
        return real_run(inputs, output_names)

    instance.run = note

    async def body(scheduler):
        expired = asyncio.ensure_future(scheduler.infer({"x": np.full((1, 2), 1.0)}, ["y"], 1))
        await asyncio.sleep(0.06)
        fresh = asyncio.ensure_future(scheduler.infer({"x": np.full((1, 2), 2.0)}, ["y"], 1))
        await asyncio.sleep(0)
        instance.gate.set()
        return await asyncio.gather(expired, fresh)

    policy = QueuePolicy(timeout_s=0.03, timeout_action="delay")
    results = _held(instance, {"max_batch_size": 4, "batching": False, "queue_policy": policy},
                    body)
    assert order == [0.0, 2.0, 1.0]
    assert [r["y"][0, 0] for r in results] == [2.0, 4.0]


def test_queue_policy_comes_from_the_config() -> None:
    from onnxserve.serving.batching.queue import QueuePolicy
    from onnxserve.serving.errors import ModelLoadError
    from onnxserve.serving.models.loader import queue_policy
    from onnxserve.serving.models.repository import parse_config

    config = parse_config(
        "dynamic_batching { default_queue_policy { max_queue_size: 7 timeout_action: DELAY "
        "default_timeout_microseconds: 2500 allow_timeout_override: true } }", "t")
    assert queue_policy(config) == QueuePolicy(7, 0.0025, "delay", True)
    with pytest.raises(ModelLoadError, match="priority_levels"):
        queue_policy(parse_config("dynamic_batching { priority_levels: 2 }", "t"))


class OneRowRunner(FakeRunner):
    """Returns "s" with one row whatever the batch (an ONNX Compress on axis 0)."""

    def run(self, inputs, output_names=None):
        outputs = {**super().run(inputs, output_names), "s": inputs["x"][:1] + 0}
        return {n: outputs[n] for n in output_names} if output_names else outputs

    def run_with_top_k(self, inputs, output_names, top_k):
        from onnxserve.serving.runtime.topk import best_k

        outputs = self.run(inputs, output_names)
        return outputs, {name: best_k(outputs[name], k) for name, k in top_k.items()}


@pytest.mark.parametrize("inline", [False, True])
def test_outputs_without_a_row_per_sample_fail_the_whole_batch(inline: bool) -> None:
    instance = OneRowRunner()

    async def body(scheduler):
        # Three requests within the queue delay: one batch of 1 + 2 + 3 rows.
        return await asyncio.gather(*(
            scheduler.infer({"x": x}, ["y", "s"], len(x))
            for x in (np.ones((1, 2)), np.full((2, 2), 2.0), np.zeros((3, 2)))),
            return_exceptions=True)

    results = run(_with_scheduler(instance, body, max_batch_size=8, run_on_event_loop=inline,
                                  max_queue_delay_us=100_000))
    assert instance.batches == [6]  # the three requests ran as one batch, and failed together
    for result in results:
        assert isinstance(result, InferenceFailedError)
        assert "failed to split the output tensor 's'" in str(result)
        assert "6 row(s) (3 request(s)) but the model returned 1 row(s)" in str(result)


def test_a_lone_request_with_too_few_output_rows_fails() -> None:
    instance = OneRowRunner()

    async def body(scheduler):
        with pytest.raises(InferenceFailedError, match=r"'s'.*3 row\(s\).*returned 1 row"):
            await scheduler.infer({"x": np.zeros((3, 2))}, ["y", "s"], 3)
        # One row in, one row out: that answer is right.
        return await scheduler.infer({"x": np.ones((1, 2))}, ["s"], 1)

    result = run(_with_scheduler(instance, body, max_batch_size=8))
    np.testing.assert_array_equal(result["s"], [[1.0, 1.0]])


def test_padding_and_top_k_are_checked_too() -> None:
    instance = OneRowRunner()

    async def body(scheduler):
        # One row padded to a bucket of 4: the model's single row is not one per row.
        with pytest.raises(InferenceFailedError, match=r"'s'.*4 row\(s\)"):
            await scheduler.infer({"x": np.ones((1, 2))}, ["s"], 1)
        # Only the top-k of "s" is asked for: its rows are checked as well.
        with pytest.raises(InferenceFailedError, match=r"'s'.*4 row\(s\)"):
            await scheduler.infer({"x": np.ones((2, 2))}, [], 2, top_k={"s": 1})
        return await scheduler.infer({"x": np.ones((3, 2))}, ["y"], 3)

    result = run(_with_scheduler(instance, body, max_batch_size=8, batch_buckets=(4, 8)))
    np.testing.assert_array_equal(result["y"], np.full((3, 2), 2.0))


@pytest.mark.parametrize("inline", [False, True])
def test_an_input_the_model_cannot_compute_fails_only_its_request(inline: bool) -> None:
    from onnxserve.serving.errors import InvalidInputError

    instance = FakeRunner()

    def run_checked(inputs, output_names=None):
        if (inputs["x"] < 0).any():  # as onnxruntime's INVALID_ARGUMENT for one bad sample
            raise InvalidInputError("the model cannot compute this input: index out of range")
        return FakeRunner.run(instance, inputs, output_names)

    instance.run = run_checked

    async def body(scheduler):
        return await asyncio.gather(*(
            scheduler.infer({"x": np.full((n, 2), float(v))}, ["y"], n)
            for n, v in ((1, 1.0), (2, -1.0), (1, 3.0))), return_exceptions=True)

    good, bad, other = run(_with_scheduler(
        instance, body, max_batch_size=8, run_on_event_loop=inline, max_queue_delay_us=100_000))
    assert isinstance(bad, InvalidInputError) and "index out of range" in str(bad)
    np.testing.assert_array_equal(good["y"], [[2.0, 2.0]])
    np.testing.assert_array_equal(other["y"], [[6.0, 6.0]])


# --- callers that leave, deadlines and queue timeouts while a batch forms -----------------

#: a batch delay no test waits out: a request left in a forming batch would hang the test
LONG_DELAY_US = 60_000_000


def test_a_caller_that_leaves_a_forming_batch_is_not_computed_and_frees_its_place() -> None:
    instance = FakeRunner()

    async def body(scheduler):
        gone = asyncio.ensure_future(scheduler.infer({"x": np.full((1, 2), 9.0)}, ["y"], 1))
        await asyncio.sleep(0.05)  # the batch forms around it, waiting for a second request
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert scheduler.queued == 0
        # Two more fill the batch (max 2) at once: the cancelled request holds no place.
        results = await asyncio.wait_for(asyncio.gather(
            scheduler.infer({"x": np.full((1, 2), 1.0)}, ["y"], 1),
            scheduler.infer({"x": np.full((1, 2), 2.0)}, ["y"], 1)), 10)
        return results, scheduler.stats

    (first, second), stats = run(_with_scheduler(
        instance, body, max_batch_size=2, max_queue_delay_us=LONG_DELAY_US))
    assert instance.batches == [2]
    assert first["y"].tolist() == [[2.0, 2.0]] and second["y"].tolist() == [[4.0, 4.0]]
    assert (stats.inference_count, stats.success.count, stats.fail.count) == (2, 2, 1)


@pytest.mark.parametrize("source", ["caller", "reject"])
def test_a_deadline_passing_in_a_forming_batch_fails_the_request_then(source: str) -> None:
    """Checked while the batch forms, not only when a request joins it: the request fails
    at its deadline (or REJECT timeout), long before the batch would run, uncomputed."""
    from onnxserve.serving.batching.queue import QueuePolicy
    from onnxserve.serving.errors import DeadlineExceededError, QueueTimeoutError

    instance = FakeRunner()
    policy = QueuePolicy(timeout_s=0.05) if source == "reject" else QueuePolicy()
    kwargs = {"time_remaining": 0.05} if source == "caller" else {}
    expected = DeadlineExceededError if source == "caller" else QueueTimeoutError

    async def body(scheduler):
        kept = asyncio.ensure_future(scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1))
        await asyncio.sleep(0.01)
        late = scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1, **kwargs)
        if source == "reject":  # both have the policy's timeout: the first fails too
            with pytest.raises(expected):
                await asyncio.wait_for(kept, 10)
        with pytest.raises(expected, match="not computed"):
            await asyncio.wait_for(late, 10)
        queued = scheduler.queued
        if source == "caller":
            kept.cancel()
        return queued, scheduler.stats

    queued, stats = run(_with_scheduler(instance, body, max_batch_size=8,
                                        max_queue_delay_us=LONG_DELAY_US, queue_policy=policy))
    assert instance.batches == []
    assert queued == (1 if source == "caller" else 0)
    assert stats.inference_count == 0 and stats.fail.count == 2


def test_delay_runs_a_timed_out_request_after_those_that_came_later() -> None:
    """Triton's DELAY: a timed-out request waits until every request that has not timed out
    ran, including requests queued after it timed out."""
    from onnxserve.serving.batching.queue import QueuePolicy

    class SteppedRunner(FakeRunner):
        """Notes each request's value as its run starts, then waits for a permit."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[float] = []
            self.permits = threading.Semaphore(0)

        def run(self, inputs, output_names=None):
            self.seen.append(float(inputs["x"][0, 0]))
            assert self.permits.acquire(timeout=10)
            return super().run(inputs, output_names)

    instance = SteppedRunner()

    async def until_seen(values):
        while instance.seen != values:
            await asyncio.sleep(0.005)

    def infer(scheduler, value):
        return asyncio.ensure_future(scheduler.infer({"x": np.full((1, 2), value)}, ["y"], 1))

    async def body(scheduler):
        requests = [infer(scheduler, 0.0)]
        await until_seen([0.0])
        requests.append(infer(scheduler, 1.0))  # times out (30 ms) while 0.0 runs
        await asyncio.sleep(0.1)
        requests.append(infer(scheduler, 2.0))
        instance.permits.release()
        await until_seen([0.0, 2.0])
        requests.append(infer(scheduler, 3.0))  # queued after 1.0 timed out: goes first
        instance.permits.release(3)
        return await asyncio.gather(*requests)

    policy = QueuePolicy(timeout_s=0.03, timeout_action="delay")
    results = run(_with_scheduler(instance, body, max_batch_size=4, batching=False,
                                  queue_policy=policy))
    assert instance.seen == [0.0, 2.0, 3.0, 1.0]
    assert [r["y"][0, 0] for r in results] == [0.0, 2.0, 4.0, 6.0]


def test_a_request_whose_deadline_passed_is_refused_even_when_it_could_run_at_once() -> None:
    from onnxserve.serving.errors import DeadlineExceededError

    instance = FakeRunner()

    async def body(scheduler):
        with pytest.raises(DeadlineExceededError, match="not computed"):
            await scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1, time_remaining=0.0)
        return scheduler.stats

    stats = run(_with_scheduler(instance, body, max_batch_size=4, run_on_event_loop=True))
    assert instance.batches == [] and stats.fail.count == 1


def test_one_batch_forms_at_a_time_across_instances() -> None:
    """Two instances do not split the queue into two half batches that each wait for
    more: one batch forms at a time (Triton's one batcher thread feeds every instance)."""
    instances = [FakeRunner(), FakeRunner()]

    async def body(scheduler):
        return await asyncio.wait_for(asyncio.gather(*(
            scheduler.infer({"x": np.full((1, 2), float(i))}, ["y"], 1) for i in range(4))), 10)

    async def with_two():
        scheduler = Scheduler(instances, name="t", max_batch_size=4,
                              max_queue_delay_us=LONG_DELAY_US)
        scheduler.start()
        try:
            return await body(scheduler)
        finally:
            await scheduler.close()

    results = run(with_two())
    assert sorted(instances[0].batches + instances[1].batches) == [4]
    assert [r["y"][0, 0] for r in results] == [0.0, 2.0, 4.0, 6.0]


def test_every_deadline_is_kept_whatever_the_order_and_delay_keeps_the_callers() -> None:
    """Deadlines that come in any order each fail their request at its time; a request the
    queue policy DELAYs still fails at its caller's deadline; none is computed."""
    from onnxserve.serving.batching.queue import QueuePolicy
    from onnxserve.serving.errors import DeadlineExceededError

    instance = FakeRunner()

    async def body(scheduler):
        loop = asyncio.get_running_loop()
        started = loop.time()
        failed_at: dict[float, float] = {}

        async def timed(remaining: float) -> None:
            with pytest.raises(DeadlineExceededError, match="not computed"):
                await scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1,
                                      time_remaining=remaining)
            failed_at[remaining] = loop.time() - started

        # later deadlines first, then earlier ones (the next deadline moves forward)
        await asyncio.wait_for(asyncio.gather(*(timed(r) for r in (0.4, 0.3, 0.2, 0.1))), 10)
        return failed_at

    policy = QueuePolicy(timeout_s=0.05, timeout_action="delay")
    failed_at = run(_with_scheduler(instance, body, max_batch_size=8, queue_policy=policy,
                                    max_queue_delay_us=LONG_DELAY_US))
    assert instance.batches == []
    for remaining, at in failed_at.items():
        assert at >= remaining  # never before the caller's deadline
    assert sorted(failed_at, key=failed_at.__getitem__) == [0.1, 0.2, 0.3, 0.4]


def test_a_caller_cancelled_as_its_batch_becomes_due_is_not_computed() -> None:
    """The worker may form a batch after a caller was cancelled and before that caller's
    task ran to take its request out: the request is left out all the same."""
    instance = FakeRunner()

    async def body(scheduler):
        first = asyncio.ensure_future(scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1))
        await asyncio.sleep(0.02)  # queued, waiting for a second request
        second = asyncio.ensure_future(scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1))
        await asyncio.sleep(0)  # second queued: the worker is woken, the batch is full
        first.cancel()  # before the worker's turn, whose step comes first
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    result = run(_with_scheduler(instance, body, max_batch_size=2, max_queue_delay_us=200_000))
    assert instance.batches == [1]
    np.testing.assert_array_equal(result["y"], np.full((1, 2), 2.0))


def test_a_close_during_a_failed_batchs_rerun_answers_every_request() -> None:
    """A batch that failed on one request's input is rerun request by request; a close
    (an unload whose drain timed out) that cancels the worker then still answers them."""
    from onnxserve.serving.errors import InvalidInputError, UnavailableError

    instance = FakeRunner()
    rerun = threading.Event()

    def fail_batches(x):
        if len(x) > 1:
            raise InvalidInputError("row 0 is out of range")
        rerun.set()
        instance.gate.clear()  # the rerun waits here until the close has begun
        return False

    instance.fail_when = fail_batches

    async def body(scheduler):
        requests = [asyncio.ensure_future(scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1))
                    for _ in range(2)]
        while not rerun.is_set():
            await asyncio.sleep(0.01)
        # close() waits for the worker thread; the rerun's gate opens a moment later
        threading.Timer(0.2, instance.gate.set).start()
        await scheduler.close()
        return await asyncio.gather(*requests, return_exceptions=True)

    async def scenario():
        scheduler = Scheduler([instance], name="t", max_batch_size=2,
                              max_queue_delay_us=100_000)
        scheduler.start()
        return await body(scheduler)

    outcomes = run(scenario())
    assert len(outcomes) == 2
    assert all(isinstance(o, UnavailableError) for o in outcomes), outcomes


def test_a_close_waits_for_a_running_batch_without_blocking_the_event_loop() -> None:
    """An unload whose drain timed out closes a scheduler while its batch still runs in a
    thread: the close waits for that thread, the event loop (every other model) does not."""
    import time

    instance = FakeRunner()

    async def scenario():
        scheduler = Scheduler([instance], name="t", max_batch_size=2)
        scheduler.start()
        instance.gate.clear()
        running = asyncio.ensure_future(scheduler.infer({"x": np.ones((1, 2))}, ["y"], 1))
        await asyncio.sleep(0.05)
        while scheduler.queued:  # until the batch left the queue for its thread
            await asyncio.sleep(0.01)
        opens = threading.Timer(2.0, instance.gate.set)
        opens.start()
        closing = asyncio.ensure_future(scheduler.close())
        started = time.monotonic()
        await asyncio.sleep(0.05)
        took = time.monotonic() - started
        assert not closing.done()
        await closing
        await asyncio.gather(running, return_exceptions=True)
        return took

    assert run(scenario()) < 1.0  # not the 2 s the batch was held


def test_a_requests_own_timeout_may_shorten_the_policys_never_lengthen_it() -> None:
    """Triton's allow_timeout_override: "individual requests can set a timeout that is less
    than the default timeout value but may not increase the timeout"."""
    from onnxserve.serving.batching.queue import QueuePolicy
    from onnxserve.serving.errors import QueueTimeoutError

    instance = FakeRunner()
    policy = QueuePolicy(timeout_s=0.03, allow_timeout_override=True)

    async def body(scheduler):
        longer = asyncio.ensure_future(scheduler.infer(
            {"x": np.full((1, 2), 5.0)}, ["y"], 1, timeout_us=60_000_000))
        await asyncio.sleep(0.1)  # past the policy's 30 ms, far from the asked 60 s
        instance.gate.set()
        with pytest.raises(QueueTimeoutError, match="Request timeout expired"):
            await longer

    _held(instance, {"max_batch_size": 4, "queue_policy": policy}, body)
    assert instance.batches == [1]  # only the held first request ran
