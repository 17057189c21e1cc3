"""Read a Triton-style model repository: folders, config.pbtxt, labels and version folders.

    <repository>/<model>/config.pbtxt          ModelConfig in protobuf text format
    <repository>/<model>/<label file>          optional, one class name per line
    <repository>/<model>/<version>/model.onnx  integer version folders

Model names and version folder names follow onnxserve.protos.naming (the rule the exporter
and requests share): a folder of the repository whose name cannot be a model name is skipped
(``scan_folders`` says which and why), and a folder inside a model folder that is not a
version (``²``, ``01``, ``notes``) is ignored with a logged note, as Triton ignores it.

A repository with no model folders and one ``.onnx`` file at its root is KServe's
single-file layout (what its storage initializer puts in /mnt/models for a storageUri that
names a file): one model, version 1, named by ``--model-name`` or after the folder, with an
optional config.pbtxt and label file beside the file.

``complete_config`` fills in what the ONNX file implies when the config is partial
and rejects a config that contradicts the file, naming the field.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from onnxserve.protos import model_config_pb2
from onnxserve.protos.datatypes import by_config_type, by_name
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.protos.naming import (
    MAX_MODEL_NAME,
    MODEL_NAME_RULE,
    VERSION_FOLDER_RULE,
    model_name_problem,
    valid_model_name,
    version_folder,
)
from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.types import Signature, TensorSpec

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
#: max_batch_size given to a model that has no config.pbtxt but can batch.
AUTO_MAX_BATCH_SIZE = 32

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """What the repository holds for one model, before anything is loaded."""

    name: str
    path: Path
    config: ModelConfig
    has_config_file: bool
    #: version number -> model file
    versions: dict[int, Path] = field(default_factory=dict)


def fingerprint(model_dir: Path) -> tuple:
    """A model folder's files as (relative path, size, mtime, device, inode): equal means
    unchanged.

    Symlinked folders and files are followed, as loading follows them (Triton serves
    linked model and version folders): a retargeted link, a changed file behind a link or
    a new linked version changes the fingerprint. The inode tells apart two files of the
    same size and time. A folder linked into itself is walked once.
    """
    entries = []
    seen: set[tuple[int, int]] = set()
    try:
        for folder, dirs, files in os.walk(model_dir, followlinks=True):
            here = os.stat(folder)
            if (here.st_dev, here.st_ino) in seen:
                dirs[:] = []
                continue
            seen.add((here.st_dev, here.st_ino))
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                entries.append((str(path.relative_to(model_dir)), *_file_identity(path)))
    except OSError:
        return ()
    return tuple(entries)


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    try:
        stat = path.stat()
    except OSError:  # removed while we looked, or a dangling link
        return -1, -1, -1, -1
    return stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino


def scan_folders(repository: Path) -> tuple[list[str], dict[str, str]]:
    """The repository's model folders, sorted, and the folders it holds that are skipped
    because their names cannot be model names (folder name -> why; the rule is
    onnxserve.protos.naming's).

    Raises:
        ModelLoadError: the repository is not a directory.
    """
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} is not a directory")
    names: list[str] = []
    skipped: dict[str, str] = {}
    for path in repository.iterdir():
        if not path.is_dir():
            continue
        problem = model_name_problem(path.name)
        if problem is None:
            names.append(path.name)
        else:
            skipped[path.name] = problem
    return sorted(names), dict(sorted(skipped.items()))


def describe_skipped(skipped: dict[str, str]) -> str:
    """One line naming each skipped folder and why (see ``scan_folders``)."""
    return "; ".join(f"{name!r} {why}" for name, why in skipped.items()) + (
        f" (a model name is {MODEL_NAME_RULE})")


def _model_folders(repository: Path) -> list[str]:
    return scan_folders(repository)[0]


def single_file_model(repository: Path, name: str | None = None) -> tuple[str, Path] | None:
    """KServe's single-file layout: (model name, model file) when the repository has no model
    folders and exactly one ``.onnx`` file at its root; None otherwise.

    The name is ``name`` (``--model-name``) or the repository folder's own name.

    Raises:
        ModelLoadError: the layout is single-file but the name is not a valid model name.
    """
    try:
        if _model_folders(repository):
            return None
        files = [p for p in repository.iterdir() if p.suffix == ".onnx" and p.is_file()]
    except OSError:
        return None
    if len(files) != 1:
        return None
    model_name = name or repository.resolve().name
    if not valid_model_name(model_name):
        raise ModelLoadError(
            f"the model file {files[0].name} at the root of {repository} needs a model name: "
            f"{model_name[:MAX_MODEL_NAME + 2]!r} {model_name_problem(model_name)} (a model "
            f"name is {MODEL_NAME_RULE}); give one with --model-name")
    return model_name, files[0]


def list_models(repository: Path, single_name: str | None = None) -> list[str]:
    """Names of the models in the repository, sorted: its model folders, or the one model of
    the single-file layout (named ``single_name`` or after the folder)."""
    single = single_file_model(repository, single_name)
    return [single[0]] if single else _model_folders(repository)


def model_folder(repository: Path, name: str, single_name: str | None = None) -> Path:
    """The folder holding model ``name``'s config and labels (the repository itself in the
    single-file layout)."""
    single = single_file_model(repository, single_name)
    return repository if single and single[0] == name else repository / name


def parse_config(text: str, source: str) -> ModelConfig:
    """Parse config.pbtxt text; an unknown or malformed field is an error naming it."""
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    return config


def read_model(repository: Path, name: str, single_name: str | None = None) -> ModelSource:
    """Read one model's config and find its version folders (all of them, unfiltered).

    ``single_name`` is the name given to the model of a single-file repository.
    """
    problem = model_name_problem(name)
    if problem is not None:
        raise ModelLoadError(f"invalid model name {name[:MAX_MODEL_NAME + 2]!r}: it {problem}; "
                             f"a model name is {MODEL_NAME_RULE}")
    single = single_file_model(repository, single_name)
    path = repository if single and single[0] == name else repository / name
    if not path.is_dir():
        raise ModelLoadError(f"model {name!r} has no folder in {repository}")
    config_path = path / CONFIG_FILE
    has_config = config_path.is_file()
    config = ModelConfig()
    if has_config:
        config = parse_config(config_path.read_text(), str(config_path))
    if config.name and config.name != name:
        raise ModelLoadError(
            f"{config_path}: name is {config.name!r} but the model folder is {name!r}"
        )
    config.name = name
    if config.platform and config.platform != ONNX_PLATFORM:
        raise ModelLoadError(
            f"{config_path}: platform {config.platform!r} is not supported; "
            f"expected {ONNX_PLATFORM!r}"
        )
    if config.backend and config.backend != ONNX_BACKEND:
        raise ModelLoadError(
            f"{config_path}: backend {config.backend!r} is not supported; expected {ONNX_BACKEND!r}"
        )
    if config.max_batch_size < 0:
        raise ModelLoadError(f"{config_path}: max_batch_size must be >= 0")
    if single and path == repository:
        return ModelSource(name, path, config, has_config, {1: single[1]})
    filename = config.default_model_filename or DEFAULT_MODEL_FILE
    if filename != Path(filename).name or filename in (".", "..") or "\\" in filename \
            or "\0" in filename:
        raise ModelLoadError(
            f"{config_path}: default_model_filename {filename[:200]!r} must be a file name in "
            "the version folder, not a path")
    versions: dict[int, Path] = {}
    ignored: list[str] = []
    for folder in sorted(path.iterdir()):
        if not folder.is_dir():
            continue
        number = version_folder(folder.name)
        if number is None:
            ignored.append(folder.name)
        elif (folder / filename).is_file():
            versions[number] = folder / filename
    if ignored:
        # As Triton: a folder that is not a version is no reason to refuse the model.
        log.warning("model %s: ignored folder(s) %s: not %s", name,
                    ", ".join(repr(n) for n in ignored), VERSION_FOLDER_RULE)
    return ModelSource(name, path, config, has_config, versions)


def select_versions(config: ModelConfig, available: list[int]) -> list[int]:
    """Apply the config's version_policy (default: the latest one) to the available versions."""
    available = sorted(available)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return available[-count:] if count else []


def output_classes(dims: Sequence[int]) -> int | None:
    """Elements per sample of an output with config ``dims`` (None when one is variable).

    The classification extension ranks these elements; class i is the i-th of them.
    """
    return math.prod(dims) if all(d >= 0 for d in dims) else None


def read_labels(model_path: Path, config: ModelConfig) -> dict[str, list[str]]:
    """Class names per output, from each output's label_filename (UTF-8, one per line).

    Trailing blank lines are ignored. A file whose line count differs from the output's
    classes (elements per sample) is a load error naming both counts: a "background" line
    too many would shift every label by one.
    """
    labels: dict[str, list[str]] = {}
    for output in config.output:
        if not output.label_filename:
            continue
        label_path = (model_path / output.label_filename).resolve()
        if model_path.resolve() not in label_path.parents:
            raise ModelLoadError(
                f"output {output.name!r}: label_filename {output.label_filename!r} "
                "points outside the model folder"
            )
        if not label_path.is_file():
            raise ModelLoadError(
                f"output {output.name!r}: label file {output.label_filename!r} does not exist "
                "in the model folder"
            )
        try:
            names = label_path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"output {output.name!r}: cannot read label file "
                                 f"{output.label_filename!r}: {exc}") from None
        while names and not names[-1].strip():
            names.pop()
        classes = output_classes(output.dims)
        if classes is not None and len(names) != classes:
            raise ModelLoadError(
                f"output {output.name!r}: label file {output.label_filename!r} has "
                f"{len(names)} labels but the output has {classes} classes per sample "
                f"(dims {list(output.dims)}); write one line per class, in class order"
            )
        labels[output.name] = names
    return labels


def _config_dims(spec: TensorSpec, batched: bool, where: str) -> list[int]:
    if batched:
        if not spec.shape or spec.shape[0] != -1:
            raise ModelLoadError(
                f"{where}: max_batch_size > 0 needs a dynamic first dimension, but the ONNX "
                f"file declares shape {list(spec.shape)}"
            )
        return list(spec.shape[1:])
    return list(spec.shape)


def model_dims(tensor: model_config_pb2.ModelInput | model_config_pb2.ModelOutput) -> list[int]:
    """The per-sample shape the model itself takes or gives: ``reshape.shape`` when the
    config reshapes the tensor, else ``dims`` (what clients send and receive)."""
    return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)


def _check_reshape(tensor, onnx_dims: list[int], where: str) -> None:
    """Triton's reshape: clients use ``dims``, the model ``reshape.shape``; same elements."""
    shape, dims = list(tensor.reshape.shape), list(tensor.dims)
    if not dims:
        raise ModelLoadError(f"{where}: reshape needs dims (the shape clients use)")
    if len(shape) != len(onnx_dims) or any(
            r != o and o != -1 for r, o in zip(shape, onnx_dims, strict=True)):
        raise ModelLoadError(
            f"{where}: reshape shape {shape} does not match the ONNX file's {onnx_dims}")
    variable = (sum(d < 0 for d in dims), sum(d < 0 for d in shape))
    if variable[0] > 1 or variable[1] > 1 or (variable[0] == 0) != (variable[1] == 0):
        raise ModelLoadError(
            f"{where}: dims {dims} and reshape shape {shape} must both be fixed, or have one "
            "variable (-1) dimension each")
    if variable == (0, 0) and math.prod(dims) != math.prod(shape):
        raise ModelLoadError(
            f"{where}: dims {dims} hold {math.prod(dims)} elements but reshape shape {shape} "
            f"holds {math.prod(shape)}")


def _complete_tensors(config_tensors, specs: tuple[TensorSpec, ...], batched: bool, kind: str):
    by_name_ = {s.name: s for s in specs}
    if not config_tensors:
        for spec in specs:
            tensor = config_tensors.add()
            tensor.name = spec.name
            tensor.data_type = by_name(spec.datatype).config_type
            tensor.dims.extend(_config_dims(spec, batched, f"{kind} {spec.name!r}"))
        return
    for tensor in config_tensors:
        where = f"{kind} {tensor.name!r}"
        found = by_name_.get(tensor.name)
        if found is None:
            raise ModelLoadError(
                f"{where} is not in the ONNX file, whose {kind}s are {', '.join(by_name_)}"
            )
        spec = found
        if tensor.data_type == model_config_pb2.TYPE_INVALID:
            tensor.data_type = by_name(spec.datatype).config_type
        elif by_config_type(tensor.data_type).name != spec.datatype:
            raise ModelLoadError(
                f"{where}: data_type is {model_config_pb2.DataType.Name(tensor.data_type)} but "
                f"the ONNX file says {spec.datatype}"
            )
        onnx_dims = _config_dims(spec, batched, where)
        if tensor.HasField("reshape"):
            _check_reshape(tensor, onnx_dims, where)
            continue
        if not tensor.dims:
            tensor.dims.extend(onnx_dims)
        elif len(tensor.dims) != len(onnx_dims) or any(
            c != o and o != -1 for c, o in zip(tensor.dims, onnx_dims, strict=True)
        ):
            raise ModelLoadError(
                f"{where}: dims {list(tensor.dims)} do not match the ONNX file's {onnx_dims}"
                + (" (max_batch_size > 0: dims leave out the batch dimension)" if batched else "")
            )
    if kind == "input":
        missing = [s.name for s in specs if s.name not in {t.name for t in config_tensors}]
        if missing:
            raise ModelLoadError(f"the ONNX file's inputs {missing} are missing from the config")


def complete_config(source: ModelSource, signature: Signature) -> ModelConfig:
    """The model's config with inputs, outputs and batching filled in from the ONNX signature."""
    config = ModelConfig()
    config.CopyFrom(source.config)
    config.platform = ONNX_PLATFORM
    config.backend = ONNX_BACKEND
    if not source.has_config_file:
        batchable = all(s.shape and s.shape[0] == -1 for s in signature.inputs + signature.outputs)
        config.max_batch_size = AUTO_MAX_BATCH_SIZE if batchable else 0
        if batchable:  # as Triton's auto-complete: a batching model gets the dynamic batcher
            config.dynamic_batching.SetInParent()
    batched = config.max_batch_size > 0
    _complete_tensors(config.input, signature.inputs, batched, "input")
    _complete_tensors(config.output, signature.outputs, batched, "output")
    return config
