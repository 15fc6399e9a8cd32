#!/usr/bin/env bash
# The GPU measurements in one call of a lent machine (README, "On a GPU"): FP8 forward speed, whole ACDC runs
# compiled and eager, and per-query latency at GPT-2 small's shape. Each step's table goes to stdout and its JSON
# to $OUT (default benchmarks/results), so a call stopped at its time limit still returns what finished.
#
#   bash benchmarks/gpu.sh            # on a machine with torch, torchao and transformers installed
#
# Where the machine lacks packages, put their wheels in .whl/ (see /work/.library/device/README.md); they are
# installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
step() { echo; echo "### $*"; "$@" 2>&1 | grep -v "^repeat "; }

python3 - <<'PY' || exit 1
import torch, torchao, transformers
print("torch", torch.__version__, "torchao", torchao.__version__, "transformers", transformers.__version__)
print(torch.cuda.get_device_name(), "sm", torch.cuda.get_device_capability())
PY
step python3 benchmarks/profile_query.py --layers 12 --d-model 768 --heads 12 --batch 16 --seq 32 --formats fp32,fp8,bf16 --rows 12
step python3 benchmarks/acdc.py --model gpt2-induction-8h --task induction --half 32 --n 48 --threshold 0.01 --repeats 1 \
    --out "$OUT/acdc_cuda_gpt2-induction-8h.json"
step python3 benchmarks/acdc.py --model gpt2-induction-8h --task induction --half 32 --n 48 --threshold 0.01 --repeats 1 \
    --configs fp32,fp8,bf16 --compile off --out "$OUT/acdc_cuda_eager_gpt2-induction-8h.json"
step python3 benchmarks/acdc.py --model llama-ioi --task ioi --n 32 --threshold 0.05 --repeats 1 --configs auto,fp32,bf16,naive \
    --out "$OUT/acdc_cuda_llama-ioi.json"
step python3 benchmarks/forward.py --model random-gpt2:12x768x12 --task ioi --n 16 --out "$OUT/forward_cuda_random12x768x12.json"
step python3 benchmarks/forward.py --model random-gpt2:8x2048x16 --task ioi --n 256 --compile \
    --out "$OUT/forward_cuda_compiled_random8x2048x16_n256.json"
step python3 benchmarks/query_latency.py --layers 12 --d-model 768 --heads 12 --batch 16 --seq 32 --compile \
    --out "$OUT/query_latency_cuda_12x768x12_compiled.json"
