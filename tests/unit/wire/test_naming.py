"""One naming rule for model names and version numbers (onnxserve.protos.naming), shared by
the server (repository scan, requests, model control), the exporter and the clients.

``str.isdigit()`` is true for '²' (which ``int()`` refuses) and for other scripts' digits
(which ``int()`` reads), ``int()`` takes '+1', ' 1' and '1_0' and raises past 4300 digits:
each was once a way to get INTERNAL / HTTP 500 or a version that was not asked for.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.naming import BAD_NAMES, BAD_VERSIONS
from support.onnx_models import add_one_model

from onnxserve.clients.connection import ConnectionSettingsError, normalize_url
from onnxserve.protos.naming import (
    MAX_MODEL_NAME,
    MAX_VERSION,
    MODEL_NAME_RULE,
    check_model_name,
    model_name_problem,
    parse_version,
    plain_int,
    safe_model_name,
    valid_model_name,
    version_folder,
)
from onnxserve.serving.errors import InvalidInputError, ModelLoadError
from onnxserve.serving.frontends.http_codec import header_length
from onnxserve.serving.models.options import model_options
from onnxserve.serving.models.registry import Registry
from onnxserve.serving.models.repository import parse_config, read_model, scan_folders
from onnxserve.serving.process import onnxserve_command
from onnxserve.serving.runtime.accelerators import gpu_settings
from onnxserve.serving.settings import ServerSettings

# --- the rule --------------------------------------------------------------------------

@given(st.text(max_size=40))
def test_a_version_is_ascii_digits_and_nothing_else(text: str) -> None:
    expected = None
    if re.fullmatch(r"[0-9]+", text, re.ASCII) and 1 <= int(text) <= MAX_VERSION:
        expected = int(text)
    assert parse_version(text) == expected
    folder = version_folder(text)
    assert folder == (None if text.startswith("0") else expected)


@given(st.integers(1, MAX_VERSION))
def test_every_version_round_trips(number: int) -> None:
    assert parse_version(str(number)) == number
    assert version_folder(str(number)) == number
    # Triton ignores version folders whose names start with "0"; a request may still say 01
    assert version_folder("0" + str(number)) is None
    assert parse_version("0" + str(number)) == number


def test_other_scripts_digits_are_not_digits() -> None:
    digits = [chr(c) for c in range(0x80, sys.maxunicode + 1) if chr(c).isdigit()]
    assert "\u00b2" in digits and "\u0663" in digits  # what str.isdigit() takes
    for char in digits:
        assert parse_version(char) is None and version_folder(char) is None
        assert plain_int(char, 10**9) is None and plain_int("1" + char, 10**9) is None


@pytest.mark.parametrize("text", BAD_VERSIONS)
def test_texts_that_name_no_version(text: str) -> None:
    assert parse_version(text) is None
    assert version_folder(text) is None


def test_plain_int_never_raises_on_long_texts() -> None:
    assert plain_int("9" * 5000, 2**64) is None
    assert plain_int("0" * 5000 + "7", 10) == 7
    assert plain_int("11", 10) is None and plain_int("10", 10) == 10


@given(st.text(max_size=MAX_MODEL_NAME + 4))
def test_a_model_name_is_one_safe_path_component_and_url_segment(name: str) -> None:
    if not valid_model_name(name):
        with pytest.raises(ValueError, match=re.escape(MODEL_NAME_RULE)):
            check_model_name(name)
        return
    assert check_model_name(name) == name
    assert name not in (".", "..") and "/" not in name and "\\" not in name
    assert not name.startswith((".", "-")) and name.isascii() and name.isprintable()
    assert " " not in name and 1 <= len(name) <= MAX_MODEL_NAME
    assert urllib.parse.quote(name, safe="") == name  # no percent-encoding in a URL path
    root = Path("/repository")
    assert (root / name).resolve().parent == root


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_cannot_be_model_names_say_why(name: str) -> None:
    problem = model_name_problem(name)
    assert problem
    with pytest.raises(ValueError) as caught:
        check_model_name(name)
    assert problem in str(caught.value) and MODEL_NAME_RULE in str(caught.value)


@given(st.text(max_size=300))
def test_a_name_made_from_any_text_is_a_model_name(text: str) -> None:
    assert valid_model_name(safe_model_name(text))


def test_names_made_from_file_names() -> None:
    assert safe_model_name("my model") == "my_model"
    assert safe_model_name("..evil") == "evil"
    assert safe_model_name("") == "model"


# --- where numbers are parsed ------------------------------------------------------------

def test_a_stray_version_folder_is_ignored_with_a_note(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As Triton: '²/' beside '1/' leaves version 1 (int('²') used to fail the whole
    model); '٣/' is not version 3, '01/' not version 1."""
    for folder in ("1", "\u00b2", "\u0663", "01", "0", "notes"):
        add_one_model(tmp_path / "m" / folder / "model.onnx")
    with caplog.at_level(logging.WARNING):
        source = read_model(tmp_path, "m")
    assert source.versions == {1: tmp_path / "m" / "1" / "model.onnx"}
    note = "\n".join(r.getMessage() for r in caplog.records)
    for folder in ("\u00b2", "\u0663", "01", "0", "notes"):
        assert repr(folder) in note
    assert "not a version number" in note


def test_repository_folders_that_are_not_model_names_are_listed_with_why(
        tmp_path: Path) -> None:
    for folder in ("good", "my model", ".hidden", "-x"):
        (tmp_path / folder).mkdir()
    names, skipped = scan_folders(tmp_path)
    assert names == ["good"]
    assert skipped == {name: model_name_problem(name) for name in ("-x", ".hidden", "my model")}


def test_the_registry_names_skipped_folders_once_per_change(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """'my model' and '.hidden' used to be published, then skipped without a word: the
    server said only that the repository "holds no model folders"."""
    for folder in ("my model", ".hidden"):
        add_one_model(tmp_path / folder / "1" / "model.onnx")
    registry = Registry(tmp_path, ServerSettings(model_repository=tmp_path, warmup=False))

    def notes() -> list[str]:
        return [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]

    with caplog.at_level(logging.WARNING):
        assert registry.listing.initial_models() == []
        first = notes()
        assert any("holds no model folders" in n and "'my model'" in n for n in first)
        listing = next(n for n in first if "skipped folder(s)" in n)
        assert "'.hidden' starts with '.'" in listing and "'my model' has ' '" in listing
        registry.index()
        assert notes() == first  # unchanged: not logged again
        (tmp_path / "-x").mkdir()
        registry.index()
        assert len(notes()) == len(first) + 1 and "'-x' starts with '-'" in notes()[-1]


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "1_024", "+1024", str(2**64)])
def test_gpu_mem_limit_is_a_plain_number(value: str) -> None:
    config = parse_config(f'name: "m"\nparameters {{ key: "gpu_mem_limit" value {{ '
                          f'string_value: "{value}" }} }}\n', "test")
    with pytest.raises(ModelLoadError, match="'gpu_mem_limit' must be a number of bytes"):
        gpu_settings(config, model_options(config))


def test_the_gpu_check_takes_the_newest_version_folder(tmp_path: Path) -> None:
    from onnxserve.benchmarks.gpu_check import _model_file

    for folder in ("2", "10", "\u00b2", "09", "\u0669\u0669"):
        (tmp_path / "m" / folder).mkdir(parents=True)
    assert _model_file(tmp_path, "m") == tmp_path / "m" / "10" / "model.onnx"


def test_a_header_length_of_thousands_of_digits_is_a_bad_request() -> None:
    """int() raises ValueError past 4300 digits (a 500, not a 400)."""
    with pytest.raises(InvalidInputError, match="but the body is only 10 bytes"):
        header_length("1" * 5000, 10)


@pytest.mark.parametrize("port", ["\u00b2", "\u0663\u0663", "+80", "0", "65536", "8_0"])
def test_client_ports_are_plain_numbers(port: str) -> None:
    with pytest.raises(ConnectionSettingsError, match="is not 1-65535"):
        normalize_url(f"localhost:{port}")


def test_a_parent_pid_that_is_not_a_number_is_ignored() -> None:
    code = ("import os; os.environ['ONNXSERVE_DIE_WITH_PARENT'] = '\\u00b2'; "
            "from onnxserve.serving.process import die_with_parent_if_asked; "
            "die_with_parent_if_asked(); print('alive')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "alive" in result.stdout, result.stderr


# --- the exporter refuses what the server would not serve ---------------------------------

def _card(name: str):
    from onnxserve.export.publish import ModelCard, OutputSpec

    return ModelCard(name, "x", "FP32", [4], [OutputSpec("y", "FP32", [2])], 8)


@pytest.mark.parametrize("name", ["../evil", "my model", ".hidden", "a/b"])
def test_publish_refuses_names_the_server_skips(tmp_path: Path, name: str) -> None:
    from onnxserve.export.publish import publish

    repository = tmp_path / "repo"
    repository.mkdir()
    with pytest.raises(ValueError, match="model name"):
        publish(repository, _card(name), b"onnx")
    assert list(tmp_path.rglob("*")) == [repository]


@pytest.mark.parametrize("version", [0, -1, MAX_VERSION + 1])
def test_publish_refuses_versions_the_server_ignores(tmp_path: Path, version: int) -> None:
    from onnxserve.export.publish import publish

    with pytest.raises(ValueError, match="expected a whole number from 1"):
        publish(tmp_path, _card("m"), b"onnx", version=version)
    assert not (tmp_path / "m").exists()


def test_publish_numbers_past_stray_folders(tmp_path: Path) -> None:
    """existing_versions used int() on every str.isdigit() folder: '²/' raised."""
    from onnxserve.export.publish import existing_versions, publish

    for folder in ("1", "\u00b2", "\u0669", "07"):
        (tmp_path / "m" / folder).mkdir(parents=True)
        (tmp_path / "m" / folder / "model.onnx").write_bytes(b"old")
    assert existing_versions(tmp_path, "m") == [1]
    assert publish(tmp_path, _card("m"), b"new") == tmp_path / "m" / "2" / "model.onnx"


def test_export_refuses_a_bad_name_before_converting(tmp_path: Path) -> None:
    from onnxserve.export import pipeline

    prepared = pipeline.Prepared(name="m", keras_model=None, samples=np.zeros((1, 4)),
                                 agreement_data=np.zeros((1, 4)), calibration=None,
                                 labels={}, max_batch_size=8, parameters={})
    with pytest.raises(pipeline.ExportError, match="model name 'my model' has ' '"):
        pipeline.export(prepared, tmp_path, name="my model")
    with pytest.raises(pipeline.ExportError, match="model name '' is empty"):
        pipeline.export(prepared, tmp_path, name="")
    with pytest.raises(pipeline.ExportError, match="version 0"):
        pipeline.export(prepared, tmp_path, version=0)
    assert list(tmp_path.iterdir()) == []


def test_a_model_named_after_its_file_gets_a_name_the_server_serves(tmp_path: Path) -> None:
    import keras

    from onnxserve.export import pipeline

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "my model.v2.keras"
    model.save(path)
    assert pipeline.prepare_user_model(path).name == "my_model_v2"


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--name", "../evil", "model name '../evil' starts with '.'"),
    ("--name", "my model", "model name 'my model' has ' '"),
    ("--name", ".hidden", "model name '.hidden' starts with '.'"),
    ("--version", "\u00b2", "is not a version number"),
    ("--version", "0", "is not a version number"),
    ("--version", "-1", "is not a version number"),
])
def test_onnxserve_export_refuses_at_once(tmp_path: Path, flag: str, value: str,
                                          message: str) -> None:
    repository = tmp_path / "area" / "repo"
    result = subprocess.run(
        onnxserve_command("export", "lenet5", f"{flag}={value}", "--model-repository",
                          str(repository)),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "area").exists()
