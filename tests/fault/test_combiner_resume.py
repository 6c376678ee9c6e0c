"""Exact resume with task-gradient combiners on 2 gloo ranks: MF + PMTRec on an interaction
dataset across an epoch boundary (task focusing α^s changes there, the pairs are re-sampled per
batch), and MMoE + GradVac (stateful: its EMA targets live in checkpointed buffers) on feature rows.

Each case trains A uninterrupted, B stopped early, C resuming B's checkpoint with A's budget; C's
per-step losses and final state must be A's, bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from checkpoint_state import full_state
from multirank import run_ranks


def _cfg(kind: str, data: str, out: str, **kw):
    from recsys_mtl.config import GradConfig, ModelConfig, OptimConfig, ShardingConfig, TrainConfig

    if kind == "pairs":
        cfg = TrainConfig(data=data, output_dir=out, batch_size=32, steps=11, seed=0, log_every=1000,
                          model=ModelConfig(name="mf", embedding_dim=8), sharding=ShardingConfig(sharding_type="row_wise"),
                          optim=OptimConfig(sparse_lr=0.1), grad=GradConfig(combiner="pmtrec", alpha=1.5, tau=0.01),
                          checkpoint_every_steps=4, keep_last=10, eval_outputs=False)
    else:
        cfg = TrainConfig(data=data, output_dir=out, batch_size=64, steps=11, seed=0, log_every=1000,
                          model=ModelConfig(name="mmoe", embedding_dim=8, expert_layer_sizes=(16,),
                                            tower_layer_sizes=(8,), num_experts=2),
                          sharding=ShardingConfig(sharding_type="row_wise"), optim=OptimConfig(dense_lr=1e-2),
                          grad=GradConfig(combiner="gradvac"), checkpoint_every_steps=4, keep_last=10)
    return dataclasses.replace(cfg, **kw)


def _three_runs(kind: str, data: str, root: str) -> dict:
    from recsys_mtl.train.loop import train

    losses: dict[str, list] = {"A": [], "B": [], "C": []}

    def record(name):
        return lambda step, loss: losses[name].append((step, float(loss)))

    r = Path(root)
    train(_cfg(kind, data, str(r / "A"), checkpoint_dir=str(r / "ckA")), on_step=record("A"))
    train(_cfg(kind, data, str(r / "B"), checkpoint_dir=str(r / "ckB"), steps=6), on_step=record("B"))
    train(_cfg(kind, data, str(r / "C"), checkpoint_dir=str(r / "ckB"), resume_with_new_settings=True),
          on_step=record("C"))
    return losses


def _data(kind: str, root: Path) -> Path:
    if kind == "pairs":
        from recsys_mtl.data.convert.trust import convert_trust
        from recsys_mtl.testing import write_trust_release

        convert_trust("ciao", list(write_trust_release(root / "raw")), root / "data", quiet=True)
    else:
        from recsys_mtl.data.synth import generate_recsys

        generate_recsys(root / "data", rows=800, seed=5, num_users=60, num_items=90, eval_fraction=0.1,
                        rows_per_file=270, row_group_size=90)
    return root / "data"


@pytest.mark.multirank
@pytest.mark.parametrize("kind", ["pairs", "rows"])
def test_combined_gradient_runs_resume_exactly(kind: str, tmp_path: Path) -> None:
    data = _data(kind, tmp_path)
    losses = run_ranks(_three_runs, 2, kind, str(data), str(tmp_path))[0]
    a, b, c = (dict(losses[k]) for k in "ABC")
    assert sorted(a) == list(range(1, 12)) and sorted(c) == list(range(7, 12))
    assert all(a[s] == b[s] for s in b)
    assert all(a[s] == c[s] for s in c), (a, c)
    (tmp_path / "sa").mkdir()
    (tmp_path / "sc").mkdir()
    sa = full_state(tmp_path / "ckA" / "step_00000011", tmp_path / "sa")
    sc = full_state(tmp_path / "ckB" / "step_00000011", tmp_path / "sc")
    assert sa.keys() == sc.keys()
    differing = [k for k, v in sa.items() if isinstance(v, torch.Tensor) and not torch.equal(v, sc[k])]
    assert not differing, differing
    state = {k: v for k, v in sa.items() if "grad_combiner_state" in k}
    assert int(state["model.grad_combiner_state.step"]) == 11
    if kind == "pairs":  # 11 steps of 32 x 2 rows cross the epoch boundary: s moved
        assert int(state["model.grad_combiner_state.epoch"]) >= 1
    else:  # GradVac's EMA targets are real state
        assert float(state["model.grad_combiner_state.rows_gradvac_phi"].abs().sum()) > 0
