"""A sharded model on 2 gloo ranks matches the unsharded model step by step."""

from __future__ import annotations

import pytest
import torch

from multirank import run_ranks

SHARDING_TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
STEPS = 4
BATCH = 16


def _worker(model_name: str, sharding_types: list[str]) -> dict:
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recsys_mtl.config import ModelConfig, OptimConfig, ShardingConfig
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model
    from recsys_mtl.distributed.state import load_full_state_dict, max_abs_diff
    from recsys_mtl.models import build_model
    from recsys_mtl.testing import tiny_batch, tiny_schema
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    env = init_distributed()
    schema = tiny_schema()
    mcfg = ModelConfig(name=model_name, embedding_dim=8, expert_layer_sizes=(16, 8), tower_layer_sizes=(8,),
                       gate_layer_sizes=(8,), bottom_layer_sizes=(16,), num_experts=3, num_task_experts=2,
                       num_shared_experts=1, num_levels=2)
    optim = OptimConfig(sparse_optimizer="sgd", sparse_lr=0.5, dense_optimizer="adam", dense_lr=1e-2)
    out = {}
    for st in sharding_types:
        torch.manual_seed(0)
        ref = MTLTrainModule(build_model(schema, mcfg, "cpu"), MultiTaskLoss(schema.tasks))
        model = MTLTrainModule(build_model(schema, mcfg, "meta"), MultiTaskLoss(schema.tasks))
        dmp, plan = shard_model(model, ShardingConfig(sharding_type=st), optim, device=env.device,
                                world_size=env.world_size, local_world_size=env.world_size, batch_size=BATCH)
        load_full_state_dict(dmp, ref.state_dict())
        opt = make_optimizer(dmp, optim)
        pipeline = TrainPipelineSparseDist(dmp, opt, env.device)

        # Reference: the same global batch (both ranks' halves), loss averaged over ranks;
        # model-parallel tables step with SGD like the fused kernel, everything else with Adam.
        emb = [p for n, p in ref.named_parameters() if "ebc" in n and ".weight" in n]
        emb_ids = {id(p) for p in emb}
        dense = [p for p in ref.parameters() if id(p) not in emb_ids]
        if st == "data_parallel":
            ref_opts = [torch.optim.Adam(list(ref.parameters()), lr=optim.dense_lr)]
        else:
            ref_opts = [torch.optim.SGD(emb, lr=optim.sparse_lr), torch.optim.Adam(dense, lr=optim.dense_lr)]

        batches = [[tiny_batch(schema, BATCH, seed=100 * i + r) for r in range(env.world_size)] for i in range(STEPS)]
        sharded_losses, ref_losses = [], []
        it = iter([b[env.rank] for b in batches])
        for i in range(STEPS):
            local_loss = pipeline.progress(it)[0]
            gathered = [torch.zeros(()) for _ in range(env.world_size)]
            dist.all_gather(gathered, local_loss.reshape(()))
            sharded_losses.append(float(torch.stack(gathered).mean()))
            for o in ref_opts:
                o.zero_grad()
            loss = sum(ref(b)[0] for b in batches[i]) / env.world_size
            loss.backward()
            for o in ref_opts:
                o.step()
            ref_losses.append(float(loss))
        diffs = max_abs_diff(dmp, ref.state_dict())
        table_diffs = {k: v for k, v in diffs.items() if "ebc" in k}
        kinds = sorted({ps.sharding_type for m in plan.plan.values() for ps in m.values()})
        out[st] = {"sharded": sharded_losses, "ref": ref_losses, "max_table_diff": max(table_diffs.values()),
                   "max_dense_diff": max(v for k, v in diffs.items() if k not in table_diffs),
                   "plan_types": kinds, "num_tables": len(table_diffs)}
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("model_name", ["stem", "ple"])
def test_sharded_matches_unsharded(model_name: str) -> None:
    results = run_ranks(_worker, 2, model_name, SHARDING_TYPES)
    for rank_result in results:
        for st in SHARDING_TYPES:
            r = rank_result[st]
            assert r["plan_types"] == [st], r["plan_types"]
            assert r["num_tables"] > 0
            # Losses agree every step, and the tables and dense weights after STEPS updates.
            assert r["sharded"] == pytest.approx(r["ref"], abs=1e-5), (st, r)
            assert r["max_table_diff"] < 1e-5, (st, r)
            assert r["max_dense_diff"] < 1e-4, (st, r)
            # The steps really changed the model (the comparison is not of two untouched copies).
            assert abs(r["ref"][0] - r["ref"][-1]) > 1e-3
