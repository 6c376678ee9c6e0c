"""Census-Income (KDD) converter on the real 1,000-row raw sample."""

from __future__ import annotations

import gzip
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsys_mtl.cli import main
from recsys_mtl.data.convert import ConvertError, convert
from recsys_mtl.data.convert.census import COLUMNS, HIGHER_EDUCATION
from recsys_mtl.data.convert.common import hash_eval_mask
from recsys_mtl.data.reader import check_dataset, count_rows, make_dataloader
from recsys_mtl.data.schema import Schema

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared/data/census_kdd_sample/census-income.sample"


@pytest.fixture(autouse=True)
def _sample_present() -> None:
    # The real sample ships in ../shared beside the repository (as in CI); its absence is a failure,
    # not a reason to skip.
    assert SAMPLE.is_file(), f"missing {SAMPLE}: the repository must have ../shared beside it"


def _raw_rows() -> list[list[str]]:
    return [[f.strip() for f in line.rstrip("\n").split(", ")] for line in SAMPLE.read_text().splitlines()]


def _split_files(tmp: Path, n_train: int = 600) -> list[Path]:
    """First ``n_train`` sample lines as census-income.data.gz, the rest as census-income.test."""
    lines = SAMPLE.read_text().splitlines(keepends=True)
    train, test = tmp / "census-income.data.gz", tmp / "census-income.test"
    with gzip.open(train, "wt") as f:
        f.writelines(lines[:n_train])
    test.write_text("".join(lines[n_train:]))
    return [train, test]


def _table(d: Path, split: str):
    return pq.read_table(sorted((d / split).glob("part-*.parquet")))


def _decode(d: Path, feature: str, ids) -> list:
    vocab = pq.read_table(d / "vocab" / f"{feature}.parquet").to_pydict()
    value = dict(zip(vocab["id"], vocab["value"]))
    return [value.get(int(i)) for i in ids]


@pytest.fixture(scope="module")
def split_dataset(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("census")
    out = tmp / "ds"
    convert("census-kdd", _split_files(tmp), out, min_count=3, tasks="income,marital,education",
            keep_weight=True, row_group_size=128)
    return out


def test_file_split_labels_and_reader(split_dataset):
    d = split_dataset
    rows = _raw_rows()
    assert check_dataset(d) == {"train": 600, "eval": 400}
    assert (count_rows(d, "train"), count_rows(d, "eval")) == (600, 400)
    schema = Schema.load(d)
    assert schema.task_names == ["income", "marital", "education"]
    assert "marital_stat" not in schema.sparse_names and "education" not in schema.sparse_names  # label sources
    assert "instance_weight" not in schema.dense_names and len(schema.dense) == 7
    assert schema.user_id_feature is None and schema.feature("year").side == "context"
    for split, raw in (("train", rows[:600]), ("eval", rows[600:])):
        t = _table(d, split)
        assert t.column("income").to_pylist() == [float(r[41] == "50000+.") for r in raw]
        assert t.column("marital").to_pylist() == [float(r[7] == "Never married") for r in raw]
        assert t.column("education").to_pylist() == [float(r[4] in HIGHER_EDUCATION) for r in raw]
        assert np.allclose(t.column("instance_weight").to_numpy(), [float(r[24]) for r in raw], rtol=1e-6)
    income = np.array([r[41] == "50000+." for r in rows[:600]])
    assert 0 < income.sum() < 600  # both classes present in the sample
    batches = list(make_dataloader(d, "eval", batch_size=128))
    assert sum(b.batch_size for b in batches) == 400
    labels = torch.cat([b.labels for b in batches])  # 400 x 3
    assert labels[:, 0].tolist() == [float(r[41] == "50000+.") for r in rows[600:]]
    assert bool(torch.isfinite(torch.cat([b.dense for b in batches])).all())


def test_vocabulary_min_count_and_dense_normalisation(split_dataset):
    d = split_dataset
    rows = _raw_rows()
    schema = Schema.load(d)
    train = _table(d, "train")
    for j in (1, 9, 32):  # class of worker, major occupation, country of birth father
        name = COLUMNS[j]
        counts = Counter(r[j] for r in rows[:600])
        frequent = {v for v, c in counts.items() if c >= 3}
        ids = train.column(name).to_pylist()
        assert [i == 0 for i in ids] == [r[j] not in frequent for r in rows[:600]]  # rare -> 0
        assert _decode(d, name, [i for i in ids if i]) == [r[j] for r in rows[:600] if r[j] in frequent]
        assert schema.feature(name).num_embeddings == len(frequent) + 1
        eval_ids = _table(d, "eval").column(name).to_pylist()  # unseen / rare eval values -> 0
        assert [i == 0 for i in eval_ids] == [r[j] not in frequent for r in rows[600:]]
    age = train.column("age").to_numpy()
    assert abs(age.mean()) < 1e-4 and abs(age.std() - 1) < 1e-3  # standardised with train statistics
    gains = np.log1p(np.array([float(r[16]) for r in rows[:600]]))
    norm = schema.metadata["dense_normalisation"]["capital_gains"]
    assert np.allclose(train.column("capital_gains").to_numpy(), (gains - norm["mean"]) / norm["std"], atol=1e-5)
    assert schema.metadata["min_count"] == 3 and schema.metadata["rows"] == {"train": 600, "eval": 400}


def test_single_file_hash_split_and_default_tasks(tmp_path):
    out = tmp_path / "ds"
    schema = convert("census-kdd", [SAMPLE], out, eval_fraction=0.25, seed=7)
    assert schema.task_names == ["income", "marital"] and "education" in schema.sparse_names
    rows = _raw_rows()
    is_eval = hash_eval_mask(np.arange(len(rows)), 0.25, 7)
    assert count_rows(out, "eval") == int(is_eval.sum()) and 150 < is_eval.sum() < 350
    t = _table(out, "eval")
    assert t.column("marital").to_pylist() == [float(r[7] == "Never married") for r, e in zip(rows, is_eval) if e]


def test_learnable_on_the_sample(split_dataset):
    """Per-id train rates of one categorical feature already rank eval rows well (marital, income)."""
    train, ev = _table(split_dataset, "train"), _table(split_dataset, "eval")
    for task, feature, floor in (("marital", "detailed_household_and_family_stat", 0.9),
                                 ("income", "major_occupation_code", 0.7)):
        ids, y = train.column(feature).to_numpy(), train.column(task).to_numpy()
        size = max(ids.max(), ev.column(feature).to_numpy().max()) + 1
        rate = (np.bincount(ids, y, size) + y.mean()) / (np.bincount(ids, minlength=size) + 1)
        score, label = rate[ev.column(feature).to_numpy()], ev.column(task).to_numpy().astype(bool)
        greater = (score[label][:, None] > score[~label][None, :]).mean()
        ties = (score[label][:, None] == score[~label][None, :]).mean()
        assert greater + 0.5 * ties > floor  # AUC


def test_malformed_lines_name_file_and_line(tmp_path):
    lines = SAMPLE.read_text().splitlines(keepends=True)[:50]
    short = tmp_path / "census-income.data"
    short.write_text("".join(lines[:9]) + lines[9].rsplit(", ", 2)[0] + "\n" + "".join(lines[10:]))
    with pytest.raises(ConvertError, match=r"census-income\.data, line 10: expected 42 fields"):
        convert("census-kdd", [short], tmp_path / "a")
    fields = lines[4].split(", ")
    fields[0] = "abc"
    bad = tmp_path / "census-income.test"
    bad.write_text("".join(lines[:4]) + ", ".join(fields) + "".join(lines[5:]))
    with pytest.raises(ConvertError, match=r"census-income\.test, line 5: column 'age': expected a number"):
        convert("census-kdd", [bad], tmp_path / "b")
    fields = lines[2].rstrip("\n").split(", ")
    fields[-1] = "maybe."
    bad.write_text("".join(lines[:2]) + ", ".join(fields) + "\n")
    with pytest.raises(ConvertError, match=r"line 3: income field"):
        convert("census-kdd", [bad], tmp_path / "c")


def test_cli(tmp_path, capsys):
    files = _split_files(tmp_path, n_train=800)
    out = tmp_path / "ds"
    argv = ["data", "convert", "census-kdd", "--input", *map(str, files), "--out", str(out), "--min-count", "2",
            "--max-rows", "300"]
    assert main(argv) == 0
    assert "300 train / 200 eval rows" in capsys.readouterr().out
    assert check_dataset(out) == {"train": 300, "eval": 200}
    assert main(["data", "convert", "census-kdd", "--input", str(tmp_path / "missing.data"), "--out", str(out)]) == 2
    assert "input file not found" in capsys.readouterr().err
    assert math.isclose(Schema.load(out).metadata["label_mean"]["income"]["eval"] or 0.0,
                        np.mean([r[41] == "50000+." for r in _raw_rows()[800:]]))


@pytest.mark.parametrize("payload", [bytes(range(256)) * 40, b"\x7fELF\x02\x01\x01\x00" + b"\xd0\x9f\xff" * 500])
def test_binary_input_is_refused_without_echoing_bytes(tmp_path, capsys, payload):
    binary = tmp_path / "census-income.data"
    binary.write_bytes(payload)
    assert main(["data", "convert", "census-kdd", "--input", str(binary), "--out", str(tmp_path / "ds")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "a binary file, not delimited text" in err, err
    assert err.isascii() and err.isprintable() and not captured.out.strip()  # no raw bytes on the screen
