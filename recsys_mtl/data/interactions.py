"""Interaction datasets (user–item pairs + side information) and their training batches.

The layout is written by ``recsys-mtl data convert ciao|epinions`` (``schema.json`` with
``metadata.format == "interactions"``, ``train/``, ``eval/``, ``test/`` parquet files of
``user, item[, rating]``, ``side/trust.parquet`` ``user, friend``, ``side/item_category.parquet``
``item, category``).

Training follows the PMTRec setting (Yang et al. 2024, §3.1, §4.1): every training interaction
``(u, i)`` is one row of a batch, with

* ``rec`` — BPR (Rendle et al. 2009): a negative item ``j`` drawn uniformly from the items ``u``
  has not interacted with in train; the model's logit is ``s(u, i) − s(u, j)`` with label 1, so
  the binary cross-entropy is BPR's ``−ln σ(s(u, i) − s(u, j))``;
* every other task — a pair task declared from a side table (:mod:`recsys_mtl.data.pair_tasks`):
  anchor ``a`` (the row's user or item), a partner ``p`` of ``a`` from the side table and a random
  entity ``n`` of the same kind; logit ``s(a, p) − s(a, n)`` (rows whose anchor has no partner are
  outside the task's space). The converters declare ``social`` (social-link prediction: a user
  ``u`` trusts; roles ``friend``, ``neg_friend``) and ``category`` (same-category prediction: another
  item of ``i``'s category; roles ``cat_item``, ``neg_cat_item``); co-view / co-buy style tables are
  added with ``recsys-mtl data add-pair-task``.

The samples are drawn per batch from a generator seeded by ``(seed, epoch, rank, batch)``, so a
resumed run draws exactly what the uninterrupted run drew. The batch's KJT has one single-valued
feature per role (:func:`~recsys_mtl.data.pair_tasks.role_kinds`); the roles of users share the
``user_emb`` table and those of items the ``item_emb`` table (:func:`training_schema` describes them as a schema the trainer uses).

Graph encoders (``lightgcn``, ``ngcf``) propagate over the bipartite graph of the *train*
interactions (users then items, ``(U+I) x (U+I)``), ``Â = D^{-1/2} A D^{-1/2}``. Their batches
carry every role as weighted bags of table rows (SUM pooling, per-id weights in the KJT), so the
tables stay sharded and the fused optimizers and train pipelines work unchanged:

* ``lightgcn`` (He et al., SIGIR'20, Eq. 3-4): ``e_x = Σ_y P_xy E_y`` with
  ``P = Σ_{k=0}^{K} α_k Â^k``, ``α_k = 1/(K+1)``; role ``r`` is two bags, ``r__u`` (the user
  columns of row ``x`` of ``P``, in ``user_emb``) and ``r__i`` (the item columns, in ``item_emb``);
* ``ngcf`` (Wang et al., SIGIR'19, Eq. 7): role ``r`` is ``r`` itself (one id, weight 1, in its own
  table) and ``r__nbr``, the row of ``Â`` over ``x``'s neighbours (on the other side of the graph,
  in the other kind's table), i.e. ``s_x = Σ_{y ∈ N(x)} Â_xy e_y``.

:class:`GraphBags` builds ``P`` (or ``Â``) once per dataset with ``scipy.sparse`` and gathers the
bags of a batch with vectorised CSR row gathers.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.pair_tasks import PairSide, csr, load_side, pair_tasks, role_kinds, task_roles
from recsys_mtl.data.reader import DataError, list_parquet_files, split_rows, steps_per_epoch
from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec
from recsys_mtl.types import MTLBatch

if TYPE_CHECKING:
    from recsys_mtl.config import ModelConfig

__all__ = ["is_interactions", "training_schema", "InteractionData", "InteractionBatches", "make_interaction_loader", "role_tables", "GraphBags", "graph_bags", "propagation_matrix",
           "normalized_adjacency", "GRAPH_ENCODERS", "feature_role", "load_training_schema", "check_interactions"]

FORMAT = "interactions"
TABLES: dict[str, str] = {"user": "user_emb", "item": "item_emb"}  # entity kind -> its table
SPLITS = ("train", "eval", "test")
# Graph encoders -> the bag features of a role ``r`` (a suffix of ``r``, see the module docstring).
GRAPH_ENCODERS: dict[str, tuple[str, ...]] = {"lightgcn": ("__u", "__i"), "ngcf": ("", "__nbr")}
_OTHER = {"user_emb": "item_emb", "item_emb": "user_emb"}


def is_interactions(schema: Schema) -> bool:
    """True for an interaction dataset (user–item pairs; trained with sampled pairs)."""
    return schema.metadata.get("format") == FORMAT


def _role_tables(schema: Schema) -> dict[str, str]:
    """Role -> its table, users' roles first (:func:`~recsys_mtl.data.pair_tasks.role_kinds`)."""
    return {r: TABLES[k] for r, k in role_kinds(schema).items()}


def _encoder(model: "ModelConfig | None") -> str | None:
    """The graph encoder of ``model`` (None: MF's single-valued roles)."""
    name = getattr(model, "name", None)
    return name if name in GRAPH_ENCODERS else None


def feature_role(feature: str) -> str:
    """The role a batch feature represents (``"item__u"`` -> ``"item"``)."""
    return feature.split("__", 1)[0]


def _feature_table(feature: str, roles: dict[str, str]) -> str:
    """The table a batch feature is looked up in (``roles``: role -> its table)."""
    role, _, suffix = feature.partition("__")
    if suffix == "u":
        return "user_emb"
    if suffix == "i":
        return "item_emb"
    return _OTHER[roles[role]] if suffix == "nbr" else roles[role]


def _features(roles: dict[str, str], encoder: str | None) -> dict[str, list[str]]:
    """Table -> its batch features (the roles' bags), ``user_emb`` first."""
    feats = [r + suffix for r in roles for suffix in GRAPH_ENCODERS.get(encoder, ("",))]
    return {t: [f for f in feats if _feature_table(f, roles) == t] for t in ("user_emb", "item_emb")}


def training_schema(schema: Schema, model: "ModelConfig | None" = None) -> Schema:
    """The schema of the training batches of an interaction dataset: the tasks and metadata of
    ``schema``, the role features of ``model``, each with the vocabulary of its table.

    Args:
        schema (Schema): the dataset's schema.
        model (ModelConfig | None): the run's model. None or a non-graph model (``mf``): one
            single-valued feature per role. ``lightgcn`` / ``ngcf``: the role's weighted bags
            (``multi_hot``; see the module docstring), with ``metadata["weighted"] = True`` and
            ``metadata["graph"] = {"encoder", "layers", "max_neighbours"}`` (what the data path
            propagates over).

    Returns:
        Schema: with ``metadata["tables"]`` (table -> its features), ``metadata["task_roles"]``
        (task -> its ``[anchor, positive, negative]`` roles) and ``metadata["roles"]`` (role ->
        ``"user"`` or ``"item"``).

    Example::

        >>> s = Schema(sparse=(SparseFeature("user", 5, side="user"), SparseFeature("item", 9, side="item")),
        ...            dense=(), tasks=(TaskSpec("rec"), TaskSpec("social")), user_id_feature="user",
        ...            metadata={"format": "interactions"})
        >>> [(f.name, f.num_embeddings) for f in training_schema(s).sparse]
        [('user', 5), ('friend', 5), ('neg_friend', 5), ('item', 9), ('neg_item', 9)]
        >>> from recsys_mtl.config import ModelConfig
        >>> g = training_schema(s, ModelConfig(name="ngcf"))
        >>> g.metadata["tables"]["item_emb"]
        ['user__nbr', 'friend__nbr', 'neg_friend__nbr', 'item', 'neg_item']
    """
    n = {"user_emb": schema.feature("user").num_embeddings, "item_emb": schema.feature("item").num_embeddings}
    encoder = _encoder(model)
    roles = _role_tables(schema)
    tables = _features(roles, encoder)
    feats = tuple(SparseFeature(f, n[t], multi_hot=encoder is not None,
                                side="user" if roles[feature_role(f)] == "user_emb" else "item")
                  for t, names in tables.items() for f in names)
    metadata = {**schema.metadata, "tables": tables, "roles": role_kinds(schema),
                "task_roles": {t: list(r) for t, r in task_roles(schema).items()}}
    if encoder is not None:
        metadata["weighted"] = True
        metadata["graph"] = {"encoder": encoder, "layers": int(model.graph_layers),
                             "max_neighbours": 0 if encoder == "ngcf" else int(model.graph_max_neighbours)}
    return dataclasses.replace(schema, sparse=feats, dense=(), user_id_feature=tables["user_emb"][0],
                               metadata=metadata)


def load_training_schema(dataset_dir: str | Path, model: "ModelConfig | None" = None) -> Schema:
    """The dataset's schema, or, for an interaction dataset, the schema of its training batches
    for ``model`` (:func:`training_schema`): what models, checkpoints and the trainer use."""
    schema = Schema.load(dataset_dir)
    return training_schema(schema, model) if is_interactions(schema) else schema


def check_interactions(dataset_dir: str | Path) -> None:
    """Loads (and so checks) an interaction dataset; raises :class:`DataError` naming the file."""
    InteractionData.load(dataset_dir)


def role_tables(schema: Schema) -> dict[str, list[str]]:
    """Table name -> its role features (the roles this schema's tasks use)."""
    roles = _role_tables(schema)
    return {t: [r for r, table in roles.items() if table == t] for t in ("user_emb", "item_emb")}


def _read_pairs(path: Path, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path, columns=[a, b])
    return (table.column(a).to_numpy().astype(np.int64, copy=False),
            table.column(b).to_numpy().astype(np.int64, copy=False))


@dataclasses.dataclass
class InteractionData:
    """An interaction dataset in memory: interactions per split, train items per user (CSR), and
    every pair task's side table (:class:`~recsys_mtl.data.pair_tasks.PairSide`).

    Args: (see :meth:`load`)
    """

    num_users: int
    num_items: int
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (users, items)
    user_items: tuple[np.ndarray, np.ndarray]  # train CSR
    sides: dict[str, PairSide]  # pair task -> its side table

    @staticmethod
    def load(dataset_dir: str | Path) -> "InteractionData":
        """Read once per process and schema version (cached by path and ``schema.json``'s mtime)."""
        d = Path(dataset_dir).resolve()
        return _load(str(d), _schema_version(d))

    def rows(self, split: str) -> int:
        return int(self.splits[split][0].size)

    def seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each ``(user, item)`` is a train interaction."""
        if not hasattr(self, "_seen"):
            self._seen = _Membership(*self.user_items, self.num_items)
        return self._seen(users, items)


def _schema_version(d: Path) -> int:
    """``schema.json``'s mtime (ns), so a declared pair task is seen by the next load (0: no schema)."""
    try:
        return (d / "schema.json").stat().st_mtime_ns
    except OSError:
        return 0


@lru_cache(maxsize=4)
def _load(dataset_dir: str, version: int = 0) -> InteractionData:
    d = Path(dataset_dir)
    schema = Schema.load(d)
    if not is_interactions(schema):
        raise DataError(f"{d}: not an interaction dataset (schema metadata format is not 'interactions')")
    nu, ni = schema.feature("user").num_embeddings, schema.feature("item").num_embeddings
    splits = {}
    for split in SPLITS:
        files = list_parquet_files(d, split) if (d / split).is_dir() else []
        us, its = [], []
        for f in files:
            u, i = _read_pairs(f, "user", "item")
            us.append(u)
            its.append(i)
        u = np.concatenate(us) if us else np.zeros(0, np.int64)
        i = np.concatenate(its) if its else np.zeros(0, np.int64)
        bad = (u < 0) | (u >= nu) | (i < 0) | (i >= ni)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise DataError(f"{d / split}: interaction {k} (user {u[k]}, item {i[k]}) is outside the "
                            f"{nu} users / {ni} items of the schema")
        splits[split] = (u, i)
    if splits["train"][0].size == 0:
        raise DataError(f"{d / 'train'}: no training interactions")
    count = {"user": nu, "item": ni}
    sides = {name: load_side(d, t, count[t.kind]) for name, t in pair_tasks(schema).items()}
    return InteractionData(nu, ni, splits, csr(*splits["train"], nu), sides)


class _Membership:
    """Vectorised ``value in list(key)`` over a CSR of sorted lists: one sorted array of
    ``key * width + value`` searched once per query batch."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, max_value: int) -> None:
        self.width = int(max_value) + 1
        keys = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
        self.flat = keys * self.width + indices  # sorted: keys ascending, each list sorted

    def __call__(self, keys: np.ndarray, vals: np.ndarray) -> np.ndarray:
        if self.flat.size == 0:
            return np.zeros(keys.size, dtype=bool)
        target = keys * self.width + vals
        pos = np.minimum(np.searchsorted(self.flat, target), self.flat.size - 1)
        return self.flat[pos] == target


def normalized_adjacency(data: InteractionData) -> sp.csr_matrix:
    """``Â = D^{-1/2} A D^{-1/2}`` of the bipartite train graph (LightGCN Eq. 7, NGCF's Laplacian
    ``p_ui = 1/sqrt(|N_u| |N_i|)``), nodes users ``0..U-1`` then items ``U..U+I-1``, float64
    ``(U+I) x (U+I)``; an isolated node's row and column are zero."""
    u, i = data.user_items[0], data.user_items[1]
    rows = np.repeat(np.arange(data.num_users, dtype=np.int64), np.diff(u))  # E: the user of every pair
    n = data.num_users + data.num_items
    r = sp.csr_matrix((np.ones(rows.size), (rows, i)), shape=(data.num_users, data.num_items))  # U x I
    a = sp.bmat([[None, r], [r.T, None]], format="csr")  # (U+I) x (U+I), symmetric
    deg = np.asarray(a.sum(axis=1)).ravel()  # U+I
    inv = np.zeros(n)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    d = sp.diags(inv)
    return (d @ a @ d).tocsr()


def _top_per_row(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """The ``n`` largest entries of every row of ``m`` (ties: the lower column), the rest dropped."""
    m.sort_indices()
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))  # nnz
    order = np.lexsort((m.indices, -m.data, rows))  # by row, then weight descending
    rank = np.arange(rows.size) - m.indptr[rows[order]]  # position of each entry within its row
    keep = np.sort(order[rank < n])  # back to (row, column) order
    counts = np.bincount(rows[keep], minlength=m.shape[0])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return sp.csr_matrix((m.data[keep], m.indices[keep], indptr), shape=m.shape)


def propagation_matrix(adjacency: sp.csr_matrix, layers: int, max_neighbours: int = 0,
                       chunk_rows: int = 2048) -> sp.csr_matrix:
    """LightGCN's ``P = Σ_{k=0}^{K} α_k Â^k`` with ``α_k = 1/(K+1)`` (He et al., SIGIR'20, Eq. 4 and 8),
    so that the final embeddings are ``P E``.

    Rows are computed in chunks of ``chunk_rows`` (``X_0 = I[rows]``, ``X_k = X_{k-1} Â``), which bounds
    the memory of a truncated ``K >= 2`` product to one chunk.

    Args:
        adjacency (sp.csr_matrix): ``Â``, ``N x N``.
        layers (int): ``K >= 0`` (0: the identity).
        max_neighbours (int): keep the N largest weights of each row (an approximation: the dropped
            neighbours' mass is not redistributed); 0: exact.
        chunk_rows (int): rows per chunk.

    Returns:
        sp.csr_matrix: ``N x N`` float64 (symmetric when exact, as ``Â`` is).
    """
    n = adjacency.shape[0]
    alpha = 1.0 / (layers + 1)
    eye = sp.identity(n, format="csr")
    parts = []
    for lo in range(0, n, chunk_rows):
        x = eye[lo:lo + chunk_rows]  # c x N
        acc = x * alpha
        for _ in range(layers):
            x = x @ adjacency
            acc = acc + x * alpha
        acc = acc.tocsr()
        acc.eliminate_zeros()
        parts.append(_top_per_row(acc, max_neighbours) if max_neighbours > 0 else acc)
    out = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, 0))
    out.sort_indices()
    return out


@dataclasses.dataclass
class _CSR:
    """Rows of a sparse matrix as numpy CSR arrays (int64 columns, float32 weights)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @staticmethod
    def of(m: sp.csr_matrix) -> "_CSR":
        m = m.tocsr()
        m.sort_indices()
        return _CSR(m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data.astype(np.float32))

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values, lengths, weights)`` of ``rows`` concatenated (one bag per row, vectorised)."""
        start = self.indptr[rows]
        lengths = self.indptr[rows + 1] - start  # B
        total = int(lengths.sum())
        ends = np.cumsum(lengths)
        # position p of bag b reads start[b] + (p - first position of bag b)
        pos = np.arange(total, dtype=np.int64) + np.repeat(start - (ends - lengths), lengths)  # total
        return self.indices[pos], lengths, self.data[pos]

    @property
    def nnz(self) -> int:
        return int(self.indices.size)


@dataclasses.dataclass
class GraphBags:
    """The bags of a graph encoder's batch features over one dataset's train graph.

    ``to_users`` / ``to_items``: rows are the ``U+I`` nodes (users then items), columns the users /
    the items, of ``P`` (``lightgcn``) or ``Â`` (``ngcf``). Feature ``r__u`` of an id ``x`` of role
    ``r`` is row ``node(r, x)`` of ``to_users``, ``r__i`` that of ``to_items``, ``r__nbr`` that of the
    other kind's (a user's neighbours are items), ``r`` the id itself with weight 1.

    Args: (see :meth:`load`)
    """

    encoder: str
    layers: int
    max_neighbours: int
    num_users: int
    num_items: int
    to_users: _CSR
    to_items: _CSR
    kinds: dict[str, str]  # role -> "user" | "item" (the dataset's roles)

    @staticmethod
    def load(dataset_dir: str | Path, encoder: str, layers: int = 1, max_neighbours: int = 0) -> "GraphBags":
        """Built once per ``(dataset, encoder, layers, max_neighbours)`` and cached in the process."""
        if encoder not in GRAPH_ENCODERS:
            raise ValueError(f"unknown graph encoder {encoder!r}; have {', '.join(GRAPH_ENCODERS)}")
        d = Path(dataset_dir).resolve()
        return _load_graph(str(d), encoder, int(layers), int(max_neighbours), _schema_version(d))

    def bag(self, feature: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values N, lengths B, weights N)`` of ``feature`` for the role ids ``ids`` (``B``)."""
        ids = np.asarray(ids, dtype=np.int64)
        role, _, suffix = feature.partition("__")
        if role not in self.kinds:
            raise KeyError(f"{feature!r}: {role!r} is not a role of this dataset ({', '.join(self.kinds)})")
        user = self.kinds[role] == "user"
        if not suffix:
            return ids, np.ones(ids.size, dtype=np.int64), np.ones(ids.size, dtype=np.float32)
        nodes = ids if user else ids + self.num_users
        to_users = suffix == "u" or (suffix == "nbr" and not user)
        return (self.to_users if to_users else self.to_items).gather(nodes)

    def kjt(self, keys: list[str], ids: dict[str, np.ndarray], stride: int | None = None) -> KeyedJaggedTensor:
        """A weighted KJT with every key of ``keys``: the bags of the roles in ``ids`` (role -> ``B``
        ids), the other keys' bags empty, every key padded with empty bags to ``stride`` rows."""
        b = max((v.size for v in ids.values()), default=0) if stride is None else stride
        values, lengths, weights = [], [], []
        for key in keys:
            role = feature_role(key)
            if role in ids:
                v, n, w = self.bag(key, ids[role])
                n = np.concatenate([n, np.zeros(b - n.size, dtype=np.int64)])
            else:
                v, n, w = np.zeros(0, np.int64), np.zeros(b, np.int64), np.zeros(0, np.float32)
            values.append(v)
            lengths.append(n)
            weights.append(w)
        return KeyedJaggedTensor(keys=list(keys), values=torch.from_numpy(np.concatenate(values)),
                                 lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
                                 weights=torch.from_numpy(np.concatenate(weights)))

    def role_kjt(self, keys: list[str], role: str, ids: torch.Tensor, stride: int) -> KeyedJaggedTensor:
        """The lookup KJT of ``ids`` (``n <= stride``) in ``role``, on the device of ``ids``."""
        kjt = self.kjt(keys, {role: ids.detach().cpu().numpy()}, stride)
        return kjt.to(ids.device)


@lru_cache(maxsize=4)
def _load_graph(dataset_dir: str, encoder: str, layers: int, max_neighbours: int, version: int = 0) -> GraphBags:
    data = InteractionData.load(dataset_dir)
    adj = normalized_adjacency(data)
    m = propagation_matrix(adj, layers, max_neighbours) if encoder == "lightgcn" else adj
    nu = data.num_users
    return GraphBags(encoder, layers, max_neighbours, nu, data.num_items, _CSR.of(m[:, :nu]), _CSR.of(m[:, nu:]),
                     role_kinds(Schema.load(dataset_dir)))


def graph_bags(dataset_dir: str | Path, schema: Schema) -> GraphBags | None:
    """The :class:`GraphBags` a training schema (:func:`training_schema`) asks for; None for MF's."""
    g = schema.metadata.get("graph")
    if not g:
        return None
    return GraphBags.load(dataset_dir, g["encoder"], g.get("layers", 1), g.get("max_neighbours", 0))


def sample_batch(data: InteractionData, users: np.ndarray, items: np.ndarray, tasks: list[str], roles: list[str],
                 rng: np.random.Generator, negative_tries: int = 8, graph: GraphBags | None = None) -> MTLBatch:
    """One training batch for the interactions ``(users, items)`` (see the module docstring).

    Args:
        data (InteractionData): the dataset.
        users (np.ndarray), items (np.ndarray): ``B`` train interactions.
        tasks (list[str]): the tasks (``rec`` first, then pair tasks of ``data.sides``).
        roles (list[str]): the batch's keys (the training schema's features): roles, or with
            ``graph`` the roles' bag features.
        rng (np.random.Generator): draws the negatives and positives.
        negative_tries (int): redraws of a BPR negative the user interacted with.
        graph (GraphBags | None): a graph encoder's bags (weighted KJT); None: one id per role.
    """
    b = users.size
    ids: dict[str, np.ndarray] = {"user": users, "item": items}
    mask = np.ones((b, len(tasks)), dtype=bool)
    neg = rng.integers(0, data.num_items, b)
    for _ in range(negative_tries):  # resample negatives the user interacted with in train
        hit = data.seen(users, neg)
        if not hit.any():
            break
        neg[hit] = rng.integers(0, data.num_items, int(hit.sum()))
    ids["neg_item"] = neg
    anchors = {"user": users, "item": items}
    count = {"user": data.num_users, "item": data.num_items}
    for k, task in enumerate(tasks[1:], start=1):  # the pair tasks, in task order
        side = data.sides[task]
        t = side.task
        ids[t.positive], mask[:, k] = side.sample(anchors[t.kind], rng, negative_tries)
        ids[t.negative] = rng.integers(0, count[t.kind], b)
    if graph is not None:
        kjt = graph.kjt(roles, ids, b)
    else:
        values = torch.from_numpy(np.concatenate([ids[r] for r in roles]).astype(np.int64))
        kjt = KeyedJaggedTensor(keys=roles, values=values, lengths=torch.ones(len(roles) * b, dtype=torch.int32))
    return MTLBatch(dense=torch.zeros(b, 0), sparse=kjt, labels=torch.ones(b, len(tasks)),
                    label_mask=torch.from_numpy(mask))


class InteractionBatches(IterableDataset):
    """This rank's training batches of one epoch: the train interactions permuted by
    ``(seed, epoch)`` (the same permutation on every rank), split into contiguous rank shares,
    batched, each batch with its sampled pairs.

    Args:
        dataset_dir (str | Path): the dataset.
        schema (Schema): its :func:`training_schema`.
        batch_size (int), rank (int), world_size (int), seed (int), epoch (int): as for the parquet reader.
        shuffle (bool): permute the interactions every epoch (False: stored order).
        start_batch (int): skip this rank's first batches (a resume).
    """

    def __init__(self, dataset_dir: str | Path, schema: Schema, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, start_batch: int = 0) -> None:
        self.data = InteractionData.load(dataset_dir)
        self.schema, self.batch_size, self.rank, self.world_size = schema, batch_size, rank, world_size
        self.seed, self.epoch, self.shuffle, self.start_batch = seed, epoch, shuffle, start_batch
        self.tasks = schema.task_names
        self.roles = schema.sparse_names
        self.graph = graph_bags(dataset_dir, schema)  # a graph encoder's bags (None: one id per role)

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.data.rows("train"), self.world_size, self.batch_size)

    def __iter__(self):
        users, items = self.data.splits["train"]
        n = users.size
        order = (np.random.default_rng([self.seed, self.epoch, 7]).permutation(n) if self.shuffle
                 else np.arange(n))
        lo, hi = split_rows(n, self.world_size, self.rank)
        mine = order[lo:hi]
        for k in range(self.start_batch, -(-mine.size // self.batch_size)):
            idx = mine[k * self.batch_size:(k + 1) * self.batch_size]
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, k, 11])
            yield sample_batch(self.data, users[idx], items[idx], self.tasks, self.roles, rng, graph=self.graph)


def make_interaction_loader(dataset_dir: str | Path, schema: Schema, **kwargs) -> DataLoader:
    """A DataLoader over :class:`InteractionBatches` (batches are built in the main process)."""
    return DataLoader(InteractionBatches(dataset_dir, schema, **kwargs), batch_size=None)
