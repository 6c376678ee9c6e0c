"""End to end: the real CLI and the real torchx launch on 2 CPU ranks, learning real signal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "synth"
    _run([str(BIN / "recsys-mtl"), "data", "synth", "recsys", "--out", str(out), "--rows", "60000", "--seed", "3"])
    return out


def _check_metrics(out: Path, model: str) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == model
    assert metrics["world_size"] == 2
    assert metrics["steps"] > 0 and metrics["samples_per_s"] > 0
    assert set(metrics["tasks"]) == {"click", "like"}
    for task, m in metrics["tasks"].items():
        assert {"auc", "logloss"} <= set(m)
        assert m["auc"] > 0.65, (task, m)  # the generator puts learnable signal in both tasks
    # The per-sample predictions gathered from both ranks reproduce torchrec.metrics' global AUC,
    # and gAUC is reported by user.
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    preds = pq.read_table(out / "eval_predictions.parquet").to_pandas()
    for task, m in metrics["tasks"].items():
        rows = preds[preds[f"{task}_mask"]]
        assert roc_auc_score(rows[f"{task}_label"], rows[f"{task}_pred"]) == pytest.approx(m["auc"], abs=1e-4)
        assert 0.5 < m["gauc"] < 1.0
    util = json.loads((out / "expert_utilisation.json").read_text())
    assert set(util) == {"click", "like"} and abs(sum(util["click"]["mean"]) - 1.0) < 1e-4
    plan = (out / "sharding_plan.txt").read_text()
    assert "row_wise" in plan or "table_wise" in plan or "column_wise" in plan
    return metrics


@pytest.mark.e2e
def test_cli_train_two_ranks(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ple"
    proc = _run([str(BIN / "recsys-mtl"), "train", "--data", str(dataset), "--model", "ple", "--output-dir", str(out),
                 "--nproc-per-node", "2", "--batch-size", "512", "--epochs", "2", "--sharding", "row_wise",
                 "--expert-layer-sizes", "64,32", "--tower-layer-sizes", "16"])
    metrics = _check_metrics(out, "ple")
    assert "row_wise" in (out / "sharding_plan.txt").read_text()
    assert "click" in proc.stdout and "auc" in proc.stdout


@pytest.mark.e2e
def test_torchx_launch_stem(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "stem"
    _run([str(BIN / "torchx"), "run", "-s", "local_cwd", "launch/components.py:train", "--nnodes", "1",
          "--nproc_per_node", "2", "--rdzv_port", "29631", "--", "--data", str(dataset), "--model", "stem",
          "--preset", "quickstart", "--output-dir", str(out), "--epochs", "2"])
    _check_metrics(out, "stem")


def _copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.e2e
def test_corrupted_parquet_fails_fast_with_file_named(dataset: Path, tmp_path: Path) -> None:
    bad = _copy_dataset(dataset, tmp_path / "bad")
    part = sorted((bad / "train").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated file
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(BIN / "recsys-mtl"), "train", "--data", str(bad), "--model", "mmoe", "--output-dir",
                           str(tmp_path / "out"), "--nproc-per-node", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert str(part) in proc.stderr and "corrupted parquet" in proc.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.e2e
def test_out_of_range_id_stops_training_with_clear_error(dataset: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = _copy_dataset(dataset, tmp_path / "bad_ids")
    part = sorted((bad / "train").glob("*.parquet"))[0]
    table = pq.read_table(part)
    ids = table.column("item_id").to_numpy().copy()
    ids[5] = 10**9
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(ids, pa.int64()))
    pq.write_table(table, part, row_group_size=16_384)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(BIN / "recsys-mtl"), "train", "--data", str(bad), "--model", "mmoe", "--output-dir",
                           str(tmp_path / "out"), "--nproc-per-node", "2", "--steps", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    # The output ends with one line per failing rank; the tracebacks are in OUT/logs.
    tail = proc.stderr.strip().splitlines()[-3:]
    assert [t.split(":")[1] for t in tail[:2]] == [" data error on rank 0", " data error on rank 1"], tail
    named = [t for t in tail[:2] if "item_id" in t and str(part) in t and "first bad row 5" in t]
    assert len(named) == 1 and sum("another rank" in t for t in tail[:2]) == 1, tail
    assert "full tracebacks in" in tail[2], tail
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "logs" / "error_rank_0.log").read_text().startswith("Traceback")
    assert not (tmp_path / "out" / "metrics.json").exists()
