#!/usr/bin/env bash
# The GPU benchmark in one command (no internet needed): make music_loss.kernels importable,
# run the gpu-core suite into benchmarks/results/<card>-<date>.json, render it.
# Rerunnable: --resume measures only the cases the results file does not hold yet, so a
# command cut off by a time limit is continued by running this script again.
#   bash benchmarks/gpu_core.sh            (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import music_loss.kernels" 2>/dev/null; then
  # kernels/ ships as music_loss.kernels through the package-dir mapping of an install.
  "$PY" -m pip install --no-deps --no-build-isolation -q -e . 2>/dev/null \
    || ln -sfn ../kernels music_loss/kernels   # fallback without pip/setuptools
fi
"$PY" -c "import music_loss.kernels" || { echo "music_loss.kernels does not import"; exit 1; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"

"$PY" -m benchmarks.run --device cuda --suite gpu-core --out benchmarks/results/ --resume "$@"
latest=$("$PY" -c "import torch; from benchmarks.run import output_path; \
print(output_path('benchmarks/results/', torch.device('cuda')))")
if "$PY" -c "import matplotlib" 2>/dev/null; then
  "$PY" -m benchmarks.render "$latest"
else
  "$PY" -m benchmarks.render "$latest" --no-plots   # plots: render again where matplotlib is
fi
