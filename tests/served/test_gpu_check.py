"""The GPU check's tools, run here without a GPU: model packing and the whole check as a
dry run on the CPU (``--providers cpu``) over small models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from support.onnx_models import add_one_model, save_model
from support.repositories import write_config

from onnxserve.benchmarks import gpu_check, gpu_models


def _dense_model(path: Path, dtype=np.float32) -> Path:
    """y = x @ W + b with a 64 x 128 weight (large) and a 128 bias (small)."""
    rng = np.random.default_rng(0)
    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weight = numpy_helper.from_array(rng.uniform(-0.2, 0.3, (64, 128)).astype(dtype), "W")
    bias = numpy_helper.from_array(rng.random(128).astype(dtype), "b")
    x = helper.make_tensor_value_info("x", element, ["batch", 64])
    y = helper.make_tensor_value_info("y", element, ["batch", 128])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["y"])]
    return save_model(helper.make_graph(nodes, "dense", [x], [y], initializer=[weight, bias]), path)


def test_packing_keeps_the_graph_and_redraws_large_weights_with_their_statistics(
        tmp_path: Path) -> None:
    for name, dtype in (("dense", np.float32), ("dense_fp16", np.float16)):
        _dense_model(tmp_path / "repo" / name / "1" / "model.onnx", dtype)
        write_config(tmp_path / "repo" / name, "max_batch_size: 8\n")
    gpu_models.pack(tmp_path / "repo", tmp_path / "packed")
    packed = tmp_path / "packed" / "dense" / "1"
    assert sorted(p.name for p in packed.iterdir()) == [gpu_models.GRAPH_FILE,
                                                        gpu_models.WEIGHTS_FILE]
    assert (packed / gpu_models.GRAPH_FILE).stat().st_size < 2000  # the 32 KB weight is gone
    assert (tmp_path / "packed" / "dense" / "config.pbtxt").is_file()
    gpu_models.unpack(tmp_path / "packed", tmp_path / "out")
    for name, dtype in (("dense", np.float32), ("dense_fp16", np.float16)):
        before = onnx.load(str(tmp_path / "repo" / name / "1" / "model.onnx"))
        after = onnx.load(str(tmp_path / "out" / name / "1" / "model.onnx"))
        assert before.graph.node == after.graph.node
        assert before.graph.input == after.graph.input
        old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
        new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
        np.testing.assert_array_equal(old["b"], new["b"])  # small tensors travel as they are
        assert new["W"].shape == (64, 128) and new["W"].dtype == dtype
        assert not np.array_equal(old["W"], new["W"])
        assert abs(float(new["W"].mean()) - float(old["W"].astype(np.float64).mean())) < 0.01
        assert abs(float(new["W"].std()) - float(old["W"].astype(np.float64).std())) < 0.01
        assert (tmp_path / "out" / name / "config.pbtxt").is_file()
    again = tmp_path / "again"
    gpu_models.unpack(tmp_path / "packed", again)  # the same seed: the same weights
    assert (again / "dense" / "1" / "model.onnx").read_bytes() == (
        tmp_path / "out" / "dense" / "1" / "model.onnx").read_bytes()


def test_the_whole_check_runs_as_a_dry_run_on_the_cpu(tmp_path: Path, capsys) -> None:
    repository = tmp_path / "repo"
    _dense_model(repository / "dense" / "1" / "model.onnx")
    write_config(repository / "dense", "max_batch_size: 8\n")
    add_one_model(repository / "add_one" / "1" / "model.onnx")
    results = tmp_path / "results"
    code = gpu_check.main([
        "--repository", str(repository), "--results-dir", str(results), "--providers", "cpu",
        "--models", "dense", "--concurrency", "1", "4", "--batches", "1", "4",
        "--raw-seconds", "0.2", "--window-s", "1", "--client-processes", "2",
        "--budget-s", "120", "--instances", "1"])
    assert code == 0
    summary = capsys.readouterr().out.split("== GPU check summary")[1]
    assert "active provider: CPUExecutionProvider" in summary
    assert "parity dense: CPUExecutionProvider" in summary and "top-1 agree 100%" in summary
    assert "dense fp32: raw best" in summary and "served/raw" in summary
    assert "cold shapes (dense, sizes 1..4)" in summary
    result = json.loads((results / "gpu_check.json").read_text())
    served = result["served"]["dense"]
    assert [r["concurrency"] for r in served] == [1, 4]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in served)
    assert set(result["raw"]["dense"]) == {"1", "4"}
    assert {r["model"] for r in result["parity"]} == {"add_one", "dense"}
    assert all("error" not in r and r["max_abs_diff"] == 0 for r in result["parity"])
    assert "served/raw" in (results / "gpu_check.md").read_text()
