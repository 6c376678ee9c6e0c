"""The masked-sharing procedure's steps against the algorithm written out densely in float64.

- CSRec's reference mode on a two-task case: tasks in turn, Loss_c = loss_r(L(M_t)) − loss_r(L(M'_t))
  (Eq. 5-6), the gradient masked by M_t, one SGD step per task; weights outside M_t and the other
  task's tower unchanged by task t's step; the contrastive term's gradient reaches the masked
  bottom only (Θ_t), not the tower or the embeddings.
- CSRec's fused mode: the sum of every task's M_t-masked gradient at the same weights, one step.
- Sparse Sharing's parallel step: the summed task losses through the task masks.
- The schedule's phases, and ``rewind`` restoring weights and optimizer state but not masks.

Contrastive masks use ``random_reverse`` with ratio 1, so ``M'_t = NOT M_t`` exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec.optim.keyed import KeyedOptimizerWrapper

from recsys_mtl.config import CSRecConfig, TrainConfig
from recsys_mtl.models.csrec import CSRec
from recsys_mtl.models.sparse_sharing import SparseSharing
from recsys_mtl.modules.embeddings import build_ebc
from recsys_mtl.testing import tiny_batch, tiny_schema
from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.train.masked_sharing import (
    MULTITASK,
    PRUNE,
    WARMUP,
    MaskedSharingProcedure,
    MaskSchedule,
    MaskState,
    Unsharded,
)
from recsys_mtl.train.task import MTLTrainModule

LR = 0.05


def _setup(model_cls=CSRec, mode="reference", task_term="loss_r", seed=0, momentum=0.0):
    torch.manual_seed(seed)
    s = tiny_schema()
    model = model_cls(build_ebc(s, 4), len(s.dense), s.task_names, [7, 5], [3])
    tm = MTLTrainModule(model, MultiTaskLoss(s.tasks))
    tm.procedure_state = MaskState(model)
    g = torch.Generator().manual_seed(seed + 1)
    for mlp in model.masked_layers():  # random task masks (subnets 0..T-1)
        for i in range(mlp.num_layers):
            n, k = mlp.weights()[i].shape
            mlp.set_masks(i, torch.rand(2, n, k, generator=g) < 0.6, subnets=[0, 1])
    dense = {n: p for n, p in tm.named_parameters() if ".ebc." not in n}  # tables fixed here
    opt = KeyedOptimizerWrapper(dense, lambda ps: torch.optim.SGD(ps, lr=LR, momentum=momentum))
    c = CSRecConfig(warmup_steps=1, prune_round_steps=1, prune_rounds=1, contrastive="random_reverse",
                    reverse_ratio=1.0, mode=mode, task_term=task_term)
    cfg = TrainConfig(data="unused", output_dir="unused", csrec=c)
    sched = MaskSchedule(c, 2, 100)
    proc = MaskedSharingProcedure(cfg, Unsharded(tm), opt, total_steps=100, start_step=sched.multitask_start + 1, log={},
                                  evaluate=dict, snapshot_saver=None, snapshot_dir="unused", group=None)
    return s, tm, proc


def _dense_subnet(model, x, masks):
    """The bottom through explicit dense masked weights ``W ⊙ M`` (float64)."""
    h = x
    for mlp in model.masked_layers():
        for i, m in enumerate(masks[: mlp.num_layers]):
            h = torch.relu(h @ (mlp.weights()[i] * m).T + mlp.biases()[i])
    return h


def _reference_losses(ref, batch, k, task, task_masks, contrastive: bool, task_term="loss_r"):
    x = ref.model.input(batch.dense.double(), batch.sparse)  # B x D
    L = ref.loss.task_loss(k, ref.model.towers[task](_dense_subnet(ref.model, x, [m[k] for m in task_masks])),
                           batch.labels.double(), batch.label_mask)
    if not contrastive:
        return L, L
    # The contrastive term reaches the masked bottom only: input and tower read detached.
    tower = ref.model.towers[task]
    frozen_tower = {n: p.detach() for n, p in tower.named_parameters()}
    hc = _dense_subnet(ref.model, x.detach(), [~m[k] for m in task_masks])
    Lc = ref.loss.task_loss(k, torch.func.functional_call(tower, frozen_tower, (hc,)), batch.labels.double(),
                            batch.label_mask)
    r = lambda v: v / (1 + v)  # loss_r = sigmoid(ln v), Eq. 5
    return (r(L) if task_term == "loss_r" else L) - r(Lc), L


def _masks(model):
    return [mlp.get_masks(i)[:2] for mlp in model.masked_layers() for i in range(mlp.num_layers)]


def _compare(tm, ref):
    for (name, p), (_, q) in zip(tm.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.double(), q, atol=2e-6, rtol=1e-5), name


@pytest.mark.parametrize("task_term", ["loss_r", "loss"])
def test_reference_mode_is_algorithm_1_step_by_step(task_term):
    """Two batches x two tasks with momentum SGD (μ = 0.9), so a moment fed by an unmasked
    gradient, or a parameter outside the subnet moved by its moment, would show."""
    mu = 0.9
    s, tm, proc = _setup(task_term=task_term, momentum=mu)
    batches = [tiny_batch(s, 16, seed=3), tiny_batch(s, 16, seed=9)]
    ref = copy.deepcopy(tm).double()
    masks = _masks(tm.model)
    weights = [mlp.weights()[i] for mlp in ref.model.masked_layers() for i in range(mlp.num_layers)]
    moments: dict[int, torch.Tensor] = {}
    for batch in batches:
        for k, task in enumerate(s.task_names):  # the paper's loop, densely: only Θ_t moves
            ref.zero_grad()
            loss, _ = _reference_losses(ref, batch, k, task, masks, contrastive=True, task_term=task_term)
            loss.backward()
            frozen = {id(p) for t, tower in ref.model.towers.items() if t != task for p in tower.parameters()}
            masked = {id(w): m[k] for w, m in zip(weights, masks)}
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    if ".ebc." in name:
                        continue
                    g = torch.zeros_like(p) if p.grad is None else p.grad
                    g = g * masked[id(p)] if id(p) in masked else g  # the gradient masked by M_t
                    moments[id(p)] = g if id(p) not in moments else mu * moments[id(p)] + g
                    step = LR * moments[id(p)]
                    if id(p) in frozen:
                        continue  # other towers: unchanged
                    p -= step * masked[id(p)] if id(p) in masked else step  # weights outside M_t: unchanged
    before_outside = [w.detach().clone() for w in proc.weights]
    for batch in batches:
        loss = proc.run_step(batch)
    _compare(tm, ref)
    for w, b, m in zip(proc.weights, before_outside, masks):  # untouched outside every task's mask
        assert torch.equal(w.detach()[~m.any(0)], b[~m.any(0)])
    assert torch.isfinite(loss)


def test_fused_mode_sums_the_masked_task_gradients_at_the_same_weights():
    s, tm, proc = _setup(mode="fused")
    batch = tiny_batch(s, 16, seed=4)
    ref = copy.deepcopy(tm).double()
    masks = _masks(tm.model)
    weights = [mlp.weights()[i] for mlp in ref.model.masked_layers() for i in range(mlp.num_layers)]
    ref.zero_grad()
    grads = {}
    for k, task in enumerate(s.task_names):
        loss, _ = _reference_losses(ref, batch, k, task, masks, contrastive=True)
        gs = torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)
        for (name, p), g in zip(ref.named_parameters(), gs):
            if g is None:
                continue
            for w, m in zip(weights, masks):
                if p is w:
                    g = g * m[k]
            grads[name] = grads.get(name, 0) + g
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in grads and ".ebc." not in name:
                p -= LR * grads[name]
    proc.run_step(batch)
    _compare(tm, ref)


def test_sparse_sharing_step_is_the_summed_loss_through_task_masks():
    s, tm, proc = _setup(model_cls=SparseSharing)
    assert not proc.alternating and not proc.contrastive
    batch = tiny_batch(s, 16, seed=5)
    ref = copy.deepcopy(tm).double()
    masks = _masks(tm.model)
    total = sum(_reference_losses(ref, batch, k, t, masks, contrastive=False)[0] for k, t in enumerate(s.task_names))
    ref.zero_grad()
    total.backward()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.grad is not None and ".ebc." not in name:
                p -= LR * p.grad
    reported = proc.run_step(batch)
    _compare(tm, ref)
    assert float(reported) == pytest.approx(float(total.detach()), rel=1e-5)


def test_contrastive_masks_are_redrawn_each_step_identically_for_a_seed():
    _, tm, proc = _setup()
    proc.c = CSRecConfig(reverse_ratio=0.3)
    proc._configure(proc.schedule.phase(proc.step))
    proc._draw_contrastive_masks(7)
    first = [mlp.get_masks(i)[2:].clone() for mlp in tm.model.masked_layers() for i in range(mlp.num_layers)]
    proc._draw_contrastive_masks(8)
    second = [mlp.get_masks(i)[2:] for mlp in tm.model.masked_layers() for i in range(mlp.num_layers)]
    proc._draw_contrastive_masks(7)
    again = [mlp.get_masks(i)[2:] for mlp in tm.model.masked_layers() for i in range(mlp.num_layers)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    task = _masks(tm.model)
    flipped = sum(int((a ^ m).sum()) for a, m in zip(first, task))
    total = sum(m.numel() for m in task)
    assert 0.2 < flipped / total < 0.4  # ratio 0.3 of all weights reversed


def test_schedule_phases():
    c = CSRecConfig(warmup_steps=4, prune_round_steps=3, prune_rounds=2)
    s = MaskSchedule(c, 2, 30)
    kinds = [(p.kind, p.task, p.round) for p in map(s.phase, range(18))]
    assert kinds[:4] == [(WARMUP, None, None)] * 4
    assert kinds[4:7] == [(PRUNE, 0, 0)] * 3 and kinds[7:10] == [(PRUNE, 0, 1)] * 3
    assert kinds[10:13] == [(PRUNE, 1, 0)] * 3 and kinds[13:16] == [(PRUNE, 1, 1)] * 3
    assert kinds[16:] == [(MULTITASK, None, None)] * 2 and s.multitask_start == 16
    with pytest.raises(ValueError, match="more than 16 steps"):
        MaskSchedule(c, 2, 16)
    assert MaskSchedule(CSRecConfig(prune_rate=0.1, min_sparsity=0.4), 2, 10**6).rounds == 6  # 5 to reach ε, + 1


def test_optimizer_steps_count_the_reference_modes_per_task_steps():
    from recsys_mtl.train.masked_sharing import optimizer_steps

    _, tm, proc = _setup()
    cfg = proc.cfg  # multi-task phase from step 3 (1 warm-up + 2 tasks x 1 round x 1 step)
    assert optimizer_steps(tm.model, cfg, 100) == 3 + 97 * 2
    fused = TrainConfig(data="-", output_dir="-", csrec=CSRecConfig(**{**cfg.csrec.__dict__, "mode": "fused"}))
    assert optimizer_steps(tm.model, fused, 100) == 100
    _, tm_s, _ = _setup(model_cls=SparseSharing)
    assert optimizer_steps(tm_s.model, cfg, 100) == 100
