"""Combined task gradients on 2 gloo ranks (fused table optimizer, TrainPipelineSparseDist) match
the unsharded model trained on the global batch: PMTRec's per-row pooling with row statistics
over the global batch, and a torchjd baseline over the global batch's rows; local statistics
differ from them (measured)."""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks

STEPS = 3
BATCH = 8


def _cat(batches):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_mtl.types import MTLBatch

    keys = batches[0].sparse.keys()
    lengths, values = [], []
    for k in keys:
        for b in batches:
            lengths.append(b.sparse[k].lengths())
        for b in batches:
            values.append(b.sparse[k].values())
    # KJT layout: all of key 0's bags (every batch), then key 1's, ...
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    return MTLBatch(dense=torch.cat([b.dense for b in batches]), sparse=kjt,
                    labels=torch.cat([b.labels for b in batches]), label_mask=torch.cat([b.label_mask for b in batches]))


def _model(schema, device):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recsys_mtl.models.shared_bottom import SharedBottom
    from recsys_mtl.train.grad_combiners import STATE_MODULE, CombinerState
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    ebc = EmbeddingBagCollection(device=torch.device(device), tables=[
        EmbeddingBagConfig(name="t_users", embedding_dim=4, num_embeddings=12, feature_names=["user"]),
        EmbeddingBagConfig(name="t_items", embedding_dim=4, num_embeddings=15, feature_names=["item", "tags"],
                           pooling=PoolingType.MEAN),
    ])
    tm = MTLTrainModule(SharedBottom(ebc, 2, schema.task_names, (8,), (4,)), MultiTaskLoss(schema.tasks))
    setattr(tm, STATE_MODULE, CombinerState(len(schema.tasks)))
    return tm


def _worker(cases: list[tuple[str, str, str]]) -> dict:
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_mtl.config import GradConfig, OptimConfig, ShardingConfig
    from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model
    from recsys_mtl.distributed.state import load_full_state_dict, max_abs_diff
    from recsys_mtl.testing import tiny_batch
    from recsys_mtl.train.grad_combiners import STATE_MODULE, make_combiner
    from recsys_mtl.train.row_grads import CombinedGradStep
    from recsys_mtl.types import MTLBatch

    env = init_distributed()
    schema = Schema(
        sparse=(SparseFeature("user", 12, side="user"), SparseFeature("item", 15, side="item"),
                SparseFeature("tags", 15, multi_hot=True, pooling="mean", side="item")),
        dense=(DenseFeature("d0"), DenseFeature("d1")),
        tasks=(TaskSpec("a"), TaskSpec("b"), TaskSpec("c", "regression")),
    )
    optim = OptimConfig(sparse_optimizer="sgd", sparse_lr=0.5, dense_optimizer="sgd", dense_lr=0.1)

    def batch(i: int, r: int):
        b = tiny_batch(schema, BATCH, seed=100 * i + r)
        kjt = b.sparse  # few distinct ids: rows repeat within and across ranks
        return MTLBatch(dense=b.dense, sparse=KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() % 6,
                                                                lengths=kjt.lengths()),
                        labels=b.labels, label_mask=b.label_mask)

    out = {}
    for combiner, sharding, stats in cases:
        cfg = GradConfig(combiner=combiner, stats=stats, tau=0.05, alpha=1.2)
        torch.manual_seed(0)
        ref = _model(schema, "cpu")
        dmp, plan = shard_model(_model(schema, "meta"), ShardingConfig(sharding_type=sharding), optim,
                                device=env.device, world_size=env.world_size, local_world_size=env.world_size,
                                batch_size=BATCH)
        load_full_state_dict(dmp, ref.state_dict())
        opt = make_optimizer(dmp, optim)
        tm = dmp.module
        tm.grad_step = CombinedGradStep(tm, make_combiner(cfg, schema.task_names, 3, getattr(tm, STATE_MODULE)),
                                        schema, stats)
        pipeline = TrainPipelineSparseDist(dmp, opt, env.device)
        ref.grad_step = CombinedGradStep(ref, make_combiner(GradConfig(combiner=combiner, tau=0.05, alpha=1.2),
                                                            schema.task_names, 3, getattr(ref, STATE_MODULE)), schema,
                                        distributed=False)
        table_lr = 0.1 if sharding == "data_parallel" else 0.5  # data-parallel tables: the dense optimizer
        ref_opt = torch.optim.SGD([{"params": [p for n, p in ref.named_parameters() if "ebc" in n], "lr": table_lr},
                                   {"params": [p for n, p in ref.named_parameters() if "ebc" not in n], "lr": 0.1}])
        batches = [[batch(i, r) for r in range(env.world_size)] for i in range(STEPS)]
        it = iter([b[env.rank] for b in batches])
        losses = []
        ref.train()
        for i in range(STEPS):
            local = pipeline.progress(it)[0]
            gathered = [torch.zeros(()) for _ in range(env.world_size)]
            dist.all_gather(gathered, local.reshape(()))
            ref_opt.zero_grad()
            surrogate, (ref_loss, *_) = ref(_cat(batches[i]))
            surrogate.backward()
            ref_opt.step()
            losses.append((float(torch.stack(gathered).mean()), float(ref_loss)))
        diffs = max_abs_diff(dmp, ref.state_dict())
        tables = {k: v for k, v in diffs.items() if "ebc" in k}
        torch.manual_seed(0)
        moved = float((ref.model.input.ebc.embedding_bags["t_items"].weight.detach()
                       - _model(schema, "cpu").model.input.ebc.embedding_bags["t_items"].weight).abs().max())
        out[f"{combiner}/{sharding}/{stats}"] = {
            "losses": losses, "table_diff": max(tables.values()), "dense_diff": max(
                v for k, v in diffs.items() if k not in tables and "grad_combiner_state" not in k),
            "types": sorted({ps.sharding_type for m in plan.plan.values() for ps in m.values()}), "moved": moved}
    return out


CASES = [("pmtrec", "table_wise", "global"), ("pmtrec", "row_wise", "global"), ("pmtrec", "data_parallel", "global"),
         ("pcgrad", "row_wise", "global"), ("pmtrec", "row_wise", "local")]


@pytest.mark.multirank
def test_combined_gradients_sharded_match_the_global_batch() -> None:
    results = run_ranks(_worker, 2, CASES)
    for res in results:
        for combiner, sharding, stats in CASES:
            r = res[f"{combiner}/{sharding}/{stats}"]
            assert r["types"] == [sharding]
            assert r["moved"] > 1e-4  # the tables really trained
            if stats == "global":
                for sharded, ref in r["losses"]:
                    assert sharded == pytest.approx(ref, abs=1e-5), r
                assert r["table_diff"] < 1e-5, (combiner, sharding, r)
                assert r["dense_diff"] < 1e-5, (combiner, sharding, r)
    # Each rank's own row statistics are not the global batch's combination (every rank holds its
    # own shard of the rows: the largest difference over ranks).
    local = max(res["pmtrec/row_wise/local"]["table_diff"] for res in results)
    assert local > 1e-4, local
