"""``recsys-mtl bench row-grad-pool``: PMTRec's per-row gradient pooling, ours against Algorithm 1
as written, and PMTRec's training step against an EW step, in one run.

Setting (PMTRec §4.1, Epinions scale): MF encoder, ``user_emb`` 22,167 x 32 and ``item_emb``
296,278 x 32 tables, tasks ``rec`` (BPR), ``social``, ``category`` over the seven user/item roles
of :mod:`recsys_mtl.data.interactions` (single-valued, tables shared by the roles), batch 2048 of
random ids, fp32, one process on :data:`THREADS` threads.

Contenders, each in its own process (so its peak RSS is its own), the same batches:

* ``ew``: the summed loss, one backward into the fused row-wise Adagrad tables
  (``DistributedModelParallel`` on one gloo rank).
* ``pmtrec``: :class:`~recsys_mtl.train.row_grads.CombinedGradStep` with PMTRec — per-task
  gradients at the lookup output, the fused :func:`~recsys_mtl.ops.row_grad_pool.row_grad_pool`
  over the batch's rows, one backward into the same fused tables.
* ``reference``: Algorithm 1 as written, on the same MF with plain ``nn.Parameter`` tables: one
  autograd pass per task to the whole tables (``T x rows x D`` gradients), norms, focusing,
  softmax and the weighted sum over every row (lines 3–12), then ``E ← E − lr · ∇E`` (line 13).

``pooling`` times the pooling alone on the forward graph of a batch: ours (``T`` passes to the
lookup output + the op) against the reference (``T`` passes to the tables + lines 9–12 over every
row). ``speedup.op`` = reference / ours pooling, ``speedup.step`` = reference / ours step,
``step_vs_ew`` = PMTRec step / EW step (targets: ≥ 3 and ≤ 1.5).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time

import torch

from recsys_mtl.bench.report import emit

__all__ = ["run_row_grad_pool_bench", "DEFAULT_OUTPUT"]

THREADS = 2
DEFAULT_OUTPUT = "benchmarks/results/row_grad_pool.json"
USERS, ITEMS, DIM, BATCH = 22_167, 296_278, 32, 2048
TASKS = ("rec", "social", "category")
TARGETS = {"op": 3.0, "step_vs_ew": 1.5}


def _schema(users: int, items: int):
    from recsys_mtl.data.interactions import training_schema
    from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec

    base = Schema(sparse=(SparseFeature("user", users, side="user"), SparseFeature("item", items, side="item")),
                  dense=(), tasks=tuple(TaskSpec(t) for t in TASKS), user_id_feature="user",
                  metadata={"format": "interactions"})
    return training_schema(base)


def _batches(schema, n: int, batch: int, seed: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_mtl.types import MTLBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = [torch.randint(0, f.num_embeddings, (batch,), generator=g) for f in schema.sparse]
        kjt = KeyedJaggedTensor(keys=schema.sparse_names, values=torch.cat(ids),
                                lengths=torch.ones(batch * len(ids), dtype=torch.int32))
        out.append(MTLBatch(dense=torch.zeros(batch, 0), sparse=kjt, labels=torch.ones(batch, len(TASKS)),
                            label_mask=torch.ones(batch, len(TASKS), dtype=torch.bool)))
    return out


def _contender(name: str, users: int, items: int, batch: int, steps: int, warmup: int, queue) -> None:
    torch.set_num_threads(THREADS)
    from recsys_mtl.config import GradConfig, ModelConfig, OptimConfig, ShardingConfig
    from recsys_mtl.models import build_model
    from recsys_mtl.train.grad_combiners import CombinerState, make_combiner, pmtrec_focus
    from recsys_mtl.train.losses import MultiTaskLoss
    from recsys_mtl.train.row_grads import CombinedGradStep
    from recsys_mtl.train.task import MTLTrainModule

    schema = _schema(users, items)
    batches = _batches(schema, warmup + steps, batch, seed=1)
    mcfg = ModelConfig(name="mf", embedding_dim=DIM)
    gcfg = GradConfig(combiner="pmtrec", tau=1e-3, alpha=1.1)
    times, pool = [], []
    if name == "reference":
        torch.manual_seed(0)
        tm = MTLTrainModule(build_model(schema, mcfg), MultiTaskLoss(schema.tasks))
        tables = [tm.model.ebc.embedding_bags[t].weight for t in ("user_emb", "item_emb")]
        focus = pmtrec_focus(len(TASKS), 0, gcfg.alpha, 0)

        def reference_pool(b):
            logits = tm.model(b.dense, b.sparse)
            losses = [tm.loss.task_loss(k, logits[t], b.labels, b.label_mask) for k, t in enumerate(TASKS)]
            grads = [torch.autograd.grad(lt, tables, retain_graph=k < len(losses) - 1) for k, lt in enumerate(losses)]
            out = []
            for j in range(len(tables)):  # Alg. 1 lines 8-12 over every row of the table
                g = torch.stack([gr[j] for gr in grads])  # T x rows x D
                w = torch.softmax(g.norm(dim=-1) * focus[:, None] / gcfg.tau, dim=0)  # T x rows
                out.append((w[..., None] * g).sum(0))  # rows x D
            return out

        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            grads = reference_pool(b)
            t1 = time.perf_counter()
            with torch.no_grad():
                for p, g in zip(tables, grads):  # line 13
                    p.sub_(0.05 * g)
            t2 = time.perf_counter()
            if i >= warmup:
                times.append(t2 - t0)
                pool.append(t1 - t0)
    else:
        from recsys_mtl.distributed.env import free_port, init_distributed
        from recsys_mtl.distributed.optim import make_optimizer
        from recsys_mtl.distributed.sharding import shard_model

        # One rank of its own, whatever launch environment the parent process carries.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env = init_distributed()
        torch.manual_seed(0)
        optim = OptimConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05)
        tm = MTLTrainModule(build_model(schema, mcfg, "meta"), MultiTaskLoss(schema.tasks))
        if name == "pmtrec":
            from recsys_mtl.train.grad_combiners import STATE_MODULE

            setattr(tm, STATE_MODULE, CombinerState(len(TASKS)))
        dmp, _ = shard_model(tm, ShardingConfig(sharding_type="table_wise"), optim, device=env.device,
                             world_size=1, local_world_size=1, batch_size=batch)
        opt = make_optimizer(dmp, optim)
        step_obj = None
        if name == "pmtrec":
            tmod = dmp.module
            from recsys_mtl.train.grad_combiners import STATE_MODULE

            step_obj = CombinedGradStep(tmod, make_combiner(gcfg, list(TASKS), 0, getattr(tmod, STATE_MODULE)), schema)
            tmod.grad_step = step_obj
        dmp.train()
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss, _ = dmp(b)
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            if i >= warmup:
                times.append(t1 - t0)
        if step_obj is not None:  # the pooling alone: T passes to the lookup output + the op
            for b in batches[:max(3, steps // 2)]:
                with step_obj.capture.capturing() as recs:
                    logits = dmp.module.model(b.dense, b.sparse)
                t0 = time.perf_counter()
                losses = [dmp.module.loss.task_loss(k, logits[t], b.labels, b.label_mask) for k, t in enumerate(TASKS)]
                leaves = [r.leaf for r in recs]
                lg = [torch.autograd.grad(lt, leaves, retain_graph=k < 2) for k, lt in enumerate(losses)]
                step_obj._rows(list(recs), [[g[i] for g in lg] for i in range(len(leaves))])
                pool.append(time.perf_counter() - t0)
        import torch.distributed as dist

        dist.destroy_process_group()
    queue.put({"name": name, "ms_per_step": 1e3 * statistics.median(times),
               "pooling_ms": 1e3 * statistics.median(pool) if pool else None,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _result(q, p, name: str, timeout_s: float = 1800.0) -> dict:
    """The contender's result, or a RuntimeError as soon as its process has died without one."""
    import queue as queue_mod

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return q.get(timeout=2.0)
        except queue_mod.Empty:
            if not p.is_alive():
                raise RuntimeError(f"bench row-grad-pool: contender {name!r} died (exit code {p.exitcode}) "
                                   f"without a result") from None
    p.kill()
    raise RuntimeError(f"bench row-grad-pool: contender {name!r} gave no result in {timeout_s:.0f} s")


def run_row_grad_pool_bench(*, steps: int = 20, warmup: int = 5, batch_size: int = BATCH, users: int = USERS,
                            items: int = ITEMS, output: str | None = DEFAULT_OUTPUT, print_table: bool = True) -> dict:
    """Runs the three contenders (one process each) and the op micro-benchmark; returns the result
    dict (``speedup``, ``step_vs_ew``, ``peak_rss_mb``, per-contender times), written to ``output``."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    from recsys_mtl.bench import run_metadata
    from recsys_mtl.bench.row_grad_pool_op import bench_op

    load_before = os.getloadavg()
    ctx = mp.get_context("spawn")
    rows = {}
    for name in ("ew", "pmtrec", "reference"):
        q = ctx.Queue()
        p = ctx.Process(target=_contender, args=(name, users, items, batch_size, steps, warmup, q))
        p.start()
        rows[name] = _result(q, p, name)
        p.join()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        op = bench_op(T=len(TASKS), N=batch_size * 7, U=min(users + items, batch_size * 5), D=DIM, repeats=steps)
    finally:
        torch.set_num_threads(threads)
    result = {
        "workload": "row_grad_pool",
        "what": f"MF, {users:,} users x {items:,} items x {DIM}, tasks {', '.join(TASKS)}, batch {batch_size}, "
                f"fp32, one process, {THREADS} threads",
        "contenders": {"ew": "summed loss, one backward into fused row-wise Adagrad tables",
                       "pmtrec": "CombinedGradStep + the fused row_grad_pool op, one backward into the same tables",
                       "reference": "PMTRec Alg. 1 as written: one autograd pass per task to the whole tables, "
                                    "lines 9-12 over every row, E -= lr * grad"},
        "steps": rows,
        "speedup": {"op": rows["reference"]["pooling_ms"] / rows["pmtrec"]["pooling_ms"],
                    "step": rows["reference"]["ms_per_step"] / rows["pmtrec"]["ms_per_step"]},
        "step_vs_ew": rows["pmtrec"]["ms_per_step"] / rows["ew"]["ms_per_step"],
        "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in rows.items()},
        "op_micro": op,
        "targets": TARGETS,
        "batch_size": batch_size,
        "timed_steps": steps,
        "warmup": warmup,
        **run_metadata(load_before),
    }
    return emit(result, output, format_row_grad_pool_table, print_table)


def format_row_grad_pool_table(result: dict) -> str:
    """Readable summary of :func:`run_row_grad_pool_bench`'s result."""
    s = result["steps"]
    lines = [f"row-grad-pool ({result['what']})",
             f"{'contender':<10}{'ms/step':>10}{'pooling ms':>12}{'peak RSS MB':>13}"]
    for name, r in s.items():
        pool = f"{r['pooling_ms']:.2f}" if r["pooling_ms"] is not None else "-"
        lines.append(f"{name:<10}{r['ms_per_step']:>10.2f}{pool:>12}{r['peak_rss_mb']:>13.0f}")
    sp = result["speedup"]
    lines.append(f"pooling: reference / ours = {sp['op']:.2f}x (target >= {TARGETS['op']}); step: reference / ours = "
                 f"{sp['step']:.2f}x; PMTRec step / EW step = {result['step_vs_ew']:.2f} (target <= "
                 f"{TARGETS['step_vs_ew']}); op micro (reference / fused CPU path) = {result['op_micro']['ratio']:.2f}x")
    return "\n".join(lines)
