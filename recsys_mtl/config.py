"""Typed, frozen run configuration. Unknown keys are errors; presets are named functions."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

SparseOptimizer = Literal["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam", "lamb"]
ShardingTypeName = Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]

def _require(ok: bool, field: str, allowed: str, value: Any, flag: str | None = None) -> None:
    """Raises ``ValueError`` naming the config field, its CLI flag and the allowed range."""
    if not ok:
        flag = flag or "--" + field.split(".")[-1].replace("_", "-")
        raise ValueError(f"{field} ({flag}) must be {allowed}, got {value!r}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


# The one list of each kind of name: the CLI's choices, the registries (models.MODELS,
# distributed.optim.DENSE_OPTIMIZERS, distributed.sharding.FUSED_OPTIMIZERS) and config validation
# all derive from these (the registries check their keys against them at import).
MODEL_NAMES: tuple[str, ...] = (
    "single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "stem", "ml_mmoe", "esmm", "aitm", "me_mmoe",
    "me_ple", "asymmetric_sharing", "customized_sharing", "cross_stitch", "sluice", "sparse_sharing", "csrec",
    "ml_csrec", "mf", "lightgcn", "ngcf",
)
# Models of interaction datasets (user–item pairs, pairwise tasks, full-ranking evaluation).
PAIR_MODELS: tuple[str, ...] = ("mf", "lightgcn", "ngcf")
# Pair models whose representations propagate over the train interaction graph (weighted bags).
GRAPH_MODELS: tuple[str, ...] = ("lightgcn", "ngcf")
MAX_GRAPH_LAYERS = 3
SPARSE_OPTIMIZERS: tuple[str, ...] = ("sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam", "lamb")
DENSE_OPTIMIZERS: tuple[str, ...] = ("adam", "adagrad", "sgd")
SHARDING_TYPES: tuple[str, ...] = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
STEM_SPECIFIC_FIELDS = ("all", "user", "item", "none")
LR_SCHEDULES: tuple[str, ...] = ("constant", "linear")
# keep_best metrics and whether larger is better; "TASK/METRIC" or the mean over tasks "METRIC".
BEST_METRICS: dict[str, bool] = {"auc": True, "logloss": False, "ne": False, "mse": False,
                                 **{f"{m}@{k}": True for m in ("recall", "ndcg", "hit") for k in (5, 10, 20, 40)}}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; each model reads the fields it needs.

    Args:
        name: lowercase paper name (``stem``, ``ple``, ``mmoe``, ...; see ``recsys_mtl.models.MODELS``).
        embedding_dim: width of every embedding table.
        bottom_layer_sizes: Shared-Bottom / single-task MLP widths; also the per-task bottoms of
            asymmetric/customized sharing, the columns of cross-stitch/sluice, AITM's task towers,
            and (followed by ``tower_layer_sizes``) ESMM's per-task networks.
        expert_layer_sizes: each expert's MLP widths.
        tower_layer_sizes: tower hidden widths.
        gate_layer_sizes: STEM-Net gate MLP widths.
        num_experts: MMoE/OMoE experts; ML-MMoE experts per level; ME-MMoE experts (one table set each).
        num_task_experts: PLE/CGC/ME-PLE/STEM task-specific experts per task.
        num_shared_experts: PLE/CGC/ME-PLE/STEM shared experts.
        num_levels: PLE / ME-PLE extraction levels, ML-MMoE expert levels.
        stem_gate_input: ``concat`` (paper), ``sum`` (reference code), ``task`` or ``shared``.
        stem_stop_gradient: STEM's stop-gradient on other tasks' experts.
        stem_specific_fields: which features get task-specific tables: ``all``, ``user``,
            ``item`` (by the schema's feature side), ``none`` (task experts read the shared
            embeddings) or a comma-separated list of feature names. ME-PLE uses the same selection.
        asymmetric_fusion: asymmetric sharing's fusion of a task's bottom with the previous
            task's: ``concat``, ``sum`` or ``mean``.
        cross_stitch_self_weight: initial diagonal of the cross-stitch / sluice ``α`` (1 = separate columns).
        sluice_num_subspaces: subspaces per layer of a sluice network.
        graph_layers: propagation layers ``K`` of the graph encoders over the train interactions:
            LightGCN ``0..3`` (0: MF as weighted bags); NGCF exactly 1 (a deeper NGCF layer needs
            every neighbour's own previous-layer state, not a bag of table rows).
        graph_max_neighbours: LightGCN: keep the N largest weights of each row of the propagation
            matrix ``Σ_k α_k Â^k`` (an approximation that bounds the bags of ``K >= 2``); 0: exact.
            NGCF's one-hop bags are always exact (the setting is ignored there).
    """

    name: str = "stem"
    embedding_dim: int = 16
    bottom_layer_sizes: tuple[int, ...] = (256, 128)
    expert_layer_sizes: tuple[int, ...] = (256, 128)
    tower_layer_sizes: tuple[int, ...] = (64,)
    gate_layer_sizes: tuple[int, ...] = (128, 64)
    num_experts: int = 4
    num_task_experts: int = 1
    num_shared_experts: int = 1
    num_levels: int = 2
    stem_gate_input: str = "concat"
    stem_stop_gradient: bool = True
    stem_specific_fields: str = "all"
    asymmetric_fusion: str = "concat"
    cross_stitch_self_weight: float = 0.9
    sluice_num_subspaces: int = 2
    graph_layers: int = 1
    graph_max_neighbours: int = 0

    def __post_init__(self) -> None:
        _require(self.name in MODEL_NAMES, "model.name", f"one of {', '.join(MODEL_NAMES)}", self.name, "--model")
        _require(_positive_int(self.embedding_dim), "model.embedding_dim", "a positive integer", self.embedding_dim)
        for name in ("bottom_layer_sizes", "expert_layer_sizes", "tower_layer_sizes", "gate_layer_sizes"):
            sizes = getattr(self, name)
            _require(all(_positive_int(x) for x in sizes), f"model.{name}", "positive integers", sizes)
        for name in ("num_experts", "num_shared_experts", "num_levels", "sluice_num_subspaces"):
            _require(_positive_int(getattr(self, name)), f"model.{name}", "a positive integer", getattr(self, name))
        _require(isinstance(self.num_task_experts, int) and self.num_task_experts >= 0, "model.num_task_experts",
                 "an integer >= 0", self.num_task_experts)
        _require(_finite(self.cross_stitch_self_weight), "model.cross_stitch_self_weight", "a finite number",
                 self.cross_stitch_self_weight)
        layers = self.graph_layers
        _require(isinstance(layers, int) and not isinstance(layers, bool) and 0 <= layers <= MAX_GRAPH_LAYERS,
                 "model.graph_layers", f"an integer in [0, {MAX_GRAPH_LAYERS}]", layers)
        _require(isinstance(self.graph_max_neighbours, int) and not isinstance(self.graph_max_neighbours, bool)
                 and self.graph_max_neighbours >= 0, "model.graph_max_neighbours", "an integer >= 0 (0: exact)",
                 self.graph_max_neighbours)
        if self.name == "ngcf" and layers != 1:
            why = ("a second NGCF layer needs every neighbour's own layer-1 state (a nonlinear function of its "
                   "neighbourhood), which is not a weighted bag of layer-0 table rows" if layers > 1
                   else "ngcf has one propagation layer (without propagation use mf)")
            raise ValueError(f"model.graph_layers (--graph-layers) must be 1 for ngcf, got {layers}: {why}")


@dataclass(frozen=True)
class ShardingConfig:
    """How the planner may shard tables, and the hardware it plans for.

    Args:
        sharding_type: constrain every table to this type; None: the default plan (below).
        per_table: ``{table_name: sharding_type}`` overrides (table names as in the plan).
        data_parallel_max_rows: the default plan's rule, the same at every world size (so its
            checkpoints reshard): a table with at most this many rows is replicated
            (``data_parallel``, stepped by the dense optimizer); a larger one is sharded by the
            planner with ``table_wise``, ``row_wise`` or ``table_row_wise`` (fused sparse
            optimizer). 0: shard every table.
        ddr_cap_gb: host memory (GiB) per rank the planner may fill; None: this host's memory
            (``min(RAM, cgroup limit)``) divided by the local ranks.
        hbm_cap_gb: device memory (GiB) per rank on GPUs; None: the GPU's total memory.
    """

    sharding_type: str | None = None
    per_table: dict[str, str] = field(default_factory=dict)
    data_parallel_max_rows: int = 16_384
    ddr_cap_gb: float | None = None
    hbm_cap_gb: float | None = None

    def __post_init__(self) -> None:
        for st in [self.sharding_type, *self.per_table.values()]:
            if st is not None and st not in SHARDING_TYPES:
                raise ValueError(f"unknown sharding type {st!r}; choose from {', '.join(SHARDING_TYPES)}")
        rows = self.data_parallel_max_rows
        _require(isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0, "sharding.data_parallel_max_rows",
                 "an integer >= 0", rows)
        for name in ("ddr_cap_gb", "hbm_cap_gb"):
            value = getattr(self, name)
            _require(value is None or (_finite(value) and value > 0), f"sharding.{name}", "a number > 0 (GiB)", value)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizers: a fused sparse optimizer applied in backward, and a dense one.

    Args:
        sparse_optimizer: fbgemm fused optimizer for model-parallel tables. ``adam``,
            ``partial_rowwise_adam`` and ``lamb`` are GPU-only in fbgemm.
        sparse_lr: its learning rate.
        dense_optimizer: ``adam``, ``adagrad`` or ``sgd`` (also steps data-parallel tables).
        dense_lr: its learning rate.
        grad_clip_norm: clip the dense gradients' global norm (None: no clipping).
        lr_warmup_steps: linear learning-rate warm-up from ``lr / N`` to ``lr`` over the first N
            optimizer steps, for both optimizers (0: none).
        lr_schedule: after the warm-up, ``constant`` or ``linear`` decay to ``lr * lr_min_ratio``
            at the run's last step.
        lr_min_ratio: the ``linear`` schedule's final learning rate as a fraction of ``lr``.
    """

    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    dense_optimizer: str = "adam"
    dense_lr: float = 1e-3
    grad_clip_norm: float | None = None
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.0

    def __post_init__(self) -> None:
        _require(self.sparse_optimizer in SPARSE_OPTIMIZERS, "optim.sparse_optimizer",
                 f"one of {', '.join(SPARSE_OPTIMIZERS)}", self.sparse_optimizer)
        _require(self.dense_optimizer in DENSE_OPTIMIZERS, "optim.dense_optimizer",
                 f"one of {', '.join(DENSE_OPTIMIZERS)}", self.dense_optimizer)
        for name in ("sparse_lr", "dense_lr"):
            v = getattr(self, name)
            _require(_finite(v) and v >= 0, f"optim.{name}", "a finite number >= 0", v)
        _require(self.grad_clip_norm is None or (_finite(self.grad_clip_norm) and self.grad_clip_norm > 0),
                 "optim.grad_clip_norm", "a finite number > 0 (or unset: no clipping)", self.grad_clip_norm)
        _require(isinstance(self.lr_warmup_steps, int) and not isinstance(self.lr_warmup_steps, bool)
                 and self.lr_warmup_steps >= 0, "optim.lr_warmup_steps", "an integer >= 0", self.lr_warmup_steps)
        _require(self.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", f"one of {', '.join(LR_SCHEDULES)}",
                 self.lr_schedule)
        _require(_finite(self.lr_min_ratio) and 0 <= self.lr_min_ratio <= 1, "optim.lr_min_ratio",
                 "a number in [0, 1]", self.lr_min_ratio)


@dataclass(frozen=True)
class LossConfig:
    """PLE's joint loss (§4.3): per-task sample spaces (always on) and task weights.

    Args:
        task_weights: initial weights ``w_k0`` by task name (default 1).
        task_weight_decay: updating ratios ``γ_k`` by task name: ``w_k(t) = w_k0 * γ_k ** t``
            (PLE Eq. 10; default 1, i.e. static weights).
        weight_unit: what ``t`` counts: ``epoch`` (the paper's equation) or ``step``.
    """

    task_weights: dict[str, float] = field(default_factory=dict)
    task_weight_decay: dict[str, float] = field(default_factory=dict)
    weight_unit: str = "epoch"

    def __post_init__(self) -> None:
        for task, w in self.task_weights.items():
            if not (_finite(w) and w >= 0):  # a negative weight trains the task backwards
                raise ValueError(f"loss.task_weights (--task-weight {task}=W) must be a finite number >= 0, got {w!r}")
        for task, g in self.task_weight_decay.items():
            if not (_finite(g) and g > 0):
                raise ValueError(f"loss.task_weight_decay (--task-weight-decay {task}=GAMMA) must be a finite "
                                 f"number > 0, got {g!r}")
        if self.weight_unit not in ("epoch", "step"):
            raise ValueError(f"loss.weight_unit must be 'epoch' or 'step', got {self.weight_unit!r}")


MASKED_SHARING_MODELS: tuple[str, ...] = ("sparse_sharing", "csrec", "ml_csrec")  # trained by the csrec schedule
CSREC_CONTRASTIVE: tuple[str, ...] = ("random_reverse", "shared_random_reverse", "conflicted_random_reverse")
CSREC_MODES: tuple[str, ...] = ("reference", "fused")
CSREC_TASK_TERMS: tuple[str, ...] = ("loss_r", "loss")


@dataclass(frozen=True)
class CSRecConfig:
    """The masked-sharing schedule of ``sparse_sharing``, ``csrec`` and ``ml_csrec`` (CSRec,
    Bai et al. WWW'22, Algorithm 1; Sparse Sharing, Sun et al. AAAI'20). Steps are optimizer
    steps counted from the start of the run, and are part of ``--steps`` / ``--epochs``.

    Args:
        warmup_steps: joint training of the dense shared bottom on all tasks first.
        prune_round_steps: training steps of one pruning round of one task (task ``t`` alone,
            on its current mask, from the warm-up weights).
        prune_rate: ``α``, the fraction of a layer's surviving weights pruned by magnitude after
            each round.
        min_sparsity: ``ε``, a mask must have at least this fraction of zeros to be kept.
        prune_rounds: rounds per task (None: the rounds that reach ``min_sparsity``, plus one, so
            the best of two qualifying masks by validation is kept).
        contrastive: CSRec's contrastive strategy (§3.3.5): ``random_reverse``,
            ``shared_random_reverse`` or ``conflicted_random_reverse``.
        reverse_ratio: probability that a candidate weight of the mask is reversed.
        contrastive_loss: CSRec's contrastive term (off: the CSRec(AT) ablation). Sparse Sharing
            never has it.
        mode: ``reference``: the paper's alternating steps, one optimizer step per task per batch;
            ``fused``: every task's masked gradient in one step, all 2T subnets of a layer in one
            op (this is also the CSRec(CL) ablation: contrastive learning without alternation).
        task_term: the task-mask term of Eq. 6, ``loss_r`` (sigmoid(ln loss), as written) or the
            plain ``loss``.
        analysis_every: record the sharing and conflict ratios every N steps.
    """

    warmup_steps: int = 100
    prune_round_steps: int = 50
    prune_rate: float = 0.1
    min_sparsity: float = 0.4
    prune_rounds: int | None = None
    contrastive: str = "random_reverse"
    reverse_ratio: float = 0.1
    contrastive_loss: bool = True
    mode: str = "reference"
    task_term: str = "loss_r"
    analysis_every: int = 20

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "prune_round_steps", "analysis_every"):
            _require(_positive_int(getattr(self, name)), f"csrec.{name}", "a positive integer", getattr(self, name),
                     "--csrec-" + name.replace("_", "-"))
        _require(_finite(self.prune_rate) and 0 < self.prune_rate < 1, "csrec.prune_rate", "in (0, 1)",
                 self.prune_rate, "--csrec-prune-rate")
        _require(_finite(self.min_sparsity) and 0 < self.min_sparsity < 1, "csrec.min_sparsity", "in (0, 1)",
                 self.min_sparsity, "--csrec-min-sparsity")
        _require(self.prune_rounds is None or _positive_int(self.prune_rounds), "csrec.prune_rounds",
                 "a positive integer", self.prune_rounds, "--csrec-prune-rounds")
        _require(self.contrastive in CSREC_CONTRASTIVE, "csrec.contrastive", f"one of {', '.join(CSREC_CONTRASTIVE)}",
                 self.contrastive, "--csrec-contrastive")
        _require(_finite(self.reverse_ratio) and 0 <= self.reverse_ratio <= 1, "csrec.reverse_ratio", "in [0, 1]",
                 self.reverse_ratio, "--csrec-reverse-ratio")
        _require(self.mode in CSREC_MODES, "csrec.mode", f"one of {', '.join(CSREC_MODES)}", self.mode,
                 "--csrec-mode")
        _require(self.task_term in CSREC_TASK_TERMS, "csrec.task_term", f"one of {', '.join(CSREC_TASK_TERMS)}",
                 self.task_term, "--csrec-task-term")


GRAD_COMBINERS: tuple[str, ...] = (
    "ew", "pmtrec", "graddrop", "pcgrad", "gradvac", "cagrad", "aligned_mtl", "nash_mtl", "rlw",
)
GRAD_STATS: tuple[str, ...] = ("global", "local")


@dataclass(frozen=True)
class GradConfig:
    """How the task gradients are combined in each step (``--grad-combiner``).

    Args:
        combiner: ``ew`` (the summed loss: one ordinary backward), ``pmtrec`` (PMTRec's per-row
            pooling of the embedding-row gradients, Alg. 1) or a gradient baseline from
            ``torchjd`` (``graddrop``, ``pcgrad``, ``gradvac``, ``cagrad``, ``aligned_mtl``,
            ``nash_mtl``, ``rlw``), applied once to the embedding rows of the batch and once to
            the dense parameters.
        main_task: PMTRec's main task (task focusing multiplies its row norms by ``α^s``);
            None: the schema's first task.
        alpha: PMTRec's task-focusing base ``α`` (Eq. 4); 1 turns task focusing off.
        tau: PMTRec's softmax temperature ``τ`` (Eq. 5); 1 turns magnitude balancing off.
        stats: ``global``: row statistics over the global batch (the per-task row gradients are
            exchanged between ranks, as if one process trained on every rank's rows);
            ``local``: over each rank's own batch (no exchange).
        cagrad_c: CAGrad's ball radius ``c``.
        nash_max_norm: Nash-MTL's clipping of the combined gradient's norm (0: none).
    """

    combiner: str = "ew"
    main_task: str | None = None
    alpha: float = 1.1
    tau: float = 1e-3
    stats: str = "global"
    cagrad_c: float = 0.5
    nash_max_norm: float = 1.0

    def __post_init__(self) -> None:
        _require(self.combiner in GRAD_COMBINERS, "grad.combiner", f"one of {', '.join(GRAD_COMBINERS)}",
                 self.combiner, "--grad-combiner")
        _require(_finite(self.alpha) and self.alpha > 0, "grad.alpha", "a finite number > 0", self.alpha,
                 "--pmtrec-alpha")
        _require(_finite(self.tau) and self.tau > 0, "grad.tau", "a finite number > 0", self.tau, "--pmtrec-tau")
        _require(self.stats in GRAD_STATS, "grad.stats", f"one of {', '.join(GRAD_STATS)}", self.stats,
                 "--grad-stats")
        _require(_finite(self.cagrad_c) and self.cagrad_c >= 0, "grad.cagrad_c", "a finite number >= 0",
                 self.cagrad_c, "--cagrad-c")
        _require(_finite(self.nash_max_norm) and self.nash_max_norm >= 0, "grad.nash_max_norm",
                 "a finite number >= 0", self.nash_max_norm, "--nash-max-norm")


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Args:
        data: dataset directory (schema.json + train/ + eval/).
        output_dir: where metrics.json and sharding_plan.txt go.
        batch_size: per-rank batch size.
        epochs: passes over the train split (ignored when ``steps`` is set).
        steps: stop after this many steps per rank.
        eval_every: evaluate every N steps (0: only at the end).
        eval_outputs: after the final evaluation, gather every eval row's predictions to rank 0
            (``eval_predictions.parquet``, gAUC by the schema's user id feature) and the gate
            weights (``expert_utilisation.json``/``.png``); off for eval splits too big for memory.
        seed: model initialisation and data order seed.
        shuffle: shuffle the training rows every epoch (seeded by ``seed`` and the epoch): a global
            permutation of row blocks, the same on every rank before the rows are split, then an
            in-memory shuffle buffer per worker. False: the stored order.
        shuffle_block_rows: rows per block of the global permutation (blocks are row ranges inside
            row groups; blocks smaller than the row groups cost extra decoding).
        shuffle_buffer_rows: rows of the in-memory shuffle buffer (one window of a rank's rows);
            memory per DataLoader worker ≈ this many rows × the row size.
        num_workers: DataLoader workers per rank.
        log_every: progress bar refresh period in steps.
        pipeline: ``sparse_dist`` (TrainPipelineSparseDist) or ``base`` (no overlap).
        checkpoint_dir: DCP checkpoint directory (on a filesystem every rank sees); the run
            resumes from its newest valid checkpoint when there is one. None: no checkpoints.
        checkpoint_every_steps: save every N steps (None: only at the end / by time).
        checkpoint_every_minutes: also save when this many minutes passed since the last save.
        keep_last: checkpoints kept in ``checkpoint_dir`` (older ones are deleted).
        resume_with_new_settings: resume a checkpoint whose run settings (steps, epochs, seed,
            shuffle, learning rates, clipping) differ from this config, continuing with the new
            ones; without it such a resume is refused, naming the differences.
        keep_best: keep the model of the best evaluation so far in ``OUTPUT/best_model`` (a DCP
            checkpoint like ``final_model``), by ``TASK/METRIC`` (``click/auc``) or ``METRIC``
            (the mean over tasks); metrics: auc, gauc (larger is better), logloss, ne, mse
            (smaller). Needs ``eval_every``.
        early_stop_patience: stop when ``keep_best``'s metric has not improved for this many
            evaluations in a row (None: never).
        compile_head: run the training steps with the dense head compiled: everything after the
            embedding lookups (feature assembly, experts, gates, towers, loss) as one
            ``torch.compile`` graph, the lookups eager (:mod:`recsys_mtl.train.compiled`). None
            (the default): compiled on CPU hosts, where it was measured faster on every workload,
            eager on CUDA hosts until it is measured there; True / False force it. The first
            step compiles (10-40 s on a small CPU); evaluation stays eager, and so do the models
            and runs :func:`recsys_mtl.train.compiled.eager_reason` names (said on stderr when
            ``True`` asked for it). Not a resume setting: a run may resume with or without it.
    """

    data: str
    output_dir: str
    batch_size: int = 512
    epochs: int = 1
    steps: int | None = None
    eval_every: int = 0
    eval_outputs: bool = True
    seed: int = 0
    shuffle: bool = True
    shuffle_block_rows: int = 16_384
    shuffle_buffer_rows: int = 65_536
    num_workers: int = 0
    log_every: int = 10
    pipeline: str = "sparse_dist"
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = None
    keep_last: int = 3
    resume_with_new_settings: bool = False
    keep_best: str | None = None
    early_stop_patience: int | None = None
    compile_head: bool | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    csrec: CSRecConfig = field(default_factory=CSRecConfig)
    grad: GradConfig = field(default_factory=GradConfig)

    def __post_init__(self) -> None:
        _require(_positive_int(self.batch_size), "batch_size", "a positive integer", self.batch_size)
        _require(_positive_int(self.epochs), "epochs", "a positive integer", self.epochs)
        _require(self.steps is None or _positive_int(self.steps), "steps", "a positive integer", self.steps)
        _require(isinstance(self.eval_every, int) and self.eval_every >= 0, "eval_every",
                 "an integer >= 0 (0: evaluate at the end only)", self.eval_every)
        _require(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "an integer >= 0",
                 self.num_workers)
        _require(_positive_int(self.log_every), "log_every", "a positive integer", self.log_every)
        _require(_positive_int(self.shuffle_block_rows), "shuffle_block_rows", "a positive integer",
                 self.shuffle_block_rows)
        _require(_positive_int(self.shuffle_buffer_rows), "shuffle_buffer_rows", "a positive integer",
                 self.shuffle_buffer_rows)
        _require(self.checkpoint_every_steps is None or _positive_int(self.checkpoint_every_steps),
                 "checkpoint_every_steps", "a positive integer", self.checkpoint_every_steps)
        _require(self.checkpoint_every_minutes is None
                 or (_finite(self.checkpoint_every_minutes) and self.checkpoint_every_minutes > 0),
                 "checkpoint_every_minutes", "a finite number > 0", self.checkpoint_every_minutes)
        _require(_positive_int(self.keep_last), "keep_last", "a positive integer", self.keep_last)
        if self.keep_best is not None:
            metric = self.keep_best.rpartition("/")[2]
            _require(isinstance(self.keep_best, str) and metric in BEST_METRICS, "keep_best",
                     f"TASK/METRIC or METRIC with METRIC one of {', '.join(BEST_METRICS)}", self.keep_best)
            _require(self.eval_every > 0, "eval_every", "> 0 with --keep-best (the best is chosen at evaluations)",
                     self.eval_every)
        _require(self.early_stop_patience is None or _positive_int(self.early_stop_patience),
                 "early_stop_patience", "a positive integer", self.early_stop_patience)
        _require(self.early_stop_patience is None or self.keep_best is not None, "keep_best",
                 "set with --early-stop-patience (the metric that must improve)", self.keep_best)
        _require(self.compile_head is None or isinstance(self.compile_head, bool), "compile_head",
                 "true, false or null (compiled on CPU hosts)", self.compile_head)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of :meth:`TrainConfig.to_dict`, rejecting unknown keys at every level."""
    d = dict(d)
    model = _build(ModelConfig, d.pop("model", {}), "model")
    sharding = _build(ShardingConfig, d.pop("sharding", {}), "sharding")
    optim = _build(OptimConfig, d.pop("optim", {}), "optim")
    loss = _build(LossConfig, d.pop("loss", {}), "loss")
    csrec = _build(CSRecConfig, d.pop("csrec", {}), "csrec")
    grad = _build(GradConfig, d.pop("grad", {}), "grad")
    cfg = _build(TrainConfig, d, "train")
    return dataclasses.replace(cfg, model=model, sharding=sharding, optim=optim, loss=loss, csrec=csrec, grad=grad)


# ---- presets -------------------------------------------------------------------------------

def stem_paper(data: str, output_dir: str) -> TrainConfig:
    """STEM-Net as in the paper's TikTok setting, scaled to CPU: 8 shared + 1 specific expert."""
    return TrainConfig(
        data=data,
        output_dir=output_dir,
        batch_size=4096,
        model=ModelConfig(
            name="stem", embedding_dim=16, expert_layer_sizes=(512, 512, 512), tower_layer_sizes=(128, 64),
            gate_layer_sizes=(128, 64), num_shared_experts=8, num_task_experts=1,
        ),
        optim=OptimConfig(dense_lr=1e-3, grad_clip_norm=10.0),
    )


def quickstart(data: str, output_dir: str) -> TrainConfig:
    """The README's main job: a small STEM-Net, 3 epochs, about a minute on 2 CPU ranks."""
    return TrainConfig(
        data=data,
        output_dir=output_dir,
        batch_size=1024,
        epochs=3,
        model=ModelConfig(
            name="stem", embedding_dim=16, bottom_layer_sizes=(128, 64), expert_layer_sizes=(128, 64),
            tower_layer_sizes=(32,), gate_layer_sizes=(64,), num_shared_experts=2, num_task_experts=1,
        ),
    )


def csrec_census(data: str, output_dir: str) -> TrainConfig:
    """CSRec on Census-Income KDD (the converter's dataset, ~200k training rows) with the reference
    settings: embeddings 4, bottom [256, 128], towers [64, 32], Adam 1e-3, batch 256 per rank;
    10 epochs on 2 ranks (~3,900 steps): 390 warm-up steps, 2 tasks x 6 pruning rounds x 100
    steps, then the multi-task phase. ``--model sparse_sharing`` / ``shared_bottom`` with this
    preset train the baselines with the same budget."""
    return TrainConfig(
        data=data, output_dir=output_dir, batch_size=256, epochs=10,
        model=ModelConfig(name="csrec", embedding_dim=4, bottom_layer_sizes=(256, 128), tower_layer_sizes=(64, 32)),
        optim=OptimConfig(dense_lr=1e-3),
        csrec=CSRecConfig(warmup_steps=390, prune_round_steps=100),
    )


PRESETS = {"quickstart": quickstart, "stem_paper": stem_paper, "csrec_census": csrec_census}
