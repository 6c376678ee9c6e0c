"""KuaiRand (KuaiRand-1K / -27K / -Pure) → recsys_mtl dataset.

Raw format: CSV files with a header line (optionally ``.gz``):

* ``log_standard_*.csv`` (and ``log_random_*.csv`` if given): ``user_id, video_id, date
  (YYYYMMDD), hourmin (HHMM), time_ms, is_click, is_like, is_follow, is_comment, is_forward,
  is_hate, long_view, play_time_ms, duration_ms, profile_stay_time, comment_stay_time,
  is_profile_enter, is_rand, tab`` — one impression per line;
* ``user_features_*.csv``: ``user_id`` + user attributes (joined on ``user_id``);
* ``video_features_basic_*.csv``: ``video_id, author_id, video_type, upload_dt, upload_type,
  visible_status, video_duration, server_width, server_height, music_id, music_type, tag``
  (joined on ``video_id``). ``video_features_statistic_*`` is rejected: its counters aggregate
  the whole logging period, including the eval days.

Tasks (``tasks``, default ``is_click, is_like, is_follow, is_comment, is_forward, long_view``; also
``is_hate``, ``is_profile_enter``): the log's 0/1 columns, defined on every impression.

Features:

* sparse, side ``user``: ``user_id`` (the ``user_id_feature``) and every user-table column except
  the numeric counters (``user_active_degree``, ``is_lowactive_period``, ``is_live_streamer``,
  ``is_video_author``, ``*_range``, ``onehot_feat0..17``);
* sparse, side ``item``: ``video_id``, ``author_id``, ``video_type``, ``upload_type``,
  ``visible_status``, ``server_width``, ``server_height``, ``music_id``, ``music_type`` and
  ``tag`` (multi-hot, the comma-separated tag list, mean pooling);
* sparse, side ``context``: ``hour`` (``hourmin // 100``), ``tab``;
* dense: ``duration_ms`` and the user counters (``follow_user_num``, ``fans_user_num``,
  ``friend_user_num``, ``register_days``), ``log1p`` then standardised with train statistics.

Post-exposure columns (``play_time_ms``, stay times, ``time_ms``) and ``is_rand`` are not features.
A user or video missing from its table gets id 0 / the train mean for its features.

Split by date: eval = every impression on or after ``split_date``; by default ``split_date`` is
the latest date such that the days from it on hold at least ``eval_fraction`` of the impressions
(at least one whole day; found in a first pass over the ``date`` column).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_mtl.data.convert.common import (
    Chunk,
    ConvertError,
    CsvChunk,
    FeatureSpec,
    Source,
    binary_label,
    log1p_nonneg,
    parse_tasks,
    read_csv_chunks,
    split_list,
    strings,
)

TASKS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "long_view", "is_hate", "is_profile_enter")
DEFAULT_TASKS = TASKS[:6]
USER_DENSE = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
VIDEO_SPARSE = ("author_id", "video_type", "upload_type", "visible_status", "server_width", "server_height",
                "music_id", "music_type")
INT_IDS = ("user_id", "video_id", "author_id", "music_id")
LOG_REQUIRED = ("user_id", "video_id", "date", "hourmin", "tab", "duration_ms")


def _ids_or_strings(col: pa.Array) -> pa.Array:
    """Integer column when every non-empty value is an integer, else trimmed strings."""
    s = strings(col)
    if pc.all(pc.or_kleene(pc.is_null(s), pc.match_substring_regex(s, r"^-?[0-9]+$"))).as_py() is not False:
        return pc.cast(s, pa.int64())
    return s


class _Table:
    """A side table held in memory, joined on an integer key."""

    def __init__(self, path: Path, key: str) -> None:
        chunks = list(read_csv_chunks(path, required_columns=[key]))
        if not chunks:
            raise ConvertError(f"{path}: empty table")
        keys = np.concatenate([np.asarray(c.numeric(key, pa.int64())) for c in chunks])
        self.table = pa.concat_tables([c.table for c in chunks]).combine_chunks()
        self.path, self.columns = path, [c for c in self.table.column_names if c != key]
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]

    def rows_for(self, keys: np.ndarray) -> pa.Array:
        """Row index (int64, null when absent) of each key."""
        if self.sorted_keys.size == 0:
            return pa.nulls(keys.size, pa.int64())
        pos = np.minimum(np.searchsorted(self.sorted_keys, keys), self.sorted_keys.size - 1)
        hit = self.sorted_keys[pos] == keys
        return pa.array(self.order[pos], pa.int64(), mask=~hit)

    def dense(self, name: str) -> np.ndarray:
        col = strings(self.table.column(name))
        try:
            return np.asarray(pc.cast(col, pa.float64()).fill_null(np.nan))
        except pa.ArrowInvalid:
            bad = next(i for i, v in enumerate(col.to_pylist()) if v is not None and not _is_float(v))
            raise ConvertError(f"{self.path}, line {bad + 2}: column {name!r}: expected a number, "
                               f"got {col[bad].as_py()!r}") from None


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


class KuaiRand(Source):
    name = "kuairand"
    user_id_feature = "user_id"

    def __init__(self, inputs: Sequence[str | Path], *, tasks: str | Sequence[str] | None = None,
                 eval_fraction: float = 0.1, split_date: int | None = None, max_rows: int | None = None) -> None:
        self.logs, user_path, video_path = [], None, None
        for p in map(Path, inputs):
            if re.match(r"log_", p.name):
                self.logs.append(p)
            elif re.match(r"user_features", p.name):
                user_path = p
            elif re.match(r"video_features_basic", p.name):
                video_path = p
            else:
                raise ConvertError(f"kuairand: {p}: expected log_*.csv, user_features_*.csv or "
                                   "video_features_basic_*.csv")
        if not self.logs:
            raise ConvertError("kuairand: no log_*.csv input")
        self.user_path, self.video_path = user_path, video_path
        self.tasks = parse_tasks(tasks, TASKS, DEFAULT_TASKS)
        self.eval_fraction, self.max_rows = eval_fraction, max_rows
        self.split_date = split_date
        self._users: _Table | None = None
        self._videos: _Table | None = None
        self.date_counts: dict[int, int] = {}

    # ---- side tables and split

    def _prepare(self) -> None:
        if self.user_path is not None and self._users is None:
            self._users = _Table(self.user_path, "user_id")
            self._user_dense = {c: log1p_nonneg(self._users.dense(c)) for c in USER_DENSE if c in self._users.columns}
            self._user_sparse = {c: _ids_or_strings(self._users.table.column(c))
                                 for c in self._users.columns if c not in USER_DENSE}
        if self.video_path is not None and self._videos is None:
            self._videos = _Table(self.video_path, "video_id")
            cols = self._videos.columns
            self._video_sparse = {c: _ids_or_strings(self._videos.table.column(c)) for c in VIDEO_SPARSE if c in cols}
            if "tag" in cols:
                self._video_sparse["tag"] = split_list(self._videos.table.column("tag").combine_chunks(), ",")
        if self.split_date is None:
            counts: dict[int, int] = {}
            for path in self.logs:
                for raw in read_csv_chunks(path, include_columns=["date"], required_columns=["date"],
                                           max_rows=self.max_rows):
                    d, c = np.unique(np.asarray(raw.numeric("date", pa.int64())), return_counts=True)
                    for k, v in zip(d.tolist(), c.tolist()):
                        counts[k] = counts.get(k, 0) + v
            self.date_counts = counts
            total, acc = sum(counts.values()), 0
            for d in sorted(counts, reverse=True):
                acc += counts[d]
                if acc >= self.eval_fraction * total:
                    self.split_date = d
                    break
            if self.split_date is None:
                raise ConvertError("kuairand: log files have no rows")

    def spec(self, feature: str) -> FeatureSpec:
        if feature == "tag":
            return FeatureSpec(side="item", multi_hot=True, pooling="mean")
        if feature in ("hour", "tab"):
            return FeatureSpec(side="context")
        if feature == "video_id" or feature in VIDEO_SPARSE:
            return FeatureSpec(side="item")
        return FeatureSpec(side="user")

    def feature_order(self, names: list[str]) -> list[str]:
        side_rank = {"user": 0, "item": 1, "context": 2}
        return sorted(names, key=lambda n: (side_rank[self.spec(n).side], names.index(n)))

    def metadata(self) -> dict:
        return {
            "inputs": [str(p) for p in [*self.logs, self.user_path, self.video_path] if p is not None],
            "split": f"by date: eval = impressions with date >= {self.split_date}"
                     + ("" if not self.date_counts else f" (latest days holding >= {self.eval_fraction} of rows)"),
            "split_date": self.split_date,
            "rows_per_date": {str(k): v for k, v in sorted(self.date_counts.items())},
            "tasks": {t: f"log column {t}" for t in self.tasks},
            "dense_transform": "log1p then standardise",
            "max_rows_per_file": self.max_rows,
        }

    # ---- rows

    def chunks(self, pass_index: int) -> Iterator[Chunk]:
        self._prepare()
        for path in self.logs:
            for raw in read_csv_chunks(path, required_columns=[*LOG_REQUIRED, *self.tasks], max_rows=self.max_rows):
                yield self._chunk(raw)

    def _chunk(self, raw: CsvChunk) -> Chunk:
        date = np.asarray(raw.numeric("date", pa.int64()))
        user = raw.numeric("user_id", pa.int64())
        video = raw.numeric("video_id", pa.int64())
        hourmin = np.asarray(raw.numeric("hourmin", pa.int64()))
        sparse: dict[str, pa.Array] = {"user_id": user}
        dense: dict[str, np.ndarray] = {"duration_ms": log1p_nonneg(
            np.asarray(raw.numeric("duration_ms", allow_empty=True).fill_null(np.nan)))}
        if self._users is not None:
            rows = self._users.rows_for(np.asarray(user))
            for c, col in self._user_sparse.items():
                sparse[c] = pc.take(col, rows)
            r = np.asarray(rows.fill_null(0))
            for c, x in self._user_dense.items():
                dense[c] = np.where(np.asarray(rows.is_valid()), x[r], np.nan)
        sparse["video_id"] = video
        if self._videos is not None:
            rows = self._videos.rows_for(np.asarray(video))
            for c, col in self._video_sparse.items():
                sparse[c] = pc.take(col, rows)
        sparse["hour"] = pa.array(hourmin // 100, pa.int64())
        sparse["tab"] = strings(raw.table.column("tab"))
        labels = {t: binary_label(raw, t) for t in self.tasks}
        return Chunk(is_eval=date >= self.split_date, sparse=sparse, dense=dense, labels=labels)
