"""The peers recsys_mtl is measured against, on the same batches and architecture.

* ``plain_pytorch``: PLE (W1) or STEM-Net (W2) written the straightforward way — one
  ``nn.EmbeddingBag(sparse=True)`` per feature (per table set for STEM-Net), one ``nn.Sequential``
  per expert, ``Linear`` + softmax gates (an MLP gate for STEM-Net), towers; SparseAdam for the
  tables and Adam for the rest.
* ``torch_rechub``: torch-rechub 0.9.0's own ``PLE`` with its embedding layer, trained with Adam
  as its trainer does (imported only when asked for). torch-rechub has no STEM-Net, so W2 has no
  torch-rechub contender.
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

    def tables(self) -> list[tuple[str, nn.EmbeddingBag]]:
        """``(feature, table)`` for every table."""
        return list(self.embeddings.items())

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


def _bags(num_embeddings: dict[str, tuple[int, str]], features: Sequence[str], dim: int) -> nn.ModuleDict:
    return nn.ModuleDict(
        {f: nn.EmbeddingBag(num_embeddings[f][0], dim, mode=num_embeddings[f][1], sparse=True) for f in features}
    )


class PlainSTEM(nn.Module):
    """STEM-Net in plain PyTorch: ``forward(dense, ids, offsets) -> dict[task, logits]``.

    A shared table set and one table set per task for the task-specific features, each one
    ``nn.EmbeddingBag(sparse=True)`` per feature; one ``nn.Sequential`` per expert (task ``i``'s
    experts read task ``i``'s embeddings, shared experts the shared ones); per task an MLP gate
    over all experts where other tasks' experts are detached (stop-gradient); towers.

    Args:
        schema (Schema): features and tasks.
        embedding_dim (int): table width.
        specific_features (Sequence[str]): features with task-specific tables.
        num_shared_experts (int): shared experts.
        num_task_experts (int): specific experts per task.
        expert_layer_sizes (Sequence[int]): expert widths.
        gate_layer_sizes (Sequence[int]): gate MLP hidden widths.
        tower_layer_sizes (Sequence[int]): tower hidden widths.
        gate_input (str): ``concat``, ``sum``, ``task`` or ``shared`` (as STEMNet).
        stop_gradient (bool): detach other tasks' experts in each task's mixture.

    Example::

        >>> from recsys_mtl.testing import tiny_schema, tiny_batch
        >>> s = tiny_schema()
        >>> m = PlainSTEM(s, 4, s.sparse_names, 1, 1, [8], [8], [4])
        >>> b = tiny_batch(s, 3)
        >>> m(b.dense, *plain_inputs(b))["like"].shape
        torch.Size([3])
    """

    def __init__(
        self, schema: Schema, embedding_dim: int, specific_features: Sequence[str], num_shared_experts: int,
        num_task_experts: int, expert_layer_sizes: Sequence[int], gate_layer_sizes: Sequence[int],
        tower_layer_sizes: Sequence[int], gate_input: str = "concat", stop_gradient: bool = True,
    ) -> None:
        super().__init__()
        self.tasks = schema.task_names
        self.features = schema.sparse_names
        self.num_dense = len(schema.dense)
        self.gate_input = gate_input
        self.stop_gradient = stop_gradient
        sizes = {f.name: (f.num_embeddings, f.pooling) for f in schema.sparse}
        self.shared_tables = _bags(sizes, self.features, embedding_dim)
        self.task_tables = nn.ModuleDict(
            {t: _bags(sizes, specific_features, embedding_dim) for t in self.tasks} if specific_features else {}
        )
        d = len(self.features) * embedding_dim + self.num_dense
        self.task_experts = nn.ModuleList(
            nn.ModuleList(_mlp(d, expert_layer_sizes) for _ in range(num_task_experts)) for _ in self.tasks
        )
        self.shared_experts = nn.ModuleList(_mlp(d, expert_layer_sizes) for _ in range(num_shared_experts))
        gate_in = 2 * d if gate_input == "concat" else d
        num_all = len(self.tasks) * num_task_experts + num_shared_experts
        self.gates = nn.ModuleDict(
            {t: nn.Sequential(_mlp(gate_in, gate_layer_sizes), nn.Linear(([gate_in, *gate_layer_sizes])[-1], num_all))
             for t in self.tasks}
        )
        h = expert_layer_sizes[-1]
        self.towers = nn.ModuleDict(
            {t: nn.Sequential(_mlp(h, tower_layer_sizes), nn.Linear(([h, *tower_layer_sizes])[-1], 1)) for t in self.tasks}
        )

    def tables(self) -> list[tuple[str, nn.EmbeddingBag]]:
        """``(feature, table)`` for every table of every table set."""
        out = list(self.shared_tables.items())
        for bags in self.task_tables.values():
            out += list(bags.items())
        return out

    def forward(self, dense: torch.Tensor, ids: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dense_part = [dense] if self.num_dense else []
        shared = {f: bag(ids[f], offsets[f]) for f, bag in self.shared_tables.items()}  # f -> B x D
        x_s = torch.cat([shared[f] for f in self.features] + dense_part, dim=1)  # B x (F*D + F_dense)
        x_t = []
        for t in self.tasks:
            if t not in self.task_tables:
                x_t.append(x_s)
                continue
            own = self.task_tables[t]
            parts = [own[f](ids[f], offsets[f]) if f in own else shared[f] for f in self.features]
            x_t.append(torch.cat(parts + dense_part, dim=1))  # B x (F*D + F_dense)
        task_out = [[e(x_t[k]) for e in experts] for k, experts in enumerate(self.task_experts)]  # T x n x [B x H]
        shared_out = [e(x_s) for e in self.shared_experts]  # m x [B x H]
        logits = {}
        for i, t in enumerate(self.tasks):
            experts = []
            for k, outs in enumerate(task_out):
                experts += outs if k == i or not self.stop_gradient else [o.detach() for o in outs]
            experts += shared_out
            if self.gate_input == "concat":
                g_in = torch.cat([x_t[i], x_s], dim=1)
            elif self.gate_input == "sum":
                g_in = x_t[i] + x_s
            elif self.gate_input == "task":
                g_in = x_t[i]
            else:
                g_in = x_s
            w = torch.softmax(self.gates[t](g_in), dim=-1)  # B x E
            mixed = (w.unsqueeze(-1) * torch.stack(experts, dim=1)).sum(dim=1)  # B x H
            logits[t] = self.towers[t](mixed).squeeze(-1)
        return logits


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def _load_stem(plain: PlainSTEM, ours: nn.Module) -> PlainSTEM:
    def copy_tables(bags: nn.ModuleDict, ebc: nn.Module) -> None:
        by_feature = {f: cfg.name for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names}
        for f, bag in bags.items():
            bag.weight.copy_(ebc.embedding_bags[by_feature[f]].weight)

    copy_tables(plain.shared_tables, ours.shared_ebc)
    for t, bags in plain.task_tables.items():
        copy_tables(bags, ours.task_ebcs[t])
    n = ours.n
    for k, experts in enumerate(plain.task_experts):
        for i, expert in enumerate(experts):
            for layer, lin in enumerate(_linears(expert)):
                w, b = ours.task_experts.expert_parameters(layer, k * n + i)  # D_in x D_out, D_out
                lin.weight.copy_(w.t())
                lin.bias.copy_(b.reshape(-1))
    for i, expert in enumerate(plain.shared_experts):
        for layer, lin in enumerate(_linears(expert)):
            w, b = ours.shared_experts.expert_parameters(layer, i)
            lin.weight.copy_(w.t())
            lin.bias.copy_(b.reshape(-1))
    for dst, src in [(plain.gates[t], ours.gates[t]) for t in plain.tasks] + [
        (plain.towers[t], ours.towers[t]) for t in plain.tasks
    ]:
        for a, b in zip(_linears(dst), _linears(src), strict=True):  # same order: hidden layers, then output
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    return plain


@torch.no_grad()
def load_from_recsys_mtl(plain: nn.Module, ours: nn.Module) -> nn.Module:
    """Copies an unsharded recsys_mtl model's weights into its plain twin: :class:`PlainPLE` from
    :class:`~recsys_mtl.models.ple.PLE`, :class:`PlainSTEM` from :class:`~recsys_mtl.models.stem.STEMNet`.

    With the same weights both compute the same function (checked in tests/bench): the
    benchmark compares two implementations of one model, not two models.
    """
    if isinstance(plain, PlainSTEM):
        return _load_stem(plain, ours)
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
        for k in range(t):
            copy_linear(plain_level.task_gates[k], *level.task_gates.gate_parameters(k))
        if level.shared_gate is not None:
            copy_linear(plain_level.shared_gate, *level.shared_gate.gate_parameters(0))
    for task, tower in ours.towers.items():
        hidden = [mod for mod in tower.mlp if isinstance(mod, nn.Linear)]
        for j, lin in enumerate(hidden):
            copy_linear(plain.towers[task][0][2 * j], lin.weight.t(), lin.bias)
        copy_linear(plain.towers[task][1], tower.out.weight.t(), tower.out.bias)
    return plain


def build_plain(workload: Workload) -> nn.Module:
    """The workload's model in plain PyTorch: :class:`PlainPLE` or :class:`PlainSTEM`."""
    c = workload.model
    if c.name == "stem":
        from recsys_mtl.models import stem_specific_features

        return PlainSTEM(workload.schema, c.embedding_dim, stem_specific_features(workload.schema, c.stem_specific_fields),
                         c.num_shared_experts, c.num_task_experts, c.expert_layer_sizes, c.gate_layer_sizes,
                         c.tower_layer_sizes, gate_input=c.stem_gate_input, stop_gradient=c.stem_stop_gradient)
    if c.name != "ple":
        raise ValueError(f"no plain PyTorch peer for model {c.name!r}")
    return PlainPLE(workload.schema, c.embedding_dim, c.num_levels, c.num_task_experts, c.num_shared_experts,
                    c.expert_layer_sizes, c.tower_layer_sizes)


def plain_optimizers(model: nn.Module, lr: float = 1e-3) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """SparseAdam for the tables (every ``nn.EmbeddingBag``), Adam for everything else."""
    sparse = [bag.weight for _, bag in model.tables()]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
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
