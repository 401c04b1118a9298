"""benchmarks/ingest.py end to end at tiny sizes: every figure measured, the JSON line last, sources cached."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ingest.py"
FIGURES = ("ingest_per_worker_vs_decode_write", "ingest_2_workers_vs_1", "flow_vs_bare_dask", "store_vs_source_ct",
           "store_vs_source_2d")
DEMO_KEY = "medpipe-demo-key-NOT-SECRET-public-never-use-for-real-data"


def run_script(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """The script in its own process, with its own Prefect home (its own embedded API server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", MEDPIPE_DEID_KEY=DEMO_KEY)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_tiny_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tiles = 12
    done = run_script(["--ct-series", "2", "--ct-size", "32", "--ct-slices", "4", "--small-files", "100",
                       "--tiles", str(tiles), "--out", str(out), "--json"], tmp_path / "prefect-home")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    for name in FIGURES:
        assert isinstance(figures[name], (int, float)) and math.isfinite(figures[name]) and figures[name] > 0, name
        assert any(line.startswith(name) for line in lines[:-1]), f"no printed line for {name}"
    assert figures["small_files"] == 100
    ct_line = next(line for line in lines if line.startswith("store_vs_source_ct "))
    assert "real CT in real-ct-dcm_qa_ct-GE/" in ct_line  # dcm_qa_ct's GE series from tests/data, not the generated CT
    # the generated sources are cached under --out, finished ones only
    assert not list(out.glob("*.partial"))
    tile_source = out / f"tiles-source-128-{tiles}"
    assert len(list(tile_source.rglob("*.png"))) == tiles
    with open(tile_source / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == tiles and {r["label"] for r in rows} <= {"none", "lesion"}
    assert all((tile_source / r["path"]).is_file() and r["path"].split("/")[0] == r["patient_id"] for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--ct-series", "0"], "--ct-series >= 1"),
    (["--small-files", "many"], "invalid int value"),
])
def test_bad_arguments_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    done = run_script([*args, "--out", str(tmp_path / "out")], tmp_path / "prefect-home")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr
    assert not (tmp_path / "out").exists()
