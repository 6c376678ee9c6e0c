"""Every training row is seen once per epoch on 1-4 ranks, whatever the row-group layout, and a bad
row at the very end of the split is read (and stops the job) instead of being silently skipped."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multirank import run_ranks

# name -> (total rows, row_group_size, batch size); 90% of the rows are the train split.
LAYOUTS = {
    "one_row_group": (1_100, 1_000_000, 64),
    "row_groups_smaller_than_a_batch": (1_100, 7, 64),
    "more_ranks_than_row_groups": (330, 200, 32),
    "big_and_small_row_group": (20_000, 16_384, 512),  # 16,384 + 1,616 train rows
}


def _train_layouts(root: str) -> dict:
    from recsys_mtl.config import ModelConfig, TrainConfig
    from recsys_mtl.data.reader import DataError
    from recsys_mtl.train.loop import train

    model = ModelConfig(name="shared_bottom", embedding_dim=4, bottom_layer_sizes=(8,), tower_layer_sizes=(4,))
    out = {}
    for name, (_, _, batch) in LAYOUTS.items():
        cfg = TrainConfig(data=f"{root}/{name}", output_dir=f"{root}/out_{name}", batch_size=batch, epochs=2,
                          eval_outputs=False, log_every=10**9, model=model)
        r = train(cfg)
        out[name] = {"rows_seen": r["rows_seen"], "train_rows": r["train_rows"]} if r is not None else None
    try:
        train(TrainConfig(data=f"{root}/bad_tail", output_dir=f"{root}/out_bad", batch_size=512, epochs=1,
                          eval_outputs=False, log_every=10**9, model=model))
        out["bad_tail"] = "no error"
    except DataError as e:
        out["bad_tail"] = str(e)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from recsys_mtl.data.synth import generate_recsys

    root = tmp_path_factory.mktemp("layouts")
    for name, (rows, group, _) in LAYOUTS.items():
        generate_recsys(root / name, rows=rows, seed=2, num_users=100, num_items=200, row_group_size=group)
    # The layout with one out-of-range id in the last train row (the small row group's tail).
    schema = generate_recsys(root / "bad_tail", rows=20_000, seed=2, num_users=100, num_items=200)
    (f,) = sorted((root / "bad_tail" / "train").glob("*.parquet"))
    t = pq.read_table(f)
    col = t.column("item_id").to_pylist()
    col[-1] = schema.feature("item_id").num_embeddings  # one past the table
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(col, t.schema.field("item_id").type))
    pq.write_table(t, f, row_group_size=16_384)
    return root


@pytest.mark.multirank
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rows_seen_per_epoch_equal_the_split(data, world_size):
    from recsys_mtl.data.reader import count_rows

    per_rank = run_ranks(_train_layouts, world_size, str(data), timeout=600)
    out = per_rank[0]
    for name in LAYOUTS:
        n = count_rows(data / name, "train")
        assert out[name] == {"rows_seen": [n, n], "train_rows": n}, (name, out[name])
    # The rank that reads the bad row names it; the others stop at the same step.
    errors = [r["bad_tail"] for r in per_rank]
    named = [e for e in errors if "column 'item_id'" in e and "id outside" in e]
    assert len(named) == 1 and sum("another rank" in e for e in errors) == world_size - 1, errors
