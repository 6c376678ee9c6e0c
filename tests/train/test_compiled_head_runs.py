"""``--compile-head`` through the real trainer on 2 gloo ranks (sharded tables, DDP on the dense
part, TrainPipelineSparseDist): the same losses and the same final model as the eager run, for PLE
and STEM-Net, and a resume of a compiled run.

One module-scoped job trains, in the same 2 rank processes:
  ple eager / ple compiled (6 steps each, checkpoints every 3 steps),
  ple compiled stopped after 3 steps, then restarted to 6 from its step-3 checkpoint,
  stem eager / stem compiled (4 steps each).
Instances of one architecture share their compiled graph, so only the first compiled run of each
model compiles.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from checkpoint_state import full_state
from multirank import run_ranks

BATCH = 64


def _cfg(data: str, out: str, model: str, **kw):
    from recsys_mtl.config import ModelConfig, OptimConfig, ShardingConfig, TrainConfig

    cfg = TrainConfig(
        data=data, output_dir=out, batch_size=BATCH, steps=6, seed=0, log_every=1000, eval_outputs=False,
        model=ModelConfig(name=model, embedding_dim=8, expert_layer_sizes=(16,), tower_layer_sizes=(8,),
                          gate_layer_sizes=(8,), num_task_experts=2, num_shared_experts=1, num_levels=2,
                          stem_specific_fields="all"),
        # The big tables sharded (fused row-wise Adagrad), the small ones replicated (dense Adam).
        sharding=ShardingConfig(data_parallel_max_rows=30),
        optim=OptimConfig(dense_lr=1e-2),
        checkpoint_every_steps=3, keep_last=5,
    )
    return dataclasses.replace(cfg, **kw)


def _runs(data: str, root: str) -> dict:
    from torch._dynamo.utils import counters

    from recsys_mtl.train.loop import train

    losses: dict[str, list] = {}

    def record(name):
        losses[name] = []
        return lambda step, loss: losses[name].append((step, float(loss)))

    r = Path(root)
    graphs = {}
    for model, steps in (("ple", 6), ("stem", 4)):
        for mode in ("eager", "compiled"):
            name = f"{model}_{mode}"
            before = counters["stats"]["unique_graphs"]
            train(_cfg(data, str(r / name), model, steps=steps, compile_head=mode == "compiled",
                       checkpoint_dir=str(r / f"ck_{name}")), on_step=record(name))
            graphs[name] = counters["stats"]["unique_graphs"] - before
    # A compiled run stopped at step 3 and resumed (compiled) to step 6 from its checkpoint.
    before = counters["stats"]["unique_graphs"]
    train(_cfg(data, str(r / "stop"), "ple", steps=3, compile_head=True, checkpoint_dir=str(r / "ck_resume")),
          on_step=record("stop"))
    train(_cfg(data, str(r / "resume"), "ple", steps=6, compile_head=True, checkpoint_dir=str(r / "ck_resume"),
               resume_with_new_settings=True), on_step=record("resume"))
    graphs["stop_resume"] = counters["stats"]["unique_graphs"] - before
    return {"losses": losses, "graphs": graphs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from recsys_mtl.data.synth import generate_recsys

    root = tmp_path_factory.mktemp("compiled")
    data = root / "data"
    generate_recsys(data, rows=900, seed=3, num_users=60, num_items=90, eval_fraction=0.1, rows_per_file=300,
                    row_group_size=100)
    out = run_ranks(_runs, 2, str(data), str(root), timeout=600)
    return {"root": root, "ranks": out}


def _close_states(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))  # no _orig_mod. or other new keys
    for k, v in a.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(b[k], v, rtol=rtol, atol=atol, msg=k)


@pytest.mark.multirank
@pytest.mark.parametrize("model, steps", [("ple", 6), ("stem", 4)])
def test_compiled_run_matches_eager_run(runs, tmp_path, model: str, steps: int):
    root = runs["root"]
    for rank in runs["ranks"]:
        eager, compiled = dict(rank["losses"][f"{model}_eager"]), dict(rank["losses"][f"{model}_compiled"])
        assert sorted(eager) == sorted(compiled) == list(range(1, steps + 1))
        assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6), (eager, compiled)
        assert rank["graphs"][f"{model}_eager"] == 0 and rank["graphs"][f"{model}_compiled"] >= 1  # it compiled
    # Tables (fused row-wise Adagrad state included), dense weights and Adam state after the last step.
    step = f"step_{steps:08d}"
    _close_states(full_state(root / f"ck_{model}_eager" / step, tmp_path),
                  full_state(root / f"ck_{model}_compiled" / step, tmp_path), rtol=1e-4, atol=1e-6)


@pytest.mark.multirank
def test_compiled_run_resumes_from_its_checkpoint(runs, tmp_path):
    root = runs["root"]
    for rank in runs["ranks"]:
        full, stop, resumed = (dict(rank["losses"][k]) for k in ("ple_compiled", "stop", "resume"))
        assert sorted(stop) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
        assert all(stop[s] == full[s] for s in stop)  # one compiled graph, the same run
        assert resumed == pytest.approx({s: full[s] for s in resumed}, rel=1e-6, abs=1e-7)
        assert rank["graphs"]["stop_resume"] == 0  # PLE's head compiled once in this process: reused
    _close_states(full_state(root / "ck_ple_compiled" / "step_00000006", tmp_path),
                  full_state(root / "ck_resume" / "step_00000006", tmp_path), rtol=1e-6, atol=1e-7)
