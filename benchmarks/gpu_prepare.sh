#!/usr/bin/env bash
# Prepare the GPU check on a machine with the package index and the export extra:
# onnxruntime-gpu and the serving packages for the GPU machine's Python, and the seed
# models, all under .gpu/ (git-ignored), in folders of at most PART_MB each so that each
# can be copied on its own. See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
PART_MB=${PART_MB:-56}
OUT=.gpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. Wheels for the GPU machine's Python, unpacked into one site folder, compressed, split.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$GPU_PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/wheels" "$ORT_GPU" "grpcio==1.81.*" "grpcio-health-checking==1.81.*" \
    "grpcio-reflection==1.81.*" "protobuf==6.33.*"
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do
    "$PYTHON" -m zipfile -e "$wheel" "$work/site"
done
rm -rf "$OUT"/part* && mkdir -p "$OUT"
tar -C "$work/site" -cf - . | xz -6 -T0 > "$work/site.tar.xz"
split -b "${PART_MB}m" -d -a 2 "$work/site.tar.xz" "$work/site.tar.xz.part"
for part in "$work"/site.tar.xz.part*; do
    n=${part##*.part}
    mkdir -p "$OUT/part$n" && mv "$part" "$OUT/part$n/"
done

# 2. The seed models, exported with random weights, packed to graphs + weight statistics.
"$PYTHON" -m onnxserve.benchmarks.gpu_models prepare --repository build/gpu/repository
"$PYTHON" -m onnxserve.benchmarks.gpu_models pack --repository build/gpu/repository \
    --out "$OUT/models"
du -sh "$OUT"/*
