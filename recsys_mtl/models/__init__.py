"""The model zoo. Each model takes built EBC(s) and returns ``dict[task, logits]``.

:func:`build_model` is the one place that turns a :class:`~recsys_mtl.config.ModelConfig` and a
schema into tables + a model (on ``meta`` for sharding); library users can instead construct the
classes directly with their own ``EmbeddingBagCollection``s.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_mtl.config import MODEL_NAMES, ModelConfig
from recsys_mtl.data.schema import Schema
from recsys_mtl.models.aitm import AITM
from recsys_mtl.models.cross_stitch import CrossStitch
from recsys_mtl.models.csrec import CSRec, MLCSRec
from recsys_mtl.models.esmm import ESMM
from recsys_mtl.models.lightgcn import LightGCN
from recsys_mtl.models.mf import MatrixFactorization, pair_tables
from recsys_mtl.models.ml_mmoe import MLMMoE
from recsys_mtl.models.mmoe import MMoE, OMoE
from recsys_mtl.models.multi_embedding import MEMMoE, MEPLE
from recsys_mtl.models.ngcf import NGCF
from recsys_mtl.models.ple import CGC, PLE
from recsys_mtl.models.ple_sharing import AsymmetricSharing, CustomizedSharing
from recsys_mtl.models.shared_bottom import SharedBottom, SingleTask
from recsys_mtl.models.sluice import Sluice
from recsys_mtl.models.sparse_sharing import SparseSharing
from recsys_mtl.models.stem import STEMNet
from recsys_mtl.modules.embeddings import build_ebc

__all__ = ["MMoE", "OMoE", "CGC", "PLE", "SharedBottom", "SingleTask", "STEMNet", "MODELS", "build_model",
           "stem_specific_features", "MLMMoE", "ESMM", "AITM", "MEMMoE", "MEPLE", "AsymmetricSharing",
           "CustomizedSharing", "CrossStitch", "Sluice", "SparseSharing", "CSRec", "MLCSRec", "MatrixFactorization",
           "LightGCN", "NGCF"]


def stem_specific_features(schema: Schema, spec: str) -> list[str]:
    """Features that get task-specific tables: ``all``, ``user``, ``item``, ``none`` or a comma list."""
    if spec == "all":
        return schema.sparse_names
    if spec == "none":
        return []
    if spec in ("user", "item"):
        return [f.name for f in schema.sparse if f.side == spec]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    missing = [n for n in names if n not in schema.sparse_names]
    if missing:
        raise ValueError(f"stem_specific_fields names unknown features {missing}; have {schema.sparse_names}")
    return names


def _single_task(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    ebcs = {t: build_ebc(s, c.embedding_dim, prefix=f"task_{t}", device=dev) for t in s.task_names}
    return SingleTask(ebcs, len(s.dense), c.bottom_layer_sizes, c.tower_layer_sizes)


def _shared_bottom(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return SharedBottom(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names,
                        c.bottom_layer_sizes, c.tower_layer_sizes)


def _mmoe(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return MMoE(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names, c.num_experts,
                c.expert_layer_sizes, c.tower_layer_sizes)


def _omoe(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return OMoE(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names, c.num_experts,
                c.expert_layer_sizes, c.tower_layer_sizes)


def _ple(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return PLE(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names, c.num_levels,
               c.num_task_experts, c.num_shared_experts, c.expert_layer_sizes, c.tower_layer_sizes)


def _cgc(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return CGC(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names,
               c.num_task_experts, c.num_shared_experts, c.expert_layer_sizes, c.tower_layer_sizes)


def _stem(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    specific = stem_specific_features(s, c.stem_specific_fields)
    shared = build_ebc(s, c.embedding_dim, prefix="shared", device=dev)
    # No task-specific fields ("none"): no task tables; task experts read the shared embeddings.
    tasks = (
        {t: build_ebc(s, c.embedding_dim, features=specific, prefix=f"task_{t}", device=dev) for t in s.task_names}
        if specific else {}
    )
    return STEMNet(shared, tasks, len(s.dense), c.num_shared_experts, c.num_task_experts, c.expert_layer_sizes,
                   c.gate_layer_sizes, c.tower_layer_sizes, gate_input=c.stem_gate_input,
                   stop_gradient=c.stem_stop_gradient, tasks=s.task_names)


def _ml_mmoe(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return MLMMoE(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names, c.num_levels,
                  c.num_experts, c.expert_layer_sizes, c.tower_layer_sizes)


def _esmm(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    # Each funnel step's network: the bottom widths, then the tower widths, then one logit.
    return ESMM(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names,
                (*c.bottom_layer_sizes, *c.tower_layer_sizes))


def _aitm(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return AITM(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names, c.bottom_layer_sizes,
                c.tower_layer_sizes)


def _me_mmoe(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    ebcs = [build_ebc(s, c.embedding_dim, prefix=f"expert_{i}", device=dev) for i in range(c.num_experts)]
    return MEMMoE(ebcs, len(s.dense), s.task_names, c.expert_layer_sizes, c.tower_layer_sizes)


def _me_ple(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    specific = stem_specific_features(s, c.stem_specific_fields)
    if not specific:
        raise ValueError("me_ple needs task-specific fields (with stem_specific_fields='none' it is PLE: use ple)")
    shared = build_ebc(s, c.embedding_dim, prefix="shared", device=dev)
    tasks = {t: build_ebc(s, c.embedding_dim, features=specific, prefix=f"task_{t}", device=dev) for t in s.task_names}
    return MEPLE(shared, tasks, len(s.dense), c.num_levels, c.num_task_experts, c.num_shared_experts,
                 c.expert_layer_sizes, c.tower_layer_sizes)


def _asymmetric_sharing(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return AsymmetricSharing(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names,
                             c.bottom_layer_sizes, c.tower_layer_sizes, fusion=c.asymmetric_fusion)


def _customized_sharing(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return CustomizedSharing(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names,
                             c.bottom_layer_sizes, c.tower_layer_sizes)


def _cross_stitch(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return CrossStitch(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names,
                       c.bottom_layer_sizes, c.tower_layer_sizes, self_weight=c.cross_stitch_self_weight)


def _sluice(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return Sluice(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names, c.bottom_layer_sizes,
                  c.tower_layer_sizes, num_subspaces=c.sluice_num_subspaces, self_weight=c.cross_stitch_self_weight)


def _sparse_sharing(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return SparseSharing(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names,
                         c.bottom_layer_sizes, c.tower_layer_sizes)


def _csrec(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return CSRec(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names, c.bottom_layer_sizes,
                 c.tower_layer_sizes)


def _ml_csrec(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return MLCSRec(build_ebc(s, c.embedding_dim, device=dev), len(s.dense), s.task_names, c.num_levels,
                   c.bottom_layer_sizes, c.tower_layer_sizes)


def _mf(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    tables = _pair_tables(s)
    sizes = {"user_emb": s.feature("user").num_embeddings, "item_emb": s.feature("item").num_embeddings}
    return MatrixFactorization(pair_tables(tables, sizes, c.embedding_dim, device=dev), s.task_names,
                               s.metadata.get("task_roles"))


def _graph_tables(s: Schema, c: ModelConfig, dev: torch.device) -> EmbeddingBagCollection:
    """MF's tables (:func:`pair_tables`: Xavier uniform) over the graph encoder's bag features,
    weighted (per-id weights in the KJT, SUM pooling)."""
    graph = s.metadata.get("graph") or {}
    if graph.get("encoder") != c.name:
        raise ValueError(f"{c.name} needs the training schema of its weighted bags "
                         f"(load_training_schema(dataset, model=config)); this schema is built for "
                         f"{graph.get('encoder') or 'single-valued roles (mf)'}")
    tables = _pair_tables(s)
    sizes = {t: s.feature(names[0]).num_embeddings for t, names in tables.items() if names}  # rows per table
    configs = pair_tables(tables, sizes, c.embedding_dim, device=torch.device("meta")).embedding_bag_configs()
    return EmbeddingBagCollection(tables=configs, is_weighted=True, device=dev)


def _lightgcn(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return LightGCN(_graph_tables(s, c, dev), s.task_names, s.metadata.get("task_roles"))


def _ngcf(s: Schema, c: ModelConfig, dev: torch.device) -> nn.Module:
    return NGCF(_graph_tables(s, c, dev), s.task_names, c.embedding_dim, s.metadata.get("task_roles"))


def _pair_tables(s: Schema) -> dict[str, list[str]]:
    tables = s.metadata.get("tables")
    if not tables:
        raise ValueError("mf trains on interaction datasets (recsys-mtl data convert ciao|epinions): this dataset's "
                         "schema has no user/item role tables")
    return tables


MODELS: dict[str, Callable[[Schema, ModelConfig, torch.device], nn.Module]] = {
    "single_task": _single_task,
    "shared_bottom": _shared_bottom,
    "omoe": _omoe,
    "mmoe": _mmoe,
    "cgc": _cgc,
    "ple": _ple,
    "stem": _stem,
    "ml_mmoe": _ml_mmoe,
    "esmm": _esmm,
    "aitm": _aitm,
    "me_mmoe": _me_mmoe,
    "me_ple": _me_ple,
    "asymmetric_sharing": _asymmetric_sharing,
    "customized_sharing": _customized_sharing,
    "cross_stitch": _cross_stitch,
    "sluice": _sluice,
    "sparse_sharing": _sparse_sharing,
    "csrec": _csrec,
    "ml_csrec": _ml_csrec,
    "mf": _mf,
    "lightgcn": _lightgcn,
    "ngcf": _ngcf,
}


if tuple(MODELS) != MODEL_NAMES:  # config.MODEL_NAMES is the one list; the registry must match it
    raise ImportError(f"models.MODELS {tuple(MODELS)} differs from config.MODEL_NAMES {MODEL_NAMES}")


def build_model(schema: Schema, config: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Tables + model for ``config.name``; pass ``device="meta"`` to shard it afterwards.

    Example::

        >>> from recsys_mtl.testing import tiny_schema
        >>> m = build_model(tiny_schema(), ModelConfig(name="ple", embedding_dim=4,
        ...                 expert_layer_sizes=(8,), tower_layer_sizes=(4,)))
        >>> type(m).__name__
        'PLE'
    """
    if config.name not in MODELS:
        raise ValueError(f"unknown model {config.name!r}; choose from {', '.join(MODELS)}")
    dev = torch.device(device)
    with torch.device(dev):
        return MODELS[config.name](schema, config, dev)
