"""The training procedure of the masked-sharing models (``sparse_sharing``, ``csrec``,
``ml_csrec``): warm-up, per-task iterative magnitude pruning with rewinding, then the multi-task
phase — Sparse Sharing's parallel subnets (Sun et al., AAAI'20) or CSRec's alternating
contrastive steps (Bai et al., WWW'22, Algorithm 1, Eq. 3-6).

The procedure is an object the one training loop drives through its pipeline interface
(``progress(batches) -> (loss, output)``); the loop keeps its data order, checkpoints, evaluation
and final model. The schedule is a pure function of the global step (:class:`MaskSchedule`), the
masks are buffers of the model, and the procedure's own state (the best mask of each task and its
validation metric, the latest conflict masks) is a module of buffers in the train module
(:class:`MaskState`), so DCP checkpoints carry all of it: a run resumes exactly mid-warm-up,
mid-round and mid-multi-task phase. The warm-up weights that each round rewinds to are a DCP
checkpoint of their own (``CK/masked_sharing_warmup``).

Phases, in global optimizer steps (``W`` warm-up steps, ``T`` tasks, ``R`` rounds of ``P`` steps):

- ``[0, W)``: warm-up, every mask all ones: one dense shared bottom trained on every task's loss.
- ``[W + (t R + r) P, W + (t R + r + 1) P)``: pruning round ``r`` of task ``t``: rewound to the
  warm-up weights (and optimizer state), task ``t`` alone trains through its current mask; at the
  end its validation metric is measured, the mask kept as task ``t``'s best if it is at least
  ``ε`` sparse and better than the best so far, then ``α`` of each layer's surviving weights are
  pruned by magnitude. After the last round the task's best mask is installed.
- ``[W + T R P, end)``: the multi-task phase from the warm-up weights (lottery-ticket rewinding):
  - Sparse Sharing: every task through its subnet, the summed loss, one step per batch;
  - CSRec ``reference``: per batch, tasks in turn: ``Loss_c = loss_r(L(M_t)) − loss_r(L(M'_t))``
    (Eq. 6, ``loss_r = sigmoid(ln L)``, Eq. 5), the gradient masked by ``M_t``, one optimizer step
    (embeddings included: every backward into a fused table is an update); parameters outside task
    ``t``'s subnet (weights outside ``M_t``, other towers) are kept as they were, so only ``Θ_t``
    moves (an optimizer with momentum would otherwise move them with zero gradients);
  - CSRec ``fused``: the ``2T`` subnets of a layer in one op, ``Σ_t Loss_c,t`` in one backward
    with task ``t``'s gradient still masked by ``M_t`` (the contrastive subnet's weights outside
    ``M_t`` are read detached), one step per batch. It differs from ``reference`` in that every
    task's gradient is taken at the same weights (no alternation), the embeddings step once per
    batch, and a frozen parameter's optimizer moment is not held back; it is what CSRec(CL) is
    (contrastive learning without alternate training).
  Contrastive masks ``M'_t = M_t XOR R_t`` are drawn every step from a generator seeded by
  ``(seed, step, layer)`` — the same on every rank, with no communication.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from recsys_mtl.config import CSRecConfig, TrainConfig
from recsys_mtl.modules.masked_mlp import MaskedMLP, pair_key
from recsys_mtl.modules.masking import (
    conflict_ratio,
    conflicted_random_reverse,
    conflicting_weights,
    field_occupation,
    magnitude_prune,
    random_reverse,
    rounds_to_sparsity,
    shared_random_reverse,
    shared_weights,
    sharing_ratio,
    sparsity,
    subnet_param_counts,
)
from recsys_mtl.ops.masked_matmul import pack_masks, unpack_masks

WARMUP, PRUNE, MULTITASK = "warmup", "prune", "multitask"
SNAPSHOT_DIR = "masked_sharing_warmup"
STATE_MODULE = "procedure_state"  # the MaskState's attribute name on the train module


def is_masked_sharing(model: nn.Module) -> bool:
    """True for models trained by this procedure (they expose ``masked_layers`` and ``pairs``)."""
    return hasattr(model, "masked_layers") and hasattr(model, "pairs")


def masked_layers(model: nn.Module) -> list[tuple[MaskedMLP, int]]:
    """Every masked weight of ``model``'s bottom as ``(MaskedMLP, layer)``, in order."""
    return [(mlp, i) for mlp in model.masked_layers() for i in range(mlp.num_layers)]


def optimizer_steps(model: nn.Module, cfg: TrainConfig, total_steps: int) -> int:
    """Optimizer steps of a run of ``total_steps`` batches: CSRec's reference mode takes one per
    task per batch in its multi-task phase (what a learning-rate schedule counts)."""
    if model.num_subnets < 2 * model.num_tasks or cfg.csrec.mode != "reference":
        return total_steps
    start = MaskSchedule(cfg.csrec, model.num_tasks, total_steps).multitask_start
    return start + (total_steps - start) * model.num_tasks


def step_subnet(optimizer, weights: list[torch.Tensor], masks: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """One optimizer step that moves only one task's subnet: afterwards the masked ``weights`` are
    put back outside their ``masks`` (``N x K`` bool each) and ``others`` (e.g. the other tasks'
    towers) entirely, so momentum moves nothing outside Θ_t."""
    frozen = [(w, m, w.detach().clone()) for w, m in zip(weights, masks)]
    kept = [(p, p.detach().clone()) for p in others]
    optimizer.step()
    with torch.no_grad():
        for w, m, before in frozen:
            w.copy_(torch.where(m, w, before))
        for p, before in kept:
            p.copy_(before)


def loss_r(loss: torch.Tensor) -> torch.Tensor:
    """CSRec Eq. 5, ``sigmoid(ln L)``, computed as the identical ``L / (1 + L)`` (finite at L = 0).

    Example::

        >>> round(float(loss_r(torch.tensor(3.0))), 6), round(float(torch.sigmoid(torch.log(torch.tensor(3.0)))), 6)
        (0.75, 0.75)
    """
    return loss / (1 + loss)


# ---- the schedule ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """One phase of the schedule: ``kind`` over steps ``[start, end)``; a pruning round names its
    ``task`` (index) and ``round``."""

    kind: str
    start: int
    end: int
    task: int | None = None
    round: int | None = None


class MaskSchedule:
    """The phases as a function of the global step.

    Args:
        cfg (CSRecConfig): the schedule's settings.
        num_tasks (int): ``T``.
        total_steps (int): optimizer steps of the run (batches; CSRec's reference mode takes T
            optimizer steps per batch, counted here as one).

    Example::

        >>> from recsys_mtl.config import CSRecConfig
        >>> s = MaskSchedule(CSRecConfig(warmup_steps=10, prune_round_steps=5, prune_rounds=2), 2, 100)
        >>> s.phase(0).kind, s.phase(10), s.phase(29).task, s.multitask_start
        ('warmup', Phase(kind='prune', start=10, end=15, task=0, round=0), 1, 30)
    """

    def __init__(self, cfg: CSRecConfig, num_tasks: int, total_steps: int) -> None:
        self.cfg = cfg
        self.num_tasks = num_tasks
        self.rounds = cfg.prune_rounds or rounds_to_sparsity(cfg.prune_rate, cfg.min_sparsity) + 1
        self.multitask_start = cfg.warmup_steps + num_tasks * self.rounds * cfg.prune_round_steps
        self.total_steps = total_steps
        if total_steps <= self.multitask_start:
            raise ValueError(
                f"the masked-sharing schedule needs more than {self.multitask_start:,} steps before its multi-task "
                f"phase ({cfg.warmup_steps} warm-up + {num_tasks} tasks x {self.rounds} pruning rounds x "
                f"{cfg.prune_round_steps} steps), but the run has {total_steps:,}: raise --steps/--epochs or "
                f"lower --csrec-warmup-steps, --csrec-prune-round-steps, --csrec-prune-rounds"
            )

    def phase(self, step: int) -> Phase:
        c = self.cfg
        if step < c.warmup_steps:
            return Phase(WARMUP, 0, c.warmup_steps)
        if step < self.multitask_start:
            k = (step - c.warmup_steps) // c.prune_round_steps
            start = c.warmup_steps + k * c.prune_round_steps
            return Phase(PRUNE, start, start + c.prune_round_steps, task=k // self.rounds, round=k % self.rounds)
        return Phase(MULTITASK, self.multitask_start, max(self.total_steps, self.multitask_start + 1))


# ---- state in the state dict ------------------------------------------------------------------------

class MaskState(nn.Module):
    """The procedure's state as buffers (checkpointed with the model): per masked layer ``j`` the
    best mask found so far for each task (``best_j``, ``T x N x C`` packed), the conflict mask of the
    latest measured step (``conflict_j``, ``1 x N x C`` packed), and ``best_metric`` (``T``, the
    validation metric of each best mask; −inf: none yet).

    Args:
        model (nn.Module): a masked-sharing model (may be on ``meta``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.num_tasks = model.num_tasks
        self.num_weights = 0
        dev = None
        for j, (mlp, i) in enumerate(masked_layers(model)):
            packed = mlp.packed_masks(i)  # S x N x C
            dev = packed.device
            n, c = packed.shape[1:]
            self.register_buffer(f"best_{j}", torch.zeros(self.num_tasks, n, c, dtype=torch.uint8, device=dev))
            self.register_buffer(f"conflict_{j}", torch.zeros(1, n, c, dtype=torch.uint8, device=dev))
            self.num_weights += 1
        self.register_buffer("best_metric", torch.full((self.num_tasks,), -math.inf, dtype=torch.float64, device=dev))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """No best masks, no conflicts (also what TorchRec's meta materialisation calls)."""
        for j in range(self.num_weights):
            getattr(self, f"best_{j}").zero_()
            getattr(self, f"conflict_{j}").zero_()
        self.best_metric.fill_(-math.inf)


# ---- snapshots (the warm-up weights) ---------------------------------------------------------------

def _rewound(key: str) -> bool:
    """State keys a rewind restores: weights and optimizer state, not masks, the procedure's state,
    the loss-weight schedule or the learning-rate schedule's position."""
    leaf = key.rsplit(".", 1)[-1]
    return not (leaf.startswith("masks_") or f"{STATE_MODULE}." in key or key.startswith("loss.")
                or "__warmup" in key)


def rewind(path: Path, dmp: nn.Module, optimizer, process_group) -> None:
    """Loads the weights and optimizer state of checkpoint ``path`` in place, except what
    :func:`_rewound` excludes (a collective: every rank calls it)."""
    model_sd = {k: v for k, v in dmp.state_dict().items() if _rewound(k)}
    optim_sd = optimizer.state_dict()
    optim_state = {k: v for k, v in optim_sd["state"].items() if _rewound(k)}
    state = {"model": model_sd, "optim": {"state": optim_state}}
    dcp.load(state, checkpoint_id=str(path), process_group=process_group)
    dmp.load_state_dict(state["model"], strict=False)
    # DCP loads tensors in place into the tensors it is given, which for the optimizer are its own
    # state tensors (Adam's moments and step, the fused tables' momentum shards): no
    # load_state_dict, which would also move the learning-rate schedule back.


# ---- the procedure ---------------------------------------------------------------------------------

class MaskedSharingProcedure:
    """Runs the schedule for a ``DistributedModelParallel`` masked-sharing model.

    Args:
        cfg (TrainConfig): the run (its ``csrec`` settings and ``seed``).
        dmp (nn.Module): the sharded train module (``dmp.module`` is the ``MTLTrainModule`` with a
            :class:`MaskState` at ``procedure_state``).
        optimizer: the run's combined optimizer.
        total_steps (int): optimizer steps of the run.
        start_step (int): steps already done (a resume).
        log (dict): the procedure's log, restored from a checkpoint (``{}`` for a fresh run);
            updated in place: ``pruning`` (one entry per round) and ``analysis`` (ratios over steps).
        evaluate (Callable[[], dict]): evaluates the model on the eval split (``{task: metrics}`` on
            rank 0, ``{}`` elsewhere; a collective).
        snapshot_saver (Callable[[Path], object]): a ``Checkpointer`` factory for a directory.
        snapshot_dir (Path): where the warm-up weights are kept.
        group: CPU process group for the small broadcasts (None: one rank).
    """

    def __init__(self, cfg: TrainConfig, dmp: nn.Module, optimizer, *, total_steps: int, start_step: int, log: dict,
                 evaluate: Callable[[], dict], snapshot_saver: Callable[[Path], object], snapshot_dir: Path,
                 group: dist.ProcessGroup | None) -> None:
        self.cfg, self.c = cfg, cfg.csrec
        self.dmp, self.optimizer = dmp, optimizer
        self.train_module = dmp.module
        self.model = self.train_module.model
        self.state: MaskState = getattr(self.train_module, STATE_MODULE)
        self.tasks: list[str] = list(self.model.tasks)
        self.T = len(self.tasks)
        self.layers = masked_layers(self.model)
        self.weights = [mlp.weights()[i] for mlp, i in self.layers]
        self.contrastive_capable = self.model.num_subnets >= 2 * self.T
        self.contrastive = self.contrastive_capable and self.c.contrastive_loss
        self.alternating = self.contrastive_capable and self.c.mode == "reference"
        self.schedule = MaskSchedule(self.c, self.T, total_steps)
        self.step = start_step
        self.log = log
        self.log.setdefault("pruning", [])
        self.log.setdefault("analysis", [])
        self.evaluate = evaluate
        self.snapshot_saver = snapshot_saver
        self.snapshot_dir = Path(snapshot_dir)
        self.group = group
        self.task_index = {t: k for k, t in enumerate(self.tasks)}
        self._configured: Phase | None = None
        self._task_masks: list[torch.Tensor] | None = None  # per layer T x N x K bool (fixed in multitask)
        self._task_losses: list[torch.Tensor] = []
        self._last_conflict: float | None = None
        self._snapshots = None

    # ---- the loop's pipeline interface --------------------------------------------------------------

    def pipeline(self, device: torch.device) -> "MaskedSharingPipeline":
        return MaskedSharingPipeline(self, device)

    def run_step(self, batch) -> torch.Tensor:
        """One step of the schedule on ``batch`` (on the device); returns the summed task loss."""
        ph = self.schedule.phase(self.step)
        self._enter(ph)
        if ph.kind == MULTITASK and self.contrastive:
            self._draw_contrastive_masks(self.step)
        if ph.kind == MULTITASK and self.alternating:
            loss = self._alternating_step(batch)
        else:
            loss = self._joint_step(batch, measure=ph.kind == MULTITASK and self._measure_now())
        if ph.kind == MULTITASK and self.step % self.c.analysis_every == 0:
            self._record_analysis(self.step)
        self.step += 1
        return loss

    # ---- phase transitions ----------------------------------------------------------------------------

    def _enter(self, ph: Phase) -> None:
        """Boundary actions of the phase starting at this step (they run before its first step, and
        a checkpoint is taken after a step: a resume at a boundary runs them), then the phase's
        step configuration (also after a resume mid-phase)."""
        if self._configured == ph:
            return
        at_start = self.step == ph.start
        if at_start and self.step > 0:
            prev = self.schedule.phase(self.step - 1)
            if prev.kind == PRUNE:
                self._finish_round(prev)
        if at_start and ph.kind == PRUNE:
            if self.step == self.c.warmup_steps:
                self._save_snapshot()
            else:
                self._rewind()
        if at_start and ph.kind == MULTITASK:
            self._rewind()
            self._record_masks()
        self._configure(ph)
        self._configured = ph

    def _configure(self, ph: Phase) -> None:
        tm = self.train_module
        if ph.kind == WARMUP:  # every mask is all ones: one subnet serves every tower
            self.model.pairs = [(0, t) for t in self.tasks]
            tm.objective = self._warmup_objective
        elif ph.kind == PRUNE:
            task = self.tasks[ph.task]
            self.model.pairs = [(ph.task, task)]
            tm.objective = lambda logits, labels, mask: tm.loss.task_loss(ph.task, logits[pair_key(ph.task, task)],
                                                                          labels, mask)
        else:
            self._task_masks = [mlp.get_masks(i)[: self.T] for mlp, i in self.layers]  # T x N x K each
            pairs = [(k, t) for k, t in enumerate(self.tasks)]
            if self.contrastive and not self.alternating:
                pairs += [(self.T + k, t) for k, t in enumerate(self.tasks)]
            self.model.pairs = pairs
            # Eq. 6's contrastive term updates Θ_t (the masked bottom) only.
            self.model.detached_subnets = frozenset(range(self.T, 2 * self.T)) if self.contrastive else frozenset()
            tm.objective = self._multitask_objective

    def _saver(self):
        """The snapshot's ``Checkpointer`` (made once: each one opens a gloo group)."""
        if self._snapshots is None:
            self._snapshots = self.snapshot_saver(self.snapshot_dir)
        return self._snapshots

    def _save_snapshot(self) -> None:
        from recsys_mtl.train.checkpoint import TrainPosition

        saver = self._saver()
        saver.save(self.dmp, self.optimizer, TrainPosition(step=self.step))
        self.log["snapshot"] = {"step": self.step, "weights_checksum": self._checksum()}

    def _checksum(self) -> float:
        """Σ|w| over the masked weights and the towers: what the log shows of a rewind."""
        params = [*self.weights, *self.model.towers.parameters()]
        return float(sum(p.detach().double().abs().sum() for p in params))

    def _rewind(self) -> None:
        saver = self._saver()
        path = saver.latest()
        if path is None:
            raise RuntimeError(f"the warm-up weights to rewind to are missing from {self.snapshot_dir} "
                               f"(the pruning rounds rewind to them); rerun from the start")
        rewind(path, self.dmp, self.optimizer, saver.pg)
        self.log.setdefault("rewinds", []).append({"step": self.step, "weights_checksum": self._checksum()})

    def _broadcast(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        if self.group is not None:
            dist.broadcast(t, src=0, group=self.group)
        return float(t[0])

    def _finish_round(self, ph: Phase) -> None:
        """End of pruning round ``ph``: validate task ``ph.task`` through its mask, keep the mask if
        it is the best qualifying one, then prune (or, after the last round, install the best)."""
        k, task = ph.task, self.tasks[ph.task]
        metrics = self.evaluate().get(task, {})
        value = metrics.get("auc", -metrics["mse"] if "mse" in metrics else math.nan)
        value = self._broadcast(float(value) if value is not None else math.nan)
        current = [mlp.get_masks(i)[k] for mlp, i in self.layers]  # N x K each
        sp = sparsity(current)
        qualifies = sp >= self.c.min_sparsity - 1e-12 and not math.isnan(value)
        kept = qualifies and value > float(self.state.best_metric[k])
        if kept:
            for j, m in enumerate(current):
                getattr(self.state, f"best_{j}")[k] = pack_masks(m.unsqueeze(0))[0]
            self.state.best_metric[k] = value
        self.log["pruning"].append({"task": task, "round": ph.round, "step": self.step, "sparsity": sp,
                                    "metric": value, "kept": kept})
        if ph.round < self.schedule.rounds - 1:
            for (mlp, i), w, m in zip(self.layers, self.weights, current):
                pruned = magnitude_prune(w.detach().to(m.device), m, self.c.prune_rate)  # N x K
                mlp.set_masks(i, pruned.unsqueeze(0), subnets=[k])
            return
        if not math.isfinite(float(self.state.best_metric[k])):
            raise RuntimeError(f"no mask of task {task!r} reached --csrec-min-sparsity {self.c.min_sparsity} in "
                               f"{self.schedule.rounds} rounds of pruning {self.c.prune_rate:.0%}: raise "
                               f"--csrec-prune-rounds")
        for j, (mlp, i) in enumerate(self.layers):
            best = unpack_masks(getattr(self.state, f"best_{j}")[k : k + 1], mlp.weights()[i].shape[1])
            subnets = [k, self.T + k] if self.contrastive_capable else [k]
            mlp.set_masks(i, best.expand(len(subnets), -1, -1), subnets=subnets)

    # ---- objectives -------------------------------------------------------------------------------------

    def _warmup_objective(self, logits: dict, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = self.train_module.loss
        per_task = torch.stack([loss.task_loss(k, logits[pair_key(0, t)], labels, mask)
                                for k, t in enumerate(self.tasks)])  # T
        return (loss.current_weights().to(per_task.dtype) * per_task).sum()

    def _task_term(self, task_loss: torch.Tensor) -> torch.Tensor:
        return loss_r(task_loss) if self.c.task_term == "loss_r" else task_loss

    def _multitask_objective(self, logits: dict, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sparse Sharing: the weighted task losses; CSRec: ``Σ_t Loss_c,t`` (Eq. 6) over the tasks
        in ``pairs`` (one task in the reference mode's sub-steps)."""
        loss = self.train_module.loss
        weights = loss.current_weights()
        total, self._task_losses = 0.0, []
        for s, task in self.model.pairs:
            if s >= self.T:
                continue
            k = self.task_index[task]
            lt = loss.task_loss(k, logits[pair_key(s, task)], labels, mask)
            self._task_losses.append(lt)
            if not self.contrastive:
                total = total + weights[k].to(lt.dtype) * lt
                continue
            lc = loss.task_loss(k, logits[pair_key(self.T + k, task)], labels, mask)
            total = total + self._task_term(lt) - loss_r(lc)  # Eq. 6
        return total

    # ---- steps -----------------------------------------------------------------------------------------

    def _joint_step(self, batch, measure: bool) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss, _ = self.dmp(batch)
        if measure:  # per-task gradients of the masked weights, for the conflict masks / ratio
            grads = [torch.autograd.grad(lt, self.weights, retain_graph=True) for lt in self._task_losses]
            self._store_conflicts([[g for g in per_task] for per_task in grads], all_reduce=True)
        loss.backward()
        self.optimizer.step()
        return self._reported_loss(loss)

    def _reported_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self._task_losses and self.train_module.objective == self._multitask_objective:
            return torch.stack([lt.detach() for lt in self._task_losses]).sum()
        return loss.detach()

    def _alternating_step(self, batch) -> torch.Tensor:
        """CSRec Algorithm 1's multi-task loop on one batch: tasks in turn, one step each."""
        tm, model = self.train_module, self.model
        losses, grads = [], []
        measure = self._measure_now()  # the conflict masks: for the conflicted strategy or the analysis
        for k, task in enumerate(self.tasks):
            model.pairs = [(k, task)] + ([(self.T + k, task)] if self.contrastive else [])
            self.optimizer.zero_grad()
            loss, _ = self.dmp(batch)
            loss.backward()
            masks = [m[k].to(w.device) for m, w in zip(self._task_masks, self.weights)]  # N x K each
            for w, m in zip(self.weights, masks):
                if w.grad is not None:
                    w.grad.mul_(m)  # only Θ_t: the contrastive subnet's weights outside M_t get none
            if measure:
                grads.append([w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w)
                              for w in self.weights])
            step_subnet(self.optimizer, self.weights, masks,
                        [p for t, tower in model.towers.items() if t != task for p in tower.parameters()])
            losses.append(self._task_losses[0].detach())
        if measure:
            self._store_conflicts(grads, all_reduce=False)  # DDP already averaged the gradients
        return torch.stack(losses).sum()

    # ---- contrastive masks, conflicts, analyses ----------------------------------------------------

    def _measure_now(self) -> bool:
        return (self.contrastive and self.c.contrastive == "conflicted_random_reverse") or (
            self.step % self.c.analysis_every == 0)

    @torch.no_grad()
    def _store_conflicts(self, grads: list[list[torch.Tensor]], all_reduce: bool) -> None:
        """``grads[t][j]``: task ``t``'s gradient of masked weight ``j``. Writes the conflict masks
        (weights of ≥ 2 tasks whose gradients disagree in sign) and the conflict ratio."""
        conflicts = []
        for j, (mlp, i) in enumerate(self.layers):
            g = torch.stack([grads[t][j] for t in range(len(grads))])  # T x N x K
            if all_reduce and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(g)  # the global batch's gradients: the same conflicts on every rank
            masks = self._task_masks[j].to(g.device)  # T x N x K
            c = conflicting_weights(g, masks)  # N x K
            getattr(self.state, f"conflict_{j}").copy_(pack_masks(c.unsqueeze(0)))
            conflicts.append(c)
        self._last_conflict = conflict_ratio(conflicts, [m for m in self._task_masks])

    @torch.no_grad()
    def _draw_contrastive_masks(self, step: int) -> None:
        """``M'_t`` for every task and layer from ``M_t`` by the configured strategy (§3.3.5)."""
        for j, (mlp, i) in enumerate(self.layers):
            masks = self._task_masks[j]  # T x N x K
            gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 1_009 + j)  # same on every rank
            if self.c.contrastive == "shared_random_reverse":
                shared = shared_weights(masks)
                out = [shared_random_reverse(masks[t], shared, self.c.reverse_ratio, gen) for t in range(self.T)]
            elif self.c.contrastive == "conflicted_random_reverse":
                conflict = unpack_masks(getattr(self.state, f"conflict_{j}"), masks.shape[-1])[0]
                out = [conflicted_random_reverse(masks[t], conflict, self.c.reverse_ratio, gen) for t in range(self.T)]
            else:
                out = [random_reverse(masks[t], self.c.reverse_ratio, gen) for t in range(self.T)]
            contrastive = torch.stack(out)  # T x N x K
            mlp.set_masks(i, contrastive, subnets=list(range(self.T, 2 * self.T)))
            if not self.alternating:  # fused: task t's gradient only through M_t
                mlp.set_no_grad_masks(i, subnets=list(range(self.T, 2 * self.T)), masks=contrastive & ~masks)

    def _record_analysis(self, step: int) -> None:
        self.log["analysis"].append({
            "step": step,
            "sharing_ratio": sharing_ratio(self._task_masks),
            "conflict_ratio": self._last_conflict,
        })

    def _record_masks(self) -> None:
        """The installed masks' sparsity, parameter counts and first-layer field occupation."""
        masks = [mlp.get_masks(i)[: self.T] for mlp, i in self.layers]
        first_mlp, first = self.layers[0]
        self.log["masks"] = {
            "sparsity": {t: sparsity([m[k] for m in masks]) for k, t in enumerate(self.tasks)},
            "sharing_ratio": sharing_ratio(masks),
            "params": subnet_param_counts(masks, self.tasks),
            "params_dense": sum(w.numel() + w.shape[0] for w in self.weights),
            "field_occupation": field_occupation(masks[0], self.model.input_field_columns(), self.tasks),
        }


    # ---- outputs ----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Removes the warm-up snapshot once training is over (rank 0; nothing rewinds after)."""
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)

    def summary(self) -> dict:
        """``metrics.json``'s ``masked_sharing``: the schedule, pruning rounds, installed masks and
        the ratios over training (the procedure's whole log)."""
        mode = "parallel" if not self.contrastive_capable else self.c.mode
        return {"schedule": {"warmup_steps": self.c.warmup_steps, "prune_rounds": self.schedule.rounds,
                             "prune_round_steps": self.c.prune_round_steps,
                             "multitask_start": self.schedule.multitask_start, "mode": mode,
                             "contrastive": self.c.contrastive if self.contrastive else None},
                **self.log}

    def write_outputs(self, out_dir: Path) -> None:
        """``OUT/mask_analysis.json`` and ``.png`` (CSRec Fig. 5 and 6); rank 0."""
        import json

        summary = self.summary()
        (Path(out_dir) / "mask_analysis.json").write_text(json.dumps(summary, indent=1))
        plot_logs(Path(out_dir) / "mask_analysis.png", {self.cfg.model.name: summary}, title=self.cfg.model.name)


def plot_logs(path: Path, logs: dict[str, dict], title: str) -> Path:
    """PNG of procedure logs (:meth:`MaskedSharingProcedure.summary`, by label): sharing and
    conflict ratios over training (CSRec Fig. 5; conflict only where every point was measured)
    and the installed masks' first-layer field occupation (Fig. 6)."""
    from recsys_mtl.modules.masking import plot_masks_analysis

    curves = {}
    for label, log in logs.items():
        rows = log.get("analysis", [])
        curves[label] = {"step": [r["step"] for r in rows], "sharing_ratio": [r["sharing_ratio"] for r in rows]}
        if rows and all(r["conflict_ratio"] is not None for r in rows):
            curves[label]["conflict_ratio"] = [r["conflict_ratio"] for r in rows]
    occupation = {label: log["masks"]["field_occupation"] for label, log in logs.items() if "masks" in log}
    return plot_masks_analysis(path, curves, occupation or None, title=title)


class Unsharded(nn.Module):
    """Lets the procedure drive an unsharded train module in one process (benchmarks, tests, a
    notebook): it stands where ``DistributedModelParallel`` stands, with the module at ``.module``.

    Args:
        module (nn.Module): the ``MTLTrainModule`` (with its :class:`MaskState`).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module(batch)


class MaskedSharingPipeline:
    """The loop's pipeline for masked-sharing models: one batch per ``progress`` call, moved to the
    device and handed to the procedure (no TorchRec pipelining: a step may be several forward and
    backward passes on the same batch).

    Args:
        procedure (MaskedSharingProcedure): what a step does.
        device (torch.device): where the model is.
    """

    def __init__(self, procedure: MaskedSharingProcedure, device: torch.device) -> None:
        self.procedure = procedure
        self.device = device

    def progress(self, batches):
        batch = next(batches).to(self.device, non_blocking=True)
        return self.procedure.run_step(batch), None
