"""Check a request's tensors against the model's config before any data is decoded."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from onnxserve.protos.datatypes import by_config_type
from onnxserve.serving.errors import InvalidInputError
from onnxserve.serving.models.repository import ModelConfig


def expected_shape(dims: Sequence[int], max_batch_size: int) -> list[int]:
    """The shape a client must send: config dims, with a leading -1 when the model batches."""
    return ([-1] if max_batch_size > 0 else []) + list(dims)


#: declarations whose check passed, kept per model (requests declare the same few shapes
#: over and over); cleared when full, so odd shapes cost a check, never memory
CHECKED_LIMIT = 256


def _shape_matches(shape: Sequence[int], expected: Sequence[int]) -> bool:
    return len(shape) == len(expected) and all(
        e == -1 or s == e for s, e in zip(shape, expected, strict=True)
    )


class InputRules:
    """What a model's config allows, prepared once per model for the request path."""

    def __init__(self, config: ModelConfig, substitutes: dict[str, str] | None = None) -> None:
        """``substitutes`` maps extra BYTES [batch, 1] inputs to the input each stands for."""
        self.model = config.name
        self.max_batch_size = config.max_batch_size
        #: input name -> (datatype name, expected shape, optional)
        self.inputs = {
            t.name: (by_config_type(t.data_type).name,
                     expected_shape(t.dims, config.max_batch_size), t.optional)
            for t in config.input
        }
        self.required = [n for n, (_, _, optional) in self.inputs.items() if not optional]
        self.substitutes = dict(substitutes or {})
        for name in self.substitutes:
            self.inputs[name] = ("BYTES", expected_shape([1], config.max_batch_size), True)
        self.outputs = [t.name for t in config.output]
        #: declarations that passed -> their batch size
        self._passed: dict[tuple, int] = {}

    def check(self, declared: Sequence[tuple[str, str, Sequence[int]]]) -> int:
        """Validate (name, datatype, shape) of each request input; return the batch size.

        The batch size is 0 for models without batching. Errors name the input, what the
        model expects and what the request sent (InvalidInputError).
        """
        key = tuple((name, datatype, tuple(shape)) for name, datatype, shape in declared)
        batch_size = self._passed.get(key)
        if batch_size is None:
            batch_size = self._check(declared)
            if len(self._passed) >= CHECKED_LIMIT:
                self._passed.clear()
            self._passed[key] = batch_size
        return batch_size

    def _check(self, declared: Sequence[tuple[str, str, Sequence[int]]]) -> int:
        seen: set[str] = set()
        batch_sizes: set[int] = set()
        for name, datatype, shape in declared:
            rule = self.inputs.get(name)
            if rule is None:
                raise InvalidInputError(
                    f"model {self.model!r} has no input {name!r}; its inputs are "
                    f"{', '.join(self.inputs)}"
                )
            if name in seen:
                raise InvalidInputError(f"input {name!r} appears more than once")
            seen.add(name)
            want_type, want_shape, _ = rule
            if datatype != want_type:
                raise InvalidInputError(
                    f"input {name!r}: expected datatype {want_type}, got {datatype!r}"
                )
            if any(d < 0 for d in shape) or not _shape_matches(shape, want_shape):
                raise InvalidInputError(
                    f"input {name!r}: expected shape {want_shape}, got {list(shape)}"
                )
            first = 1 if self.max_batch_size > 0 else 0  # the batch size is checked below
            empty = [i for i, (s, e) in enumerate(zip(shape, want_shape, strict=True))
                     if i >= first and e == -1 and s == 0]
            if empty:
                raise InvalidInputError(
                    f"input {name!r}: shape {list(shape)} has an empty variable dimension "
                    f"(index {empty[0]}); variable dimensions must be at least 1"
                )
            if self.max_batch_size > 0:
                batch = shape[0]
                if not 1 <= batch <= self.max_batch_size:
                    raise InvalidInputError(
                        f"input {name!r}: batch size {batch} is outside 1..{self.max_batch_size}"
                        f" (max_batch_size of model {self.model!r})"
                    )
                batch_sizes.add(batch)
        for name, target in self.substitutes.items():
            if name in seen and target in seen:
                raise InvalidInputError(
                    f"inputs {name!r} and {target!r} are alternatives; send one of them"
                )
            if name in seen:
                seen.add(target)
        missing = [n for n in self.required if n not in seen]
        if missing:
            raise InvalidInputError(
                f"model {self.model!r} needs input(s) {', '.join(missing)}, which the request "
                "lacks"
            )
        if len(batch_sizes) > 1:
            raise InvalidInputError(
                f"inputs disagree on the batch size: {sorted(batch_sizes)}; all must be equal"
            )
        return batch_sizes.pop() if batch_sizes else 0


    def check_outputs(self, names: Iterable[str]) -> list[str]:
        """Validate requested output names; an empty request means every output."""
        names = list(names)
        for name in names:
            if name not in self.outputs:
                raise InvalidInputError(
                    f"model {self.model!r} has no output {name!r}; its outputs are "
                    f"{', '.join(self.outputs)}"
                )
        if len(set(names)) != len(names):
            raise InvalidInputError("an output is requested more than once")
        return names or list(self.outputs)
