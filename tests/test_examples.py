"""The examples in examples/ run and print what their docstrings and docs/api.md say."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "PahqModel(head=(1, 2)" in result.stdout
    assert "2 key/value groups" in result.stdout
    sqnr = float(result.stdout.split("SQNR vs FP32 model: ")[1].split(" dB")[0])
    assert 15 < sqnr < 80
