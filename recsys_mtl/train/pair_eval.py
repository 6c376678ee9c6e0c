"""Full-ranking evaluation of pair models (``mf``, ``lightgcn``, ``ngcf``) on an interaction dataset.

Every rank looks up every item's representation (chunks of item ids through the sharded
tables: the same number of lookups on every rank, they are collectives), then ranks all items
for its share of the evaluated users (:func:`recsys_mtl.ranking.full_ranking_eval`): Recall,
NDCG and HitRate at 5, 10, 20 and 40 over the items the user has not interacted with — the
train items are excluded, and on the test split also the validation items (known interactions,
neither relevant nor ranked). The metrics are averaged over users with at least one held-out
item and summed across ranks. A graph encoder's representations are looked up as the bags of its
training schema (the evaluated ids' rows of the train graph's propagation matrix), through the
model's ``role_kjt``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.interactions import GraphBags, InteractionData, graph_bags
from recsys_mtl.data.schema import Schema
from recsys_mtl.ranking import InteractionSets, full_ranking_eval

__all__ = ["evaluate_pairs", "role_lookup"]

ITEM_CHUNK = 8192


def role_lookup(model: nn.Module, keys: list[str], role: str, ids: torch.Tensor, stride: int,
                graph: GraphBags | None = None) -> torch.Tensor:
    """Representations of ``ids`` in ``role`` (``len(ids) x D``) through the model's tables: one KJT
    with every key of the batch layout, ``ids`` as one-id bags of ``role`` padded to ``stride``; with
    ``graph`` (a graph encoder) the KJT of ``model.role_kjt`` (the ids' weighted bags)."""
    n = ids.numel()
    if graph is not None:
        return model.embed(model.role_kjt(keys, role, ids, stride, graph))[role][:n]
    device = ids.device
    values = torch.zeros(stride, dtype=torch.long, device=device)
    values[:n] = ids
    lengths = torch.zeros(len(keys), stride, dtype=torch.int32, device=device)
    lengths[keys.index(role)] = 1
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.reshape(-1))
    return model.embed(kjt)[role][:n]


@torch.no_grad()
def evaluate_pairs(module: nn.Module, dataset_dir: str, schema: Schema, *, split: str = "eval", rank: int = 0,
                   world_size: int = 1, group=None, device: torch.device | str = "cpu",
                   batch_users: int = 1024) -> dict[str, dict[str, float]]:
    """``{"rec": {"recall@20": ..., "ndcg@20": ..., "hit@20": ..., ..., "users": n}}`` for ``split``.

    Args:
        module (nn.Module): the pair model (``embed`` and ``score``; a graph encoder also
            ``role_kjt``), its tables possibly sharded.
        dataset_dir (str): the interaction dataset.
        schema (Schema): its training schema (the batch's keys).
        split (str): ``eval`` (validation) or ``test``.
        rank, world_size, group: this rank, the ranks, the gloo group of the metric sums.
        device: where the model is.
        batch_users (int): users ranked per step.
    """
    data = InteractionData.load(dataset_dir)
    keys = schema.sparse_names
    graph = graph_bags(dataset_dir, schema)  # None: MF's one-id bags
    was_training = module.training
    module.eval()
    try:
        ids = torch.arange(data.num_items, device=device)
        items = torch.cat([role_lookup(module, keys, "item", ids[s:s + ITEM_CHUNK], ITEM_CHUNK, graph)
                           for s in range(0, data.num_items, ITEM_CHUNK)])  # I x D

        def score(users: torch.Tensor) -> torch.Tensor:
            u = role_lookup(module, keys, "user", users.to(device), batch_users, graph)  # U_b x D
            return module.score(u, items).float().cpu()  # U_b x I

        held_out = InteractionSets.from_pairs(*data.splits[split], data.num_users)
        known = [data.splits["train"]] + ([data.splits["eval"]] if split == "test" else [])
        exclude = InteractionSets.from_pairs(np.concatenate([u for u, _ in known]),
                                             np.concatenate([i for _, i in known]), data.num_users)
        metrics = full_ranking_eval(score, held_out, exclude, num_items=data.num_items, batch_users=batch_users,
                                    rank=rank, world_size=world_size, group=group)
    finally:
        module.train(was_training)
    return {schema.task_names[0]: metrics}
