"""README.md says what the code does: its Python examples run, the signatures it shows are the functions' own, the
command-line table names real options, its links resolve, and its measurement tables are what benchmarks/results holds.

Fenced blocks: ```python runs (all of a document's blocks in order, in one namespace, in a temporary folder);
```python signatures lists one call signature per line, compared with ``inspect.signature`` (names, kinds,
defaults; annotations are left out); any other block (```text, ```bash) is output or shell and is not run here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# a git object name: 7 to 40 hex digits with at least one letter and one digit
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def blocks(path: Path, info: str) -> list[str]:
    return [body for tag, body in FENCE.findall(path.read_text()) if tag.strip() == info]


def signature_lines(path: Path) -> list[str]:
    return [line.strip() for block in blocks(path, "python signatures") for line in block.splitlines() if line.strip()]


def resolve(dotted: str):
    """``pahq_fx.passes.trace`` -> the object, as attribute access reads it: the shortest importable module prefix
    whose attributes lead there (``pahq_fx.passes.trace`` is the function; its module of the same name is not)."""
    parts = dotted.split(".")
    for cut in range(1, len(parts) + 1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except (ImportError, AttributeError):
            continue
        return obj
    raise ImportError(dotted)


def shown_parameters(line: str) -> list[tuple[str, str, object]]:
    """(name, kind, default) of a signature written as ``name(a, b=1, *, c='x', **options)``."""
    function = ast.parse(f"def _{line[line.index('(') :]}: pass").body[0]
    args = function.args
    shown = []
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + [ast.literal_eval(d) for d in args.defaults]
    for arg, default in zip(positional, defaults, strict=True):
        shown.append((arg.arg, "POSITIONAL_OR_KEYWORD", default))
    if args.vararg:
        shown.append((args.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        shown.append((arg.arg, "KEYWORD_ONLY", inspect.Parameter.empty if default is None else ast.literal_eval(default)))
    if args.kwarg:
        shown.append((args.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    return shown


def actual_parameters(obj) -> list[tuple[str, str, object]]:
    kinds = {inspect.Parameter.POSITIONAL_ONLY: "POSITIONAL_OR_KEYWORD"}
    return [(p.name, kinds.get(p.kind, p.kind.name), p.default) for p in inspect.signature(obj).parameters.values()]


SIGNATURES = [(path.name, line) for path in (README, *DOCS) for line in signature_lines(path)]


def test_readme_shows_signatures():
    names = {line.split("(")[0] for name, line in SIGNATURES if name == "README.md"}
    assert {"pahq_fx.transform", "pahq_fx.discover", "pahq_fx.sweep", "pahq_fx.Task"} <= names


@pytest.mark.parametrize(("document", "line"), SIGNATURES, ids=[f"{d}:{line.split('(')[0]}" for d, line in SIGNATURES])
def test_signature_matches_code(document, line):
    obj = resolve(line.split("(")[0])
    assert shown_parameters(line) == actual_parameters(obj), f"{document} shows {line}; the code has {inspect.signature(obj)}"


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = blocks(README, "python")
    assert code, "README.md has no python blocks"
    namespace: dict = {"__name__": "__readme__"}
    for block in code:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "circuit.json").exists() and (tmp_path / "circuit.png").exists()


def test_command_line_table_names_real_options():
    from pahq_fx.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `pahq-fx ")]
    assert {row.split("`")[1].split()[1] for row in rows} == set(commands)
    for row in rows:
        command = row.split("`")[1].split()[1]
        options = {o for action in commands[command]._actions for o in action.option_strings}
        shown = set(re.findall(r"`(--[a-z-]+)`", row))
        assert shown <= options, f"{command}: {shown - options} are not options"
        assert options - shown <= {"-h", "--help", "--resume"}, f"{command}: the table leaves out {options - shown}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_links_and_files_exist(path):
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"
    for result in re.findall(r"benchmarks/results/[\w.-]+\.json", text):
        assert (ROOT / result).exists(), f"{path.name} names {result}, which does not exist"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_no_commit_hashes(path):
    assert not COMMIT.findall(path.read_text()), f"{path.name} names commits; history belongs in CHANGELOG.md and git"


def test_tables_match_benchmark_results():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
