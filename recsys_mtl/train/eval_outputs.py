"""What the final evaluation keeps beyond ``torchrec.metrics``: per-sample predictions (for gAUC
and STEM's subset analysis) and gate weights (expert utilisation), gathered to rank 0.

Everything here holds the eval split's predictions in memory on rank 0 (a few bytes per sample
and task); ``TrainConfig.eval_outputs=False`` turns it off for very large eval splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from recsys_mtl.analysis import expert_utilisation, gauc, plot_expert_utilisation
from recsys_mtl.data.schema import Schema
from recsys_mtl.types import MTLBatch

PREDICTIONS_FILE = "eval_predictions.parquet"
UTILISATION_FILE = "expert_utilisation.json"


def _first_ids(batch: MTLBatch, feature: str) -> np.ndarray:
    """The first id of ``feature`` per row (-1 for an empty bag); ``B``."""
    jt = batch.sparse[feature]
    lengths, values = jt.lengths(), jt.values()
    ids = torch.full((lengths.numel(),), -1, dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths  # B: offset of each row's bag
    has = lengths > 0
    ids[has] = values[starts[has].long()]
    return ids.cpu().numpy()


class EvalCollector:
    """Accumulates this rank's eval rows (padding rows, which are in no task's space, dropped)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.parts: list[dict[str, np.ndarray]] = []
        self.gate_parts: list[dict[str, np.ndarray]] = []

    def add(self, batch: MTLBatch, logits: torch.Tensor, gates: dict[str, np.ndarray] | None) -> None:
        real = batch.label_mask.any(dim=1).cpu().numpy()  # B
        part = {
            "logits": logits.detach().float().cpu().numpy()[real],  # n x T
            "labels": batch.labels.cpu().numpy()[real],
            "mask": batch.label_mask.cpu().numpy()[real],
        }
        if self.schema.user_id_feature:
            part["user"] = _first_ids(batch, self.schema.user_id_feature)[real]
        self.parts.append(part)
        if gates:
            self.gate_parts.append({t: w[real] for t, w in gates.items()})

    def gather(self, rank: int, world_size: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """Concatenates every rank's rows on rank 0 (rank order); None on other ranks."""
        local = (
            {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]} if self.parts else {},
            {t: np.concatenate([g[t] for g in self.gate_parts]) for t in self.gate_parts[0]} if self.gate_parts else {},
        )
        if world_size > 1:
            everything = [None] * world_size if rank == 0 else None
            dist.gather_object(local, everything, dst=0)
            if rank != 0:
                return None
            preds = [e[0] for e in everything if e[0]]
            gates = [e[1] for e in everything if e[1]]
        else:
            preds, gates = ([local[0]] if local[0] else []), ([local[1]] if local[1] else [])
        merged = {k: np.concatenate([p[k] for p in preds]) for k in preds[0]} if preds else {}
        merged_gates = {t: np.concatenate([g[t] for g in gates]) for t in gates[0]} if gates else {}
        return merged, merged_gates


def write_eval_outputs(
    out_dir: Path, schema: Schema, preds: dict[str, np.ndarray], gates: dict[str, np.ndarray], model_name: str,
) -> dict[str, dict[str, float]]:
    """Writes ``eval_predictions.parquet`` and the expert-utilisation JSON/PNG; returns per-task
    extra metrics (``gauc`` for binary tasks when the schema names a user id feature)."""
    extra: dict[str, dict[str, float]] = {}
    if not preds:
        return extra
    cols = {}
    if "user" in preds:
        cols["user"] = pa.array(preds["user"])
    for k, t in enumerate(schema.tasks):
        z = preds["logits"][:, k]
        p = 1.0 / (1.0 + np.exp(-z)) if t.kind == "binary" else z
        cols[f"{t.name}_pred"] = pa.array(p.astype(np.float32))
        cols[f"{t.name}_label"] = pa.array(preds["labels"][:, k].astype(np.float32))
        cols[f"{t.name}_mask"] = pa.array(preds["mask"][:, k])
        if t.kind == "binary" and "user" in preds:
            m = preds["mask"][:, k]
            extra[t.name] = {"gauc": gauc(p[m], preds["labels"][m, k], preds["user"][m])}
    pq.write_table(pa.table(cols), out_dir / PREDICTIONS_FILE)
    if gates:
        util = expert_utilisation(gates)
        (out_dir / UTILISATION_FILE).write_text(json.dumps(util, indent=2))
        plot_expert_utilisation(util, out_dir / "expert_utilisation.png", title=f"{model_name}: gate weight per expert")
    return extra
