#!/usr/bin/env bash
# The GPU check (benchmarks/README.md): on a GPU machine without network, from the working
# tree and what benchmarks/gpu_prepare.sh put in .gpu/. Installs nothing from a network.
# Prints the summary table last; results go to $GPU_CHECK_RESULTS (default
# benchmarks/results). About 6 minutes on one H100; GPU_CHECK_BUDGET_S bounds the check.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/onnxserve-gpu/site}
PKG=/tmp/onnxserve-gpu/pkg
REPOSITORY=/tmp/onnxserve-gpu/repository
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
started=$(date +%s)

# onnxruntime-gpu and the serving packages, reassembled from the parts.
if compgen -G ".gpu/part*/site.tar.xz.part*" > /dev/null; then
    rm -rf "$SITE" && mkdir -p "$SITE"
    cat $(ls .gpu/part*/site.tar.xz.part* | sort) | xz -d | tar -x -C "$SITE"
fi
# This working tree as the onnxserve package, without installing it.
rm -rf "$PKG" && mkdir -p "$PKG/onnxserve"
touch "$PKG/onnxserve/__init__.py"
for part in serving protos clients export benchmarks; do ln -s "$PWD/$part" "$PKG/onnxserve/$part"; done
export PYTHONPATH="$SITE:$PKG${PYTHONPATH:+:$PYTHONPATH}"
# CUDA 13 and cuDNN 9 from the nvidia-* wheels of the machine's Python, where it has them.
nvidia_libs=$("$PYTHON" - <<'PY' || true
import pathlib
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = {str(p.parent) for root in nvidia.__path__ for p in pathlib.Path(root).rglob("lib*.so*")}
print(":".join(sorted(dirs)))
PY
)
if [ -n "$nvidia_libs" ]; then
    export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONUNBUFFERED=1
echo "== $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
"$PYTHON" -c "import onnxruntime as o; print('== onnxruntime', o.__version__, o.get_available_providers())"

rm -rf "$REPOSITORY"
"$PYTHON" -m onnxserve.benchmarks.gpu_models unpack --packed .gpu/models --out "$REPOSITORY"

echo "== GPU tests"
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/unit/runtime/test_gpu_path.py \
    -k "gpu_instance or gpu_model or cuda_mode" 2>&1 | tee /tmp/onnxserve-gpu/tests.log
set -e
export GPU_TESTS_RESULT="$(tail -n 1 /tmp/onnxserve-gpu/tests.log)"

elapsed=$(( $(date +%s) - started ))
budget=$(( ${GPU_CHECK_BUDGET_S:-450} - elapsed ))
if [ "$budget" -lt 120 ]; then budget=120; fi
"$PYTHON" -m onnxserve.benchmarks.gpu_check --repository "$REPOSITORY" \
    --results-dir "$RESULTS" --budget-s "$budget" "$@"
