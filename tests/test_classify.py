"""`python clients/classify.py`, end to end against the real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, ServerProcess, free_port

SCRIPT = ROOT / "clients" / "classify.py"


def classify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_classifies_heldout_digits(server: ServerProcess, samples: Path) -> None:
    digits = sorted(samples.glob("digit_*.png"))
    assert len(digits) == 10
    result = classify(*map(str, digits), "--url", server.url, "--model", "lenet5", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n")
    assert len(blocks) == 10 * 4
    correct = 0
    for i, path in enumerate(digits):
        header, best, *rest = blocks[4 * i : 4 * i + 4]
        assert header.startswith(str(path)) and "(lenet5, version 1)" in header
        label, score = best.split()
        correct += label == path.name.split("_")[1]
        scores = [float(score)] + [float(line.split()[1]) for line in rest]
        assert scores == sorted(scores, reverse=True)
    assert correct >= 9


def test_unreadable_image_is_a_clear_error(server: ServerProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    result = classify(str(bad), "--url", server.url, "--model", "lenet5")
    assert result.returncode == 2
    assert "cannot read image" in result.stderr and "Traceback" not in result.stderr
    missing = classify(str(tmp_path / "missing.png"), "--url", server.url)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_unknown_model_lists_the_ready_ones(server: ServerProcess, samples: Path) -> None:
    result = classify(str(samples / "digit_0_0.png"), "--url", server.url, "--model", "nope")
    assert result.returncode == 2
    assert "model 'nope' is not ready" in result.stderr and "lenet5" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_not_up_is_a_clear_error(samples: Path) -> None:
    result = classify(str(samples / "digit_0_0.png"), "--url", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "no onnxserve server answers" in result.stderr and "Traceback" not in result.stderr


def test_photo_through_a_model_with_a_smaller_input(server: ServerProcess, samples: Path) -> None:
    # A 427x640 colour photo is resized and converted to LeNet-5's 28x28 grayscale.
    result = classify(str(samples / "china.jpg"), "--url", server.url, "--model", "lenet5",
                      "--top-k", "2")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 3


def test_server_side_decoding_matches_client_preprocessing(
    server: ServerProcess, samples: Path, client
) -> None:
    params = client.model_metadata("lenet5").parameters
    assert str(params["encoded_image_input"]).startswith("image_bytes:")  # the exporter's
    digits = [str(p) for p in sorted(samples.glob("digit_*.png"))[:4]]
    sent_as_files = classify(*digits, "--url", server.url, "--model", "lenet5")
    decoded_here = classify(*digits, "--url", server.url, "--model", "lenet5",
                            "--client-preprocessing")
    assert sent_as_files.returncode == 0 and decoded_here.returncode == 0
    assert sent_as_files.stdout == decoded_here.stdout
