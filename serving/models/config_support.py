"""What onnxserve does with each field of Triton's ModelConfig.

protos/model_config.proto holds Triton's whole ModelConfig, so every config.pbtxt that
Triton parses parses here. Each field set in a config is then one of:

- acted on (the default: name, platform, backend, version_policy, max_batch_size, input,
  output with reshape, instance_group kind/count/gpus, default_model_filename, dynamic
  batching and its queue policy, optimization's graph level and execution accelerators,
  parameters, model_warmup, a non-decoupled model_transaction_policy); the modules that act
  on a section check its values;
- ignored with a note in the load log, when ignoring it cannot change an answer (``IGNORED``);
- refused with a message naming the field, when serving without it would answer wrongly or
  run something onnxserve does not run (``REFUSED``).

Protobuf's ``ListFields`` lists only fields that are set (in proto3: differ from their
default), so ``decoupled: false`` or ``allow_ragged_batch: false`` pass, ``true`` is refused.
"""

from __future__ import annotations

from google.protobuf.message import Message

from onnxserve.protos import model_config_pb2
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.errors import ModelLoadError

#: field path (names joined by ".", list and map entries transparent) -> why it is refused
REFUSED: dict[str, str] = {
    "batch_input": "Triton's ragged-batch inputs are not supported",
    "batch_output": "Triton's ragged-batch outputs are not supported",
    "sequence_batching": "stateful (sequence) models are not supported; use dynamic_batching",
    "ensemble_scheduling": "ensembles are not supported; serve each model and chain them in "
                           "the client",
    "model_operations": "custom operator libraries are not loaded (they would run native code)",
    "model_transaction_policy.decoupled": "decoupled models (any number of responses per "
                                         "request) are not supported",
    "model_repository_agents": "repository agents are not run; check the files before they "
                               "are copied into the repository",
    "cc_model_filenames": "per-compute-capability model files are not supported; use "
                          "default_model_filename",
    "input.is_shape_tensor": "shape tensors are a TensorRT-backend feature",
    "output.is_shape_tensor": "shape tensors are a TensorRT-backend feature",
    "input.allow_ragged_batch": "ragged batching is not supported",
    "input.is_non_linear_format_io": "non-linear I/O formats are a TensorRT-backend feature",
    "output.is_non_linear_format_io": "non-linear I/O formats are a TensorRT-backend feature",
    "instance_group.passive": "passive instances (loaded but sent no requests) are not "
                              "supported",
    "instance_group.secondary_devices": "secondary devices (NVDLA) are not supported",
}

#: field path -> why ignoring it is harmless (logged when a model sets it)
IGNORED: dict[str, str] = {
    "runtime": "it names a backend library; onnxserve runs the model with onnxruntime itself",
    "metric_tags": "onnxserve's metrics are labelled by model and version",
    "model_metrics": "onnxserve's metrics have fixed histogram buckets",
    "response_cache": "onnxserve keeps no response cache; every request is computed",
    "instance_group.name": "instances are named by model, device and index",
    "instance_group.profile": "TensorRT profiles are chosen with the tensorrt accelerator's "
                              "trt_profile_* parameters",
    "instance_group.host_policy": "host policies (NUMA binding) are not applied",
    "instance_group.rate_limiter": "instances are not rate-limited; the queue policy bounds "
                                   "the load",
    "dynamic_batching.preserve_ordering": "each request gets its own response, whatever the "
                                          "order batches finish in",
    "optimization.priority": "every model runs at the same priority",
    "optimization.input_pinned_memory": "GPU instances always assemble batches in pinned "
                                        "memory",
    "optimization.output_pinned_memory": "outputs are copied back by onnxruntime",
    "optimization.gather_kernel_buffer_threshold": "batches are assembled on the host",
    "optimization.eager_batching": "a batch starts when an instance is free",
    "optimization.cuda.busy_wait_events": "onnxruntime synchronises CUDA itself",
    "optimization.cuda.graph_spec": "CUDA graphs are not captured (optimization.cuda.graphs "
                                    "is refused)",
    "optimization.cuda.output_copy_stream": "onnxruntime copies outputs on its own stream",
}

#: config data types that no numpy dtype holds (the protocol's BF16)
_UNSUPPORTED_TYPES = {model_config_pb2.TYPE_BF16}


def _check_types(config: ModelConfig) -> None:
    where = f"model {config.name!r}"
    tensors = [("input", t.name, t.data_type) for t in config.input]
    tensors += [("output", t.name, t.data_type) for t in config.output]
    for warmup in config.model_warmup:
        tensors += [(f"model_warmup {warmup.name!r} input", name, spec.data_type)
                    for name, spec in warmup.inputs.items()]
    for kind, name, data_type in tensors:
        if data_type in _UNSUPPORTED_TYPES:
            type_name = model_config_pb2.DataType.Name(data_type)
            raise ModelLoadError(
                f"{where}: {kind} {name!r} has data_type {type_name}, which onnxserve does not "
                "support (numpy has no bfloat16); export the model with FP16 or FP32 tensors")


def _walk(message: Message, path: str, notes: list[str], where: str) -> None:
    for field, value in message.ListFields():
        name = f"{path}.{field.name}" if path else field.name
        if name in REFUSED:
            raise ModelLoadError(f"{where}: {name} is set, but {REFUSED[name]}")
        if name in IGNORED:
            if name not in notes:
                notes.append(name)
            continue
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            _walk(item, name, notes, where)


def check_config_support(config: ModelConfig) -> list[str]:
    """Refuse a config that sets a field onnxserve cannot honour; name the ignored ones.

    Returns:
        One note per ignored field that the config sets: "<field>: <why it is harmless>".

    Raises:
        ModelLoadError: naming the first refused field and why, or a BF16 tensor.
    """
    where = f"model {config.name!r}"
    notes: list[str] = []
    _walk(config, "", notes, where)
    _check_types(config)
    return [f"{name} is ignored: {IGNORED[name]}" for name in notes]
