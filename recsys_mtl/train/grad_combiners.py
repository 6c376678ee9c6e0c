"""Task-gradient combiners: PMTRec's per-row pooling and the gradient baselines (``--grad-combiner``).

A combiner turns the per-task gradients of one step into the gradient the optimizers apply. It
sees two Jacobians (:mod:`recsys_mtl.train.row_grads` builds them):

* the **embedding rows** of the batch: ``T x U x D`` per embedding width (``U`` unique rows of
  every table, summed over each row's lookups, over the global batch by default);
* the **dense parameters** (everything outside the embedding tables): ``T x P``.

Combiners:

* ``pmtrec`` — PMTRec (Alg. 1): every row gets its own task weights
  ``w = softmax(n ⊙ focus / τ)`` from its per-task gradient norms ``n_t = ‖g_t(r)‖₂``, the main
  task's norm multiplied by ``α^s`` (task focusing, Eq. 4; ``s`` the 1-based epoch) and the
  temperature ``τ`` balancing magnitudes (Eq. 5); the row's gradient is ``Σ_t w_t g_t(r)``.
  Dense parameters (the paper's MF encoder has none) take the summed task gradient.
* ``graddrop``, ``pcgrad``, ``gradvac``, ``cagrad``, ``aligned_mtl``, ``nash_mtl``, ``rlw`` —
  ``torchjd``'s aggregators, applied once to all embedding rows of the batch (one combination
  for every row, as the PMTRec paper's baselines) and once to the dense parameters. RLW draws
  new weights every step (``torchjd.aggregation.Random``, the RLW paper's Algorithm 2).
* ``ew`` — the summed loss; the trainer runs its ordinary single backward for it and never builds
  a combiner (:func:`make_combiner` returns None).

Randomness (GradDrop's coins, GradVac's visiting order, RLW's weights) is drawn from a generator
seeded by ``(seed, step)``, so every rank draws the same numbers and a resumed run draws what the
uninterrupted run would have. Stateful aggregators (GradVac's EMA targets, Nash-MTL's previous
weights) keep their state in buffers of :class:`CombinerState`, which rides in the train module's
state dict and so in every checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch import nn

from recsys_mtl.config import GradConfig
from recsys_mtl.ops.row_grad_pool import row_grad_pool

__all__ = ["GradCombiner", "PMTRecCombiner", "AggregatorCombiner", "CombinerState", "make_combiner",
           "pmtrec_row_combination", "AGGREGATORS"]

STATE_MODULE = "grad_combiner_state"  # attribute of the train module holding CombinerState


def _aggregators(num_tasks: int, cfg: GradConfig) -> dict[str, Callable[[], nn.Module]]:
    import torchjd.aggregation as agg  # a well-kept implementation of every baseline's math

    return {
        "graddrop": lambda: agg.GradDrop(),
        "pcgrad": lambda: agg.PCGrad(),
        "gradvac": lambda: agg.GradVac(),
        "cagrad": lambda: agg.CAGrad(c=cfg.cagrad_c),
        "aligned_mtl": lambda: agg.AlignedMTL(),
        "nash_mtl": lambda: agg.NashMTL(n_tasks=num_tasks, max_norm=cfg.nash_max_norm),
        "rlw": lambda: agg.Random(),
    }


AGGREGATORS = ("graddrop", "pcgrad", "gradvac", "cagrad", "aligned_mtl", "nash_mtl", "rlw")


class CombinerState(nn.Module):
    """Checkpointed state of a combiner: the step counter (seeds the per-step randomness) and
    the epoch (PMTRec's ``s``), plus the stateful aggregators' state (one per part: rows, dense).

    Args:
        num_tasks (int): ``T``.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        t = num_tasks
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))
        for part in ("rows", "dense"):
            self.register_buffer(f"{part}_gradvac_phi", torch.zeros(t, t, dtype=torch.float64))
            self.register_buffer(f"{part}_nash_step", torch.zeros((), dtype=torch.float64))
            self.register_buffer(f"{part}_nash_alpha", torch.ones(t, dtype=torch.float64))
            self.register_buffer(f"{part}_nash_gtg", torch.eye(t, dtype=torch.float64))
            self.register_buffer(f"{part}_nash_norm", torch.ones(1, dtype=torch.float64))

    def reset_parameters(self) -> None:  # DMP initialises meta-device modules through this
        t = self.rows_gradvac_phi.shape[0]
        with torch.no_grad():
            self.step.zero_()
            self.epoch.zero_()
            for part in ("rows", "dense"):
                getattr(self, f"{part}_gradvac_phi").zero_()
                getattr(self, f"{part}_nash_step").zero_()
                getattr(self, f"{part}_nash_alpha").fill_(1.0)
                getattr(self, f"{part}_nash_gtg").copy_(torch.eye(t, dtype=torch.float64))
                getattr(self, f"{part}_nash_norm").fill_(1.0)


class GradCombiner:
    """Interface of a combiner (see the module docstring).

    ``per_row`` combiners (PMTRec) give every row its own weights through
    :meth:`row_weights_from_norms`; the others aggregate the whole row Jacobian with
    :meth:`combine_rows`. Both combine the dense Jacobian with :meth:`combine_dense`.
    """

    name: str = ""
    per_row: bool = False
    needs_dense_jacobian: bool = True  # False: dense parameters take the summed task gradient

    def __init__(self, num_tasks: int, seed: int, state: CombinerState) -> None:
        self.T, self.seed, self.state = num_tasks, seed, state

    @contextlib.contextmanager
    def step_rng(self, part: int):
        """The step's random stream: the same on every rank, restored by a resume."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + int(self.state.step) * 7 + part) % (1 << 62))
            yield

    def combine_rows(self, jacobian: torch.Tensor) -> torch.Tensor:
        """``T x n`` (every row's coordinates, all widths concatenated) → the combined ``n``."""
        raise NotImplementedError

    def combine_dense(self, jacobian: torch.Tensor) -> torch.Tensor:
        """``T x P`` → the combined ``P``."""
        raise NotImplementedError

    def step_done(self) -> None:
        with torch.no_grad():
            self.state.step += 1


def pmtrec_focus(num_tasks: int, main: int, alpha: float, epoch: int, device=None) -> torch.Tensor:
    """PMTRec Eq. 4: the norm multipliers, ``α^s`` on the main task (``s = epoch + 1``, Alg. 1's
    1-based epoch) and 1 on the others (``T``).

    Example::

        >>> pmtrec_focus(3, 0, 2.0, 1).tolist()
        [4.0, 1.0, 1.0]
    """
    focus = torch.ones(num_tasks, dtype=torch.float32, device=device)
    focus[main] = float(alpha) ** (epoch + 1)
    return focus


def pmtrec_row_combination(row_grads: torch.Tensor, focus: torch.Tensor, tau: float) -> torch.Tensor:
    """PMTRec Alg. 1, lines 9–12, on whole rows (reference form): ``T x U x D`` per-task row
    gradients → ``U x D`` combined row gradients.

    Example::

        >>> g = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])  # T=2, U=1, D=2: norms 5 and 1
        >>> pmtrec_row_combination(g, torch.ones(2), tau=1e6)  # τ → ∞: equal weights
        tensor([[1.5000, 2.5000]])
    """
    norms = row_grads.norm(dim=-1) * focus[:, None]  # T x U
    w = torch.softmax(norms / tau, dim=0)  # T x U
    return (w[..., None] * row_grads).sum(0)  # U x D


class PMTRecCombiner(GradCombiner):
    """PMTRec's per-row gradient pooling (Alg. 1, Eq. 3–6). See the module docstring.

    Args:
        num_tasks (int): ``T``.
        main (int): index of the main task.
        alpha (float): task-focusing base ``α``.
        tau (float): temperature ``τ``.
        seed (int), state (CombinerState): see :class:`GradCombiner`.
    """

    name = "pmtrec"
    per_row = True
    needs_dense_jacobian = False

    def __init__(self, num_tasks: int, main: int, alpha: float, tau: float, seed: int, state: CombinerState) -> None:
        super().__init__(num_tasks, seed, state)
        self.main, self.alpha, self.tau = main, float(alpha), float(tau)

    def focus(self, device=None) -> torch.Tensor:
        return pmtrec_focus(self.T, self.main, self.alpha, int(self.state.epoch), device)

    def pool(self, grads: torch.Tensor, rows: torch.Tensor, num_rows: int,
             norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused op on one width's positions: ``T x N x D`` → (``N x D`` per-position
        gradients to hand back, ``U x T`` row weights); ``norms`` (``U x T``) from the global batch."""
        return row_grad_pool(grads, rows, num_rows, self.focus(grads.device), self.tau, norms=norms)


class AggregatorCombiner(GradCombiner):
    """A ``torchjd`` aggregator applied to the row Jacobian and (a second instance) to the dense one.

    Args:
        name (str): one of :data:`AGGREGATORS`.
        num_tasks (int), seed (int), state (CombinerState): see :class:`GradCombiner`.
        cfg (GradConfig): the aggregators' settings.
    """

    def __init__(self, name: str, num_tasks: int, seed: int, state: CombinerState, cfg: GradConfig) -> None:
        super().__init__(num_tasks, seed, state)
        if name not in AGGREGATORS:
            raise ValueError(f"unknown gradient aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
        self.name = name
        make = _aggregators(num_tasks, cfg)[name]
        self.rows_agg, self.dense_agg = make(), make()
        self._loaded = {"rows": False, "dense": False}

    def _aggregate(self, agg: nn.Module, part: str, jacobian: torch.Tensor) -> torch.Tensor:
        if jacobian.shape[1] == 0:
            return jacobian.new_zeros(0)
        if not self._loaded[part]:
            self._load(agg, part)
            self._loaded[part] = True
        with self.step_rng(0 if part == "rows" else 1):
            out = agg(jacobian)  # n
        self._store(agg, part)
        return out

    def combine_rows(self, jacobian: torch.Tensor) -> torch.Tensor:
        return self._aggregate(self.rows_agg, "rows", jacobian)

    def combine_dense(self, jacobian: torch.Tensor) -> torch.Tensor:
        return self._aggregate(self.dense_agg, "dense", jacobian)

    # Stateful aggregators keep their state in Python attributes of torchjd's weightings (torchjd
    # 0.18, pinned): copied to CombinerState buffers after every call and back once after a resume.
    def _load(self, agg: nn.Module, part: str) -> None:
        s = self.state
        if self.name == "gradvac" and bool(getattr(s, f"{part}_gradvac_phi").abs().sum() > 0):
            w = agg.weighting.weighting if hasattr(agg.weighting, "weighting") else agg.weighting
            w._ensure_state(self.T, torch.float32)
            w._phi_t = getattr(s, f"{part}_gradvac_phi").float().cpu().clone()
        if self.name == "nash_mtl" and float(getattr(s, f"{part}_nash_step")) > 0:
            w = agg.weighting
            w.step = float(getattr(s, f"{part}_nash_step"))
            w.prvs_alpha = getattr(s, f"{part}_nash_alpha").cpu().numpy().astype(np.float32)
            w.init_gtg = getattr(s, f"{part}_nash_gtg").cpu().numpy()
            w.normalization_factor = getattr(s, f"{part}_nash_norm").cpu().numpy()
            w._init_optim_problem()  # torchjd builds the problem only at its first step

    def _store(self, agg: nn.Module, part: str) -> None:
        s = self.state
        with torch.no_grad():
            if self.name == "gradvac":
                w = agg.weighting.weighting if hasattr(agg.weighting, "weighting") else agg.weighting
                if w._phi_t is not None:
                    getattr(s, f"{part}_gradvac_phi").copy_(w._phi_t.double())
            if self.name == "nash_mtl":
                w = agg.weighting
                getattr(s, f"{part}_nash_step").fill_(float(w.step))
                getattr(s, f"{part}_nash_alpha").copy_(torch.as_tensor(np.asarray(w.prvs_alpha), dtype=torch.float64))
                getattr(s, f"{part}_nash_gtg").copy_(torch.as_tensor(np.asarray(w.init_gtg), dtype=torch.float64))
                getattr(s, f"{part}_nash_norm").copy_(
                    torch.as_tensor(np.asarray(w.normalization_factor, dtype=np.float64).reshape(1)))


def main_task_index(cfg: GradConfig, task_names: list[str]) -> int:
    """Index of ``cfg.main_task`` (the first task when None); ValueError naming the flag otherwise."""
    if cfg.main_task is None:
        return 0
    if cfg.main_task not in task_names:
        raise ValueError(f"grad.main_task (--pmtrec-main-task) {cfg.main_task!r} is not a task of the dataset; "
                         f"tasks: {', '.join(task_names)}")
    return task_names.index(cfg.main_task)


def make_combiner(cfg: GradConfig, task_names: list[str], seed: int, state: CombinerState) -> GradCombiner | None:
    """The combiner for ``cfg.combiner`` (None for ``ew``: the ordinary summed-loss step)."""
    t = len(task_names)
    if cfg.combiner == "ew":
        return None
    if cfg.combiner == "pmtrec":
        return PMTRecCombiner(t, main_task_index(cfg, task_names), cfg.alpha, cfg.tau, seed, state)
    return AggregatorCombiner(cfg.combiner, t, seed, state, cfg)
