"""The peers recsys_mtl is measured against, on the same batches and architecture.

* ``plain_pytorch``: PLE written the straightforward way — one ``nn.EmbeddingBag(sparse=True)``
  per feature, one ``nn.Sequential`` per expert, ``Linear`` + softmax gates, towers; SparseAdam for
  the tables and Adam for the rest.
* ``torch_rechub``: torch-rechub 0.9.0's own ``PLE`` with its embedding layer, trained with Adam
  as its trainer does (imported only when asked for).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from recsys_mtl.bench.workloads import Workload
from recsys_mtl.data.schema import Schema
from recsys_mtl.types import MTLBatch


def _mlp(in_features: int, layer_sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in layer_sizes:
        layers += [nn.Linear(in_features, size), nn.ReLU()]
        in_features = size
    return nn.Sequential(*layers)


class PlainCGC(nn.Module):
    """One extraction level: per-task and shared experts, ``Linear`` + softmax gates.

    Args:
        in_features (int): branch input width ``D``.
        num_tasks (int): tasks ``T``.
        num_task_experts (int): experts per task ``n``.
        num_shared_experts (int): shared experts ``m``.
        expert_layer_sizes (Sequence[int]): expert widths.
        with_shared_gate (bool): compute the shared branch (all but the last level).
    """

    def __init__(
        self, in_features: int, num_tasks: int, num_task_experts: int, num_shared_experts: int,
        expert_layer_sizes: Sequence[int], with_shared_gate: bool,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.task_experts = nn.ModuleList(
            nn.ModuleList(_mlp(in_features, expert_layer_sizes) for _ in range(num_task_experts))
            for _ in range(num_tasks)
        )
        self.shared_experts = nn.ModuleList(_mlp(in_features, expert_layer_sizes) for _ in range(num_shared_experts))
        self.task_gates = nn.ModuleList(
            nn.Linear(in_features, num_task_experts + num_shared_experts) for _ in range(num_tasks)
        )
        self.shared_gate = (
            nn.Linear(in_features, num_tasks * num_task_experts + num_shared_experts) if with_shared_gate else None
        )

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        shared_out = [e(shared_input) for e in self.shared_experts]  # m x [B x H]
        all_task_out, task_mixed = [], []
        for k in range(self.num_tasks):
            own = [e(task_inputs[k]) for e in self.task_experts[k]]  # n x [B x H]
            all_task_out += own
            w = torch.softmax(self.task_gates[k](task_inputs[k]), dim=-1)  # B x (n+m)
            stacked = torch.stack(own + shared_out, dim=1)  # B x (n+m) x H
            task_mixed.append((w.unsqueeze(-1) * stacked).sum(dim=1))  # B x H
        shared_mixed = None
        if self.shared_gate is not None:
            w = torch.softmax(self.shared_gate(shared_input), dim=-1)  # B x (T*n+m)
            stacked = torch.stack(all_task_out + shared_out, dim=1)  # B x (T*n+m) x H
            shared_mixed = (w.unsqueeze(-1) * stacked).sum(dim=1)  # B x H
        return task_mixed, shared_mixed


class PlainPLE(nn.Module):
    """PLE in plain PyTorch: ``forward(dense, ids, offsets) -> dict[task, logits]``.

    Args:
        schema (Schema): features and tasks (one ``EmbeddingBag`` per sparse feature).
        embedding_dim (int): table width.
        num_levels (int): extraction levels.
        num_task_experts (int): experts per task and level.
        num_shared_experts (int): shared experts per level.
        expert_layer_sizes (Sequence[int]): expert widths.
        tower_layer_sizes (Sequence[int]): tower hidden widths.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> s = tiny_schema()
        >>> m = PlainPLE(s, 4, 2, 2, 1, [8], [4])
        >>> ids, offsets = plain_inputs(tiny_batch(s, 3))
        >>> m(tiny_batch(s, 3).dense, ids, offsets)["like"].shape
        torch.Size([3])
    """

    def __init__(
        self, schema: Schema, embedding_dim: int, num_levels: int, num_task_experts: int,
        num_shared_experts: int, expert_layer_sizes: Sequence[int], tower_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        self.tasks = schema.task_names
        self.embeddings = nn.ModuleDict(
            {f.name: nn.EmbeddingBag(f.num_embeddings, embedding_dim, mode=f.pooling, sparse=True) for f in schema.sparse}
        )
        d = len(schema.sparse) * embedding_dim + len(schema.dense)
        levels = []
        for j in range(num_levels):
            levels.append(PlainCGC(d, len(self.tasks), num_task_experts, num_shared_experts, expert_layer_sizes,
                                   with_shared_gate=j < num_levels - 1))
            d = expert_layer_sizes[-1]
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleDict(
            {t: nn.Sequential(_mlp(d, tower_layer_sizes), nn.Linear(([d, *tower_layer_sizes])[-1], 1)) for t in self.tasks}
        )

    def forward(self, dense: torch.Tensor, ids: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        emb = [bag(ids[name], offsets[name]) for name, bag in self.embeddings.items()]  # F x [B x D]
        x = torch.cat(emb + [dense], dim=1)  # B x (F*D + F_dense)
        task_x, shared_x = [x] * len(self.tasks), x
        for level in self.levels:
            task_x, shared_x = level(task_x, shared_x)
        return {t: self.towers[t](task_x[k]).squeeze(-1) for k, t in enumerate(self.tasks)}


def plain_inputs(batch: MTLBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-feature ``(ids, offsets)`` for ``nn.EmbeddingBag`` from a batch's KJT (done before timing)."""
    ids, offsets = {}, {}
    for name, jt in batch.sparse.to_dict().items():
        ids[name] = jt.values()
        offsets[name] = jt.offsets()[:-1]
    return ids, offsets


@torch.no_grad()
def load_from_recsys_mtl(plain: PlainPLE, ours: nn.Module) -> PlainPLE:
    """Copies an unsharded recsys_mtl :class:`~recsys_mtl.models.ple.PLE`'s weights into ``plain``.

    With the same weights both compute the same function (checked in tests/bench): the
    benchmark compares two implementations of one model, not two models.
    """
    ebc = ours.input.ebc
    for name, bag in plain.embeddings.items():
        bag.weight.copy_(ebc.embedding_bags[name].weight)

    def copy_linear(dst: nn.Linear, w: torch.Tensor, b: torch.Tensor) -> None:
        dst.weight.copy_(w.t())  # ours stores D_in x D_out
        dst.bias.copy_(b.reshape(-1))

    for level, plain_level in zip(ours.levels, plain.levels):
        n, m, t = level.n, level.m, level.num_tasks
        for k in range(t):
            for i in range(n):
                for layer in range(level.task_experts.num_layers):
                    copy_linear(plain_level.task_experts[k][i][2 * layer],
                                *level.task_experts.expert_parameters(layer, k * n + i))
        for i in range(m):
            for layer in range(level.shared_experts.num_layers):
                copy_linear(plain_level.shared_experts[i][2 * layer], *level.shared_experts.expert_parameters(layer, i))
        gates, e = level.task_gates, n + m
        for k in range(t):
            if gates.grouped_input:
                copy_linear(plain_level.task_gates[k], gates.weight[k], gates.bias[k, 0])
            else:
                copy_linear(plain_level.task_gates[k], gates.weight[:, k * e : (k + 1) * e], gates.bias[0, k * e : (k + 1) * e])
        if level.shared_gate is not None:
            copy_linear(plain_level.shared_gate, level.shared_gate.weight, level.shared_gate.bias)
    for task, tower in ours.towers.items():
        hidden = [mod for mod in tower.mlp if isinstance(mod, nn.Linear)]
        for j, lin in enumerate(hidden):
            copy_linear(plain.towers[task][0][2 * j], lin.weight.t(), lin.bias)
        copy_linear(plain.towers[task][1], tower.out.weight.t(), tower.out.bias)
    return plain


def build_plain(workload: Workload) -> PlainPLE:
    c = workload.model
    return PlainPLE(workload.schema, c.embedding_dim, c.num_levels, c.num_task_experts, c.num_shared_experts,
                    c.expert_layer_sizes, c.tower_layer_sizes)


def plain_optimizers(model: PlainPLE, lr: float = 1e-3) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """SparseAdam for the tables, Adam for everything else."""
    sparse = [p for n, p in model.named_parameters() if n.startswith("embeddings.")]
    dense = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
    return torch.optim.SparseAdam(sparse, lr=lr), torch.optim.Adam(dense, lr=lr)


def plain_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
    """Sum over tasks of the mean BCE on logits."""
    return sum(
        nn.functional.binary_cross_entropy_with_logits(logits[t], labels[:, k]) for k, t in enumerate(tasks)
    )


# ---- torch-rechub ----------------------------------------------------------------------------

def import_rechub():
    try:
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.multi_task import PLE
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "the torch_rechub peer needs torch-rechub 0.9.0: pip install -e \".[bench]\""
        ) from e
    return PLE, SparseFeature, DenseFeature


def build_rechub(workload: Workload) -> nn.Module:
    """torch-rechub's PLE with W1's architecture (its MLPs add BatchNorm after every Linear)."""
    RechubPLE, RSparse, RDense = import_rechub()
    c, s = workload.model, workload.schema
    features = [RSparse(f.name, vocab_size=f.num_embeddings, embed_dim=c.embedding_dim) for f in s.sparse]
    features += [RDense(f.name) for f in s.dense]
    return RechubPLE(
        features,
        task_types=["classification"] * len(s.tasks),
        n_level=c.num_levels,
        n_expert_specific=c.num_task_experts,
        n_expert_shared=c.num_shared_experts,
        expert_params={"dims": list(c.expert_layer_sizes)},
        tower_params_list=[{"dims": list(c.tower_layer_sizes)} for _ in s.tasks],
    )


def rechub_inputs(batch: MTLBatch, schema: Schema) -> dict[str, torch.Tensor]:
    """torch-rechub's input dict ``{feature: B}`` for single-valued features (done before timing)."""
    x = {name: jt.values() for name, jt in batch.sparse.to_dict().items()}
    for i, f in enumerate(schema.dense):
        x[f.name] = batch.dense[:, i]
    return x
