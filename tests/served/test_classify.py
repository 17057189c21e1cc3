"""`python clients/classify.py`, end to end against the real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import ROOT

from onnxserve.serving.process import ServerProcess, free_port

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
    assert "nothing listens at" in result.stderr and "connection refused" in result.stderr
    assert "Traceback" not in result.stderr


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


def test_more_files_than_the_model_batches_go_in_several_requests(
    server: ServerProcess, samples: Path, tmp_path: Path, client
) -> None:
    import shutil

    digits = sorted(samples.glob("digit_*.png"))
    for copy in range(7):  # 70 files; lenet5 takes batches of at most 64
        for path in digits:
            shutil.copy(path, tmp_path / f"{copy}_{path.name}")
    files = sorted(map(str, tmp_path.glob("*.png")))
    for extra in ((), ("--client-preprocessing",)):
        result = classify(*files, "--url", server.url, "--model", "lenet5", "--top-k", "1",
                          *extra)
        assert result.returncode == 0, result.stderr
        headers = result.stdout.splitlines()[::2]
        assert [h.split()[0] for h in headers] == files
    assert max(client.statistics("lenet5")[0]["batches"]) <= 64


def test_one_bad_file_does_not_sink_the_others(
    server: ServerProcess, samples: Path, tmp_path: Path
) -> None:
    digits = [str(p) for p in sorted(samples.glob("digit_*.png"))[:3]]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(digits[0]).read_bytes()[:60])
    files = [digits[0], str(truncated), digits[1], str(tmp_path / "missing.png"), digits[2]]
    for extra in ((), ("--client-preprocessing",)):
        result = classify(*files, "--url", server.url, "--model", "lenet5", "--top-k", "1",
                          *extra)
        assert result.returncode == 2, (extra, result.stdout, result.stderr)
        answered = [line.split()[0] for line in result.stdout.splitlines()[::2]]
        assert answered == [digits[0], digits[1], digits[2]], extra
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 2 and "Traceback" not in result.stderr
        assert f"{tmp_path / 'missing.png'}: no such file" in errors[0]
        assert f"cannot read image {truncated}" in errors[1]


def test_folders_urls_and_addresses(server: ServerProcess, samples: Path, tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    for path in sorted(samples.glob("digit_*.png"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    port = server.url.rsplit(":", 1)[1]
    result = classify(str(folder), "--url", f"grpc://127.0.0.1:{port}", "--model", "lenet5",
                      "--top-k", "1")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4 and "notes.txt" not in result.stdout
    http = classify(str(folder), "--url", f"http://127.0.0.1:{port}/", "--model", "lenet5")
    assert http.returncode == 0, http.stderr
    url = classify("https://example.com/cat.jpg", "--url", server.url, "--model", "lenet5")
    assert url.returncode == 2 and "is a URL; classify.py reads local files" in url.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "folder with no image files" in classify(str(empty), "--url", server.url).stderr
    bad = classify(str(folder), "--url", f"http://127.0.0.1:{port}/v2/models")
    assert bad.returncode == 2 and "the gRPC API has no path" in bad.stderr


def test_tls_and_token_servers(samples: Path, tmp_path: Path) -> None:
    import os

    from support.repositories import build_test_models
    from support.served import certificates, tls_server

    build_test_models(tmp_path)
    digit = str(sorted(samples.glob("digit_*.png"))[0])
    files = certificates(tmp_path)
    token = tmp_path / "token"
    token.write_text("a-long-enough-bearer-token\n")
    process, url = tls_server(tmp_path, files, "--auth-token-file", str(token))
    try:
        plain = classify(digit, "--url", url, "--model", "scores")
        assert plain.returncode == 1 and "if it serves TLS, add --ssl" in plain.stderr
        no_token = classify(digit, "--url", url, "--model", "scores", "--root-certificates",
                            str(files["ca"]))
        assert no_token.returncode == 1 and "--token-file" in no_token.stderr
        env = {**os.environ, "ONNXSERVE_URL": f"grpcs://{url}", "ONNXSERVE_ROOT_CERTIFICATES":
               str(files["ca"]), "ONNXSERVE_TOKEN_FILE": str(token)}
        # scores takes 5 floats, not images: the point is that the call got through.
        through = subprocess.run([sys.executable, str(SCRIPT), digit, "--model", "scores"],
                                 capture_output=True, text=True, timeout=120, env=env)
        assert through.returncode == 2, through.stderr
        assert "expected [batch, height, width, 1 or 3]" in through.stderr, through.stderr
    finally:
        process.stop()
