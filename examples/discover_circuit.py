"""Discover the circuit of a shipped model on its task with PAHQ-accelerated ACDC, and check its faithfulness.

python examples/discover_circuit.py                       # gpt2-induction, induction, fp8
python examples/discover_circuit.py --model llama-ioi --task ioi --precision bf16
"""

import argparse

import pahq_fx
from pahq_fx import zoo
from pahq_fx.tasks import make_task

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="gpt2-induction")
parser.add_argument("--task", default="induction")
parser.add_argument("--precision", default="fp8", choices=["fp32", "fp8", "fp8_e5m2", "bf16", "fp16"])
parser.add_argument("--threshold", type=float, default=0.05)
parser.add_argument("--n", type=int, default=16)
parser.add_argument("--compile", action="store_true", help="torch.compile the patched graph (pays off on larger models)")
args = parser.parse_args()

model, tokenizer = zoo.load(args.model)
task = make_task(args.task, tokenizer, n=args.n, seed=0)
circuit = pahq_fx.discover(model, task, threshold=args.threshold, precision=args.precision, compile=args.compile)
print(circuit.summary())
for edge in sorted(circuit.edges, key=lambda e: -e.effect):
    print(f"  {edge.sender:>8} -> {edge.receiver:<12} effect {edge.effect:.4f}")
print("faithfulness:", circuit.evaluate(model, task).describe())
