"""The distributed, pipelined training entry point.

Reads top to bottom (docs/design.md §2.1): process group → schema → model on ``meta`` → shard →
optimizers → resume from a checkpoint → data → pipelined loop (with periodic checkpoints) →
evaluation → outputs. Checkpoint mechanics live in :mod:`recsys_mtl.train.checkpoint`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.config import MASKED_SHARING_MODELS, PAIR_MODELS, TrainConfig
from recsys_mtl.data.reader import DataError, count_rows, make_dataloader, steps_per_epoch
from recsys_mtl.data.interactions import is_interactions, load_training_schema, make_interaction_loader
from recsys_mtl.data.schema import Schema
from recsys_mtl.distributed.env import DistEnv, control_group, init_distributed
from recsys_mtl.distributed.malloc import tune_malloc
from recsys_mtl.distributed.optim import lr_stages, make_optimizer
from recsys_mtl.distributed.sharding import plan_summary, shard_model
from recsys_mtl.analysis import GateRecorder
from recsys_mtl.metrics import MTLMetrics, format_table
from recsys_mtl.models import build_model
from recsys_mtl.ops import cpu_gemm
from recsys_mtl.train.best import BEST_MODEL_DIR, BestTracker, check_spec
from recsys_mtl.train.eval_outputs import EvalCollector, write_eval_outputs
from recsys_mtl.train.checkpoint import Checkpointer, TrainPosition, checkpoint_run_info
from recsys_mtl.train.compiled import compile_head, eager_reason
from recsys_mtl.train.locks import DirLock, LockError
from recsys_mtl.train.masked_sharing import (
    SNAPSHOT_DIR,
    STATE_MODULE,
    MaskedSharingProcedure,
    MaskSchedule,
    MaskState,
    is_masked_sharing,
    optimizer_steps,
)
from recsys_mtl.train.grad_combiners import STATE_MODULE as COMBINER_STATE
from recsys_mtl.train.grad_combiners import CombinerState, main_task_index, make_combiner
from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.train.pair_eval import evaluate_pairs
from recsys_mtl.train.row_grads import CombinedGradStep
from recsys_mtl.train.task import MTLTrainModule
from recsys_mtl.types import MTLBatch

PIPELINES = {"sparse_dist": TrainPipelineSparseDist, "base": TrainPipelineBase}


class SyncedIterator:
    """Feeds every rank the same number of steps, with no per-step device synchronisation.

    Sharded embedding lookups are collectives, so every rank must run the same number of steps.
    The reader splits an epoch's rows evenly (every rank has the same number of batches ± 1), so
    the step count is known in advance from the parquet footers (``num_steps``); a short batch is
    padded to ``batch_size`` with masked rows, and a rank with one batch fewer gets an all-masked
    batch for the last step. Nothing is dropped.

    Batches stay on the host: ``TrainPipelineSparseDist`` copies them to the device on its own
    stream, overlapping the copy with compute. Bad input on one rank (:class:`DataError`) stops
    every rank at the same step: a one-int flag is all-reduced per step on a CPU process group
    (``control_group``; gloo, never the device), then the rank that read it raises its error and
    the others a DataError pointing to it (no rank hangs in a collective).

    Args:
        it: this rank's batches.
        batch_size (int): rows per step ``B``.
        schema (Schema): dataset schema (for the padding rows).
        num_steps (int): steps to yield on every rank.
        control_group: CPU process group for the error flag (None: one rank, no flag).
        pin_memory (bool): pin each (padded) batch, so the pipeline's host-to-device copy is async.
    """

    def __init__(
        self, it: Iterator[MTLBatch], *, batch_size: int, schema: Schema, num_steps: int,
        control_group: dist.ProcessGroup | None = None, pin_memory: bool = False,
    ) -> None:
        self.it, self.batch_size, self.schema, self.pin_memory = it, batch_size, schema, pin_memory
        self.num_steps, self.control_group = max(0, num_steps), control_group
        self.steps = 0
        self.stopped = False  # a stop was requested (SIGTERM) before num_steps
        self.pending_rows: collections.deque[int] = collections.deque()  # real rows of yielded batches

    def __iter__(self) -> "SyncedIterator":
        return self

    def __next__(self) -> MTLBatch:
        if self.steps >= self.num_steps:
            raise StopIteration
        error = None
        try:
            batch = next(self.it, None)
        except DataError as e:
            batch, error = None, e
        stop = STOP_REQUESTED.is_set()
        if self.control_group is not None:
            flags = torch.tensor([int(error is not None), int(stop)], dtype=torch.int32)  # host tensor, CPU group
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control_group)
            failed, stop = bool(flags[0]), bool(flags[1])
        else:
            failed = error is not None
        if error is not None:
            raise error
        if failed:
            raise DataError("stopping: another rank read bad input data (its error names the file and rows)")
        if stop:  # SIGTERM on some rank: every rank stops feeding at this same step
            self.stopped = True
            raise StopIteration
        if batch is None:  # this rank's share is one batch shorter than the longest
            batch = empty_batch(self.schema, 0)
        self.pending_rows.append(batch.batch_size)
        self.steps += 1
        batch = pad_batch(batch, self.batch_size)
        return batch.pin_memory() if self.pin_memory else batch

    def pop_rows(self) -> int:
        """Real (unpadded) rows of the oldest yielded batch not popped yet: the pipeline consumes
        batches in order, so after each completed step this is that step's row count."""
        return self.pending_rows.popleft() if self.pending_rows else 0


def global_sum(value: int, group: dist.ProcessGroup | None) -> int:
    """Sum of an int over the ranks of a CPU process group (the value itself for one rank)."""
    if group is None:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t.item())


def empty_batch(schema: Schema, batch_size: int) -> MTLBatch:
    """``batch_size`` rows with no ids, zero dense values and labels, and an all-False mask (a
    weighted schema's KJT carries an empty weights tensor)."""
    t = len(schema.tasks)
    kjt = KeyedJaggedTensor(
        keys=schema.sparse_names,
        values=torch.zeros(0, dtype=torch.long),
        lengths=torch.zeros(batch_size * len(schema.sparse), dtype=torch.int32),
        weights=torch.zeros(0) if schema.metadata.get("weighted") else None,
    )
    return MTLBatch(
        dense=torch.zeros(batch_size, len(schema.dense)),
        sparse=kjt,
        labels=torch.zeros(batch_size, t),
        label_mask=torch.zeros(batch_size, t, dtype=torch.bool),
    )


def pad_batch(batch: MTLBatch, batch_size: int) -> MTLBatch:
    """Appends masked empty rows so the batch has exactly ``batch_size`` rows."""
    n = batch.batch_size
    if n == batch_size:
        return batch
    pad = batch_size - n
    kjt = batch.sparse
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), n)  # F x n
    lengths = torch.cat([lengths, torch.zeros(len(keys), pad, dtype=lengths.dtype)], dim=1)  # F x B
    sparse = KeyedJaggedTensor(keys=keys, values=kjt.values(), lengths=lengths.reshape(-1),
                               weights=kjt.weights_or_none())  # the padded bags are empty: same weights
    t = batch.labels.shape[1]
    return MTLBatch(
        dense=torch.cat([batch.dense, torch.zeros(pad, batch.dense.shape[1], dtype=batch.dense.dtype)]),
        sparse=sparse,
        labels=torch.cat([batch.labels, torch.zeros(pad, t, dtype=batch.labels.dtype)]),
        label_mask=torch.cat([batch.label_mask, torch.zeros(pad, t, dtype=torch.bool)]),
    )


def evaluate(
    model: nn.Module, cfg: TrainConfig, schema: Schema, env: DistEnv, collector: EvalCollector | None = None,
    split: str = "eval",
) -> dict[str, dict[str, float]]:
    """Runs the sharded model over the eval split (every rank its share) and returns per-task
    metrics. With a ``collector`` it also keeps every eval row's predictions and gate weights.
    Interaction datasets: full-ranking metrics of the main task on ``split`` (``eval`` or ``test``)."""
    if is_interactions(schema):
        tm = model.module if hasattr(model, "module") else model
        return evaluate_pairs(tm.model, cfg.data, schema, split=split, rank=env.rank, world_size=env.world_size,
                              group=control_group(env), device=env.device)
    metrics = MTLMetrics(schema.tasks, batch_size=cfg.batch_size, world_size=env.world_size, rank=env.rank,
                         device=env.device)
    loader = make_dataloader(cfg.data, "eval", batch_size=cfg.batch_size, rank=env.rank,
                             world_size=env.world_size, num_workers=cfg.num_workers)
    batches = SyncedIterator(iter(loader), batch_size=cfg.batch_size, schema=schema,
                             num_steps=loader.dataset.steps_per_epoch(), control_group=control_group(env))
    gates = GateRecorder(model, schema.task_names) if collector is not None else None
    was_training = model.training
    model.eval()
    with torch.no_grad(), (gates if gates is not None and gates.supported else contextlib.nullcontext()):
        for batch in batches:
            batch = batch.to(env.device, non_blocking=True)  # no pipeline here to copy it
            _, (_, logits, labels, mask) = model(batch)
            metrics.update(logits, labels, mask)
            if collector is not None:
                collector.add(batch, logits, gates.batches[-1] if gates.supported and gates.batches else None)
    model.train(was_training)
    return metrics.compute()


def train(cfg: TrainConfig, on_step: Callable[[int, torch.Tensor], None] | None = None) -> dict | None:
    """Trains ``cfg.model`` sharded over the current process group; returns the metrics dict
    (written to ``OUTPUT/metrics.json`` by rank 0), None on other ranks. ``on_step(step, loss)``
    is called after every optimizer step with this rank's loss.

    With ``cfg.checkpoint_dir`` it resumes from the newest valid checkpoint there (model, fused
    and dense optimizer state, loss-weight schedule, RNG, step and data position) and saves every
    ``checkpoint_every_steps`` steps / ``checkpoint_every_minutes`` minutes and at the end.

    One run per directory: rank 0 locks the output and checkpoint directories for the run
    (:mod:`recsys_mtl.train.locks`; a second job on them fails with :class:`LockError`) and
    clears the output artefacts an earlier run left there.
    """
    env = init_distributed()
    locks = lock_run_dirs(cfg, env)
    previous = _on_sigterm()
    try:
        return _train(cfg, env, on_step)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        STOP_REQUESTED.clear()
        for lock in locks:
            lock.release()


STOP_REQUESTED = threading.Event()


class TrainingStopped(RuntimeError):
    """SIGTERM stopped the run (after a checkpoint when one is configured); rerun to resume."""


def _on_sigterm():
    """Turns SIGTERM (what Slurm and Kubernetes send before a kill) into a stop request that the
    ranks agree on at the next step. Returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: STOP_REQUESTED.set())


FINAL_MODEL_DIR = "final_model"
OUTPUT_ARTEFACTS = ("metrics.json", "metrics.json.tmp", "sharding_plan.txt", "eval_predictions.parquet",
                    "expert_utilisation.json", "expert_utilisation.png", "mask_analysis.json", "mask_analysis.png")


def lock_run_dirs(cfg: TrainConfig, env: DistEnv) -> list[DirLock]:
    """Rank 0 locks ``cfg.output_dir`` and ``cfg.checkpoint_dir`` and removes earlier runs' output
    artefacts; every rank raises :class:`LockError` if a directory is in use (a collective)."""
    locks: list[DirLock] = []
    error = None
    if env.is_main:
        try:
            for flag, d in (("--output-dir", cfg.output_dir), ("--checkpoint-dir", cfg.checkpoint_dir)):
                if d is not None and not any(lk.directory.resolve() == Path(d).resolve() for lk in locks):
                    locks.append(DirLock(d, flag).acquire())
            for name in OUTPUT_ARTEFACTS:  # this run rewrites them: none of an earlier run may linger
                (Path(cfg.output_dir) / name).unlink(missing_ok=True)
            for name in (FINAL_MODEL_DIR, "tensorboard"):
                shutil.rmtree(Path(cfg.output_dir) / name, ignore_errors=True)
        except (LockError, OSError) as e:
            error = str(e)
    if dist.is_initialized() and env.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        for lock in locks:
            lock.release()
        raise LockError(error)
    return locks


def _train(cfg: TrainConfig, env: DistEnv, on_step: Callable[[int, torch.Tensor], None] | None) -> dict | None:
    torch.manual_seed(cfg.seed)
    schema = load_training_schema(cfg.data, cfg.model)
    out_dir = Path(cfg.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # Freed step buffers stay in the heap instead of faulting back in each step (glibc; process-wide).
    tune_malloc()
    # Where float32 CPU GEMMs go (oneDNN or MKL; read by the layers when built): rank 0's choice on every rank.
    cpu_gemm.agree()
    # Model on meta, sharded once; dense parts are materialised and initialised by DMP.
    model = MTLTrainModule(build_model(schema, cfg.model, device="meta"), make_loss(cfg, schema))
    masked = is_masked_sharing(model.model)
    if masked:  # the masked-sharing procedure's state rides in the state dict (checkpointed)
        setattr(model, STATE_MODULE, MaskState(model.model))
    check_grad_combiner(cfg, schema)
    check_model_data(cfg, schema)
    if cfg.grad.combiner != "ew":  # the combiner's step counter and aggregator state: checkpointed
        setattr(model, COMBINER_STATE, CombinerState(len(schema.tasks)))
    dmp, plan = shard_model(
        model, cfg.sharding, cfg.optim, device=env.device, world_size=env.world_size,
        local_world_size=env.local_world_size, batch_size=cfg.batch_size,
    )
    if env.is_main:
        (out_dir / "sharding_plan.txt").write_text(plan_summary(plan) + "\n\n" + str(plan) + "\n")
        kinds = collections.Counter(ps.sharding_type for m in plan.plan.values() for ps in m.values())
        print(f"sharding plan ({env.world_size} ranks): "
              + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + f" tables; per table in "
              f"{out_dir / 'sharding_plan.txt'}", flush=True)
    # Optimizer steps of the whole run (a decaying learning-rate schedule ends there).
    total_steps = run_steps(cfg, env.world_size)
    optimizer = make_optimizer(dmp, cfg.optim,
                               optimizer_steps(model.model, cfg, total_steps) if masked else total_steps)

    # Checkpoint: resume from the newest valid one, if any.
    checkpointer = make_checkpointer(cfg, env, schema, plan) if cfg.checkpoint_dir else None
    position = TrainPosition()
    if checkpointer is not None and (latest := checkpointer.latest()) is not None:
        position = checkpointer.load(latest, dmp, optimizer)
        if env.is_main:
            print(f"resumed from {latest}: step {position.step}, epoch {position.epoch}, "
                  f"batch {position.epoch_batches}", flush=True)

    if cfg.pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {cfg.pipeline!r}; choose from {', '.join(PIPELINES)}")
    group = control_group(env)
    procedure = None
    if masked:  # warm-up, pruning rounds, then the multi-task phase: a procedure drives each step
        snapshots = Path(cfg.checkpoint_dir or cfg.output_dir) / SNAPSHOT_DIR
        procedure = MaskedSharingProcedure(
            cfg, dmp, optimizer, total_steps=total_steps, start_step=position.step, log=position.procedure,
            evaluate=lambda: evaluate(dmp, cfg, schema, env),
            snapshot_saver=lambda d: _model_saver(cfg, env, schema, plan, d),
            snapshot_dir=snapshots, group=group)
        pipeline = procedure.pipeline(env.device)
    else:
        pipeline = PIPELINES[cfg.pipeline](dmp, optimizer, env.device)
    combiner_state: CombinerState | None = getattr(dmp.module, COMBINER_STATE, None)
    if combiner_state is not None:  # --grad-combiner: the train module's step combines the task gradients
        combiner = make_combiner(cfg.grad, schema.task_names, cfg.seed, combiner_state)
        dmp.module.grad_step = CombinedGradStep(dmp.module, combiner, schema, cfg.grad.stats)
    if head_compiles(cfg, env.device):
        setup_compiled_head(cfg, dmp.module, env)
    loss_fn = dmp.module.loss  # its loss-weight schedule advances per step / epoch
    # Fail before the compute: the eval split's values are checked now, not after the last step.
    if not is_interactions(schema):  # (interaction datasets are checked when loaded)
        validate_split(cfg, schema, env, "eval")
    guard = FiniteLossGuard(env.device)
    best = None
    if cfg.keep_best is not None:
        check_spec(cfg.keep_best, schema.task_names)
        best = BestTracker(cfg.keep_best, cfg.early_stop_patience)
        best.replay(position.history)
        if env.is_main and position.step == 0:  # a fresh run: no earlier run's best model may linger
            shutil.rmtree(out_dir / BEST_MODEL_DIR, ignore_errors=True)
    early_stopped = None
    best_saver: Checkpointer | None = None

    steps, samples, train_time = position.step, 0, 0.0
    history: list[dict] = position.history
    train_log: list[dict] = []  # every log_every steps: mean loss over ranks, throughput
    board = _tensorboard(out_dir) if env.is_main else None
    rows_seen: list[int] = list(position.rows_seen)  # per epoch, all ranks, padding excluded
    saved_step = position.step if checkpointer is not None and position.step else None
    num_epochs = cfg.epochs if cfg.steps is None else 1 << 30
    bar = Progress(total=cfg.steps, initial=steps, enabled=env.is_main)

    def at(epoch: int, epoch_batches: int, epoch_rows: int) -> TrainPosition:
        """The position after ``epoch_batches`` steps of ``epoch`` (a collective: sums the rows)."""
        seen = rows_seen[:epoch] + [global_sum(epoch_rows, group)]
        return TrainPosition(steps, epoch, epoch_batches, history, seen, position.procedure)

    for epoch in range(position.epoch, num_epochs):
        if cfg.steps is not None and steps >= cfg.steps:
            break
        skip = position.epoch_batches if epoch == position.epoch else 0
        if combiner_state is not None:  # PMTRec's task focusing: α^s with s the epoch
            with torch.no_grad():
                combiner_state.epoch.fill_(epoch)
        if is_interactions(schema):  # pairs sampled per batch
            loader = make_interaction_loader(cfg.data, schema, batch_size=cfg.batch_size, rank=env.rank,
                                             world_size=env.world_size, seed=cfg.seed, epoch=epoch,
                                             shuffle=cfg.shuffle, start_batch=skip)
        else:
            loader = make_dataloader(cfg.data, "train", batch_size=cfg.batch_size, rank=env.rank,
                                     world_size=env.world_size, num_workers=cfg.num_workers, shuffle=cfg.shuffle,
                                     epoch=epoch, seed=cfg.seed, shuffle_block_rows=cfg.shuffle_block_rows,
                                     shuffle_buffer_rows=cfg.shuffle_buffer_rows, start_batch=skip)
        epoch_steps = loader.dataset.steps_per_epoch()  # the same on every rank, from the footers
        num_steps = epoch_steps - skip
        if cfg.steps is not None:
            num_steps = min(num_steps, cfg.steps - steps)
        batches = SyncedIterator(iter(loader), batch_size=cfg.batch_size, schema=schema, num_steps=num_steps,
                                 control_group=group, pin_memory=env.device.type == "cuda")
        # Rows of this epoch trained before a resume: this rank's share of the recorded count.
        epoch_rows = (rows_seen[epoch] // env.world_size + (env.rank < rows_seen[epoch] % env.world_size)
                      if skip and len(rows_seen) > epoch else 0)
        dmp.train()
        t0 = time.perf_counter()
        epoch_batches = skip
        while True:
            try:
                loss, *_ = pipeline.progress(batches)
            except StopIteration:
                break
            steps += 1
            epoch_batches += 1
            epoch_rows += batches.pop_rows()
            guard.update(loss, steps)
            loss_fn.step_done()
            if on_step is not None:
                on_step(steps, loss)
            samples += cfg.batch_size * env.world_size
            if steps % cfg.log_every == 0 or steps == 1:
                guard.check()  # the loss is read from the device here anyway
                elapsed = train_time + time.perf_counter() - t0
                mean_loss = global_mean(loss, env)
                train_log.append({"step": steps, "epoch": epoch, "loss": mean_loss,
                                  "samples_per_s": samples / max(elapsed, 1e-9)})
                if board is not None:
                    board.add_scalar("train/loss", mean_loss, steps)
                    board.add_scalar("train/samples_per_s", train_log[-1]["samples_per_s"], steps)
                bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.4f}", samples_per_s=f"{samples / elapsed:,.0f}")
            bar.update(1)
            if cfg.eval_every and steps % cfg.eval_every == 0:
                train_time += time.perf_counter() - t0
                history.append({"step": steps, "tasks": _eval_detached(pipeline, dmp, cfg, schema, env)})
                if best is not None:
                    improved, stop = best.decide(steps, history[-1]["tasks"], env.is_main, group)
                    if improved:  # one saver for the run: each Checkpointer opens a gloo group
                        best_saver = best_saver or _model_saver(cfg, env, schema, plan, out_dir / BEST_MODEL_DIR)
                        best_saver.save(dmp, optimizer, at(epoch, epoch_batches, epoch_rows))
                    if stop:
                        early_stopped = steps
                        if env.is_main:
                            bar.write(f"early stop at step {steps}: {cfg.keep_best} has not improved for "
                                      f"{cfg.early_stop_patience} evaluations (best {best.best_value:.6g} at "
                                      f"step {best.best_step})")
                        break
                t0 = time.perf_counter()
            if checkpointer is not None and checkpointer.due(steps):
                guard.check()  # never save a model that has seen a non-finite loss
                train_time += time.perf_counter() - t0
                checkpointer.save(dmp, optimizer, at(epoch, epoch_batches, epoch_rows))
                saved_step = steps
                t0 = time.perf_counter()
        train_time += time.perf_counter() - t0
        position = at(epoch, epoch_batches, epoch_rows)
        rows_seen = position.rows_seen
        if batches.stopped:
            guard.check()
            saved = None
            if checkpointer is not None:
                saved = checkpointer.save(dmp, optimizer, position) if saved_step != steps else "the last one"
            raise TrainingStopped(
                f"stopped by SIGTERM after step {steps}; "
                + (f"checkpoint {saved} saved: rerun the same command to resume" if saved is not None
                   else "no --checkpoint-dir, so nothing was saved")
            )
        if epoch_batches < epoch_steps or early_stopped is not None:  # --steps or early stop
            break
        if env.is_main:
            bar.write(f"epoch {epoch}: {rows_seen[epoch]:,} training rows ({epoch_steps} steps x "
                       f"{env.world_size} ranks x batch {cfg.batch_size}, short batches padded)")
        loss_fn.epoch_done()
        position = TrainPosition(steps, epoch + 1, 0, history, rows_seen, position.procedure)
    bar.close()
    guard.check()
    if checkpointer is not None and saved_step != steps:
        checkpointer.save(dmp, optimizer, position)
    # The final model always lands under the output directory, as a DCP checkpoint that
    # Checkpointer.latest()/load() (and so a later predict or export) can read, on any plan.
    _model_saver(cfg, env, schema, plan, out_dir / FINAL_MODEL_DIR).save(dmp, optimizer, position)
    if procedure is not None:
        procedure.cleanup()

    pairs = is_interactions(schema)
    collector = EvalCollector(schema) if cfg.eval_outputs and not pairs else None
    final = _eval_detached(pipeline, dmp, cfg, schema, env, collector)
    test = _eval_detached(pipeline, dmp, cfg, schema, env, split="test") if pairs else None
    if collector is not None:
        gathered = collector.gather(env.rank, env.world_size)
        if gathered is not None:  # rank 0: gAUC, eval_predictions.parquet, expert utilisation
            for task, extra in write_eval_outputs(out_dir, schema, *gathered, cfg.model.name).items():
                final[task].update(extra)
    result = {
        "model": cfg.model.name,
        "world_size": env.world_size,
        "steps": steps,
        "samples_per_s": samples / max(train_time, 1e-9),
        "tasks": final,
        **({"test": test} if test is not None else {}),
        "train_rows": count_rows(cfg.data, "train"),
        "rows_seen": rows_seen,
        "history": history,
        "train_log": train_log,
        "final_model": str(out_dir / FINAL_MODEL_DIR),
        "best": None if best is None else {**best.summary(), "path": str(out_dir / BEST_MODEL_DIR)},
        "early_stopped_at": early_stopped,
        **({"masked_sharing": procedure.summary()} if procedure is not None else {}),
        "config": cfg.to_dict(),
    }
    if env.is_main:
        tmp = out_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(strict_json(result), indent=2, allow_nan=False))
        os.replace(tmp, out_dir / "metrics.json")
        if board is not None:
            board.close()
        if procedure is not None:
            procedure.write_outputs(out_dir)
        print(f"\n{cfg.model.name}: {steps} steps x {env.world_size} ranks, "
              f"{result['samples_per_s']:,.0f} samples/s; eval metrics:\n{format_table(final)}", flush=True)
    return result if env.is_main else None


class Progress:
    """Training progress on rank 0: a live bar on a terminal; elsewhere (torchx, Slurm, a log
    file) one plain line every ``every_seconds`` seconds instead of one per bar refresh.

    Args:
        total (int | None): steps of the run, when known.
        initial (int): steps already done (a resumed run).
        enabled (bool): False on ranks other than 0.
        every_seconds (float): period of the plain lines.
        stream: where to write (stderr).
    """

    def __init__(self, total: int | None, initial: int, enabled: bool, every_seconds: float = 10.0,
                 stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled, self.every = enabled, every_seconds
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0,
                        file=self.stream) if self.tty else None
        self.total, self.step, self.postfix = total, initial, ""
        self.last = time.monotonic()

    def set_postfix(self, **values: object) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.write(f"step {self.step}{'/' + str(self.total) if self.total else ''}: {self.postfix}")

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def global_mean(loss: torch.Tensor, env: DistEnv) -> float:
    """The loss averaged over ranks (a collective; called at logging steps only)."""
    t = loss.detach().float().reshape(1).clone()
    if dist.is_initialized() and env.world_size > 1:
        dist.all_reduce(t)
        t /= env.world_size
    return float(t)


def _tensorboard(out_dir: Path):
    """A TensorBoard writer on ``OUT/tensorboard`` when the ``tensorboard`` package is installed
    (it is optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN/inf loss: the job stops instead of training on garbage."""


class FiniteLossGuard:
    """Remembers the first step whose loss was not finite, without synchronising the device.

    :meth:`update` is a couple of device ops per step; :meth:`check` (a collective: every rank
    calls it at the same steps) reads the flag, all-reduced so every rank stops together, and
    raises :class:`NonFiniteLossError` naming the step. The loop checks at its logging steps,
    before every checkpoint and at the end, so no checkpoint or metrics of a diverged model are
    written.
    """

    NONE = 1 << 62

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad, torch.minimum(self.first_bad, torch.full_like(self.first_bad, step)),
                                     self.first_bad)

    def check(self) -> None:
        first = self.first_bad.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first)
        if step != self.NONE:
            raise NonFiniteLossError(
                f"training loss is NaN/inf at step {step}: stopping (no checkpoint or metrics are written after "
                f"it). Lower --dense-lr / --sparse-lr, set --grad-clip-norm, or check the data"
            )


def validate_split(cfg: TrainConfig, schema: Schema, env: DistEnv, split: str) -> None:
    """Reads this rank's share of ``split`` once, checking every value (raises :class:`DataError`
    on every rank, naming the file, column and rows, when any rank finds bad input)."""
    loader = make_dataloader(cfg.data, split, batch_size=cfg.batch_size, rank=env.rank, world_size=env.world_size,
                             num_workers=cfg.num_workers)
    for _ in SyncedIterator(iter(loader), batch_size=cfg.batch_size, schema=schema,
                            num_steps=loader.dataset.steps_per_epoch(), control_group=control_group(env)):
        pass


def strict_json(obj):
    """``obj`` with every non-finite float replaced by None, so ``metrics.json`` is strict JSON (an
    AUC on an eval split with a single class, for instance, is undefined: null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def head_compiles(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a run asks for the compiled dense head: ``compile_head`` when set, else (the default)
    on CPU hosts, where it was measured faster on W1, W2 and the quickstart; on CUDA hosts only
    when asked for, since it has not been measured there."""
    return cfg.compile_head if cfg.compile_head is not None else device.type == "cpu"


def setup_compiled_head(cfg: TrainConfig, train_module: nn.Module, env: DistEnv) -> bool:
    """Compiles the train module's training step (:func:`compile_head`) and says so on rank 0, or,
    for the models and runs :func:`eager_reason` names, trains eagerly (said on rank 0 when
    ``--compile-head`` asked for it). Returns whether the head is compiled."""
    reason = eager_reason(cfg)
    if reason is not None:
        if env.is_main and cfg.compile_head:
            print(f"--compile-head: training eagerly: {reason}", file=sys.stderr, flush=True)
        return False
    compile_head(train_module)
    if env.is_main:
        print("dense head: compiles at the first training step (--no-compile-head: eager)",
              file=sys.stderr, flush=True)
    return True


def make_loss(cfg: TrainConfig, schema: Schema) -> MultiTaskLoss:
    """The joint loss with the config's task weights and their schedule (PLE Eq. 9-10)."""
    loss = getattr(cfg, "loss", None)
    if loss is None:
        return MultiTaskLoss(schema.tasks)
    return MultiTaskLoss(schema.tasks, weights=loss.task_weights, decay=loss.task_weight_decay,
                         weight_unit=loss.weight_unit)


def make_checkpointer(cfg: TrainConfig, env: DistEnv, schema: Schema, plan) -> Checkpointer:
    """The run's :class:`Checkpointer`: what must match on resume, and when to save."""
    run_info = checkpoint_run_info(cfg, schema)
    return Checkpointer(
        cfg.checkpoint_dir, rank=env.rank, world_size=env.world_size, run_info=run_info, plan=plan,
        plan_summary=plan_summary(plan), keep_last=cfg.keep_last, every_steps=cfg.checkpoint_every_steps,
        every_minutes=cfg.checkpoint_every_minutes,
    )


def run_steps(cfg: TrainConfig, world_size: int) -> int:
    """Steps (batches per rank) the run takes: ``cfg.steps``, or its epochs from the footers."""
    return cfg.steps or cfg.epochs * steps_per_epoch(count_rows(cfg.data, "train"), world_size, cfg.batch_size)


def check_schedules(cfg: TrainConfig, world_size: int) -> None:
    """Raises ``ValueError`` (naming the flags) if the run is too short for its learning-rate
    schedule or its masked-sharing schedule, or ``--keep-best`` names an unknown task: checked
    before any rank starts."""
    total = run_steps(cfg, world_size)
    schema = load_training_schema(cfg.data, cfg.model)
    if cfg.model.name in MASKED_SHARING_MODELS:
        MaskSchedule(cfg.csrec, len(schema.tasks), total)
    lr_stages(cfg.optim, total)
    if cfg.keep_best is not None:
        check_spec(cfg.keep_best, schema.task_names)
    check_grad_combiner(cfg, schema)
    check_model_data(cfg, schema)


def check_model_data(cfg: TrainConfig, schema: Schema) -> None:
    """Raises ``ValueError`` when the model does not train on this kind of dataset."""
    pairs = is_interactions(schema)
    if pairs and cfg.model.name not in PAIR_MODELS:
        raise ValueError(f"--model {cfg.model.name} trains on feature rows with labels; this is an interaction "
                         f"dataset (user-item pairs): use one of {', '.join(PAIR_MODELS)}")
    if not pairs and cfg.model.name in PAIR_MODELS:
        raise ValueError(f"--model {cfg.model.name} trains on interaction datasets (recsys-mtl data convert "
                         f"ciao|epinions); {cfg.data} has labelled feature rows")


def check_grad_combiner(cfg: TrainConfig, schema: Schema) -> None:
    """Raises ``ValueError`` (naming the flags) for a ``--grad-combiner`` the run cannot use."""
    if cfg.grad.combiner == "ew":
        return
    if cfg.model.name in MASKED_SHARING_MODELS:
        raise ValueError(f"--grad-combiner {cfg.grad.combiner} cannot train {cfg.model.name}: the masked-sharing "
                         f"models run their own per-task steps; use --grad-combiner ew")
    if cfg.model.name == "aitm":
        raise ValueError("--grad-combiner: aitm's calibrator loss is not a task loss; use --grad-combiner ew")
    main_task_index(cfg.grad, schema.task_names)


def _model_saver(cfg: TrainConfig, env: DistEnv, schema: Schema, plan, directory: Path) -> Checkpointer:
    """A checkpointer keeping the model as the only checkpoint in ``directory`` (``final_model``,
    ``best_model``): DCP checkpoints that ``Checkpointer.latest()``/``load()`` read on any plan."""
    return make_checkpointer(dataclasses.replace(cfg, checkpoint_dir=str(directory), checkpoint_every_steps=None,
                                                 checkpoint_every_minutes=None, keep_last=1), env, schema, plan)


def _eval_detached(pipeline, dmp: nn.Module, cfg: TrainConfig, schema: Schema, env: DistEnv,
                   collector: EvalCollector | None = None, split: str = "eval"):
    # The pipeline rewrote the sharded modules' forwards to consume its prefetched inputs;
    # detach restores them for a plain forward over the eval data, attach re-installs them
    # (in-flight training batches are kept, so no sample is skipped).
    model = pipeline.detach() if hasattr(pipeline, "detach") else dmp
    try:
        return evaluate(model, cfg, schema, env, collector, split)
    finally:
        if hasattr(pipeline, "attach"):
            pipeline.attach(model)
