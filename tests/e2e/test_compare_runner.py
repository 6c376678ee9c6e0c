"""`recsys-mtl compare` on 2 ranks, and the summary arithmetic."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_mtl.compare import summarise
from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_summary_mean_std_and_mtl_gain() -> None:
    schema = Schema(sparse=(SparseFeature("u", 3),), dense=(), tasks=(TaskSpec("a"), TaskSpec("y", "regression")))
    runs = [
        {"model": "single_task", "tasks": {"a": {"auc": 0.70}, "y": {"mse": 1.0}}},
        {"model": "single_task", "tasks": {"a": {"auc": 0.72}, "y": {"mse": 1.2}}},
        {"model": "ple", "tasks": {"a": {"auc": 0.75}, "y": {"mse": 0.9}}},
        {"model": "ple", "tasks": {"a": {"auc": 0.77}, "y": {"mse": 0.7}}},
    ]
    t = summarise(runs, schema, ["single_task", "ple"])
    assert t["ple"]["a"]["mean"] == pytest.approx(0.76)
    assert t["ple"]["a"]["std"] == pytest.approx(0.0141421, rel=1e-4)
    assert t["ple"]["a"]["gain"] == pytest.approx(0.05)  # AUC: higher is better
    assert t["ple"]["y"]["gain"] == pytest.approx(0.3)  # MSE: single - mtl


@pytest.mark.e2e
def test_compare_two_ranks(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    data = tmp_path / "d"
    subprocess.run([str(BIN / "recsys-mtl"), "data", "synth", "recsys", "--out", str(data), "--rows", "40000"],
                   check=True, env=env, capture_output=True)
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [str(BIN / "recsys-mtl"), "compare", "--data", str(data), "--models", "mmoe,ple", "--seeds", "2",
         "--output-dir", str(out), "--nproc-per-node", "2", "--", "--steps", "6", "--batch-size", "256",
         "--expert-layer-sizes", "16", "--tower-layer-sizes", "8", "--bottom-layer-sizes", "16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 * 2 * 2  # (single_task + 2 models) x 2 seeds x 2 tasks
    assert {r["model"] for r in rows} == {"single_task", "mmoe", "ple"}
    assert {r["seed"] for r in rows} == {"0", "1"}
    assert all(0.0 < float(r["value"]) < 1.0 for r in rows)
    # different seeds really are different runs
    by_seed = {(r["model"], r["task"], r["seed"]): float(r["value"]) for r in rows}
    assert by_seed[("ple", "click", "0")] != by_seed[("ple", "click", "1")]
    md = (out / "results.md").read_text()
    assert "| ple |" in md and "click gain" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    for m in ("single_task", "mmoe", "ple"):
        assert (out / "runs" / m / "seed1" / "metrics.json").exists()
    subsets = (out / "subsets.md").read_text()
    assert "comparable" in subsets and "| ple |" in subsets
    assert (out / "subsets_like.png").read_bytes()[:4] == b"\x89PNG"
