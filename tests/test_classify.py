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


def _digit_variants(samples: Path, out: Path) -> dict[str, list[Path]]:
    """The held-out digits as users' files: a phone's sideways JPEG with an EXIF orientation
    tag, a 16-bit PNG, and a white stroke on a transparent background."""
    import numpy as np
    from PIL import Image

    made: dict[str, list[Path]] = {"exif": [], "16-bit": [], "alpha": []}
    for path in sorted(samples.glob("digit_*.png")):
        digit = Image.open(path).convert("L").resize((112, 112), Image.Resampling.BICUBIC)
        exif = Image.Exif()
        exif[0x0112] = 8  # "rotate 90 clockwise to view": stored turned the other way
        target = out / f"exif_{path.stem}.jpg"
        digit.transpose(Image.Transpose.ROTATE_270).save(target, quality=95, exif=exif)
        made["exif"].append(target)
        deep = (np.asarray(digit).astype(np.uint16) * 257)
        target = out / f"deep_{path.name}"
        Image.fromarray(deep).save(target)
        made["16-bit"].append(target)
        target = out / f"alpha_{path.name}"
        Image.merge("LA", (Image.new("L", digit.size, 255), digit)).save(target)
        made["alpha"].append(target)
    return made


def test_users_image_files_reach_the_model_as_they_look(
    server: ServerProcess, samples: Path, tmp_path: Path
) -> None:
    for kind, paths in _digit_variants(samples, tmp_path).items():
        outputs = []
        for extra in ((), ("--client-preprocessing",)):
            result = classify(*map(str, paths), "--url", server.url, "--model", "lenet5",
                              "--top-k", "1", *extra)
            assert result.returncode == 0, result.stderr
            lines = result.stdout.strip().splitlines()
            predicted = [line.split()[0] for line in lines[1::2]]
            expected = [p.stem.split("_")[2] for p in paths]
            correct = sum(a == b for a, b in zip(predicted, expected, strict=True))
            assert correct >= 9, (kind, extra, predicted)
            outputs.append(result.stdout)
        # The server's decoding and the client's give the model the same numbers.
        assert outputs[0] == outputs[1], kind
