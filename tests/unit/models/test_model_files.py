"""Nothing outside the repository is read: external data, default_model_filename, and poll
mode's fingerprint of linked folders."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support.onnx_models import add_one_model, save_model
from support.repositories import write_config

from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.external_data import check_external_data, external_locations
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.registry import READY, Registry
from onnxserve.serving.models.repository import fingerprint, read_model
from onnxserve.serving.settings import ServerSettings

SETTINGS = ServerSettings(providers="cpu", warmup=False)
SECRET = np.arange(4, dtype=np.float32) + 1000


def _external(tensor: TensorProto, location: str, data: np.ndarray) -> TensorProto:
    """``tensor`` with its bytes moved out to ``location`` (only the reference is set here)."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value=str(data.nbytes))
    return tensor


def _bias_model(path: Path, location: str, where: str = "initializer") -> Path:
    """y = x + b with b's four floats in external file ``location``, placed as ``where``:
    a graph initializer, a Constant node's attribute, a constant inside an If branch, or
    the values of a sparse initializer."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    bias = _external(numpy_helper.from_array(SECRET, "b"), location, SECRET)
    initializers, sparse, nodes = [], [], []
    if where == "initializer":
        initializers.append(bias)
    elif where == "constant":
        nodes.append(helper.make_node("Constant", [], ["b"], value=bias))
    elif where == "subgraph":
        out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])
        branch = helper.make_graph([helper.make_node("Constant", [], ["b"], value=bias)],
                                   "branch", [], [out])
        cond = numpy_helper.from_array(np.array(True), "cond")
        initializers.append(cond)
        nodes.append(helper.make_node("If", ["cond"], ["b"], then_branch=branch,
                                      else_branch=branch))
    elif where == "sparse":
        indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "b_indices")
        sparse.append(helper.make_sparse_tensor(bias, indices, [4]))
    nodes.append(helper.make_node("Add", ["x", "b"], ["y"]))
    graph = helper.make_graph(nodes, "bias", [x], [y], initializer=initializers,
                              sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph", "sparse"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, where: str) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET.tobytes())
    repository = tmp_path / "repo"
    model = repository / "m" / "1" / "model.onnx"
    (repository / "m" / "1").mkdir(parents=True)
    os.symlink(secret, repository / "m" / "1" / "linked.bin")
    for location in ("../../../secret.bin", str(secret), "linked.bin", "a/../../../../secret.bin"):
        _bias_model(model, location, where)
        assert set(external_locations(model)) == {location}
        with pytest.raises(ModelLoadError, match="points outside the model folder") as caught:
            load_model(repository, "m", SETTINGS)
        assert str(tmp_path) not in str(caught.value).replace(location, "")


def test_external_data_beside_the_model_loads(tmp_path: Path) -> None:
    model = _bias_model(tmp_path / "m" / "1" / "model.onnx", "weights/b.bin")
    (model.parent / "weights").mkdir()
    (model.parent / "weights" / "b.bin").write_bytes(SECRET.tobytes())
    loaded = load_model(tmp_path, "m", SETTINGS)
    out = loaded.versions[1].instances[0].run({"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(out["y"], [SECRET])


def test_a_version_folder_linked_from_elsewhere_may_keep_its_data_beside_it(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "store" / "v1"
    _bias_model(elsewhere / "model.onnx", "b.bin")
    (elsewhere / "b.bin").write_bytes(SECRET.tobytes())
    (tmp_path / "repo" / "m").mkdir(parents=True)
    os.symlink(elsewhere, tmp_path / "repo" / "m" / "1")
    check_external_data(tmp_path / "repo" / "m" / "1" / "model.onnx", tmp_path / "repo" / "m")
    assert load_model(tmp_path / "repo", "m", SETTINGS).versions[1]


def test_a_truncated_or_foreign_file_is_a_load_error(tmp_path: Path) -> None:
    model = add_one_model(tmp_path / "m" / "1" / "model.onnx")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(tmp_path, "m", SETTINGS)
    model.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(tmp_path, "m", SETTINGS)


@pytest.mark.parametrize("filename", ["../../../other/1/model.onnx", "/etc/passwd", "..",
                                      "sub/model.onnx", "..\\\\x.onnx"])
def test_default_model_filename_is_a_file_name_not_a_path(tmp_path: Path, filename: str) -> None:
    add_one_model(tmp_path / "other" / "1" / "model.onnx")
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    write_config(tmp_path / "m", f'default_model_filename: "{filename}"\n')
    with pytest.raises(ModelLoadError, match="must be a file name in the version folder") as e:
        read_model(tmp_path, "m")
    assert "exist" not in str(e.value)


def test_default_model_filename_names_the_file_in_each_version(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "weights.onnx")
    write_config(tmp_path / "m", 'default_model_filename: "weights.onnx"\n')
    assert read_model(tmp_path, "m").versions == {1: tmp_path / "m" / "1" / "weights.onnx"}


def test_the_fingerprint_follows_links(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for name in ("a", "b"):
        add_one_model(store / name / "model.onnx")
    (tmp_path / "m").mkdir()
    link = tmp_path / "m" / "1"
    os.symlink(store / "a", link)
    first = fingerprint(tmp_path / "m")
    assert [e[0] for e in first] == ["1/model.onnx"]
    os.utime(store / "b" / "model.onnx", ns=((store / "a" / "model.onnx").stat().st_mtime_ns,) * 2)
    link.unlink()
    os.symlink(store / "b", link)  # same size and time, another file
    second = fingerprint(tmp_path / "m")
    assert second != first
    (store / "b" / "model.onnx").write_bytes((store / "b" / "model.onnx").read_bytes() + b"\0")
    third = fingerprint(tmp_path / "m")
    assert third != second
    os.symlink(store / "a", tmp_path / "m" / "2")  # a new linked version
    assert [e[0] for e in fingerprint(tmp_path / "m")] == ["1/model.onnx", "2/model.onnx"]
    os.symlink(tmp_path / "m", tmp_path / "m" / "loop")  # walked once, not forever
    assert len(fingerprint(tmp_path / "m")) == 2


def test_poll_reloads_when_a_linked_version_folder_is_retargeted(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for name, value in (("a", 1.0), ("b", 5.0)):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
        c = numpy_helper.from_array(np.array(value, np.float32), "c")
        save_model(helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], name, [x], [y],
                                     initializer=[c]), store / name / "model.onnx")
    repository = tmp_path / "repo"
    (repository / "m").mkdir(parents=True)
    os.symlink(store / "a", repository / "m" / "1")

    async def body() -> list[float]:
        registry = Registry(repository, ServerSettings(
            model_repository=repository, warmup=False, providers="cpu",
            model_control_mode="poll"))
        await registry.load_initial()
        seen = []
        for step in range(3):
            _, version = registry.get("m")
            out = await version.scheduler.infer({"x": np.zeros((1, 4), np.float32)}, ["y"], 1)
            seen.append(float(out["y"][0, 0]))
            if step == 0:
                (repository / "m" / "1").unlink()
                os.symlink(store / "b", repository / "m" / "1")
            elif step == 1:  # the linked file itself changes
                save_model(helper.make_graph(
                    [helper.make_node("Sub", ["x", "c"], ["y"])], "b", *_io(),
                    initializer=[numpy_helper.from_array(np.array(5.0, np.float32), "c")]),
                    store / "b" / "model.onnx")
            await registry.poll()
            assert registry.index()[0].state == READY
        await registry.close()
        return seen

    assert asyncio.run(asyncio.wait_for(body(), 60)) == [1.0, 5.0, -5.0]


def _io() -> tuple[list, list]:
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])


def test_the_walker_sees_tensors_onnx_itself_writes_as_external(tmp_path: Path) -> None:
    c = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "c")
    inline = save_model(helper.make_graph([helper.make_node("MatMul", ["x", "c"], ["y"])], "mm",
                                          *_io(), initializer=[c]), tmp_path / "m.onnx")
    model = onnx.load(str(inline))
    onnx.save_model(model, str(tmp_path / "out.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="out.onnx.data", size_threshold=0)
    assert set(external_locations(tmp_path / "out.onnx")) == {"out.onnx.data"}
    assert external_locations(tmp_path / "m.onnx") == []
