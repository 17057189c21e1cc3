"""int8 that pays off: static QDQ quantization as onnxruntime prescribes it (pre-processing,
U8S8, per-channel weights, calibration on the data given, the classifier and Softmax in
float), the speed check that keeps a slower variant out of the repository unless --force,
and the export report's speed-up column.

No test times anything: latencies are faked where the speed check is exercised, and the
quantized graphs are checked for their structure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxserve.export import pipeline, variants, verify
from onnxserve.export.cpu import Cpu, parse_cpuinfo

VNNI = Cpu(name="test CPU", x86=True, vnni=True, avx512=True)
NO_VNNI = Cpu(name="old CPU", x86=True, vnni=False, avx512=False)
CONV_CHANNELS = 8
CLASSES = 10


def _conv_classifier(seed: int = 0) -> onnx.ModelProto:
    """input [N, 3, 8, 8] -> Conv 3x3 -> Relu -> Conv 1x1 -> Relu -> GlobalAveragePool ->
    Flatten -> Gemm (the classifier) -> Softmax -> probabilities [N, 10]."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wc", "bc"], ["logits"], name="classifier"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        [weight("w1", CONV_CHANNELS, 3, 3, 3), weight("b1", CONV_CHANNELS),
         weight("w2", CONV_CHANNELS, CONV_CHANNELS, 1, 1), weight("b2", CONV_CHANNELS),
         weight("wc", CONV_CHANNELS, CLASSES), weight("bc", CLASSES)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _images(count: int, high: float = 1.0, seed: int = 1) -> np.ndarray:
    """[count, 3, 8, 8] float32 in [0, high], both ends present."""
    x = np.random.default_rng(seed).uniform(0, high, (count, 3, 8, 8)).astype(np.float32)
    x.flat[0], x.flat[1] = 0.0, high
    return x


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def int8() -> variants.Int8Variant:
    return variants.to_int8(_conv_classifier(), _images(24), machine=VNNI,
                            calibration_source="24 test images")


def test_convolutions_are_qdq_u8s8_with_per_channel_weight_scales(
        int8: variants.Int8Variant) -> None:
    model, producers, values = int8.model, _producers(int8.model), _initializers(int8.model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    for conv in convs:
        data, weight = (producers[name] for name in conv.input[:2])
        assert data.op_type == weight.op_type == "DequantizeLinear", conv.name
        # activations: uint8, one scale for the tensor
        assert values[data.input[2]].dtype == np.uint8 and values[data.input[1]].shape == ()
        # weights: int8, one scale per output channel, symmetric (zero points 0)
        assert values[weight.input[0]].dtype == np.int8
        assert values[weight.input[1]].shape == (CONV_CHANNELS,)
        assert not values[weight.input[2]].any()
    assert {"onnx.quant.pre_process": "onnxruntime.quant"}.items() <= {
        p.key: p.value for p in model.metadata_props}.items()
    described = int8.describe()
    assert described["quantization"] == "static" and described["format"] == "QDQ"
    assert described["weights"] == "int8, per channel"
    assert described["activations"] == "uint8, calibrated"
    assert described["preprocessing"].startswith("quant_pre_process: ")
    assert described["calibration"] == {"method": "minmax", "samples": 24,
                                        "data": "24 test images"}


def test_the_classifier_and_softmax_stay_in_float(int8: variants.Int8Variant) -> None:
    model, producers, values = int8.model, _producers(int8.model), _initializers(int8.model)
    assert int8.float_nodes == ["classifier", "softmax"]
    (gemm,) = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert values[gemm.input[1]].dtype == np.float32  # float weights, no DequantizeLinear
    assert gemm.input[1] not in producers
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert producers[softmax.input[0]].name == "classifier"  # the float Gemm, not a DQ
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & {gemm.output[0], "probabilities"}


def test_onnxruntime_runs_the_convolutions_as_integer_kernels(tmp_path: Path,
                                                              int8: variants.Int8Variant) -> None:
    path = tmp_path / "int8.onnx"
    onnx.save(int8.model, str(path))
    profile = {(t.op_type, t.kind): t.nodes for t in verify.op_profile(str(path), _images(2),
                                                                       runs=2)}
    assert profile[("QLinearConv", "integer")] == 2
    assert profile[("Gemm", "float")] == 1 and profile[("Softmax", "float")] == 1
    assert not any(op == "Conv" for op, _ in profile)


def test_calibration_ranges_come_from_the_data_given() -> None:
    for high in (2.0, 10.0):
        int8 = variants.to_int8(_conv_classifier(), _images(13, high), machine=VNNI)
        assert int8.calibration_samples == 13  # every sample, the last short batch included
        values = _initializers(int8.model)
        (quantize,) = [n for n in int8.model.graph.node
                       if n.op_type == "QuantizeLinear" and n.input[0] == "input"]
        assert values[quantize.input[1]] == pytest.approx(high / 255, rel=1e-6)
        assert values[quantize.input[2]] == 0  # the range starts at 0


def test_reduce_range_only_without_vnni() -> None:
    def largest_weight(int8: variants.Int8Variant) -> int:
        values = _initializers(int8.model)
        return max(int(np.abs(v.astype(np.int32)).max()) for v in values.values()
                   if v.dtype == np.int8)

    with_vnni = variants.to_int8(_conv_classifier(), _images(8), machine=VNNI)
    without = variants.to_int8(_conv_classifier(), _images(8), machine=NO_VNNI)
    assert (with_vnni.reduce_range, without.reduce_range) == (False, True)
    assert largest_weight(with_vnni) == 127 and largest_weight(without) <= 64


def test_without_calibration_data_quantization_is_dynamic() -> None:
    int8 = variants.to_int8(_conv_classifier(), None, machine=VNNI)
    ops = {n.op_type for n in int8.model.graph.node}
    assert "DynamicQuantizeLinear" in ops or "ConvInteger" in ops, ops
    assert int8.describe()["quantization"] == "dynamic" and int8.calibration_samples == 0


def test_bad_settings_and_empty_calibration_are_refused() -> None:
    with pytest.raises(variants.QuantizationError, match="calibration data is empty"):
        variants.to_int8(_conv_classifier(), np.zeros((0, 3, 8, 8), np.float32), machine=VNNI)
    with pytest.raises(variants.QuantizationError,
                       match="int8 calibration 'kl': expected one of minmax, entropy"):
        variants.to_int8(_conv_classifier(), _images(4), machine=VNNI,
                         settings=variants.Int8Settings(calibration="kl"))


def test_cpu_features_come_from_cpuinfo() -> None:
    text = ("processor\t: 0\nmodel name\t: AMD EPYC\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert parse_cpuinfo(text, cores=2) == Cpu("AMD EPYC", x86=True, vnni=True, avx512=True,
                                               cores=2)
    assert str(parse_cpuinfo(text, cores=2)) == "AMD EPYC, 2 cores (AVX-512, VNNI, no AMX)"
    old = parse_cpuinfo(text.replace(" avx512f avx512_vnni", ""), cores=2)
    assert (old.vnni, str(old)) == (False, "AMD EPYC, 2 cores (no AVX-512, no VNNI, no AMX)")


def test_latencies_are_timed_with_the_servers_default_session_options() -> None:
    from onnxserve.serving.models.options import model_options
    from onnxserve.serving.models.repository import parse_config
    from onnxserve.serving.runtime.instance import session_options
    from onnxserve.serving.runtime.plan import plan_execution

    config = parse_config('name: "m"\nmax_batch_size: 32\n', "test")
    server = session_options(plan_execution(config, model_options(config)).session)
    ours = verify.timing_options()
    for attribute in ("intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                      "graph_optimization_level"):
        assert getattr(ours, attribute) == getattr(server, attribute), attribute
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning",
                "session.force_spinning_stop"):
        assert ours.get_session_config_entry(key) == server.get_session_config_entry(key), key
    assert verify.timing_options(1).intra_op_num_threads == 1


def test_application_calibration_uses_real_photo_crops_other_than_the_agreement_ones() -> None:
    crops = pipeline.calibration_crops(32, count=8)
    assert crops.shape == (8, 32, 32, 3) and crops.dtype == np.uint8
    assert len({c.tobytes() for c in crops}) == 8
    agreement = pipeline.photo_crops(32)
    assert not any(np.array_equal(c, a) for c in crops for a in agreement)
    # photos, not noise: neighbouring pixels are alike
    rows = crops.astype(np.float64)
    assert np.mean(np.abs(np.diff(rows, axis=2))) < 0.25 * np.mean(np.abs(rows - rows.mean()))


# --- the speed check ------------------------------------------------------------------------


def _prepared(calibrated: bool = True) -> pipeline.Prepared:
    """A tiny Keras classifier (logits, probabilities) as prepare_* would give it."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="features")
    logits = keras.layers.Dense(4, name="logits")(keras.layers.Dense(8, activation="relu")(inputs))
    model = keras.Model(inputs, [logits, keras.layers.Softmax(name="probabilities")(logits)])
    data = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    return pipeline.Prepared(
        name="tiny", keras_model=model, samples=data[:32], agreement_data=data,
        calibration=data[:32] if calibrated else None, labels={"probabilities": list("abcd")},
        max_batch_size=32, calibration_source="32 test rows",
    )


def _fake_latencies(monkeypatch, ms: dict[tuple[str, int], float]) -> None:
    """verify.median_latency_ms answers ``ms[(session key, batch size)]``."""
    def fake(sessions, inputs, **_):
        return {key: ms[(key, len(inputs[key]))] for key in sessions}

    monkeypatch.setattr(verify, "median_latency_ms", fake)


SLOWER = {("fp32", 1): 1.0, ("int8", 1): 2.5, ("fp32", 32): 8.0, ("int8", 32): 6.0}


def test_int8_slower_than_fp32_is_not_published(tmp_path: Path, monkeypatch, capsys) -> None:
    _fake_latencies(monkeypatch, SLOWER)
    with pytest.raises(pipeline.ExportError) as failure:
        pipeline.export(_prepared(), tmp_path / "repo", variant="int8")
    message = str(failure.value)
    assert message.startswith("int8 is not faster than fp32 on this machine (")
    assert "batch 1: 2.50 ms against fp32's 1.00 ms" in message
    assert "batch 32" not in message  # faster there
    assert "with --force" in message
    assert not (tmp_path / "repo").exists()


def test_force_publishes_it_with_a_warning_that_says_both_latencies(
        tmp_path: Path, monkeypatch, capsys) -> None:
    _fake_latencies(monkeypatch, SLOWER)
    report = pipeline.export(_prepared(), tmp_path / "repo", variant="int8", force=True)
    err = capsys.readouterr().err
    assert err.startswith("warning: int8 is not faster than fp32 on this machine (")
    assert "batch 1: 2.50 ms against fp32's 1.00 ms" in err and "(--force)" in err
    assert report["speed_warning"] in err
    stored = json.loads((Path(report["path"]).parent / "verification.json").read_text())
    assert stored["speedup_vs_fp32"] == {"batch1": 0.4, "batch32": 1.33}
    assert stored["batch32_latency_ms"] == {"fp32": 8.0, "int8": 6.0}


def test_int8_faster_than_fp32_is_published_without_warning(tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    _fake_latencies(monkeypatch, {("fp32", 1): 2.0, ("int8", 1): 1.0, ("fp32", 32): 9.0,
                                  ("int8", 32): 3.0})
    report = pipeline.export(_prepared(), tmp_path / "repo", variant="int8")
    out, err = capsys.readouterr()
    assert err == "" and "speed_warning" not in report
    assert report["speedup_vs_fp32"] == {"batch1": 2.0, "batch32": 3.0}
    assert "int8 speed on " in out and "batch 1 1.00 ms vs fp32 2.00 ms (2.00x)" in out
    assert report["int8"]["calibration"]["samples"] == 32
    assert any(op["kind"] == "integer" for op in report["int8"]["batch1_ops"])


def test_a_small_max_batch_size_measures_batch_1_only(tmp_path: Path, monkeypatch) -> None:
    _fake_latencies(monkeypatch, {("fp32", 1): 2.0, ("int8", 1): 1.0})
    report = pipeline.export(_prepared(), tmp_path / "repo", variant="int8", max_batch_size=8)
    assert "batch32_latency_ms" not in report and report["speedup_vs_fp32"] == {"batch1": 2.0}


def test_fp16_is_not_held_back_on_the_cpu_and_says_it_is_a_gpu_format(
        tmp_path: Path, monkeypatch, capsys) -> None:
    _fake_latencies(monkeypatch, {("fp32", 1): 1.0, ("fp16", 1): 1.1, ("fp32", 32): 8.0,
                                  ("fp16", 32): 8.5})
    report = pipeline.export(_prepared(), tmp_path / "repo", variant="fp16")
    out = capsys.readouterr().out
    assert "making the fp16 variant (float16 weights and compute: a GPU format" in out
    assert "fp16 is a GPU format: on the CPU it is no faster than fp32" in out
    assert "speed_warning" not in report and Path(report["path"]).is_file()


# --- the export report ----------------------------------------------------------------------


def test_export_report_has_the_speed_up_column() -> None:
    from onnxserve.benchmarks.export_report import markdown

    def row(model: str, variant: str, speedup: dict | None) -> dict:
        report = {"parity": {"max_abs_prob_diff": 0.0, "max_rel_score_diff": 1e-6},
                  "size_mb": {"fp32": 14.0, variant: 7.8},
                  "batch1_latency_ms": {"fp32": 2.58, variant: 1.07},
                  "batch32_latency_ms": {"fp32": 103.1, variant: 38.5},
                  "timing": {"cpu": "AMD EPYC (AVX-512, VNNI)"}}
        if speedup is not None:
            report["speedup_vs_fp32"] = speedup
        if variant == "int8":
            report["int8"] = {"batch1_ops": [
                {"op_type": "QLinearConv", "kind": "integer", "nodes": 52, "ms": 1.25},
                {"op_type": "Gemm", "kind": "float", "nodes": 1, "ms": 0.1}]}
        return {"model": model, "variant": variant, "data": "test", "report": report,
                "peak_rss_mb": 900, "budget_mb": 6144, "wall_s": 10}

    table = markdown([row("mobilenet_v2", "int8", {"batch1": 2.41, "batch32": 2.68}),
                      row("lenet5", "int8", {"batch1": 0.65, "batch32": 0.42}),
                      row("resnet50", "fp32", None)])
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    assert "| batch-32 ms (fp32 / variant) | speed-up vs fp32 (batch 1 / 32) |" in header
    columns = header.count("|")
    mobilenet = next(line for line in lines if line.startswith("| mobilenet_v2 | int8"))
    assert "| 103.1 / 38.5 | 2.41x / 2.68x |" in mobilenet and mobilenet.count("|") == columns
    assert "| 0.65x / 0.42x (slower) |" in table
    assert "on AMD EPYC (AVX-512, VNNI), " in table
    assert "| mobilenet_v2 | 1.25 (QLinearConv x52) | 0.10 (Gemm) |  |" in table


def test_the_report_exports_int8_with_force(monkeypatch, tmp_path: Path) -> None:
    from onnxserve.benchmarks import export_report

    calls: list[list[str]] = []

    def fake_export(args: list[str]) -> tuple[int, float, str]:
        calls.append(args)
        return 1, 100.0, "failed on purpose"

    monkeypatch.setattr(export_report, "run_export", fake_export)
    export_report.main(["--models", "lenet5", "--variants", "fp32", "fp16", "int8",
                        "--out", str(tmp_path)])
    forced = {args[args.index("--name") + 1]: "--force" in args for args in calls}
    assert forced == {"lenet5_fp32": False, "lenet5_fp16": False, "lenet5_int8": True}
    assert os.path.isfile(tmp_path / "export.md")
