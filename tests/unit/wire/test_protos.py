"""The wire contract: generated modules are current, and field numbers match Triton's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import SUPPORT

from onnxserve.protos import generate

#: Fields onnxserve adds that Triton's protos lack (MLServer uses the same numbers).
OUR_ADDITIONS = {
    ("inference.ModelMetadataResponse", "parameters"),
    ("inference.ModelMetadataResponse.TensorMetadata", "parameters"),
}
OUR_ADDED_MESSAGES = {f"{message}.ParametersEntry" for message, _ in OUR_ADDITIONS}


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    # In a separate process: protoc inside a process that has already loaded many
    # protobuf modules has crashed here.
    subprocess.run(
        [sys.executable, "-m", "onnxserve.protos.generate", "--out", str(tmp_path)],
        check=True, capture_output=True, timeout=120,
    )
    written = [p for p in tmp_path.iterdir() if p.suffix in (".py", ".pyi")]
    assert {p.name for p in written} == {
        "inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py",
        "model_config_pb2.py", "model_config_pb2.pyi",
    }
    for fresh in written:
        committed = generate.PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run `python -m onnxserve.protos.generate`"
        )


def _dump(which: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(SUPPORT / "proto_dump.py"), which],
        capture_output=True, text=True, check=True, timeout=120,
    )
    return json.loads(result.stdout)


def test_every_field_matches_triton() -> None:
    ours, triton = _dump("ours"), _dump("tritonclient")
    mismatches = []
    for message, fields in ours.items():
        if message in OUR_ADDED_MESSAGES:
            continue
        if message not in triton:
            mismatches.append(f"{message} does not exist in Triton's protos")
            continue
        triton_numbers = {v[0]: k for k, v in triton[message].items()}
        for name, spec in fields.items():
            if (message, name) in OUR_ADDITIONS:
                clash = triton_numbers.get(spec[0])
                if clash:
                    mismatches.append(f"{message}.{name} reuses Triton's number of {clash}")
                continue
            if name not in triton[message]:
                mismatches.append(f"{message}.{name} is not in Triton's {message}")
            elif triton[message][name] != spec:
                mismatches.append(f"{message}.{name}: ours {spec}, Triton {triton[message][name]}")
    assert not mismatches, "\n".join(mismatches)


def test_every_triton_model_config_field_parses() -> None:
    # A config.pbtxt that Triton parses must parse here too (what onnxserve then does with
    # each field is serving/models/config_support.py's decision, not a parse error).
    ours, triton = _dump("ours"), _dump("tritonclient_model_config")
    missing = [f"{message}.{name}" for message, fields in triton.items()
               for name in fields if name not in ours.get(message, {})]
    assert not missing, "\n".join(missing)


def test_core_kserve_field_numbers() -> None:
    ours = _dump("ours")
    assert ours["inference.ModelInferRequest"]["raw_input_contents"][0] == 7
    assert ours["inference.ModelInferResponse"]["raw_output_contents"][0] == 6
    contents = ours["inference.InferTensorContents"]
    assert {k: v[0] for k, v in contents.items()} == {
        "bool_contents": 1, "int_contents": 2, "int64_contents": 3, "uint_contents": 4,
        "uint64_contents": 5, "fp32_contents": 6, "fp64_contents": 7, "bytes_contents": 8,
    }
    assert set(ours["inference.GRPCInferenceService"]) >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    }
