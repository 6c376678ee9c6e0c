"""DCP checkpoints on 2 gloo ranks: exact resume, resharding 2 -> 1 and 2 -> 4 ranks, and the
checks that refuse corrupt checkpoints or ones written for another dataset schema or model.

One module-scoped run trains three times in the same 2 rank processes:
  A: 14 steps uninterrupted (checkpoints every 4 steps and at the end; the "like" loss weight
     decays per epoch and the learning rates warm up over 12 steps, so both schedules must be
     restored too),
  B: the same job stopped after 9 steps (mid-epoch: an epoch is 6 steps per rank, the sixth
     40 rows + 24 padding rows),
  C: B's job restarted with the 14-step budget, resuming from B's step-9 checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from checkpoint_state import full_state
from multirank import run_ranks

BATCH = 64


def _cfg(data: str, out: str, **kw):
    from recsys_mtl.config import LossConfig, ModelConfig, OptimConfig, ShardingConfig, TrainConfig

    cfg = TrainConfig(
        data=data, output_dir=out, batch_size=BATCH, steps=14, seed=0, log_every=1000,
        model=ModelConfig(name="mmoe", embedding_dim=8, expert_layer_sizes=(16,), tower_layer_sizes=(8,),
                          num_experts=2),
        sharding=ShardingConfig(sharding_type="row_wise"),
        # The learning-rate warm-up spans B's stop at step 9: C must resume its position too.
        optim=OptimConfig(dense_lr=1e-2, grad_clip_norm=1.0, lr_warmup_steps=12),
        checkpoint_every_steps=4, keep_last=10,
        loss=LossConfig(task_weight_decay={"like": 0.5}),  # PLE Eq. 10: like's weight halves every epoch
    )
    return dataclasses.replace(cfg, **kw)


def _three_runs(data: str, root: str) -> dict:
    from recsys_mtl.train.loop import train

    losses: dict[str, list] = {"A": [], "B": [], "C": []}

    def record(name):
        return lambda step, loss: losses[name].append((step, float(loss)))

    r = Path(root)
    train(_cfg(data, str(r / "A"), checkpoint_dir=str(r / "ckA")), on_step=record("A"))
    train(_cfg(data, str(r / "B"), checkpoint_dir=str(r / "ckB"), steps=9), on_step=record("B"))
    # C asks for 14 steps where B's checkpoint recorded 9: an explicit change of settings.
    train(_cfg(data, str(r / "C"), checkpoint_dir=str(r / "ckB"), resume_with_new_settings=True), on_step=record("C"))
    return losses


def _load_predict_resave(data: str, src: str, sharding: str, resave: str) -> list:
    """Loads checkpoint ``src`` into a model sharded ``sharding``-wise over this job's ranks,
    returns its eval logits on the first eval batch and saves the loaded state to ``resave``."""
    from recsys_mtl.config import ShardingConfig
    from recsys_mtl.data.reader import make_dataloader
    from recsys_mtl.data.schema import Schema
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model
    from recsys_mtl.models import build_model
    from recsys_mtl.train.checkpoint import TrainPosition
    from recsys_mtl.train.loop import make_checkpointer
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    env = init_distributed()
    cfg = _cfg(data, resave, sharding=ShardingConfig(sharding_type=sharding), checkpoint_dir=resave)
    schema = Schema.load(data)
    model = MTLTrainModule(build_model(schema, cfg.model, "meta"), MultiTaskLoss(schema.tasks))
    dmp, plan = shard_model(model, cfg.sharding, cfg.optim, device=env.device, world_size=env.world_size,
                            local_world_size=env.world_size, batch_size=BATCH)
    opt = make_optimizer(dmp, cfg.optim)
    ck = make_checkpointer(cfg, env, schema, plan)
    pos = ck.load(Path(src), dmp, opt)
    batch = next(iter(make_dataloader(data, "eval", batch_size=BATCH)))  # the same rows on every rank
    dmp.eval()
    with torch.no_grad():
        _, (_, logits, _, _) = dmp(batch)
    ck.save(dmp, opt, TrainPosition(pos.step, pos.epoch, pos.epoch_batches))
    kinds = sorted({ps.sharding_type for m in plan.plan.values() for ps in m.values()})
    return [logits.tolist(), kinds]


def _full_state(path: Path, tmp: Path) -> dict[str, object]:
    return full_state(path, tmp)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differing = [k for k, v in a.items() if isinstance(v, torch.Tensor) and not torch.equal(v, b[k])]
    assert not differing, differing


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from recsys_mtl.data.synth import generate_recsys

    root = tmp_path_factory.mktemp("ckpt")
    data = root / "data"
    # 720 train rows in 8 row groups of 90: each rank reads 360 rows = 6 batches of 64 (the last
    # short and padded) per epoch, shuffled (the default) with a global permutation of blocks.
    generate_recsys(data, rows=800, seed=5, num_users=60, num_items=90, eval_fraction=0.1, rows_per_file=270,
                    row_group_size=90)
    losses = run_ranks(_three_runs, 2, str(data), str(root))[0]
    return {"root": root, "data": data, "losses": losses}


@pytest.mark.multirank
def test_resume_matches_uninterrupted_run_bit_for_bit(runs, tmp_path):
    root, losses = runs["root"], runs["losses"]
    a, b, c = (dict(losses[k]) for k in "ABC")
    assert sorted(a) == list(range(1, 15)) and sorted(b) == list(range(1, 10)) and sorted(c) == list(range(10, 15))
    assert all(a[s] == b[s] for s in b)  # same seed and world size: same losses
    assert all(a[s] == c[s] for s in c), (a, c)  # resumed steps 10..14: identical losses
    # Final model, fused sparse-optimizer state, dense Adam state and loss-weight schedule: identical.
    assert float(_full_state(root / "ckB" / "step_00000014", tmp_path)["model.loss.t"]) == 2  # 2 epochs done
    _assert_same_state(_full_state(root / "ckA" / "step_00000014", tmp_path),
                       _full_state(root / "ckB" / "step_00000014", tmp_path))
    ma = json.loads((root / "A" / "metrics.json").read_text())
    mc = json.loads((root / "C" / "metrics.json").read_text())
    assert ma["steps"] == mc["steps"] == 14 and ma["tasks"] == mc["tasks"]
    meta = json.loads((root / "ckB" / "step_00000009" / "meta.json").read_text())
    assert (meta["epoch"], meta["epoch_batches"]) == (1, 3)  # 9 steps = 1 epoch of 6 + 3 batches
    assert [p["batches"] for p in meta["data_positions"]] == [3, 3]
    assert meta["rows_seen"] == [720, 3 * 2 * BATCH]
    # Every training row once per epoch (the last step of an epoch padded), counted across the resume.
    assert ma["train_rows"] == 720 and ma["rows_seen"] == mc["rows_seen"] == [720, 720, 2 * 2 * BATCH]
    assert meta["world_size"] == 2 and "row_wise" in meta["plan_summary"]
    kept = sorted(p.name for p in (root / "ckA").iterdir())
    assert kept == ["step_00000004", "step_00000008", "step_00000012", "step_00000014"]


@pytest.mark.multirank
@pytest.mark.parametrize("world_size, sharding", [(1, "table_wise"), (4, "table_wise")])
def test_reshard_2_ranks_row_wise_to_other_world_size(runs, tmp_path, world_size, sharding):
    from recsys_mtl.data.reader import make_dataloader
    from recsys_mtl.data.schema import Schema
    from recsys_mtl.models import build_model
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    data, src = runs["data"], runs["root"] / "ckA" / "step_00000014"
    out = run_ranks(_load_predict_resave, world_size, str(data), str(src), sharding, str(tmp_path / "re"))
    full = _full_state(src, tmp_path)
    # The unsharded reference: a plain model holding the checkpoint's full tensors.
    schema = Schema.load(data)
    ref = MTLTrainModule(build_model(schema, _cfg(str(data), "x").model, "cpu"), MultiTaskLoss(schema.tasks))
    ref.load_state_dict({k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")})
    ref.eval()
    with torch.no_grad():
        _, (_, ref_logits, _, _) = ref(next(iter(make_dataloader(data, "eval", batch_size=BATCH))))
    for logits, kinds in out:
        assert kinds == [sharding]
        # Pooling sums run in a different order per plan: equal to float32 rounding.
        torch.testing.assert_close(torch.tensor(logits), ref_logits, rtol=0, atol=1e-6)
    # Weights, fused optimizer state and dense Adam state survive the round trip exactly.
    _assert_same_state(full, _full_state(tmp_path / "re" / "step_00000014", tmp_path))


def _meta_of(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(runs, tmp_path):
    from recsys_mtl.train.checkpoint import Checkpointer

    ck = tmp_path / "ck"
    shutil.copytree(runs["root"] / "ckA", ck)
    blob = ck / "step_00000014" / "__1_0.distcp"
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size
    blob.write_bytes(bytes(raw))
    (ck / "step_00000012" / ".metadata").unlink()  # a missing DCP file
    (ck / "step_00000008" / "meta.json").write_text('{"step": 8')  # truncated meta.json
    (ck / ".tmp_step_00000016").mkdir()  # left by a crash mid-write
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = Checkpointer(ck, rank=0, world_size=1, run_info={}, plan=None).latest()
    assert found == ck / "step_00000004"
    text = "\n".join(str(w.message) for w in caught)
    assert "step_00000014" in text and "CRC32" in text
    assert "step_00000012" in text and "missing file .metadata" in text
    assert "step_00000008" in text and "meta.json" in text
    assert not (ck / ".tmp_step_00000016").exists()
    # The corrupt ones are set aside, so they neither count towards keep_last nor get retried.
    assert sorted(p.name for p in ck.iterdir()) == [
        "step_00000004", "step_00000008.corrupt", "step_00000012.corrupt", "step_00000014.corrupt"]


def _preflight_error(cfg) -> str:
    from recsys_mtl.train.checkpoint import CheckpointError, preflight

    with pytest.raises(CheckpointError) as e:
        preflight(cfg)
    return str(e.value)


def test_checkpoint_from_a_different_model_is_refused(runs):
    from recsys_mtl.config import ModelConfig

    cfg = _cfg(str(runs["data"]), "x", checkpoint_dir=str(runs["root"] / "ckA"),
               model=ModelConfig(name="ple", embedding_dim=8))
    msg = _preflight_error(cfg)
    assert "step_00000014" in msg and "model config differs" in msg and "name: 'mmoe' -> 'ple'" in msg


def test_checkpoint_with_schema_drift_is_refused(runs, tmp_path):
    from recsys_mtl.data.synth import generate_recsys

    drifted = tmp_path / "drifted"  # same generator, a larger item vocabulary: table shapes change
    generate_recsys(drifted, rows=300, seed=5, num_users=60, num_items=120)
    msg = _preflight_error(_cfg(str(drifted), "x", checkpoint_dir=str(runs["root"] / "ckA")))
    assert "dataset schema fingerprint" in msg and "step_00000014" in msg


def test_checkpoint_with_other_optimizer_is_refused(runs):
    from recsys_mtl.config import OptimConfig

    cfg = _cfg(str(runs["data"]), "x", checkpoint_dir=str(runs["root"] / "ckA"),
               optim=OptimConfig(sparse_optimizer="adagrad"))
    assert "optim.sparse_optimizer 'rowwise_adagrad' != 'adagrad'" in _preflight_error(cfg)


def test_resume_with_other_settings_is_refused_unless_asked(runs):
    from recsys_mtl.config import OptimConfig
    from recsys_mtl.train.checkpoint import preflight

    cfg = _cfg(str(runs["data"]), "x", checkpoint_dir=str(runs["root"] / "ckA"), steps=20,
               optim=OptimConfig(dense_lr=5e-3, grad_clip_norm=1.0))
    msg = _preflight_error(cfg)
    assert "run settings differ" in msg and "dense_lr: 0.01 -> 0.005" in msg and "steps: 14 -> 20" in msg, msg
    assert "--resume-with-new-settings" in msg
    assert preflight(dataclasses.replace(cfg, resume_with_new_settings=True)).name == "step_00000014"


def test_checkpoint_with_other_loss_weights_is_refused(runs):
    from recsys_mtl.config import LossConfig

    cfg = _cfg(str(runs["data"]), "x", checkpoint_dir=str(runs["root"] / "ckA"),
               loss=LossConfig(task_weight_decay={"like": 0.9}))
    assert "loss config differs: task_weight_decay: {'like': 0.5} -> {'like': 0.9}" in _preflight_error(cfg)


def test_plan_change_that_would_drop_fused_state_is_refused(runs):
    from recsys_mtl.train.checkpoint import CheckpointError, CheckpointMeta, check_compatible

    src = runs["root"] / "ckA" / "step_00000014"
    meta = CheckpointMeta.read(src)
    info = {"schema_fingerprint": meta.schema_fingerprint, "model": meta.model, "optim": meta.optim, "loss": meta.loss}
    to_cw = {t: {"sharding_type": "column_wise", "num_shards": 2} for t in meta.plan}
    with pytest.raises(CheckpointError, match="cannot reshard row_wise x2 -> column_wise x2"):
        check_compatible(meta, src, info, to_cw, world_size=2)
    to_tw = {t: {"sharding_type": "table_wise", "num_shards": 1} for t in meta.plan}
    assert "resharding" in check_compatible(meta, src, info, to_tw, world_size=4)[0]


def test_time_based_trigger(tmp_path):
    import time

    from recsys_mtl.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path, rank=0, world_size=1, run_info={}, plan=None, every_steps=1000, every_minutes=1e-4)
    assert not ck.due(1)
    time.sleep(0.01)
    assert ck.due(2) and ck.due(1000)
