"""The train wrapper: model + loss, in the ``(loss, output)`` form TorchRec's pipelines expect."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchrec.fx.tracer import is_fx_tracing

from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.types import MTLBatch


class MTLTrainModule(nn.Module):
    """Wraps a multi-task model (``forward(dense, sparse) -> dict[task, logits]``) with its loss.

    Like TorchRec's ``DLRMTrain``: ``forward(batch)`` returns ``(loss, (loss, logits, labels,
    label_mask))`` where ``logits`` is ``B x T`` in task order, so ``TrainPipelineSparseDist``
    can run it and the trainer can feed metrics. Models may define ``training_targets`` (labels
    they are trained and evaluated on, e.g. ESMM's CTCVR) and ``auxiliary_loss`` (e.g. AITM's
    calibrator); both are used when present.

    Args:
        model (nn.Module): the multi-task model.
        loss (MultiTaskLoss): its loss.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.models import build_model
        >>> from recsys_mtl.config import ModelConfig
        >>> s = tiny_schema()
        >>> m = MTLTrainModule(build_model(s, ModelConfig(name="mmoe", embedding_dim=4)), MultiTaskLoss(s.tasks))
        >>> loss, (_, logits, labels, mask) = m(tiny_batch(s, 5))
        >>> logits.shape
        torch.Size([5, 2])
    """

    def __init__(self, model: nn.Module, loss: MultiTaskLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.task_names = [t.name for t in loss.tasks]
        # Optional model hooks, resolved once (static for torch.fx tracing):
        #   training_targets(labels, mask) -> (labels, mask): the labels the model is trained and
        #     evaluated against (ESMM's entire-space CTCVR labels);
        #   auxiliary_loss(logits) -> scalar added to the task losses (AITM's calibrator).
        self._targets_hook = hasattr(model, "training_targets")
        self._aux_hook = hasattr(model, "auxiliary_loss")
        # A training procedure may replace the loss for its steps (CSRec's contrastive loss):
        # objective(logits, labels, mask) -> scalar loss; forward then returns (loss, None).
        self.objective: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # A gradient combiner's step (--grad-combiner, recsys_mtl.train.row_grads.CombinedGradStep):
        # grad_step(self, batch, labels, mask) -> (surrogate loss, output); its backward applies the
        # combined task gradients.
        self.grad_step: Callable | None = None
        # A compiled training step (--compile-head, recsys_mtl.train.compiled.compile_head):
        # compiled_step(batch, labels, mask, loss_weights) is train_step compiled with the table
        # lookups left out. Used for training steps without an objective or grad_step hook; evaluation and
        # the pipeline's fx trace run eagerly.
        self.compiled_step: Callable | None = None

    def forward(
        self, batch: MTLBatch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        labels, mask = batch.labels, batch.label_mask
        if self._targets_hook:  # e.g. ESMM: entire-space funnel labels
            labels, mask = self.model.training_targets(labels, mask)
        # (Not while TorchRec's pipeline traces the forward to find the sharded modules' inputs.)
        if self.grad_step is not None and self.training and not _tracing(batch):
            return self.grad_step(self, batch, labels, mask)
        if (self.compiled_step is not None and self.training and self.objective is None
                and not _tracing(batch)):
            # The loss weights come in as an input: the schedule's 0-dim float64 step counter,
            # read inside the graph, would make dynamo restart its analysis (a slower compile).
            return self.compiled_step(batch, labels, mask, self.loss.current_weights())
        return self.train_step(batch, labels, mask)

    def train_step(
        self, batch: MTLBatch, labels: torch.Tensor, mask: torch.Tensor, loss_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """The forward after the hooks: logits, loss and the pipeline's output (what
        :attr:`compiled_step` compiles). ``labels``/``mask`` are the training targets;
        ``loss_weights`` the loss's current task weights (None: the loss computes them)."""
        logits = self.model(batch.dense, batch.sparse)
        if self.objective is not None and self.training:  # a procedure's step (evaluation: the usual output)
            return self.objective(logits, labels, mask), None
        total, _ = self.loss(logits, labels, mask, loss_weights)
        if self._aux_hook:  # e.g. AITM's calibrator
            total = total + self.model.auxiliary_loss(logits)
        stacked = torch.stack([logits[t] for t in self.task_names], dim=1)  # B x T
        return total, (total.detach(), stacked.detach(), labels, mask)


def _tracing(batch: object) -> bool:
    """True while torch.fx (or TorchRec's pipeline, to find the sharded modules' inputs) traces."""
    return is_fx_tracing() or isinstance(batch, torch.fx.Proxy) or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
