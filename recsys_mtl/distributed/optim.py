"""Optimizers: the fused (in-backward) sparse optimizer of the sharded tables, combined with a
dense optimizer over every other parameter, through TorchRec's keyed optimizers."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

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


def make_optimizer(model: nn.Module, optim: OptimConfig) -> KeyedOptimizer:
    """``CombinedOptimizer([fused sparse, dense])`` for a ``DistributedModelParallel`` model.

    ``step()`` on the fused part is a no-op (fbgemm updates rows in backward); the dense part
    covers dense modules and data-parallel tables, optionally with global-norm clipping.
    """
    if optim.dense_optimizer not in DENSE_OPTIMIZERS:
        raise ValueError(f"unknown dense optimizer {optim.dense_optimizer!r}; choose from {', '.join(DENSE_OPTIMIZERS)}")
    make = DENSE_OPTIMIZERS[optim.dense_optimizer]
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters(), include=False))
    dense: KeyedOptimizer = KeyedOptimizerWrapper(dense_params, lambda ps: make(ps, optim.dense_lr))
    if optim.grad_clip_norm is not None:
        dense = GradientClippingOptimizer(dense, clipping=GradientClipping.NORM, max_gradient=optim.grad_clip_norm)
    parts: list = [dense]
    fused = getattr(model, "fused_optimizer", None)
    if fused is not None:
        parts.insert(0, ("sparse", fused))
        parts[1] = ("dense", dense)
    return CombinedOptimizer(parts)
