"""Regenerate the measurement tables of README.md, docs/performance.md and docs/runtime.md from benchmarks/results/.

    python benchmarks/tables.py            # rewrite the tables in place
    python benchmarks/tables.py --check    # exit 1 if a table differs from what its JSON gives (the tests run this)

A table lives between two marker comments; the opening one names the kind of table, the JSON file(s) it reads and,
optionally after ``--``, environment variables the command ran with (they are not recorded in the JSON):

    <!-- table: acdc benchmarks/results/acdc_gpt2-induction-8h.json -- PAHQ_FX_TRACE_CACHE=off -->
    ...generated...
    <!-- end table -->

Everything between the markers is generated: the table and the command that produced the JSON (rebuilt from the
JSON's recorded arguments). After a benchmark is rerun and its JSON written to the same path, run this script and
commit the JSON and the documents together. Standard library only: no torch needed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/performance.md", "docs/runtime.md")
BLOCK = re.compile(r"(<!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)
ACDC_ORDER = ("auto", "auto-spec", "fp32", "fp32-spec", "bf16", "bf16-spec", "fp16", "fp8", "fp8_e5m2", "naive", "auto-circuit")


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _acdc_command(arguments: dict, path: str, env: str) -> str:
    parts = [f"--model {arguments['model']}", f"--task {arguments['task']}"]
    if arguments.get("half"):
        parts.append(f"--half {arguments['half']}")
    parts += [
        f"--n {arguments['n']}",
        f"--threshold {arguments['threshold']:g}",
        f"--repeats {arguments['repeats']}",
        f"--configs {arguments['configs']}",
    ]
    if arguments.get("compile", "auto") != "auto":
        parts.append(f"--compile {arguments['compile']}")
    if arguments.get("peer"):
        parts.append(f"--peer {arguments['peer']}")
    if arguments.get("naive_queries"):
        parts.append(f"--naive-queries {arguments['naive_queries']}")
    return _command("benchmarks/acdc.py", parts, path, env)


def _command(script: str, parts: list[str], path: str, env: str) -> str:
    parts = [*parts, f"--out {path}"]
    return f"`{env + ' ' if env else ''}python {script} {' '.join(parts)}`"


def _measured(data: dict, env: str) -> tuple[str, str]:
    """The command's environment variables and a sentence on what the JSON was measured with. JSON written since
    benchmarks record it (``acdc.measured_with``) is authoritative; older JSON leaves both to the marker and the
    document's prose."""
    found = data.get("environment")
    if not found:
        return env, ""
    cache = found.get("PAHQ_FX_TRACE_CACHE")
    others = [part for part in env.split() if not part.startswith("PAHQ_FX_TRACE_CACHE=")]  # e.g. the thread count
    gpu = f", {found['gpu']}" if found.get("gpu") else ""
    note = (
        f" Measured with Python {found['python']}, torch {found['torch']}, torchao {found['torchao']}, transformers "
        f"{found['transformers']} on {found['cpu']} ({found['cpus']} CPUs{gpu})."
    )
    return " ".join(([f"PAHQ_FX_TRACE_CACHE={cache}"] if cache else []) + others), note


def _ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: ACDC_ORDER.index(r["config"]) if r["config"] in ACDC_ORDER else len(ACDC_ORDER))


def _forward_ms(rows: list[dict]) -> str:
    return f"{statistics.median(r['forward_s'] for r in rows) * 1000:.1f} ms"


def _evaluated(row: dict) -> str:
    return f" ({row['evaluated']})" if row.get("evaluated") and row["evaluated"] != row["queries"] else ""


def _hit_rate(row: dict) -> str:
    return "-" if row.get("hit_rate") is None else f"{row['hit_rate']:.0%}"


def query_depth(files: list[str], env: str) -> str:
    """Dense queries by receiver depth, one at a time against candidate batches (benchmarks/query_depth.py)."""
    (path,) = files
    data = _load(path)
    layers = [s["receiver"] for s in data["rows"][0]["samples"]]
    lines = [
        f"| precision | speculation | {' | '.join(layers)} | whole dense run (extrapolated) |",
        "|" + " --- |" * (len(layers) + 3),
    ]
    for row in data["rows"]:
        cells = " | ".join(f"{s['forward_equivalents']:.3f}" for s in row["samples"])
        lines.append(
            f"| {row['precision']} | {row['speculation']} | {cells} | {row['whole_run_forward_equivalents_extrapolated']:.3f} |"
        )
    arguments = data["arguments"]
    command = (
        f"OMP_NUM_THREADS={data['environment']['threads']} python benchmarks/query_depth.py --model "
        f"{arguments['model']} --task {arguments['task']} --n {arguments['n']}"
    )
    return "\n".join(lines) + (
        f"\n\nForward-equivalents per decided query; one eager forward "
        f"{data['forward_s'] * 1e3:.1f} ms; torch {data['environment']['torch']}, "
        f"{data['environment']['threads']} thread(s). Command: `{command}`"
    )


def acdc(files: list[str], env: str) -> str:
    """One whole-run benchmark (benchmarks/acdc.py): every configuration, medians over the repeats."""
    (path,) = files
    data = _load(path)
    rows = _ordered(data["results"])
    by = {r["config"]: r for r in rows}
    edges = {name: {tuple(e) for e in r["edges"]} for name, r in by.items() if r.get("edges") is not None}
    naive = by.get("naive")
    reference = "naive" if "naive" in edges else "fp32" if "fp32" in edges else None
    speculative = any(r.get("hit_rate") is not None for r in rows)
    batches = " (evaluated) | predictor hit rate" if speculative else ""
    head = (
        f"| config | precision | wall s | setup s | search s | queries{batches} "
        f"| fwd-equiv / query | peak MB | edges | Jaccard vs {reference or '-'} | wall speed-up vs naive |"
    )
    lines = [head, "|" + " --- |" * (11 + speculative)]
    for r in rows:
        name = r["config"]
        agreement = f"{_jaccard(edges[name], edges[reference]):.3f}" if reference and name in edges else "-"
        speedup = f"{naive['wall_s'] / r['wall_s']:.1f}x" if naive else "-"
        label = {"auto": "auto (defaults)", "naive": "naive (extrapolated)" if r.get("extrapolated") else "naive"}
        lines.append(
            f"| {label.get(name, name)} | {r['precision']} | {r['wall_s']:.2f} "
            f"| {r['setup_s']:.2f} | {r['search_s']:.2f} | {r['queries']}"
            + (f"{_evaluated(r)} | {_hit_rate(r)} " if speculative else " ")
            + f"| {r['forward_equivalents']:.3f} "
            f"| {r['peak_memory_mb']:.0f} | {len(edges[name]) if name in edges else '-'} | {agreement} | {speedup} |"
        )
    device = rows[0].get("device", "cpu")
    env, note = _measured(data, env)
    if naive and naive.get("extrapolated"):
        note += (
            f" The naive reference timed {naive['queries_measured']} of its queries (each a full forward with every "
            f"receiver's input rebuilt, whatever is removed) and its run is extrapolated to {naive['queries']} queries."
        )
    return "\n".join(lines) + (
        f"\n\nDevice {device}; one eager forward of the model {_forward_ms(rows)}; medians of "
        f"{data['arguments']['repeats']} fresh processes per configuration.{note} Command: "
        f"{_acdc_command(data['arguments'], path, env)}"
    )


def acdc_models(files: list[str], env: str) -> str:
    """Several models' whole runs side by side: forward-equivalents per query of each configuration."""
    datas = {path: _load(path) for path in files}
    configs = [c for c in ACDC_ORDER if any(c in {r["config"] for r in d["results"]} for d in datas.values())]
    head = (
        f"| model, task | one forward | {' | '.join(configs)} | queries | wall s: auto / naive | same circuit in every config |"
    )
    lines = [head, "|" + " --- |" * (len(configs) + 5)]
    commands = []
    for path, data in datas.items():
        arguments = data["arguments"]
        by = {r["config"]: r for r in data["results"]}
        edge_sets = {frozenset(map(tuple, r["edges"])) for r in by.values()}
        cells = [f"{by[c]['forward_equivalents']:.3f}" if c in by else "-" for c in configs]
        wall = " / ".join(f"{by[c]['wall_s']:.2f}" if c in by else "-" for c in ("auto", "naive"))
        same = f"yes ({len(next(iter(edge_sets)))} edges)" if len(edge_sets) == 1 else "no"
        lines.append(
            f"| `{arguments['model']}`, {arguments['task']} | {_forward_ms(data['results'])} | {' | '.join(cells)} "
            f"| {by['auto']['queries']} | {wall} | {same} |"
        )
        command_env, note = _measured(data, env)
        commands.append(_acdc_command(arguments, path, command_env) + note)
    return "\n".join(lines) + "\n\n(forward-equivalents per query.) Commands: " + "; ".join(commands)


def formats(files: list[str], env: str) -> str:
    """FP32 against bf16 per query on random models of several widths (benchmarks/acdc.py --configs fp32,bf16)."""
    lines = ["| model | d_model | heads | head width | fp32 | bf16 | bf16 / fp32 |", "|" + " --- |" * 7]
    commands = []
    for path in files:
        data = _load(path)
        by = {r["config"]: r for r in data["results"]}
        model = data["arguments"]["model"]
        _layers, d_model, heads = (int(x) for x in model.split(":", 1)[1].split("x"))
        fp32, bf16 = by["fp32"]["forward_equivalents"], by["bf16"]["forward_equivalents"]
        lines.append(f"| {model} | {d_model} | {heads} | {d_model // heads} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.2f} |")
        command_env, note = _measured(data, env)
        commands.append(_acdc_command(data["arguments"], path, command_env) + note)
    return "\n".join(lines) + "\n\n(forward-equivalents per query.) Commands: " + "; ".join(commands)


def query_latency(files: list[str], env: str) -> str:
    """Per-query latency by the receiver's layer (benchmarks/query_latency.py), in forward-equivalents."""
    (path,) = files
    data = _load(path)
    arguments, forward = data["arguments"], data["forward_ms"]
    layers = range(arguments["layers"])
    lines = [
        f"| format | state MB | {' | '.join(f'layer {i}' for i in layers)} | sparse, last layer | resid_post |",
        "|" + " --- |" * (arguments["layers"] + 4),
    ]
    for r in data["results"]:
        dense = r["dense_ms_by_receiver_layer"]
        cells = " | ".join(f"{dense[str(i)] / forward:.2f}" for i in layers)
        lines.append(
            f"| {r['format']} | {r['state_bytes'] / 2**20:.1f} | {cells} | {r['sparse_last_layer_ms'] / forward:.3f} "
            f"| {r['resid_post_ms'] / forward:.3f} |"
        )
    parts = [
        f"--layers {arguments['layers']}",
        f"--d-model {arguments['d_model']}",
        f"--heads {arguments['heads']}",
        f"--batch {arguments['batch']}",
        f"--seq {arguments['seq']}",
        f"--repeats {arguments['repeats']}",
        f"--formats {arguments['formats']}",
    ] + (["--compile"] if arguments.get("compile") else [])
    env, note = _measured(data, env)
    return "\n".join(lines) + (
        f"\n\nDevice {data['device']}; forward-equivalents per query (one eager forward "
        f"{forward:.1f} ms){', compiled' if arguments.get('compile') else ', eager'}.{note} Command: "
        f"{_command('benchmarks/query_latency.py', parts, path, env)}"
    )


def forward(files: list[str], env: str) -> str:
    """The transformed model's own forward against the Hugging Face model's (benchmarks/forward.py)."""
    lines = [
        "| model (prompts), format | trace s | split + lower s | HF forward ms | per-head model forward ms | ratio |",
        "|" + " --- |" * 6,
    ]
    commands = []
    for path in files:
        data = _load(path)
        arguments = data["arguments"]
        for r in data["results"]:
            lines.append(
                f"| {arguments['model']} ({arguments['n']}), {r['format']} | {r['trace_s']:.2f} | "
                f"{r['split_lower_s']:.2f} | {r['hf_forward_ms']:.1f} | {r['forward_ms']:.1f} | {r['ratio']:.2f} |"
            )
        parts = [f"--model {arguments['model']}", f"--task {arguments['task']}"]
        if arguments.get("half"):
            parts.append(f"--half {arguments['half']}")
        parts += [f"--n {arguments['n']}", f"--formats {arguments['formats']}", f"--repeats {arguments['repeats']}"]
        parts += ["--compile"] if arguments.get("compile") else []
        command_env, note = _measured(data, env)
        commands.append(_command("benchmarks/forward.py", parts, path, command_env) + note)
    return "\n".join(lines) + "\n\nCommands: " + "; ".join(commands)


def setup_phases(files: list[str], env: str) -> str:
    """Where a first discovery's setup goes (benchmarks/setup_phases.py), medians of fresh processes."""
    (path,) = files
    data = _load(path)
    arguments, medians = data["arguments"], data["medians"]
    setup = medians["setup (discover's)"]
    lines = ["| phase | seconds | share of setup |", "| --- | --- | --- |"]
    for phase, seconds in medians.items():
        if phase == "forward" or (seconds == 0.0 and phase != "setup (discover's)"):
            continue
        share = "-" if phase == "search (discover's)" else f"{seconds / setup:.0%}"
        lines.append(f"| {phase} | {seconds:.3f} | {share} |")
    parts = [f"--model {arguments['model']}", f"--task {arguments['task']}"]
    if arguments.get("half"):
        parts.append(f"--half {arguments['half']}")
    parts += [f"--n {arguments['n']}", f"--threshold {arguments['threshold']:g}", f"--repeats {arguments['repeats']}"]
    env, note = _measured(data, env)
    return "\n".join(lines) + (
        f"\n\nOne eager forward {medians['forward'] * 1000:.1f} ms; medians of "
        f"{arguments['repeats']} fresh processes, trace cache off.{note} Command: "
        f"{_command('benchmarks/setup_phases.py', parts, path, env)}"
    )


def _state_ratios(plan: dict) -> str:
    """The state's bound (caches and state, no weights or query) in FP32, and how many times smaller each stored
    format makes it: the ratio the state storage is for."""
    memory = {"fp32": plan["memory"], **plan["other_storage"]}
    state = {name: m["cache_bytes"] + m["state_bound"] for name, m in memory.items()}
    base = state["fp32"]
    stored = " / ".join(f"{base / state[f]:.2f}" for f in ("bf16", "fp8"))
    recomputed = " / ".join(f"{base / state[f + '/recomputed']:.2f}" for f in ("bf16", "fp8"))
    return f"{base / 2**30:.1f} GiB; {stored}; {recomputed}"


def plan_table(files: list[str], env: str) -> str:
    """The plan of the four MIB models on one GPU and on this CPU, in each storage format (benchmarks/plan_table.py)."""
    (path,) = files
    data = _load(path)
    lines = [
        "| model | where | edges | weights + copies | caches (FP32) | dense query | peak, dense / bound: fp32 | bf16 | fp8 "
        f"| fits in FP32 (dense / any threshold); prompts of {data['seq']} that fit "
        "| bound, receiver inputs recomputed: fp32 / bf16 / fp8 (fits any threshold in) "
        "| state bound (caches + state), FP32; x smaller in bf16 / fp8, inputs stored; recomputed |",
        "|" + " --- |" * 12,
    ]
    for r in data["rows"]:
        fits = f"{'yes' if r['fits_dense'] else 'no'} / {'yes' if r['fits_any_threshold'] else 'no'}"
        lines.append(
            f"| {r['model']} | {r['where']} ({r['max_memory_gib']:.0f} GiB) | {r['edges']:,} "
            f"| {r['weights_gib'] + r['split_copies_gib']:.1f} GiB | {r['caches_gib']:.1f} GiB | {r['query_gib']:.1f} GiB "
            f"| {r['peak_dense_gib']:.1f} / {r['peak_bound_gib']:.1f} GiB "
            f"| {r['bf16_peak_dense_gib']:.1f} / {r['bf16_peak_bound_gib']:.1f} GiB "
            f"| {r['fp8_peak_dense_gib']:.1f} / {r['fp8_peak_bound_gib']:.1f} GiB "
            f"| {fits}; {r['largest_batch_dense']} / {r['largest_batch_any_threshold']} "
            f"| {' / '.join(f'{v:.1f}' for v in r['recomputed_peak_bound_gib'].values())} GiB "
            f"({', '.join(r['recomputed_fits_any_threshold']) or 'none'}) | {_state_ratios(r['plan'])} |"
        )
    note = f"N = {data['batch']} prompts x {data['seq']} tokens. Command: `python benchmarks/plan_table.py` (`{path}`)"
    return "\n".join(lines) + "\n\n" + note


def cone_flops(files: list[str], env: str) -> str:
    """A whole run's queries in time against matrix-multiply FLOPs, per receiver layer (benchmarks/cone_flops.py)."""
    (path,) = files
    data = _load(path)
    lines = [
        "| receivers in layer | queries timed / counted | fwd-equiv / query, time | fwd-equiv / query, FLOPs | time / FLOPs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        time_eq, flop_eq = (_number(r[k], ".3f") for k in ("time_forward_equivalents", "flop_forward_equivalents"))
        lines.append(
            f"| {r['layer']} | {int(r['timed'])} / {int(r['counted'])} | {time_eq} | {flop_eq} | {_number(r['ratio'], '.2f')} |"
        )
    a = data["arguments"]
    parts = [f"--model {a['model']}", f"--task {a['task']}", *([f"--half {a['half']}"] if a.get("half") else [])]
    parts += [f"--n {a['n']}", f"--threshold {a['threshold']:g}"]
    command_env, note = _measured(data, env)
    return "\n".join(lines) + (
        f"\n\n{data['edges_kept']} edges kept; one eager forward {data['forward_s'] * 1e3:.1f} ms and "
        f"{data['forward_flops'] / 1e9:.2f} GFLOP; {data['threads']} thread(s).{note} Command: "
        f"{_command('benchmarks/cone_flops.py', parts, path, command_env)}"
    )


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def storage(files: list[str], env: str) -> str:
    """Bytes, circuits and speed per state storage format (benchmarks/storage.py)."""
    (path,) = files
    data = _load(path)
    rows = data["results"]
    base = {r["case"]: r for r in rows if r["storage"] == "fp32"}
    lines = [
        "| case (threshold) | storage | edges kept | Jaccard vs fp32 | largest effect difference | bytes after setup "
        "(fp32 / this) | bytes at the end (fp32 / this) | forward-equivalents per query | sweep ROC AUC (vs fp32's) |",
        "|" + " --- |" * 9,
    ]
    for r in rows:
        b = base[r["case"]]
        lines.append(
            f"| {r['case']} ({r['threshold']:g}) | {r['storage']} | {r['edges']}/{r['total_edges']} "
            f"| {r['jaccard_vs_fp32']:.3f} | {r['max_effect_difference']:.1e} "
            f"| {r['setup_state_bytes'] / 2**20:.1f} MiB ({b['setup_state_bytes'] / r['setup_state_bytes']:.2f}) "
            f"| {r['end_state_bytes'] / 2**20:.1f} MiB ({b['end_state_bytes'] / r['end_state_bytes']:.2f}) "
            f"| {r['forward_equivalents']:.3f} | {r['sweep_auc']:.4f} ({r['sweep_auc'] - b['sweep_auc']:+.4f}) |"
        )
    command_env, note = _measured(data, env)
    cases = ",".join(dict.fromkeys(r["case"] for r in rows))
    prefix = f"{command_env} " if command_env else ""
    return "\n".join(lines) + f"\n\nCommand: `{prefix}python benchmarks/storage.py --cases {cases}`" + note


def receiver_inputs(files: list[str], env: str) -> str:
    """Bytes, circuits and speed with receiver inputs stored or recomputed, per storage (benchmarks/receiver_inputs.py)."""
    (path,) = files
    data = _load(path)
    rows = data["results"]
    stored = {(r["threshold"], r["storage"]): r for r in rows if r["receiver_inputs"] == "stored"}
    fp32 = {r["threshold"]: r for r in rows if (r["storage"], r["receiver_inputs"]) == ("fp32", "stored")}
    lines = [
        "| threshold | storage | receiver inputs | edges kept | Jaccard vs stored | largest effect difference "
        "| bytes after setup | largest state (stored / this; fp32 stored / this) | forward-equivalents per query "
        "| seconds, setup + search (this / stored) |",
        "|" + " --- |" * 10,
    ]
    for r in rows:
        base, first = stored[(r["threshold"], r["storage"])], fp32[r["threshold"]]
        lines.append(
            f"| {r['threshold']:g} | {r['storage']} | {r['receiver_inputs']} | {r['edges']}/{r['total_edges']} "
            f"| {r.get('jaccard_vs_stored', 1.0):.3f} | {r.get('max_effect_difference', 0.0):.1e} "
            f"| {r['setup_state_bytes'] / 2**20:.1f} MiB | {r['largest_state_bytes'] / 2**20:.1f} MiB "
            f"({base['largest_state_bytes'] / r['largest_state_bytes']:.2f}; "
            f"{first['largest_state_bytes'] / r['largest_state_bytes']:.2f}) | {r['forward_equivalents']:.3f} "
            f"| {r['search_s']:.1f} ({r['search_s'] / base['search_s']:.2f}) |"
        )
    command_env, note = _measured(data, env)
    a = data["arguments"]
    parts = [
        f"--model {a['model']}",
        f"--sparse {a['sparse']:g}",
        f"--dense {a['dense']:g}",
        f"--dense-storages {a['dense_storages']}",
    ]
    return "\n".join(lines) + "\n\nCommand: " + _command("benchmarks/receiver_inputs.py", parts, path, command_env) + note


MIB_FRACTIONS_SHOWN = (0.02, 0.05, 0.1, 0.2, 0.5)


def _mib_command(data: dict, path: str, env: str) -> str:
    arguments = data["arguments"]
    parts = [
        f"--models {arguments['models']}",
        f"--metric {arguments['metric']}",
        f"--thresholds {arguments['thresholds']}",
        f"--floor {arguments['floor']:g}",
    ]
    return _command("benchmarks/mib_curves.py", parts, path, " ".join(filter(None, [f"OMP_NUM_THREADS={data['threads']}", env])))


def _mib_point(curve: dict, fraction: float) -> str:
    point = next(p for p in curve["points"] if abs(p["fraction"] - fraction) < 1e-12)
    return f"{point['faithfulness'] + 0.0:.3f} ({point['edges']})"


def mib_curves(files: list[str], env: str) -> str:
    """CPR and CMD of exact edge scores and of an ACDC sweep (all its thresholds, and every other one) per shipped
    model (benchmarks/mib_curves.py), and the faithfulness curves at a few of MIB's fractions."""
    (path,) = files
    data = _load(path)
    results = data["results"]
    swept = len(results[0]["acdc"]["thresholds"])
    lines = [
        f"| model, task | edges | exact scores: CPR | CMD | seconds | ACDC, {swept} thresholds: CPR | CMD | seconds "
        f"| ACDC, {(swept + 1) // 2} of them: CPR | CMD "
        f"| ACDC circuits (edges, by threshold from {data['arguments']['floor']:g} up) |",
        "|" + " --- |" * 11,
    ]
    for r in results:
        exact, acdc, coarse = r["exact"], r["acdc"], r["acdc"]["every_other"]
        lines.append(
            f"| `{r['model']}`, {r['task']} | {r['total_edges']} | {exact['cpr']:.3f} | {exact['cmd']:.3f} "
            f"| {exact['scores_s'] + exact['curve_s']:.1f} | {acdc['mib']['cpr']:.3f} | {acdc['mib']['cmd']:.3f} "
            f"| {acdc['sweep_s']:.1f} | {coarse['cpr']:.3f} | {coarse['cmd']:.3f} "
            f"| {', '.join(str(p['edges']) for p in acdc['points'])} |"
        )
    fractions = " | ".join(f"{f * 100:g}%" for f in MIB_FRACTIONS_SHOWN)
    lines += ["", f"| model, task | curve | {fractions} |", "|" + " --- |" * (len(MIB_FRACTIONS_SHOWN) + 2)]
    for r in results:
        curves = [(f"exact, {c['ranking']}", c) for c in r["exact"]["curves"]]
        curves += [(f"ACDC, {swept} thresholds", r["acdc"]["mib"]["curves"][0])]
        for name, curve in curves:
            cells = " | ".join(_mib_point(curve, f) for f in MIB_FRACTIONS_SHOWN)
            lines.append(f"| `{r['model']}`, {r['task']} | {name} | {cells} |")
    env, note = _measured(data, env)
    return "\n".join(lines) + (
        f"\n\nMetric {data['arguments']['metric']}, FP32, {data['threads']} thread(s), one process; seconds include "
        f"each call's setup (trace, split, caches); the second table gives faithfulness and, in brackets, edges "
        f"(after MIB's pruning for the scores, the circuit's own for ACDC).{note} "
        f"Command: {_mib_command(data, path, env)}"
    )


def mib_curves_brief(files: list[str], env: str) -> str:
    """The README's short form of :func:`mib_curves`: CPR and CMD per model, exact scores next to ACDC."""
    (path,) = files
    data = _load(path)
    lines = [
        f"| model, task | edges | CPR: exact scores | CPR: ACDC, {len(data['results'][0]['acdc']['thresholds'])} thresholds "
        "| CMD: exact scores | CMD: ACDC |",
        "|" + " --- |" * 6,
    ]
    for r in data["results"]:
        exact, acdc = r["exact"], r["acdc"]["mib"]
        lines.append(
            f"| `{r['model']}`, {r['task']} | {r['total_edges']} | {exact['cpr']:.3f} | {acdc['cpr']:.3f} "
            f"| {exact['cmd']:.3f} | {acdc['cmd']:.3f} |"
        )
    env, _ = _measured(data, env)
    return "\n".join(lines) + f"\n\nMetric {data['arguments']['metric']}, FP32. Command: {_mib_command(data, path, env)}"


KINDS = {
    "acdc": acdc,
    "query-depth": query_depth,
    "acdc-models": acdc_models,
    "formats": formats,
    "query-latency": query_latency,
    "forward": forward,
    "setup-phases": setup_phases,
    "plan-table": plan_table,
    "storage": storage,
    "cone-flops": cone_flops,
    "receiver-inputs": receiver_inputs,
    "mib-curves": mib_curves,
    "mib-curves-brief": mib_curves_brief,
}


def render(text: str) -> str:
    def replace(match: re.Match) -> str:
        spec, _, env = match.group("spec").partition(" -- ")
        kind, *files = spec.split()
        if kind not in KINDS:
            raise SystemExit(f"unknown table kind {kind!r} (known: {', '.join(KINDS)})")
        return f"{match.group(1)}{KINDS[kind](files, env.strip())}\n{match.group(4)}"

    return BLOCK.sub(replace, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report tables that differ from their JSON, change nothing")
    args = parser.parse_args()
    stale = []
    for name in DOCUMENTS:
        path = ROOT / name
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        sys.exit(f"tables differ from benchmarks/results in {', '.join(stale)}: run python benchmarks/tables.py")
    print(
        f"{'stale' if stale else 'up to date'}: {', '.join(stale) or ', '.join(DOCUMENTS)}"
        f"{'' if args.check or not stale else ' (rewritten)'}"
    )


if __name__ == "__main__":
    main()
