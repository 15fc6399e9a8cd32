#!/usr/bin/env bash
# The GPU measurements of docs/performance.md's "On a GPU" in one call of a lent machine: the front door on the device (logits
# against the model's), the transformed model's forward per format, whole ACDC runs with the defaults against fp8 and
# the naive reference, and a compiled forward last (it did not finish inside a 9-minute call on an H100). Each step's
# table goes to stdout and its JSON to $OUT (default benchmarks/results), so a call stopped at its limit still
# returns what finished. Other steps used there: profile_query.py, query_latency.py (with and without --compile),
# acdc.py --configs auto,fp32,fp8,bf16,naive [--compile off].
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
echo; echo "### the front door on the device: transform(model, head=(1, 0)) against the model's own logits"
python3 - <<'PY'
import torch
from transformers import GPT2Config, GPT2LMHeadModel
import pahq_fx

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=512)).eval().cuda()
ids = torch.randint(0, 512, (4, 16), device="cuda")
with torch.no_grad():
    reference = model(input_ids=ids).logits
    for fmt in ("fp32", "bf16", "fp8"):
        transformed = pahq_fx.transform(model, head=(1, 0), example_inputs=ids, precision=fmt)
        out = transformed(ids)
        sqnr = 10 * torch.log10(reference.pow(2).mean() / (out - reference).pow(2).mean().clamp(min=1e-30))
        print(f"{fmt}: logits on {out.device}, SQNR {sqnr.item():.1f} dB against the model")
PY
step python3 benchmarks/forward.py --model random-gpt2:12x768x12 --task ioi --n 16 --out "$OUT/forward_cuda_random12x768x12.json"
step python3 benchmarks/forward.py --model random-gpt2:8x2048x16 --task ioi --n 256 --out "$OUT/forward_cuda_random8x2048x16_n256.json"
step python3 benchmarks/acdc.py --model gpt2-induction-8h --task induction --half 32 --n 48 --threshold 0.01 --repeats 2 \
    --configs auto,fp8,naive --out "$OUT/acdc_cuda_defaults_gpt2-induction-8h.json"
step python3 benchmarks/acdc.py --model llama-ioi --task ioi --n 32 --threshold 0.05 --repeats 2 --configs auto,fp8,naive \
    --out "$OUT/acdc_cuda_defaults_llama-ioi.json"
step python3 benchmarks/forward.py --model random-gpt2:8x2048x16 --task ioi --n 256 --compile \
    --out "$OUT/forward_cuda_compiled_random8x2048x16_n256.json"
