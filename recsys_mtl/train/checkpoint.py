"""Fault-tolerant checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint directory holds one sub-directory per saved step::

    CK/step_00000120/   .metadata, __0_0.distcp, ...   DCP: sharded tables, fused sparse-optimizer
                                                       state, dense model + dense optimizer state
                        rank_00000.pt, ...             per-rank RNG states (torch, numpy, python)
                        meta.json                      written last (see :class:`CheckpointMeta`)

Writes are atomic: every rank writes into ``CK/.tmp_step_00000120``; after a barrier rank 0
checksums, writes ``meta.json`` and renames the directory to ``step_00000120``. A crash or a full
disk mid-write leaves only a ``.tmp_*`` directory behind (removed by the next run) and the previous
checkpoints untouched. The newest *valid* checkpoint is the newest ``step_*`` directory whose
``meta.json`` is complete and whose files all have the recorded size and CRC32; corrupt ones are
skipped with a warning. Only the ``keep_last`` newest checkpoints are kept.

Loading checks ``meta.json`` against the run first: the dataset schema fingerprint, the model
config and the optimizer kinds must match (:class:`CheckpointError` lists the differences). A
different world size or sharding plan is fine (DCP reshards): tables may move between table-wise,
row-wise and table-row-wise with their fused optimizer state; column-wise and data-parallel tables
must keep their sharding type and shard count, because their optimizer state does not map across
layouts (a data-parallel table is stepped by the dense optimizer, a column-wise one keeps fbgemm
state per column shard; TorchRec would load the weights but silently drop that state). The error
names the ``--table-sharding`` flags that keep those layouts. The default plan
(:func:`recsys_mtl.distributed.sharding.constraints_for`) picks each table's layout family
independently of the world size, so its checkpoints always reshard.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from recsys_mtl.config import MASKED_SHARING_MODELS

FORMAT_VERSION = 1
META_FILE = "meta.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
_RESHARDABLE = {"table_wise", "row_wise", "table_row_wise"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or does not fit this run."""


@dataclass
class TrainPosition:
    """Where training stands: optimizer steps done, and the data position.

    Args:
        step: optimizer steps completed (every rank runs the same number).
        epoch: epoch the next batch comes from.
        epoch_batches: batches of ``epoch`` every rank has trained on (the reader's resume point).
        history: evaluation history so far (``metrics.json``'s ``history``).
        rows_seen: training rows (all ranks, padding excluded) per epoch so far; the last entry is
            the current epoch's count when it is unfinished (``metrics.json``'s ``rows_seen``).
        procedure: a training procedure's log (JSON), e.g. the masked-sharing pruning rounds.
    """

    step: int = 0
    epoch: int = 0
    epoch_batches: int = 0
    history: list = field(default_factory=list)
    rows_seen: list = field(default_factory=list)
    procedure: dict = field(default_factory=dict)


@dataclass
class CheckpointMeta:
    """``meta.json``: what a checkpoint holds and what it was written by."""

    format: int
    step: int
    epoch: int
    epoch_batches: int
    world_size: int
    batch_size: int
    schema_fingerprint: str
    model: dict
    optim: dict
    loss: dict
    plan: dict  # {table: {"sharding_type": str, "num_shards": int}}
    plan_summary: str
    data_positions: list  # per rank: {"rank", "epoch", "batches", "rows"}
    history: list
    files: dict  # {relative path: {"size": int, "crc32": int}}
    rows_seen: list = field(default_factory=list)  # TrainPosition.rows_seen
    train: dict = field(default_factory=dict)  # the run settings checked on resume (RESUME_SETTINGS)
    procedure: dict = field(default_factory=dict)  # TrainPosition.procedure
    created: float = 0.0
    torch_version: str = ""

    @staticmethod
    def read(path: Path) -> "CheckpointMeta":
        d = json.loads((path / META_FILE).read_text())
        names = {f.name for f in dataclasses.fields(CheckpointMeta)}
        return CheckpointMeta(**{k: v for k, v in d.items() if k in names})


def plan_tables(plan: ShardingPlan) -> dict[str, dict]:
    """``{module.table: {"sharding_type", "num_shards"}}`` of a sharding plan."""
    out = {}
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = len(ps.sharding_spec.shards) if ps.sharding_spec else 0
            out[f"{module_path}.{table}" if module_path else table] = {
                "sharding_type": ps.sharding_type, "num_shards": shards,
            }
    return out


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(STEP_PREFIX):
        return None
    try:
        return int(name[len(STEP_PREFIX):])
    except ValueError:
        return None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """``step_*`` directories of ``directory``, newest (highest step) first; validity unchecked."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(s, p) for p in d.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def check_files(path: Path, meta: CheckpointMeta, files: list[str] | None = None) -> str | None:
    """Checks recorded sizes and CRC32s (of ``files``, default all); returns a problem or None."""
    for rel in files if files is not None else sorted(meta.files):
        rec = meta.files[rel]
        p = path / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != rec["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {rec['size']}"
        if _crc32(p) != rec["crc32"]:
            return f"{rel} fails its CRC32 check"
    return None


def _dense_optimizer(optimizer: KeyedOptimizer) -> KeyedOptimizer | None:
    """The dense part of ``make_optimizer``'s ``CombinedOptimizer`` (None if there is none)."""
    if isinstance(optimizer, CombinedOptimizer):
        dense = [opt for key, opt in optimizer.optimizers if key != "sparse"]
        return dense[0] if dense else None
    return optimizer


class Checkpointer:
    """Saves and restores a sharded training run with DCP (see the module docstring).

    Args:
        directory (str | Path): the checkpoint directory ``CK``.
        rank (int): this process's rank.
        world_size (int): ranks in the job.
        run_info (dict): what is recorded and must match on load (:func:`checkpoint_run_info`):
            ``schema_fingerprint``, ``model``, ``optim`` and ``loss`` (dicts of the configs), ``batch_size``.
        plan (ShardingPlan): this run's sharding plan (recorded; checked for reshardability).
        plan_summary (str): human-readable plan for ``meta.json``.
        keep_last (int): checkpoints to keep (older ones are deleted after a successful save).
        every_steps (int | None): save every N steps.
        every_minutes (float | None): also save when this many minutes passed since the last save.

    Example::

        >>> import tempfile
        >>> ck = Checkpointer(tempfile.mkdtemp(), rank=0, world_size=1, run_info={}, plan=None,
        ...                   every_steps=100)
        >>> ck.due(step=100), ck.due(step=150), ck.latest()
        (True, False, None)
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        rank: int,
        world_size: int,
        run_info: dict,
        plan: ShardingPlan | None,
        plan_summary: str = "",
        keep_last: int = 3,
        every_steps: int | None = None,
        every_minutes: float | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.rank, self.world_size = rank, world_size
        self.run_info = run_info
        self.plan = plan_tables(plan) if plan is not None else {}
        self.plan_summary = plan_summary
        self.keep_last = keep_last
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self._last_save = time.monotonic()
        # DCP's own collectives go through a dedicated gloo group: CPU objects work under nccl too,
        # and they never interleave with the pipeline's in-flight input-distribution collectives.
        self.pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"{TMP_PREFIX}*"):  # left by a crash mid-write
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()

    # ---- collectives (no-ops on a single process without a group) -------------------------

    def _barrier(self) -> None:
        if self.pg is not None and self.world_size > 1:
            dist.barrier(group=self.pg)

    def _all_ok(self, ok: bool) -> bool:
        if self.pg is None or self.world_size == 1:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.pg)
        return bool(t.item())

    def _broadcast(self, obj: Any) -> Any:
        if self.pg is None or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def _gather(self, obj: Any) -> list[Any]:
        if self.pg is None or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    # ---- when ---------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` (the same answer on every rank)."""
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        if by_steps or not self.every_minutes:
            return by_steps
        late = (time.monotonic() - self._last_save) / 60.0 >= self.every_minutes
        return self._broadcast(late)  # rank 0's clock decides, so ranks agree

    # ---- find ---------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest valid checkpoint (None if there is none); warns about corrupt ones.

        Every rank verifies the CRC32 of a share of the files, so the check scales with ranks.
        Corrupt checkpoints newer than the one returned are renamed ``step_….corrupt`` (kept for
        inspection, no longer counted by ``keep_last`` or considered again).
        """
        skipped = []
        for path in list_checkpoints(self.directory):
            problem = None
            try:
                meta = CheckpointMeta.read(path)
                if meta.format != FORMAT_VERSION:
                    problem = f"format {meta.format}, this version reads {FORMAT_VERSION}"
                elif ".metadata" not in meta.files:
                    problem = "no DCP .metadata recorded"
                else:
                    problem = check_files(path, meta, sorted(meta.files)[self.rank :: self.world_size])
            except (OSError, ValueError, TypeError, KeyError) as e:
                problem = f"unreadable {META_FILE}: {e}"
            if self._all_ok(problem is None):
                if self.rank == 0:
                    for bad in skipped:
                        os.rename(bad, bad.with_name(bad.name + ".corrupt"))
                self._barrier()
                return path
            skipped.append(path)
            if self.rank == 0:
                warnings.warn(f"skipping corrupt or incomplete checkpoint {path}: {problem or 'bad on another rank'}",
                              stacklevel=2)
        return None

    # ---- save ---------------------------------------------------------------------------------

    def save(self, model: nn.Module, optimizer: KeyedOptimizer, position: TrainPosition) -> Path:
        """Writes ``CK/step_<step>`` atomically (collective: every rank calls it).

        Raises:
            CheckpointError: the write failed on some rank (e.g. disk full); the partial
                directory is removed and the previous checkpoints are intact.
        """
        final = self.directory / f"{STEP_PREFIX}{position.step:08d}"
        tmp = self.directory / f"{TMP_PREFIX}{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        error = None
        try:
            dcp.save(self._app_state(model, optimizer), checkpoint_id=str(tmp), process_group=self.pg)
            torch.save(_rng_state(), tmp / f"rank_{self.rank:05d}.pt")
        except (Exception, CheckpointException) as e:  # DCP raises a failure on any rank on every rank
            error = _root_cause(e)
        ok = self._all_ok(error is None)
        if ok:
            positions = self._gather({"rank": self.rank, "epoch": position.epoch, "batches": position.epoch_batches,
                                      "rows": position.epoch_batches * int(self.run_info.get("batch_size", 0))})
            if self.rank == 0:
                try:
                    self._finalize(tmp, final, position, positions)
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
            error = self._broadcast(error)
            ok = error is None
        if not ok:
            errors = [e for e in self._gather(error) if e]
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = list_checkpoints(self.directory)
            raise CheckpointError(
                f"writing checkpoint {final} failed: {errors[0] if errors else 'on another rank'}; "
                f"partial files removed, previous checkpoint "
                f"{'intact: ' + str(previous[0]) if previous else 'none'}"
            )
        self._last_save = time.monotonic()
        self._barrier()
        return final

    def _finalize(self, tmp: Path, final: Path, position: TrainPosition, positions: list) -> None:
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(tmp))] = {"size": p.stat().st_size, "crc32": _crc32(p)}
        meta = CheckpointMeta(
            format=FORMAT_VERSION, step=position.step, epoch=position.epoch, epoch_batches=position.epoch_batches,
            world_size=self.world_size, batch_size=int(self.run_info.get("batch_size", 0)),
            schema_fingerprint=str(self.run_info.get("schema_fingerprint", "")),
            model=self.run_info.get("model", {}), optim=self.run_info.get("optim", {}),
            loss=self.run_info.get("loss", {}), plan=self.plan,
            plan_summary=self.plan_summary, data_positions=positions, history=position.history, files=files,
            rows_seen=list(position.rows_seen), train=dict(self.run_info.get("train", {})),
            procedure=position.procedure, created=time.time(), torch_version=torch.__version__,
        )
        with open(tmp / (META_FILE + ".part"), "w") as f:
            json.dump(dataclasses.asdict(meta), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp / (META_FILE + ".part"), tmp / META_FILE)
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step (e.g. after a restart): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        for old in list_checkpoints(self.directory)[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------------

    def load(self, path: Path, model: nn.Module, optimizer: KeyedOptimizer) -> TrainPosition:
        """Restores model, optimizers and RNG from ``path``; returns the position to resume from.

        With the same world size and batch size the data position is exact. Otherwise each rank
        resumes the interrupted epoch after the same *fraction* of its batches (documented
        policy: samples may repeat or be skipped around the resume point).
        """
        meta = CheckpointMeta.read(path)
        notes = check_compatible(meta, path, self.run_info, self.plan, self.world_size)
        dense = _dense_optimizer(optimizer)
        # Lazy Adam state must exist, or DCP has nothing to load it into (a learning-rate
        # schedule's counter is in the state from the start: it does not count).
        if dense is not None and any(p not in dense.state for k, p in dense.params.items() if not k.startswith("__")):
            dense.init_state()
            for p in dense.params.values():  # init_state leaves zero grads behind
                p.grad = None
        state = self._app_state(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=self.pg)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"loading checkpoint {path} failed: {_root_cause(e)}") from e
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        rng = path / f"rank_{self.rank:05d}.pt"
        same_layout = meta.world_size == self.world_size
        if same_layout and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        epoch_batches = meta.epoch_batches
        batch_size = int(self.run_info.get("batch_size", meta.batch_size))
        if not same_layout or meta.batch_size != batch_size:
            epoch_batches = (meta.epoch_batches * meta.world_size * meta.batch_size) // (self.world_size * batch_size)
            notes.append(f"data position: {meta.world_size} ranks x batch {meta.batch_size} -> {self.world_size} x "
                         f"{batch_size}; resuming epoch {meta.epoch} at batch {epoch_batches} per rank "
                         f"(approximate: exact only with the same world size and batch size)")
        if self.rank == 0:
            for n in notes:
                print(f"checkpoint: {n}", flush=True)
        return TrainPosition(step=meta.step, epoch=meta.epoch, epoch_batches=epoch_batches, history=meta.history,
                             rows_seen=list(meta.rows_seen), procedure=dict(meta.procedure))

    @staticmethod
    def _app_state(model: nn.Module, optimizer: KeyedOptimizer) -> dict:
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def check_compatible(meta: CheckpointMeta, path: Path, run_info: dict, plan: dict | None, world_size: int) -> list[str]:
    """Raises :class:`CheckpointError` if checkpoint ``meta`` cannot be loaded into a run with
    ``run_info`` (see :class:`Checkpointer`), sharding ``plan`` (:func:`plan_tables`; None: not
    planned yet, skip the plan checks) and ``world_size``; returns notes for the log."""
    info = run_info
    problems = []
    plan_ = meta.plan if plan is None else plan
    if meta.schema_fingerprint != info.get("schema_fingerprint"):
        problems.append(f"dataset schema fingerprint {meta.schema_fingerprint} != this dataset's "
                        f"{info.get('schema_fingerprint')} (features, vocabularies or tasks changed)")
    diff = _dict_diff(meta.model, info.get("model", {}))
    if diff:
        problems.append(f"model config differs: {diff}")
    diff = _dict_diff(meta.loss, info.get("loss", {}))
    if diff:  # the schedule's weights are restored from the checkpoint: a changed config would be ignored
        problems.append(f"loss config differs: {diff}")
    for key in ("sparse_optimizer", "dense_optimizer"):
        if meta.optim.get(key) != info.get("optim", {}).get(key):
            problems.append(f"optim.{key} {meta.optim.get(key)!r} != {info.get('optim', {}).get(key)!r} "
                            f"(optimizer state layouts differ)")
    if set(meta.plan) != set(plan_):
        problems.append(f"tables differ: checkpoint has {sorted(set(meta.plan) - set(plan_))} not in "
                        f"this model, this model has {sorted(set(plan_) - set(meta.plan))} not in it")
    keep: dict[str, str] = {}  # table name -> the checkpoint's sharding type, for the hint
    before = len(problems)
    for table, old in meta.plan.items():
        new = plan_.get(table)
        if new is None or old == new:
            continue
        a, b = old["sharding_type"], new["sharding_type"]
        if not (a in _RESHARDABLE and b in _RESHARDABLE):
            name = table.rsplit(".", 1)[-1]  # the name --table-sharding / sharding.per_table use
            same = ""
            if a != b:
                keep[name] = a
            else:  # column_wise shard count is set by the embedding dim, so this is not a plan choice
                same = f" (resume on {meta.world_size} ranks, as written)"
            problems.append(f"table {table}: cannot reshard {a} x{old['num_shards']} -> {b} x{new['num_shards']}"
                            f"{same}")
    if len(problems) > before:
        kinds = set(keep.values())
        flags = (f"--sharding {next(iter(kinds))}" if len(kinds) == 1 and len(keep) == len(meta.plan) else
                 " ".join(f"--table-sharding {n}={t}" for n, t in sorted(keep.items())))
        problems.append("the optimizer state of data_parallel and column_wise tables does not map to another "
                        "layout (data_parallel tables are stepped by the dense optimizer, column_wise ones keep "
                        "state per column shard; only table_wise/row_wise/table_row_wise tables change layout)"
                        + (f"; to resume with a different world size or plan, keep those tables' layouts: {flags}"
                           if keep else ""))
    notes = []
    kinds = ("sparse_optimizer", "dense_optimizer")
    settings = ", ".join(d for d in (
        _dict_diff({k: v for k, v in meta.optim.items() if k not in kinds},
                   {k: v for k, v in info.get("optim", meta.optim).items() if k not in kinds}),
        _dict_diff(meta.train, info.get("train", {})) if meta.train and "train" in info else "",
    ) if d)
    if settings and info.get("allow_new_settings"):
        notes.append(f"continuing with new settings (--resume-with-new-settings): {settings}")
    elif settings:
        problems.append(f"run settings differ: {settings}; resume with the checkpoint's settings, pass "
                        f"--resume-with-new-settings to continue with the new ones, or use another --checkpoint-dir")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this run:\n  - " + "\n  - ".join(problems))
    if meta.world_size != world_size or meta.plan != plan_:
        notes.append(f"resharding: written by {meta.world_size} ranks, loading into {world_size}")
    return notes


def _dict_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    changed = [k for k in keys if _norm(a.get(k)) != _norm(b.get(k))]
    return ", ".join(f"{k}: {_norm(a.get(k))!r} -> {_norm(b.get(k))!r}" for k in changed)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _root_cause(e: BaseException) -> str:
    """``Type: message`` of the innermost error (DCP wraps per-rank failures, naming the rank)."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
        return f"rank {rank}: {_root_cause(inner)}"
    while e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full: {type(e).__name__}: {e}"
    return f"{type(e).__name__}: {e}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def checkpoint_run_info(cfg: Any, schema: Any) -> dict:
    """What a checkpoint records about a ``TrainConfig`` run and checks on resume."""
    loss = getattr(cfg, "loss", None)
    return {"schema_fingerprint": schema.fingerprint(), "model": dataclasses.asdict(cfg.model),
            "optim": dataclasses.asdict(cfg.optim), "loss": dataclasses.asdict(loss) if loss is not None else {},
            "batch_size": cfg.batch_size,
            "train": {k: _plain(getattr(cfg, k)) for k in RESUME_SETTINGS if hasattr(cfg, k)
                      and (k != "csrec" or cfg.model.name in MASKED_SHARING_MODELS)
                      and (k != "grad" or cfg.grad.combiner != "ew")},
            "allow_new_settings": bool(getattr(cfg, "resume_with_new_settings", False))}


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# Run settings a resume must not change silently (the learning rates and clipping live in "optim").
# (``csrec``, the masked-sharing schedule, only for the models it applies to; ``grad``, the
# task-gradient combiner, only when it is not the plain summed loss.)
RESUME_SETTINGS = ("steps", "epochs", "seed", "shuffle", "shuffle_block_rows", "shuffle_buffer_rows", "csrec",
                   "grad")


def preflight(cfg: Any) -> Path | None:
    """Cheap check before any rank starts: the newest checkpoint in ``cfg.checkpoint_dir`` whose
    ``meta.json`` parses must fit ``cfg``'s dataset schema, model and optimizers (the sharding
    plan is checked later, once the ranks have planned). Returns that checkpoint, or None.

    Raises:
        CheckpointError: naming the checkpoint and every mismatch.
    """
    if not getattr(cfg, "checkpoint_dir", None):
        return None
    from recsys_mtl.data.interactions import load_training_schema

    for path in list_checkpoints(cfg.checkpoint_dir):
        try:
            meta = CheckpointMeta.read(path)
        except (OSError, ValueError, TypeError):
            continue  # corrupt: the ranks skip it with a warning
        check_compatible(meta, path, checkpoint_run_info(cfg, load_training_schema(cfg.data, cfg.model)), plan=None,
                         world_size=meta.world_size)
        return path
    return None
