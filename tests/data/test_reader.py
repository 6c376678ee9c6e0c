"""Streaming reader: Arrow -> MTLBatch conversion, rank/worker splitting, bad-input errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_mtl.data import (
    DataError,
    DenseFeature,
    ParquetMTLDataset,
    Schema,
    SchemaError,
    SparseFeature,
    TaskSpec,
    arrow_to_batch,
    count_rows,
    generate_recsys,
    make_dataloader,
)
from recsys_mtl.types import MTLBatch

SMALL = dict(num_users=300, num_items=600, num_categories=10, num_tags=50)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2_000 rows (1_800 train) in files of 700 rows, row groups of 100; task 1 null unless clicked."""
    d = tmp_path_factory.mktemp("ds")
    generate_recsys(d, rows=2_000, rows_per_file=700, row_group_size=100, sample_space="cvr_after_click", **SMALL)
    return d


def _train_table(d: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted((d / "train").glob("*.parquet")))


def _reference(table: pa.Table, schema: Schema) -> dict:
    """Slow row-by-row conversion, the ground truth for the vectorised one."""
    rows = table.to_pylist()
    values, lengths = [], []
    for f in schema.sparse:  # key-major
        for r in rows:
            ids = r[f.name] if f.multi_hot else [r[f.name]]
            values.extend(ids)
            lengths.append(len(ids))
    dense = [[r[n] for n in schema.dense_names] for r in rows]
    labels = [[0.0 if r[n] is None else r[n] for n in schema.task_names] for r in rows]
    mask = [[r[n] is not None for n in schema.task_names] for r in rows]
    return dict(values=values, lengths=lengths, dense=dense, labels=labels, mask=mask)


def _assert_matches_reference(batch: MTLBatch, table: pa.Table, schema: Schema) -> None:
    ref = _reference(table, schema)
    n = table.num_rows
    assert batch.batch_size == n
    assert batch.sparse.keys() == schema.sparse_names
    assert batch.sparse.stride() == n
    assert batch.sparse.values().dtype == torch.int64
    assert batch.sparse.values().tolist() == ref["values"]
    assert batch.sparse.lengths().tolist() == ref["lengths"]
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (n, len(schema.dense))
    np.testing.assert_array_equal(batch.dense.numpy(), np.asarray(ref["dense"], np.float32).reshape(n, -1))
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (n, len(schema.tasks))
    assert batch.labels.tolist() == ref["labels"]
    assert batch.label_mask.dtype == torch.bool and batch.label_mask.tolist() == ref["mask"]


def _row_keys(batches) -> np.ndarray:
    """One float per row (dense_0 is continuous, hence unique), for coverage checks."""
    return np.concatenate([b.dense[:, 0].numpy() for b in batches]) if batches else np.zeros(0, np.float32)


# --------------------------------------------------------------------------- conversion


def test_arrow_to_batch_matches_python_reference(dataset):
    schema = Schema.load(dataset)
    table = _train_table(dataset)
    assert table["like"].null_count > 0  # the reference exercises masked labels
    _assert_matches_reference(arrow_to_batch(table.slice(0, 50), schema), table.slice(0, 50), schema)
    # sliced arrays (non-zero list offsets) and multi-chunk tables
    sliced = table.slice(613, 157)
    _assert_matches_reference(arrow_to_batch(sliced, schema), sliced, schema)
    chunked = pa.concat_tables([table.slice(5, 30), table.slice(900, 41)])
    assert chunked["item_tags"].num_chunks == 2
    _assert_matches_reference(arrow_to_batch(chunked, schema), chunked, schema)
    rb = table.slice(1_000, 64).to_batches()[0]
    _assert_matches_reference(arrow_to_batch(rb, schema), table.slice(1_000, 64), schema)
    # per-key view of the KJT
    b = arrow_to_batch(sliced, schema)
    tags = b.sparse["item_tags"]
    assert tags.lengths().tolist() == [len(x) for x in sliced["item_tags"].to_pylist()]
    assert b.sparse["user_id"].values().tolist() == sliced["user_id"].to_pylist()


def test_arrow_to_batch_no_dense_and_widened_types():
    schema = Schema(
        sparse=(SparseFeature("u", 10), SparseFeature("h", 4, multi_hot=True)),
        dense=(),
        tasks=(TaskSpec("click"), TaskSpec("time", "regression")),
    )
    t = pa.table(
        {
            "u": pa.array([1, 9, 0], pa.int32()),  # narrower ints are accepted
            "h": pa.array([[0], [], [3, 3, 1]], pa.large_list(pa.int64())),  # empty bags are fine
            "click": pa.array([True, False, None]),
            "time": pa.array([1.5, -2.0, 3.0], pa.float64()),
        }
    )
    b = arrow_to_batch(t, schema)
    assert b.dense.shape == (3, 0)
    assert b.sparse.values().tolist() == [1, 9, 0, 0, 3, 3, 1]
    assert b.sparse.lengths().tolist() == [1, 1, 1, 1, 0, 3]
    assert b.labels.tolist() == [[1.0, 1.5], [0.0, -2.0], [0.0, 3.0]]
    assert b.label_mask.tolist() == [[True, True], [True, True], [False, True]]


# --------------------------------------------------------------------------- splitting


def test_count_rows(dataset):
    assert count_rows(dataset, "train") == 1_800
    assert count_rows(dataset, "eval") == 200
    assert ParquetMTLDataset(dataset, "train", batch_size=8).num_rows == 1_800


def test_single_rank_reads_everything_in_order_with_exact_batches(dataset):
    ds = ParquetMTLDataset(dataset, "train", batch_size=64)
    batches = list(ds)
    assert [b.batch_size for b in batches] == [64] * 28 + [8]  # 1_800 = 28 * 64 + 8
    assert ds.num_batches() == 29
    table = _train_table(dataset)
    np.testing.assert_array_equal(_row_keys(batches), table["dense_0"].to_numpy())
    _assert_matches_reference(batches[10], table.slice(640, 64), Schema.load(dataset))  # spans row groups/files
    big = list(ParquetMTLDataset(dataset, "train", batch_size=250))  # spans several row groups and files
    assert [b.batch_size for b in big] == [250] * 7 + [50]
    np.testing.assert_array_equal(_row_keys(big), table["dense_0"].to_numpy())
    _assert_matches_reference(big[2], table.slice(500, 250), Schema.load(dataset))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [48, 250])  # smaller / larger than a row group
def test_ranks_cover_every_row_exactly_once(dataset, world_size, batch_size, shuffle):
    all_rows = np.sort(_train_table(dataset)["dense_0"].to_numpy())
    assert np.unique(all_rows).size == all_rows.size
    keys, sizes, counts = [], [], []
    for rank in range(world_size):
        ds = ParquetMTLDataset(dataset, "train", batch_size=batch_size, rank=rank, world_size=world_size,
                               shuffle=shuffle, shuffle_block_rows=30, shuffle_buffer_rows=200)
        batches = list(ds)
        assert all(b.batch_size == batch_size for b in batches[:-1]) and 0 < batches[-1].batch_size <= batch_size
        assert len(batches) == ds.num_batches() <= ds.steps_per_epoch()
        keys.append(_row_keys(batches))
        sizes.append(sum(b.batch_size for b in batches))
        counts.append(len(batches))
    np.testing.assert_array_equal(np.sort(np.concatenate(keys)), all_rows)  # no duplicates, none missing
    assert max(sizes) - min(sizes) <= 1  # row ranges, whatever the row-group layout
    assert max(counts) - min(counts) <= 1 and max(counts) == ds.steps_per_epoch()


def _write_layout(root: Path, group_sizes: list[list[int]]) -> np.ndarray:
    """A dataset whose train files have the given row-group sizes; returns its dense_0 keys."""
    SCHEMA.save(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    keys = []
    for i, groups in enumerate(group_sizes):
        with pq.ParquetWriter(root / "train" / f"part-{i:05d}.parquet", pa.table(_good_columns(1)).schema) as w:
            for g in groups:
                cols = _good_columns(g)
                cols["d0"] = pa.array((np.arange(g) + 1_000 * len(keys)).astype(np.float32))
                keys.append(cols["d0"].to_numpy())
                w.write_table(pa.table(cols), row_group_size=g)
    return np.concatenate(keys)


@pytest.mark.parametrize("layout", [
    [[1_000]],  # one row group
    [[10] * 13, [7, 3, 1]],  # row groups much smaller than a batch
    [[150], [1]],  # more ranks than row groups
])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_awkward_layouts_split_evenly(tmp_path, layout, world_size):
    keys = np.sort(_write_layout(tmp_path, layout))
    seen, counts = [], []
    for rank in range(world_size):
        ds = ParquetMTLDataset(tmp_path, "train", batch_size=64, rank=rank, world_size=world_size, shuffle=True)
        batches = list(ds)
        seen.append(np.concatenate([b.dense[:, 0].numpy() for b in batches]))
        counts.append(len(batches))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), keys)
    assert max(counts) - min(counts) <= 1 and max(len(x) for x in seen) - min(len(x) for x in seen) <= 1


def test_workers_split_rows_and_yield_batches(dataset):
    ref = _row_keys(list(ParquetMTLDataset(dataset, "train", batch_size=64, rank=1, world_size=2,
                                           shuffle_buffer_rows=128)))
    loader = make_dataloader(dataset, "train", batch_size=64, rank=1, world_size=2, num_workers=2,
                             shuffle_buffer_rows=128)
    assert loader.persistent_workers
    for _ in range(2):  # persistent workers survive a second epoch
        batches = list(loader)
        assert all(isinstance(b, MTLBatch) for b in batches)
        assert sum(b.batch_size < 64 for b in batches) <= 1  # only the rank's last batch is short
        assert len(batches) == loader.dataset.num_batches(num_workers=2)
        np.testing.assert_array_equal(np.sort(_row_keys(batches)), np.sort(ref))
    b = batches[0]
    assert b.sparse.keys() == Schema.load(dataset).sparse_names and b.labels.shape == (64, 2)


def test_shuffle_changes_order_per_epoch_not_content(dataset):
    def keys(epoch: int, **kw) -> np.ndarray:
        ds = ParquetMTLDataset(dataset, "train", batch_size=100, shuffle=True, seed=1, epoch=epoch,
                               shuffle_block_rows=50, shuffle_buffer_rows=400, **kw)
        return _row_keys(list(ds))

    e0, e0_again, e1 = keys(0), keys(0), keys(1)
    np.testing.assert_array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(np.sort(e0), np.sort(e1))
    stored = _train_table(dataset)["dense_0"].to_numpy()
    # Rows move across the whole split, not only inside one row group or window.
    pos = np.argsort(np.argsort(stored))[np.searchsorted(np.sort(stored), e0)]  # stored index of each row
    assert np.abs(np.diff(pos[:400])).mean() > 100
    ds = ParquetMTLDataset(dataset, "train", batch_size=100, shuffle=True, seed=1,
                           shuffle_block_rows=50, shuffle_buffer_rows=400)
    ds.set_epoch(1)
    np.testing.assert_array_equal(_row_keys(list(ds)), e1)
    # Each rank shuffles its share of the same global permutation: together they cover every row.
    halves = [_row_keys(list(ParquetMTLDataset(dataset, "train", batch_size=100, shuffle=True, seed=1, rank=r,
                                               world_size=2, shuffle_block_rows=50, shuffle_buffer_rows=400)))
              for r in range(2)]
    np.testing.assert_array_equal(np.sort(np.concatenate(halves)), np.sort(stored))


def test_invalid_arguments(dataset):
    with pytest.raises(ValueError, match="rank"):
        ParquetMTLDataset(dataset, "train", batch_size=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ParquetMTLDataset(dataset, "train", batch_size=0)
    with pytest.raises(ValueError, match="shuffle_buffer_rows"):
        ParquetMTLDataset(dataset, "train", batch_size=8, shuffle_buffer_rows=0)


# --------------------------------------------------------------------------- bad input

SCHEMA = Schema(
    sparse=(SparseFeature("user_id", 100, side="user"), SparseFeature("tags", 20, multi_hot=True)),
    dense=(DenseFeature("d0"),),
    tasks=(TaskSpec("click"), TaskSpec("like")),
    user_id_feature="user_id",
)


def _good_columns(n: int = 300) -> dict[str, pa.Array]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4, n)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return {
        "user_id": pa.array(rng.integers(0, 100, n), pa.int64()),
        "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 20, offsets[-1]), pa.int64())),
        "d0": pa.array(rng.standard_normal(n).astype(np.float32)),
        "click": pa.array((rng.random(n) < 0.3).astype(np.float32)),
        "like": pa.array((rng.random(n) < 0.1).astype(np.float32)),
    }


def _write_dataset(root: Path, columns: dict[str, pa.Array] | None = None) -> Path:
    SCHEMA.save(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(_good_columns()), root / "train" / "part-00000.parquet", row_group_size=100)
    if columns is not None:
        pq.write_table(pa.table(columns), root / "train" / "part-00001.parquet", row_group_size=100)
    return root / "train" / "part-00001.parquet"


def _with(**changes) -> dict[str, pa.Array]:
    cols = _good_columns()
    for k, v in changes.items():
        if v is None:
            del cols[k]
        else:
            cols[k] = v
    return cols


def _set(arr: pa.Array, row: int, value) -> pa.Array:
    values = arr.to_pylist()
    values[row] = value
    return pa.array(values, arr.type)


def _read_all(root: Path, **kw) -> list[MTLBatch]:
    return list(ParquetMTLDataset(root, "train", batch_size=64, **kw))


def test_good_files_read_cleanly(tmp_path):
    _write_dataset(tmp_path, _good_columns())
    assert sum(b.batch_size for b in _read_all(tmp_path)) == 600


@pytest.mark.parametrize(
    "columns, column, message, rows",
    [
        (_with(d0=None), "d0", "missing dense column", "[0, 300)"),
        (_with(tags=None), "tags", "missing sparse column", "[0, 300)"),
        (_with(like=None), "like", "missing label column", "[0, 300)"),
        (_with(user_id=pa.array([str(i) for i in range(300)])), "user_id", "type string, expected int64", "[0, 300)"),
        (_with(user_id=pa.array(np.arange(300) / 3.0)), "user_id", "type double, expected int64", "[0, 300)"),
        (_with(tags=pa.array(np.arange(300), pa.int64())), "tags", "expected list<int64>", "[0, 300)"),
        (_with(d0=pa.array(["x"] * 300)), "d0", "dense column has type string", "[0, 300)"),
    ],
)
def test_schema_violations_fail_at_construction(tmp_path, columns, column, message, rows):
    path = _write_dataset(tmp_path, columns)
    with pytest.raises(DataError) as e:
        ParquetMTLDataset(tmp_path, "train", batch_size=64)
    msg = str(e.value)
    assert str(path) in msg and f"column {column!r}" in msg and message in msg and rows in msg, msg


@pytest.mark.parametrize(
    "column, value, row, message",
    [
        ("user_id", 100, 237, "id outside [0, 100)"),
        ("user_id", -1, 5, "id outside [0, 100)"),
        ("user_id", None, 150, "null in sparse column"),
        ("tags", [1, 25], 99, "id outside [0, 20)"),
        ("tags", None, 120, "null in sparse column"),
        ("tags", [3, None], 201, "null id inside a list"),
        ("d0", float("nan"), 42, "NaN/inf in dense column"),
        ("d0", float("inf"), 299, "NaN/inf in dense column"),
        ("d0", None, 1, "null in dense column"),
        ("click", float("nan"), 180, "NaN/inf label"),
        ("like", float("-inf"), 3, "NaN/inf label"),
        ("click", 0.5, 250, "binary label not in {0, 1}"),
    ],
)
def test_bad_values_name_file_column_and_rows(tmp_path, column, value, row, message):
    path = _write_dataset(tmp_path, _with(**{column: _set(_good_columns()[column], row, value)}))
    ds = ParquetMTLDataset(tmp_path, "train", batch_size=64)  # footers are fine
    with pytest.raises(DataError) as e:
        list(ds)
    msg = str(e.value)
    start = row // 100 * 100  # row groups of 100 rows, each read (and checked) as one piece
    end = start + 100
    assert str(path) in msg and f"column {column!r}" in msg and message in msg, msg
    assert f"rows [{start}, {end})" in msg and f"first bad row {row}" in msg, msg


def test_arrow_to_batch_validates_with_source_and_offset():
    cols = _good_columns()
    cols["user_id"] = _set(cols["user_id"], 7, 1_000)
    with pytest.raises(DataError, match=re.escape("f.parquet, column 'user_id', rows [500, 800)")) as e:
        arrow_to_batch(pa.table(cols), SCHEMA, source="f.parquet", row_offset=500)
    assert "first bad row 507" in str(e.value)
    assert isinstance(e.value, SchemaError)
    arrow_to_batch(pa.table(cols), SCHEMA, validate=False)  # the caller's choice


def test_truncated_file(tmp_path):
    path = _write_dataset(tmp_path, _good_columns())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(f"{path}: unreadable or corrupted parquet file")):
        ParquetMTLDataset(tmp_path, "train", batch_size=64)


def test_corrupted_page_data_names_file_and_row_group(tmp_path):
    _write_dataset(tmp_path)
    path = tmp_path / "train" / "part-00000.parquet"
    pq.write_table(pa.table(_good_columns()), path, row_group_size=100, compression="snappy")
    data = bytearray(path.read_bytes())
    md = pq.ParquetFile(path).metadata
    col = md.row_group(1).column(2)  # d0's chunk in row group 1
    start = col.data_page_offset
    data[start + 20 : start + col.total_compressed_size] = b"\xff" * (col.total_compressed_size - 20)
    path.write_bytes(bytes(data))
    ds = ParquetMTLDataset(tmp_path, "train", batch_size=64)  # the footer is intact
    with pytest.raises(DataError) as e:
        list(ds)
    msg = str(e.value)
    assert str(path) in msg and "rows [100, 200) (row group 1): cannot decode parquet data" in msg, msg


def test_empty_and_zero_byte_files(tmp_path):
    _write_dataset(tmp_path)
    empty = tmp_path / "train" / "part-00001.parquet"
    pq.write_table(pa.table(_good_columns()).slice(0, 0), empty)
    with pytest.raises(DataError, match=re.escape(f"{empty}: empty parquet file (0 rows)")):
        ParquetMTLDataset(tmp_path, "train", batch_size=64)
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{empty}: unreadable or corrupted parquet file")):
        ParquetMTLDataset(tmp_path, "train", batch_size=64)


def test_missing_split_or_files(tmp_path):
    SCHEMA.save(tmp_path)
    with pytest.raises(DataError, match="split directory not found"):
        ParquetMTLDataset(tmp_path, "train", batch_size=8)
    (tmp_path / "eval").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'eval'}: no parquet files in split 'eval'")):
        make_dataloader(tmp_path, "eval", batch_size=8, rank=0, world_size=1)
    with pytest.raises(DataError, match="no parquet files"):
        count_rows(tmp_path, "eval")
    with pytest.raises(SchemaError, match="schema file not found"):
        ParquetMTLDataset(tmp_path / "nowhere", "train", batch_size=8)
