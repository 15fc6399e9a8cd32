"""The ``pahq-fx`` command: discover, inspect, evaluate. Bad input gives one line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from .atomic import write_text
from .errors import PahqError
from .formats import AUTO, FORMATS
from .metrics import METRICS
from .tasks import GENERATORS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .acdc import Circuit, Task
    from .acdc.scores import EdgeScores

# The registries above import no torch, so that parsing (and --help) does not either. Spelled out below, and checked
# against the runtime by tests/test_cli.py, are the choices that no user extends.
PRECISIONS = (AUTO, *FORMATS)
SPECULATIONS = ("adaptive", "kept", "removed", "off")
STORAGES = ("fp32", "bf16", "fp8")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise PahqError(f"{self.prog}: {message}")


def _stage(args: argparse.Namespace, message: str) -> None:
    """One line on stderr saying what a long run is doing before its progress bar appears (importing torch and
    transformers, the trace) and after it (the pictures). Only on a terminal: a log or a pipe gets the results alone."""
    if not args.no_progress and sys.stderr.isatty():
        print(f"pahq-fx: {message}", file=sys.stderr, flush=True)


def _load_tokenizer(name: str) -> Any:
    _quiet_libraries()  # here, not first: the checks before the model loads answer without importing transformers
    from .zoo import load_tokenizer

    return load_tokenizer(name)


def _load_model(name: str, tokenizer: object | None = None, device: torch.device | None = None) -> tuple[nn.Module, object]:
    _quiet_libraries()
    from .zoo import load

    return load(name, tokenizer, device=device)


def _device(args: argparse.Namespace) -> torch.device | None:
    """``--device`` checked before anything loads (None: the CPU, where a model loads)."""
    if args.device is None:
        return None
    from .zoo import check_device

    return check_device(args.device)


def _task_source(spec: str) -> str | Path | Task:
    """The task, checked as far as it can be without the model (before the model loads, which can take minutes):
    a generator name, a saved task (loaded), or a JSON Lines file (read and checked line by line)."""
    if spec in GENERATORS:
        return spec
    path = Path(spec)
    if path.is_dir():
        raise PahqError(
            f"task {spec!r} is a folder; give a task name ({', '.join(GENERATORS)}) or a task file (.jsonl or .safetensors)"
        )
    if path.suffix == ".jsonl":
        from .acdc.text_task import read_records

        read_records(path)
        return path
    if path.suffix or path.exists():
        from .acdc import Task

        return Task.load(path)
    raise PahqError(f"task {spec!r} is neither a task name ({', '.join(GENERATORS)}) nor a task file (.jsonl or .safetensors)")


def _checked_task(args: argparse.Namespace, source: str | Path | Task, metric: str | None = None) -> tuple[Task, Any]:
    """(task, tokenizer): the task built with the model's tokenizer (or ``--tokenizer``) alone and checked against
    ``metric``, so that its mistakes are told before the model loads; on ``--device`` where one is given."""
    from .acdc.setup import parse_metric

    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    task = _load_task(source, tokenizer, args.n, args.seed)
    if args.device is not None:
        task = task.to(args.device)
    if metric is not None:
        parse_metric(metric, task)
    return task, tokenizer


def _load_task(source: str | Path | Task, tokenizer: Any, n: int, seed: int) -> Task:
    from .acdc import Task
    from .tasks import make_task

    if isinstance(source, str):
        return make_task(source, tokenizer, n=n, seed=seed)
    if isinstance(source, Path):
        return Task.from_jsonl(source, tokenizer)
    return source


RUN_FILE = "run.json"
# What pahq-fx writes into an out folder: a folder holding any of these holds a run.
_OUTPUTS = {
    "checkpoint.json",
    "checkpoint.state.safetensors",
    "circuit.json",
    "circuit.dot",
    "circuit.png",
    "circuit.svg",
    "report.md",
    "report.json",
    "summary.md",
    "summary.json",
    "edges_vs_threshold.png",
    "faithfulness_vs_edges.png",
    "roc.png",
    "scores.json",
    "importances.json",
    "scores.md",
    "scores.tsv",
    "curve.md",
    "curve.json",
    "curve.png",
    RUN_FILE,
}


def _identity(args: argparse.Namespace, fields: tuple[str, ...]) -> dict:
    """The arguments that decide a run's results, with local paths made absolute (the same run from another folder)."""
    identity: dict = {"command": args.command}
    # --tokenizer only where given, so that a run from before the option resumes with the same identity
    for field in (*fields, *(("tokenizer",) if args.tokenizer else ())):
        value = getattr(args, field)
        if (field, value) in (("storage", "fp32"), ("receiver_inputs", None)):
            continue  # the defaults, and all there was before there was a choice: earlier runs' folders still resume
        if field in ("model", "task", "reference", "tokenizer", "scores") and isinstance(value, str) and Path(value).exists():
            value = str(Path(value).resolve())
        identity[field] = value
    return identity


def _described(identity: dict) -> str:
    return "pahq-fx " + " ".join(
        [identity.get("command", "?")]
        + [f"--{k.replace('_', '-')} {v}" for k, v in identity.items() if k != "command" and v is not None]
    )


def _check_out(out: Path, identity: dict, overwrite: bool) -> list[str]:
    """An out folder holds one run: the same arguments resume (or redo) it; another run's folder is an error naming
    that run, unless ``overwrite``. Returns the other run's files that :func:`_claim` removes (none for this run's)."""
    if out.exists() and not out.is_dir():
        raise PahqError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return []
    manifest = out / RUN_FILE
    previous = None
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
    if previous == identity:
        return []
    ours = sorted(p.name for p in out.iterdir() if p.name in _OUTPUTS or p.name.startswith("tau="))
    # A run that stopped before writing any result (a bad task, a model that does not load) left run.json alone:
    # nothing of it is lost by starting another.
    if ours and ours != [RUN_FILE] and not overwrite:
        other = f"the run of `{_described(previous)}`" if isinstance(previous, dict) else f"other results ({', '.join(ours[:4])})"
        raise PahqError(f"--out {out} already holds {other}; write this run to another folder, or pass --overwrite to replace it")
    return ours


def _claim(out: Path, identity: dict, others: list[str]) -> None:
    """Make ``out`` this run's folder (checked by :func:`_check_out`): remove another run's files, name this run."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".*.tmp"):  # the atomic writer's temporary files, left by a killed run
        if leftover.name.split(".")[1] in {n.split(".")[0] for n in _OUTPUTS}:
            leftover.unlink(missing_ok=True)
    for name in others:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            for inner in target.iterdir():
                if inner.name in _OUTPUTS and not inner.is_dir():
                    inner.unlink()
            with contextlib.suppress(OSError):
                target.rmdir()
        else:
            target.unlink(missing_ok=True)
    write_text(out / RUN_FILE, json.dumps(identity, indent=2) + "\n")


def _finite_threshold(text: str) -> float:
    """A --threshold value: a finite non-negative number (``inf`` or ``1e400`` would be written as invalid JSON)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"threshold must be a finite non-negative number, got {text!r}")
    return value


def _memory(text: str) -> str:
    """A --max-memory value, checked before anything loads: ``none`` or a size (pahq_fx.memory_size)."""
    from .memory_size import parse_bytes

    if text != "none":
        try:
            parse_bytes(text)
        except PahqError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _layers(text: str) -> list[int]:
    """A --layers value: comma-separated layer numbers."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated layer numbers, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated layer numbers (0 and up), got {text!r}")
    return layers


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _report(circuit: Circuit, agreement: float | None, model_name: str) -> tuple[dict, str]:
    s, faithfulness = circuit.stats, circuit.measured_faithfulness()
    data = {
        "model": model_name,
        "task": circuit.task,
        "precision": circuit.precision,
        "precision_note": circuit.precision_note,
        "execution": s.execution,
        "metric": circuit.metric,
        "threshold": circuit.threshold,
        "queries": s.queries,
        "wall_s": round(s.wall_s, 3),
        "queries_per_second": round(s.queries_per_second, 2),
        "peak_memory_mb": round(s.peak_memory_mb, 1),
        "compilations": s.compilations,
        "compile_s": round(s.compile_s, 3),
        "forward_s": s.forward_s,
        "forward_equivalents_per_query": round(s.forward_equivalents, 4),
        "state_bytes": s.state_bytes,
        "storage": s.storage,
        "receiver_inputs": s.receiver_inputs,
        "edges_kept": len(circuit.edges),
        "edges_total": circuit.total_edges,
        "nodes": len(circuit.nodes),
        "faithfulness": {
            "circuit": faithfulness.circuit,
            "full_model": faithfulness.full_model,
            "every_edge_patched": faithfulness.empty_circuit,
            "normalised": faithfulness.normalised,
        },
        "agreement_jaccard": agreement,
        "task_check": circuit.task_check,
        "edges": [dataclasses.asdict(e) for e in circuit.ranked_edges()],
    }
    lines = [
        f"# Circuit report: {model_name} on {circuit.task['name']}",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| precision (non-investigated heads) | {circuit.precision}"
        f"{f' ({circuit.precision_note})' if circuit.precision_note else ''} |",
        f"| execution | {s.execution} |",
        f"| state storage, receiver inputs, bytes | {s.storage}, {s.receiver_inputs}, {s.state_bytes / 2**20:.1f} MiB |",
        f"| metric, threshold | {circuit.metric}, {circuit.threshold:g} |",
        f"| edges kept | {len(circuit.edges)} / {circuit.total_edges} |",
        f"| nodes | {len(circuit.nodes)} |",
        f"| queries | {s.queries} |",
        f"| wall time | {s.wall_s:.1f} s |",
        f"| queries per second | {s.queries_per_second:.1f} |",
        f"| forward-equivalents per query | {s.forward_equivalents:.3g} (one eager forward: {s.forward_s * 1000:.2f} ms) |",
        f"| runtime state | {s.state_bytes / 2**20:.1f} MB |",
        f"| peak memory (RSS) | {s.peak_memory_mb:.0f} MB |",
        f"| compilations | {s.compilations} ({s.compile_s:.1f} s compiling) |",
        f"| metric of the circuit alone (FP32) | {faithfulness.circuit:.4g} |",
        f"| metric of the full model | {faithfulness.full_model:.4g} |",
        f"| metric with every edge patched | {faithfulness.empty_circuit:.4g} |",
        f"| normalised faithfulness (1 = full model, 0 = empty) | {faithfulness.normalised:.3f} |",
    ]
    check = circuit.task_check
    if check:
        lines.append(
            f"| task check: metric clean / every edge patched | {check['full_model']:.4g} / {check['every_edge_patched']:.4g} |"
        )
        if check["clean_accuracy"] is not None:
            lines.append(f"| clean accuracy (correct preferred to incorrect) | {check['clean_accuracy']:.0%} |")
    if agreement is not None:
        lines.append(f"| agreement with previous circuit (edge Jaccard) | {agreement:.3f} |")
    if check.get("problems"):
        lines += [
            "",
            "**WARNING: this task does not exercise the model; the circuit is likely meaningless.** "
            + "; ".join(check["problems"])
            + ".",
        ]
    return data, "\n".join(lines + _edge_table(circuit)) + "\n"


REPORT_EDGES = 100  # edges report.md lists; circuit.json and report.json hold every one


def _edge_table(circuit: Circuit) -> list[str]:
    """report.md's edge list, largest effect first, cut at :data:`REPORT_EDGES` with a count of the rest."""
    ranked = circuit.ranked_edges()
    lines = [
        "",
        "## Edges",
        "",
        f"{len(ranked)} edges, largest effect first (effect: the metric's increase when the search patched the edge).",
        "",
        "| # | sender | receiver | effect |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {i} | {e.sender} | {e.receiver} | {e.effect:.4g} |" for i, e in enumerate(ranked[:REPORT_EDGES], start=1)]
    if len(ranked) > REPORT_EDGES:
        lines += ["", f"{len(ranked) - REPORT_EDGES} more edges with smaller effects are in circuit.json and report.json."]
    return lines


def cmd_discover(args: argparse.Namespace) -> None:
    out = Path(args.out)  # every check that needs no model first: the out folder, the task, the circuit to compare
    identity = _identity(args, ("model", "task", "n", "seed", "threshold", "precision", "metric", "storage", "receiver_inputs"))
    others = _check_out(out, identity, args.overwrite)
    from .acdc import Circuit, discover
    from .acdc.checkpoint import Checkpoint

    device = _device(args)

    source = _task_source(args.task)
    previous = Circuit.load(args.compare) if args.compare else None
    checkpoint = out / "checkpoint.json"
    if not others:  # this run's folder: its checkpoint, if any, is read before the model loads
        Checkpoint(checkpoint, {}).check()
    _claim(out, identity, others)
    args.interrupted = lambda: _interrupted_discover(out)
    _stage(args, f"loading {args.model}")
    task, tokenizer = _checked_task(args, source, args.metric)  # with the tokenizer alone: a task's mistakes need no model
    model, _ = _load_model(args.model, tokenizer, device)
    _preflight(args, model, task)
    if checkpoint.exists():
        print(f"resuming from {checkpoint}", file=sys.stderr)
    _stage(args, "checking the task, then tracing, splitting and caching the model")
    # discover writes circuit.json as soon as the search ends, before the faithfulness pass (the run's peak memory),
    # and removes the checkpoint only then: a run that dies from there on has its circuit on disk.
    circuit = discover(
        model,
        task,
        threshold=args.threshold,
        metric=args.metric,
        precision=args.precision,
        checkpoint=checkpoint,
        progress=not args.no_progress,
        compile=False if args.no_compile else True if args.compile else "auto",
        allow_weak_task=args.allow_weak_task,
        faithfulness=True,
        save_to=out / "circuit.json",
        speculation=args.speculation,
        storage=args.storage,
        receiver_inputs=args.receiver_inputs,
    )
    write_text(out / "circuit.dot", circuit.to_dot())
    agreement = circuit.jaccard(previous) if previous is not None else None
    data, markdown = _report(circuit, agreement, args.model)
    write_text(out / "report.json", json.dumps(data, indent=2) + "\n")
    write_text(out / "report.md", markdown)
    pictures = ["circuit.png", "circuit.svg"]
    _stage(args, "drawing the circuit")
    circuit.draw(*(out / name for name in pictures), top_k=args.draw_top_k, min_effect=args.draw_min_effect)
    print(circuit.summary())
    print(circuit.measured_faithfulness().describe())
    written = ["circuit.json", "circuit.dot", *pictures, "report.md", "report.json"]
    print(f"wrote {', '.join(written)} to {out}")


def _interrupted_discover(out: Path) -> str:
    """What an interrupted ``discover`` left, and that the same command takes it from there."""
    checkpoint, circuit = out / "checkpoint.json", out / "circuit.json"
    if checkpoint.exists():
        return f"interrupted; the finished receivers are in {checkpoint}: run the same command again to resume from them"
    if circuit.exists():
        return (
            f"interrupted; the circuit is complete in {circuit}, its pictures or report may be missing: run the "
            "same command again to redo them"
        )
    return "interrupted before the search began: run the same command again to start it"


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PahqError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise PahqError("--thresholds names no threshold")
    bad = [t for t in text.split(",") if t.strip() and not (math.isfinite(float(t)) and float(t) >= 0)]
    if bad:
        raise PahqError(f"--thresholds must be finite non-negative numbers, got {bad[0].strip()!r}")
    return values


def cmd_sweep(args: argparse.Namespace) -> None:
    thresholds = _thresholds(args.thresholds)
    out = Path(args.out)
    identity = _identity(
        args,
        ("model", "task", "n", "seed", "thresholds", "precision", "metric", "reference", "storage", "receiver_inputs"),
    )
    others = _check_out(out, identity, args.overwrite)
    from .acdc import sweep
    from .acdc.sweep_plots import plot_sweep

    device = _device(args)
    source = _task_source(args.task)
    _claim(out, identity, others)
    args.interrupted = (
        f"interrupted; the circuits of the thresholds finished are in {out}/tau=*/circuit.json (a "
        "sweep keeps no checkpoint): the same command starts the sweep again"
    )
    _stage(args, f"loading {args.model}")
    task, tokenizer = _checked_task(args, source, args.metric)
    model, _ = _load_model(args.model, tokenizer, device)
    _preflight(args, model, task)
    _stage(args, "checking the task, then tracing, splitting and caching the model once for every threshold")
    result = sweep(
        model,
        task,
        thresholds,
        metric=args.metric,
        precision=args.precision,
        reference=args.reference,
        progress=not args.no_progress,
        allow_weak_task=args.allow_weak_task,
        compile=False if args.no_compile else True if args.compile else "auto",
        save_to=out,
        storage=args.storage,
        receiver_inputs=args.receiver_inputs,
    )
    written = result.save(out) + plot_sweep(result, out) + [result.mib.plot(out / "curve.png")]
    print(result.table())
    print(f"wrote {len(written)} files to {out}: {', '.join(sorted({p.name for p in written}))}")


def _preflight(args: argparse.Namespace, model: nn.Module, task: Task) -> None:
    """Refuse a run whose plan does not fit the memory before anything is traced (pahq_fx.acdc.plan.preflight);
    under ``--storage auto``, take the most exact storage and receiver inputs that fit (pahq_fx.acdc.plan.choose_storage,
    which refuses where none does)."""
    from .acdc.plan import STORED, choose_storage, preflight

    speculative = getattr(args, "speculation", "off") != "off"  # candidate batches hold memory of their own
    if args.storage == "auto":
        if args.max_memory == "none":
            args.storage, args.receiver_inputs = "fp32", args.receiver_inputs or STORED
            print(
                f"storage auto: fp32, {args.receiver_inputs} inputs (--max-memory none: no plan to choose from)", file=sys.stderr
            )
            return
        args.storage, args.receiver_inputs, note = choose_storage(
            model,
            task,
            max_memory=args.max_memory,
            assume=args.assume,
            receiver_inputs=args.receiver_inputs,
            speculation=speculative,
        )
        print(note, file=sys.stderr)  # the plan it chose fits: choose_storage refuses where none does
        return
    if args.max_memory == "none":
        return
    inputs = args.receiver_inputs or STORED
    preflight(
        model,
        task,
        max_memory=args.max_memory,
        storage=args.storage,
        assume=args.assume,
        receiver_inputs=inputs,
        speculation=speculative,
    )


def cmd_plan(args: argparse.Namespace) -> None:
    from .acdc import plan as planning

    check = args.max_memory != "none"
    if not check:
        args.max_memory = None
    if args.config:
        from transformers import AutoConfig

        if args.batch is None or args.seq is None:
            raise PahqError("--config needs --batch and --seq (the task's prompts and tokens per prompt)")
        if not Path(args.config).exists() and (Path(args.config).suffix == ".json" or args.config.startswith((".", "/", "~"))):
            raise PahqError(f"--config {args.config}: no such file or folder")
        try:
            config = AutoConfig.from_pretrained(args.config)
        except (ValueError, KeyError) as error:
            raise PahqError(f"--config {args.config} is not a Hugging Face configuration: {str(error).splitlines()[0]}") from None
        result = planning.plan_from_config(
            config,
            args.batch,
            args.seq,
            positions=args.positions,
            device=args.device or "cpu",
            max_memory=args.max_memory,
            storage=args.storage,
            assume=args.assume,
            name=args.config,
            receiver_inputs=args.receiver_inputs or "stored",
            speculation=args.speculation != "off",
        )
    else:
        if not args.task:
            raise PahqError("plan --model needs --task")
        device = _device(args)
        source = _task_source(args.task)
        _stage(args, f"loading {args.model}")
        task, tokenizer = _checked_task(args, source, args.metric)
        model, _ = _load_model(args.model, tokenizer, device)
        _stage(args, "planning" + (": tracing, caching and timing a few queries per layer" if not args.no_calibrate else ""))
        result = planning.plan(
            model,
            task,
            metric=args.metric,
            precision=args.precision,
            max_memory=args.max_memory,
            storage=args.storage,
            calibrate=not args.no_calibrate,
            queries_per_role=args.queries_per_role,
            layers=args.layers,
            assume=args.assume,
            check=False,
            receiver_inputs=args.receiver_inputs or "stored",
            speculation=args.speculation != "off",
        )
        result = dataclasses.replace(result, model=args.model)
    print(result.describe(), end="")
    if args.json:
        planning.write_json(result, args.json)
        print(f"wrote {args.json}")
    if check:
        result.check()


def cmd_inspect(args: argparse.Namespace) -> None:
    from .front_door import transform

    model, _ = _load_model(args.model)
    transformed = transform(model, precision="fp32", compile=False)
    graph = transformed.head_graph
    print(f"model {args.model}: {type(model).__name__}")
    print(graph.describe())
    from .acdc import EdgeGraph

    print(f"  {len(EdgeGraph(graph).edges())} edges; senders: {' '.join(graph.senders())}")


def cmd_scores(args: argparse.Namespace) -> None:
    out = Path(args.out)
    identity = _identity(args, ("model", "task", "n", "seed", "metric"))
    others = _check_out(out, identity, args.overwrite)
    source = _task_source(args.task)
    device = _device(args)
    _claim(out, identity, others)
    _stage(args, f"loading {args.model}")
    task, tokenizer = _checked_task(args, source, args.metric)
    model, _ = _load_model(args.model, tokenizer, device)
    from .acdc.scores import edge_scores

    _stage(args, "checking the task, then tracing, splitting and caching the model")
    scores = edge_scores(model, task, metric=args.metric, progress=not args.no_progress, allow_weak_task=args.allow_weak_task)
    written = _write_scores(scores, out, args.top)
    print(scores.summary())
    print(scores.table(limit=min(args.top, 10)), end="")
    print(f"wrote {', '.join(written)} to {out}")


def _write_scores(scores: EdgeScores, out: Path, top: int) -> list[str]:
    """scores.json (pahq_fx), importances.json (EAP-IG's layout, where the graph fits it), scores.tsv (every edge)
    and scores.md (the top edges), most important first."""
    scores.save(out / "scores.json")
    written = ["scores.json"]
    if scores.eap_config is not None:
        write_text(out / "importances.json", json.dumps(scores.to_eap_json()) + "\n")
        written.append("importances.json")
    write_text(out / "scores.tsv", scores.table("tsv"))
    write_text(out / "scores.md", f"# Edge scores\n\n{scores.summary()}\n\n{scores.table(limit=top)}")
    return [*written, "scores.tsv", "scores.md"]


def _evaluate_curve(args: argparse.Namespace) -> None:
    """MIB's faithfulness curves, CPR and CMD, of a score file's edge scores (or of exact scores computed here)."""
    if args.out is None:
        raise PahqError("evaluate --curve needs --out (a folder for curve.md, curve.json, curve.png)")
    from .acdc.scores import load_scores

    scores = load_scores(args.scores) if args.scores else None
    out = Path(args.out)
    identity = _identity(args, ("model", "task", "n", "seed", "metric", "scores", "curve"))
    others = _check_out(out, identity, args.overwrite)
    device = _device(args)
    source = _task_source(args.task)
    _claim(out, identity, others)
    task, tokenizer = _checked_task(args, source, args.metric)
    model, _ = _load_model(args.model, tokenizer, device)
    from .acdc.mib import mib_evaluate

    result, scores = mib_evaluate(
        model,
        task,
        scores,
        metric=args.metric,
        progress=not args.no_progress,
        allow_weak_task=args.allow_weak_task,
        source=args.scores or "",
    )
    written = [p.name for p in result.save(out)]
    if not args.scores:
        written += _write_scores(scores, out, 50)
    print(result.table(), end="")
    print(f"wrote {', '.join(written)} to {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    if args.curve and args.circuit:
        raise PahqError("evaluate --curve reads edge scores (--scores), not --circuit: run the two separately")
    if not args.curve and (args.scores or args.out or args.overwrite):
        raise PahqError("--scores, --out and --overwrite go with --curve; evaluate --circuit writes nothing")
    if args.curve:
        return _evaluate_curve(args)
    if args.circuit is None:
        raise PahqError("evaluate needs --circuit (or --curve, for the faithfulness curve of edge scores)")
    from .acdc import load_circuit

    device = _device(args)
    circuit = load_circuit(args.circuit)
    metric = args.metric or circuit.metric
    task, tokenizer = _checked_task(args, _task_source(args.task), metric)
    model, _ = _load_model(args.model, tokenizer, device)
    faithfulness = circuit.evaluate(model, task, metric)
    print(f"{len(circuit.edges)}/{circuit.total_edges} edges; {faithfulness.describe()}")


def _memory_arguments(parser: argparse.ArgumentParser, *, run: bool = True) -> None:
    """--max-memory, --assume and --storage; a run (discover, sweep) may also leave the storage to the plan."""
    parser.add_argument(
        "--max-memory",
        default=None,
        type=_memory,
        help="memory the run may use, e.g. 20GiB or 80GB (default: the device's free memory plus the "
        "model's weights on it; 'none' skips the check)",
    )
    parser.add_argument(
        "--assume",
        default="bound",
        choices=("bound", "dense"),
        help="check the peak bound, which a search at any threshold stays under (default), or a dense circuit's peak",
    )
    parser.add_argument(
        "--storage",
        default="fp32",
        choices=STORAGES + (("auto",) if run else ()),
        help="how the runtime stores its caches and the senders' outputs: fp32 (exact; default), bf16 (half the "
        "bytes) or fp8 (a quarter, a scale per row)"
        + (
            "; auto: the most exact one whose planned peak fits --max-memory (with --receiver-inputs, unless given)"
            if run
            else ""
        ),
    )
    parser.add_argument(
        "--receiver-inputs",
        default=None,
        choices=("stored", "recomputed"),
        help="stored: every receiver's FP32 input kept in the state (default); recomputed: rebuilt from the removed and "
        "kept edges when a query reaches it, a smaller state for some time per query (the same circuit to round-off)",
    )


def _loading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        help="device to run on: cpu (default), cuda, cuda:1, mps...; checked before the model loads. FP8 needs a GPU that has it",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder, shipped model name or hub id to use instead of the model's own")


def _drawn_edges(text: str) -> int | None:
    """A --draw-top-k value: a positive count, or ``all``."""
    return None if text == "all" else _count(text)


def _drawing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--draw-top-k",
        type=_drawn_edges,
        default=50,
        help="edges the picture draws, those of largest effect (default 50; 'all'); the note under it counts the rest",
    )
    parser.add_argument(
        "--draw-min-effect",
        type=_finite_threshold,
        default=0.0,
        help="draw only edges whose effect is at least this large (default 0)",
    )


def _metric_help() -> str:
    return "what the search keeps small: " + "; ".join(f"{m.value}: {m.help}" for m in METRICS.values())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pahq-fx", description="PAHQ-accelerated ACDC circuit discovery")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("discover", help="discover a circuit and write circuit.json/.dot, report.md/.json")
    d.add_argument("--model", required=True, help="shipped model name, local checkpoint directory or hub id")
    d.add_argument(
        "--task",
        required=True,
        help="task name, a JSON Lines file of prompt pairs (.jsonl), or a saved task (.safetensors); the names: "
        + "; ".join(f"{t.name}: {t.help}" for t in GENERATORS.values()),
    )
    d.add_argument("--threshold", required=True, type=_finite_threshold)
    d.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="format of the heads not under investigation; auto: a few queries timed in each format at the "
        "start, a low-precision one chosen where it is 1.15x faster than fp32",
    )
    d.add_argument(
        "--speculation",
        default="off",
        choices=SPECULATIONS,
        help="batch a receiver's queries on predicted decisions (the same circuit); off (default): one at a time",
    )
    d.add_argument("--metric", default="kl", choices=METRICS, help=_metric_help())
    d.add_argument("--out", required=True, help="output folder: one run's (the same command resumes it)")
    d.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    d.add_argument("--n", type=_count, default=32, help="examples to generate for a named task")
    d.add_argument("--seed", type=int, default=0, help="seed of a generated task")
    d.add_argument("--compare", help="a previous circuit.json to report agreement with")
    # Runs always checkpoint to DIR/checkpoint.json and resume from it; the flag stays for scripts that pass it.
    d.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    d.add_argument(
        "--allow-weak-task",
        action="store_true",
        help="search even when the corrupted prompts barely move the metric (the circuit would mean little)",
    )
    d.add_argument("--no-progress", action="store_true")
    compiling = d.add_mutually_exclusive_group()
    compiling.add_argument(
        "--compile", action="store_true", help="force torch.compile (default: eager, measured faster on a CPU and an H100)"
    )
    compiling.add_argument("--no-compile", action="store_true", help="run eagerly everywhere")
    _memory_arguments(d)
    _loading_arguments(d)
    _drawing_arguments(d)
    d.set_defaults(run=cmd_discover)
    w = sub.add_parser("sweep", help="circuits at several thresholds from one setup, faithfulness, ROC/AUC and plots")
    w.add_argument("--model", required=True, help="shipped model name, local checkpoint directory or hub id")
    w.add_argument("--task", required=True, help="task name, .jsonl prompt pairs or .safetensors task")
    w.add_argument("--thresholds", required=True, help="comma-separated, e.g. 0.001,0.003,0.01,0.03")
    w.add_argument("--out", required=True, help="output folder: tau=<t>/circuit.json, summary.md/.json, plots")
    w.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    w.add_argument("--precision", default="auto", choices=PRECISIONS)
    w.add_argument("--metric", default="kl", choices=METRICS)
    w.add_argument("--reference", help="circuit.json to score ROC/AUC against, or 'fp32' (sweep in FP32 too)")
    w.add_argument("--n", type=_count, default=32, help="examples to generate for a named task")
    w.add_argument("--seed", type=int, default=0, help="seed of a generated task")
    w.add_argument("--allow-weak-task", action="store_true", help="sweep even when the corrupted prompts barely move the metric")
    w.add_argument("--no-progress", action="store_true")
    sweep_compiling = w.add_mutually_exclusive_group()
    sweep_compiling.add_argument(
        "--compile", action="store_true", help="force torch.compile (default: eager, measured faster on a CPU and an H100)"
    )
    sweep_compiling.add_argument("--no-compile", action="store_true", help="run eagerly everywhere")
    _memory_arguments(w)
    _loading_arguments(w)
    w.set_defaults(run=cmd_sweep)
    p = sub.add_parser("plan", help="edges, queries, memory and time of a run before it starts; exit 2 where it cannot fit")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="shipped model name, local checkpoint directory or hub id")
    source.add_argument("--config", help="a Hugging Face config.json (or folder): plan from the sizes alone, no weights")
    p.add_argument("--task", help="task name, .jsonl prompt pairs or .safetensors task (with --model)")
    p.add_argument("--n", type=_count, default=32, help="examples to generate for a named task")
    p.add_argument("--seed", type=int, default=0, help="seed of a generated task")
    p.add_argument("--batch", type=_count, help="prompts (with --config)")
    p.add_argument("--seq", type=_count, help="tokens per prompt (with --config)")
    p.add_argument("--positions", type=_count, help="metric rows (with --config; default one per prompt)")
    p.add_argument(
        "--device",
        help="device to run on (with --model: checked before it loads) or to plan for (with --config: need not be "
        "this machine's); its free memory is the default --max-memory; default cpu",
    )
    p.add_argument("--tokenizer", help="tokenizer folder, shipped model name or hub id to use instead of the model's own")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--metric", default="kl", choices=METRICS)
    p.add_argument("--no-calibrate", action="store_true", help="memory only: no runtime is built, no query timed")
    p.add_argument("--queries-per-role", type=_count, default=2, help="calibration queries per receiver role and step")
    p.add_argument("--layers", type=_layers, help="comma-separated layers to calibrate (default every layer; others estimated)")
    p.add_argument("--json", help="write the plan as JSON to this file")
    p.add_argument("--no-progress", action="store_true")
    _memory_arguments(p, run=False)
    p.add_argument(
        "--speculation",
        default="off",
        choices=SPECULATIONS,
        help="plan for discover --speculation: candidate batches add their memory budget to the peak (off: none)",
    )
    p.set_defaults(run=cmd_plan)
    i = sub.add_parser("inspect", help="attention sites, heads, key/value groups and node counts the pass finds")
    i.add_argument("--model", required=True)
    i.set_defaults(run=cmd_inspect)
    e = sub.add_parser("evaluate", help="metric of a circuit alone next to the full model's, or MIB's faithfulness curve")
    e.add_argument(
        "--circuit",
        help="a circuit.json written by pahq_fx, or an EAP-IG / MIB graph file (.json or .pt) (without --curve)",
    )
    e.add_argument("--model", required=True)
    e.add_argument("--task", required=True)
    e.add_argument("--n", type=_count, default=32)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--metric", choices=METRICS, help="default: the circuit's or the scores' own (kl for EAP-IG files, which record none)"
    )
    e.add_argument(
        "--curve",
        action="store_true",
        help="MIB's faithfulness curves, CPR and CMD of edge scores (--scores, or exact scores computed here) into --out",
    )
    e.add_argument("--scores", help="with --curve: scores.json from pahq-fx scores, or an EAP-IG/MIB graph file")
    e.add_argument("--out", help="with --curve: folder for curve.md, curve.json, curve.png (one run's)")
    e.add_argument("--overwrite", action="store_true", help="with --curve: replace another run's results in --out")
    e.add_argument("--allow-weak-task", action="store_true", help="with --curve: evaluate even when the task barely moves it")
    e.add_argument("--no-progress", action="store_true")
    _loading_arguments(e)
    e.set_defaults(run=cmd_evaluate)
    c = sub.add_parser("scores", help="exact edge scores: each edge alone patched in the full model (MIB's exact patching)")
    c.add_argument("--model", required=True, help="shipped model name, local checkpoint directory or hub id")
    c.add_argument("--task", required=True, help="task name, .jsonl prompt pairs or .safetensors task")
    c.add_argument("--out", required=True, help="output folder: scores.json, importances.json (EAP-IG), scores.tsv, scores.md")
    c.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    c.add_argument("--metric", default="kl", choices=METRICS)
    c.add_argument("--n", type=_count, default=32, help="examples to generate for a named task")
    c.add_argument("--seed", type=int, default=0, help="seed of a generated task")
    c.add_argument("--top", type=_count, default=50, help="edges listed in scores.md (scores.tsv lists every edge)")
    c.add_argument("--allow-weak-task", action="store_true", help="score even when the corrupted prompts barely move the metric")
    c.add_argument("--no-progress", action="store_true")
    _loading_arguments(c)
    c.set_defaults(run=cmd_scores)
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal to our own output: library load notices and weight-loading bars are not for users here."""
    for name in ("torchao", "torch.utils._pytree", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _warnings_once() -> None:
    """Each warning as one line ``WARNING: ...`` on stderr, once per run however often it is raised."""
    shown: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = str(message).removeprefix("pahq_fx: ")
        if text not in shown:
            shown.add(text)
            print(f"WARNING: {text}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = None
    previous_show = warnings.showwarning
    try:
        args = build_parser().parse_args(argv)
        _warnings_once()
        args.run(args)
    except PahqError as error:
        print(f"pahq-fx: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unwritable output folder, unreadable file
        print(f"pahq-fx: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        said = getattr(args, "interrupted", "interrupted")
        print(f"pahq-fx: {said() if callable(said) else said}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous_show
    return 0


if __name__ == "__main__":
    sys.exit(main())
