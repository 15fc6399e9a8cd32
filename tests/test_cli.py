"""The pahq-fx command end to end in a subprocess, and every error path (one line, exit code 2)."""

import io
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import pahq_fx
from pahq_fx import cli

SCRIPT = Path(sys.executable).with_name("pahq-fx")


def run(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "pahq_fx.cli"]
    return subprocess.run([*command, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)


def test_discover_writes_circuit_and_report(tmp_path):
    first = tmp_path / "first"
    result = run(
        "discover",
        "--model",
        "gpt2-induction",
        "--task",
        "induction",
        "--n",
        "8",
        "--threshold",
        "0.05",
        "--precision",
        "fp8",
        "--out",
        str(first),
        "--no-compile",
    )
    assert result.returncode == 0, result.stderr
    assert "ACDC" in result.stderr  # the progress bar
    assert "pahq-fx: loading" not in result.stderr  # stage lines go to a terminal only
    circuit = pahq_fx.Circuit.load(first / "circuit.json")
    assert circuit.precision == "fp8" and circuit.edges
    assert (first / "circuit.dot").read_text().count("[label=") == len(circuit.edges)
    report = json.loads((first / "report.json").read_text())
    assert report["edges_kept"] == len(circuit.edges) and report["queries"] == circuit.stats.queries
    assert report["faithfulness"]["full_model"] == pytest.approx(0.0, abs=1e-6)
    assert "| edges kept |" in (first / "report.md").read_text()

    second = tmp_path / "second"
    result = run(
        "discover",
        "--model",
        "gpt2-induction",
        "--task",
        "induction",
        "--n",
        "8",
        "--threshold",
        "0.05",
        "--precision",
        "fp32",
        "--out",
        str(second),
        "--no-compile",
        "--no-progress",
        "--compare",
        str(first / "circuit.json"),
    )
    assert result.returncode == 0, result.stderr
    agreement = json.loads((second / "report.json").read_text())["agreement_jaccard"]
    assert 0.0 <= agreement <= 1.0

    evaluated = run(
        "evaluate", "--circuit", str(first / "circuit.json"), "--model", "gpt2-induction", "--task", "induction", "--n", "8"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "circuit" in evaluated.stdout and "full model" in evaluated.stdout


def test_inspect_reports_heads_and_groups():
    result = run("inspect", "--model", "llama-ioi")
    assert result.returncode == 0, result.stderr
    assert "key/value groups" in result.stdout and "senders" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["discover", "--model", "./no-such-model", "--task", "ioi", "--threshold", "0.1", "--out", "x"], "no such directory"),
        (["discover", "--model", "gpt2-induction", "--task", "nope", "--threshold", "0.1", "--out", "x"], "neither a task name"),
        (
            ["discover", "--model", "gpt2-induction", "--task", "missing.safetensors", "--threshold", "0.1", "--out", "x"],
            "does not exist",
        ),
        (["discover", "--model", "gpt2-induction", "--task", "ioi", "--threshold", "-1", "--out", "x"], "threshold"),
        (["discover", "--model", "gpt2-induction", "--task", "ioi", "--threshold", "abc", "--out", "x"], "invalid float"),
        (
            ["discover", "--model", "gpt2-induction", "--task", "ioi", "--threshold", "0.1", "--precision", "int4", "--out", "x"],
            "invalid choice",
        ),
        (
            [
                "discover",
                "--model",
                "gpt2-induction",
                "--task",
                "induction",
                "--threshold",
                "0.1",
                "--metric",
                "logit_diff",
                "--out",
                "x",
            ],
            "needs correct_ids",
        ),
        (["evaluate", "--circuit", "missing.json", "--model", "gpt2-induction", "--task", "ioi"], "not a circuit file"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_errors_are_one_line(args, message, tmp_path):
    result = run(*[a if a != "x" else str(tmp_path / "out") for a in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_is_told_each_stage_before_and_after_the_search(tmp_path, monkeypatch):
    """On a terminal the long silent parts (loading, which imports torch and transformers; the task check and the
    trace; drawing) are announced in order around the progress bar; ``--no-progress`` keeps them quiet too."""
    args = ["discover", "--model", "gpt2-induction", "--task", "induction", "--n", "4", "--threshold", "0.05"]
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main([*args, "--out", str(tmp_path / "shown")]) == 0
    text = terminal.getvalue()
    stages = [
        text.index(line)
        for line in ("pahq-fx: loading gpt2-induction", "pahq-fx: checking the task", "ACDC", "pahq-fx: drawing the circuit")
    ]
    assert stages == sorted(stages), text
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert cli.main([*args, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "pahq-fx:" not in quiet.getvalue() and "ACDC" not in quiet.getvalue()


def test_the_parser_offers_the_registries_and_the_runtime_takes_every_choice():
    """Formats, metrics and tasks come from their registries; the choices spelled out in cli.py are checked here."""
    from pahq_fx.acdc.plan import STORAGE
    from pahq_fx.acdc.speculation import check_speculation
    from pahq_fx.acdc.storage import CODECS
    from pahq_fx.formats import AUTO, FORMATS
    from pahq_fx.metrics import METRICS
    from pahq_fx.tasks import GENERATORS

    parser = cli.build_parser()
    assert (AUTO, *FORMATS) == cli.PRECISIONS
    for speculation in cli.SPECULATIONS:  # every choice the parser offers is one discover takes
        check_speculation(speculation)
    assert tuple(s.value for s in CODECS) == cli.STORAGES == tuple(STORAGE)
    discover_help = parser._subparsers._group_actions[0].choices["discover"].format_help()
    for name in (*METRICS, *GENERATORS):
        assert name in discover_help


def test_help_and_argument_errors_import_no_torch():
    """``pahq-fx --help`` and a mistyped argument answer without the two seconds torch and transformers take."""
    check = (
        "import sys\nfrom pahq_fx import cli\ntry:\n    cli.build_parser().parse_args(['discover', '--help'])\n"
        "except SystemExit:\n    pass\nassert cli.main(['frobnicate']) == 2\nprint(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('torch', 'transformers', 'torchao')))"
    )
    result = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_public_name_resolves():
    """The package imports its names on first use: each of ``__all__`` must still be there."""
    assert set(pahq_fx.__all__) == {*pahq_fx._PUBLIC, *pahq_fx._SUBMODULES}
    # importing a submodule binds its name on the package, hiding a lazy name it shares (pahq_fx.transform)
    assert not set(pahq_fx._PUBLIC) & {m.name for m in pkgutil.iter_modules(pahq_fx.__path__)}
    for name in pahq_fx.__all__:
        assert getattr(pahq_fx, name) is not None
    assert set(pahq_fx.__all__) <= set(dir(pahq_fx))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pahq_fx.nope  # noqa: B018
