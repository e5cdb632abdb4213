#!/usr/bin/env bash
# The GPU check of the fused LoRA path, prepared to run as ONE call on a GPU machine:
# the kernels' formula tests on CUDA, then the GPU benchmark (1.1B and 8B shapes, bf16).
#
#   bash scripts/gpu_check.sh "$OUT"      # writes tests.log, bench.log, benchmarks-gpu.json there
#
# That machine's python3 has torch and an older transformers, and no internet. Carry the versions
# pyproject.toml pins as wheels in .whl/ (ignored by git); this script installs them when present:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0 peft==0.21.2
# (their other requirements, huggingface-hub>=1.31, tokenizers 0.23, safetensors 0.8, were there
# in 2026-11). About 6-8 minutes on an H200; the benchmark alone is `deltatune bench --device cuda`.
# A failing test does not stop the benchmark: the one call should bring back both.
set -uo pipefail
out="${1:-gpu-check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" |
    tee -a "$out/device.txt" || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_fused_lora.py tests/test_fused_mlp.py -k cuda 2>&1 | tee "$out/tests.log"
echo "tests exit status: ${PIPESTATUS[0]}" | tee -a "$out/tests.log"
python3 -m deltatune.bench --device cuda --modes floor fused fused-layer peft --json "$out/benchmarks-gpu.json" 2>&1 |
    tee "$out/bench.log"
