"""Building embedding tables from a schema and turning their outputs into MLP inputs.

Models never build tables themselves (docs/design.md §6): the trainer builds
``EmbeddingBagCollection``s with :func:`build_ebc` (usually on ``meta``), passes them in,
and ``DistributedModelParallel`` shards them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.distributed.types import Awaitable
from torchrec.fx.tracer import is_fx_tracing
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.regroup import KTRegroupAsDict
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_mtl.data.schema import Schema


def table_name(prefix: str, feature: str) -> str:
    """Name of the table embedding ``feature`` in the table set ``prefix``."""
    return f"{prefix}__{feature}" if prefix else feature


def build_ebc(
    schema: Schema,
    embedding_dim: int,
    *,
    features: Sequence[str] | None = None,
    prefix: str = "",
    device: torch.device | str | None = None,
) -> EmbeddingBagCollection:
    """One table per sparse feature of ``schema`` (or of ``features``), all of width ``embedding_dim``.

    Args:
        schema (Schema): dataset schema (table sizes, pooling).
        embedding_dim (int): width ``D`` of every table.
        features (Sequence[str] | None): subset of sparse features; all when None.
        prefix (str): table-set name, e.g. ``"shared"`` or ``"task_click"``.
        device: where to allocate; ``"meta"`` to defer to sharding.

    Example::

        >>> from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec
        >>> s = Schema(sparse=(SparseFeature("u", 10),), dense=(), tasks=(TaskSpec("t"),))
        >>> [t.name for t in build_ebc(s, 4, prefix="shared").embedding_bag_configs()]
        ['shared__u']
    """
    names = schema.sparse_names if features is None else list(features)
    tables = []
    for name in names:
        f = schema.feature(name)
        tables.append(
            EmbeddingBagConfig(
                name=table_name(prefix, name),
                embedding_dim=embedding_dim,
                num_embeddings=f.num_embeddings,
                feature_names=[name],
                pooling=PoolingType.MEAN if f.pooling == "mean" else PoolingType.SUM,
            )
        )
    return EmbeddingBagCollection(tables=tables, device=torch.device(device) if device else None)


def embedding_lookup(ebc: nn.Module, sparse: KeyedJaggedTensor) -> KeyedTensor:
    """``ebc(sparse)``: the pooled embeddings of a (sharded or unsharded) ``EmbeddingBagCollection``.

    Every model's table lookup goes through here, so a compiled dense head
    (:mod:`recsys_mtl.train.compiled`) can keep it out of its graph: under ``torch.compile`` the
    lookup runs eagerly behind ``torch.compiler.disable`` (a graph break; TorchRec's sharded
    lookup, its pipelined forward and fbgemm's kernels are never traced) and hands the graph a
    ready ``KeyedTensor``. Eagerly, and while ``torch.fx`` traces (TorchRec's pipeline finds the
    sharded modules' inputs that way), it is the plain module call.
    """
    if torch.compiler.is_compiling():
        return _eager_lookup(ebc, sparse)
    return ebc(sparse)


@torch.compiler.disable
def _eager_lookup(ebc: nn.Module, sparse: KeyedJaggedTensor) -> KeyedTensor:
    out = ebc(sparse)
    # A sharded EBC (and its pipelined forward) returns a LazyAwaitable: wait for it here, so
    # the compiled graph receives the KeyedTensor itself.
    return out.wait() if isinstance(out, Awaitable) else out


def embedded_features(ebc: nn.Module) -> list[str]:
    """Feature names of ``ebc`` in table-config order (the order models concatenate them in).

    A sharded EBC may return its ``KeyedTensor`` keys in another order (grouped by sharding
    and pooling), so models select features by name, never by column position.
    """
    return [feat for cfg in ebc.embedding_bag_configs() for feat in cfg.feature_names]


def ebc_out_features(ebc: nn.Module) -> int:
    return sum(cfg.embedding_dim * len(cfg.feature_names) for cfg in ebc.embedding_bag_configs())


@torch.fx.wrap
def _tag_keys(kt: KeyedTensor, tag: str) -> KeyedTensor:
    """``kt`` with every key prefixed by ``tag``; the values are shared, not copied."""
    return KeyedTensor(
        keys=[tag + k for k in kt.keys()],
        length_per_key=kt.length_per_key(),
        values=kt.values(),
        key_dim=kt.key_dim(),
    )


class FeatureRegroup(nn.Module):
    """Pooled embeddings picked by feature name from one or more ``KeyedTensor``s, concatenated per group.

    Features are found by key, so the column order of a sharded EBC's output does not matter.
    Several sources may embed the same feature (a shared and a task table set), and a group
    may mix sources freely. Two equivalent assemblies, bit-identical in value:

    * fused: TorchRec's ``KTRegroupAsDict``, one fbgemm permute for every group, its layout
      computed on the first call. Used off CPU (the accelerator kernel). Sources after the
      first get their keys tagged internally so equal feature names stay apart. The cached
      layout is checked against every input's keys and widths on each call (a list
      comparison) and rebuilt when they change, e.g. once a module first run unsharded runs
      on sharded tables.
    * by name: ``to_dict()`` of each source and one ``torch.cat`` per group. Used on CPU,
      where fbgemm's ``permute_multi_embedding`` copies row by row (two orders of magnitude
      slower than ``cat`` at batch 1024), while tracing with ``torch.fx``, where it
      records a graph that needs no cached state, and under ``torch.compile`` (a compiled
      dense head), where inductor fuses the cats.

    Args:
        groups (Sequence[Sequence[tuple[int, str]]]): per output group, the ``(source, feature)``
            pairs in concatenation order; ``source`` indexes the list given to ``forward``.
        fused (bool | None): force the fused (True) or by-name (False) assembly; None picks
            by the inputs' device. Settable later as the ``fused`` attribute.

    Example::

        >>> kt = KeyedTensor.from_tensor_list(["a", "b"], [torch.ones(2, 1), torch.zeros(2, 2)])
        >>> other = KeyedTensor.from_tensor_list(["a"], [torch.full((2, 1), 7.0)])
        >>> regroup = FeatureRegroup([[(0, "b"), (0, "a")], [(1, "a"), (0, "b")]])
        >>> [t.tolist() for t in regroup([kt, other])]
        [[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], [[7.0, 0.0, 0.0], [7.0, 0.0, 0.0]]]
        >>> regroup.fused = True  # TorchRec's fused permute, same values
        >>> [t.tolist() for t in regroup([kt, other])]
        [[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], [[7.0, 0.0, 0.0], [7.0, 0.0, 0.0]]]
    """

    def __init__(self, groups: Sequence[Sequence[tuple[int, str]]], fused: bool | None = None) -> None:
        super().__init__()
        if not groups or any(not g for g in groups):
            raise ValueError("FeatureRegroup needs at least one group and no empty groups")
        self.groups = [[(int(src), str(f)) for src, f in g] for g in groups]
        if any(src < 0 for g in self.groups for src, _ in g):
            raise ValueError("FeatureRegroup sources are non-negative indices")
        self.num_sources = 1 + max(src for g in self.groups for src, _ in g)
        self.fused = fused
        self._tags = [self._tag(i) for i in range(self.num_sources)]
        self._names = [f"group_{i}" for i in range(len(self.groups))]
        self.regroup = KTRegroupAsDict(
            groups=[[self._tags[src] + f for src, f in g] for g in self.groups], keys=self._names
        )
        self._layout: list[tuple[list[str], list[int]]] | None = None

    @staticmethod
    def _tag(source: int) -> str:
        return "" if source == 0 else f"#{source}/"

    def _use_fused(self, keyed_tensors: list[KeyedTensor]) -> bool:
        if torch.jit.is_scripting() or is_fx_tracing() or isinstance(keyed_tensors[0], torch.fx.Proxy):
            return False
        if torch.compiler.is_compiling():  # a compiled head: the cats fuse into one inductor kernel
            return False
        if self.fused is not None:
            return self.fused
        return keyed_tensors[0].values().device.type != "cpu"

    def _check_layout(self, keyed_tensors: list[KeyedTensor]) -> None:
        layout = [(kt.keys(), kt.length_per_key()) for kt in keyed_tensors]
        if layout == self._layout:
            return
        if len(keyed_tensors) != self.num_sources:
            raise ValueError(f"FeatureRegroup expects {self.num_sources} KeyedTensors, got {len(keyed_tensors)}")
        flat = [self._tags[i] + k for i, (keys, _) in enumerate(layout) for k in keys]
        if len(set(flat)) != len(flat):
            raise ValueError(f"FeatureRegroup inputs have clashing keys: {[k for k, _ in layout]}")
        for src, f in sorted({p for g in self.groups for p in g}):
            if f not in layout[src][0]:
                raise ValueError(f"feature {f!r} not among source {src}'s keys {layout[src][0]}")
        self.regroup.clear_cache()  # new key order or widths: recompute the permutation
        self._layout = [(list(keys), list(lengths)) for keys, lengths in layout]

    def forward(self, keyed_tensors: list[KeyedTensor]) -> list[torch.Tensor]:
        """Args:
            keyed_tensors (list[KeyedTensor]): the sources, each ``B x sum(D)`` with ``key_dim=1``.

        Returns:
            One ``B x sum(D_group)`` tensor per group, in group order.
        """
        return self.assemble(keyed_tensors, ())

    def assemble(self, keyed_tensors: list[KeyedTensor], tail: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`forward` with ``tail`` (``B x F_i`` tensors: dense features, zero padding)
        appended to every group, in the same ``cat`` as the embeddings on the by-name path.

        Returns:
            One ``B x (sum(D_group) + sum(F_i))`` tensor per group, in group order.
        """
        if self._use_fused(keyed_tensors):
            self._check_layout(keyed_tensors)
            kts = [kt if not tag else _tag_keys(kt, tag) for kt, tag in zip(keyed_tensors, self._tags)]
            out = self.regroup(kts)
            if tail:
                return [torch.cat([out[name], *tail], dim=1) for name in self._names]
            return [out[name] for name in self._names]
        embs = [keyed_tensors[i].to_dict() for i in range(self.num_sources)]  # per source: feature -> B x D_f
        return [torch.cat([embs[src][f] for src, f in g] + list(tail), dim=1) for g in self.groups]

    def extra_repr(self) -> str:
        return f"groups={self.groups}, fused={self.fused}"


# Width multiple the dense head's input is padded to (zero columns after the features): GEMMs whose
# reduction or output width is a multiple of 16 floats (one AVX-512 vector, two AVX2 ones) avoid
# MKL's remainder paths. W1's 26 x 16 + 13 = 429 features become 432. Measured 2026-12-02 (2-core
# AMD EPYC with AVX-512, MKL, a machine shared with other jobs): W1's level-0 shared-expert GEMMs
# (B 2048, N 512) forward + weight + input gradient 16.6 -> 14.8 ms, the pipelined W1 step 1.04x
# eager and 1.05x with the compiled head (8 rounds of 5 interleaved steps, medians).
INPUT_WIDTH_MULTIPLE = 16


def padded_width(width: int, multiple: int = INPUT_WIDTH_MULTIPLE) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (1 or less: unchanged).

    Example::

        >>> padded_width(429), padded_width(432), padded_width(429, 1)
        (432, 432, 429)
    """
    return -(-width // multiple) * multiple if multiple > 1 else width


def cat_dense(sparse: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
    """``sparse ⊕ dense`` along columns; ``sparse`` itself without dense features."""
    return sparse if dense is None else torch.cat([sparse, dense], dim=1)


class SparseDenseInput(nn.Module):
    """Pooled embeddings concatenated with dense features: the usual MTL bottom input, zero-padded
    to a width multiple.

    The output is ``B x out_features``: the embeddings (features in ``self.features`` order), the
    dense features, then ``padding`` zero columns up to a multiple of ``pad_to`` — all one ``cat``.
    The layer reading it gets ``padding`` weight rows that start at zero and stay there (their
    inputs are zero, so are their gradients and optimizer updates): the model computes the same
    function as on the unpadded input (pass the padding as the reader's ``zero_rows``).

    Args:
        embedding_bag_collection (EmbeddingBagCollection): built (possibly sharded later) tables.
        dense_in_features (int): number of dense features ``F`` (0 for none).
        pad_to (int): width multiple (:data:`INPUT_WIDTH_MULTIPLE`; 1: no padding).

    Example::

        >>> from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec
        >>> s = Schema(sparse=(SparseFeature("u", 10),), dense=(), tasks=(TaskSpec("t"),))
        >>> inp = SparseDenseInput(build_ebc(s, 4), dense_in_features=2, pad_to=1)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["u"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> inp(torch.zeros(2, 2), kjt).shape
        torch.Size([2, 6])
        >>> padded = SparseDenseInput(build_ebc(s, 4), dense_in_features=2)
        >>> padded.out_features, padded.padding, padded(torch.ones(2, 2), kjt)[:, 6:].abs().sum().item()
        (16, 10, 0.0)
    """

    def __init__(self, embedding_bag_collection: nn.Module, dense_in_features: int,
                 pad_to: int = INPUT_WIDTH_MULTIPLE) -> None:
        super().__init__()
        self.ebc = embedding_bag_collection
        self.dense_in_features = dense_in_features
        self.features = embedded_features(embedding_bag_collection)
        self.unpadded_features = ebc_out_features(embedding_bag_collection) + dense_in_features
        self.out_features = padded_width(self.unpadded_features, pad_to)
        self.padding = self.out_features - self.unpadded_features
        self.regroup = FeatureRegroup([[(0, f) for f in self.features]])

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.assemble(dense, self.lookup(sparse))  # B x out_features

    def lookup(self, sparse: KeyedJaggedTensor) -> KeyedTensor:
        """The table lookup alone (:func:`embedding_lookup`): models with several inputs look up
        every table set before assembling any, so a compiled head is one graph after them."""
        return embedding_lookup(self.ebc, sparse)

    def assemble(self, dense: torch.Tensor, pooled: KeyedTensor) -> torch.Tensor:
        """``pooled`` (this input's lookup) ⊕ ``dense`` ⊕ zero padding: ``B x out_features``."""
        tail = [dense] if self.dense_in_features > 0 else []  # B x F
        if self.padding:
            tail.append(dense.new_zeros((dense.shape[0], self.padding)))  # B x padding
        # B x (sum(D) + F + padding), embeddings in self.features order: one cat on CPU
        return self.regroup.assemble([pooled], tail)[0]
