"""Sharding plans on many small tables: the default plan against every single sharding type.

The workload has the shape of Census-Income (KDD) as ``recsys-mtl data convert census-kdd`` writes
it: 32 single-valued categorical features whose vocabularies are the columns' distinct values plus
the rare/unknown id (3 to 54 rows), 7 dense features, 2 binary tasks; PLE with the library's
default sizes, batch 512 per rank. Every contender (``default`` = no ``--sharding``, then each
sharding type for all tables) is sharded over the same local gloo ranks, in one launch, and trains
on the same synthetic batches (Zipf ids per table, one batch stream per rank) through
``TrainPipelineSparseDist``. Timed steps run round-robin in chunks between barriers, so load on a
shared machine hits every contender alike; throughput is ranks x batch over the median step.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
import uuid
from collections import Counter

from recsys_mtl.bench.report import emit
from recsys_mtl.config import ModelConfig, OptimConfig, ShardingConfig
from recsys_mtl.data.schema import DenseFeature, Schema, SparseFeature, TaskSpec

# Distinct values per categorical column of the Census-Income (KDD) data; the converter adds id 0
# (rare / unknown). ``marital_stat`` is the second task's source, so not a feature.
CENSUS_CARDINALITIES = {
    "class_of_worker": 9, "detailed_industry_recode": 52, "detailed_occupation_recode": 47, "education": 17,
    "enroll_in_edu_inst_last_wk": 3, "major_industry_code": 24, "major_occupation_code": 15, "race": 5,
    "hispanic_origin": 10, "sex": 2, "member_of_a_labor_union": 3, "reason_for_unemployment": 6,
    "full_or_part_time_employment_stat": 8, "tax_filer_stat": 6, "region_of_previous_residence": 6,
    "state_of_previous_residence": 51, "detailed_household_and_family_stat": 38,
    "detailed_household_summary_in_household": 8, "migration_code_change_in_msa": 10,
    "migration_code_change_in_reg": 9, "migration_code_move_within_reg": 10, "live_in_this_house_1_year_ago": 3,
    "migration_prev_res_in_sunbelt": 4, "family_members_under_18": 5, "country_of_birth_father": 43,
    "country_of_birth_mother": 43, "country_of_birth_self": 43, "citizenship": 5,
    "own_business_or_self_employed": 3, "fill_inc_questionnaire_for_veterans_admin": 3, "veterans_benefits": 3,
    "year": 2,
}  # fmt: skip
CENSUS_DENSE = ("age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
                "num_persons_worked_for_employer", "weeks_worked_in_year")
CONTENDERS: tuple[str, ...] = ("default", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
BATCH_SIZE = 512
WORLD_SIZE = 2


WIDENED = ("detailed_industry_recode", "detailed_occupation_recode", "country_of_birth_self")


def census_schema(wide_rows: int | None = None) -> Schema:
    """The Census-Income (KDD) dataset's schema: 32 small tables, 7 dense features, income + marital.

    ``wide_rows`` gives the three :data:`WIDENED` tables that many rows instead (to find where
    sharding a table starts to pay off).
    """
    assert len(CENSUS_CARDINALITIES) == 32
    rows = {n: c + 1 for n, c in CENSUS_CARDINALITIES.items()}
    if wide_rows is not None:
        rows.update({n: wide_rows for n in WIDENED})
    return Schema(
        sparse=tuple(SparseFeature(n, r, pooling="mean", side="user") for n, r in rows.items()),
        dense=tuple(DenseFeature(n) for n in CENSUS_DENSE),
        tasks=(TaskSpec("income"), TaskSpec("marital")),
    )


def _sharding(contender: str) -> ShardingConfig:
    return ShardingConfig() if contender == "default" else ShardingConfig(sharding_type=contender)


def _rank_main(payload: dict) -> dict:
    """One rank: builds every contender, warms it up, then times them round-robin."""
    import torch
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recsys_mtl.bench.workloads import Workload, make_batches
    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.distributed.optim import make_optimizer
    from recsys_mtl.distributed.sharding import shard_model
    from recsys_mtl.models import build_model
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.task import MTLTrainModule

    env = init_distributed()
    torch.set_num_threads(payload["threads"])
    schema, model_cfg, optim = census_schema(payload["wide_rows"]), ModelConfig(name="ple"), OptimConfig()
    bsz = payload["batch_size"]
    batches = make_batches(Workload("census", schema, model_cfg, bsz), num_batches=16, seed=env.rank)
    built, plans = {}, {}
    for name in payload["contenders"]:
        torch.manual_seed(0)
        model = MTLTrainModule(build_model(schema, model_cfg, "meta"), MultiTaskLoss(schema.tasks))
        dmp, plan = shard_model(model, _sharding(name), optim, device=env.device, world_size=env.world_size,
                                local_world_size=env.local_world_size, batch_size=bsz)
        pipeline = TrainPipelineSparseDist(dmp, make_optimizer(dmp, optim), env.device)
        it = itertools.cycle(batches)
        for _ in range(payload["warmup"]):
            pipeline.progress(it)
        built[name] = (pipeline, it, [])
        plans[name] = dict(Counter(ps.sharding_type for m in plan.plan.values() for ps in m.values()))
    chunk, done = payload["chunk"], 0
    while done < payload["steps"]:
        n = min(chunk, payload["steps"] - done)
        for pipeline, it, times in built.values():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                pipeline.progress(it)
            dist.barrier()  # a step is done when every rank is done with it
            times.extend([(time.perf_counter() - t0) / n] * n)
        done += n
    return {"step_s": {k: v[2] for k, v in built.items()}, "plans": plans}


def run_plans_bench(
    *,
    steps: int = 40,
    warmup: int = 5,
    batch_size: int = BATCH_SIZE,
    world_size: int = WORLD_SIZE,
    contenders: tuple[str, ...] = CONTENDERS,
    wide_rows: int | None = None,
    output: str | None = None,
    print_table: bool = True,
) -> dict:
    """Trains every contender on ``world_size`` local gloo ranks (one launch) and returns the JSON.

    Each rank gets ``cpu_count // world_size`` OpenMP threads (at least 1), as the trainer's
    launcher does. ``wide_rows``: see :func:`census_schema`.

    Returns:
        dict: ``{"samples_per_s": {contender: float}, "ratios": {"default/x": float}, "plans":
        {contender: {sharding_type: tables}}, ...}``.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if batch_size < 1 or world_size < 1 or (wide_rows is not None and wide_rows < 1):
        raise ValueError(f"need batch_size, world_size and wide_rows >= 1, got {batch_size}, {world_size}, {wide_rows}")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise ValueError(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from recsys_mtl.bench import run_metadata
    from recsys_mtl.distributed.env import free_port

    threads = max(1, (os.cpu_count() or 1) // world_size)
    payload = {"steps": steps, "warmup": warmup, "batch_size": batch_size, "contenders": list(contenders),
               "threads": threads, "chunk": 5, "wide_rows": wide_rows}
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=f"bench-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", monitor_interval=0.5)
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    load_before = os.getloadavg()
    try:
        per_rank = elastic_launch(launch, _rank_main)(payload)
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    load_after = os.getloadavg()
    r0 = per_rank[0]
    median = {k: statistics.median(v) for k, v in r0["step_s"].items()}
    sps = {k: world_size * batch_size / v for k, v in median.items()}
    result = {
        "workload": "census_plans",
        "model": "ple",
        "tables": {"count": len(CENSUS_CARDINALITIES),
                   "rows": sorted(f.num_embeddings for f in census_schema(wide_rows).sparse)},
        "wide_rows": wide_rows,
        "batch_size": batch_size,
        "world_size": world_size,
        "backend": "gloo",
        "threads_per_rank": threads,
        "samples_per_s": sps,
        "ms_per_step": {k: 1e3 * v for k, v in median.items()},
        "ratios": {f"default/{k}": sps["default"] / v for k, v in sps.items() if k != "default"}
        if "default" in sps else {},
        "plans": r0["plans"],
        "steps": steps,
        "warmup": warmup,
        **run_metadata(load_before, load_after),
    }
    return emit(result, output, format_plans_table, print_table)


def format_plans_table(result: dict) -> str:
    """Readable summary: samples/s, ms/step, default ÷ contender and each contender's plan."""
    sps, ms = result["samples_per_s"], result["ms_per_step"]
    lines = [
        f"sharding plans on {result['tables']['count']} Census-Income tables"
        f"{'' if result.get('wide_rows') is None else ' (3 of ' + format(result['wide_rows'], ',') + ' rows)'}, "
        f"{result['model']}, "
        f"{result['world_size']} {result['backend']} ranks x {result['threads_per_rank']} thread(s), "
        f"batch {result['batch_size']} per rank",
        f"{'contender':<16}{'samples/s':>11}{'ms/step':>9}{'default/x':>11}  plan",
    ]
    for name, v in sps.items():
        ratio = sps["default"] / v if "default" in sps else float("nan")
        plan = ", ".join(f"{n} {t}" for t, n in sorted(result["plans"][name].items()))
        lines.append(f"{name:<16}{v:>11.0f}{ms[name]:>9.1f}{ratio:>10.2f}x  {plan}")
    return "\n".join(lines)
