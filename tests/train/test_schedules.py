"""Learning-rate warm-up and decay (TorchRec's WarmupOptimizer stages, their position restored
from a state dict), keeping the best model by a validation metric, and early stopping on 2 ranks.

Exact resume with a warm-up spanning the resume point is in tests/fault/test_checkpoint_resume.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from multirank import run_ranks
from recsys_mtl.config import OptimConfig, TrainConfig
from recsys_mtl.distributed.optim import _scheduled, lr_stages
from recsys_mtl.train.best import BestTracker, metric_value


def _optimizer(cfg: OptimConfig, total: int, lr: float = 0.1):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    dense = KeyedOptimizerWrapper({"w": p}, lambda ps: torch.optim.SGD(ps, lr=lr))
    return p, CombinedOptimizer([("dense", _scheduled(dense, lr_stages(cfg, total), lr))])


def _expected(k: int, lr: float, warmup: int, total: int, end: float) -> float:
    """Rate in effect after ``k`` optimizer steps: linear warm-up from lr/N, then linear decay."""
    if k <= warmup:
        return lr * (1 / warmup + (1 - 1 / warmup) * k / warmup)
    return lr * (1 + (end - 1) * (k - warmup) / (total - warmup))


def test_warmup_then_linear_decay_follows_the_formula_and_sgd_uses_it():
    p, opt = _optimizer(OptimConfig(lr_warmup_steps=4, lr_schedule="linear", lr_min_ratio=0.1), total=10)
    lrs = [opt.param_groups[0]["lr"]]
    before = p.detach().clone()
    for _ in range(10):
        p.grad = torch.ones(3)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([_expected(k, 0.1, 4, 10, 0.1) for k in range(11)], rel=1e-12)
    # SGD with unit gradients moved the weight by exactly the sum of the rates used.
    assert (before - p.detach()).tolist() == pytest.approx([sum(lrs[:10])] * 3, rel=1e-6)
    assert lrs[0] == pytest.approx(0.025) and lrs[4] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01)
    extra = []
    for _ in range(3):  # past the planned end: the minimum, not back to the full rate
        opt.step()
        extra.append(opt.param_groups[0]["lr"])
    assert extra == pytest.approx([0.01] * 3)


def test_schedule_position_is_restored_from_the_state_dict():
    cfg = OptimConfig(lr_warmup_steps=6)
    p, opt = _optimizer(cfg, total=20)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"]["dense.__warmup"]["warmup"].tolist() == [3, 0]
    p2, fresh = _optimizer(cfg, total=20)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.1 / 6)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == pytest.approx(
        _expected(3, 0.1, 6, 20, 0.0))


def test_constant_schedule_without_warmup_leaves_the_optimizer_alone():
    assert lr_stages(OptimConfig(), 100) == []
    _, opt = _optimizer(OptimConfig(), total=5)
    assert "dense.__warmup" not in opt.state_dict()["state"]


def test_linear_schedule_needs_more_steps_than_the_warmup():
    with pytest.raises(ValueError, match="lr-schedule.*more training steps"):
        lr_stages(OptimConfig(lr_warmup_steps=10, lr_schedule="linear"), 10)


@pytest.mark.parametrize("kw, match", [
    ({"keep_best": "auc"}, "eval_every"),
    ({"keep_best": "click/recall", "eval_every": 5}, "keep_best"),
    ({"early_stop_patience": 2, "eval_every": 5}, "keep_best"),
    ({"early_stop_patience": 0, "keep_best": "auc", "eval_every": 5}, "early_stop_patience"),
])
def test_bad_selection_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="d", output_dir="o", **kw)


def test_tracker_direction_and_nan():
    b = BestTracker("logloss", patience=1)
    assert b.observe(1, {"t": {"logloss": 0.5}}) and not b.observe(2, {"t": {"logloss": float("nan")}})
    assert b.should_stop and b.best_value == 0.5
    assert metric_value("click/auc", {"like": {"auc": 0.9}}) != metric_value("click/auc", {"like": {"auc": 0.9}})


def _select(data: str, root: str) -> dict:
    from recsys_mtl.config import ModelConfig, OptimConfig, TrainConfig
    from recsys_mtl.train.checkpoint import CheckpointMeta
    from recsys_mtl.train.loop import train

    model = ModelConfig(name="shared_bottom", embedding_dim=4, bottom_layer_sizes=(8,), tower_layer_sizes=(4,))
    common = dict(data=data, batch_size=64, eval_every=3, eval_outputs=False, log_every=10**9, model=model)
    out = {}
    # Learning: the best of 4 evaluations (12 steps) is kept.
    r = train(TrainConfig(output_dir=f"{root}/learn", steps=12, keep_best="click/auc", **common))
    # Learning rates 0: nothing changes, so the second evaluation is no improvement: stop at step 6.
    s = train(TrainConfig(output_dir=f"{root}/frozen", steps=30, keep_best="auc", early_stop_patience=1,
                          optim=OptimConfig(dense_lr=0.0, sparse_lr=0.0), **common))
    if r is not None:
        best_dir = Path(r["best"]["path"])
        (ck,) = sorted(best_dir.glob("step_*"))
        out = {"learn": r, "frozen": s, "best_meta_step": CheckpointMeta.read(ck).step}
    return out


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    from recsys_mtl.data.synth import generate_recsys

    root = tmp_path_factory.mktemp("select")
    generate_recsys(root / "data", rows=3_000, seed=1, num_users=200, num_items=300)
    return run_ranks(_select, 2, str(root / "data"), str(root))[0]


def test_keep_best_saves_the_best_evaluation(selected):
    r = selected["learn"]
    aucs = {h["step"]: h["tasks"]["click"]["auc"] for h in r["history"]}
    best_step = max(aucs, key=lambda s: (aucs[s], -s))
    assert sorted(aucs) == [3, 6, 9, 12]
    assert r["best"]["step"] == best_step and r["best"]["value"] == pytest.approx(aucs[best_step])
    assert selected["best_meta_step"] == best_step  # best_model holds that step's model
    assert r["early_stopped_at"] is None and r["steps"] == 12


def test_early_stopping_stops_when_the_metric_stops_improving(selected):
    s = selected["frozen"]
    assert s["early_stopped_at"] == 6 and s["steps"] == 6
    assert [h["step"] for h in s["history"]] == [3, 6]
    assert s["best"]["step"] == 3
    json.dumps(s, allow_nan=False)
