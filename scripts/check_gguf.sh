#!/usr/bin/env bash
# The real-client check of `deltatune export`: llama.cpp (through llama-cpp-python) runs the exported
# SmolLM2 GGUFs, merged and base + LoRA, and must match transformers' logits within 0.05 with the same
# greedy continuation. Installing llama-cpp-python compiles llama.cpp: many minutes on a small machine
# (CMAKE_BUILD_PARALLEL_LEVEL limits the compiler jobs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "check_gguf: installing llama-cpp-python (compiles llama.cpp)" >&2
  .venv/bin/python -m pip install -q -e ".[gguf-check]"
fi
# A missing llama_cpp fails here instead of skipping; -s shows the measured logit differences.
DELTATUNE_REQUIRE_LLAMA_CPP=1 exec .venv/bin/python -m pytest tests/test_export_gguf.py -k llama_cpp_runs -s -q "$@"
