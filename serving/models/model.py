"""A loaded model: its completed config, labels, and one instance + scheduler per version
(models/loader.py builds it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from onnxserve.protos.naming import parse_version
from onnxserve.serving.batching.scheduler import Scheduler
from onnxserve.serving.errors import InferenceFailedError, InvalidInputError, NotFoundError
from onnxserve.serving.models.images import EncodedImageInput, encoded_image_input
from onnxserve.serving.models.options import model_options
from onnxserve.serving.models.repository import ModelConfig
from onnxserve.serving.models.validation import InputRules
from onnxserve.serving.models.warmup import WarmupResult
from onnxserve.serving.runtime.instance import SessionInstance
from onnxserve.serving.runtime.plan import ExecutionPlan
from onnxserve.serving.types import ModelOptions, OutputValue


@dataclass
class ModelVersion:
    version: int
    instances: list[SessionInstance]
    scheduler: Scheduler
    warmup: list[WarmupResult] = field(default_factory=list)

    @property
    def provider(self) -> str:
        return self.instances[0].provider

    async def close(self) -> None:
        """Release the version: its scheduler stops (failing what is still queued, joining
        its threads), then its instances' onnxruntime sessions, threads and buffers go and
        its metrics are handed back. Done explicitly because whatever still refers to a
        retired version (a traceback, a finished task, a caller) would otherwise keep all
        of that until Python's cyclic garbage collector runs."""
        await self.scheduler.close()
        for instance in self.instances:
            instance.close()

    def discard(self) -> None:
        """Release a version whose scheduler never started (a load that failed later on):
        its instances' sessions and its metrics."""
        self.scheduler.stats.close()
        for instance in self.instances:
            instance.close()

    def describe_instances(self) -> str:
        """Each instance's device, provider and I/O path, counted."""
        counts: dict[str, int] = {}
        for instance in self.instances:
            counts[instance.describe()] = counts.get(instance.describe(), 0) + 1
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
        params["instances"] = newest.describe_instances()
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
