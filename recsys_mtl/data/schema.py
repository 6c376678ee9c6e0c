"""Dataset schema: the contract between data files, models and checkpoints (docs/design.md §3).

A dataset is a directory::

    DATASET/
      schema.json            # this module's Schema, as JSON
      train/part-00000.parquet ...
      eval/part-00000.parquet ...

Sparse columns are ``list<int64>`` (multi-hot) or ``int64`` (single-valued), dense columns
``float32``, one label column per task (``float32``; null = sample outside the task's space).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
SPLITS = ("train", "eval")

Pooling = Literal["sum", "mean"]
TaskKind = Literal["binary", "regression"]
Side = Literal["user", "item", "context"]


class SchemaError(ValueError):
    """Raised for an invalid schema file or a dataset that does not follow its schema."""


@dataclass(frozen=True)
class SparseFeature:
    """A categorical id feature, embedded by one table of ``num_embeddings`` rows.

    Args:
        name (str): column name and KJT key.
        num_embeddings (int): table size; ids must lie in ``[0, num_embeddings)``.
        multi_hot (bool): ``list<int64>`` column (True) or ``int64`` column (False).
        pooling (str): ``"sum"`` or ``"mean"`` pooling of a multi-hot bag.
        side (str): ``"user"``, ``"item"`` or ``"context"``; used by STEM-Net's
            task-specific field selection and by gAUC.
    """

    name: str
    num_embeddings: int
    multi_hot: bool = False
    pooling: Pooling = "sum"
    side: Side = "context"


@dataclass(frozen=True)
class DenseFeature:
    """A float32 feature column."""

    name: str


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task and its label column.

    Args:
        name (str): task name and label column name.
        kind (str): ``"binary"`` (BCE on logits) or ``"regression"`` (MSE).
    """

    name: str
    kind: TaskKind = "binary"


@dataclass(frozen=True)
class Schema:
    """Features and tasks of a dataset.

    Example::

        >>> s = Schema(sparse=(SparseFeature("user", 10, side="user"),),
        ...            dense=(DenseFeature("d0"),), tasks=(TaskSpec("click"),))
        >>> Schema.from_dict(s.to_dict()) == s
        True
        >>> s.task_names
        ['click']
    """

    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...]
    tasks: tuple[TaskSpec, ...]
    user_id_feature: str | None = None
    metadata: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.sparse] + [f.name for f in self.dense] + [t.name for t in self.tasks]
        for n in names:
            if not isinstance(n, str) or not _NAME.fullmatch(n):
                # Names become module names (no "."), table names and file names (no "/").
                raise SchemaError(f"schema: name {n!r} is not allowed: feature and task names use only letters, "
                                  f"digits, '_' and '-' (1-128 characters)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SchemaError(f"schema: duplicate column names {dup}")
        if not self.tasks:
            raise SchemaError("schema: at least one task is required")
        if not self.sparse:
            raise SchemaError("schema: at least one sparse feature is required (every model embeds sparse ids)")
        for f in self.sparse:
            if f.num_embeddings <= 0:
                raise SchemaError(f"schema: sparse feature {f.name!r} has num_embeddings={f.num_embeddings}")
            if f.pooling not in ("sum", "mean"):
                raise SchemaError(f"schema: sparse feature {f.name!r} has unknown pooling {f.pooling!r}")
            if f.side not in ("user", "item", "context"):
                raise SchemaError(f"schema: sparse feature {f.name!r} has unknown side {f.side!r}")
        for t in self.tasks:
            if t.kind not in ("binary", "regression"):
                raise SchemaError(f"schema: task {t.name!r} has unknown kind {t.kind!r}")
        if self.user_id_feature is not None and self.user_id_feature not in self.sparse_names:
            raise SchemaError(f"schema: user_id_feature {self.user_id_feature!r} is not a sparse feature")

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(f"no sparse feature {name!r}; have {self.sparse_names}")

    def to_dict(self) -> dict:
        return {
            "version": SCHEMA_VERSION,
            "sparse": [asdict(f) for f in self.sparse],
            "dense": [asdict(f) for f in self.dense],
            "tasks": [asdict(t) for t in self.tasks],
            "user_id_feature": self.user_id_feature,
            "metadata": self.metadata,
        }

    @staticmethod
    def from_dict(d: dict, source: str = "<dict>") -> "Schema":
        known = {"version", "sparse", "dense", "tasks", "user_id_feature", "metadata"}
        unknown = set(d) - known
        if unknown:
            raise SchemaError(f"{source}: unknown schema keys {sorted(unknown)}")
        if d.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise SchemaError(f"{source}: schema version {d.get('version')!r} is not supported; this release reads "
                              f"version {SCHEMA_VERSION}")
        try:
            return Schema(
                sparse=tuple(SparseFeature(**f) for f in d.get("sparse", [])),
                dense=tuple(DenseFeature(**f) for f in d.get("dense", [])),
                tasks=tuple(TaskSpec(**t) for t in d["tasks"]),
                user_id_feature=d.get("user_id_feature"),
                metadata=dict(d.get("metadata") or {}),
            )
        except (TypeError, KeyError) as e:
            raise SchemaError(f"{source}: malformed schema: {e}") from e

    def fingerprint(self) -> str:
        """Hash of everything that changes the model's shape (metadata excluded)."""
        d = self.to_dict()
        d.pop("metadata")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, dataset_dir: str | Path) -> Path:
        path = Path(dataset_dir) / SCHEMA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @staticmethod
    def load(dataset_dir: str | Path) -> "Schema":
        path = Path(dataset_dir) / SCHEMA_FILE
        if not path.is_file():
            raise SchemaError(f"{path}: schema file not found (is {dataset_dir} a recsys_mtl dataset?)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: not valid JSON: {e}") from e
        return Schema.from_dict(d, source=str(path))
