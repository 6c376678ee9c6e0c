"""Multi-task losses with per-task sample spaces."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys_mtl.data.schema import TaskSpec


class MultiTaskLoss(nn.Module):
    """``L = sum_k w_k * L_k`` with ``L_k`` averaged over task ``k``'s sample space.

    Samples whose label is null for task ``k`` (``label_mask[:, k] == False``) contribute nothing
    to ``L_k``, and ``L_k`` is normalised by the number of samples in task ``k``'s space (PLE
    §4.3, Eq. 9, with static weights). Binary tasks use BCE on logits, regression tasks MSE.

    Args:
        tasks (Sequence[TaskSpec]): tasks in label-column order.
        weights (Mapping[str, float] | None): static task weights (default 1).

    Example::

        >>> from recsys_mtl.data.schema import TaskSpec
        >>> loss = MultiTaskLoss([TaskSpec("a"), TaskSpec("b", "regression")])
        >>> total, per_task = loss({"a": torch.zeros(2), "b": torch.ones(2)},
        ...                        torch.tensor([[1., 3.], [0., 1.]]), torch.ones(2, 2, dtype=torch.bool))
        >>> round(float(per_task[0]), 4), float(per_task[1])
        (0.6931, 2.0)
    """

    def __init__(self, tasks: Sequence[TaskSpec], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.weights = [float((weights or {}).get(t.name, 1.0)) for t in self.tasks]
        self._binary = [t.kind == "binary" for t in self.tasks]

    def forward(
        self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor, label_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the weighted total (scalar) and the per-task losses (``T``)."""
        per_task = []
        for k, task in enumerate(self.tasks):
            z, y = logits[task.name], labels[:, k]  # B, B
            m = label_mask[:, k].to(z.dtype)  # B
            if self._binary[k]:
                el = F.binary_cross_entropy_with_logits(z, y, reduction="none")  # B
            else:
                el = (z - y) ** 2  # B
            per_task.append((el * m).sum() / m.sum().clamp_min(1.0))
        per_task_t = torch.stack(per_task)  # T
        total = sum(w * l for w, l in zip(self.weights, per_task))
        return total, per_task_t
