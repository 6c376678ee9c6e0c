"""One training step with combined task gradients, on sharded tables with fused optimizers.

:class:`CombinedGradStep` is what a ``--grad-combiner`` other than ``ew`` changes in the one
training loop (docs/design.md §5.3). Inside the train module's forward, per batch:

1. **Capture.** Forward hooks on every embedding-bag module (``EmbeddingBagCollection`` or its
   sharded form) replace each pooled output ``B x ΣD`` by a detached leaf, remembering the
   lookup's KJT and the original output.
2. **Per-task gradients.** ``T`` ``autograd.grad`` passes from the task losses ``w_t L_t`` to the
   leaves and the dense parameters (nothing reaches the tables yet).
3. **Rows.** Every id occurrence (position) of the batch gets its per-task gradient
   (``c_p · ∂L_t/∂pooled[b, f]``, ``c_p`` = 1 for sum pooling, ``1/len`` for mean, the id's
   weight ``w_p`` for a weighted module, whose output is ``Σ_p w_p e_{r_p}``) and a row key
   (table offset + id; tables shared by several features share keys). Per embedding width:
   ``T x N x D`` positions, summed per unique row into ``T x U x D``. With ``stats="global"``
   the unique rows and their sums are all-gathered, so every rank sees the per-task row
   gradients of the global batch (averaged over ranks, as TorchRec averages embedding gradients).
4. **Combine.** PMTRec: :func:`recsys_mtl.ops.row_grad_pool.row_grad_pool` per width (row norms
   from the global sums), giving each position ``Σ_t w_t(r) g_t,p``. Baselines: one ``torchjd``
   aggregation over all rows of the batch; each row's combined gradient is handed back by the
   one rank that owns it (the lowest rank whose batch has the row), scaled by the world size.
   Dense parameters: summed (PMTRec) or aggregated (baselines).
5. **Hand back, one backward.** The step returns a surrogate loss whose gradient is exactly the
   combination: ``Σ ⟨pooled, G⟩`` for the tables (single-valued features: ``G`` at the pooled
   output, through the step's own lookup), or, for modules with multi-hot or weighted features, ``⟨lookup
   of the unique rows, X⟩`` through a second lookup of the batch's unique rows as one-id bags
   (a bag's pooled gradient cannot carry a different weight per row of the bag); and
   ``Σ ⟨θ, g_θ⟩`` for the dense parameters. The pipeline's single ``loss.backward()`` is then
   the one backward into the tables — one fused optimizer step — and DDP's all-reduce of the
   dense gradients. ``TrainPipelineSparseDist`` and fused optimizers work unchanged.

Single-process (unsharded) models work the same way, which is what the exactness tests compare.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_mtl.data.schema import Schema
from recsys_mtl.train.grad_combiners import GradCombiner
from recsys_mtl.types import MTLBatch

__all__ = ["EmbeddingCapture", "CombinedGradStep", "embedding_modules"]


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Every embedding-bag module of ``model`` (plain or sharded), in module order."""
    return [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, ShardedEmbeddingBagCollection))]


def _configs(module: nn.Module) -> list:
    if isinstance(module, EmbeddingBagCollection):
        return module.embedding_bag_configs()
    return module._embedding_bag_configs


@dataclasses.dataclass
class _Feature:
    module: int  # index into EmbeddingCapture.modules
    table: str
    base: int  # row-key offset of the table
    dim: int
    mean: bool


@dataclasses.dataclass
class _Record:
    """One captured lookup: the module, its input, its original output and the leaf standing in."""

    module: int
    kjt: KeyedJaggedTensor
    keys: list[str]
    offsets: list[int]  # column offset of every key in the pooled output
    values: torch.Tensor  # B x ΣD, the lookup's output (in the autograd graph of the tables)
    leaf: torch.Tensor  # B x ΣD, detached, requires grad: what the model reads


class EmbeddingCapture:
    """Forward hooks that stand a detached leaf in for every pooled embedding output while active.

    Args:
        model (nn.Module): the model (its embedding modules may be sharded).
        schema (Schema): tells which features are multi-hot.
    """

    def __init__(self, model: nn.Module, schema: Schema) -> None:
        self.modules = embedding_modules(model)
        if not self.modules:
            raise ValueError("a gradient combiner needs a model with EmbeddingBagCollection tables")
        self.features: dict[tuple[int, str], _Feature] = {}
        self.tables: dict[str, int] = {}
        base = 0
        for i, m in enumerate(self.modules):
            for cfg in _configs(m):
                if cfg.name in self.tables:
                    raise ValueError(f"table {cfg.name!r} appears in two embedding modules")
                self.tables[cfg.name] = base
                for f in cfg.feature_names:
                    self.features[(i, f)] = _Feature(i, cfg.name, base, cfg.embedding_dim,
                                                     cfg.pooling == PoolingType.MEAN)
                base += cfg.num_embeddings
        # Weighted modules (per-id weights in the KJT, SUM pooling only): c_p is the id's weight.
        self.weighted = [bool(getattr(m, "_is_weighted", False)) for m in self.modules]
        for (i, f), feat in self.features.items():
            if self.weighted[i] and feat.mean:
                raise ValueError(f"gradient combination: feature {f!r} is weighted with mean pooling; weighted "
                                 f"features need sum pooling")
        multi = {f.name for f in schema.sparse if f.multi_hot}
        # A module whose features are all single-valued takes its combined gradient at its own
        # pooled output; one with a multi-hot feature (or per-id weights) needs the unique-row lookup.
        self.inject = [self.weighted[k] or any(f in multi for (i, f) in self.features if i == k)
                       for k in range(len(self.modules))]
        self.active = False
        self.records: list[_Record] = []
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output):
            if not self.active:
                return None
            kt = output.wait() if isinstance(output, Awaitable) else output  # KeyedTensor
            kjt = args[0] if args else None
            if not isinstance(kjt, KeyedJaggedTensor):
                raise TypeError("gradient combination needs embedding modules called with a KeyedJaggedTensor")
            if self.weighted[index] and kjt.weights_or_none() is None:
                raise ValueError("gradient combination: a weighted embedding module was called without weights")
            values = kt.values()  # B x ΣD
            leaf = values.detach().requires_grad_(True)
            lengths = kt.length_per_key()
            offsets = [sum(lengths[:j]) for j in range(len(lengths))]
            self.records.append(_Record(index, kjt, list(kt.keys()), offsets, values, leaf))
            return KeyedTensor(keys=kt.keys(), length_per_key=lengths, values=leaf, key_dim=kt.key_dim())
        return hook

    @contextlib.contextmanager
    def capturing(self) -> Iterator[list[_Record]]:
        self.records = []
        self.active = True
        try:
            yield self.records
        finally:
            self.active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclasses.dataclass
class _Slice:
    """Positions of one record inside a width group's concatenated positions: one feature
    (``bag``/``coef`` per position), or a block of ``features`` single-valued features whose every
    bag holds exactly one id (``bag`` None: position ``f * B + b`` is sample ``b`` of feature ``f``)."""

    record: int
    start: int
    stop: int
    column: int  # first column in the record's pooled output
    bag: torch.Tensor | None = None  # N_f: the bag (sample) of every position
    coef: torch.Tensor | None = None  # N_f: c_p (None: all 1)
    features: int = 1


@dataclasses.dataclass
class _Group:
    """Every position of one embedding width ``D``."""

    dim: int
    keys: list[torch.Tensor] = dataclasses.field(default_factory=list)
    grads: list[torch.Tensor] = dataclasses.field(default_factory=list)  # T x N_f x D each
    slices: list[_Slice] = dataclasses.field(default_factory=list)
    size: int = 0

    def add(self, keys: torch.Tensor, grads: torch.Tensor, sl: _Slice) -> None:
        self.keys.append(keys)
        self.grads.append(grads)
        self.slices.append(sl)
        self.size = sl.stop


class CombinedGradStep:
    """The step of a non-``ew`` combiner (see the module docstring).

    Args:
        train_module (nn.Module): the ``MTLTrainModule`` (inside DMP, or alone).
        combiner (GradCombiner): what combines the per-task gradients.
        schema (Schema): the dataset schema.
        stats (str): ``global`` or ``local`` row statistics.
        distributed (bool | None): whether the model is sharded over the default process group
            (None: when one with several ranks is initialised). False runs an unsharded model
            alone even inside a multi-rank job (a reference, for instance).
    """

    def __init__(self, train_module: nn.Module, combiner: GradCombiner, schema: Schema, stats: str = "global",
                 distributed: bool | None = None) -> None:
        if getattr(train_module, "_aux_hook", False):
            raise ValueError("gradient combiners do not support models with an auxiliary loss (aitm); use --grad-combiner ew")
        self.combiner, self.stats = combiner, stats
        if distributed is None:
            distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0
        self.capture = EmbeddingCapture(train_module.model, schema)
        embedding_params = {id(p) for m in self.capture.modules for p in m.parameters()}
        self.dense = [p for p in train_module.parameters() if p.requires_grad and id(p) not in embedding_params]
        self.last_weights: dict[int, torch.Tensor] = {}  # PMTRec: U x T row weights per width (analysis)

    # ---- the step ----------------------------------------------------------------------------------

    def __call__(self, tm: nn.Module, batch: MTLBatch, labels: torch.Tensor, mask: torch.Tensor):
        with self.capture.capturing() as records:
            logits = tm.model(batch.dense, batch.sparse)
        records = list(records)
        weights = tm.loss.current_weights()
        losses = [weights[k].to(logits[t].dtype) * tm.loss.task_loss(k, logits[t], labels, mask)
                  for k, t in enumerate(tm.task_names)]
        total = torch.stack(losses).sum()
        leaves = [r.leaf for r in records]
        inputs = leaves + self.dense
        per_task = []
        for k, lt in enumerate(losses):
            g = torch.autograd.grad(lt, inputs, retain_graph=k < len(losses) - 1, allow_unused=True)
            per_task.append([torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, inputs)])
        leaf_grads = [[pt[i] for pt in per_task] for i in range(len(leaves))]  # per leaf: T of B x ΣD
        dense_grads = [[pt[len(leaves) + j] for pt in per_task] for j in range(len(self.dense))]

        surrogate = self._rows(records, leaf_grads) + self._dense(dense_grads, total)
        self.combiner.step_done()
        stacked = torch.stack([logits[t] for t in tm.task_names], dim=1)  # B x T
        return surrogate, (total.detach(), stacked.detach(), labels, mask)

    # ---- embedding rows ----------------------------------------------------------------------------

    def _groups(self, records: list[_Record], leaf_grads: list[list[torch.Tensor]]) -> dict[int, _Group]:
        groups: dict[int, _Group] = {}
        for ri, rec in enumerate(records):
            per_feature = rec.kjt.to_dict()
            feats = [self.capture.features[(rec.module, k)] for k in rec.keys]
            jts = [per_feature[k] for k in rec.keys]
            per_task = leaf_grads[ri]  # T of B x ΣD
            T, (B, width) = len(per_task), per_task[0].shape
            dims = {f.dim for f in feats}
            weighted = self.capture.weighted[rec.module]
            if len(dims) == 1 and not weighted and all(bool((jt.lengths() == 1).all()) for jt in jts):
                # Every bag holds one id (single-valued features, no empty bag): positions are the
                # bags, in feature-major order; one copy of the gradients, no gather.
                dim = feats[0].dim
                grp = groups.setdefault(dim, _Group(dim))
                keys = torch.cat([jt.values().long() + f.base for jt, f in zip(jts, feats)])  # F·B
                grads = per_task[0].new_empty(T, len(feats), B, dim)  # T x F x B x D: one copy per task
                for t, g in enumerate(per_task):
                    grads[t].copy_(g.view(B, len(feats), dim).transpose(0, 1))
                grads = grads.view(T, -1, dim)  # T x F·B x D
                grp.add(keys, grads, _Slice(ri, grp.size, grp.size + keys.numel(), rec.offsets[0],
                                            features=len(feats)))
                continue
            for key, col, feat, jt in zip(rec.keys, rec.offsets, feats, jts):
                ids, lengths = jt.values(), jt.lengths().long()  # N_f, B
                bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths)  # N_f
                g = torch.stack([gt[bag, col:col + feat.dim] for gt in per_task])  # T x N_f x D
                coef = None
                if weighted:  # pooled = Σ_p w_p e_p: c_p = w_p
                    coef = jt.weights().to(g.dtype)  # N_f
                    g = g * coef[None, :, None]
                elif feat.mean:
                    coef = (1.0 / lengths.clamp_min(1).to(g.dtype))[bag]  # N_f
                    g = g * coef[None, :, None]
                grp = groups.setdefault(feat.dim, _Group(feat.dim))
                grp.add(ids.long() + feat.base, g, _Slice(ri, grp.size, grp.size + bag.numel(), col, bag, coef))
        return groups

    def _exchange(self, keys: torch.Tensor, sums: torch.Tensor):
        """All ranks' unique rows and per-task sums → (global keys ``U_g``, global sums averaged
        over ranks ``U_g x F``, owner rank of every global row ``U_g``, local → global index ``U``)."""
        world = dist.get_world_size()
        n = torch.tensor([keys.numel()], device=keys.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        sizes_l = [int(s) for s in sizes]
        most = max(sizes_l)
        pad_k = torch.full((most,), -1, dtype=keys.dtype, device=keys.device)
        pad_k[: keys.numel()] = keys
        pad_s = sums.new_zeros(most, sums.shape[1])
        pad_s[: keys.numel()] = sums
        all_k = [torch.empty_like(pad_k) for _ in range(world)]
        all_s = [torch.empty_like(pad_s) for _ in range(world)]
        dist.all_gather(all_k, pad_k)
        dist.all_gather(all_s, pad_s)
        ks = torch.cat([k[:s] for k, s in zip(all_k, sizes_l)])  # Σ U_k
        ss = torch.cat([v[:s] for v, s in zip(all_s, sizes_l)])  # Σ U_k x F
        ranks = torch.cat([torch.full((s,), r, device=keys.device) for r, s in enumerate(sizes_l)])
        gkeys, inv = torch.unique(ks, return_inverse=True)  # U_g, Σ U_k
        gsums = ss.new_zeros(gkeys.numel(), ss.shape[1]).index_add_(0, inv, ss) / world  # U_g x F
        owner = torch.full((gkeys.numel(),), world, device=keys.device, dtype=ranks.dtype)
        owner = owner.scatter_reduce(0, inv, ranks, reduce="amin")  # U_g
        local = torch.searchsorted(gkeys, keys)  # U
        return gkeys, gsums, owner, local

    def _rows(self, records: list[_Record], leaf_grads: list[list[torch.Tensor]]) -> torch.Tensor:
        T = self.combiner.T
        groups = self._groups(records, leaf_grads)
        distributed = self.stats == "global" and self.world > 1
        world, rank = self.world, self.rank
        prepared = []  # per group: (group, keys N, grads T x N x D, uniq U, inv N, extra)
        for dim in sorted(groups):
            grp = groups[dim]
            keys = grp.keys[0] if len(grp.keys) == 1 else torch.cat(grp.keys)  # N
            grads = grp.grads[0] if len(grp.grads) == 1 else torch.cat(grp.grads, dim=1)  # T x N x D
            uniq, inv = torch.unique(keys, return_inverse=True)  # U, N
            prepared.append((grp, grads, uniq, inv))

        # Per-task row sums over the local batch (and, for global statistics, over every rank's).
        row_jac = []  # per group: T x U' x D (U' = global or local rows)
        exch = []
        for grp, grads, uniq, inv in prepared:
            if self.combiner.per_row and not distributed:  # the op sums the rows itself
                exch.append(None)
                row_jac.append(None)
                continue
            sums = grads.new_zeros(uniq.numel(), T * grp.dim)
            sums.index_add_(0, inv, grads.permute(1, 0, 2).reshape(-1, T * grp.dim))  # U x (T·D)
            if distributed:
                gkeys, gsums, owner, local = self._exchange(uniq, sums)
                exch.append((owner, local))
                row_jac.append(gsums.view(-1, T, grp.dim).permute(1, 0, 2))  # T x U_g x D
            else:
                exch.append(None)
                row_jac.append(sums.view(-1, T, grp.dim).permute(1, 0, 2))  # T x U x D

        # Combined gradient per position (per_row) or per local row (aggregators).
        position_out: list[torch.Tensor | None] = []
        row_out: list[torch.Tensor | None] = []
        if self.combiner.per_row:
            for (grp, grads, uniq, inv), jac, ex in zip(prepared, row_jac, exch):
                norms = None
                if ex is not None:
                    norms = jac[:, ex[1]].norm(dim=-1).t().contiguous()  # U x T over the global batch
                out, w = self.combiner.pool(grads, inv, uniq.numel(), norms=norms)  # N x D, U x T
                self.last_weights[grp.dim] = w.detach()
                position_out.append(out)
                if any(self.capture.inject):  # the unique-row lookup takes whole rows: Σ over positions
                    row_out.append(out.new_zeros(uniq.numel(), grp.dim).index_add_(0, inv, out))  # U x D
                else:
                    row_out.append(None)
        else:
            flat = torch.cat([j.reshape(T, -1) for j in row_jac], dim=1)  # T x n
            agg = self.combiner.combine_rows(flat)  # n
            start = 0
            for (grp, grads, uniq, inv), jac, ex in zip(prepared, row_jac, exch):
                n = jac.shape[1] * grp.dim
                a = agg[start:start + n].view(-1, grp.dim)  # U' x D
                start += n
                if ex is not None:  # the owner hands the row back, scaled against TorchRec's averaging
                    owner, local = ex
                    a = a[local] * (owner[local] == rank).to(a.dtype)[:, None] * world  # U x D
                row_out.append(a)
                first = torch.full((uniq.numel(),), inv.numel(), device=inv.device, dtype=inv.dtype)
                first = first.scatter_reduce(0, inv, torch.arange(inv.numel(), device=inv.device), reduce="amin")
                pos = a.new_zeros(inv.numel(), grp.dim)
                pos[first] = a  # the whole row's gradient on its first position
                position_out.append(pos)

        # Hand back: the pooled output (single-valued modules) or a lookup of the unique rows.
        pooled_grad: list[torch.Tensor | None] = [None] * len(records)  # B x ΣD each
        inject: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (grp, grads, uniq, inv), pos, rows in zip(prepared, position_out, row_out):
            for sl in grp.slices:
                rec = records[sl.record]
                if self.capture.inject[rec.module]:
                    continue
                part = pos[sl.start:sl.stop]  # N_f x D
                b, width = rec.values.shape
                if sl.bag is None and sl.features * grp.dim == width:  # a whole record of one-id bags
                    pooled_grad[sl.record] = part.view(sl.features, b, grp.dim).transpose(0, 1).reshape(b, width)
                    continue
                if pooled_grad[sl.record] is None:
                    pooled_grad[sl.record] = torch.zeros_like(rec.values)
                target = pooled_grad[sl.record]
                if sl.bag is None:
                    target[:, sl.column:sl.column + sl.features * grp.dim] = (
                        part.view(sl.features, b, grp.dim).transpose(0, 1).reshape(b, -1))
                else:
                    if sl.coef is not None:  # pooling multiplies by c_p again
                        part = part / sl.coef[:, None]
                    target[:, sl.column:sl.column + grp.dim].index_add_(0, sl.bag, part)
            for m in range(len(self.capture.modules)):
                if self.capture.inject[m]:
                    inject.setdefault(m, []).append((uniq, rows))
        surrogate = sum((r.values * g).sum() for r, g in zip(records, pooled_grad)
                        if g is not None and not self.capture.inject[r.module])
        for m, parts in inject.items():
            surrogate = surrogate + self._inject(m, records, parts)
        return surrogate

    def _inject(self, m: int, records: list[_Record], parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``⟨lookup(unique rows of module m), X⟩``: every row of the module's tables as a one-id
        bag under the first of the table's features, ``X`` its combined gradient."""
        module = self.capture.modules[m]
        rec = next(r for r in records if r.module == m)
        keys = rec.kjt.keys()
        feats = {k: self.capture.features[(m, k)] for k in keys if (m, k) in self.capture.features}
        rep: dict[str, str] = {}
        for k, f in feats.items():
            rep.setdefault(f.table, k)
        ids_per_key: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        grad_per_key: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        device = rec.values.device
        for uniq, rows in parts:
            for table, key in rep.items():
                f = feats[key]
                base = f.base
                sel = (uniq >= base) & (uniq < base + _table_rows(module, table))
                if f.dim != rows.shape[1]:
                    continue
                ids_per_key[key].append(uniq[sel] - base)
                grad_per_key[key].append(rows[sel])
        counts = {k: sum(int(t.numel()) for t in v) for k, v in ids_per_key.items()}
        stride = torch.tensor([max(1, max(counts.values(), default=1))], device=device)
        if self.world > 1:  # one batch size on every rank
            dist.all_reduce(stride, op=dist.ReduceOp.MAX)
        s = int(stride)
        lengths = torch.zeros(len(keys), s, dtype=torch.int32, device=device)
        for j, k in enumerate(keys):
            lengths[j, : counts[k]] = 1
        values = torch.cat([torch.cat(ids_per_key[k]) if ids_per_key[k] else
                            torch.zeros(0, dtype=torch.long, device=device) for k in keys])
        weights = (torch.ones(values.numel(), device=device, dtype=rec.kjt.weights().dtype)
                   if self.capture.weighted[m] else None)  # one-id bags of weight 1: the rows themselves
        kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.reshape(-1), weights=weights)
        with _plain_input_dist(module):  # the class's forward: not the pipeline's rewritten one
            out = type(module).forward(module, kjt)
        kt = out.wait() if isinstance(out, Awaitable) else out
        vals = kt.values()  # S x ΣD
        grad = torch.zeros_like(vals)
        lpk = kt.length_per_key()
        col = {k: sum(lpk[:j]) for j, k in enumerate(kt.keys())}
        for k in keys:
            if grad_per_key[k]:
                x = torch.cat(grad_per_key[k])  # n_k x D
                grad[: x.shape[0], col[k]:col[k] + x.shape[1]] = x
        return (vals * grad).sum()

    # ---- dense parameters --------------------------------------------------------------------------

    def _dense(self, dense_grads: list[list[torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
        if not self.dense:
            return like.new_zeros(())
        if not self.combiner.needs_dense_jacobian:
            combined = [torch.stack(g).sum(0) for g in dense_grads]
        else:
            jac = torch.cat([torch.stack(g).reshape(len(g), -1) for g in dense_grads], dim=1)  # T x P
            if self.stats == "global" and self.world > 1:
                jac = jac.contiguous()
                dist.all_reduce(jac)
                jac = jac / self.world
            flat = self.combiner.combine_dense(jac)  # P
            combined, start = [], 0
            for p in self.dense:
                combined.append(flat[start:start + p.numel()].view_as(p))
                start += p.numel()
        return sum((p * g.detach()).sum() for p, g in zip(self.dense, combined))


@contextlib.contextmanager
def _plain_input_dist(module: nn.Module) -> Iterator[None]:
    """Lets a sharded module run its own input distribution once more inside a pipelined step.

    ``TrainPipelineSparseDist`` replaces the forward of every input-dist all-to-all with one that
    only starts its splits exchange (the pipeline fuses the exchanges of all modules); a plain
    call of the module needs the original. The instance attributes are set aside and put back.
    """
    saved = []
    for child in module.modules():
        for input_dist in getattr(child, "_input_dists", ()):
            d = getattr(input_dist, "_dist", None)
            if d is not None and "forward" in vars(d):
                saved.append((d, vars(d).pop("forward")))
    try:
        yield
    finally:
        for d, fwd in saved:
            d.forward = fwd


def _table_rows(module: nn.Module, table: str) -> int:
    for cfg in _configs(module):
        if cfg.name == table:
            return cfg.num_embeddings
    raise KeyError(table)

