"""A compiled dense head: everything after the embedding lookup as one ``torch.compile`` graph.

What compiles (issue 11, item 1): the train module's training forward — feature assembly, the
levels / experts / gates, towers and the loss — with the table lookups left out. Every lookup
goes through :func:`recsys_mtl.modules.embeddings.embedding_lookup`, which under
``torch.compile`` runs the (sharded, pipelined) ``EmbeddingBagCollection`` eagerly behind
``torch.compiler.disable``; TorchRec's sharded modules, their pipelined forwards and fbgemm's
kernels (which have no fake-tensor kernels) are never traced. The lookup sits inside the model's
forward, so the graph break there is nested a few frames deep; dynamo's ``nested_graph_breaks``
resumes tracing inside those frames, so the code after the lookup — up to the loss in the train
module — is one graph instead of one per frame (the per-frame split is what made per-module
compilation slower than eager in the issue's measurements).

How it fits the trainer:

* Only the function is compiled (:attr:`MTLTrainModule.compiled_step`), not the module: the
  state dict, checkpoints and the module tree are those of the eager model (no ``_orig_mod.``).
* ``TrainPipelineSparseDist`` traces the train module with ``torch.fx`` to find the sharded
  modules' inputs; while it traces, the train module takes its eager path, and the pipelined
  forwards it installs are called (eagerly) from the lookup.
* DistributedModelParallel wraps the dense part in DDP; the compiled function runs inside DDP's
  forward (dynamo never traces DDP itself, so ``optimize_ddp`` does not apply), and DDP's
  gradient hooks fire as the compiled backward accumulates the dense gradients.
* Evaluation, the fx trace and any step of a training procedure (an ``objective`` or
  ``grad_step`` hook) run eagerly; so do the models and runs listed by :func:`eager_reason`
  (the trainer says so when it starts).

The ReLUs of the dense modules use :func:`recsys_mtl.modules.activations.relu`, whose backward
reads the saved output, not a saved boolean mask.

Measured 2026-12-02 on W1 (PLE, batch 2048; 2-core AMD EPYC with AVX-512, torch 2.13 CPU, a
machine shared with other jobs), in one process, the pipelined one-rank step of each variant
interleaved step by step for 60 rounds, twice (medians, ms; ratios over the first column):

    eager, layout before    eager, layout now    compiled, layout now    plain-PyTorch peer
    185.9 / 196.9           176.7 / 183.5        153.2 / 168.8           193.4 / 209.8
    1.00                    1.05 / 1.07          1.21 / 1.17             0.96 / 0.94

(layout now: the input padded to 432 columns, grouped experts without the transposing copy). The
compiled head is 1.26x / 1.24x the plain peer there; on the GEMM-bound step (~125 ms of GEMMs at
~130 GFLOP/s), that is short of the issue's 1.5x. Before the DDP split was turned off the
compiled head gained 1.04-1.10x over eager, with the masks of :mod:`~recsys_mtl.modules.activations`
in its kernels; with one graph, 1.14x in the same setup. A W2-shaped STEM-Net step (batch 4096,
vocabularies x 0.05) ran 1.08x compiled. A cold compile of W1's head takes about 40 s here, a
compile served from inductor's on-disk cache under 15 s.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from recsys_mtl.config import MASKED_SHARING_MODELS, PAIR_MODELS, TrainConfig

__all__ = ["CompiledStep", "compile_head", "eager_reason"]

RECOMPILE_LIMIT = 64  # compiled architectures (and input shapes) per process


def eager_reason(cfg: TrainConfig) -> str | None:
    """Why a ``--compile-head`` run trains eagerly anyway (None: its dense head compiles).

    * the pair models (``mf``, ``lightgcn``, ``ngcf``): their step is the embedding lookup and a
      dot product; there is no dense head after the lookup to compile;
    * the masked-sharing models (``sparse_sharing``, ``csrec``, ``ml_csrec``): their procedure
      changes the step's objective and masks phase by phase;
    * a ``--grad-combiner`` other than ``ew``: its step takes per-task gradients with
      ``autograd.grad`` around the forward.
    """
    name = cfg.model.name
    if name in PAIR_MODELS:
        return f"{name} has no dense head after its embedding lookup to compile"
    if name in MASKED_SHARING_MODELS:
        return f"{name} is trained by the masked-sharing procedure, whose per-phase steps run eagerly"
    if cfg.grad.combiner != "ew":
        return f"--grad-combiner {cfg.grad.combiner} takes per-task gradients around an eager forward"
    return None


class CompiledStep:
    """``train_module.train_step`` compiled with inductor, called with nested graph breaks on.

    Not an ``nn.Module`` (it holds no state of its own): the train module keeps it as a plain
    attribute, so its state dict is unchanged.

    Args:
        fn (Callable): the bound ``MTLTrainModule.train_step``.
        backend (str | Callable): ``torch.compile`` backend (``inductor``; tests may count graphs
            with their own).
        dynamic (bool): compile for dynamic shapes. False (the default): the trainer pads every
            batch to the batch size, so the step has one shape and gets static-shape kernels.
    """

    def __init__(self, fn: Callable, backend: str | Callable = "inductor", dynamic: bool = False) -> None:
        self.fn = torch.compile(fn, backend=backend, dynamic=dynamic)

    def __call__(self, *args: Any) -> Any:
        # optimize_ddp=False: this runs inside DDP's forward, where dynamo would otherwise split
        # the head into one graph per gradient bucket (DDPOptimizer) to overlap the all-reduce
        # with the backward; the split cuts fusions (a ReLU at a split saves a bool mask for its
        # backward) and there is little to overlap on CPU. specialize_float: Python floats the
        # head reads are graph constants, not symbolic inputs. recompile_limit: every model
        # architecture compiled in one process adds an entry to train_step's cache (instances
        # of one architecture share theirs); past dynamo's default of 8 it would run eagerly.
        with torch._dynamo.config.patch(nested_graph_breaks=True, optimize_ddp=False, specialize_float=True,
                                        recompile_limit=RECOMPILE_LIMIT):
            return self.fn(*args)


def compile_head(train_module: nn.Module, backend: str | Callable = "inductor", dynamic: bool = False) -> nn.Module:
    """Makes ``train_module`` (an :class:`~recsys_mtl.train.task.MTLTrainModule`, alone or the
    ``.module`` of a DistributedModelParallel) run its training steps compiled; returns it.

    Compilation happens at the first training step (a cold compile takes tens of seconds on a
    small CPU) and again only if the input shapes change.

    Example::

        >>> from recsys_mtl.config import ModelConfig
        >>> from recsys_mtl.models import build_model
        >>> from recsys_mtl.testing import tiny_schema
        >>> from recsys_mtl.train.losses import MultiTaskLoss
        >>> from recsys_mtl.train.task import MTLTrainModule
        >>> s = tiny_schema()
        >>> tm = compile_head(MTLTrainModule(build_model(s, ModelConfig(name="mmoe", embedding_dim=4)),
        ...                                  MultiTaskLoss(s.tasks)))
        >>> isinstance(tm.compiled_step, CompiledStep), "compiled_step" in dict(tm.named_children())
        (True, False)
    """
    train_module.compiled_step = CompiledStep(train_module.train_step, backend=backend, dynamic=dynamic)
    return train_module
