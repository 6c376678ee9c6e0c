"""Deterministic synthetic datasets, streamed to parquet (docs/design.md §3, §4).

Two generators, both writing the standard dataset layout::

    DATASET/schema.json
    DATASET/train/part-00000.parquet ...
    DATASET/eval/part-00000.parquet ...

* :func:`generate_recsys` — a multi-task click/like/... dataset with Zipf-popular users and
  items, shared and task-specific latent factors, categorical side features, multi-hot
  history/tag features, dense features and optional ESMM-style sample spaces.
* :func:`generate_mmoe` — the synthetic regression benchmark of the MMoE paper (Ma et al.
  2018, §3.2), whose task correlation is a knob.

Rows are produced in fixed-size generation chunks; chunk ``k`` draws from
``np.random.default_rng([seed, stream, k])``, so the rows depend only on the seed, the row
count and the generator knobs — never on ``rows_per_file`` / ``row_group_size``. At most one
chunk plus one row group per split is held in memory. The train/eval split is a deterministic
function of the global row index (exactly ``round(rows * eval_fraction)`` eval rows, spread
evenly).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec

__all__ = ["TASK_NAMES", "DEFAULT_POSITIVE_RATES", "SAMPLE_SPACES", "generate_recsys", "generate_mmoe"]

TASK_NAMES = ("click", "like", "finish", "share", "comment", "follow", "save", "dislike")
DEFAULT_POSITIVE_RATES = (0.3, 0.05, 0.15, 0.02, 0.03, 0.01, 0.04, 0.02)
SAMPLE_SPACES = ("cvr_after_click", "after_click")

_RECSYS_CHUNK = 65_536  # generation unit; fixed so rows never depend on file layout knobs
_MMOE_CHUNK = 8_192
_PILOT_ROWS = 50_000
_PROGRESS_MIN_ROWS = 500_000

# Stream tags for np.random.default_rng([seed, tag, ...]).
_WORLD, _PILOT, _ROWS = 0, 1, 2

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _hash(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Vectorised splitmix64 of ``ids`` keyed by ``(seed, salt)``; returns uint64."""
    key = np.uint64((seed * 0x100000001B3 + salt * 0x9E3779B1 + 0x632BE5AB) & 0xFFFFFFFFFFFFFFFF)
    x = np.asarray(ids).astype(np.uint64) * _GOLD + key  # wraps mod 2**64 (no warning for arrays)
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _calibrate_bias(logits: np.ndarray, rate: float, weights: np.ndarray | None = None) -> float:
    """Bias ``b`` with ``weighted_mean(sigmoid(logits + b)) == rate`` (bisection)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"positive rate must lie in (0, 1), got {rate}")
    w = np.ones_like(logits) if weights is None else weights
    lo, hi = -60.0, 60.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if np.average(_sigmoid(logits + mid), weights=w) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC from average ranks (ties count one half); NaN without both classes."""
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(s.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], s.size]
    avg = 0.5 * (starts + ends - 1) + 1.0  # average 1-based rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------- streaming writer


class _SplitWriter:
    """Writes one split as ``part-XXXXX.parquet`` files of exact-size row groups."""

    def __init__(self, split_dir: Path, arrow_schema: pa.Schema, rows_per_file: int, row_group_size: int):
        self.split_dir = split_dir
        self.arrow_schema = arrow_schema
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.file_index = 0
        self.rows_in_file = 0
        self.writer: pq.ParquetWriter | None = None
        self.rows_written = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self._next_group_rows():
            self._flush(self._next_group_rows())

    def close(self) -> None:
        while self.pending_rows > 0:
            self._flush(min(self.pending_rows, self._next_group_rows()))
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _next_group_rows(self) -> int:
        return min(self.row_group_size, self.rows_per_file - self.rows_in_file)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        group, rest = table.slice(0, n), table.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self.writer is None:
            self.split_dir.mkdir(parents=True, exist_ok=True)
            path = self.split_dir / f"part-{self.file_index:05d}.parquet"
            # Dictionary-encode ids and labels; dense floats are near-unique, store them plain.
            dict_cols = [f.name for f in self.arrow_schema if not pa.types.is_floating(f.type) or f.nullable]
            self.writer = pq.ParquetWriter(path, self.arrow_schema, use_dictionary=dict_cols)
        self.writer.write_table(group.combine_chunks(), row_group_size=n)
        self.rows_in_file += n
        self.rows_written += n
        if self.rows_in_file >= self.rows_per_file:
            self.writer.close()
            self.writer = None
            self.file_index += 1
            self.rows_in_file = 0


def _eval_mask(global_index: np.ndarray, rows: int, n_eval: int) -> np.ndarray:
    """Exactly ``n_eval`` of ``rows`` rows, evenly spread, as a function of the row index."""
    g = global_index.astype(np.int64)
    return ((g + 1) * n_eval) // rows > (g * n_eval) // rows


def _check_layout(rows: int, eval_fraction: float, rows_per_file: int, row_group_size: int) -> None:
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    if row_group_size <= 0 or rows_per_file <= 0:
        raise ValueError("row_group_size and rows_per_file must be positive")


def _write_dataset(
    out_dir: str | Path,
    schema: Schema,
    arrow_schema: pa.Schema,
    make_chunk: Callable[[int, int], pa.Table],
    *,
    rows: int,
    chunk_rows: int,
    eval_fraction: float,
    rows_per_file: int,
    row_group_size: int,
    progress: bool | None,
    desc: str,
) -> Schema:
    """Streams ``make_chunk(chunk_index, n)`` tables into ``out_dir``'s train/eval splits."""
    _check_layout(rows, eval_fraction, rows_per_file, row_group_size)
    out = Path(out_dir)
    for split in ("train", "eval"):  # the generator owns DATASET/{train,eval}/part-*.parquet
        for old in sorted((out / split).glob("part-*.parquet")):
            old.unlink()
    n_eval = int(round(rows * eval_fraction))
    writers = {
        split: _SplitWriter(out / split, arrow_schema, rows_per_file, row_group_size) for split in ("train", "eval")
    }
    show = rows >= _PROGRESS_MIN_ROWS if progress is None else progress
    with tqdm(total=rows, desc=desc, unit="rows", unit_scale=True, file=sys.stderr, disable=not show) as bar:
        for k, start in enumerate(range(0, rows, chunk_rows)):
            n = min(chunk_rows, rows - start)
            table = make_chunk(k, n)
            is_eval = _eval_mask(np.arange(start, start + n), rows, n_eval)
            writers["eval"].write(table.filter(pa.array(is_eval)))
            writers["train"].write(table.filter(pa.array(~is_eval)))
            bar.update(n)
    for w in writers.values():
        w.close()
    schema.save(out)
    return schema


# --------------------------------------------------------------------------- recsys generator


def _normal_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n x d`` Gaussian rows with E|row|^2 = 1."""
    return rng.standard_normal((n, d)) / math.sqrt(d)


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** (-a)
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def _ragged_gather(
    starts: np.ndarray, lengths: np.ndarray, pool: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For rows with slices ``pool[starts[i] : starts[i] + lengths[i]]``: (offsets, values)."""
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)  # position inside each row
    return offsets, pool[np.repeat(starts, lengths) + within]


class _RecsysWorld:
    """The fixed part of a recsys dataset (latents, attributes, calibration); rows are sampled from it.

    Everything here is a deterministic function of the constructor arguments.
    """

    NUM_AGE = 8
    NUM_REGION = 64
    NUM_HOUR = 24

    def __init__(
        self,
        *,
        seed: int,
        num_tasks: int,
        num_users: int,
        num_items: int,
        zipf_a: float,
        latent_dim: int,
        task_divergence: float,
        positive_rates: Sequence[float],
        num_dense: int,
        num_multi_hot: int,
        sample_space: str | None,
        num_categories: int,
        num_tags: int,
        max_history: int,
        max_tags: int,
        signal_scale: float,
    ) -> None:
        if not 1 <= num_tasks <= len(TASK_NAMES):
            raise ValueError(f"num_tasks must lie in [1, {len(TASK_NAMES)}], got {num_tasks}")
        if len(positive_rates) < num_tasks:
            raise ValueError(f"need {num_tasks} positive_rates, got {len(positive_rates)}")
        if not 0.0 <= task_divergence <= 1.0:
            raise ValueError(f"task_divergence must lie in [0, 1], got {task_divergence}")
        if not 0 <= num_multi_hot <= 2:
            raise ValueError(f"num_multi_hot must be 0, 1 or 2, got {num_multi_hot}")
        if num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {num_dense}")
        if min(num_users, num_items, num_categories, num_tags, max_history, max_tags, latent_dim) <= 0:
            raise ValueError("sizes (users, items, categories, tags, max_history, max_tags, latent_dim) must be positive")
        if sample_space is not None:
            if sample_space not in SAMPLE_SPACES:
                raise ValueError(f"unknown sample_space {sample_space!r}; choose from {SAMPLE_SPACES} or None")
            if num_tasks < 2:
                raise ValueError(f"sample_space={sample_space!r} needs num_tasks >= 2")
        self.seed = seed
        self.num_tasks = num_tasks
        self.num_users, self.num_items = num_users, num_items
        self.num_dense, self.num_multi_hot = num_dense, num_multi_hot
        self.sample_space = sample_space
        self.num_categories, self.num_tags = num_categories, num_tags
        self.max_history, self.max_tags = max_history, max_tags
        self.num_authors = max(1, num_items // 10)
        self.delta = task_divergence
        self.signal_scale = signal_scale
        self.rates = [float(r) for r in positive_rates[:num_tasks]]
        self.task_names = list(TASK_NAMES[:num_tasks])

        rng = np.random.default_rng([seed, _WORLD])
        d, T = latent_dim, num_tasks
        # Zipf popularity over a random permutation of ids.
        self.user_cdf, self.user_perm = _zipf_cdf(num_users, zipf_a), rng.permutation(num_users)
        self.item_cdf, self.item_perm = _zipf_cdf(num_items, zipf_a), rng.permutation(num_items)
        # Attributes are hashes of the id, so they are fixed per id and carry its signal.
        uid, iid = np.arange(num_users), np.arange(num_items)
        self.user_age = (_hash(uid, seed, 1) % np.uint64(self.NUM_AGE)).astype(np.int64)
        self.user_region = (_hash(uid, seed, 2) % np.uint64(self.NUM_REGION)).astype(np.int64)
        self.user_pref_cat = (_hash(uid, seed, 3) % np.uint64(num_categories)).astype(np.int64)
        self.item_cat = (_hash(iid, seed, 4) % np.uint64(num_categories)).astype(np.int64)
        self.item_author = (_hash(iid, seed, 5) % np.uint64(self.num_authors)).astype(np.int64)
        self.item_tag_len = 1 + (_hash(iid, seed, 6) % np.uint64(max_tags)).astype(np.int64)
        slot = (iid[:, None] * max_tags + np.arange(max_tags)[None, :]).ravel()  # I*max_tags
        tag_table = (_hash(slot, seed, 7) % np.uint64(num_tags)).astype(np.int64).reshape(num_items, max_tags)
        keep = np.arange(max_tags)[None, :] < self.item_tag_len[:, None]  # I x max_tags
        self.tag_pool = tag_table[keep]  # row-major: item 0's tags, then item 1's, ...
        self.tag_start = np.r_[0, np.cumsum(self.item_tag_len)[:-1]]
        # Items grouped by category, for category-aware history sampling.
        self.items_by_cat = np.argsort(self.item_cat, kind="stable")
        self.cat_count = np.bincount(self.item_cat, minlength=num_categories)
        self.cat_start = np.r_[0, np.cumsum(self.cat_count)[:-1]]

        # Latent factors: one shared set (index 0) and one per task (1..T), each built from
        # attribute components (learnable from few rows) plus an individual component.
        tag_sum = np.zeros((num_items, d))

        def latents(r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            cat = _normal_rows(r, num_categories, d)
            u = (
                _normal_rows(r, self.NUM_AGE, d)[self.user_age]
                + _normal_rows(r, self.NUM_REGION, d)[self.user_region]
                + 1.5 * cat[self.user_pref_cat]
                + 0.5 * _normal_rows(r, num_users, d)
            )  # U x d
            tags = _normal_rows(r, num_tags, d)
            np.add.reduceat(tags[self.tag_pool], self.tag_start, axis=0, out=tag_sum)  # I x d
            v = (
                1.5 * cat[self.item_cat]
                + _normal_rows(r, self.num_authors, d)[self.item_author]
                + tag_sum / self.item_tag_len[:, None]
                + 0.5 * _normal_rows(r, num_items, d)
            )  # I x d
            return u, v

        self.user_lat, self.item_lat = zip(*(latents(rng) for _ in range(T + 1)))
        # Additive main effects per task: ((1-delta) * shared + delta * task-specific) / norm.
        norm = math.hypot(1 - self.delta, self.delta)

        def effects(n: int, scale: float) -> np.ndarray:  # T x n
            shared = rng.normal(0.0, scale, n)
            return np.stack([((1 - self.delta) * shared + self.delta * rng.normal(0.0, scale, n)) / norm for _ in range(T)])

        self.age_eff, self.region_eff = effects(self.NUM_AGE, 0.5), effects(self.NUM_REGION, 0.5)
        self.user_eff, self.item_eff = effects(num_users, 0.5), effects(num_items, 0.5)
        self.cat_eff, self.author_eff = effects(num_categories, 0.7), effects(self.num_authors, 0.5)
        self.hour_eff = effects(self.NUM_HOUR, 0.3)
        # Dense features: even ones read the user latent, odd ones the item latent.
        self.dense_proj = rng.standard_normal((num_dense, d))
        self.dense_coef = effects(num_dense, 0.4)  # T x F

        # Calibration on a fixed pilot sample: normalise the latent scores, then the bias.
        self.score_std = np.ones(T + 1)
        self.dense_std = np.ones(num_dense)
        self.bias = np.zeros(T)
        pilot = self.sample(np.random.default_rng([seed, _PILOT]), _PILOT_ROWS, with_labels=False)
        raw = pilot["raw_scores"]  # n x (T+1)
        self.score_std = raw.std(axis=0) + 1e-12
        self.dense_std = pilot["raw_dense"].std(axis=0) + 1e-12 if num_dense else self.dense_std
        z = self.sample(np.random.default_rng([seed, _PILOT]), _PILOT_ROWS, with_labels=False)["logits"]
        for t in range(T):
            weights = _sigmoid(z[:, 0] + self.bias[0]) if self._after_click(t) else None
            self.bias[t] = _calibrate_bias(z[:, t], self.rates[t], weights)
        pilot = self.sample(np.random.default_rng([seed, _PILOT]), _PILOT_ROWS, with_labels=True)
        self.oracle_auc = {}
        for t, name in enumerate(self.task_names):
            valid = pilot["label_valid"][:, t]
            self.oracle_auc[name] = round(_rank_auc(pilot["logits"][valid, t], pilot["labels"][valid, t]), 4)

    def _after_click(self, t: int) -> bool:
        if self.sample_space == "cvr_after_click":
            return t == 1
        if self.sample_space == "after_click":
            return t >= 1
        return False

    def sample(self, rng: np.random.Generator, n: int, *, with_labels: bool = True) -> dict[str, np.ndarray]:
        """Draws ``n`` rows: ids, features, true logits ``n x T`` and (optionally) labels."""
        T = self.num_tasks
        user = self.user_perm[np.minimum(np.searchsorted(self.user_cdf, rng.random(n)), self.num_users - 1)]
        item = self.item_perm[np.minimum(np.searchsorted(self.item_cdf, rng.random(n)), self.num_items - 1)]
        hour = rng.integers(0, self.NUM_HOUR, n)
        out: dict[str, np.ndarray] = {"user": user, "item": item, "hour": hour}

        # Recent items: 60% from the user's preferred category, the rest by popularity.
        hist_len = rng.integers(1, self.max_history + 1, n)
        total = int(hist_len.sum())
        owner = np.repeat(user, hist_len)
        pref = self.user_pref_cat[owner]
        in_cat = self.items_by_cat[
            np.minimum(self.cat_start[pref] + (rng.random(total) * self.cat_count[pref]).astype(np.int64), self.num_items - 1)
        ]
        popular = self.item_perm[np.minimum(np.searchsorted(self.item_cdf, rng.random(total)), self.num_items - 1)]
        use_cat = (rng.random(total) < 0.6) & (self.cat_count[pref] > 0)
        out["hist_offsets"] = np.r_[0, np.cumsum(hist_len)]
        out["hist_values"] = np.where(use_cat, in_cat, popular)
        out["tag_offsets"], out["tag_values"] = _ragged_gather(self.tag_start[item], self.item_tag_len[item], self.tag_pool)

        raw = np.stack(
            [np.einsum("nd,nd->n", self.user_lat[k][user], self.item_lat[k][item]) for k in range(T + 1)], axis=1
        )  # n x (T+1)
        out["raw_scores"] = raw
        z = raw / self.score_std  # n x (T+1), unit variance on the pilot
        lat = (1 - self.delta) * z[:, :1] + self.delta * z[:, 1:]  # n x T
        lat = lat / math.hypot(1 - self.delta, self.delta)
        logits = self.signal_scale * lat
        logits += (
            self.age_eff[:, self.user_age[user]] + self.region_eff[:, self.user_region[user]]
            + self.user_eff[:, user] + self.item_eff[:, item]
            + self.cat_eff[:, self.item_cat[item]] + self.author_eff[:, self.item_author[item]]
            + self.hour_eff[:, hour]
        ).T  # n x T
        if self.num_dense:
            side = np.where(np.arange(self.num_dense) % 2 == 0, 0, 1)  # F: 0 = user latent, 1 = item latent
            u_part = self.user_lat[0][user] @ self.dense_proj.T  # n x F
            v_part = self.item_lat[0][item] @ self.dense_proj.T  # n x F
            raw_dense = np.where(side[None, :] == 0, u_part, v_part)
            out["raw_dense"] = raw_dense
            dense = raw_dense / self.dense_std + 0.5 * rng.standard_normal((n, self.num_dense))
            out["dense"] = dense.astype(np.float32)
            logits += dense @ self.dense_coef.T  # n x T
        else:
            out["dense"] = np.zeros((n, 0), np.float32)
        logits += self.bias[None, :]
        out["logits"] = logits
        if with_labels:
            labels = rng.random((n, T)) < _sigmoid(logits)  # n x T
            valid = np.ones((n, T), dtype=bool)
            for t in range(T):
                if self._after_click(t):
                    valid[:, t] = labels[:, 0]
            out["labels"], out["label_valid"] = labels, valid
        return out

    # ---- schema / arrow

    def schema(self, metadata: dict) -> Schema:
        sparse = [
            SparseFeature("user_id", self.num_users, side="user"),
            SparseFeature("user_age_bucket", self.NUM_AGE, side="user"),
            SparseFeature("user_region", self.NUM_REGION, side="user"),
            SparseFeature("item_id", self.num_items, side="item"),
            SparseFeature("item_category", self.num_categories, side="item"),
            SparseFeature("item_author", self.num_authors, side="item"),
            SparseFeature("context_hour", self.NUM_HOUR, side="context"),
        ]
        multi = [
            SparseFeature("user_recent_items", self.num_items, multi_hot=True, pooling="mean", side="user"),
            SparseFeature("item_tags", self.num_tags, multi_hot=True, pooling="mean", side="item"),
        ]
        return Schema(
            sparse=tuple(sparse + multi[: self.num_multi_hot]),
            dense=tuple(DenseFeature(f"dense_{j}") for j in range(self.num_dense)),
            tasks=tuple(TaskSpec(name, "binary") for name in self.task_names),
            user_id_feature="user_id",
            metadata=metadata,
        )

    def table(self, rows: dict[str, np.ndarray], schema: Schema) -> pa.Table:
        cols: dict[str, pa.Array] = {
            "user_id": pa.array(rows["user"], pa.int64()),
            "user_age_bucket": pa.array(self.user_age[rows["user"]], pa.int64()),
            "user_region": pa.array(self.user_region[rows["user"]], pa.int64()),
            "item_id": pa.array(rows["item"], pa.int64()),
            "item_category": pa.array(self.item_cat[rows["item"]], pa.int64()),
            "item_author": pa.array(self.item_author[rows["item"]], pa.int64()),
            "context_hour": pa.array(rows["hour"], pa.int64()),
            "user_recent_items": pa.ListArray.from_arrays(
                pa.array(rows["hist_offsets"], pa.int32()), pa.array(rows["hist_values"], pa.int64())
            ),
            "item_tags": pa.ListArray.from_arrays(
                pa.array(rows["tag_offsets"], pa.int32()), pa.array(rows["tag_values"], pa.int64())
            ),
        }
        for j, f in enumerate(schema.dense):
            cols[f.name] = pa.array(rows["dense"][:, j], pa.float32())
        for t, name in enumerate(schema.task_names):
            cols[name] = pa.array(rows["labels"][:, t].astype(np.float32), pa.float32(), mask=~rows["label_valid"][:, t])
        names = schema.sparse_names + schema.dense_names + schema.task_names
        return pa.table({k: cols[k] for k in names})


def _arrow_schema(schema: Schema) -> pa.Schema:
    fields = [pa.field(f.name, pa.list_(pa.int64()) if f.multi_hot else pa.int64(), nullable=False) for f in schema.sparse]
    fields += [pa.field(f.name, pa.float32(), nullable=False) for f in schema.dense]
    fields += [pa.field(t.name, pa.float32(), nullable=True) for t in schema.tasks]
    return pa.schema(fields)


def generate_recsys(
    out_dir: str | Path,
    *,
    rows: int = 200_000,
    seed: int = 0,
    num_tasks: int = 2,
    num_users: int = 10_000,
    num_items: int = 20_000,
    zipf_a: float = 1.1,
    latent_dim: int = 8,
    task_divergence: float = 0.5,
    positive_rates: Sequence[float] | None = None,
    num_dense: int = 4,
    num_multi_hot: int = 2,
    sample_space: str | None = None,
    num_categories: int = 100,
    num_tags: int = 1_000,
    max_history: int = 10,
    max_tags: int = 5,
    signal_scale: float = 2.0,
    eval_fraction: float = 0.1,
    rows_per_file: int = 1_048_576,
    row_group_size: int = 16_384,
    progress: bool | None = None,
) -> Schema:
    """Writes a synthetic multi-task recommendation dataset and returns its schema.

    Users and items are drawn with Zipf(``zipf_a``) popularity. Each user/item has a shared
    latent vector ``u_s``/``v_s`` and one per task ``u_t``/``v_t`` (built from its attributes plus
    an individual part). Task ``t``'s logit is::

        signal_scale * ((1-δ) <u_s,v_s> + δ <u_t,v_t>) / |(1-δ, δ)|     # δ = task_divergence
        + attribute/context main effects + dense-feature term + bias_t

    (each inner product standardised on a pilot sample), with ``bias_t`` calibrated on a fixed
    pilot sample so that the positive rate is ``positive_rates[t]``; labels ~ Bernoulli(sigmoid).
    ``task_divergence=0`` gives identical task logits (up to biases), ``1`` independent ones.

    Columns (single-valued sparse ``int64``, multi-hot ``list<int64>``, dense ``float32``,
    labels ``float32`` 0/1, null outside the task's sample space):

    * ``user_id`` (side user, the schema's ``user_id_feature``), ``user_age_bucket`` (8),
      ``user_region`` (64) — attributes are hashes of the user id;
    * ``item_id``, ``item_category`` (``num_categories``), ``item_author`` (``num_items // 10``);
    * ``context_hour`` (24);
    * ``user_recent_items`` (1..``max_history`` item ids, 60% from the user's preferred
      category) and ``item_tags`` (1..``max_tags`` tag ids, fixed per item) — the first
      ``num_multi_hot`` of these two;
    * ``dense_0 .. dense_{num_dense-1}``: noisy projections of the user (even j) or item (odd j)
      shared latent, roughly standardised;
    * labels ``click``, ``like``, ``finish``, ``share``, ... (the first ``num_tasks``).

    ``schema.metadata`` records the knobs and ``oracle_auc`` (AUC of the true logit on a pilot
    sample: the ceiling any model can reach).

    Args:
        out_dir (str | Path): dataset directory; existing ``train``/``eval`` part files are replaced.
        rows (int): total rows (train + eval).
        seed (int): all randomness derives from it; same seed and knobs → identical rows.
        num_tasks (int): number of binary tasks (at most 8).
        num_users (int): user vocabulary.
        num_items (int): item vocabulary.
        zipf_a (float): Zipf exponent of user and item popularity.
        latent_dim (int): size of the latent vectors.
        task_divergence (float): δ in [0, 1]; weight of the task-specific latent term.
        positive_rates (Sequence[float] | None): target positive rate per task; default
            ``DEFAULT_POSITIVE_RATES`` (click 0.3, like 0.05, finish 0.15, share 0.02, ...).
            Under a sample space a conditioned task's rate is its rate among clicked rows.
        num_dense (int): number of dense features (may be 0).
        num_multi_hot (int): 0, 1 (``user_recent_items``) or 2 (+ ``item_tags``).
        sample_space (str | None): ``None`` (all labels defined), ``"cvr_after_click"``
            (ESMM-style: task 1's label is null unless task 0 is positive) or
            ``"after_click"`` (every task after the first is null unless task 0 is positive).
        num_categories (int): item categories.
        num_tags (int): tag vocabulary.
        max_history (int): maximum ``user_recent_items`` length.
        max_tags (int): maximum ``item_tags`` length.
        signal_scale (float): scale of the latent term of the logit (higher = easier tasks).
        eval_fraction (float): fraction of rows written to ``eval`` (exactly ``round(rows * f)``).
        rows_per_file (int): rows per parquet file.
        row_group_size (int): rows per parquet row group (the unit the reader splits on).
        progress (bool | None): tqdm bar on stderr; default on for >= 500k rows.

    Returns:
        Schema: the dataset schema (also saved as ``out_dir/schema.json``).

    Example::

        >>> import tempfile, pyarrow.parquet as pq
        >>> d = tempfile.mkdtemp()
        >>> s = generate_recsys(d, rows=2_000, num_users=100, num_items=200)
        >>> s.task_names, s.user_id_feature
        (['click', 'like'], 'user_id')
        >>> pq.read_table(f"{d}/train/part-00000.parquet").num_rows
        1800
    """
    _check_layout(rows, eval_fraction, rows_per_file, row_group_size)
    rates = list(DEFAULT_POSITIVE_RATES if positive_rates is None else positive_rates)
    knobs = dict(
        rows=rows, seed=seed, num_tasks=num_tasks, num_users=num_users, num_items=num_items, zipf_a=zipf_a,
        latent_dim=latent_dim, task_divergence=task_divergence, positive_rates=rates[:num_tasks],
        num_dense=num_dense, num_multi_hot=num_multi_hot, sample_space=sample_space,
        num_categories=num_categories, num_tags=num_tags, max_history=max_history, max_tags=max_tags,
        signal_scale=signal_scale, eval_fraction=eval_fraction,
    )  # fmt: skip
    world = _RecsysWorld(
        seed=seed, num_tasks=num_tasks, num_users=num_users, num_items=num_items, zipf_a=zipf_a,
        latent_dim=latent_dim, task_divergence=task_divergence, positive_rates=rates, num_dense=num_dense,
        num_multi_hot=num_multi_hot, sample_space=sample_space, num_categories=num_categories,
        num_tags=num_tags, max_history=max_history, max_tags=max_tags, signal_scale=signal_scale,
    )  # fmt: skip
    schema = world.schema({"generator": "recsys", "knobs": knobs, "oracle_auc": world.oracle_auc})
    arrow_schema = _arrow_schema(schema)

    def make_chunk(k: int, n: int) -> pa.Table:
        rows_k = world.sample(np.random.default_rng([seed, _ROWS, k]), n)
        return world.table(rows_k, schema).cast(arrow_schema)

    return _write_dataset(
        out_dir, schema, arrow_schema, make_chunk, rows=rows, chunk_rows=_RECSYS_CHUNK,
        eval_fraction=eval_fraction, rows_per_file=rows_per_file, row_group_size=row_group_size,
        progress=progress, desc="recsys",
    )  # fmt: skip


# --------------------------------------------------------------------------- MMoE generator


class _MMoEWorld:
    """Task weight vectors and sine parameters of the MMoE synthetic benchmark."""

    def __init__(self, *, seed: int, correlation: float, c: float, m: int, d: int) -> None:
        if not -1.0 <= correlation <= 1.0:
            raise ValueError(f"correlation must lie in [-1, 1], got {correlation}")
        if d < 2 or m < 0:
            raise ValueError(f"need d >= 2 and m >= 0, got d={d}, m={m}")
        rng = np.random.default_rng([seed, _WORLD])
        q, _ = np.linalg.qr(rng.standard_normal((d, 2)))  # d x 2, orthonormal columns
        u1, u2 = q[:, 0], q[:, 1]
        p = correlation
        self.w = np.stack([c * u1, c * (p * u1 + math.sqrt(1.0 - p * p) * u2)], axis=1)  # d x 2
        self.alpha = rng.standard_normal(m)
        self.beta = rng.standard_normal(m)
        self.d = d

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``x`` (``n x d`` float32) and ``y`` (``n x 2`` float32)."""
        x = rng.standard_normal((n, self.d))  # n x d
        wx = x @ self.w  # n x 2
        y = wx + np.sin(wx[:, :, None] * self.alpha + self.beta).sum(axis=2)  # (n x 2 x m) summed -> n x 2
        y += rng.normal(0.0, 0.1, (n, 2))  # N(0, 0.01): variance 0.01
        return x.astype(np.float32), y.astype(np.float32)


def generate_mmoe(
    out_dir: str | Path,
    *,
    rows: int = 100_000,
    seed: int = 0,
    correlation: float = 0.5,
    c: float = 1.0,
    m: int = 10,
    d: int = 512,
    eval_fraction: float = 0.1,
    rows_per_file: int = 1_048_576,
    row_group_size: int = 16_384,
    progress: bool | None = None,
) -> Schema:
    """Writes the MMoE paper's synthetic two-task regression benchmark (Ma et al. 2018, §3.2).

    As used in PLE §5.2.1: orthonormal ``u1, u2`` in R^d, ``w1 = c u1``,
    ``w2 = c (p u1 + sqrt(1-p^2) u2)`` with ``p = correlation`` (the cosine of the two task
    weight vectors), ``alpha_i, beta_i ~ N(0, 1)`` for ``i = 1..m``, ``x ~ N(0, I_d)`` and::

        y_k = w_k^T x + sum_i sin(alpha_i w_k^T x + beta_i) + eps,   eps ~ N(0, 0.01)

    (0.01 is the noise variance). The label correlation grows with ``correlation`` but is not
    equal to it (the sine terms are non-linear).

    Columns: ``x0 .. x{d-1}`` dense ``float32``; labels ``y1``, ``y2`` (regression tasks);
    ``bias_id`` — a dummy single-valued sparse feature, always 0 with ``num_embeddings=1``,
    present only because every model needs at least one sparse feature (its embedding acts as a
    learned constant input).

    Args:
        out_dir (str | Path): dataset directory; existing ``train``/``eval`` part files are replaced.
        rows (int): total rows (train + eval).
        seed (int): all randomness derives from it.
        correlation (float): ``p`` in [-1, 1], cosine between the task weight vectors.
        c (float): scale of the task weight vectors.
        m (int): number of sine terms.
        d (int): input dimension.
        eval_fraction (float): fraction of rows written to ``eval``.
        rows_per_file (int): rows per parquet file.
        row_group_size (int): rows per parquet row group.
        progress (bool | None): tqdm bar on stderr; default on for >= 500k rows.

    Returns:
        Schema: the dataset schema (also saved as ``out_dir/schema.json``).

    Example::

        >>> import tempfile
        >>> s = generate_mmoe(tempfile.mkdtemp(), rows=1_000, d=8)
        >>> s.task_names, s.dense_names[:2], s.sparse_names
        (['y1', 'y2'], ['x0', 'x1'], ['bias_id'])
    """
    _check_layout(rows, eval_fraction, rows_per_file, row_group_size)
    world = _MMoEWorld(seed=seed, correlation=correlation, c=c, m=m, d=d)
    knobs = dict(rows=rows, seed=seed, correlation=correlation, c=c, m=m, d=d, eval_fraction=eval_fraction)
    schema = Schema(
        sparse=(SparseFeature("bias_id", 1, side="context"),),
        dense=tuple(DenseFeature(f"x{j}") for j in range(d)),
        tasks=(TaskSpec("y1", "regression"), TaskSpec("y2", "regression")),
        user_id_feature=None,
        metadata={"generator": "mmoe", "knobs": knobs},
    )
    arrow_schema = _arrow_schema(schema)

    def make_chunk(k: int, n: int) -> pa.Table:
        x, y = world.sample(np.random.default_rng([seed, _ROWS, k]), n)
        arrays = [pa.array(np.zeros(n, np.int64))]
        arrays += [pa.array(col) for col in np.ascontiguousarray(x.T)]  # d arrays of n
        arrays += [pa.array(y[:, 0]), pa.array(y[:, 1])]
        return pa.Table.from_arrays(arrays, schema=arrow_schema)

    return _write_dataset(
        out_dir, schema, arrow_schema, make_chunk, rows=rows, chunk_rows=_MMOE_CHUNK,
        eval_fraction=eval_fraction, rows_per_file=rows_per_file, row_group_size=row_group_size,
        progress=progress, desc="mmoe",
    )  # fmt: skip
