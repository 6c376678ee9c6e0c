"""Ali-CCP (Alibaba Click and Conversion Prediction, the ESMM release) → recsys_mtl dataset.

Raw format (comma-separated, no header, optionally ``.gz``):

* ``sample_skeleton_{train,test}.csv``: ``sample_id,click,purchase,common_feature_index,
  num_features,feature_list`` — one impression per line;
* ``common_features_{train,test}.csv``: ``common_feature_index,num_features,feature_list`` —
  the features shared by many impressions (the user side), keyed by an MD5 index.

``feature_list`` is ``num_features`` entries separated by ``\\x01``, each
``field_id\\x02feature_id\\x03value``. Every skeleton line is joined with the common-features
line of its index (from the common-features file of the same name suffix: ``_train`` with
``_train``, ``_test`` with ``_test``); an index absent from that file leaves those fields empty.

Features: one sparse feature ``f<field_id>`` per field seen in the train rows (``f101`` is the user
id, ``f205`` the item id, ...), vocabulary per field over the integer ``feature_id`` s with the
``min_count`` threshold. A field is multi-hot (``list<int64>``, mean pooling) if some train row
has several ids for it (``f109_14``, ``f110_14``, ``f127_14``, ``f150_14``, ...), otherwise
single-valued (a missing field → id 0; an empty list for multi-hot fields). The ``value`` part
of each entry (almost always 1.0) is ignored. Sides: fields ``1xx`` user, ``2xx`` item, others
(``3xx`` context, ``5xx``/``7xx``/``8xx`` user × item combinations) context;
``user_id_feature = f101``.

Tasks: ``click`` and ``purchase`` (the raw "conversion" column), both plain binary labels over all
impressions: ``purchase`` is the ESMM CTCVR label (click and buy); a CVR-style model restricts it
to clicked rows itself.

Split: ``*_train`` files → train, ``*_test`` → eval (the release's own split); files with any
other suffix: eval iff ``splitmix64(row index; seed) < eval_fraction``.

Memory: the common-features table of one pair is held in memory while its skeleton file is read
(the real train file has ~730k lines with hundreds of ids each: several GB). With ``max_rows``
only the indices referenced by the first ``max_rows`` skeleton lines are kept.
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
    _list_from,
    binary_label,
    hash_eval_mask,
    read_csv_chunks,
)

SKELETON_COLUMNS = ["sample_id", "click", "purchase", "common_feature_index", "num_features", "feature_list"]
COMMON_COLUMNS = ["common_feature_index", "num_features", "feature_list"]
_SKELETON_RE = re.compile(r"sample_skeleton_(.+?)\.csv")
_COMMON_RE = re.compile(r"common_features_(.+?)\.csv")


def parse_feature_lists(chunk: CsvChunk) -> dict[str, pa.Array]:
    """``feature_list`` column → ``{field: list<int64> of feature ids per row}``.

    Checks that each line has ``num_features`` well-formed entries; errors name the line.
    """
    n = chunk.num_rows
    col = pc.fill_null(chunk.table.column("feature_list").combine_chunks(), "")
    lists = pc.split_pattern(col, pattern="\x01")
    flat = lists.flatten()
    keep = np.asarray(pc.not_equal(flat, ""))
    lengths = np.asarray(pc.list_value_length(lists).fill_null(0))
    row = np.repeat(np.arange(n), lengths)[keep]
    flat = flat.filter(pa.array(keep))
    counts = np.bincount(row, minlength=n)
    declared = np.asarray(chunk.numeric("num_features", pa.int64()))
    if (counts != declared).any():
        i = int(np.flatnonzero(counts != declared)[0])
        raise ConvertError(f"{chunk.where(i)}: num_features is {declared[i]} but feature_list has {counts[i]} "
                           "entries (field\\x02id\\x03value separated by \\x01)")
    if len(flat) == 0:
        return {}
    parts = pc.split_pattern(flat, pattern="\x02")
    rest = pc.list_element(pc.if_else(pc.equal(pc.list_value_length(parts), 2), parts, pa.scalar(["", ""])), 1)
    id_val = pc.split_pattern(rest, pattern="\x03")
    ok = np.asarray(pc.and_(pc.equal(pc.list_value_length(parts), 2), pc.equal(pc.list_value_length(id_val), 2)))
    ids_text = pc.list_element(pc.if_else(pa.array(ok), id_val, pa.scalar(["0", "0"])), 0)
    ids_text = pc.utf8_trim_whitespace(ids_text)
    is_int = np.asarray(pc.match_substring_regex(ids_text, r"^-?[0-9]+$"))
    ok &= is_int
    if not ok.all():
        j = int(np.flatnonzero(~ok)[0])
        raise ConvertError(f"{chunk.where(int(row[j]))}: malformed feature entry {flat[j].as_py()!r} "
                           "(expected field_id\\x02integer_feature_id\\x03value)")
    fields = pc.utf8_trim_whitespace(pc.list_element(parts, 0))
    ids = pc.cast(ids_text, pa.int64())
    enc = pc.dictionary_encode(fields)
    codes = np.asarray(enc.indices)
    out = {}
    for k, name in enumerate(enc.dictionary.to_pylist()):
        sel = codes == k
        out[name] = _list_from(row[sel], ids.filter(pa.array(sel)), n)
    return out


def _concat_lists(a: pa.Array, b: pa.Array) -> pa.Array:
    """Row-wise concatenation of two list<int64> arrays of equal length."""
    n = len(a)
    rows, vals = [], []
    for arr in (a, b):
        lengths = np.asarray(pc.list_value_length(arr).fill_null(0))
        rows.append(np.repeat(np.arange(n), lengths))
        vals.append(np.asarray(pc.list_flatten(arr), np.int64))
    r, v = np.concatenate(rows), np.concatenate(vals)
    order = np.argsort(r, kind="stable")
    return _list_from(r[order], pa.array(v[order], pa.int64()), n)


def _field_key(field: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[_]", field))


class AliCCP(Source):
    name = "ali-ccp"
    tasks = ("click", "purchase")
    user_id_feature = "f101"

    def __init__(self, inputs: Sequence[str | Path], *, eval_fraction: float = 0.1, seed: int = 0,
                 max_rows: int | None = None) -> None:
        paths = [Path(p) for p in inputs]
        skeletons, commons = {}, {}
        for p in paths:
            m, c = _SKELETON_RE.search(p.name), _COMMON_RE.search(p.name)
            if m:
                skeletons[m.group(1)] = p
            elif c:
                commons[c.group(1)] = p
            else:
                raise ConvertError(f"ali-ccp: {p}: expected sample_skeleton_<name>.csv[.gz] or "
                                   "common_features_<name>.csv[.gz]")
        if not skeletons:
            raise ConvertError("ali-ccp: no sample_skeleton_*.csv input")
        missing = [str(skeletons[k]) for k in skeletons if k not in commons]
        if missing:
            raise ConvertError(f"ali-ccp: no common_features_<name>.csv for {missing}")
        self.pairs = [(k, skeletons[k], commons[k]) for k in sorted(skeletons, key=lambda k: (k != "train", k))]
        self.eval_fraction, self.seed, self.max_rows = eval_fraction, seed, max_rows
        self.unmatched = 0

    def spec(self, feature: str) -> FeatureSpec:
        field = feature[1:]
        side = "user" if field.startswith("1") else "item" if field.startswith("2") else "context"
        return FeatureSpec(side=side, multi_hot=None, pooling="mean")

    def feature_order(self, names: list[str]) -> list[str]:
        return sorted(names, key=lambda n: _field_key(n[1:]))

    def metadata(self) -> dict:
        return {
            "inputs": [str(p) for _, s, c in self.pairs for p in (s, c)],
            "split": "sample_skeleton_train -> train, sample_skeleton_test -> eval; other suffixes: eval iff "
                     f"splitmix64(row index; seed={self.seed}) < eval_fraction={self.eval_fraction}",
            "join": "skeleton rows joined with common_features rows of the same suffix on common_feature_index",
            "tasks": {"click": "raw click column", "purchase": "raw conversion column, over all impressions (CTCVR)"},
            "max_rows_per_file": self.max_rows,
            "rows_without_common_features": self.unmatched,
        }

    def _needed(self, skeleton: Path) -> set[str] | None:
        if self.max_rows is None:
            return None
        need: set[str] = set()
        for raw in read_csv_chunks(skeleton, column_names=SKELETON_COLUMNS, quoting=False, max_rows=self.max_rows):
            need.update(pc.utf8_trim_whitespace(raw.table.column("common_feature_index").combine_chunks()).to_pylist())
        return need

    def _load_common(self, path: Path, need: set[str] | None) -> tuple[pa.Array, dict[str, pa.Array]]:
        """(index keys, {field: list<int64> per common row}) of a common-features file."""
        keys, per_field = [], []
        for raw in read_csv_chunks(path, column_names=COMMON_COLUMNS, quoting=False):
            key = pc.utf8_trim_whitespace(raw.table.column("common_feature_index").combine_chunks())
            fields = parse_feature_lists(raw)
            if need is not None:
                sel = pc.is_in(key, value_set=pa.array(sorted(need), pa.string()))
                key = key.filter(sel)
                fields = {f: a.filter(sel) for f, a in fields.items()}
            keys.append(key)
            per_field.append(fields)
        all_fields = sorted({f for d in per_field for f in d})
        out = {}
        for f in all_fields:
            parts = [d.get(f, pa.nulls(len(k), pa.list_(pa.int64()))) for d, k in zip(per_field, keys)]
            out[f] = pa.concat_arrays([p.cast(pa.list_(pa.int64())) for p in parts])
        key_arr = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
        return key_arr, out

    def chunks(self, pass_index: int) -> Iterator[Chunk]:
        hashed_rows = 0
        self.unmatched = 0
        for suffix, skeleton, common in self.pairs:
            common_keys, common_fields = self._load_common(common, self._needed(skeleton))
            for raw in read_csv_chunks(skeleton, column_names=SKELETON_COLUMNS, quoting=False,
                                       max_rows=self.max_rows):
                n = raw.num_rows
                if suffix == "train" or suffix == "test":
                    is_eval = np.full(n, suffix == "test")
                else:
                    is_eval = hash_eval_mask(np.arange(hashed_rows, hashed_rows + n), self.eval_fraction, self.seed)
                    hashed_rows += n
                own = parse_feature_lists(raw)
                key = pc.utf8_trim_whitespace(raw.table.column("common_feature_index").combine_chunks())
                idx = pc.index_in(key, value_set=common_keys)
                self.unmatched += idx.null_count
                sparse: dict[str, pa.Array] = {}
                for f, arr in common_fields.items():
                    sparse[f] = pc.take(arr, idx)
                for f, arr in own.items():
                    sparse[f] = _concat_lists(sparse[f], arr) if f in sparse else arr
                labels = {"click": binary_label(raw, "click"), "purchase": binary_label(raw, "purchase")}
                yield Chunk(is_eval=is_eval, sparse={f"f{f}": a for f, a in sparse.items()}, labels=labels)
