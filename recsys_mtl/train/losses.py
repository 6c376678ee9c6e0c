"""Multi-task losses: PLE's joint loss (§4.3) with per-task sample spaces and dynamic weights."""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys_mtl.data.schema import TaskSpec

WeightUnit = Literal["epoch", "step"]


class MultiTaskLoss(nn.Module):
    """PLE's joint loss: ``L = sum_k w_k(t) * L_k`` (PLE §4.3).

    Sample spaces (Eq. 9): ``L_k = sum_i δ_k^i loss_k(ŷ_k^i, y_k^i) / sum_i δ_k^i`` where
    ``δ_k^i = label_mask[i, k]`` (False where task ``k``'s label is null), so samples outside a
    task's space contribute nothing and each task is normalised by its own sample count.
    Binary tasks use BCE on logits, regression tasks squared error; both kinds mix freely.

    Dynamic weights (Eq. 10): ``w_k(t) = w_k0 * γ_k ** t``. The paper calls ``t`` the training
    epoch while describing an update "after each step"; ``weight_unit`` selects which counter
    ``t`` is (default ``"epoch"``, as in the equation). The trainer calls :meth:`step_done` after
    every optimizer step and :meth:`epoch_done` after every epoch; ``t`` is a persistent buffer, so
    it is part of the state dict and of checkpoints. ``γ_k = 1`` (the default) gives static weights.

    Args:
        tasks (Sequence[TaskSpec]): tasks in label-column order.
        weights (Mapping[str, float] | None): initial weights ``w_k0`` (default 1).
        decay (Mapping[str, float] | None): updating ratios ``γ_k`` (default 1).
        weight_unit (str): ``"epoch"`` or ``"step"``: what ``t`` counts.

    Example::

        >>> from recsys_mtl.data.schema import TaskSpec
        >>> loss = MultiTaskLoss([TaskSpec("a"), TaskSpec("b", "regression")], decay={"b": 0.5})
        >>> labels, mask = torch.tensor([[1., 3.], [0., 1.]]), torch.ones(2, 2, dtype=torch.bool)
        >>> total, per_task = loss({"a": torch.zeros(2), "b": torch.ones(2)}, labels, mask)
        >>> round(float(per_task[0]), 4), float(per_task[1]), round(float(total), 4)
        (0.6931, 2.0, 2.6931)
        >>> loss.epoch_done()
        >>> loss.current_weights().tolist()
        [1.0, 0.5]
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        weights: Mapping[str, float] | None = None,
        decay: Mapping[str, float] | None = None,
        weight_unit: WeightUnit = "epoch",
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        names = {t.name for t in self.tasks}
        for what, given in (("weights", weights), ("decay", decay)):
            unknown = set(given or {}) - names
            if unknown:
                raise ValueError(f"loss {what} name unknown tasks {sorted(unknown)}; tasks: {sorted(names)}")
        if weight_unit not in ("epoch", "step"):
            raise ValueError(f"weight_unit must be 'epoch' or 'step', got {weight_unit!r}")
        self.weight_unit = weight_unit
        self.register_buffer("initial_weights", torch.tensor([float((weights or {}).get(t.name, 1.0)) for t in self.tasks]))
        self.register_buffer("decay", torch.tensor([float((decay or {}).get(t.name, 1.0)) for t in self.tasks]))
        self.register_buffer("t", torch.zeros((), dtype=torch.float64))
        self._binary = [t.kind == "binary" for t in self.tasks]

    def current_weights(self) -> torch.Tensor:
        """``w_k(t)`` for every task (``T``)."""
        return self.initial_weights * self.decay.double().pow(self.t).to(self.initial_weights.dtype)  # T

    @torch.no_grad()
    def step_done(self) -> None:
        if self.weight_unit == "step":
            self.t += 1

    @torch.no_grad()
    def epoch_done(self) -> None:
        if self.weight_unit == "epoch":
            self.t += 1

    def task_loss(self, k: int, z: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """Task ``k``'s unweighted loss ``L_k`` of logits ``z`` (``B``) over its sample space (Eq. 9)."""
        y = labels[:, k]  # B
        m = label_mask[:, k].to(z.dtype)  # B: δ_k
        if self._binary[k]:
            el = F.binary_cross_entropy_with_logits(z, y, reduction="none")  # B
        else:
            el = (z - y) ** 2  # B
        return (el * m).sum() / m.sum().clamp_min(1.0)

    def forward(
        self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor, label_mask: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the weighted total (scalar) and the per-task losses ``L_k`` (``T``).

        ``weights``: :meth:`current_weights`, when the caller has them already (a compiled train
        step takes them as an input, so the 0-dim float64 step counter is not read in its graph).
        """
        per_task = [self.task_loss(k, logits[task.name], labels, label_mask) for k, task in enumerate(self.tasks)]
        per_task_t = torch.stack(per_task)  # T
        weights = self.current_weights() if weights is None else weights  # T
        total = (weights.to(per_task_t.dtype) * per_task_t).sum()
        return total, per_task_t
