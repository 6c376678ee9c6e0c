"""One full CSRec training step (Algorithm 1's multi-task loop on one batch, every task in turn),
ours against the naive per-task masked-copy implementation, in one run; part of
``recsys-mtl bench masked-matmul``.

Both contenders compute the same step (the JSON reports the largest parameter difference after
it): per task ``t``, ``Loss_c = loss_r(L(M_t)) − loss_r(L(M'_t))`` (Eq. 5–6) with the
contrastive term reaching the masked bottom only, the weight gradient masked by ``M_t``, one Adam
step, parameters outside task ``t``'s subnet restored.

* ``naive``: how a model without the op does it (the public reference's pattern): per task, copy
  the shared weights, mask them in place with ``M_t`` and run forward + backward with plain
  ``F.linear`` layers, restore, mask with ``M'_t``, run the contrastive forward + backward, combine
  the two weight gradients under the masks, restore the weights and step. Two forward and two
  backward passes per task, embeddings included.
* ``ours``: :class:`~recsys_mtl.train.masked_sharing.MaskedSharingProcedure` in ``reference``
  mode: per task one forward of the task and contrastive subnets together (one
  :func:`~recsys_mtl.ops.masked_matmul.masked_linear` per layer, shared input at the first
  layer), one backward.
* ``ours_fused``: the procedure's ``fused`` mode for scale (one forward of all ``2T`` subnets, one
  backward, one step: every task's gradient at the same weights, so not the same step).

The model is unsharded here (one process, plain ``EmbeddingBagCollection`` tables stepped by the
same Adam), so the step is the masked bottom, towers, embeddings and optimizer of one rank.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

THREADS = 2
TARGET_RATIO = 2.0


def _setup(schema, bottom, towers, mode: str, seed: int, sparsity: float, optimizer: str = "adam"):
    from recsys_mtl.config import CSRecConfig, TrainConfig
    from recsys_mtl.models.csrec import CSRec
    from recsys_mtl.modules.embeddings import build_ebc
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.masked_sharing import MaskedSharingProcedure, MaskSchedule, MaskState, Unsharded
    from recsys_mtl.train.task import MTLTrainModule
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    torch.manual_seed(seed)
    model = CSRec(build_ebc(schema, 16), len(schema.dense), schema.task_names, bottom, towers)
    tm = MTLTrainModule(model, MultiTaskLoss(schema.tasks))
    tm.procedure_state = MaskState(model)
    g = torch.Generator().manual_seed(seed + 1)
    for i, w in enumerate(model.bottom.weights()):
        model.bottom.set_masks(i, torch.rand(2, *w.shape, generator=g) >= sparsity, subnets=[0, 1])
    # Adam on the dense parameters, SGD on the tables: in a sharded run the tables' update is
    # fbgemm's fused row update of the touched rows, not a dense optimizer pass over every row.
    params = dict(tm.named_parameters())
    dense = {n: p for n, p in params.items() if ".ebc." not in n}
    tables = {n: p for n, p in params.items() if ".ebc." in n}
    opt = CombinedOptimizer([
        ("dense", KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adam(ps, lr=1e-3) if optimizer == "adam"
                                        else torch.optim.SGD(ps, lr=0.1))),
        ("tables", KeyedOptimizerWrapper(tables, lambda ps: torch.optim.SGD(ps, lr=1e-2))),
    ])
    c = CSRecConfig(warmup_steps=1, prune_round_steps=1, prune_rounds=1, mode=mode, reverse_ratio=0.1)
    start = MaskSchedule(c, 2, 10**9).multitask_start + 1  # inside the multi-task phase
    proc = MaskedSharingProcedure(TrainConfig(data="-", output_dir="-", csrec=c), Unsharded(tm), opt,
                                  total_steps=10**9, start_step=start, log={}, evaluate=dict, snapshot_saver=None,
                                  snapshot_dir="-", group=None)
    return tm, opt, proc


class NaiveCSRecStep:
    """The per-task masked-copy step (see the module docstring), on its own copy of the model."""

    def __init__(self, tm: nn.Module, opt, proc) -> None:
        self.tm, self.opt, self.proc = tm, opt, proc
        self.model = tm.model
        self.weights = self.model.bottom.weights()
        self.biases = self.model.bottom.biases()
        proc._enter(proc.schedule.phase(proc.step))  # the multi-task phase's task masks

    def _logits(self, x: torch.Tensor, weights: list[torch.Tensor], task: str, detached: bool) -> torch.Tensor:
        h = x.detach() if detached else x
        for w, b in zip(weights, self.biases):
            h = torch.relu(F.linear(h, w, b))  # B x N
        tower = self.model.towers[task]
        if detached:
            return torch.func.functional_call(tower, {n: p.detach() for n, p in tower.named_parameters()}, (h,))
        return tower(h)  # B

    def step(self, batch) -> None:
        from recsys_mtl.train.masked_sharing import loss_r, step_subnet

        proc, model, loss = self.proc, self.model, self.tm.loss
        proc._draw_contrastive_masks(proc.step)  # the same contrastive masks as ours at this step
        masks = [model.bottom.get_masks(i) for i in range(len(self.weights))]  # 2T x N x K bool
        T = model.num_tasks
        for k, task in enumerate(model.tasks):
            self.opt.zero_grad()
            saved = [w.detach().clone() for w in self.weights]  # the copy of the shared weights
            with torch.no_grad():
                for w, m in zip(self.weights, masks):
                    w.mul_(m[k])  # task subnet: masked in place
            x = model.input(batch.dense, batch.sparse)  # B x D
            lt = loss.task_loss(k, self._logits(x, self.weights, task, False), batch.labels, batch.label_mask)
            loss_r(lt).backward()
            g_task = [w.grad.clone() for w in self.weights]
            with torch.no_grad():
                for w, s, m in zip(self.weights, saved, masks):
                    w.copy_(s * m[T + k])  # contrastive subnet: restored, then masked with M'_t
                    w.grad = None
            x = model.input(batch.dense, batch.sparse)  # B x D (a second lookup)
            lc = loss.task_loss(k, self._logits(x, self.weights, task, True), batch.labels, batch.label_mask)
            (-loss_r(lc)).backward()
            with torch.no_grad():
                for w, s, m, g in zip(self.weights, saved, masks, g_task):
                    w.grad = (g + w.grad * m[T + k]) * m[k]  # both gradients, under the masks
                    w.copy_(s)  # restored
            step_subnet(self.opt, self.weights, [m[k] for m in masks],
                        [p for t, tw in model.towers.items() if t != task for p in tw.parameters()])
        proc.step += 1


def bench_csrec_step(
    batch_size: int = 512,
    *,
    vocab_scale: float = 0.001,
    bottom: tuple[int, ...] = (256, 128),
    towers: tuple[int, ...] = (64,),
    sparsity: float = 0.4,
    steps: int = 10,
    warmup: int = 3,
    seed: int = 0,
    optimizer: str = "adam",
) -> dict:
    """Times one CSRec training step of ``naive``, ``ours`` and ``ours_fused`` (round-robin, the
    median of ``steps`` after ``warmup``) on W1's features (26 sparse x 16 + 13 dense = 429 inputs;
    vocabularies x ``vocab_scale``, so the unsharded tables stay small), masks of ``sparsity`` zeros.

    Returns:
        dict: ``{"B", "K", "bottom", "ms_per_step": {contender: float}, "ratio" (naive / ours),
        "ratio_fused" (naive / ours_fused), "max_param_diff" (naive vs ours after one step)}``.
        ``optimizer="sgd"`` (lr 0.1) makes that difference float rounding only; under Adam (the
        timed setting) a parameter whose gradient is ~1e-9 in one and 0 in the other moves by up
        to ~lr in one of them.
    """
    from recsys_mtl.bench.workloads import Workload, make_batches, w1_schema
    from recsys_mtl.config import ModelConfig

    schema = w1_schema(vocab_scale=vocab_scale)
    workload = Workload(name="csrec_step", schema=schema, model=ModelConfig(name="csrec"), batch_size=batch_size)
    batches = make_batches(workload, 4, seed=seed)
    tm_a, _, proc_a = _setup(schema, bottom, towers, "reference", seed, sparsity, optimizer)
    tm_b, opt_b, proc_b = _setup(schema, bottom, towers, "reference", seed, sparsity, optimizer)  # same model
    naive = NaiveCSRecStep(tm_b, opt_b, proc_b)
    proc_a.run_step(batches[0])
    naive.step(batches[0])
    diff = max((p - q).abs().max().item() for p, q in zip(tm_a.parameters(), tm_b.parameters()))
    _, _, proc_f = _setup(schema, bottom, towers, "fused", seed, sparsity, optimizer)
    contenders = {"naive": naive.step, "ours": proc_a.run_step, "ours_fused": proc_f.run_step}
    times: dict[str, list[float]] = {n: [] for n in contenders}
    for i in range(warmup + steps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn(batches[i % len(batches)])
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    ms = {n: 1e3 * statistics.median(v) for n, v in times.items()}
    return {
        "B": batch_size, "K": len(schema.sparse) * 16 + len(schema.dense), "bottom": list(bottom), "towers": list(towers),
        "tasks": 2, "mask_sparsity": sparsity, "ms_per_step": ms,
        "ratio": ms["naive"] / ms["ours"], "ratio_fused": ms["naive"] / ms["ours_fused"],
        "target_ratio": TARGET_RATIO, "max_param_diff": diff, "optimizer": optimizer,
    }
