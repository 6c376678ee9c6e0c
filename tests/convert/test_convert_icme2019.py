"""ICME 2019 track-2 converter on a small file in the raw release format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys_mtl.cli import main
from recsys_mtl.data.convert import ConvertError, convert
from recsys_mtl.data.convert.common import hash_eval_mask
from recsys_mtl.data.reader import check_dataset, make_dataloader
from recsys_mtl.data.schema import Schema


def _write(path: Path, n: int = 400) -> list[list[int]]:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n):
        uid, item = int(rng.integers(0, 30)), int(rng.integers(0, 50)) if i % 5 else 10_000 + i  # unique items
        music = -1 if i % 4 == 0 else int(rng.integers(0, 5))
        rows.append([uid, uid % 7, item, item % 11, -1 if i % 6 == 0 else 3, i % 4, int(rng.random() < 0.3),
                     int(rng.random() < 0.05), music, uid % 3, 53_000_000_000 + i, int(rng.integers(5, 60))])
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    return rows


def test_convert_split_labels_vocab(tmp_path, capsys):
    raw = tmp_path / "final_track2_train.txt"
    rows = _write(raw)
    out = tmp_path / "ds"
    assert main(["data", "convert", "icme2019", "--input", str(raw), "--out", str(out), "--min-count", "2",
                 "--eval-fraction", "0.2", "--seed", "5"]) == 0
    is_eval = hash_eval_mask(np.arange(len(rows)), 0.2, 5)
    assert check_dataset(out) == {"train": int((~is_eval).sum()), "eval": int(is_eval.sum())}
    schema = Schema.load(out)
    assert schema.task_names == ["finish", "like"] and schema.user_id_feature == "uid"
    assert {f.name: f.side for f in schema.sparse} == {
        "uid": "user", "user_city": "user", "device": "user", "item_id": "item", "author_id": "item",
        "item_city": "item", "music_id": "item", "channel": "context"}
    assert schema.dense_names == ["duration_time"]
    t = pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pydict()
    train_rows = [r for r, e in zip(rows, is_eval) if not e]
    assert t["finish"] == [float(r[6]) for r in train_rows] and t["like"] == [float(r[7]) for r in train_rows]
    v = pq.read_table(out / "vocab" / "item_id.parquet").to_pydict()
    item = dict(zip(v["id"], v["value"]))
    counts = {}
    for r in train_rows:
        counts[r[2]] = counts.get(r[2], 0) + 1
    assert [item.get(i, 0) for i in t["item_id"]] == [r[2] if counts[r[2]] >= 2 else 0 for r in train_rows]
    m = pq.read_table(out / "vocab" / "music_id.parquet").to_pydict()
    assert -1 in m["value"]  # "unknown music" is a frequent value of its own
    assert sum(b.batch_size for b in make_dataloader(out, "eval", batch_size=32)) == int(is_eval.sum())


def test_malformed(tmp_path):
    raw = tmp_path / "final_track2_train.txt"
    rows = _write(raw, 20)
    lines = raw.read_text().splitlines(keepends=True)
    raw.write_text("".join(lines[:6]) + lines[6].replace("\t", "\tx", 1) + "".join(lines[7:]))
    with pytest.raises(ConvertError, match=r"final_track2_train\.txt, line 7: column 'user_city'"):
        convert("icme2019", [raw], tmp_path / "a")
    raw.write_text("".join(lines[:11]) + "1\t2\t3\n")
    with pytest.raises(ConvertError, match=r"line 12: expected 12 fields"):
        convert("icme2019", [raw], tmp_path / "b")
    raw.write_text("".join(lines))
    with pytest.raises(ConvertError, match="eval split has no rows"):
        convert("icme2019", [raw], tmp_path / "c", max_rows=5, eval_fraction=0.0)
    assert len(rows) == 20
