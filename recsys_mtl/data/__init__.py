"""Data path: schema, synthetic generators and the streaming parquet reader (docs/design.md §3).

The reader names (which import torch/torchrec) load lazily, so ``recsys_mtl.data.generate_recsys``
stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recsys_mtl.data.schema import (
    SCHEMA_FILE,
    SPLITS,
    DenseFeature,
    Schema,
    SchemaError,
    SparseFeature,
    TaskSpec,
)
from recsys_mtl.data.synth import DEFAULT_POSITIVE_RATES, SAMPLE_SPACES, TASK_NAMES, generate_mmoe, generate_recsys

if TYPE_CHECKING:
    from recsys_mtl.data.reader import (
        DataError,
        ParquetMTLDataset,
        arrow_to_batch,
        count_rows,
        list_parquet_files,
        make_dataloader,
        validate_arrow,
    )

_READER_NAMES = (
    "DataError",
    "ParquetMTLDataset",
    "arrow_to_batch",
    "count_rows",
    "list_parquet_files",
    "make_dataloader",
    "validate_arrow",
)

__all__ = [
    "SCHEMA_FILE",
    "SPLITS",
    "DenseFeature",
    "Schema",
    "SchemaError",
    "SparseFeature",
    "TaskSpec",
    "TASK_NAMES",
    "DEFAULT_POSITIVE_RATES",
    "SAMPLE_SPACES",
    "generate_recsys",
    "generate_mmoe",
    *_READER_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _READER_NAMES:
        from recsys_mtl.data import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
