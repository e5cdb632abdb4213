#!/usr/bin/env bash
# The main job on the embedded default: LoRA fine-tuning of SmolLM2-135M-Instruct on chatterbot
# question/answer pairs (held-out loss and a sample answer before/after; adapter saved, reloaded, merged).
# Extra arguments go to `deltatune train`, e.g. `bash scripts/quickstart.sh max_steps=200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/deltatune train eval_steps=15 "$@"  # held-out loss every 15 steps: the curve in loss.png
