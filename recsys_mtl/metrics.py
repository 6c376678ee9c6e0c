"""Evaluation metrics through ``torchrec.metrics`` (aggregated across ranks by TorchRec).

Binary tasks: AUC, NE and CTR from TorchRec; logloss is derived exactly from them
(NE is the cross-entropy divided by the entropy of the average label, CTR that average label),
so no second pass or hand-written all-reduce is needed. Regression tasks: MSE.
Samples outside a task's sample space (label_mask False) get weight 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import MetricsConfig, RecMetricDef, RecMetricEnum, RecTaskInfo

from recsys_mtl.data.schema import TaskSpec

_WINDOW = 1 << 40  # evaluation keeps every sample: AUC is a window metric in TorchRec


class MTLMetrics:
    """Per-task evaluation metrics for a multi-task model.

    Args:
        tasks (Sequence[TaskSpec]): tasks in label-column order.
        batch_size (int): per-rank batch size.
        world_size (int): ranks.
        rank (int): this rank.
        device (torch.device): where metric states live.
        process_group: group to aggregate over (default: world).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        batch_size: int,
        world_size: int,
        rank: int,
        device: torch.device,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.tasks = list(tasks)
        infos = [
            RecTaskInfo(name=t.name, label_name=f"{t.name}-label", prediction_name=f"{t.name}-pred",
                        weight_name=f"{t.name}-weight")
            for t in self.tasks
        ]
        binary = [i for i, t in enumerate(self.tasks) if t.kind == "binary"]
        regression = [i for i, t in enumerate(self.tasks) if t.kind == "regression"]
        rec_metrics = {}
        if binary:
            for m in (RecMetricEnum.AUC, RecMetricEnum.NE, RecMetricEnum.CTR):
                rec_metrics[m] = RecMetricDef(rec_task_indices=binary, window_size=_WINDOW)
        if regression:
            rec_metrics[RecMetricEnum.MSE] = RecMetricDef(rec_task_indices=regression, window_size=_WINDOW)
        config = MetricsConfig(rec_tasks=infos, rec_metrics=rec_metrics, throughput_metric=None, state_metrics=[])
        self.module: RecMetricModule = generate_metric_module(
            RecMetricModule, config, batch_size=batch_size, world_size=world_size, my_rank=rank,
            state_metrics_mapping={}, device=device, process_group=process_group,
        )

    def update(self, logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor) -> None:
        """Args: ``B x T`` logits, ``B x T`` labels, ``B x T`` bool mask."""
        out = {}
        for k, t in enumerate(self.tasks):
            pred = torch.sigmoid(logits[:, k]) if t.kind == "binary" else logits[:, k]
            out[f"{t.name}-pred"] = pred.detach().float()
            out[f"{t.name}-label"] = labels[:, k].float()
            out[f"{t.name}-weight"] = label_mask[:, k].float()
        self.module.update(out)

    def compute(self) -> dict[str, dict[str, float]]:
        """``{task: {"auc", "ne", "logloss", "ctr"} | {"mse"}}`` on rank 0, ``{}`` on other ranks.

        A collective: call it on every rank."""
        raw = {k: float(v.reshape(-1)[0]) for k, v in self.module.compute().items()}
        out: dict[str, dict[str, float]] = {}
        if not raw:
            return out  # TorchRec gathers the global result on rank 0 only
        for t in self.tasks:
            if t.kind == "binary":
                ne, ctr = raw[f"ne-{t.name}|window_ne"], raw[f"ctr-{t.name}|window_ctr"]
                ctr_c = min(max(ctr, 1e-12), 1 - 1e-12)
                entropy = -(ctr_c * math.log(ctr_c) + (1 - ctr_c) * math.log(1 - ctr_c))
                out[t.name] = {"auc": raw[f"auc-{t.name}|window_auc"], "ne": ne, "logloss": ne * entropy,
                               "ctr": ctr}
            else:
                out[t.name] = {"mse": raw[f"mse-{t.name}|window_mse"]}
        return out


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per task."""
    cols = ["auc", "gauc", "logloss", "ne", "mse", "recall@20", "ndcg@20", "hit@20", "recall@40", "ndcg@40"]
    used = [c for c in cols if any(c in m for m in metrics.values())]
    width = max(len("task"), *(len(t) for t in metrics))
    lines = ["task".ljust(width) + "".join(c.rjust(10) for c in used)]
    for t, m in metrics.items():
        lines.append(t.ljust(width) + "".join((f"{m[c]:.4f}" if c in m else "-").rjust(10) for c in used))
    return "\n".join(lines)
