"""The contenders as step functions, driven in interleaved rounds on the same batches.

Each contender is built, warmed up and profiled in turn (an unpipelined per-phase breakdown,
then ``torch.profiler`` op groups of its real steps: :mod:`recsys_mtl.bench.profile`); then the
timed steps run round-robin in chunks, so background load on a shared machine hits every
contender alike. recsys_mtl runs as two contenders: ``recsys_mtl`` (eager) and
``recsys_mtl_compiled`` (``--compile-head``: :mod:`recsys_mtl.train.compiled`; its warm-up
includes the compilation). The round-robin order rotates by one contender per round, and the
first step of each contender's chunk (the one after the switch) is run but not timed.
Workloads too large for all contenders to live in one process at once
(``Workload.sequential``, W2) instead build, time and free each contender in turn. Throughput
is the batch size over the median step time.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from recsys_mtl.bench import peers
from recsys_mtl.bench.ours import build_ours, find_ebcs
from recsys_mtl.bench.profile import profile_groups
from recsys_mtl.bench.timing import StepTimer
from recsys_mtl.bench.workloads import Workload
from recsys_mtl.distributed.malloc import release_free_memory
from recsys_mtl.types import MTLBatch


@dataclass
class Contender:
    """A built contender: ``step()`` trains on its next batch; results accumulate here."""

    name: str
    step: Callable[[], None]
    ms_per_step: dict[str, float] = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)
    rss_delta_mb: float = 0.0
    rss_mb: float = 0.0
    profile: dict = field(default_factory=dict)
    cleanup: Callable[[], None] = lambda: None


def _rss_mb() -> float:
    """Current resident set size in MiB, from ``/proc/self/statm`` (Linux; no third-party package).
    Elsewhere the peak RSS from ``resource`` stands in (it never decreases)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _finish_breakdown(timer: StepTimer) -> dict[str, float]:
    ms = timer.ms_per_step()
    return {
        "data": ms.get("data", 0.0),
        "embedding": ms["embedding"],
        "dense": max(0.0, ms["fwd_bwd"] - ms["embedding"]),
        "optimizer": ms["optimizer"],
        "total_unpipelined": ms.get("data", 0.0) + ms["fwd_bwd"] + ms["optimizer"],
    }


PROFILE_STEPS = 3  # steps each contender runs under torch.profiler (after its warm-up)


def make_ours(workload: Workload, batches: list[MTLBatch], warmup: int, profile_steps: int,
              compiled: bool = False) -> Contender:
    """recsys_mtl: sharded model (fused row-wise Adagrad tables) + dense Adam, ``TrainPipelineSparseDist``;
    with ``compiled``, the dense head compiled (``--compile-head``)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recsys_mtl.train.compiled import compile_head

    created_pg = not dist.is_initialized()
    dmp, opt, device = build_ours(workload, batches[0].batch_size)
    if compiled:
        compile_head(dmp.module)  # compiles in the first warm-up step below
    ebcs = find_ebcs(dmp)  # PLE: the input tables; STEM-Net: shared + per-task table sets
    timer = StepTimer()
    # Unpipelined breakdown first: the pipeline later rewires the tables' forward.
    for i, batch in enumerate(itertools.islice(itertools.cycle(batches), warmup + profile_steps)):
        timed = i >= warmup
        with timer.phase("data", timed):
            batch = batch.to(device)
        with timer.phase("fwd_bwd", timed):
            opt.zero_grad()
            loss, _ = dmp(batch)
            loss.backward()
        with timer.phase("optimizer", timed):
            opt.step()
        with timer.phase("embedding", timed):  # sharded tables alone: fwd + bwd with fused update
            sum(ebc(batch.sparse).values().sum() for ebc in ebcs).backward()
    pipeline = TrainPipelineSparseDist(dmp, opt, device)
    it = itertools.cycle(batches)
    for _ in range(max(1, warmup)):  # (at least one: the compiled head compiles in its first step)
        pipeline.progress(it)
    profile = profile_groups(lambda: pipeline.progress(it), PROFILE_STEPS)

    def cleanup() -> None:
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()

    name = "recsys_mtl_compiled" if compiled else "recsys_mtl"
    return Contender(name, lambda: pipeline.progress(it), _finish_breakdown(timer), profile=profile, cleanup=cleanup)


def make_ours_compiled(workload: Workload, batches: list[MTLBatch], warmup: int, profile_steps: int) -> Contender:
    """recsys_mtl with ``--compile-head``: the dense head after the table lookups as one compiled graph."""
    return make_ours(workload, batches, warmup, profile_steps, compiled=True)


def make_plain(workload: Workload, batches: list[MTLBatch], warmup: int, profile_steps: int) -> Contender:
    """Plain PyTorch PLE / STEM-Net: ``EmbeddingBag(sparse=True)`` + SparseAdam, Adam for the dense part."""
    torch.manual_seed(0)
    model = peers.build_plain(workload)
    sparse_opt, dense_opt = peers.plain_optimizers(model)
    tasks = workload.schema.task_names
    inputs = [(b.dense, *peers.plain_inputs(b), b.labels) for b in batches]  # converted before timing

    def train_step(dense, ids, offsets, labels) -> None:
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        peers.plain_loss(model(dense, ids, offsets), labels, tasks).backward()
        sparse_opt.step()
        dense_opt.step()

    timer = StepTimer()
    for i, (dense, ids, offsets, labels) in enumerate(itertools.islice(itertools.cycle(inputs), warmup + profile_steps)):
        timed = i >= warmup
        with timer.phase("fwd_bwd", timed):
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            peers.plain_loss(model(dense, ids, offsets), labels, tasks).backward()
        with timer.phase("optimizer", timed):
            sparse_opt.step()
            dense_opt.step()
        sparse_opt.zero_grad()
        with timer.phase("embedding", timed):  # the tables alone: fwd + bwd (sparse grads)
            torch.cat([bag(ids[n], offsets[n]) for n, bag in model.tables()], 1).sum().backward()
    it = itertools.cycle(inputs)
    for _ in range(warmup):
        train_step(*next(it))
    profile = profile_groups(lambda: train_step(*next(it)), PROFILE_STEPS)
    return Contender("plain_pytorch", lambda: train_step(*next(it)), _finish_breakdown(timer), profile=profile)


def make_rechub(workload: Workload, batches: list[MTLBatch], warmup: int, profile_steps: int) -> Contender:
    """torch-rechub's PLE (dense ``nn.Embedding`` tables) with one Adam over all parameters."""
    torch.manual_seed(0)
    model = peers.build_rechub(workload)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bce = torch.nn.BCELoss()
    inputs = [(peers.rechub_inputs(b, workload.schema), b.labels) for b in batches]  # converted before timing
    ntask = len(workload.schema.tasks)

    def fwd_bwd(x, labels) -> None:
        opt.zero_grad()
        y = model(x)  # B x T probabilities
        sum(bce(y[:, k], labels[:, k]) for k in range(ntask)).backward()

    timer = StepTimer()
    for i, (x, labels) in enumerate(itertools.islice(itertools.cycle(inputs), warmup + profile_steps)):
        timed = i >= warmup
        with timer.phase("fwd_bwd", timed):
            fwd_bwd(x, labels)
        with timer.phase("optimizer", timed):
            opt.step()
        opt.zero_grad()
        with timer.phase("embedding", timed):
            model.embedding(x, model.features, squeeze_dim=True).sum().backward()
    it = itertools.cycle(inputs)

    def step() -> None:
        fwd_bwd(*next(it))
        opt.step()

    for _ in range(warmup):
        step()
    return Contender("torch_rechub", step, _finish_breakdown(timer), profile=profile_groups(step, PROFILE_STEPS))


BUILDERS = {
    "recsys_mtl": make_ours,
    "recsys_mtl_compiled": make_ours_compiled,
    "plain_pytorch": make_plain,
    "torch_rechub": make_rechub,
}


def run_contenders(
    workload: Workload, batches: list[MTLBatch], names: list[str], steps: int, warmup: int,
    chunk: int = 5, progress: Callable | None = None,
) -> list[Contender]:
    """Builds ``names`` in order, then times ``steps`` steps of each, round-robin in ``chunk``-step rounds."""
    contenders = []
    profile_steps = max(2, min(steps, 10))
    if "torch_rechub" in names:
        peers.import_rechub()  # fail before building anything, with the install hint
    if workload.sequential:
        return _run_sequential(workload, batches, names, steps, warmup, profile_steps, progress)
    for name in names:
        gc.collect()
        before = _rss_mb()
        c = BUILDERS[name](workload, batches, warmup, profile_steps)
        c.rss_delta_mb = _rss_mb() - before
        contenders.append(c)
    bar = progress(total=steps * len(contenders)) if progress else None
    done, rounds = 0, 0
    try:
        while done < steps:
            n = min(chunk, steps - done)
            # Each round starts one contender later, so each follows each other one equally often,
            # and the first step after a switch is not timed: it pays for the previous contender's
            # cache and allocator state (torch-rechub's dense Adam over all its tables, ~1 GB of
            # traffic per step, made the next contender's first step 1.3-2x its others; 2026-12-02).
            k = rounds % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                if len(contenders) > 1:
                    c.step()  # switch-over step, untimed
                for _ in range(n):
                    t0 = time.perf_counter()
                    c.step()
                    c.step_times.append(time.perf_counter() - t0)
                if bar is not None:
                    bar.update(n)
            done += n
            rounds += 1
    finally:
        if bar is not None:
            bar.close()
        for c in contenders:
            c.cleanup()
    return contenders


def _run_sequential(
    workload: Workload, batches: list[MTLBatch], names: list[str], steps: int, warmup: int, profile_steps: int,
    progress: Callable | None,
) -> list[Contender]:
    """Builds, times and frees each contender in turn, so only one holds its tables at a time."""
    contenders = []
    bar = progress(total=steps * len(names)) if progress else None
    try:
        for name in names:
            gc.collect()
            before = _rss_mb()
            c = BUILDERS[name](workload, batches, warmup, profile_steps)
            c.rss_delta_mb = _rss_mb() - before
            c.rss_mb = _rss_mb()
            try:
                for _ in range(steps):
                    t0 = time.perf_counter()
                    c.step()
                    c.step_times.append(time.perf_counter() - t0)
                    if bar is not None:
                        bar.update(1)
                c.rss_mb = max(c.rss_mb, _rss_mb())
            finally:
                c.cleanup()
                c.step = c.cleanup = lambda: None  # drop the model, tables and optimizer state
                gc.collect()
                release_free_memory()  # the next contender starts from the same heap
            contenders.append(c)
    finally:
        if bar is not None:
            bar.close()
    return contenders


def median_s(c: Contender) -> float:
    return statistics.median(c.step_times)
