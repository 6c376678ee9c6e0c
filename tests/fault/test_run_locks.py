"""One run per directory: a live lock refuses a second job (before any rank starts, and inside the
ranks), a lock left by a dead process is taken over, and an earlier run's artefacts never mix
with the new run's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from multirank import run_ranks
from recsys_mtl.cli import main
from recsys_mtl.train.locks import LOCK_FILE, DirLock, LockError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from recsys_mtl.data.synth import generate_recsys

    d = tmp_path_factory.mktemp("locks") / "synth"
    generate_recsys(d, rows=1_000, seed=0, num_users=50, num_items=80)
    return d


@pytest.fixture
def other_job():
    """A live process standing in for another job."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _lock_as(directory: Path, pid: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "earlier"}))


def test_a_live_lock_refuses_a_second_job_before_it_starts(capsys, data, tmp_path, other_job):
    _lock_as(tmp_path / "ck", other_job.pid)
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "out"),
                 "--checkpoint-dir", str(tmp_path / "ck"), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--checkpoint-dir" in err and f"pid {other_job.pid}" in err, err
    assert json.loads((tmp_path / "ck" / LOCK_FILE).read_text())["pid"] == other_job.pid  # untouched


def _train_tiny(data: str, out: str, ck: str | None, eval_outputs: bool) -> str:
    from recsys_mtl.config import ModelConfig, TrainConfig
    from recsys_mtl.train.loop import train

    cfg = TrainConfig(data=data, output_dir=out, checkpoint_dir=ck, batch_size=128, steps=3, log_every=100,
                      eval_outputs=eval_outputs,
                      model=ModelConfig(name="mmoe", embedding_dim=4, expert_layer_sizes=(8,), tower_layer_sizes=(4,),
                                        num_experts=2))
    try:
        train(cfg)
    except LockError as e:
        return f"LockError: {e}"
    return "trained"


@pytest.mark.multirank
def test_a_live_lock_stops_every_rank_and_a_dead_one_is_taken_over(data, tmp_path, other_job):
    _lock_as(tmp_path / "ck", other_job.pid)
    msgs = run_ranks(_train_tiny, 2, str(data), str(tmp_path / "out"), str(tmp_path / "ck"), False)
    assert all(m.startswith("LockError") and f"pid {other_job.pid}" in m for m in msgs), msgs
    assert not list((tmp_path / "ck").glob("step_*"))
    other_job.kill()
    other_job.wait()  # the other job is gone: its lock is stale
    msgs = run_ranks(_train_tiny, 2, str(data), str(tmp_path / "out"), str(tmp_path / "ck"), False)
    assert msgs == ["trained", "trained"]
    assert list((tmp_path / "ck").glob("step_*")) and not (tmp_path / "ck" / LOCK_FILE).exists()


@pytest.mark.multirank
def test_an_earlier_runs_artefacts_do_not_linger(data, tmp_path):
    out = tmp_path / "out"
    assert run_ranks(_train_tiny, 1, str(data), str(out), None, True) == ["trained"]
    assert (out / "eval_predictions.parquet").exists()
    assert run_ranks(_train_tiny, 1, str(data), str(out), None, False) == ["trained"]
    assert not (out / "eval_predictions.parquet").exists()  # the second run wrote none
    assert json.loads((out / "metrics.json").read_text())["config"]["eval_outputs"] is False


def test_lock_holder_and_release(tmp_path):
    lock = DirLock(tmp_path, "--output-dir").acquire()
    assert lock.holder()["pid"] == DirLock(tmp_path, "x").holder()["pid"]
    lock.release()
    assert lock.holder() is None


def _load_final_model(data: str, out: str) -> dict:
    from pathlib import Path

    from recsys_mtl.config import ModelConfig, TrainConfig
    from recsys_mtl.data.schema import Schema
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model
    from recsys_mtl.models import build_model
    from recsys_mtl.train.loop import FINAL_MODEL_DIR, make_checkpointer, make_loss
    from recsys_mtl.train.task import MTLTrainModule

    env = init_distributed()
    cfg = TrainConfig(data=data, output_dir=out, checkpoint_dir=str(Path(out) / FINAL_MODEL_DIR), batch_size=128,
                      steps=3, model=ModelConfig(name="mmoe", embedding_dim=4, expert_layer_sizes=(8,),
                                                 tower_layer_sizes=(4,), num_experts=2))
    schema = Schema.load(data)
    model = MTLTrainModule(build_model(schema, cfg.model, "meta"), make_loss(cfg, schema))
    dmp, plan = shard_model(model, cfg.sharding, cfg.optim, device=env.device, world_size=env.world_size,
                            local_world_size=env.world_size, batch_size=cfg.batch_size)
    before = {k: v.detach().clone() for k, v in dmp.state_dict().items() if "tower" in k}
    ck = make_checkpointer(cfg, env, schema, plan)
    pos = ck.load(ck.latest(), dmp, make_optimizer(dmp, cfg.optim))
    after = {k: v for k, v in dmp.state_dict().items() if "tower" in k}
    return {"step": pos.step, "changed": sum(not torch_equal(before[k], after[k]) for k in before), "n": len(before)}


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.multirank
def test_final_model_is_saved_and_loadable_without_checkpoint_dir(data, tmp_path):
    out = tmp_path / "out"
    assert run_ranks(_train_tiny, 2, str(data), str(out), None, False) == ["trained", "trained"]
    assert list((out / "final_model").glob("step_*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_model"] == str(out / "final_model")
    assert [e["step"] for e in metrics["train_log"]] == [1] and metrics["train_log"][0]["loss"] > 0
    # Loaded into a fresh model on another world size: the trained step and weights come back.
    loaded = run_ranks(_load_final_model, 1, str(data), str(out))[0]
    assert loaded["step"] == 3 and loaded["n"] > 0 and loaded["changed"] == loaded["n"], loaded
