"""Auxiliary pair tasks of an interaction dataset, declared from side tables.

PMTRec (Yang et al. 2024, §3.1, §4.1) trains a recommender (BPR, the main task ``rec``) together
with auxiliary tasks built from side information: social-link prediction from a trust network and
same-category item prediction; co-view / co-buy tables give more tasks of the same shape. Every
auxiliary task here is a pairwise ranking task over one *kind* of entity (users or items):

* anchor ``a``: the batch row's user (``kind = "user"``) or item (``kind = "item"``);
* positive ``p``: drawn uniformly from the anchor's partners in the side table;
* negative ``n``: drawn uniformly from all entities of the kind;

and the model's logit is ``s(a, p) − s(a, n)`` with label 1 (BPR's loss). A row whose anchor has
no partner is outside the task's space (label mask 0).

A side table is either

* ``pairs``: a parquet file of ``(anchor, partner)`` id pairs (e.g. ``user, friend`` trust edges,
  ``item, other`` co-view pairs); ``symmetric`` adds every pair's reverse; self-pairs are dropped;
* ``groups``: a parquet file of ``(member, group)`` (e.g. ``item, category``): the partners of a
  member are the other members of its group.

The declaration lives in ``schema.json`` (``metadata["pair_tasks"]``; ``recsys-mtl data
add-pair-task`` writes it)::

    "pair_tasks": {
      "social":   {"kind": "user", "pairs": "side/trust.parquet", "columns": ["user", "friend"],
                   "roles": ["friend", "neg_friend"]},
      "category": {"kind": "item", "groups": "side/item_category.parquet", "columns": ["item", "category"],
                   "roles": ["cat_item", "neg_cat_item"]},
      "coview":   {"kind": "item", "pairs": "side/coview.parquet", "columns": ["item", "other"],
                   "symmetric": true}
    }

``roles`` names the batch features of the positive and the negative (default ``{task}_{kind}``
and ``neg_{task}_{kind}``). Datasets converted without the declaration get :data:`BUILTIN`'s
``social`` and ``category`` (paths from ``metadata["side"]``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_mtl.data.reader import DataError
from recsys_mtl.data.schema import Schema, TaskSpec

__all__ = ["PairTask", "PairSide", "BUILTIN", "KINDS", "MAIN_TASK", "MAIN_ROLES", "pair_tasks", "task_roles",
           "role_kinds", "load_side", "read_side_columns", "add_pair_task", "AddedPairTask"]

KINDS: tuple[str, ...] = ("user", "item")
SOURCES: tuple[str, ...] = ("pairs", "groups")
MAIN_TASK = "rec"
MAIN_ROLES: tuple[str, str, str] = ("user", "item", "neg_item")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class PairTask:
    """One auxiliary pair task (see the module docstring).

    Args:
        name (str): the task (a schema task name).
        kind (str): ``"user"`` or ``"item"``: what anchors, positives and negatives are.
        source (str): ``"pairs"`` or ``"groups"``.
        path (str): the side table, relative to the dataset directory.
        columns (tuple[str, str]): ``(anchor, partner)`` for pairs, ``(member, group)`` for groups.
        symmetric (bool): pairs only: every pair also counts reversed.
        positive (str), negative (str): the batch features of the positive and the negative.

    Example::

        >>> t = PairTask.from_dict("coview", {"kind": "item", "pairs": "side/coview.parquet",
        ...                                   "columns": ["item", "other"], "symmetric": True})
        >>> t.roles
        ('item', 'coview_item', 'neg_coview_item')
        >>> t.to_dict()["pairs"]
        'side/coview.parquet'
    """

    name: str
    kind: str
    source: str
    path: str
    columns: tuple[str, str]
    symmetric: bool = False
    positive: str = ""
    negative: str = ""

    def __post_init__(self) -> None:
        where = f"pair task {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name) or self.name == MAIN_TASK:
            raise DataError(f"{where}: a task name is a letter then letters, digits or '_' (and not "
                            f"{MAIN_TASK!r}, the main task)")
        if self.kind not in KINDS:
            raise DataError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.source not in SOURCES:
            raise DataError(f"{where}: source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if len(self.columns) != 2 or len(set(self.columns)) != 2 or not all(isinstance(c, str) for c in self.columns):
            raise DataError(f"{where}: columns must be two different column names, got {list(self.columns)}")
        if self.symmetric and self.source != "pairs":
            raise DataError(f"{where}: symmetric applies to pairs tables only")
        if not self.positive:
            object.__setattr__(self, "positive", f"{self.name}_{self.kind}")
        if not self.negative:
            object.__setattr__(self, "negative", f"neg_{self.name}_{self.kind}")
        for role in (self.positive, self.negative):
            if not _NAME.match(role) or "__" in role:
                raise DataError(f"{where}: role {role!r} must be a letter then letters, digits or single '_'")
        if self.positive == self.negative:
            raise DataError(f"{where}: the positive and negative roles must differ")

    @property
    def roles(self) -> tuple[str, str, str]:
        """``(anchor, positive, negative)`` batch features."""
        return self.kind, self.positive, self.negative

    @staticmethod
    def from_dict(name: str, d: Any) -> "PairTask":
        """The task declared as ``d`` (a ``metadata["pair_tasks"]`` entry)."""
        if not isinstance(d, dict):
            raise DataError(f"pair task {name!r}: the declaration must be an object, got {type(d).__name__}")
        sources = [s for s in SOURCES if s in d]
        if len(sources) != 1:
            raise DataError(f"pair task {name!r}: name exactly one side table, 'pairs' or 'groups' (got "
                            f"{sources or 'neither'})")
        unknown = set(d) - {"kind", "pairs", "groups", "columns", "symmetric", "roles"}
        if unknown:
            raise DataError(f"pair task {name!r}: unknown keys {sorted(unknown)}")
        roles = d.get("roles") or ("", "")
        if len(roles) != 2:
            raise DataError(f"pair task {name!r}: roles must be [positive, negative], got {roles}")
        return PairTask(name=name, kind=d.get("kind", ""), source=sources[0], path=str(d[sources[0]]),
                        columns=tuple(d.get("columns") or ()), symmetric=bool(d.get("symmetric", False)),
                        positive=roles[0], negative=roles[1])

    def to_dict(self) -> dict[str, Any]:
        """The ``metadata["pair_tasks"]`` entry."""
        d: dict[str, Any] = {"kind": self.kind, self.source: self.path, "columns": list(self.columns)}
        if self.symmetric:
            d["symmetric"] = True
        d["roles"] = [self.positive, self.negative]
        return d


def _builtin(side: dict[str, str]) -> dict[str, PairTask]:
    return {"social": PairTask("social", "user", "pairs", side.get("trust", "side/trust.parquet"),
                               ("user", "friend"), positive="friend", negative="neg_friend"),
            "category": PairTask("category", "item", "groups",
                                 side.get("item_category", "side/item_category.parquet"), ("item", "category"),
                                 positive="cat_item", negative="neg_cat_item")}


BUILTIN: dict[str, PairTask] = _builtin({})
"""The two tasks of the Ciao / Epinions converters, for datasets without a declaration."""


def pair_tasks(schema: Schema) -> dict[str, PairTask]:
    """The auxiliary tasks of an interaction dataset's schema, in task order.

    Raises:
        DataError: the first task is not ``rec``, a task is neither declared nor built in, or two
            tasks' roles collide.
    """
    names = schema.task_names
    if not names or names[0] != MAIN_TASK:
        raise DataError(f"interaction dataset: the first task must be {MAIN_TASK!r} (the main task), got {names}")
    declared = schema.metadata.get("pair_tasks") or {}
    if not isinstance(declared, dict):
        raise DataError("interaction dataset: metadata 'pair_tasks' must be an object of task -> declaration")
    builtin = _builtin(schema.metadata.get("side") or {})
    out: dict[str, PairTask] = {}
    for name in names[1:]:
        if name in declared:
            out[name] = PairTask.from_dict(name, declared[name])
        elif name in builtin:
            out[name] = builtin[name]
        else:
            raise DataError(f"interaction dataset: task {name!r} has no pair-task declaration (metadata "
                            f"'pair_tasks'; add one with `recsys-mtl data add-pair-task`); built in: "
                            f"{', '.join(builtin)}")
    taken = {r: MAIN_TASK for r in MAIN_ROLES}
    for t in out.values():
        for role in (t.positive, t.negative):
            if role in taken:
                raise DataError(f"interaction dataset: role {role!r} of task {t.name!r} is already a role of "
                                f"task {taken[role]!r}; name other roles in its declaration")
            taken[role] = t.name
    return out


def task_roles(schema: Schema) -> dict[str, tuple[str, str, str]]:
    """Task -> its ``(anchor, positive, negative)`` batch features (``rec``: user, item, neg_item)."""
    return {MAIN_TASK: MAIN_ROLES, **{n: t.roles for n, t in pair_tasks(schema).items()}}


def role_kinds(schema: Schema) -> dict[str, str]:
    """Batch feature -> ``"user"`` or ``"item"``, users first: ``user``, the user tasks' positives and
    negatives (task order), ``item``, ``neg_item``, the item tasks' positives and negatives."""
    tasks = pair_tasks(schema).values()
    out = {"user": "user"}
    out.update({r: "user" for t in tasks if t.kind == "user" for r in (t.positive, t.negative)})
    out.update({"item": "item", "neg_item": "item"})
    out.update({r: "item" for t in tasks if t.kind == "item" for r in (t.positive, t.negative)})
    return out


def read_side_columns(path: Path, columns: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The two integer columns of a side table, int64; :class:`DataError` naming the file otherwise."""
    if not path.is_file():
        raise DataError(f"{path}: side table missing")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; it has {table.column_names}")
    out = []
    for c in columns:
        col = table.column(c)
        if not (str(col.type).startswith("int") or str(col.type).startswith("uint")):
            raise DataError(f"{path}: column {c!r} must hold integer ids, it is {col.type}")
        if col.null_count:
            raise DataError(f"{path}: column {c!r} has {col.null_count} null value(s)")
        out.append(col.to_numpy().astype(np.int64, copy=False))
    return out[0], out[1]


@dataclasses.dataclass
class PairSide:
    """A pair task's side table in memory: each anchor's partners as a CSR (``indptr`` of
    ``num_anchors + 1``, sorted unique partners per anchor), and for groups each member's group.

    Args:
        task (PairTask): the declaration.
        indptr (np.ndarray), partners (np.ndarray): pairs: anchor -> partners; groups: group -> members.
        group (np.ndarray | None): groups: member -> its group (-1: none).
    """

    task: PairTask
    indptr: np.ndarray
    partners: np.ndarray
    group: np.ndarray | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.partners.size)

    def sample(self, anchors: np.ndarray, rng: np.random.Generator, tries: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """A partner drawn uniformly for every anchor, and whether it has one (``B`` each).

        Groups: another member of the anchor's group than the anchor (redrawn up to ``tries`` times
        when the draw is the anchor itself; rows still drawing themselves are masked).
        """
        if self.group is None:
            other, deg = _uniform(self.indptr, self.partners, anchors, rng)
            ok = deg > 0
            return np.where(ok, other, 0), ok
        g = self.group[anchors]
        has = g >= 0
        c = np.where(has, g, 0)
        other, deg = _uniform(self.indptr, self.partners, c, rng)
        for _ in range(tries):
            same = has & (deg > 1) & (other == anchors)
            if not same.any():
                break
            other[same], _ = _uniform(self.indptr, self.partners, c[same], rng)
        ok = has & (deg > 1) & (other != anchors)
        return np.where(ok, other, 0), ok


def _uniform(indptr: np.ndarray, values: np.ndarray, keys: np.ndarray, rng: np.random.Generator):
    """One value drawn uniformly from each key's list (``-1`` for an empty list), and the list sizes."""
    deg = indptr[keys + 1] - indptr[keys]
    pick = indptr[keys] + np.floor(rng.random(keys.size) * np.maximum(deg, 1)).astype(np.int64)
    out = np.where(deg > 0, values[np.minimum(pick, max(values.size - 1, 0))] if values.size else -1, -1)
    return out, deg


def csr(keys: np.ndarray, vals: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (``indptr`` of ``n + 1``, sorted unique values per key) of the pairs ``(keys, vals)``."""
    if keys.size:
        pairs = np.unique(np.stack([keys, vals], 1), axis=0)
        keys, vals = pairs[:, 0], pairs[:, 1]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, keys + 1, 1)
    return np.cumsum(indptr), vals.astype(np.int64)


def load_side(dataset_dir: Path, task: PairTask, num: int) -> PairSide:
    """Reads and checks ``task``'s side table (ids in ``[0, num)``; groups: one group per member).

    Raises:
        DataError: naming the file, the row and the bad id.
    """
    path = dataset_dir / task.path
    a, b = read_side_columns(path, task.columns)
    check = (a, b) if task.source == "pairs" else (a,)
    for col, v in zip(task.columns, check):
        bad = (v < 0) | (v >= num)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: row {k}: {col} = {v[k]} is outside the {num} {task.kind}s of the dataset "
                            f"(task {task.name!r})")
    if task.source == "pairs":
        keep = a != b  # self-pairs say nothing
        a, b = a[keep], b[keep]
        if task.symmetric:
            a, b = np.concatenate([a, b]), np.concatenate([b, a])
        indptr, partners = csr(a, b, num)
        return PairSide(task, indptr, partners)
    if (b < 0).any():
        k = int(np.flatnonzero(b < 0)[0])
        raise DataError(f"{path}: row {k}: {task.columns[1]} = {b[k]} (group ids are >= 0; leave a member out "
                        f"instead)")
    if np.unique(a).size != a.size:
        dup = int(np.flatnonzero(np.bincount(a) > 1)[0])  # the first member id with several rows
        raise DataError(f"{path}: {task.columns[0]} {dup} is in several rows (a member has one group)")
    _, b = np.unique(b, return_inverse=True)  # group labels -> 0..G-1 (any int64 labels, however sparse)
    b = b.astype(np.int64).reshape(-1)
    group = np.full(num, -1, dtype=np.int64)
    group[a] = b
    ngroups = int(b.max()) + 1 if b.size else 0
    indptr, members = csr(b, a, ngroups)
    return PairSide(task, indptr, members, group)


@dataclasses.dataclass(frozen=True)
class AddedPairTask:
    """What :func:`add_pair_task` wrote: the new schema, the task, its side table's size and how many
    anchors have a partner."""

    schema: Schema
    task: PairTask
    pairs: int
    anchors_with_partner: int
    anchors: int


def add_pair_task(dataset_dir: str | Path, name: str, kind: str, table: str | Path, columns: tuple[str, str], *,
                  groups: bool = False, symmetric: bool = False, roles: tuple[str, str] | None = None,
                  overwrite: bool = False) -> AddedPairTask:
    """Declares a pair task on an interaction dataset from a side table (co-view, co-buy, brand, …).

    The two columns of ``table`` are checked (integer ids of the dataset's ``kind`` in
    ``[0, num_{kind}s)``; groups: one group per member) and copied to ``side/{name}.parquet``; the
    task is appended to the schema's tasks and declared in ``metadata["pair_tasks"]``. Nothing is
    written when a check fails; the schema is replaced atomically, after the side table is in place.

    Args:
        dataset_dir (str | Path): an interaction dataset (``recsys-mtl data convert ciao|epinions``).
        name (str): the new task.
        kind (str): ``"user"`` or ``"item"``.
        table (str | Path): a parquet file with the two columns.
        columns (tuple[str, str]): ``(anchor, partner)``, or ``(member, group)`` with ``groups``.
        groups (bool): the table maps members to groups (partners: the other members of the group).
        symmetric (bool): pairs count both ways.
        roles (tuple[str, str] | None): the positive's and the negative's batch features (default
            ``{name}_{kind}``, ``neg_{name}_{kind}``).
        overwrite (bool): replace a task of that name (declared by this function or built in).

    Returns:
        AddedPairTask: the new schema and the side table's statistics.

    Raises:
        DataError: not an interaction dataset, the task exists, the table or its ids are wrong, or
            its roles collide with another task's.

    Example::

        >>> import tempfile, pyarrow as pa
        >>> from recsys_mtl.data.convert.trust import convert_trust
        >>> from recsys_mtl.testing import write_trust_release
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = convert_trust("ciao", list(write_trust_release(d / "raw")), d / "ds", quiet=True)
        >>> pq.write_table(pa.table({"item": [0, 1, 2], "other": [1, 2, 0]}), d / "coview.parquet")
        >>> added = add_pair_task(d / "ds", "coview", "item", d / "coview.parquet", ("item", "other"), symmetric=True)
        >>> added.schema.task_names, added.pairs
        (['rec', 'social', 'category', 'coview'], 6)
    """
    d = Path(dataset_dir)
    schema = Schema.load(d)
    if schema.metadata.get("format") != "interactions":
        raise DataError(f"{d}: not an interaction dataset (pair tasks need user-item interactions; "
                        f"see `recsys-mtl data convert ciao|epinions`)")
    if name in schema.task_names and not overwrite:
        raise DataError(f"{d}: task {name!r} exists; pass overwrite=True (--overwrite) to replace it")
    task = PairTask(name=name, kind=kind, source="groups" if groups else "pairs", path=f"side/{name}.parquet",
                    columns=tuple(columns), symmetric=symmetric, positive=(roles or ("", ""))[0],
                    negative=(roles or ("", ""))[1])
    num = schema.feature(kind).num_embeddings
    a, b = read_side_columns(Path(table), task.columns)
    declared = {**(schema.metadata.get("pair_tasks") or {}), name: task.to_dict()}
    tasks = schema.tasks if name in schema.task_names else (*schema.tasks, TaskSpec(name))
    new = dataclasses.replace(schema, tasks=tasks, metadata={**schema.metadata, "pair_tasks": declared})
    pair_tasks(new)  # every declaration still parses; roles do not collide
    side_dir = d / "side"
    side_dir.mkdir(exist_ok=True)
    tmp = side_dir / f".{name}.parquet.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(pa.table({task.columns[0]: pa.array(a, pa.int64()), task.columns[1]: pa.array(b, pa.int64())}),
                       tmp)
        side = load_side(d, dataclasses.replace(task, path=str(tmp.relative_to(d))), num)
        if side.group is None:
            with_partner = int((np.diff(side.indptr) > 0).sum())
        else:
            sizes = np.diff(side.indptr)
            g = side.group
            with_partner = int(((g >= 0) & (sizes[np.maximum(g, 0)] > 1)).sum()) if sizes.size else 0
        tmp.replace(d / task.path)
    finally:
        tmp.unlink(missing_ok=True)
    new.save(d)
    return AddedPairTask(new, task, side.num_pairs, with_partner, num)
