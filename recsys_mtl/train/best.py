"""Keeping the best model by a validation metric, and early stopping (``--keep-best``,
``--early-stop-patience``).

The decision is made where the evaluation metrics are (rank 0: TorchRec's metric module
computes them there) and broadcast on the CPU control group, so every rank saves the best model
(a collective DCP save) and stops at the same step. The state is a pure function of the
evaluation history, which checkpoints carry, so a resumed run continues with the same best
value and patience count.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from recsys_mtl.config import BEST_METRICS

BEST_MODEL_DIR = "best_model"


def metric_value(spec: str, tasks: dict[str, dict[str, float]]) -> float:
    """The value of ``spec`` (``TASK/METRIC`` or ``METRIC``: the mean over the tasks that report
    it) in one evaluation's ``{task: {metric: value}}``; NaN when it is missing or not finite.

    Example::

        >>> metric_value("click/auc", {"click": {"auc": 0.7}, "like": {"auc": 0.6}})
        0.7
        >>> round(metric_value("auc", {"click": {"auc": 0.7}, "like": {"auc": 0.6}}), 6)
        0.65
    """
    task, _, metric = spec.rpartition("/")
    values = [m.get(metric) for t, m in tasks.items() if not task or t == task]
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else math.nan


def check_spec(spec: str, task_names: Sequence[str]) -> None:
    """Raises ``ValueError`` if ``spec`` names a task the dataset does not have."""
    task, _, metric = spec.rpartition("/")
    if metric not in BEST_METRICS:
        raise ValueError(f"keep_best (--keep-best) metric must be one of {', '.join(BEST_METRICS)}, got {metric!r}")
    if task and task not in task_names:
        raise ValueError(f"keep_best (--keep-best) names task {task!r}; the dataset's tasks are "
                         f"{', '.join(task_names)}")


class BestTracker:
    """Best value of ``spec`` so far and evaluations since it improved.

    Args:
        spec (str): ``TASK/METRIC`` or ``METRIC`` (see :func:`metric_value`).
        patience (int | None): evaluations without improvement that stop the run (None: never).

    Example::

        >>> b = BestTracker("auc", patience=2)
        >>> [b.observe(s, {"t": {"auc": a}}) for s, a in ((10, 0.6), (20, 0.7), (30, 0.65), (40, 0.69))]
        [True, True, False, False]
        >>> b.best_step, b.best_value, b.should_stop
        (20, 0.7, True)
    """

    def __init__(self, spec: str, patience: int | None = None) -> None:
        self.spec = spec
        self.patience = patience
        self.larger_is_better = BEST_METRICS[spec.rpartition("/")[2]]
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0

    def observe(self, step: int, tasks: dict[str, dict[str, float]]) -> bool:
        """Records one evaluation; True when it is the best so far (a NaN never is)."""
        value = metric_value(self.spec, tasks)
        better = not math.isnan(value) and (
            self.best_value is None
            or (value > self.best_value if self.larger_is_better else value < self.best_value)
        )
        if better:
            self.best_value, self.best_step, self.evals_since_best = value, step, 0
        else:
            self.evals_since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def replay(self, history: list[dict]) -> None:
        """Re-observes a resumed run's evaluation history."""
        for entry in history:
            self.observe(entry["step"], entry["tasks"])

    def decide(self, step: int, tasks: dict, is_main: bool, group: dist.ProcessGroup | None) -> tuple[bool, bool]:
        """Observes on rank 0 and broadcasts ``(improved, stop)`` to every rank (a collective).
        Other ranks' trackers follow rank 0's decision, so they agree on the state too."""
        flags = torch.zeros(2, dtype=torch.int32)
        if is_main:
            flags[0] = int(self.observe(step, tasks))
            flags[1] = int(self.should_stop)
        if group is not None:
            dist.broadcast(flags, src=0, group=group)
        improved, stop = bool(flags[0]), bool(flags[1])
        if not is_main:  # mirror rank 0's state (the metrics themselves live on rank 0)
            if improved:
                self.best_step, self.evals_since_best = step, 0
            else:
                self.evals_since_best += 1
        return improved, stop

    def summary(self) -> dict:
        return {"metric": self.spec, "step": self.best_step, "value": self.best_value,
                "larger_is_better": self.larger_is_better, "patience": self.patience}
