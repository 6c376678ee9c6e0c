"""Optimizers: the fused (in-backward) sparse optimizer of the sharded tables, combined with a
dense optimizer over every other parameter, through TorchRec's keyed optimizers."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.warmup import WarmupOptimizer, WarmupPolicy, WarmupStage

from recsys_mtl.config import DENSE_OPTIMIZERS as DENSE_OPTIMIZER_NAMES
from recsys_mtl.config import OptimConfig

DENSE_OPTIMIZERS = {
    # fused=True: one multi-tensor kernel instead of a Python loop over parameters (CPU and CUDA).
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr, fused=True),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
}
if tuple(DENSE_OPTIMIZERS) != DENSE_OPTIMIZER_NAMES:  # config's list is the one the CLI offers
    raise ImportError(f"DENSE_OPTIMIZERS {tuple(DENSE_OPTIMIZERS)} differs from config {DENSE_OPTIMIZER_NAMES}")


def lr_stages(optim: OptimConfig, total_steps: int | None) -> list[WarmupStage]:
    """The learning-rate schedule as TorchRec warm-up stages (empty: constant learning rates).

    Linear warm-up from ``lr / N`` to ``lr`` over ``N = optim.lr_warmup_steps`` optimizer steps,
    then ``constant``, or ``linear`` decay to ``lr * optim.lr_min_ratio`` at ``total_steps``.

    Example::

        >>> from recsys_mtl.config import OptimConfig
        >>> [(s.policy.value, s.max_iters) for s in lr_stages(OptimConfig(lr_warmup_steps=10,
        ...                                                    lr_schedule="linear"), 100)]
        [('linear', 10), ('interpolate', 100), ('constant', 4611686018427387904)]
    """
    stages: list[WarmupStage] = []
    warmup = optim.lr_warmup_steps
    if warmup > 0:
        stages.append(WarmupStage(policy=WarmupPolicy.LINEAR, max_iters=warmup, value=1.0 / warmup))
    if optim.lr_schedule == "linear":
        if total_steps is None or total_steps <= warmup:
            raise ValueError(f"optim.lr_schedule (--lr-schedule) 'linear' needs more training steps ({total_steps}) "
                             f"than warm-up steps ({warmup})")
        stages.append(WarmupStage(policy=WarmupPolicy.INTERPOLATE, max_iters=total_steps, value=1.0,
                                  start_interpolating_iters=warmup, end_value=optim.lr_min_ratio))
        # Past the end (TorchRec's schedule would return to the full rate there): stay at the minimum.
        stages.append(WarmupStage(policy=WarmupPolicy.CONSTANT, max_iters=1 << 62, value=optim.lr_min_ratio))
    return stages


def _scheduled(opt: KeyedOptimizer, stages: list[WarmupStage], lr: float) -> KeyedOptimizer:
    """``opt`` under TorchRec's ``WarmupOptimizer``: its iteration counter is optimizer state, so
    the schedule position is checkpointed and restored with the rest of the optimizer."""
    if not stages:
        return opt
    wrapped = WarmupOptimizer(opt, [dataclasses.replace(s) for s in stages], lr=lr)
    # State from the start (not only after the first step), so a checkpoint template has the key.
    wrapped.state[wrapped._warmup_param] = {"warmup": torch.tensor([0, 0], dtype=torch.long)}
    return wrapped


def make_optimizer(model: nn.Module, optim: OptimConfig, total_steps: int | None = None) -> KeyedOptimizer:
    """``CombinedOptimizer([fused sparse, dense])`` for a ``DistributedModelParallel`` model.

    ``step()`` on the fused part is a no-op (fbgemm updates rows in backward); the dense part
    covers dense modules and data-parallel tables, optionally with global-norm clipping. Both
    follow the learning-rate schedule of :func:`lr_stages` (``total_steps``: the run's optimizer
    steps, needed by a decaying schedule). The fused tables take the new rate at ``step()``, so
    their backward uses the rate of the step before (a one-step lag).
    """
    if optim.dense_optimizer not in DENSE_OPTIMIZERS:
        raise ValueError(f"unknown dense optimizer {optim.dense_optimizer!r}; choose from {', '.join(DENSE_OPTIMIZERS)}")
    make = DENSE_OPTIMIZERS[optim.dense_optimizer]
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters(), include=False))
    stages = lr_stages(optim, total_steps)
    fused = getattr(model, "fused_optimizer", None)
    if not dense_params and fused is not None:  # nothing but fused tables (matrix factorisation)
        return CombinedOptimizer([("sparse", _scheduled(fused, stages, optim.sparse_lr))])
    dense: KeyedOptimizer = KeyedOptimizerWrapper(dense_params, lambda ps: make(ps, optim.dense_lr))
    if optim.grad_clip_norm is not None:
        dense = GradientClippingOptimizer(dense, clipping=GradientClipping.NORM, max_gradient=optim.grad_clip_norm)
    dense = _scheduled(dense, stages, optim.dense_lr)
    if fused is None:  # every table data-parallel: the dense optimizer's keys, unprefixed
        return CombinedOptimizer([dense])
    return CombinedOptimizer([("sparse", _scheduled(fused, stages, optim.sparse_lr)), ("dense", dense)])
