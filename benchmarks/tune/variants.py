"""A model and its reduced-precision variants in the repository, each a candidate of
`onnxserve tune`, with the variants' measured agreement with fp32.

`onnxserve export --fp16 / --int8` publishes variants as their own models, named
``<model>_fp16`` and ``<model>_int8`` (docs/export.md). A variant is a candidate when it
takes inputs of the same names, per-sample shapes and types as the model, and requests as
large (a client can switch to it by name alone); its agreement is measured here on the
inputs tune sends, and the export's own figure (held-out data or real photos,
``verification.json``) is shown beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.repository import complete_config, read_model
from onnxserve.serving.runtime.instance import session_signature

from . import TuneError
from .costs import model_inputs, random_input

#: variant -> the suffix the export names it with
VARIANT_SUFFIXES = {"fp16": "_fp16", "int8": "_int8"}
#: inputs each variant's agreement with fp32 is measured on
AGREEMENT_SAMPLES = 64


@dataclass(frozen=True)
class Agreement:
    """How closely a variant's outputs follow fp32's on the same inputs."""

    samples: int
    #: share of samples with fp32's best class (None: no output is a score per class)
    top1: float | None
    #: largest |variant - fp32| over every output value
    max_abs_diff: float
    #: the export's top-1 agreement (verification.json; None: not recorded)
    export_top1: float | None = None
    #: why the export's figure proves little (e.g. random weights), as it recorded
    export_caveat: str | None = None

    def describe(self) -> str:
        measured = (f"top-1 {self.top1:.1%}" if self.top1 is not None
                    else "no class scores")
        text = f"{measured} of {self.samples} random inputs, max |diff| {self.max_abs_diff:.2g}"
        if self.export_top1 is not None:
            text += f"; export: top-1 {self.export_top1:.1%}"
            if self.export_caveat:
                text += f" ({self.export_caveat})"
        return text


@dataclass
class ModelVariant:
    """One repository model tune can serve for MODEL: the model itself (fp32) or a variant."""

    name: str
    variant: str
    config: ModelConfig
    model_file: Path
    #: one sample of each input (no batch dimension when the model batches)
    inputs: dict[str, np.ndarray]
    agreement: Agreement | None = None
    #: why a variant found in the repository is not a candidate (None: it is)
    refused: str | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "variant": self.variant, "refused": self.refused,
                "agreement": None if self.agreement is None else asdict(self.agreement)}


def _model_file(repository: Path, name: str) -> tuple[ModelConfig, Path]:
    """The model's config, completed from its ONNX file as the server completes it (the
    inputs, outputs and batching a config.pbtxt leaves out), and the served version's
    file (the highest)."""
    import onnxruntime as ort

    try:
        source = read_model(repository, name)
        if source.path != repository / name:
            raise TuneError(f"model {name!r} is a single-file repository ({source.path}); "
                            "tune measures a model in its own folder of the repository "
                            "(<repository>/<model>/<version>/model.onnx)")
        if not source.versions:
            raise TuneError(f"model {name!r} has no version folder with a model file in "
                            f"{repository}")
        path = source.versions[max(source.versions)]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return complete_config(source, session_signature(session)), path
    except ModelLoadError as exc:
        raise TuneError(str(exc)) from None
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise TuneError(f"cannot load model {name!r}: {exc}") from None


def find_variants(repository: Path, model: str, *, variants: bool = True) -> list[ModelVariant]:
    """``model`` (first) and, with ``variants``, each of its variants found in
    ``repository``: the served version's file (the highest), its inputs and, for
    variants, their agreement with fp32 or why they are not candidates.

    Raises:
        TuneError: ``model`` is not in the repository, has no model file, or takes an input
            tune cannot make.
    """
    config, path = _model_file(repository, model)
    base = ModelVariant(model, "fp32", config, path, model_inputs(config))
    found = [base]
    if not variants:
        return found
    for variant, suffix in VARIANT_SUFFIXES.items():
        name = model + suffix
        if not (repository / name).is_dir():
            continue
        try:
            v_config, v_path = _model_file(repository, name)
            v_inputs = model_inputs(v_config)
        except TuneError as exc:
            found.append(ModelVariant(name, variant, ModelConfig(name=name), Path(), {},
                                      refused=str(exc)))
            continue
        refused = _mismatch(base, v_config, v_inputs)
        item = ModelVariant(name, variant, v_config, v_path, v_inputs, refused=refused)
        if refused is None:
            try:
                item.agreement = agreement(base, item)
            except Exception as exc:  # outputs that cannot be compared: say so, go on
                item.refused = f"its outputs cannot be compared with {model}'s: {exc}"
        found.append(item)
    return found


def _mismatch(base: ModelVariant, config: ModelConfig,
              inputs: dict[str, np.ndarray]) -> str | None:
    """Why a variant cannot stand in for ``base`` (another request would be needed)."""
    if (config.max_batch_size > 0) != (base.config.max_batch_size > 0):
        return (f"it {'batches' if config.max_batch_size > 0 else 'does not batch'} and "
                f"{base.name} {'does' if base.config.max_batch_size > 0 else 'does not'}")
    want = {n: (x.shape, x.dtype.name) for n, x in base.inputs.items()}
    got = {n: (x.shape, x.dtype.name) for n, x in inputs.items()}
    if want != got:
        return (f"it takes inputs {got}, {base.name} takes {want} (shape and type per "
                "sample): a client could not switch to it by name alone")
    if 0 < config.max_batch_size < base.config.max_batch_size:
        return (f"it takes at most {config.max_batch_size} samples per request, "
                f"{base.name} {base.config.max_batch_size}")
    return None


def agreement(base: ModelVariant, variant: ModelVariant,
              samples: int = AGREEMENT_SAMPLES) -> Agreement:
    """``variant``'s outputs against ``base``'s (fp32) on ``samples`` random inputs of the
    kind tune sends, one batch each (one at a time for a model without a batch dimension),
    and the export's recorded agreement when its verification.json has one."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(m.model_file), providers=["CPUExecutionProvider"])
                for m in (base, variant)]
    rng = np.random.default_rng(1)
    if base.config.max_batch_size > 0:
        feeds = [{n: random_input((samples, *x.shape), x.dtype, rng)
                  for n, x in base.inputs.items()}]
    else:
        feeds = [{n: random_input(x.shape, x.dtype, rng) for n, x in base.inputs.items()}
                 for _ in range(samples)]
    reference: list[list[np.ndarray]] = []
    other: list[list[np.ndarray]] = []
    for feed in feeds:
        for outputs, session, model in ((reference, sessions[0], base),
                                        (other, sessions[1], variant)):
            typed = {n: x.astype(model.inputs[n].dtype) for n, x in feed.items()}
            outputs.append([np.asarray(o, dtype=np.float64) for o in session.run(None, typed)])
    diff = max(float(np.max(np.abs(r - o))) if r.size else 0.0
               for rs, os_ in zip(reference, other, strict=True)
               for r, o in zip(rs, os_, strict=True))
    top1 = None
    first_ref = np.concatenate([rs[0].reshape(-1, rs[0].shape[-1]) for rs in reference])
    first_other = np.concatenate([os_[0].reshape(-1, os_[0].shape[-1]) for os_ in other])
    if first_ref.ndim == 2 and first_ref.shape[-1] > 1:
        top1 = float(np.mean(first_ref.argmax(-1) == first_other.argmax(-1)))
    export_top1, caveat = _export_agreement(variant.model_file.parent)
    return Agreement(samples=samples, top1=top1, max_abs_diff=diff, export_top1=export_top1,
                     export_caveat=caveat)


def _export_agreement(version_folder: Path) -> tuple[float | None, str | None]:
    try:
        report = json.loads((version_folder / "verification.json").read_text())
    except (OSError, ValueError):
        return None, None
    value = report.get("top1_agreement_vs_fp32") if isinstance(report, dict) else None
    if not isinstance(value, int | float):
        return None, None
    caveat = report.get("top1_agreement_caveat")
    return float(value), caveat if isinstance(caveat, str) else None
