"""Hostile input reaching the 2-rank trainer: NaN/inf labels or dense values mid-split. Each stops
the job with a clear error and writes no metrics.json. (A split with fewer row groups than ranks is
not an error: rows are split by range, see tests/train/test_rows_seen.py.)

Reader-level cases live in tests/data/test_reader.py (NaN/inf dense values and labels, nulls,
ids out of range, missing/mistyped columns, truncated and corrupted parquet, empty files) and the
CLI's one-line errors in tests/e2e/test_cli_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multirank import run_ranks


def _train_expecting_data_errors(cases: dict[str, str], root: str) -> dict[str, str]:
    from recsys_mtl.config import ModelConfig, TrainConfig
    from recsys_mtl.data.reader import DataError
    from recsys_mtl.train.loop import train

    out = {}
    for name, data in cases.items():
        cfg = TrainConfig(data=data, output_dir=f"{root}/{name}_out", batch_size=64, epochs=1, log_every=1000,
                          checkpoint_dir=f"{root}/{name}_ck", checkpoint_every_steps=1,
                          model=ModelConfig(name="mmoe", embedding_dim=4, expert_layer_sizes=(8,),
                                            tower_layer_sizes=(4,), num_experts=2))
        try:
            train(cfg)
            out[name] = "no error"
        except DataError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict:
    from recsys_mtl.data.synth import generate_recsys

    root = tmp_path_factory.mktemp("hostile")
    bad_files = {}
    for name, column, value in (("nan_label", "like", np.nan), ("inf_dense", "dense_0", np.inf)):
        d = root / name
        generate_recsys(d, rows=1400, seed=1, num_users=40, num_items=50, rows_per_file=420, row_group_size=105)
        part = sorted((d / "train").glob("*.parquet"))[-1]
        table = pq.read_table(part)
        col = table.column(column).to_numpy(zero_copy_only=False).astype(np.float32)
        col[300] = value  # the last file, row 300: reached after some steps and checkpoints
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(col, pa.float32()))
        pq.write_table(table, part, row_group_size=105)
        bad_files[name] = part
    cases = {"nan_label": str(root / "nan_label"), "inf_dense": str(root / "inf_dense")}
    msgs = run_ranks(_train_expecting_data_errors, 2, cases, str(root))
    return {"root": root, "rank_msgs": msgs, "files": bad_files}


@pytest.mark.multirank
@pytest.mark.parametrize("case, column, what", [("nan_label", "like", "NaN/inf label"),
                                                ("inf_dense", "dense_0", "NaN/inf in dense column")])
def test_nan_or_inf_mid_training_stops_with_file_column_and_row(errors, case, column, what):
    path = errors["files"][case]
    msgs = [m[case] for m in errors["rank_msgs"]]
    mine = [m for m in msgs if str(path) in m]  # the rank that read the bad row group names it
    assert mine, msgs
    assert f"column {column!r}" in mine[0] and what in mine[0] and "first bad row 300" in mine[0], mine[0]
    assert not (errors["root"] / f"{case}_out" / "metrics.json").exists()
