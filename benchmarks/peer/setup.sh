#!/usr/bin/env bash
# The auto-circuit peer lives in its own virtual environment: auto-circuit 1.0.1 needs transformer-lens 2.x,
# which needs transformers 4.x and NumPy < 2, none of which pahq_fx's environment may have.
# Same torch as ours, pinned as a constraint (pip would otherwise pull a CUDA build), and pyarrow 21 (a newer one
# needs NumPy 2 and breaks `import transformer_lens`). tracr-pypi drags in jax, which is never imported.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEER_VENV:-$here/.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
printf 'torch==2.13.0\npyarrow==21.0.0\n' > "$venv/constraints.txt"
# Unpinned, pip resolves transformer-lens 4.x and transformers 5, which auto-circuit 1.0.1 was not written for.
python -m pip install --quiet -c "$venv/constraints.txt" auto-circuit==1.0.1 "transformer-lens>=2,<3" "transformers>=4.40,<5" \
    "numpy<2" safetensors
python -c "import auto_circuit, transformer_lens, torch; print('auto-circuit peer ready: torch', torch.__version__)"
