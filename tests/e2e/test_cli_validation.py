"""Nonsense is refused before any rank starts: one line naming the flag or field and the allowed
range, exit code 2, nothing trained. Also: a non-finite training loss stops the job, and an
unwritable output directory is found before the compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multirank import run_ranks
from recsys_mtl.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from recsys_mtl.data.synth import generate_recsys

    d = tmp_path_factory.mktemp("val") / "synth"
    generate_recsys(d, rows=2_000, seed=0, num_users=50, num_items=80)
    return d


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size) must be a positive integer, got 0"),
    (["--epochs", "0"], "--epochs) must be a positive integer"),
    (["--steps", "-3"], "--steps) must be a positive integer"),
    (["--dense-lr", "nan"], "--dense-lr) must be a finite number >= 0"),
    (["--sparse-lr", "-0.1"], "--sparse-lr) must be a finite number >= 0"),
    (["--task-weight", "like=-1"], "--task-weight like=W) must be a finite number >= 0, got -1.0"),
    (["--task-weight", "like=nan"], "--task-weight like=W) must be a finite number >= 0"),
    (["--task-weight-decay", "like=0"], "--task-weight-decay like=GAMMA) must be a finite number > 0"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be a positive integer"),
    (["--embedding-dim", "0"], "--embedding-dim) must be a positive integer"),
    (["--expert-layer-sizes", "64,0"], "--expert-layer-sizes) must be positive integers"),
    (["--eval-every", "-1"], "--eval-every) must be an integer >= 0"),
    (["--checkpoint-every-minutes", "-5"], "--checkpoint-every-minutes) must be a finite number > 0"),
    (["--shuffle-buffer-rows", "0"], "--shuffle-buffer-rows) must be a positive integer"),
    (["--lr-warmup-steps", "-1"], "--lr-warmup-steps) must be an integer >= 0"),
    (["--lr-min-ratio", "2"], "--lr-min-ratio) must be a number in [0, 1]"),
    (["--keep-best", "auc"], "--eval-every) must be > 0 with --keep-best"),
    (["--keep-best", "nope/auc", "--eval-every", "5"], "names task 'nope'"),
    (["--early-stop-patience", "3", "--eval-every", "5"], "set with --early-stop-patience"),
    (["--steps", "10", "--lr-warmup-steps", "10", "--lr-schedule", "linear"], "needs more training steps (10)"),
    (["--model", "csrec", "--steps", "50"], "the masked-sharing schedule needs more than 700 steps"),
    (["--model", "csrec", "--csrec-prune-rate", "1.5"], "--csrec-prune-rate) must be in (0, 1)"),
    (["--model", "csrec", "--csrec-reverse-ratio", "-1"], "--csrec-reverse-ratio) must be in [0, 1]"),
    (["--grad-combiner", "pmtrec", "--pmtrec-tau", "0"], "--pmtrec-tau) must be a finite number > 0"),
    (["--grad-combiner", "pmtrec", "--pmtrec-main-task", "nope"], "--pmtrec-main-task) 'nope' is not a task"),
    (["--model", "csrec", "--grad-combiner", "pcgrad", "--steps", "2000"], "cannot train csrec"),
    (["--model", "mf"], "--model mf trains on interaction datasets"),
])
def test_train_flags_out_of_range(capsys, data, tmp_path, flags, expected):
    err = _refused(capsys, ["train", "--data", str(data), "--output-dir", str(tmp_path / "out"), *flags])
    assert expected in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--seeds", "0"], "--seeds must be a positive integer"),
    (["--", "--output-dir", "/tmp/elsewhere"], "--output-dir after '--' is set by compare itself"),
    (["--", "--seed=3"], "--seed after '--' is set by compare itself"),
])
def test_compare_flags(capsys, data, tmp_path, flags, expected):
    err = _refused(capsys, ["compare", "--data", str(data), "--models", "mmoe", "--output-dir", str(tmp_path),
                            *flags])
    assert expected in err, err


def _edit_schema(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    schema = json.loads((dst / "schema.json").read_text())
    edit(schema)
    (dst / "schema.json").write_text(json.dumps(schema))
    return dst


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.update(version=7), "schema version 7 is not supported"),
    (lambda s: s.update(sparse=[]), "at least one sparse feature is required"),
    (lambda s: s["tasks"][0].update(name="click.rate"), "name 'click.rate' is not allowed"),
    (lambda s: s["sparse"][0].update(name="user/id"), "name 'user/id' is not allowed"),
])
def test_schema_nonsense(capsys, data, tmp_path, edit, expected):
    bad = _edit_schema(data, tmp_path / "bad", edit)
    err = _refused(capsys, ["train", "--data", str(bad), "--output-dir", str(tmp_path / "out")])
    assert expected in err, err


def test_output_dir_under_a_file_is_refused_up_front(capsys, data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a directory cannot be created below a file, even by root
    err = _refused(capsys, ["train", "--data", str(data), "--output-dir", str(tmp_path / "out"),
                            "--checkpoint-dir", str(blocker / "ck")])
    assert "--checkpoint-dir" in err and "not writable" in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()


def _diverge(data: str, out: str) -> str:
    from recsys_mtl.config import ModelConfig, OptimConfig, TrainConfig
    from recsys_mtl.train.loop import NonFiniteLossError, train

    cfg = TrainConfig(data=data, output_dir=out, batch_size=128, epochs=1, log_every=5, eval_outputs=False,
                      checkpoint_dir=f"{out}/ck", checkpoint_every_steps=100,
                      model=ModelConfig(name="mmoe", embedding_dim=4, expert_layer_sizes=(8,), tower_layer_sizes=(4,),
                                        num_experts=2),
                      optim=OptimConfig(dense_lr=1e30, sparse_lr=1e30))
    try:
        train(cfg)
    except NonFiniteLossError as e:
        return str(e)
    return "no error"


@pytest.mark.multirank
def test_non_finite_loss_stops_the_job_naming_the_step(data, tmp_path):
    msgs = run_ranks(_diverge, 2, str(data), str(tmp_path / "out"))
    for m in msgs:  # every rank stops, with the same step
        assert "training loss is NaN/inf at step" in m, m
    assert msgs[0] == msgs[1]
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not list((tmp_path / "out" / "ck").glob("step_*"))  # no checkpoint of the diverged model


def test_metrics_are_strict_json():
    from recsys_mtl.train.loop import strict_json

    doc = strict_json({"auc": float("nan"), "x": [1.0, float("inf")], "n": 3})
    assert json.loads(json.dumps(doc, allow_nan=False)) == {"auc": None, "x": [1.0, None], "n": 3}
