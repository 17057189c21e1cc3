"""Regenerate the Python modules for the .proto files in this folder.

Run ``python -m onnxserve.protos.generate`` (needs the ``test`` extra for
grpcio-tools). protoc writes absolute imports between generated modules
(``import inference_pb2``); they are rewritten as relative imports so the
modules work inside the ``onnxserve.protos`` package.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("model_config.proto", "inference.proto")
SERVICE_FILES = ("inference.proto",)  # the files that define gRPC services
_ABSOLUTE_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on PROTO_FILES into out_dir and return the files written."""
    from grpc_tools import protoc  # test/dev dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(PROTO_DIR / name) for name in PROTO_FILES),
    ]
    grpc_args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_DIR / name) for name in SERVICE_FILES),
    ]
    for command in (args, grpc_args):
        if protoc.main(command) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(command[1:])}")
    written = sorted(
        p for p in out_dir.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    )
    for path in written:
        text = path.read_text()
        path.write_text(_ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", text))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output folder")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
