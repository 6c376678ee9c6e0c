"""The step iterator: a fixed number of steps, padded batches, host tensors, exact row counts."""

from __future__ import annotations

import pytest
import torch

from recsys_mtl.data.reader import DataError, ParquetMTLDataset, steps_per_epoch
from recsys_mtl.data.synth import generate_recsys
from recsys_mtl.train.loop import SyncedIterator


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("it")
    generate_recsys(d, rows=1_000, seed=0, num_users=50, num_items=80, row_group_size=128)  # 900 train rows
    return d


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_rank_runs_the_same_steps_and_nothing_is_dropped(data, world_size):
    from recsys_mtl.data.schema import Schema

    schema, B = Schema.load(data), 100
    steps = steps_per_epoch(900, world_size, B)
    total = 0
    for rank in range(world_size):
        ds = ParquetMTLDataset(data, "train", batch_size=B, rank=rank, world_size=world_size, shuffle=True)
        assert ds.steps_per_epoch() == steps
        it = SyncedIterator(iter(ds), batch_size=B, schema=schema, num_steps=steps)
        batches = list(it)
        assert len(batches) == steps  # ranks with one batch fewer get an all-masked step
        assert all(b.batch_size == B for b in batches)  # short batches padded to one shape
        assert all(b.dense.device.type == "cpu" and b.sparse.values().device.type == "cpu" for b in batches)
        rows = [it.pop_rows() for _ in batches]
        assert rows == [int(b.label_mask.any(dim=1).sum()) if r < B else r for b, r in zip(batches, rows)]
        assert sum(rows) == ds.rank_rows
        total += sum(rows)
    assert total == 900


def test_padding_rows_are_masked_and_empty(data):
    from recsys_mtl.data.schema import Schema

    schema = Schema.load(data)
    ds = ParquetMTLDataset(data, "train", batch_size=128, shuffle=False)  # 900 = 7 x 128 + 4
    last = list(SyncedIterator(iter(ds), batch_size=128, schema=schema, num_steps=8))[-1]
    assert not last.label_mask[4:].any() and float(last.labels[4:].abs().sum()) == 0.0
    assert last.sparse.lengths().view(len(schema.sparse), 128)[:, 4:].sum() == 0  # no ids in padding rows


def test_a_data_error_is_raised_at_its_step():
    from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec

    schema = Schema(sparse=(SparseFeature("u", 4),), dense=(), tasks=(TaskSpec("t"),))

    def bad():
        raise DataError("file x, rows [0, 8): bad")
        yield  # pragma: no cover

    with pytest.raises(DataError, match="rows"):
        next(SyncedIterator(bad(), batch_size=8, schema=schema, num_steps=3))
    assert list(SyncedIterator(iter([]), batch_size=8, schema=schema, num_steps=0)) == []
