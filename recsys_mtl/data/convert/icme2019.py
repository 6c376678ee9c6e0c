"""ICME 2019 short-video understanding challenge, track 2 → recsys_mtl dataset.

Raw format: ``final_track2_train.txt`` (optionally ``.gz``), tab-separated, no header, 12 columns:
``uid, user_city, item_id, author_id, item_city, channel, finish, like, music_id, device, time,
duration_time``; ``-1`` marks an unknown city / music.

Tasks: ``finish`` and ``like`` (0/1, defined on every row).

Features: sparse ``uid`` (the ``user_id_feature``), ``user_city``, ``device`` (side user),
``item_id``, ``author_id``, ``item_city``, ``music_id`` (item), ``channel`` (context), each with
a vocabulary and the ``min_count`` threshold (``-1`` is an ordinary value, so it gets its own id if
frequent); dense ``duration_time`` (``log1p`` then standardised with train statistics). ``time``
is used by no feature.

Split: row ``i`` (counted across the inputs in the given order) is eval iff
``splitmix64(i; seed) / 2**64 < eval_fraction`` — a reproducible random split (the challenge's
own test labels were never released).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys_mtl.data.convert.common import (
    Chunk,
    ConvertError,
    FeatureSpec,
    Source,
    binary_label,
    hash_eval_mask,
    log1p_nonneg,
    read_csv_chunks,
)

COLUMNS = ["uid", "user_city", "item_id", "author_id", "item_city", "channel", "finish", "like", "music_id",
           "device", "time", "duration_time"]
SIDES = {"uid": "user", "user_city": "user", "device": "user", "item_id": "item", "author_id": "item",
         "item_city": "item", "music_id": "item", "channel": "context"}


class ICME2019(Source):
    name = "icme2019"
    tasks = ("finish", "like")
    user_id_feature = "uid"

    def __init__(self, inputs: Sequence[str | Path], *, eval_fraction: float = 0.1, seed: int = 0,
                 max_rows: int | None = None) -> None:
        self.inputs = [Path(p) for p in inputs]
        if not self.inputs:
            raise ConvertError("icme2019: no input files")
        self.eval_fraction, self.seed, self.max_rows = eval_fraction, seed, max_rows

    def spec(self, feature: str) -> FeatureSpec:
        return FeatureSpec(side=SIDES[feature])

    def feature_order(self, names: list[str]) -> list[str]:
        return [c for c in SIDES if c in names]

    def metadata(self) -> dict:
        return {
            "inputs": [str(p) for p in self.inputs],
            "split": f"row i is eval iff splitmix64(i; seed={self.seed}) < eval_fraction={self.eval_fraction}",
            "tasks": {"finish": "raw finish column", "like": "raw like column"},
            "dense_transform": {"duration_time": "log1p then standardise"},
            "max_rows_per_file": self.max_rows,
        }

    def chunks(self, pass_index: int) -> Iterator[Chunk]:
        row0 = 0
        for path in self.inputs:
            for raw in read_csv_chunks(path, column_names=COLUMNS, delimiter="\t", quoting=False,
                                       max_rows=self.max_rows):
                n = raw.num_rows
                is_eval = hash_eval_mask(np.arange(row0, row0 + n), self.eval_fraction, self.seed)
                row0 += n
                sparse = {c: raw.numeric(c, pa.int64()) for c in SIDES}
                dense = {"duration_time": log1p_nonneg(np.asarray(raw.numeric("duration_time").fill_null(np.nan)))}
                labels = {t: binary_label(raw, t) for t in self.tasks}
                yield Chunk(is_eval=is_eval, sparse=sparse, dense=dense, labels=labels)
