"""STEM-Net (Su et al., AAAI'24): Shared and Task-specific EMbeddings with an
All-Forward Task-specific-Backward (AFTB) gate.

Embeddings: a shared table set and one table set per task, kept as separate
``EmbeddingBagCollection``s so each shards independently (the reference stores one
``D*(T+1)``-wide table per feature; the math is the same). Features not selected as
task-specific read the shared table in every task branch.

Experts (Eq. 1–3): task ``i``'s experts read task ``i``'s embeddings ``x_i``; shared experts
read the shared embeddings ``x_s``.

AFTB gate (Eq. 4–5): task ``i``'s tower receives a softmax mixture of *all* experts,
``sum_j w_ij * sg(E_j(x_j)) [j != i] + sum w_ii * E_i(x_i) + sum w_is * E_s(x_s)``, where ``sg`` is
stop-gradient. Only other tasks' specific experts are detached: own experts, shared experts and the
gate itself receive gradients. The gate is an MLP on ``x_i ⊕ x_s`` (the paper, Table 6,
``gate_input="concat"``); ``"sum"`` is ``x_i + x_s`` as in the reference code, ``"task"`` and
``"shared"`` are Table 6's other variants.

No task-specific fields (the "none" ablation): pass no task table sets (and ``tasks``); every
task's experts then read the shared embeddings ``x_s``. Experts, gates and the stop-gradient stay
task-specific, so what remains is STEM's AFTB gate over task-specific and shared experts on one
shared embedding set, and every task's loss trains the shared tables.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.modules.embeddings import (
    FeatureRegroup,
    cat_dense,
    ebc_out_features,
    embedded_features,
    embedding_lookup,
)
from recsys_mtl.modules.experts import Experts
from recsys_mtl.modules.mlp import MLP, Tower, linear

GateInput = Literal["concat", "sum", "task", "shared"]


class STEMNet(nn.Module):
    """STEM-Net.

    Args:
        shared_embedding_bag_collection (EmbeddingBagCollection): shared tables, one per feature.
        task_embedding_bag_collections (dict[str, EmbeddingBagCollection]): per-task tables for the
            task-specific features (the same features for every task); keys are the task names in order.
        dense_in_features (int): number of dense features ``F`` (fed to every branch).
        num_shared_experts (int): shared experts.
        num_task_experts (int): specific experts per task.
        expert_layer_sizes (Sequence[int]): each expert's MLP widths.
        gate_layer_sizes (Sequence[int]): hidden widths of each gate MLP (a Linear to the
            ``T*num_task_experts + num_shared_experts`` scores follows).
        tower_layer_sizes (Sequence[int]): tower hidden widths.
        gate_input (str): ``"concat"`` (paper), ``"sum"`` (reference code), ``"task"`` or ``"shared"``.
        stop_gradient (bool): detach other tasks' experts in each task's mixture (AFTB); False
            gives all-forward all-backward gating (ME-MMoE-like), STEM Table 6's ablation.
        tasks (Sequence[str] | None): task names; required only when
            ``task_embedding_bag_collections`` is empty (no task-specific fields), otherwise
            they must equal its keys.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> from recsys_mtl.modules.embeddings import build_ebc
        >>> s = tiny_schema()
        >>> m = STEMNet(build_ebc(s, 4, prefix="shared"),
        ...             {t: build_ebc(s, 4, prefix=t, features=["user_id", "item_id"]) for t in s.task_names},
        ...             len(s.dense), num_shared_experts=2, num_task_experts=1,
        ...             expert_layer_sizes=[8], gate_layer_sizes=[8], tower_layer_sizes=[4])
        >>> b = tiny_batch(s, batch_size=3)
        >>> m(b.dense, b.sparse)["like"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        shared_embedding_bag_collection: nn.Module,
        task_embedding_bag_collections: dict[str, nn.Module],
        dense_in_features: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_layer_sizes: Sequence[int],
        gate_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int],
        gate_input: GateInput = "concat",
        stop_gradient: bool = True,
        tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if gate_input not in ("concat", "sum", "task", "shared"):
            raise ValueError(f"gate_input must be concat/sum/task/shared, got {gate_input!r}")
        if task_embedding_bag_collections:
            if tasks is not None and list(tasks) != list(task_embedding_bag_collections):
                raise ValueError(
                    f"tasks {list(tasks)} differ from the task table sets {list(task_embedding_bag_collections)}"
                )
            self.tasks = list(task_embedding_bag_collections)
        elif tasks:
            self.tasks = list(tasks)
        else:
            raise ValueError("STEMNet needs task table sets or, without task-specific fields, the task names")
        self.shared_ebc = shared_embedding_bag_collection
        self.task_ebcs = nn.ModuleDict(task_embedding_bag_collections)
        self.dense_in_features = dense_in_features
        self.gate_input = gate_input
        self.stop_gradient = stop_gradient
        self.n, self.m = num_task_experts, num_shared_experts

        self.features = embedded_features(shared_embedding_bag_collection)
        specific: list[str] | None = None
        dims = {c.feature_names[0]: c.embedding_dim for c in shared_embedding_bag_collection.embedding_bag_configs()}
        for t, ebc in task_embedding_bag_collections.items():
            feats = embedded_features(ebc)
            if specific is not None and sorted(feats) != sorted(specific):
                raise ValueError(f"every task table set must cover the same features; {t} has {feats}")
            specific = feats
            unknown = set(feats) - set(self.features)
            if unknown:
                raise ValueError(f"task {t} tables embed features {sorted(unknown)} absent from the shared tables")
            for cfg in ebc.embedding_bag_configs():
                for f in cfg.feature_names:
                    if cfg.embedding_dim != dims.get(f, cfg.embedding_dim):
                        raise ValueError(f"feature {f!r}: task and shared tables differ in embedding_dim")
        self.specific_features = set(specific or [])
        # Sources: the shared tables, then (with task-specific fields) each task's tables.
        groups = [[(0, f) for f in self.features]]
        if self.specific_features:
            for i in range(len(self.tasks)):
                groups.append([(1 + i, f) if f in self.specific_features else (0, f) for f in self.features])
        self.regroup = FeatureRegroup(groups)
        d = ebc_out_features(shared_embedding_bag_collection) + dense_in_features
        t = len(self.tasks)
        self.task_experts = Experts(d, expert_layer_sizes, num_task_experts, t, grouped_input=True)
        self.shared_experts = Experts(d, expert_layer_sizes, num_shared_experts)
        gate_in = 2 * d if gate_input == "concat" else d
        num_all = t * num_task_experts + num_shared_experts
        self.gates = nn.ModuleDict(
            {
                task: nn.Sequential(MLP(gate_in, gate_layer_sizes), linear(gate_layer_sizes[-1] if gate_layer_sizes else gate_in, num_all))
                for task in self.tasks
            }
        )
        h = self.task_experts.out_features
        self.towers = nn.ModuleDict({task: Tower(h, tower_layer_sizes) for task in self.tasks})

    def embed(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the shared input ``B x D`` and the stacked task inputs ``T x B x D``."""
        d = dense if self.dense_in_features > 0 else None
        kts = [embedding_lookup(self.shared_ebc, sparse)]
        if self.specific_features:  # fixed at construction (torch.fx-traceable)
            kts += [embedding_lookup(self.task_ebcs[t], sparse) for t in self.tasks]
        # One B x sum(D) block per group, columns in self.features order. Indexed by constants
        # only: under the pipeline's tracer the result is a single opaque node.
        parts = self.regroup(kts)
        x_s = cat_dense(parts[0], d)  # B x D
        if not self.specific_features:  # no task-specific fields: task experts read x_s
            return x_s, torch.stack([x_s] * len(self.tasks))  # B x D, T x B x D
        x_t = [cat_dense(parts[1 + i], d) for i in range(len(self.tasks))]  # B x D, same column order as x_s
        return x_s, torch.stack(x_t)  # B x D, T x B x D

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x_s, x_t = self.embed(dense, sparse)
        n = self.n
        task_out = self.task_experts(x_t)  # (T*n) x B x H
        shared_out = self.shared_experts(x_s)  # m x B x H
        frozen = task_out.detach() if self.stop_gradient else task_out
        logits = {}
        for i, task in enumerate(self.tasks):
            # Own experts keep their gradient; other tasks' specific experts are stop-gradient.
            experts = torch.cat(
                [frozen[: i * n], task_out[i * n : (i + 1) * n], frozen[(i + 1) * n :], shared_out], dim=0
            )  # (T*n + m) x B x H
            if self.gate_input == "concat":
                g_in = torch.cat([x_t[i], x_s], dim=1)  # B x 2D
            elif self.gate_input == "sum":
                g_in = x_t[i] + x_s  # B x D
            elif self.gate_input == "task":
                g_in = x_t[i]
            else:
                g_in = x_s
            w = torch.softmax(self.gates[task](g_in), dim=-1)  # B x (T*n + m)
            mixed = torch.einsum("be,ebh->bh", w, experts)  # B x H
            logits[task] = self.towers[task](mixed)
        return logits
