"""Streaming parquet reader: dataset directory -> :class:`~recsys_mtl.types.MTLBatch` (docs/design.md §3).

Work is split at row granularity: the split's rows are cut into blocks (row ranges inside row
groups), put in one global order (stored, or a seeded per-epoch permutation shared by all ranks)
and split into ``world_size`` contiguous ranges whose sizes differ by at most one row. Each rank
reads its range in windows (the shuffle buffer), decoding every row group a window touches once;
see :class:`ParquetMTLDataset`.

Every record batch is validated before use (vectorised, cheap); bad input raises
:class:`DataError` naming the file, column and row range.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.schema import Schema, SchemaError
from recsys_mtl.types import MTLBatch

__all__ = [
    "DataError",
    "ParquetMTLDataset",
    "arrow_to_batch",
    "count_rows",
    "list_parquet_files",
    "make_dataloader",
    "split_rows",
    "steps_per_epoch",
    "validate_arrow",
]


class DataError(SchemaError):
    """A data file does not follow the dataset schema (or cannot be read)."""


def _where(source: str, column: str | None, row_offset: int, num_rows: int) -> str:
    col = f", column {column!r}" if column is not None else ""
    return f"{source or '<table>'}{col}, rows [{row_offset}, {row_offset + num_rows})"


def _fail(
    source: str, column: str | None, row_offset: int, num_rows: int, msg: str, bad: np.ndarray | None = None
) -> NoReturn:
    first = ""
    if bad is not None:
        idx = np.flatnonzero(bad)
        if idx.size:
            first = f" (first bad row {row_offset + int(idx[0])}, {idx.size} bad rows)"
    raise DataError(f"{_where(source, column, row_offset, num_rows)}: {msg}{first}")


# --------------------------------------------------------------------------- column checks


def _check_arrow_schema(
    arrow_schema: pa.Schema, schema: Schema, source: str, num_rows: int, row_offset: int = 0
) -> None:
    """Missing or mistyped columns (per file, from its footer)."""
    names = set(arrow_schema.names)
    for f in schema.sparse:
        if f.name not in names:
            _fail(source, f.name, row_offset, num_rows, "missing sparse column")
        t = arrow_schema.field(f.name).type
        if f.multi_hot:
            ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
            want = "list<int64>"
        else:
            ok = pa.types.is_integer(t)
            want = "int64"
        if not ok:
            _fail(source, f.name, row_offset, num_rows, f"sparse column has type {t}, expected {want}")
    for name in schema.dense_names:
        if name not in names:
            _fail(source, name, row_offset, num_rows, "missing dense column")
        t = arrow_schema.field(name).type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
            _fail(source, name, row_offset, num_rows, f"dense column has type {t}, expected float32")
    for task in schema.tasks:
        if task.name not in names:
            _fail(source, task.name, row_offset, num_rows, "missing label column")
        t = arrow_schema.field(task.name).type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)):
            _fail(source, task.name, row_offset, num_rows, f"label column has type {t}, expected float32")


def _column(data: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    col = data.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _dense_matrix(data: pa.Table | pa.RecordBatch, names: list[str]) -> np.ndarray:
    """Dense columns -> writable ``B x F`` float32 array (one Arrow call, not one per column)."""
    if not names:
        return np.zeros((data.num_rows, 0), dtype=np.float32)
    out = np.asarray(data.select(names).to_tensor(row_major=True, null_to_nan=True))  # B x F
    if out.dtype != np.float32 or not out.flags.writeable:
        out = out.astype(np.float32)
    return out


@dataclass
class _Columns:
    """Rows converted to numpy: the stage between Arrow and MTLBatch, cheap to slice and concatenate.

    Args:
        values (list[np.ndarray]): per sparse key, its ids (int64) for all rows.
        lengths (list[np.ndarray]): per sparse key, ``B`` int32 bag lengths.
        dense (np.ndarray): ``B x F`` float32.
        labels (np.ndarray): ``B x T`` float32, 0 where masked.
        mask (np.ndarray): ``B x T`` bool.
    """

    values: list[np.ndarray]
    lengths: list[np.ndarray]
    dense: np.ndarray
    labels: np.ndarray
    mask: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    def batches(self, batch_size: int) -> Iterator["_Columns"]:
        """Consecutive slices of ``batch_size`` rows (the last may be short); bag offsets are
        computed once, not per slice."""
        offsets = [np.concatenate([[0], np.cumsum(ln, dtype=np.int64)]) for ln in self.lengths]  # per key: B+1
        for start in range(0, self.num_rows, batch_size):
            stop = min(start + batch_size, self.num_rows)
            yield _Columns(
                values=[v[o[start] : o[stop]] for v, o in zip(self.values, offsets)],
                lengths=[ln[start:stop] for ln in self.lengths],
                dense=self.dense[start:stop],
                labels=self.labels[start:stop],
                mask=self.mask[start:stop],
            )

    @staticmethod
    def concat(parts: list["_Columns"]) -> "_Columns":
        if len(parts) == 1:
            return parts[0]
        return _Columns(
            values=[np.concatenate(vs) for vs in zip(*(p.values for p in parts))],
            lengths=[np.concatenate(ls) for ls in zip(*(p.lengths for p in parts))],
            dense=np.concatenate([p.dense for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            mask=np.concatenate([p.mask for p in parts]),
        )

    def to_batch(self, keys: list[str]) -> MTLBatch:
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(np.concatenate(self.values) if self.values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)),
            stride=self.num_rows,
        )  # key-major: values/lengths of key 0 for all B rows, then key 1, ...
        return MTLBatch(
            dense=torch.from_numpy(np.ascontiguousarray(self.dense)),
            sparse=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(self.labels)),
            label_mask=torch.from_numpy(np.ascontiguousarray(self.mask)),
        )


def _to_columns(
    data: pa.Table | pa.RecordBatch, schema: Schema, source: str, row_offset: int, validate: bool
) -> _Columns:
    """Converts (and optionally validates) Arrow rows; each column is read once."""
    n = data.num_rows
    _check_arrow_schema(data.schema, schema, source, n, row_offset)
    all_values, all_lengths = [], []
    for f in schema.sparse:
        arr = _column(data, f.name)
        if validate and arr.null_count:
            _fail(source, f.name, row_offset, n, "null in sparse column", np.asarray(arr.is_null()))
        if f.multi_hot:
            lengths = np.diff(np.asarray(arr.offsets)).astype(np.int32)  # B; offsets respect slicing
            flat = arr.flatten()  # respects slicing
            if validate and flat.null_count:
                bad = np.zeros(n, dtype=bool)
                bad[np.repeat(np.arange(n), lengths)[np.asarray(flat.is_null())]] = True  # id -> its row
                _fail(source, f.name, row_offset, n, "null id inside a list", bad)
        else:
            lengths = np.ones(n, dtype=np.int32)  # B
            flat = arr
        values = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        if validate and values.size:
            lo, hi = values.min(), values.max()
            if lo < 0 or hi >= f.num_embeddings:
                bad = (values < 0) | (values >= f.num_embeddings)  # per id
                if f.multi_hot:
                    rows = np.zeros(n, dtype=bool)
                    rows[np.repeat(np.arange(n), lengths)[bad]] = True  # id -> its row
                    bad = rows
                msg = f"id outside [0, {f.num_embeddings}) (min {lo}, max {hi})"
                _fail(source, f.name, row_offset, n, msg, bad)
        all_values.append(values)
        all_lengths.append(lengths)

    if validate:
        for name in schema.dense_names:
            if data.column(name).null_count:
                _fail(source, name, row_offset, n, "null in dense column", np.asarray(_column(data, name).is_null()))
    dense = _dense_matrix(data, schema.dense_names)  # B x F
    if validate:
        finite = np.isfinite(dense)  # B x F
        if not finite.all():
            j = int(np.flatnonzero(~finite.all(axis=0))[0])  # first bad column
            _fail(source, schema.dense_names[j], row_offset, n, "NaN/inf in dense column", ~finite[:, j])

    labels = np.empty((n, len(schema.tasks)), dtype=np.float32)  # B x T
    mask = np.empty((n, len(schema.tasks)), dtype=bool)  # B x T
    for t, task in enumerate(schema.tasks):
        arr = _column(data, task.name)
        valid = np.asarray(arr.is_valid()) if arr.null_count else np.ones(n, dtype=bool)
        y = arr.to_numpy(zero_copy_only=False).astype(np.float32)  # copy; nulls -> NaN
        y[~valid] = 0.0
        if validate:
            finite = np.isfinite(y)
            if not finite.all():
                _fail(source, task.name, row_offset, n, "NaN/inf label", ~finite)
            if task.kind == "binary":
                bad = valid & (y != 0.0) & (y != 1.0)
                if bad.any():
                    _fail(source, task.name, row_offset, n, "binary label not in {0, 1}", bad)
        labels[:, t], mask[:, t] = y, valid
    return _Columns(all_values, all_lengths, dense, labels, mask)


def validate_arrow(data: pa.Table | pa.RecordBatch, schema: Schema, *, source: str = "", row_offset: int = 0) -> None:
    """Checks Arrow rows against the schema; raises :class:`DataError` naming file, column, rows.

    Checks: missing/mistyped columns, nulls in sparse or dense columns, ids outside
    ``[0, num_embeddings)``, NaN/inf dense values or labels, binary labels not in {0, 1}.

    Args:
        data (pa.Table | pa.RecordBatch): rows to check.
        schema (Schema): dataset schema.
        source (str): file name for error messages.
        row_offset (int): index of ``data``'s first row within ``source``.
    """
    _to_columns(data, schema, source, row_offset, validate=True)


def arrow_to_batch(
    data: pa.Table | pa.RecordBatch,
    schema: Schema,
    *,
    source: str = "",
    row_offset: int = 0,
    validate: bool = True,
) -> MTLBatch:
    """Converts Arrow rows to an :class:`MTLBatch`, without Python loops over rows.

    Single-valued sparse columns get lengths of ones, ``list<int64>`` columns their list lengths;
    the KJT is key-major (all of key 0's lengths for the batch, then key 1's, ...), with
    ``int64`` values and ``int32`` lengths. Null labels become 0 with ``label_mask`` False.
    Narrower integer ids, ``large_list`` bags and non-float32 numeric dense/label columns are cast.

    Args:
        data (pa.Table | pa.RecordBatch): ``B`` rows with (at least) the schema's columns.
        schema (Schema): dataset schema.
        source (str): file name used in error messages.
        row_offset (int): index of ``data``'s first row within ``source``, for error messages.
        validate (bool): check values as :func:`validate_arrow` does (raises :class:`DataError`);
            column presence and types are always checked.

    Returns:
        MTLBatch: ``dense`` ``B x F`` float32, ``sparse`` KJT with ``schema.sparse_names`` keys,
        ``labels`` ``B x T`` float32, ``label_mask`` ``B x T`` bool.

    Example::

        >>> import pyarrow as pa
        >>> from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec
        >>> s = Schema(sparse=(SparseFeature("user", 10), SparseFeature("tags", 5, multi_hot=True)),
        ...            dense=(DenseFeature("d0"),), tasks=(TaskSpec("click"),))
        >>> t = pa.table({"user": pa.array([3, 7], pa.int64()),
        ...               "tags": pa.array([[1, 2], [4]], pa.list_(pa.int64())),
        ...               "d0": pa.array([0.5, 1.5], pa.float32()),
        ...               "click": pa.array([1.0, None], pa.float32())})
        >>> b = arrow_to_batch(t, s)
        >>> b.sparse.values().tolist(), b.sparse.lengths().tolist()
        ([3, 7, 1, 2, 4], [1, 1, 2, 1])
        >>> b.labels.tolist(), b.label_mask.tolist()
        ([[1.0], [0.0]], [[True], [False]])
    """
    return _to_columns(data, schema, source, row_offset, validate).to_batch(schema.sparse_names)


# --------------------------------------------------------------------------- files and work units


def list_parquet_files(dataset_dir: str | Path, split: str) -> list[Path]:
    """Sorted parquet files of ``dataset_dir/split``; raises :class:`DataError` if there are none."""
    split_dir = Path(dataset_dir) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split directory not found")
    files = sorted(p for p in split_dir.glob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{split_dir}: no parquet files in split {split!r}")
    return files


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable or corrupted parquet file: {e}") from e


@dataclass(frozen=True)
class _Unit:
    """One row group: the unit of work split across ranks and workers."""

    file: int
    row_group: int
    row_offset: int  # first row of the group within its file
    num_rows: int


def _scan(files: list[Path], schema: Schema) -> list[_Unit]:
    """Reads every footer: checks columns/types and non-emptiness, lists the row groups."""
    units = []
    for i, path in enumerate(files):
        md = _open(path).metadata
        if md.num_rows == 0:
            raise DataError(f"{path}: empty parquet file (0 rows)")
        _check_arrow_schema(md.schema.to_arrow_schema(), schema, str(path), md.num_rows)
        offset = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if n:
                units.append(_Unit(i, g, offset, n))
            offset += n
    return units


def check_dataset(dataset_dir: str | Path, schema: Schema | None = None,
                  splits: Sequence[str] = ("train", "eval")) -> dict[str, int]:
    """Cheap pre-flight check before a job starts: every file of every split opens, has rows and
    the schema's columns with the right types (footers only; values are checked while reading).

    Returns:
        dict[str, int]: rows per split. Raises :class:`DataError` naming the bad file/column.
    """
    schema = schema or Schema.load(dataset_dir)
    return {split: sum(u.num_rows for u in _scan(list_parquet_files(dataset_dir, split), schema))
            for split in splits}


def count_rows(dataset_dir: str | Path, split: str) -> int:
    """Total rows of a split, from the parquet footers only.

    Example::

        >>> import tempfile
        >>> from recsys_mtl.data.synth import generate_recsys
        >>> d = tempfile.mkdtemp(); _ = generate_recsys(d, rows=1_000, num_users=50, num_items=80)
        >>> count_rows(d, "train"), count_rows(d, "eval")
        (900, 100)
    """
    return sum(_open(p).metadata.num_rows for p in list_parquet_files(dataset_dir, split))


def split_rows(num_rows: int, parts: int, part: int) -> tuple[int, int]:
    """Row range ``[lo, hi)`` of ``part`` when ``num_rows`` rows are split into ``parts`` contiguous
    ranges whose sizes differ by at most one row.

    Example::

        >>> [split_rows(10, 3, p) for p in range(3)]
        [(0, 3), (3, 6), (6, 10)]
    """
    return (part * num_rows) // parts, ((part + 1) * num_rows) // parts


def steps_per_epoch(num_rows: int, world_size: int, batch_size: int) -> int:
    """Synchronous steps one epoch takes on every rank: the largest rank share, in batches
    (the last one possibly short). Ranks with fewer batches run one padded, fully masked step.

    Example::

        >>> steps_per_epoch(18_000, 2, 512), steps_per_epoch(18_000, 3, 512)
        (18, 12)
    """
    return -(-(-(-num_rows // world_size)) // batch_size)


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Piece:
    """Rows ``[start, start + num_rows)`` of unit ``unit`` (row offsets inside the row group)."""

    unit: int
    start: int
    num_rows: int


def _take(cols: _Columns, idx: np.ndarray) -> _Columns:
    """Rows ``idx`` of ``cols`` in that order (a vectorised jagged gather for the sparse keys)."""
    values, lengths = [], []
    for v, ln in zip(cols.values, cols.lengths):
        starts = np.concatenate([[0], np.cumsum(ln, dtype=np.int64)[:-1]])[idx]  # n: first id of each taken row
        new_len = ln[idx]  # n
        total = int(new_len.sum())
        if v.size == ln.size and bool((ln == 1).all()):  # single-valued: ids line up with rows
            values.append(v[idx])
        else:
            ends = np.cumsum(new_len, dtype=np.int64)  # n
            within = np.arange(total, dtype=np.int64) - np.repeat(ends - new_len, new_len)  # position in its bag
            values.append(v[np.repeat(starts, new_len) + within])
        lengths.append(new_len)
    return _Columns(values, lengths, cols.dense[idx], cols.labels[idx], cols.mask[idx])


class ParquetMTLDataset(IterableDataset):
    """Streams one rank's share of a dataset split as :class:`MTLBatch` es of ``batch_size`` rows.

    **Every row, evenly split.** The split's rows are cut into *blocks* (row ranges of at most
    ``shuffle_block_rows`` rows inside row groups) and put in one global order, the same on every
    rank: the stored order, or with ``shuffle`` a permutation drawn from ``(seed, epoch)``. That
    order is then split into ``world_size`` contiguous row ranges whose sizes differ by at most one
    row, whatever the row-group layout; so every rank has the same number of batches ± 1, and only
    a rank's last batch may be short. Nothing is dropped: the trainer pads a short batch, and a
    rank with one batch fewer, with masked rows (see :func:`steps_per_epoch`).

    **Shuffle buffer.** A rank reads its range one *window* of ``shuffle_buffer_rows`` rows
    (rounded up to whole batches) at a time: the row groups the window touches are decoded once
    each, the window's rows are assembled, and with ``shuffle`` permuted by a generator seeded
    from ``(seed, epoch, window start)``. Memory per worker is about one window plus one decoded row
    group; rows per window = ``shuffle_buffer_rows``, so the cost is that many rows times the row
    size (e.g. 65,536 rows of 40 int64/float32 columns ≈ 15-20 MB). Decoding reads whole row groups, so
    blocks much smaller than the row groups make shuffled epochs read up to
    ``row_group_rows / shuffle_block_rows`` times the data; the converters write 16,384-row groups,
    the default block size.

    **Workers and resume.** Window ``j`` goes to DataLoader worker ``j % num_workers``; the loader
    interleaves the workers' batches. ``start_batch`` skips this rank's first batches of the epoch,
    counted in the order a loader with the same ``num_workers`` yields them; windows before the
    position are not read. The order is a pure function of ``(seed, epoch, world_size,
    batch_size, num_workers)``, so a resumed epoch yields exactly the batches not yet trained on.

    Args:
        dataset_dir (str | Path): dataset directory (``schema.json``, ``train/``, ``eval/``).
        split (str): ``"train"`` or ``"eval"`` (any sub-directory works).
        batch_size (int): rows per batch ``B``.
        rank (int): this process's rank.
        world_size (int): number of ranks.
        schema (Schema | None): loaded from ``dataset_dir`` when None.
        shuffle (bool): permute blocks globally and rows inside each window, per epoch.
        seed (int): shuffle seed.
        epoch (int): shuffle epoch; see :meth:`set_epoch`.
        shuffle_block_rows (int): rows per block, the granularity of the global permutation.
        shuffle_buffer_rows (int): rows per window, the in-memory shuffle buffer.
        start_batch (int): resume position (see above).

    Example::

        >>> import tempfile
        >>> from recsys_mtl.data.synth import generate_recsys
        >>> d = tempfile.mkdtemp(); _ = generate_recsys(d, rows=1_000, num_users=50, num_items=80)
        >>> ds = ParquetMTLDataset(d, "train", batch_size=256)
        >>> [b.batch_size for b in ds]
        [256, 256, 256, 132]
        >>> b = next(iter(ds)); tuple(b.dense.shape), tuple(b.labels.shape)
        ((256, 4), (256, 2))
        >>> resumed = ParquetMTLDataset(d, "train", batch_size=256, start_batch=2)
        >>> [b.batch_size for b in resumed]
        [256, 132]
        >>> [ParquetMTLDataset(d, "train", batch_size=256, rank=r, world_size=3).rank_rows for r in range(3)]
        [300, 300, 300]
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        schema: Schema | None = None,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shuffle_block_rows: int = 16_384,
        shuffle_buffer_rows: int = 65_536,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle_block_rows <= 0 or shuffle_buffer_rows <= 0:
            raise ValueError(f"shuffle_block_rows and shuffle_buffer_rows must be positive, got "
                             f"{shuffle_block_rows} and {shuffle_buffer_rows}")
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.schema = Schema.load(dataset_dir) if schema is None else schema
        self.shuffle = shuffle
        self.seed, self.epoch = seed, epoch
        self.shuffle_block_rows = shuffle_block_rows
        self.window_rows = -(-shuffle_buffer_rows // batch_size) * batch_size  # whole batches
        self.start_batch = start_batch
        self.files = list_parquet_files(dataset_dir, split)
        self.units = _scan(self.files, self.schema)
        self.columns = self.schema.sparse_names + self.schema.dense_names + self.schema.task_names
        # Blocks: (unit, start inside the unit, rows), in stored order.
        blocks = [(i, s, min(shuffle_block_rows, u.num_rows - s))
                  for i, u in enumerate(self.units) for s in range(0, u.num_rows, shuffle_block_rows)]
        self._blocks = np.asarray(blocks, dtype=np.int64).reshape(-1, 3)  # K x 3

    def set_epoch(self, epoch: int) -> None:
        """Sets the shuffle epoch (with persistent workers, rebuild the DataLoader to apply it)."""
        self.epoch = epoch

    @property
    def num_rows(self) -> int:
        """Rows in this split (all ranks)."""
        return sum(u.num_rows for u in self.units)

    @property
    def rank_rows(self) -> int:
        """Rows of this rank's share (every rank's share differs by at most one row)."""
        lo, hi = split_rows(self.num_rows, self.world_size, self.rank)
        return hi - lo

    def steps_per_epoch(self) -> int:
        """Synchronous steps per epoch, the same on every rank (see :func:`steps_per_epoch`)."""
        return steps_per_epoch(self.num_rows, self.world_size, self.batch_size)

    # ---- the epoch's order ------------------------------------------------------------------

    def _ordered_blocks(self) -> np.ndarray:
        """This epoch's global block order, ``K x 3`` (unit, start, rows); the same on every rank."""
        if not self.shuffle:
            return self._blocks
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._blocks))  # K
        return self._blocks[perm]

    def _windows(self) -> list[tuple[int, int]]:
        """This rank's windows as global row ranges ``[lo, hi)`` of the epoch's order."""
        lo, hi = split_rows(self.num_rows, self.world_size, self.rank)
        return [(a, min(a + self.window_rows, hi)) for a in range(lo, hi, self.window_rows)]

    def _window_pieces(self, blocks: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> list[_Piece]:
        """The pieces of blocks covering global rows ``[lo, hi)``, in order."""
        out = []
        k = int(np.searchsorted(ends, lo, side="right"))  # first block ending after lo
        while k < len(blocks) and ends[k] - blocks[k, 2] < hi:
            b_lo = int(ends[k] - blocks[k, 2])  # global row of the block's first row
            a, b = max(lo, b_lo), min(hi, int(ends[k]))
            out.append(_Piece(int(blocks[k, 0]), int(blocks[k, 1]) + a - b_lo, b - a))
            k += 1
        return out

    def _worker_batches(self, num_workers: int) -> list[int]:
        """Batches each of ``num_workers`` workers yields on this rank (before ``start_batch``)."""
        out = [0] * num_workers
        for j, (lo, hi) in enumerate(self._windows()):
            out[j % num_workers] += -(-(hi - lo) // self.batch_size)
        return out

    def num_batches(self, num_workers: int = 0) -> int:
        """Exact number of batches this rank yields (after skipping ``start_batch``)."""
        return max(0, -(-self.rank_rows // self.batch_size) - self.start_batch)

    def _worker_skips(self, num_workers: int) -> tuple[list[int], int]:
        """Splits ``start_batch`` over the workers the way a DataLoader interleaves them
        (round-robin over the workers that still have batches). Also returns the worker whose
        batch comes next: a resumed DataLoader starts its cycle at its worker 0, so worker ``j``
        of the resumed loader plays original worker ``(j + next) % num_workers``."""
        left = self._worker_batches(num_workers)
        skips = [0] * num_workers
        todo, nxt = self.start_batch, 0
        while todo > 0 and any(left):
            for w in range(num_workers):
                if todo == 0:
                    break
                if left[w]:
                    left[w] -= 1
                    skips[w] += 1
                    todo -= 1
                    nxt = (w + 1) % num_workers
        return skips, nxt

    # ---- reading ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[MTLBatch]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        skip = 0
        if self.start_batch:
            skips, nxt = self._worker_skips(num_workers)
            worker = (worker + nxt) % num_workers
            skip = skips[worker]
        blocks = self._ordered_blocks()
        ends = np.cumsum(blocks[:, 2])  # K: global end row of each block
        keys, B = self.schema.sparse_names, self.batch_size
        cache: dict[int, pa.Table] = {}  # the last decoded row group (consecutive windows share it)
        for j, (lo, hi) in enumerate(self._windows()):
            if j % num_workers != worker:
                continue
            n_batches = -(-(hi - lo) // B)
            if skip >= n_batches:  # the whole window was trained on already: do not read it
                skip -= n_batches
                continue
            rows = self._read(self._window_pieces(blocks, ends, lo, hi), cache)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, lo])
                rows = _take(rows, rng.permutation(rows.num_rows))  # window-local shuffle buffer
            for i, part in enumerate(rows.batches(B)):
                if i >= skip:
                    yield part.to_batch(keys)
            skip = 0

    def _read(self, pieces: list[_Piece], cache: dict[int, pa.Table]) -> _Columns:
        """Decodes each row group the pieces touch once, converts and validates the pieces' rows,
        and returns them in the pieces' order."""
        converted: list[_Columns | None] = [None] * len(pieces)
        by_unit: dict[int, list[int]] = {}
        for i, p in enumerate(pieces):
            by_unit.setdefault(p.unit, []).append(i)
        for unit_index in sorted(by_unit):  # file order: at most one file open at a time
            u = self.units[unit_index]
            path = self.files[u.file]
            table = cache.get(unit_index)
            if table is None:
                try:
                    table = _open(path).read_row_group(u.row_group, columns=self.columns)
                except (pa.ArrowException, OSError) as e:
                    raise DataError(
                        f"{_where(str(path), None, u.row_offset, u.num_rows)} (row group {u.row_group}): "
                        f"cannot decode parquet data: {e}"
                    ) from e
                cache.clear()
                cache[unit_index] = table
            for i in by_unit[unit_index]:
                p = pieces[i]
                converted[i] = _to_columns(table.slice(p.start, p.num_rows), self.schema, str(path),
                                           u.row_offset + p.start, validate=True)
        return _Columns.concat([c for c in converted if c is not None])


def _identity(batch: MTLBatch) -> MTLBatch:
    return batch


def make_dataloader(
    dataset_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    schema: Schema | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    shuffle_block_rows: int = 16_384,
    shuffle_buffer_rows: int = 65_536,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    start_batch: int = 0,
) -> DataLoader:
    """A DataLoader over :class:`ParquetMTLDataset` (the dataset yields whole batches).

    Args:
        dataset_dir (str | Path): dataset directory.
        split (str): ``"train"`` or ``"eval"``.
        batch_size (int): rows per batch.
        rank (int): this process's rank.
        world_size (int): number of ranks.
        num_workers (int): DataLoader worker processes (persistent when > 0).
        schema (Schema | None): loaded from ``dataset_dir`` when None.
        shuffle (bool): seeded per-epoch shuffle (global block permutation + shuffle buffer).
        seed (int): shuffle seed.
        epoch (int): shuffle epoch.
        shuffle_block_rows (int): rows per block of the global permutation.
        shuffle_buffer_rows (int): rows of the in-memory shuffle buffer (per worker).
        pin_memory (bool): pin batches (for GPU training).
        prefetch_factor (int | None): batches prefetched per worker (workers > 0 only).
        start_batch (int): resume position: skip this rank's first ``start_batch`` batches.

    Returns:
        DataLoader: yields :class:`MTLBatch`; the dataset is ``loader.dataset``.

    Example::

        >>> import tempfile
        >>> from recsys_mtl.data.synth import generate_recsys
        >>> d = tempfile.mkdtemp(); _ = generate_recsys(d, rows=1_000, num_users=50, num_items=80)
        >>> dl = make_dataloader(d, "eval", batch_size=64, rank=0, world_size=1)
        >>> [b.batch_size for b in dl]
        [64, 36]
    """
    dataset = ParquetMTLDataset(
        dataset_dir, split, batch_size=batch_size, rank=rank, world_size=world_size, schema=schema,
        shuffle=shuffle, seed=seed, epoch=epoch, shuffle_block_rows=shuffle_block_rows,
        shuffle_buffer_rows=shuffle_buffer_rows, start_batch=start_batch,
    )  # fmt: skip
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
