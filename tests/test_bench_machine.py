"""benchmarks/machine.py at tiny sizes: both scaling figures measured, printed, and the JSON line last."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "machine.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_machine_scaling_figures_are_measured_and_printed() -> None:
    done = _run("--seconds", "0.05", "--repeats", "2", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    for name in ("compute_2_processes_vs_1", "memory_2_processes_vs_1"):
        value = figures[name]
        assert math.isfinite(value) and value > 0
        assert figures[f"{name}_min"] <= value <= figures[f"{name}_max"]
        assert any(line.startswith(name) for line in lines[:-1])


def test_bad_arguments_end_in_one_line() -> None:
    done = _run("--processes", "1")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--processes >= 2" in done.stderr
