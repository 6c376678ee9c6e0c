"""The two-pass streaming machinery shared by the dataset converters.

A converter is a :class:`Source`: it streams the raw files as :class:`Chunk` s of raw values
(categorical values as Arrow strings or integers, multi-hot ones as Arrow lists, dense values as
float64 after the converter's own transform such as ``log1p``, labels as float32) together
with each row's split. :func:`run_conversion` reads the source twice:

1. **Vocabularies and statistics** (train rows only): the count of every categorical value per
   feature, the longest bag of undecided multi-hot features, and mean/std of every dense
   feature.
2. **Writing**: value → id (values seen fewer than ``min_count`` times in train, and values
   never seen in train, map to id 0; frequent values get ids 1.. in order of decreasing count,
   ties by value), dense → ``(x - mean) / std`` with train statistics (missing → 0, the
   mean), labels → float32 (NaN → null = outside the task's sample space); rows are streamed
   to ``train/`` and ``eval/`` part files in fixed-size row groups.

Nothing holds more than one chunk of rows plus the vocabularies; converters that join side
tables (Ali-CCP common features, KuaiRand user/video tables) keep those tables in memory.
"""

from __future__ import annotations

import gzip
import io
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys_mtl.data.schema import DenseFeature, Schema, SchemaError, SparseFeature, TaskSpec
from recsys_mtl.data.synth import _arrow_schema, _hash, _SplitWriter

__all__ = ["ConvertError", "Chunk", "FeatureSpec", "Source", "run_conversion", "read_csv_chunks", "hash_eval_mask"]

DEFAULT_BLOCK_SIZE = 4 << 20  # bytes of CSV text parsed per chunk
VOCAB_DIR = "vocab"


class ConvertError(SchemaError):
    """Malformed raw input (names the file and line) or an impossible conversion request."""


# --------------------------------------------------------------------------- raw CSV streaming


def open_text(path: Path) -> io.TextIOBase:
    """Text handle on a plain or gzip-compressed file."""
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def check_text_file(path: Path, sniff_bytes: int = 1 << 16) -> None:
    """Refuses a binary file before parsing it as text: a NUL byte, or bytes that are not UTF-8, in
    its first ``sniff_bytes`` (after gzip decompression). The message never echoes the raw bytes."""
    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            head = f.read(sniff_bytes)
    except (OSError, EOFError) as e:
        raise ConvertError(f"{path}: unreadable: {e}") from None
    try:
        head.decode("utf-8")
        text = True
    except UnicodeDecodeError as e:
        text = e.start >= len(head) - 3  # only a multi-byte character cut by the sniff window
    if b"\x00" in head or not text:
        raise ConvertError(f"{path}: a binary file, not delimited text (its first {len(head):,} bytes are not UTF-8 "
                           f"text); check --input")


def _locate_line(path: Path, text: str, from_line: int) -> int | None:
    """1-based number of the first line at or after ``from_line`` whose content is ``text``."""
    with open_text(path) as f:
        for i, line in enumerate(f, start=1):
            if i >= from_line and line.rstrip("\r\n") == text:
                return i
    return None


@dataclass
class CsvChunk:
    """Rows ``first_line .. first_line + num_rows - 1`` of ``path`` as a table of strings."""

    path: Path
    first_line: int
    table: pa.Table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def where(self, row: int) -> str:
        return f"{self.path}, line {self.first_line + row}"

    def numeric(self, column: str, dtype: pa.DataType = pa.float64(), *, allow_empty: bool = False) -> pa.Array:
        """Column cast to a number; a clear error naming the line of the first non-number."""
        col = self.table.column(column).combine_chunks()
        col = pc.utf8_trim_whitespace(col)
        if allow_empty:
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        try:
            return pc.cast(col, dtype)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for i, v in enumerate(col.to_pylist()):
                if v is None and allow_empty:
                    continue
                try:
                    pc.cast(pa.array([v], pa.string()), dtype)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise ConvertError(
                        f"{self.where(i)}: column {column!r}: expected a number ({dtype}), got {v!r}"
                    ) from None
            raise


def read_csv_chunks(
    path: str | Path,
    *,
    column_names: list[str] | None = None,
    delimiter: str = ",",
    quoting: bool = True,
    include_columns: list[str] | None = None,
    required_columns: Iterable[str] = (),
    max_rows: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[CsvChunk]:
    """Streams a (possibly ``.gz``) delimited text file as tables of strings.

    Args:
        path (str | Path): the file; ``.gz`` is decompressed on the fly.
        column_names (list[str] | None): names for a file without a header line (its field
            count is enforced); ``None`` reads the names from the first line.
        delimiter (str): one-character field separator.
        quoting (bool): honour ``"..."`` quoting.
        include_columns (list[str] | None): read only these columns.
        required_columns (Iterable[str]): columns that must exist (header files).
        max_rows (int | None): stop after this many data rows.
        block_size (int): bytes of text per chunk.

    Raises:
        ConvertError: a line with the wrong number of fields (naming file and line), a missing
        column, an unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: input file not found")
    check_text_file(path)
    bad: list = []

    def on_invalid(row) -> str:
        bad.append(row)
        return "error"

    header_lines = 0 if column_names is not None else 1
    if column_names is not None:
        names = list(column_names)
    else:
        with open_text(path) as f:
            first = f.readline().rstrip("\r\n")
        if not first:
            return
        names = [c.strip().strip('"') if quoting else c.strip() for c in first.split(delimiter)]
    missing = [c for c in required_columns if c not in names]
    if missing:
        raise ConvertError(f"{path}: missing columns {missing} (has {names})")
    read_opts = pacsv.ReadOptions(column_names=column_names, block_size=block_size, use_threads=False)
    parse_opts = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False,
                                    invalid_row_handler=on_invalid)
    wanted = include_columns if include_columns is not None else names
    convert_opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in names},
                                        include_columns=wanted, strings_can_be_null=False)
    rows_done = 0
    try:
        with pa.input_stream(str(path)) as stream:
            reader = pacsv.open_csv(stream, read_options=read_opts, parse_options=parse_opts,
                                    convert_options=convert_opts)
            for batch in reader:
                if max_rows is not None and rows_done + batch.num_rows > max_rows:
                    batch = batch.slice(0, max_rows - rows_done)
                if batch.num_rows:
                    yield CsvChunk(path, header_lines + rows_done + 1, pa.Table.from_batches([batch]))
                rows_done += batch.num_rows
                if max_rows is not None and rows_done >= max_rows:
                    return
    except (pa.ArrowInvalid, OSError) as e:
        if "Empty CSV file" in str(e):
            return
        if bad:
            row = bad[0]
            line = _locate_line(path, row.text, header_lines + rows_done + 1)
            at = f"line {line}" if line is not None else "a line"
            raise ConvertError(f"{path}, {at}: expected {row.expected_columns} fields separated by "
                               f"{delimiter!r}, got {row.actual_columns}: {row.text[:200]!r}") from None
        raise ConvertError(f"{path}: cannot parse: {e}") from None


def strings(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Whitespace-trimmed strings; empty → null (missing)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    col = pc.utf8_trim_whitespace(col)
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)


def split_list(col: pa.Array, sep: str) -> pa.Array:
    """``"a<sep>b"`` → ``["a", "b"]`` (trimmed, empty items dropped; null → empty list)."""
    col = pc.fill_null(col, "")
    lists = pc.split_pattern(col, pattern=sep)
    flat = pc.utf8_trim_whitespace(lists.flatten())
    keep = pc.not_equal(flat, "")
    lengths = np.asarray(pc.list_value_length(lists).fill_null(0))
    row = np.repeat(np.arange(len(lengths)), lengths)
    keep_np = np.asarray(keep)
    return _list_from(row[keep_np], flat.filter(keep), len(lengths))


def _list_from(row_of_value: np.ndarray, values: pa.Array, num_rows: int) -> pa.Array:
    """List array whose row ``r`` holds ``values[row_of_value == r]`` (``row_of_value`` sorted)."""
    offsets = np.zeros(num_rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(row_of_value, minlength=num_rows), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


# --------------------------------------------------------------------------- splits


def hash_eval_mask(global_index: np.ndarray, eval_fraction: float, seed: int) -> np.ndarray:
    """Row ``i`` is eval iff ``splitmix64(i; seed) / 2**64 < eval_fraction`` (stable under appends)."""
    u = (_hash(global_index, seed, 0x5EED) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < eval_fraction


# --------------------------------------------------------------------------- vocabulary


class Vocab:
    """Counts of a feature's values (integers or strings) and the frozen value → id map."""

    def __init__(self) -> None:
        self.kind: str | None = None  # "int" | "str"
        self._keys: np.ndarray | pa.Array | None = None  # sorted unique values (running)
        self._counts = np.zeros(0, np.int64)
        self._pending: list[tuple] = []
        self._pending_size = 0
        self.ids: dict | None = None
        self.sorted_keys: np.ndarray | None = None  # int kind: sorted kept values
        self.sorted_ids: np.ndarray | None = None
        self.value_set: pa.Array | None = None  # str kind: kept values in id order
        self.num_seen = 0  # distinct train values
        self.num_kept = 0

    def update(self, values: pa.Array) -> None:
        values = values.drop_null()
        if len(values) == 0:
            return
        if self.kind is None:
            self.kind = "int" if pa.types.is_integer(values.type) else "str"
        if self.kind == "int":
            u, c = np.unique(np.asarray(values.cast(pa.int64())), return_counts=True)
            self._pending.append((u, c))
            self._pending_size += u.size
        else:
            vc = pc.value_counts(values.cast(pa.string()))
            self._pending.append((vc.field("values"), np.asarray(vc.field("counts"), np.int64)))
            self._pending_size += len(vc)
        if self._pending_size > max(1 << 16, 2 * self._counts.size):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        if self.kind == "int":
            keys = np.concatenate(([self._keys] if self._keys is not None else []) + [k for k, _ in self._pending])
            counts = np.concatenate([self._counts] + [c for _, c in self._pending])
            self._keys, inv = np.unique(keys, return_inverse=True)
            self._counts = np.bincount(inv, weights=counts, minlength=self._keys.size).astype(np.int64)
        else:
            keys = pa.concat_arrays(([self._keys] if self._keys is not None else []) + [k for k, _ in self._pending])
            counts = np.concatenate([self._counts] + [c for _, c in self._pending])
            t = pa.table({"k": keys, "c": counts}).group_by("k").aggregate([("c", "sum")])
            self._keys, self._counts = t.column("k").combine_chunks(), np.asarray(t.column("c_sum"), np.int64)
        self._pending, self._pending_size = [], 0

    def freeze(self, min_count: int) -> None:
        """Keeps values with count >= ``min_count``; ids 1.. by decreasing count, ties by value."""
        self._merge()
        if self._keys is None:
            self.kind = self.kind or "str"
            self.sorted_keys, self.sorted_ids = np.zeros(0, np.int64), np.zeros(0, np.int64)
            self.value_set, self.kept_values, self.kept_counts = pa.array([], pa.string()), [], np.zeros(0, np.int64)
            return
        keep = self._counts >= min_count
        self.num_seen, self.num_kept = int(self._counts.size), int(keep.sum())
        if self.kind == "int":
            keys, counts = self._keys[keep], self._counts[keep]
            order = np.lexsort((keys, -counts))
            ids = np.empty(keys.size, np.int64)
            ids[order] = np.arange(1, keys.size + 1)
            self.sorted_keys, self.sorted_ids = keys, ids  # keys are already sorted
            self.kept_values, self.kept_counts = keys[order], counts[order]
        else:
            keys = self._keys.filter(pa.array(keep))
            counts = self._counts[keep]
            order = np.lexsort((np.asarray(keys.to_pylist(), dtype=object).astype(str), -counts)) if len(keys) else []
            self.value_set = keys.take(pa.array(order, pa.int64()))
            self.kept_values, self.kept_counts = self.value_set, counts[order]

    @property
    def num_embeddings(self) -> int:
        return self.num_kept + 1  # id 0 = rare / unknown / missing

    def lookup(self, values: pa.Array) -> np.ndarray:
        """int64 ids; null, rare and unseen values → 0."""
        n = len(values)
        if n == 0:
            return np.zeros(0, np.int64)
        if self.kind == "int" and pa.types.is_integer(values.type):
            valid = np.asarray(values.is_valid())
            v = np.asarray(values.cast(pa.int64()).fill_null(0))
            if self.sorted_keys.size == 0:
                return np.zeros(n, np.int64)
            pos = np.minimum(np.searchsorted(self.sorted_keys, v), self.sorted_keys.size - 1)
            hit = (self.sorted_keys[pos] == v) & valid
            return np.where(hit, self.sorted_ids[pos], 0)
        if self.kind == "int":  # strings to an integer vocabulary
            values = pc.cast(values, pa.int64())
            return self.lookup(values)
        idx = pc.index_in(values.cast(pa.string()), value_set=self.value_set)
        return np.asarray(pc.add(idx.fill_null(-1), 1).cast(pa.int64()))

    def table(self) -> pa.Table:
        """The kept values with their ids and train counts (id order)."""
        values = self.kept_values if isinstance(self.kept_values, pa.Array) else pa.array(self.kept_values)
        return pa.table({"id": pa.array(np.arange(1, len(values) + 1), pa.int64()), "value": values,
                         "count": pa.array(self.kept_counts, pa.int64())})


class _DenseStats:
    def __init__(self) -> None:
        self.n = 0
        self.s = 0.0
        self.ss = 0.0

    def update(self, x: np.ndarray) -> None:
        x = x[np.isfinite(x)]
        self.n += x.size
        self.s += float(x.sum())
        self.ss += float((x * x).sum())

    def mean_std(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 1.0
        mean = self.s / self.n
        var = max(self.ss / self.n - mean * mean, 0.0)
        std = var**0.5
        return mean, (std if std > 1e-12 else 1.0)


# --------------------------------------------------------------------------- source protocol


@dataclass(frozen=True)
class FeatureSpec:
    """How a raw categorical column becomes a :class:`SparseFeature`.

    Args:
        side (str): ``user``, ``item`` or ``context``.
        multi_hot (bool | None): list column; ``None`` = decided from the train data (list
            columns whose train bags never exceed one id become single-valued).
        pooling (str): pooling of a multi-hot bag.
    """

    side: str = "context"
    multi_hot: bool | None = False
    pooling: str = "mean"


@dataclass
class Chunk:
    """Raw rows of one read step.

    Args:
        is_eval (np.ndarray): ``B`` bool, the row's split.
        sparse (dict[str, pa.Array]): categorical values (int or string), or lists of them.
        dense (dict[str, np.ndarray]): ``B`` float64 after the source's transform; NaN = missing.
        labels (dict[str, np.ndarray]): ``B`` float32; NaN = outside the task's sample space.
        extra (dict[str, pa.Array]): columns written as they are, outside the schema.
    """

    is_eval: np.ndarray
    sparse: dict[str, pa.Array]
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, pa.Array] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.is_eval.size)


class Source:
    """A raw dataset. Subclasses implement :meth:`chunks` (called once per pass) and describe
    their features; :func:`run_conversion` does the rest."""

    name = "source"
    tasks: tuple[str, ...] = ()
    user_id_feature: str | None = None

    def chunks(self, pass_index: int) -> Iterator[Chunk]:
        raise NotImplementedError

    def spec(self, feature: str) -> FeatureSpec:
        raise NotImplementedError

    def feature_order(self, names: list[str]) -> list[str]:
        return names

    def metadata(self) -> dict:
        """Source files, split rule and anything else worth recording in ``schema.metadata``."""
        return {}


# --------------------------------------------------------------------------- driver


def _flatten(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(values, B int32 lengths) of a list array (nulls = empty) or a scalar array."""
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.asarray(pc.list_value_length(arr).fill_null(0), np.int32)
        return pc.list_flatten(arr), lengths
    return arr, np.ones(len(arr), np.int32)


def _encode_sparse(arr: pa.Array, vocab: Vocab, multi_hot: bool) -> pa.Array:
    values, lengths = _flatten(arr)
    ids = vocab.lookup(values)
    if multi_hot:
        offsets = np.zeros(lengths.size + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int64()))
    if len(ids) == len(arr) and (lengths == 1).all():
        return pa.array(ids, pa.int64())
    first = np.zeros(lengths.size, np.int64)  # single-valued from a list: first id, empty → 0
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    has = lengths > 0
    first[has] = ids[starts[has]]
    return pa.array(first, pa.int64())


def run_conversion(
    source: Source,
    out_dir: str | Path,
    *,
    min_count: int = 1,
    rows_per_file: int = 1_048_576,
    row_group_size: int = 16_384,
    progress: bool | None = None,
    write_vocab: bool = True,
) -> Schema:
    """Converts ``source`` into a dataset directory (two passes over the raw files).

    Writes ``out_dir/schema.json`` (metadata: converter, inputs, split rule, ``min_count``,
    vocabulary sizes, dense normalisation, rows and label means per split),
    ``out_dir/{train,eval}/part-*.parquet`` and, with ``write_vocab``,
    ``out_dir/vocab/<feature>.parquet`` (``id, value, count``: raw value of every id >= 1).

    Raises:
        ConvertError: malformed input, or a split without rows.
    """
    if min_count < 1:
        raise ConvertError(f"min_count must be >= 1, got {min_count}")
    out = Path(out_dir)
    show = bool(progress)
    vocabs: dict[str, Vocab] = {}
    max_len: dict[str, int] = {}
    stats: dict[str, _DenseStats] = {}
    dense_names: list[str] = []
    seen_rows = {"train": 0, "eval": 0}

    # ---- pass 1: vocabularies and dense statistics over train rows
    with tqdm(desc=f"{source.name}: vocabularies", unit="rows", unit_scale=True, file=sys.stderr,
              disable=not show) as bar:
        for chunk in source.chunks(0):
            train = ~chunk.is_eval
            seen_rows["eval"] += int(chunk.is_eval.sum())
            seen_rows["train"] += int(train.sum())
            mask = pa.array(train)
            for name, arr in chunk.sparse.items():
                if name not in vocabs:
                    vocabs[name], max_len[name] = Vocab(), 0
                sub = arr.filter(mask)
                values, lengths = _flatten(sub)
                vocabs[name].update(values)
                if lengths.size:
                    max_len[name] = max(max_len[name], int(lengths.max()))
            for name, x in chunk.dense.items():
                if name not in stats:
                    stats[name] = _DenseStats()
                    dense_names.append(name)
                stats[name].update(x[train])
            bar.update(chunk.num_rows)
    for split, n in seen_rows.items():
        if n == 0:
            raise ConvertError(f"{source.name}: the {split} split has no rows "
                               f"(inputs: {source.metadata().get('inputs')}); check the split options")
    for v in vocabs.values():
        v.freeze(min_count)
    sparse_names = source.feature_order(list(vocabs))
    multi = {}
    for name in sparse_names:
        spec = source.spec(name)
        multi[name] = spec.multi_hot if spec.multi_hot is not None else max_len[name] > 1
    norm = {name: stats[name].mean_std() for name in dense_names}

    # ---- pass 2: encode and write
    meta = {"converter": source.name, **source.metadata(), "min_count": min_count}
    schema = Schema(
        sparse=tuple(SparseFeature(n, vocabs[n].num_embeddings, multi_hot=multi[n], pooling=source.spec(n).pooling,
                                   side=source.spec(n).side) for n in sparse_names),
        dense=tuple(DenseFeature(n) for n in dense_names),
        tasks=tuple(TaskSpec(t, "binary") for t in source.tasks),
        user_id_feature=source.user_id_feature if source.user_id_feature in vocabs else None,
        metadata=meta,
    )
    arrow_schema = _arrow_schema(schema)
    extra_fields: list[pa.Field] = []
    for split in ("train", "eval"):
        for old in sorted((out / split).glob("part-*.parquet")):
            old.unlink()
    writers: dict[str, _SplitWriter] = {}
    rows = {"train": 0, "eval": 0}
    label_sums = {t: {"train": 0.0, "eval": 0.0} for t in source.tasks}
    label_n = {t: {"train": 0, "eval": 0} for t in source.tasks}
    with tqdm(desc=f"{source.name}: writing", unit="rows", unit_scale=True, file=sys.stderr,
              disable=not show) as bar:
        for chunk in source.chunks(1):
            n = chunk.num_rows
            cols: dict[str, pa.Array] = {}
            for name in sparse_names:
                arr = chunk.sparse.get(name)
                if arr is None:
                    arr = pa.nulls(n, pa.list_(pa.string()) if multi[name] else pa.string())
                cols[name] = _encode_sparse(arr, vocabs[name], multi[name])
            for name in dense_names:
                x = chunk.dense.get(name, np.full(n, np.nan))
                mean, std = norm[name]
                z = (x - mean) / std
                cols[name] = pa.array(np.where(np.isfinite(z), z, 0.0).astype(np.float32))
            for t in source.tasks:
                y = chunk.labels[t].astype(np.float32)
                cols[t] = pa.array(y, pa.float32(), mask=np.isnan(y))
            if not writers:
                extra_fields = [pa.field(k, v.type) for k, v in chunk.extra.items()]
                full = pa.schema(list(arrow_schema) + extra_fields)
                writers = {s: _SplitWriter(out / s, full, rows_per_file, row_group_size) for s in ("train", "eval")}
            for k, v in chunk.extra.items():
                cols[k] = v
            table = pa.Table.from_pydict(cols, schema=writers["train"].arrow_schema)
            for split, sel in (("eval", chunk.is_eval), ("train", ~chunk.is_eval)):
                if sel.any():
                    writers[split].write(table.filter(pa.array(sel)))
                    rows[split] += int(sel.sum())
                    for t in source.tasks:
                        y = chunk.labels[t][sel]
                        y = y[np.isfinite(y)]
                        label_sums[t][split] += float(y.sum())
                        label_n[t][split] += int(y.size)
            bar.update(n)
    for w in writers.values():
        w.close()
    meta.update(
        rows=rows,
        label_mean={t: {s: (label_sums[t][s] / label_n[t][s] if label_n[t][s] else None) for s in rows}
                    for t in source.tasks},
        vocab_sizes={n: vocabs[n].num_embeddings for n in sparse_names},
        distinct_train_values={n: vocabs[n].num_seen for n in sparse_names},
        dense_normalisation={n: {"mean": norm[n][0], "std": norm[n][1]} for n in dense_names},
        id_rule=f"per feature: train values seen >= {min_count} times get ids 1.. by decreasing train count "
                f"(ties by value); rare, unseen and missing values get id 0",
    )
    if extra_fields:
        meta["extra_columns"] = [f.name for f in extra_fields]
    if write_vocab:
        vdir = out / VOCAB_DIR
        vdir.mkdir(parents=True, exist_ok=True)
        for old in vdir.glob("*.parquet"):
            old.unlink()
        for n in sparse_names:
            pq.write_table(vocabs[n].table(), vdir / f"{n}.parquet")
    schema.save(out)
    return schema


def parse_tasks(text: str | Iterable[str] | None, allowed: Iterable[str], default: Iterable[str]) -> tuple[str, ...]:
    """Comma list (or sequence) of task names, checked against ``allowed``."""
    allowed = tuple(allowed)
    if text is None:
        return tuple(default)
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in names if t not in allowed]
    if bad or not names:
        raise ConvertError(f"unknown tasks {bad or names}; choose from {list(allowed)}")
    return tuple(dict.fromkeys(names))


def binary_label(chunk: CsvChunk, column: str) -> np.ndarray:
    """0/1 column (``"0"``/``"1"``, also ``"0.0"``) → float32; anything else is an error naming the line."""
    x = np.asarray(chunk.numeric(column, pa.float64()).fill_null(np.nan))
    bad = ~((x == 0) | (x == 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raw = chunk.table.column(column)[i].as_py()
        raise ConvertError(f"{chunk.where(i)}: column {column!r}: expected a 0/1 label, got {raw!r}")
    return x.astype(np.float32)


def log1p_nonneg(x: np.ndarray) -> np.ndarray:
    """``log1p(max(x, 0))``, NaN kept (missing)."""
    return np.log1p(np.maximum(x, 0.0))
