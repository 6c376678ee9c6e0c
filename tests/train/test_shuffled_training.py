"""Training order: a split stored sorted by user id trains as well as the same rows stored shuffled,
because the trainer shuffles every epoch (a global block permutation plus a shuffle buffer); in the
stored order (``shuffle=False``) the sorted split trains measurably worse, so the check has teeth."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multirank import run_ranks


def _train_three(root: str) -> dict:
    from recsys_mtl.config import ModelConfig, TrainConfig
    from recsys_mtl.train.loop import train

    out = {}
    for name, data, shuffle in [("shuffled", "data", True), ("sorted", "sorted", True),
                                ("sorted_stored_order", "sorted", False)]:
        cfg = TrainConfig(
            data=f"{root}/{data}", output_dir=f"{root}/out_{name}", batch_size=256, epochs=2, shuffle=shuffle,
            eval_outputs=False, log_every=10**9,
            model=ModelConfig(name="mmoe", embedding_dim=8, expert_layer_sizes=(32,), tower_layer_sizes=(16,),
                              num_experts=2),
        )
        r = train(cfg)
        out[name] = {"auc": {t: m["auc"] for t, m in r["tasks"].items()}, "rows_seen": r["rows_seen"]}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from recsys_mtl.data.synth import generate_recsys

    root = tmp_path_factory.mktemp("order")
    schema = generate_recsys(root / "data", rows=40_000, seed=1, num_users=2_000, num_items=3_000)
    sorted_dir = root / "sorted"
    shutil.copytree(root / "data", sorted_dir)
    table = pa.concat_tables(pq.read_table(f) for f in sorted((root / "data" / "train").glob("*.parquet")))
    for f in (sorted_dir / "train").glob("*.parquet"):
        f.unlink()
    # As real logs are stored: sorted by user, in several row groups.
    pq.write_table(table.sort_by(schema.user_id_feature), sorted_dir / "train" / "part-00000.parquet",
                   row_group_size=4_096)
    return run_ranks(_train_three, 1, str(root), timeout=600)[0]


@pytest.mark.multirank
def test_user_sorted_split_trains_as_well_as_a_shuffled_one(results):
    for task, auc in results["shuffled"]["auc"].items():
        assert auc > 0.65, results  # it learned
        assert abs(results["sorted"]["auc"][task] - auc) < 0.01, results  # within run-to-run noise
    # Without the shuffle, the sorted split is worse: the test distinguishes the two orders.
    assert results["sorted_stored_order"]["auc"]["click"] < results["sorted"]["auc"]["click"] - 0.01, results
    for r in results.values():
        assert r["rows_seen"] == [36_000, 36_000]
