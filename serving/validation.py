"""Check a request's tensors against the model's config before any data is decoded."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from onnxserve.protos.datatypes import by_config_type

from .errors import InvalidInputError
from .repository import ModelConfig


def expected_shape(dims: Sequence[int], max_batch_size: int) -> list[int]:
    """The shape a client must send: config dims, with a leading -1 when the model batches."""
    return ([-1] if max_batch_size > 0 else []) + list(dims)


def _shape_matches(shape: Sequence[int], expected: Sequence[int]) -> bool:
    return len(shape) == len(expected) and all(
        e == -1 or s == e for s, e in zip(shape, expected, strict=True)
    )


def check_inputs(config: ModelConfig, declared: Sequence[tuple[str, str, Sequence[int]]]) -> int:
    """Validate (name, datatype, shape) of each request input; return the batch size.

    The batch size is 0 for models without batching. Errors name the input, what the
    model expects and what the request sent.
    """
    specs = {t.name: t for t in config.input}
    seen: set[str] = set()
    batch_sizes: set[int] = set()
    for name, datatype, shape in declared:
        spec = specs.get(name)
        if spec is None:
            raise InvalidInputError(
                f"model {config.name!r} has no input {name!r}; its inputs are "
                f"{', '.join(specs)}"
            )
        if name in seen:
            raise InvalidInputError(f"input {name!r} appears more than once")
        seen.add(name)
        want_type = by_config_type(spec.data_type).name
        if datatype != want_type:
            raise InvalidInputError(
                f"input {name!r}: expected datatype {want_type}, got {datatype!r}"
            )
        want_shape = expected_shape(spec.dims, config.max_batch_size)
        if any(d < 0 for d in shape) or not _shape_matches(shape, want_shape):
            raise InvalidInputError(
                f"input {name!r}: expected shape {want_shape}, got {list(shape)}"
            )
        if config.max_batch_size > 0:
            batch = shape[0]
            if not 1 <= batch <= config.max_batch_size:
                raise InvalidInputError(
                    f"input {name!r}: batch size {batch} is outside 1..{config.max_batch_size} "
                    f"(max_batch_size of model {config.name!r})"
                )
            batch_sizes.add(batch)
    missing = [n for n, t in specs.items() if n not in seen and not t.optional]
    if missing:
        raise InvalidInputError(
            f"model {config.name!r} needs input(s) {', '.join(missing)}, which the request lacks"
        )
    if len(batch_sizes) > 1:
        raise InvalidInputError(
            f"inputs disagree on the batch size: {sorted(batch_sizes)}; all must be equal"
        )
    return batch_sizes.pop() if batch_sizes else 0


def check_outputs(config: ModelConfig, names: Iterable[str]) -> list[str]:
    """Validate requested output names; an empty request means every output."""
    known = [t.name for t in config.output]
    names = list(names)
    for name in names:
        if name not in known:
            raise InvalidInputError(
                f"model {config.name!r} has no output {name!r}; its outputs are {', '.join(known)}"
            )
    if len(set(names)) != len(names):
        raise InvalidInputError("an output is requested more than once")
    return names or known
