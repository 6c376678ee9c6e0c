"""The masked-sharing schedule through the real trainer on 2 gloo ranks (sharded tables, DDP):
pruning reaches the requested sparsity with rewinding to the warm-up weights, the best
qualifying mask by validation is installed, a run killed mid-pruning-round or mid-alternation
resumes bit-exactly from its checkpoint, and the masks reshard from 2 ranks to 1.

Schedule: 6 warm-up steps, 2 tasks x 3 rounds x 4 steps of pruning (α = 0.25, ε = 0.4: rounds 0,
1, 2 have sparsity 0, 0.25, 0.4375), multi-task phase from step 30 to 40.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multirank import run_ranks

STEPS = 40
KILL_AT = (17, 34)  # mid pruning round (task 0 round 2 is steps 14..17; 16 is checkpointed), mid alternation


class _Killed(Exception):
    pass


def _cfg(data: str, out: str, ck: str, mode: str = "reference", model: str = "csrec", contrastive="random_reverse"):
    from recsys_mtl.config import CSRecConfig, ModelConfig, OptimConfig, TrainConfig

    return TrainConfig(
        data=data, output_dir=out, checkpoint_dir=ck, checkpoint_every_steps=4, keep_last=20, batch_size=64,
        steps=STEPS, eval_outputs=False, log_every=10**9, seed=3,
        model=ModelConfig(name=model, embedding_dim=4, bottom_layer_sizes=(16, 8), tower_layer_sizes=(4,)),
        optim=OptimConfig(dense_lr=3e-3),
        csrec=CSRecConfig(warmup_steps=6, prune_round_steps=4, prune_rounds=3, prune_rate=0.25, min_sparsity=0.4,
                          mode=mode, contrastive=contrastive, reverse_ratio=0.2, analysis_every=5),
    )


def _runs(data: str, root: str) -> dict:
    import json

    from recsys_mtl.train.loop import train

    r = Path(root)
    out: dict = {"losses": {}}

    def record(name, kill=None):
        out["losses"][name] = {}

        def on_step(step, loss):
            if kill is not None and step == kill:
                raise _Killed()
            out["losses"][name][step] = float(loss)
        return on_step

    a = train(_cfg(data, str(r / "A"), str(r / "ckA")), on_step=record("A"))
    for k in KILL_AT:
        try:
            train(_cfg(data, str(r / f"B{k}"), str(r / f"ck{k}")), on_step=record(f"B{k}", kill=k))
        except _Killed:
            pass
        train(_cfg(data, str(r / f"C{k}"), str(r / f"ck{k}")), on_step=record(f"C{k}"))
    f = train(_cfg(data, str(r / "F"), str(r / "ckF"), mode="fused", contrastive="conflicted_random_reverse"))
    s = train(_cfg(data, str(r / "S"), str(r / "ckS"), model="sparse_sharing"))
    if a is not None:
        out["A"], out["F"], out["S"] = a, f, s
        out["analysis_files"] = sorted(p.name for p in (r / "A").iterdir())
        out["A_json"] = json.loads((r / "A" / "mask_analysis.json").read_text())
    return out


def _resume_on_one_rank(data: str, root: str) -> dict:
    """A's final checkpoint (2 ranks) resumed on 1 rank for 4 more multi-task steps."""
    import dataclasses

    from recsys_mtl.train.loop import train

    r = Path(root)
    cfg = dataclasses.replace(_cfg(data, str(r / "A1"), str(r / "ckA")), steps=STEPS + 4, resume_with_new_settings=True)
    return train(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from recsys_mtl.data.synth import generate_recsys

    root = tmp_path_factory.mktemp("masked")
    generate_recsys(root / "data", rows=4_000, seed=5, num_users=300, num_items=500)
    out = run_ranks(_runs, 2, str(root / "data"), str(root), timeout=600)[0]
    out["resumed_on_1"] = run_ranks(_resume_on_one_rank, 1, str(root / "data"), str(root), timeout=300)[0]
    out["root"] = root
    return out


def test_masks_and_procedure_state_reshard_from_2_ranks_to_1(runs, tmp_path):
    """The packed masks and the procedure's state are replicated buffers: the 1-rank continuation
    of a 2-rank run loads them unchanged, and (masks fixed in the multi-task phase) ends with them."""
    from checkpoint_state import full_state

    root = runs["root"]
    r = runs["resumed_on_1"]
    assert r["steps"] == STEPS + 4 and r["world_size"] == 1
    assert r["masked_sharing"]["pruning"] == runs["A"]["masked_sharing"]["pruning"]  # the log came along
    (two,) = sorted((root / "A" / "final_model").glob("step_*"))
    (one,) = sorted((root / "A1" / "final_model").glob("step_*"))
    a, b = full_state(two, tmp_path), full_state(one, tmp_path)
    # (conflict masks are remeasured during the extra steps: not compared)
    keys = [k for k in a if ".masks_" in k or ("procedure_state." in k and ".conflict_" not in k)]
    assert any(".masks_" in k for k in keys) and any("best_" in k for k in keys)
    task_masks = [k for k in keys if ".masks_" in k]
    for k in keys:
        if k in task_masks:  # the task masks (rows 0..T-1); contrastive rows are redrawn every step
            assert torch.equal(a[k][:2], b[k][:2]), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_pruning_reaches_the_sparsity_and_keeps_the_best_qualifying_mask(runs):
    log = runs["A"]["masked_sharing"]
    assert log["schedule"]["multitask_start"] == 30 and log["schedule"]["prune_rounds"] == 3
    for task in ("click", "like"):
        rounds = [p for p in log["pruning"] if p["task"] == task]
        assert [p["round"] for p in rounds] == [0, 1, 2]
        sp = [p["sparsity"] for p in rounds]
        assert sp[0] == 0 and sp[1] == pytest.approx(0.25, abs=0.01) and sp[2] == pytest.approx(0.4375, abs=0.01)
        assert [p["kept"] for p in rounds] == [False, False, True]  # only round 2 reaches ε = 0.4
        assert log["masks"]["sparsity"][task] == pytest.approx(sp[2], abs=1e-12)
    # Every round after the first, and the multi-task phase, start from the warm-up weights.
    snap = log["snapshot"]
    assert snap["step"] == 6
    assert [r["step"] for r in log["rewinds"]] == [10, 14, 18, 22, 26, 30]
    assert all(r["weights_checksum"] == pytest.approx(snap["weights_checksum"], rel=1e-12) for r in log["rewinds"])
    assert 0 < log["masks"]["sharing_ratio"] < 1
    assert log["masks"]["params"]["union"] <= log["masks"]["params_dense"]


def test_resume_mid_round_and_mid_alternation_is_exact(runs):
    a = runs["losses"]["A"]
    assert sorted(a) == list(range(1, STEPS + 1))
    for k in KILL_AT:
        b, c = runs["losses"][f"B{k}"], runs["losses"][f"C{k}"]
        resumed = (k - 1) // 4 * 4  # the last checkpoint before the kill
        assert all(b[s] == a[s] for s in b)
        assert sorted(c) == list(range(resumed + 1, STEPS + 1))
        assert all(c[s] == a[s] for s in c), (k, {s: (a[s], c[s]) for s in c if a[s] != c[s]})


def test_outputs_and_other_modes(runs):
    assert {"mask_analysis.json", "mask_analysis.png", "metrics.json"} <= set(runs["analysis_files"])
    assert "masked_sharing_warmup" not in runs["analysis_files"]
    analysis = runs["A_json"]["analysis"]
    assert [r["step"] for r in analysis] == [30, 35]
    assert all(0 <= r["conflict_ratio"] <= 1 for r in analysis)
    f, s = runs["F"]["masked_sharing"], runs["S"]["masked_sharing"]
    assert f["schedule"]["mode"] == "fused" and f["schedule"]["contrastive"] == "conflicted_random_reverse"
    assert s["schedule"]["mode"] == "parallel" and s["schedule"]["contrastive"] is None
    assert all(r["conflict_ratio"] is not None for r in s["analysis"])
    for r in (runs["A"], runs["F"], runs["S"]):  # 40 tiny steps: evaluated, not necessarily learned
        assert all(0 <= m["auc"] <= 1 for m in r["tasks"].values())
