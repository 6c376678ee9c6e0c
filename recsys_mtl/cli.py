"""``recsys-mtl``: data generation, distributed training and benchmarks (docs/design.md §4)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import uuid
from pathlib import Path

from recsys_mtl.config import (
    BEST_METRICS,
    CSREC_CONTRASTIVE,
    CSREC_MODES,
    CSREC_TASK_TERMS,
    GRAD_COMBINERS,
    GRAD_STATS,
    DENSE_OPTIMIZERS,
    LR_SCHEDULES,
    MODEL_NAMES,
    PRESETS,
    SPARSE_OPTIMIZERS,
    SHARDING_TYPES,
    ModelConfig,
    OptimConfig,
    ShardingConfig,
    TrainConfig,
    train_config_from_dict,
)



def _host_memory_gib() -> float:
    from recsys_mtl.distributed.hardware import host_memory_bytes

    return host_memory_bytes() / 2**30


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only for real defaults: flags whose parser default is None take
    theirs from the config dataclasses (:func:`_config_defaults`) or say it in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def _config_defaults(parser: argparse.ArgumentParser) -> None:
    """Writes the TrainConfig / ModelConfig / OptimConfig default of every override flag (parser
    default None) into its help, so ``--help`` shows what a run really uses."""
    train = TrainConfig(data="", output_dir="")
    sources = {**{k: getattr(train.model, k) for k in _MODEL_FLAGS}, **{k: getattr(train.optim, k) for k in _OPTIM_FLAGS},
               **{k: getattr(train, k) for k in _TRAIN_FLAGS}, "model": train.model.name,
               **{"csrec_" + k: getattr(train.csrec, k) for k in _CSREC_FLAGS},
               **{flag: getattr(train.grad, k) for flag, k in _GRAD_FLAGS.items()}}
    for action in parser._actions:
        if action.default is None and sources.get(action.dest) is not None and "default" not in (action.help or ""):
            value = sources[action.dest]
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            action.help = f"{action.help + ' ' if action.help else ''}(default: {shown})"


# ---- data ----------------------------------------------------------------------------------

def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="generate or convert datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    synth = dsub.add_parser("synth", help="write a synthetic dataset (schema.json + parquet)",
                            formatter_class=_HelpFormatter)
    synth.add_argument("kind", choices=["recsys", "mmoe"],
                       help="recsys: users/items with shared + task-specific preferences; "
                            "mmoe: the MMoE/PLE synthetic regression benchmark")
    synth.add_argument("--out", required=True, help="dataset directory to write")
    synth.add_argument("--rows", type=int, default=None, help="total rows (train + eval)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--eval-fraction", type=float, default=0.1)
    g = synth.add_argument_group("recsys knobs")
    g.add_argument("--num-tasks", type=int, default=2)
    g.add_argument("--num-users", type=int, default=10_000)
    g.add_argument("--num-items", type=int, default=20_000)
    g.add_argument("--task-divergence", type=float, default=0.5,
                   help="0: tasks share one preference; 1: fully task-specific preferences")
    g.add_argument("--positive-rates", type=_floats, default=None,
                   help="per-task positive rates, e.g. 0.3,0.05 (like far rarer than click)")
    g.add_argument("--sample-space", choices=["cvr_after_click"], default=None,
                   help="task 1 defined only where task 0 is positive (ESMM-style)")
    g.add_argument("--num-dense", type=int, default=4)
    g = synth.add_argument_group("mmoe knobs")
    g.add_argument("--correlation", type=float, default=0.5, help="cosine of the two task weight vectors")
    g.add_argument("--c", type=float, default=1.0)
    g.add_argument("--m", type=int, default=10)
    g.add_argument("--d", type=int, default=512)
    synth.set_defaults(func=_cmd_synth)
    _add_convert(dsub)
    _add_pair_task(dsub)


def _cmd_synth(args: argparse.Namespace) -> int:
    from recsys_mtl.data.synth import generate_mmoe, generate_recsys

    if args.kind == "recsys":
        kw = dict(seed=args.seed, eval_fraction=args.eval_fraction, num_tasks=args.num_tasks,
                  num_users=args.num_users, num_items=args.num_items, task_divergence=args.task_divergence,
                  positive_rates=args.positive_rates, sample_space=args.sample_space, num_dense=args.num_dense)
        if args.rows is not None:
            kw["rows"] = args.rows
        schema = generate_recsys(args.out, **kw)
    else:
        kw = dict(seed=args.seed, eval_fraction=args.eval_fraction, correlation=args.correlation, c=args.c,
                  m=args.m, d=args.d)
        if args.rows is not None:
            kw["rows"] = args.rows
        schema = generate_mmoe(args.out, **kw)
    print(f"wrote {args.out}: {len(schema.sparse)} sparse, {len(schema.dense)} dense features, "
          f"tasks {', '.join(schema.task_names)}")
    return 0


def _add_convert(dsub: argparse._SubParsersAction) -> None:
    conv = dsub.add_parser(
        "convert", help="convert a raw public dataset (schema.json + parquet)",
        formatter_class=_HelpFormatter,
        description="Streams the raw files twice (vocabularies and train statistics, then writing). "
                    "Inputs by dataset: census-kdd: census-income.data/.test[.gz]; ali-ccp: "
                    "sample_skeleton_{train,test}.csv + common_features_{train,test}.csv; kuairand: "
                    "log_standard_*.csv, user_features_*.csv, video_features_basic_*.csv; icme2019: "
                    "final_track2_train.txt. See README 'Dataset converters'. ciao, epinions: rating.mat + "
                    "trustnetwork.mat (loaded whole; writes train/eval/test interactions, side/ trust and "
                    "item-category tables; see recsys_mtl.data.convert.trust).",
    )
    conv.add_argument("name", choices=["census-kdd", "ali-ccp", "kuairand", "icme2019", "ciao", "epinions"])
    conv.add_argument("--input", nargs="+", required=True, metavar="PATH", help="raw files (.gz allowed)")
    conv.add_argument("--out", required=True, help="dataset directory to write")
    conv.add_argument("--min-count", type=int, default=1,
                      help="values seen fewer times in the train rows map to id 0")
    conv.add_argument("--max-rows", type=int, default=None, help="read at most N rows of each sample file")
    conv.add_argument("--eval-fraction", type=float, default=0.1,
                      help="eval share for hash splits (files without a train/test role) and for the "
                           "kuairand date split")
    conv.add_argument("--seed", type=int, default=None,
                      help="seed of the hash split (default 0); ciao/epinions: seed of the shuffle before the "
                           "random split (default 2024)")
    conv.add_argument("--tasks", default=None,
                      help="census-kdd: income,marital[,education]; kuairand: comma list of log columns "
                           "(default is_click,is_like,is_follow,is_comment,is_forward,long_view)")
    conv.add_argument("--split-date", type=int, default=None, metavar="YYYYMMDD",
                      help="kuairand: eval = impressions on or after this date")
    conv.add_argument("--keep-instance-weight", action="store_true",
                      help="census-kdd: also write the instance weight as a column outside the schema")
    conv.add_argument("--row-group-size", type=int, default=16_384)
    conv.add_argument("--progress", action="store_true", help="progress bars on stderr")
    g = conv.add_argument_group("ciao / epinions")
    g.add_argument("--core", type=int, default=None, help="K-core: drop users/items with fewer than K interactions, "
                                                          "repeatedly (default 0: none)")
    g.add_argument("--split", type=_floats, default=None, metavar="TRAIN,EVAL,TEST",
                   help="fractions of the random split (default 0.6,0.2,0.2)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    conv.set_defaults(func=_cmd_convert)


def _cmd_convert_trust(args: argparse.Namespace) -> int:
    from recsys_mtl.data.convert.trust import DEFAULT_SEED, DEFAULT_SPLIT, convert_trust
    from recsys_mtl.data.schema import SchemaError

    foreign = [flag for flag, given in (("--tasks", args.tasks is not None), ("--max-rows", args.max_rows is not None),
                                        ("--split-date", args.split_date is not None),
                                        ("--keep-instance-weight", args.keep_instance_weight),
                                        ("--min-count", args.min_count != 1)) if given]
    if foreign:
        print(f"recsys-mtl data convert: error: {', '.join(foreign)} is not an option of {args.name}", file=sys.stderr)
        return 2
    try:
        schema = convert_trust(args.name, args.input, args.out,
                               seed=DEFAULT_SEED if args.seed is None else args.seed,
                               split=DEFAULT_SPLIT if args.split is None else args.split,
                               core=args.core or 0, overwrite=args.overwrite)
    except SchemaError as e:
        print(f"recsys-mtl data convert: error: {e}", file=sys.stderr)
        return 2
    n = schema.metadata["interactions"]
    print(f"wrote {args.out}: {n['train']} train / {n['eval']} eval / {n['test']} test interactions, "
          f"{schema.metadata['num_users']} users, {schema.metadata['num_items']} items, "
          f"{schema.metadata['trust_edges']} trust edges")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from recsys_mtl.data.convert import convert
    from recsys_mtl.data.schema import SchemaError

    if args.name in ("ciao", "epinions"):
        return _cmd_convert_trust(args)
    if args.core is not None or args.split is not None or args.overwrite:
        print(f"recsys-mtl data convert: error: --core, --split and --overwrite are options of ciao and epinions, "
              f"not of {args.name}", file=sys.stderr)
        return 2
    opts: dict = {"max_rows": args.max_rows, "eval_fraction": args.eval_fraction}
    if args.name != "kuairand":
        opts["seed"] = 0 if args.seed is None else args.seed
    if args.name in ("census-kdd", "kuairand"):
        opts["tasks"] = args.tasks
    elif args.tasks is not None:
        print(f"recsys-mtl data convert: error: --tasks is not an option of {args.name}", file=sys.stderr)
        return 2
    if args.name == "kuairand":
        opts["split_date"] = args.split_date
    if args.name == "census-kdd":
        opts["keep_weight"] = args.keep_instance_weight
    try:
        schema = convert(args.name, args.input, args.out, min_count=args.min_count,
                         row_group_size=args.row_group_size, progress=args.progress, **opts)
    except SchemaError as e:
        print(f"recsys-mtl data convert: error: {e}", file=sys.stderr)
        return 2
    rows = schema.metadata.get("rows", {})
    print(f"wrote {args.out}: {rows.get('train', 0)} train / {rows.get('eval', 0)} eval rows, "
          f"{len(schema.sparse)} sparse, {len(schema.dense)} dense features, tasks {', '.join(schema.task_names)}")
    return 0


def _add_pair_task(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser(
        "add-pair-task", help="declare an auxiliary pair task (co-view, co-buy, brand, ...) on an interaction dataset",
        formatter_class=_HelpFormatter,
        description="Adds a pairwise ranking task trained next to BPR: anchor = the batch row's user or item, "
                    "positive = one of its partners in the side table, negative = a random user or item. "
                    "--pairs: a parquet file of (anchor, partner) id pairs (e.g. item, co-viewed item); --groups: "
                    "a parquet file of (member, group) (partners: the other members of the group). Ids are the "
                    "dataset's ids (see vocab/). The table is checked, copied to side/NAME.parquet and the task "
                    "appended to schema.json; nothing is written when a check fails.")
    p.add_argument("data", help="interaction dataset directory (recsys-mtl data convert ciao|epinions)")
    p.add_argument("name", help="the new task's name")
    p.add_argument("--kind", choices=["user", "item"], required=True, help="what anchors and partners are")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", metavar="FILE", help="parquet of (anchor, partner) pairs")
    src.add_argument("--groups", metavar="FILE", help="parquet of (member, group), one row per member")
    p.add_argument("--columns", nargs=2, required=True, metavar=("A", "B"),
                   help="the two columns: anchor and partner, or member and group")
    p.add_argument("--symmetric", action="store_true", help="--pairs: every pair counts both ways")
    p.add_argument("--roles", nargs=2, default=None, metavar=("POS", "NEG"),
                   help="batch feature names of the positive and the negative (default NAME_KIND, neg_NAME_KIND)")
    p.add_argument("--overwrite", action="store_true", help="replace a task of that name")
    p.set_defaults(func=_cmd_add_pair_task)


def _cmd_add_pair_task(args: argparse.Namespace) -> int:
    from recsys_mtl.data.pair_tasks import add_pair_task
    from recsys_mtl.data.schema import SchemaError

    try:
        added = add_pair_task(args.data, args.name, args.kind, args.pairs or args.groups, tuple(args.columns),
                              groups=args.groups is not None, symmetric=args.symmetric,
                              roles=tuple(args.roles) if args.roles else None, overwrite=args.overwrite)
    except SchemaError as e:
        print(f"recsys-mtl data add-pair-task: error: {e}", file=sys.stderr)
        return 2
    t = added.task
    share = added.anchors_with_partner / max(added.anchors, 1)
    print(f"added task {t.name} to {args.data}: {t.kind} {t.source} ({added.pairs:,} {'pairs' if t.source == 'pairs' else 'members'}; "
          f"{added.anchors_with_partner:,} of {added.anchors:,} {t.kind}s ({share:.0%}) have a partner); roles "
          f"{t.positive}, {t.negative}; tasks now {', '.join(added.schema.task_names)}")
    return 0


# ---- train ---------------------------------------------------------------------------------

def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a sharded multi-task model",
        formatter_class=_HelpFormatter,
        description="Trains a model with TorchRec sharding and TrainPipelineSparseDist. With "
                    "--nproc-per-node N it starts N local ranks itself; launched by torchrun/torchx it "
                    "joins their process group. Writes OUT/metrics.json and OUT/sharding_plan.txt.",
    )
    p.add_argument("--data", required=True, help="dataset directory (schema.json, train/, eval/)")
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="model (default: stem, or the preset's)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="start from a named preset")
    p.add_argument("--config", default=None, help="JSON file with a full TrainConfig (flags override it)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="start this many local ranks")
    p.add_argument("--nnodes", type=int, default=1,
                   help="nodes; >1 only under torchx/torchrun (see launch/), which sets up the rendezvous")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="stop after N steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch size")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per rank")
    p.add_argument("--log-every", type=int, default=None,
                   help="every N steps: mean training loss and samples/s to the console, metrics.json's "
                        "train_log and TensorBoard (OUT/tensorboard, when installed) (default 10)")
    p.add_argument("--pipeline", choices=["sparse_dist", "base"], default=None)
    p.add_argument("--compile-head", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the dense head (everything after the embedding lookups, up to the loss) as one "
                        "torch.compile graph; the first step compiles (10-40 s); pair models, masked-sharing "
                        "models and --grad-combiner runs train eagerly. --no-compile-head: eager "
                        "(default: compiled on CPU hosts, eager on CUDA hosts)")
    p.add_argument("--debug", action="store_true",
                   help="print full tracebacks of data/config/checkpoint errors (default: one line per failing "
                        "rank, tracebacks in OUT/logs/)")
    p.add_argument("--no-eval-outputs", action="store_true",
                   help="skip eval_predictions.parquet, gAUC and expert utilisation (huge eval splits)")
    g = p.add_argument_group("data order")
    g.add_argument("--no-shuffle", action="store_true",
                   help="train in the stored row order (default: a seeded per-epoch shuffle)")
    g.add_argument("--shuffle-block-rows", type=int, default=None,
                   help="rows per block of the global per-epoch permutation (default 16384; blocks smaller "
                        "than the parquet row groups cost extra decoding)")
    g.add_argument("--shuffle-buffer-rows", type=int, default=None,
                   help="rows of the in-memory shuffle buffer per DataLoader worker (default 65536; memory "
                        "about this many rows x the row size)")
    g = p.add_argument_group("checkpoints and fault tolerance")
    g.add_argument("--checkpoint-dir", default=None,
                   help="DCP checkpoint directory (shared by all ranks); resumes from its newest valid checkpoint")
    g.add_argument("--checkpoint-every-steps", type=int, default=None, help="save every N steps")
    g.add_argument("--checkpoint-every-minutes", type=float, default=None, help="save every M minutes")
    g.add_argument("--keep-last", type=int, default=None, help="checkpoints to keep (default 3)")
    g.add_argument("--resume-with-new-settings", action="store_true",
                   help="resume a checkpoint even though --steps/--epochs/--seed/shuffle/learning rates/clipping "
                        "differ from its run, continuing with the new settings (default: refuse)")
    g.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc-per-node: restart all local ranks up to N times after a rank fails "
                        "(they resume from the last checkpoint); under torchx use --max_retries")
    g = p.add_argument_group("sharding")
    g.add_argument("--sharding", choices=SHARDING_TYPES, default=None,
                   help="constrain every table to one sharding type (None: the default plan, see "
                        "--data-parallel-max-rows)")
    g.add_argument("--table-sharding", action="append", default=[], metavar="TABLE=TYPE",
                   help="per-table sharding type; repeatable")
    g.add_argument("--data-parallel-max-rows", type=int, default=argparse.SUPPRESS, metavar="ROWS",
                   help=f"default plan: tables with at most ROWS rows are data_parallel, larger ones are "
                        f"table_wise/row_wise/table_row_wise as the planner chooses; the same at every world "
                        f"size, so checkpoints reshard; 0: shard every table "
                        f"(default: {ShardingConfig().data_parallel_max_rows})")
    g.add_argument("--ddr-cap-gb", type=float, default=argparse.SUPPRESS, metavar="GIB",
                   help=f"host memory per rank the planner may fill (default: this host's "
                        f"{_host_memory_gib():.1f} GiB divided by its local ranks); for ranks on other hardware")
    g.add_argument("--hbm-cap-gb", type=float, default=argparse.SUPPRESS, metavar="GIB",
                   help="GPU memory per rank the planner may fill (default: the GPU's total memory)")
    g = p.add_argument_group("optimizers")
    g.add_argument("--sparse-optimizer", choices=SPARSE_OPTIMIZERS, default=None,
                   help="fused optimizer of model-parallel tables (adam/partial_rowwise_adam/lamb: GPU only)")
    g.add_argument("--sparse-lr", type=float, default=None)
    g.add_argument("--dense-optimizer", choices=DENSE_OPTIMIZERS, default=None)
    g.add_argument("--dense-lr", type=float, default=None)
    g.add_argument("--grad-clip-norm", type=float, default=None)
    g.add_argument("--lr-warmup-steps", type=int, default=None, metavar="N",
                   help="linear learning-rate warm-up over the first N optimizer steps (both optimizers)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="after the warm-up: constant, or linear decay to lr x --lr-min-ratio at the last step")
    g.add_argument("--lr-min-ratio", type=float, default=None, metavar="R",
                   help="final learning rate of --lr-schedule linear, as a fraction of the learning rate")
    g = p.add_argument_group("model selection")
    g.add_argument("--keep-best", default=None, metavar="[TASK/]METRIC",
                   help="keep the best evaluated model in OUTPUT/best_model by this metric (click/auc, or auc: "
                        f"the mean over tasks; one of {', '.join(BEST_METRICS)}); needs --eval-every")
    g.add_argument("--early-stop-patience", type=int, default=None, metavar="EVALS",
                   help="stop when the --keep-best metric has not improved for this many evaluations")
    g = p.add_argument_group("loss (PLE joint loss: sample spaces always on)")
    g.add_argument("--task-weight", action="append", default=[], metavar="TASK=W",
                   help="initial loss weight w_k0 of a task (default 1); repeatable")
    g.add_argument("--task-weight-decay", action="append", default=[], metavar="TASK=GAMMA",
                   help="PLE Eq. 10 updating ratio: w_k(t) = w_k0 * gamma**t; repeatable")
    g.add_argument("--loss-weight-unit", choices=["epoch", "step"], default=None, help="what t counts in Eq. 10")
    g = p.add_argument_group("model")
    g.add_argument("--embedding-dim", type=int, default=None)
    g.add_argument("--expert-layer-sizes", type=_sizes, default=None, metavar="256,128")
    g.add_argument("--tower-layer-sizes", type=_sizes, default=None, metavar="64")
    g.add_argument("--bottom-layer-sizes", type=_sizes, default=None, metavar="256,128")
    g.add_argument("--gate-layer-sizes", type=_sizes, default=None, metavar="128,64")
    g.add_argument("--num-experts", type=int, default=None, help="MMoE/OMoE experts")
    g.add_argument("--num-task-experts", type=int, default=None)
    g.add_argument("--num-shared-experts", type=int, default=None)
    g.add_argument("--num-levels", type=int, default=None, help="PLE levels")
    g.add_argument("--stem-gate-input", choices=["concat", "sum", "task", "shared"], default=None)
    g.add_argument("--stem-no-stop-gradient", action="store_true", help="STEM ablation: no stop-gradient")
    g.add_argument("--stem-specific-fields", default=None,
                   help="task-specific tables (stem, me_ple) for: all, user, item, none or a comma list of features")
    g.add_argument("--asymmetric-fusion", choices=["concat", "sum", "mean"], default=None,
                   help="asymmetric_sharing: how a task's bottom is fused with the previous task's")
    g.add_argument("--cross-stitch-self-weight", type=float, default=None,
                   help="cross_stitch/sluice: initial diagonal of the alpha mixing matrices")
    g.add_argument("--sluice-num-subspaces", type=int, default=None, help="sluice: subspaces per layer")
    g.add_argument("--graph-layers", type=int, default=None, metavar="K",
                   help="lightgcn: propagation layers 0-3 over the train interactions (0: mf); ngcf: 1")
    g.add_argument("--graph-max-neighbours", type=int, default=None, metavar="N",
                   help="lightgcn: keep the N largest weights per row of the propagation matrix (0: exact)")
    g = p.add_argument_group("masked sharing (sparse_sharing, csrec, ml_csrec): warm-up, pruning, multi-task phase")
    g.add_argument("--csrec-warmup-steps", type=int, default=None, metavar="N",
                   help="joint training of the dense shared bottom first")
    g.add_argument("--csrec-prune-round-steps", type=int, default=None, metavar="N",
                   help="training steps of one pruning round of one task (from the warm-up weights)")
    g.add_argument("--csrec-prune-rate", type=float, default=None, metavar="ALPHA",
                   help="fraction of each layer's surviving weights pruned by magnitude per round")
    g.add_argument("--csrec-min-sparsity", type=float, default=None, metavar="EPS",
                   help="a kept mask has at least this fraction of zeros")
    g.add_argument("--csrec-prune-rounds", type=int, default=None, metavar="R",
                   help="rounds per task (default: the rounds that reach --csrec-min-sparsity, plus one)")
    g.add_argument("--csrec-contrastive", choices=CSREC_CONTRASTIVE, default=None,
                   help="csrec: how contrastive masks are drawn from a task's mask")
    g.add_argument("--csrec-reverse-ratio", type=float, default=None, metavar="P",
                   help="csrec: probability a candidate weight of the mask is reversed")
    g.add_argument("--csrec-no-contrastive", action="store_true",
                   help="csrec: no contrastive term (the CSRec(AT) ablation)")
    g.add_argument("--csrec-mode", choices=CSREC_MODES, default=None,
                   help="csrec: reference = the paper's alternating per-task steps; fused = all tasks' masked "
                        "gradients in one step, all subnets of a layer in one op (also the CSRec(CL) ablation)")
    g.add_argument("--csrec-task-term", choices=CSREC_TASK_TERMS, default=None,
                   help="csrec: the task-mask term of Eq. 6: loss_r = sigmoid(ln loss) (as written) or loss")
    g.add_argument("--csrec-analysis-every", type=int, default=None, metavar="N",
                   help="record the sharing and conflict ratios every N steps")
    g = p.add_argument_group("task-gradient combination: PMTRec and the gradient baselines")
    g.add_argument("--grad-combiner", choices=GRAD_COMBINERS, default=None,
                   help="ew: the summed loss; pmtrec: per-row pooling of the embedding-row gradients; the others: "
                        "torchjd's aggregators over the batch's embedding rows and over the dense parameters")
    g.add_argument("--pmtrec-main-task", default=None, metavar="TASK",
                   help="pmtrec: the main task (task focusing); default: the first task")
    g.add_argument("--pmtrec-alpha", type=float, default=None, metavar="ALPHA",
                   help="pmtrec: task-focusing base, the main task's norms x ALPHA^epoch (1: focusing off)")
    g.add_argument("--pmtrec-tau", type=float, default=None, metavar="TAU",
                   help="pmtrec: softmax temperature of gradient magnitude balancing (1: balancing off)")
    g.add_argument("--grad-stats", choices=GRAD_STATS, default=None,
                   help="row statistics over the global batch (rows exchanged between ranks) or each rank's own")
    g.add_argument("--cagrad-c", type=float, default=None, metavar="C", help="cagrad: ball radius c")
    g.add_argument("--nash-max-norm", type=float, default=None, metavar="N",
                   help="nash_mtl: clip the combined gradient's norm (0: no clipping)")
    _config_defaults(p)
    p.set_defaults(func=_cmd_train)


_MODEL_FLAGS = ("embedding_dim", "expert_layer_sizes", "tower_layer_sizes", "bottom_layer_sizes",
                "gate_layer_sizes", "num_experts", "num_task_experts", "num_shared_experts", "num_levels",
                "stem_gate_input", "stem_specific_fields", "asymmetric_fusion", "cross_stitch_self_weight",
                "sluice_num_subspaces", "graph_layers", "graph_max_neighbours")
_CSREC_FLAGS = ("warmup_steps", "prune_round_steps", "prune_rate", "min_sparsity", "prune_rounds", "contrastive",
                "reverse_ratio", "mode", "task_term", "analysis_every")
_GRAD_FLAGS = {"grad_combiner": "combiner", "pmtrec_main_task": "main_task", "pmtrec_alpha": "alpha",
               "pmtrec_tau": "tau", "grad_stats": "stats", "cagrad_c": "cagrad_c", "nash_max_norm": "nash_max_norm"}
_OPTIM_FLAGS = ("sparse_optimizer", "sparse_lr", "dense_optimizer", "dense_lr", "grad_clip_norm", "lr_warmup_steps",
                "lr_schedule", "lr_min_ratio")
_TRAIN_FLAGS = ("epochs", "steps", "batch_size", "eval_every", "log_every", "seed", "shuffle_block_rows", "shuffle_buffer_rows",
                "num_workers", "pipeline", "checkpoint_dir",
                "checkpoint_every_steps", "checkpoint_every_minutes", "keep_last", "keep_best", "early_stop_patience")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from (preset or --config) then the explicit flags."""
    if args.config:
        cfg = train_config_from_dict(json.loads(Path(args.config).read_text()))
        cfg = dataclasses.replace(cfg, data=args.data, output_dir=args.output_dir)
    elif args.preset:
        cfg = PRESETS[args.preset](args.data, args.output_dir)
    else:
        cfg = TrainConfig(data=args.data, output_dir=args.output_dir)
    model_kw = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}
    if args.model:
        model_kw["name"] = args.model
    if args.stem_no_stop_gradient:
        model_kw["stem_stop_gradient"] = False
    optim_kw = {k: getattr(args, k) for k in _OPTIM_FLAGS if getattr(args, k) is not None}
    train_kw = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    if args.no_eval_outputs:
        train_kw["eval_outputs"] = False
    if args.no_shuffle:
        train_kw["shuffle"] = False
    if args.resume_with_new_settings:
        train_kw["resume_with_new_settings"] = True
    if args.compile_head is not None:
        train_kw["compile_head"] = args.compile_head
    csrec_kw = {k: getattr(args, "csrec_" + k) for k in _CSREC_FLAGS if getattr(args, "csrec_" + k) is not None}
    if args.csrec_no_contrastive:
        csrec_kw["contrastive_loss"] = False
    grad_kw = {k: getattr(args, flag) for flag, k in _GRAD_FLAGS.items() if getattr(args, flag) is not None}
    per_table = dict(cfg.sharding.per_table)
    for item in args.table_sharding:
        if "=" not in item:
            raise SystemExit(f"--table-sharding expects TABLE=TYPE, got {item!r}")
        name, st = item.split("=", 1)
        per_table[name] = st
    sharding = dataclasses.replace(
        cfg.sharding, per_table=per_table, **{k: v for k, v in (
            ("sharding_type", args.sharding), ("data_parallel_max_rows", getattr(args, "data_parallel_max_rows", None)),
            ("ddr_cap_gb", getattr(args, "ddr_cap_gb", None)), ("hbm_cap_gb", getattr(args, "hbm_cap_gb", None)),
        ) if v is not None}
    )
    loss = dataclasses.replace(
        cfg.loss,
        task_weights={**cfg.loss.task_weights, **_name_values(args.task_weight, "--task-weight")},
        task_weight_decay={**cfg.loss.task_weight_decay, **_name_values(args.task_weight_decay, "--task-weight-decay")},
        **({"weight_unit": args.loss_weight_unit} if args.loss_weight_unit else {}),
    )
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **model_kw),
        optim=dataclasses.replace(cfg.optim, **optim_kw),
        sharding=sharding,
        loss=loss,
        csrec=dataclasses.replace(cfg.csrec, **csrec_kw),
        grad=dataclasses.replace(cfg.grad, **grad_kw),
        **train_kw,
    )


def _name_values(items: list[str], flag: str) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"{flag} expects TASK=NUMBER, got {item!r}")
    return out


ERROR_DIR = "logs"  # OUT/logs/error_rank_R.{txt,log}: each failing rank's line and full traceback


def _train_entry(cfg_dict: dict, debug: bool = False) -> None:
    # Module-level so the elastic launcher can pickle it into each rank.
    from recsys_mtl.data.schema import SchemaError
    from recsys_mtl.distributed.sharding import ShardingPlanError
    from recsys_mtl.train.checkpoint import CheckpointError
    from recsys_mtl.train.locks import LockError
    from recsys_mtl.train.loop import NonFiniteLossError, TrainingStopped, train

    rank = os.environ.get("RANK", "0")
    try:
        train(train_config_from_dict(cfg_dict))
    except TrainingStopped as e:  # SIGTERM: a clean stop after the checkpoint, no traceback
        print(f"\nrecsys-mtl train: rank {rank}: {e}", file=sys.stderr, flush=True)
        sys.exit(143)
    except (SchemaError, CheckpointError, NonFiniteLossError, LockError, ShardingPlanError) as e:
        # Errors of ours: one line per failing rank, the traceback to OUT/logs (or the screen with --debug).
        kinds = ((SchemaError, "data error"), (CheckpointError, "checkpoint error"),
                 (ShardingPlanError, "sharding error"))
        kind = next((name for cls, name in kinds if isinstance(e, cls)), "error")
        line = f"recsys-mtl train: {kind} on rank {rank}: " + " ".join(str(e).split())
        if debug:
            raise
        _write_error(Path(cfg_dict["output_dir"]), rank, line)
        print("\n" + line, file=sys.stderr, flush=True)  # a new line: never glued to the progress bar
        sys.exit(2)


def _write_error(out_dir: Path, rank: str, line: str) -> None:
    import traceback

    try:
        d = out_dir / ERROR_DIR
        d.mkdir(parents=True, exist_ok=True)
        (d / f"error_rank_{rank}.log").write_text(traceback.format_exc())
        (d / f"error_rank_{rank}.txt").write_text(line + "\n")
    except OSError:
        pass  # the output directory itself may be the problem; the line still goes to stderr


def _check_writable(flag: str, directory: Path) -> None:
    """Creates ``directory`` if needed and writes a probe file: an unwritable output or checkpoint
    directory is found before any compute, not at the first save."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{flag} {directory} is not writable: {e.strerror or e}") from e


def _check_unlocked(flag: str, directory: Path) -> None:
    """Refuses, before any rank starts, a directory that a running job has locked."""
    from recsys_mtl.train.locks import DirLock

    DirLock(directory, flag).check_free()


def _inside_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _check_process_env() -> None:
    """The per-machine settings read from the environment (README, Configuration), validated.

    Raises:
        ValueError: ``RECSYS_MTL_CPU_GEMM`` or ``RECSYS_MTL_MALLOC`` has a value they do not take.
    """
    from recsys_mtl.distributed import malloc
    from recsys_mtl.ops import cpu_gemm

    cpu_gemm.check_env()
    malloc.check_env()


def _cmd_train(args: argparse.Namespace) -> int:
    if args.nproc_per_node is not None and args.nproc_per_node <= 0:
        print(f"recsys-mtl train: error: --nproc-per-node must be a positive integer, got {args.nproc_per_node}",
              file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"recsys-mtl train: error: {e}", file=sys.stderr)
        return 2
    from recsys_mtl.data.interactions import check_interactions, is_interactions
    from recsys_mtl.data.reader import check_dataset
    from recsys_mtl.data.schema import Schema, SchemaError

    from recsys_mtl.train.checkpoint import CheckpointError, preflight
    from recsys_mtl.train.locks import LockError
    from recsys_mtl.train.loop import check_schedules

    try:
        _check_process_env()  # RECSYS_MTL_CPU_GEMM / RECSYS_MTL_MALLOC, before any rank starts
        if is_interactions(Schema.load(cfg.data)):
            check_interactions(cfg.data)  # pairs in range, side tables present
        else:
            check_dataset(cfg.data)  # footers and column types only: fails fast, before any rank starts
        preflight(cfg)  # the newest checkpoint's meta.json must fit this dataset and model
        world = (int(os.environ.get("WORLD_SIZE", "1")) if _inside_launcher()
                 else (args.nproc_per_node or 1) * args.nnodes)
        check_schedules(cfg, world)  # long enough for the learning-rate and masked-sharing schedules
        for flag, d in (("--output-dir", cfg.output_dir), ("--checkpoint-dir", cfg.checkpoint_dir)):
            if d is not None:
                _check_writable(flag, Path(d))
                if not _inside_launcher():  # inside a launch, rank 0 may hold it already: train() checks
                    _check_unlocked(flag, Path(d))
    except (SchemaError, CheckpointError, OSError, LockError, ValueError) as e:
        print(f"recsys-mtl train: error: {e}", file=sys.stderr)
        return 2
    if _inside_launcher() or not args.nproc_per_node:
        if args.nnodes > 1 and not _inside_launcher():
            print("recsys-mtl train: error: --nnodes > 1 needs torchx/torchrun (see launch/components.py)",
                  file=sys.stderr)
            return 2
        _train_entry(cfg.to_dict(), args.debug)
        return 0
    if args.nnodes > 1:
        print("recsys-mtl train: error: multi-node jobs are launched with torchx/torchrun "
              "(see README 'Launching on a cluster'); --nproc-per-node starts local ranks only", file=sys.stderr)
        return 2
    for old in (Path(cfg.output_dir) / ERROR_DIR).glob("error_rank_*"):  # an earlier run's errors
        old.unlink(missing_ok=True)
    return _launch_local("train", _train_entry, cfg.to_dict(), args.nproc_per_node, args.max_restarts,
                         error_dir=Path(cfg.output_dir) / ERROR_DIR, debug=args.debug)


class _DropOurExits(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed (exitcode: 2)" not in str(record.getMessage())


def _launch_local(command: str, entry, payload: dict, nproc_per_node: int, max_restarts: int = 0,
                  error_dir: Path | None = None, debug: bool = False) -> int:
    """Runs ``entry(payload)`` on ``nproc_per_node`` local ranks with TorchElastic's launcher (the
    agent torchrun and torchx use); returns the command's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from recsys_mtl.distributed.env import free_port

    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=f"recsys-mtl-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=max_restarts,
        monitor_interval=0.5,
    )
    # Restarted ranks must not read the previous attempt's addresses from a store shared across
    # restarts: opt out of sharing the rendezvous store, so every attempt gets a fresh one.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # One OpenMP pool per rank sized to its share of the cores (torchrun sets 1): ranks that
    # oversubscribe the cores stall at every parallel region (3-10x slower steps on 2 cores).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    # Known noise of the pinned stack: the agent logs a failed rank's exit as a traceback of its own
    # process-join code. For exit code 2 (errors of ours, each already one line) that copy is
    # dropped; other exits (a crash, a SIGKILL) keep the agent's report.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropOurExits())

    try:
        elastic_launch(launch, entry)(payload, *((debug,) if error_dir is not None else ()))
    except SignalException as e:  # SIGTERM/SIGINT to this launcher: the ranks got it too and stopped cleanly
        print(f"recsys-mtl {command}: stopped by signal {e.sigval.name}; the ranks' last lines above say what "
              f"was saved", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        lines = sorted(error_dir.glob("error_rank_*.txt")) if error_dir is not None else []
        if lines and all(f.exitcode == 2 for f in e.failures.values()):  # errors of ours: their lines, last
            print("\n" + "".join(p.read_text() for p in lines).rstrip("\n"), file=sys.stderr)
            print(f"recsys-mtl {command}: full tracebacks in {error_dir}", file=sys.stderr)
            return 2
        rank, first = next(iter(e.failures.items()))
        print(f"recsys-mtl {command}: error: rank {rank} failed (exit code {first.exitcode}); "
              f"its traceback is above", file=sys.stderr)
        return 1
    return 0


# ---- compare -------------------------------------------------------------------------------

def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="train models x seeds on one dataset and tabulate them",
        formatter_class=_HelpFormatter,
        description="Trains every --models label for every seed (and every --sweep value), sharded, on "
                    "--nproc-per-node local ranks or the torchx/torchrun job it runs in, and writes "
                    "OUT/results.csv (every metric), OUT/results.md (mean ± std of the headline metrics, MTL "
                    "gain vs single_task, Imp vs MODEL/ew, #params), OUT/results.png and, with --sweep, "
                    "OUT/sweep_PARAM.md/.png. Arguments after '--' are `recsys-mtl train` flags applied to "
                    "every run, e.g. -- --epochs 2 --batch-size 512.",
    )
    p.add_argument("--data", required=True)
    p.add_argument("--models", required=True, metavar="LABELS",
                   help="comma-separated labels: MODEL (a model name, or the ablations csrec_at (CSRec(AT)) and "
                        "csrec_cl (CSRec(CL))); MODEL/COMBINER to train it with that --grad-combiner (mmoe/pcgrad); "
                        "MODEL/pmtrec_no_focus (alpha = 1) and MODEL/pmtrec_no_balance (tau = 1), the PMTRec "
                        "ablations; MODEL/main_only: the main task alone (other tasks' loss weights 0)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..K-1 per model")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--nproc-per-node", type=int, default=None, help="start this many local ranks")
    p.add_argument("--no-single-task", action="store_true",
                   help="do not add the single_task baseline (then no MTL gain is reported)")
    p.add_argument("--sweep", action="append", default=None, metavar="PARAM=V1,V2,...",
                   help="train every label at every value of one gradient-combiner parameter: "
                        "pmtrec-alpha, pmtrec-tau, cagrad-c or nash-max-norm (e.g. pmtrec-tau=10,1,0.1,0.01); "
                        "writes OUT/sweep_PARAM.md and .png")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- followed by `recsys-mtl train` flags")
    p.set_defaults(func=_cmd_compare)


def _compare_entry(payload: dict) -> None:
    from recsys_mtl.compare import Sweep, compare

    compare(train_config_from_dict(payload["config"]), payload["models"], payload["seeds"],
            Sweep.from_dict(payload.get("sweep")))


def _cmd_compare(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    from recsys_mtl.compare import Sweep, check_labels, run_specs

    def refuse(message: str) -> int:
        print(f"recsys-mtl compare: error: {message}", file=sys.stderr)
        return 2

    try:
        check_labels(models)
    except ValueError as e:
        return refuse(str(e))
    if args.seeds <= 0:
        return refuse(f"--seeds must be a positive integer, got {args.seeds}")
    if args.nproc_per_node is not None and args.nproc_per_node <= 0:
        return refuse(f"--nproc-per-node must be a positive integer, got {args.nproc_per_node}")
    if not models:
        return refuse("--models names no model")
    if args.sweep is not None and len(args.sweep) > 1:
        return refuse(f"one --sweep per comparison, got {len(args.sweep)}: {', '.join(args.sweep)}")
    try:
        sweep = Sweep.parse(args.sweep[0]) if args.sweep else None
    except ValueError as e:
        return refuse(str(e))
    from recsys_mtl.data.interactions import is_interactions, load_training_schema
    from recsys_mtl.data.schema import Schema, SchemaError

    try:
        pairs = is_interactions(Schema.load(args.data))
    except (SchemaError, OSError) as e:
        return refuse(str(e))
    # (interaction datasets have no single-task model: their baseline is MODEL/main_only)
    if not args.no_single_task and "single_task" not in models and not pairs:
        models.insert(0, "single_task")
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    owned = [a for a in extra if a.split("=", 1)[0] in ("--data", "--output-dir", "--model", "--seed",
                                                        "--nproc-per-node")]
    if owned:
        return refuse(f"{owned[0].split('=', 1)[0]} after '--' is set by compare itself "
                      f"(use compare's own --data/--output-dir/--models/--seeds/--nproc-per-node)")
    swept = [a for a in extra if sweep is not None and a.split("=", 1)[0] == f"--{sweep.param}"]
    if swept:
        return refuse(f"--{sweep.param} after '--' is set by --sweep {sweep.param}")
    train_args = build_parser().parse_args(["train", "--data", args.data, "--output-dir", args.output_dir, *extra])
    try:
        cfg = config_from_args(train_args)
        if sweep is not None:
            sweep.check(models, cfg)
    except (ValueError, TypeError) as e:
        return refuse(str(e))
    from recsys_mtl.train.loop import check_grad_combiner, check_model_data

    try:
        schema = load_training_schema(args.data, cfg.model)
        specs = run_specs(cfg, models, 1, sweep, schema.task_names)
    except (SchemaError, OSError, ValueError) as e:
        return refuse(str(e))
    for spec in specs:  # every run's combiner must fit its model and the dataset: refused before any training
        try:
            check_grad_combiner(spec.config, schema)
            check_model_data(spec.config, schema)
        except ValueError as e:
            return refuse(f"{spec.label}: {e}")
    payload = {"config": cfg.to_dict(), "models": models, "seeds": args.seeds,
               "sweep": sweep.to_dict() if sweep is not None else None}
    if _inside_launcher() or not args.nproc_per_node:
        _compare_entry(payload)
        return 0
    rc = _launch_local("compare", _compare_entry, payload, args.nproc_per_node)
    if rc:
        return rc
    print(f"compare: wrote {Path(args.output_dir) / 'results.md'}:\n{(Path(args.output_dir) / 'results.md').read_text()}")
    return 0


# ---- bench ---------------------------------------------------------------------------------

def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="training throughput on a docs/design.md §7 workload, optionally vs peers",
                       formatter_class=_HelpFormatter)
    p.add_argument("workload", choices=["w1", "w2", "plans", "masked-matmul", "row-grad-pool"],
                   help="w1, w2: vs peers; plans: the default sharding plan vs every sharding type on 32 small "
                        "Census-Income tables, PLE, 2 local gloo ranks; masked-matmul: the fused masked linear "
                        "op vs per-subnet dense masking, one layer fwd+bwd (JSON to "
                        "benchmarks/results/masked_matmul.json unless --output); row-grad-pool: PMTRec's pooling "
                        "and step vs Algorithm 1 as written and vs an EW step, MF at Epinions scale (JSON to "
                        "benchmarks/results/row_grad_pool.json unless --output)")
    p.add_argument("--peers", action="store_true",
                   help="also run the peers: plain PyTorch and torch-rechub (w1), plain PyTorch only "
                        "(w2: torch-rechub has no STEM-Net); plans has no peers")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per contender")
    p.add_argument("--batch-size", type=int, default=None, help="override the workload's batch size")
    p.add_argument("--variants", default="eager,compiled", metavar="V[,V]",
                   help="w1, w2: recsys_mtl's variants, eager (contender recsys_mtl) and/or compiled "
                        "(recsys_mtl_compiled: --compile-head; its warm-up includes the compilation)")
    p.add_argument("--wide-rows", type=int, default=None, metavar="ROWS",
                   help="plans: give 3 of the 32 tables ROWS rows each (where sharding starts to pay off)")
    p.set_defaults(func=_cmd_bench)


def _run_op_or_plan_bench(args: argparse.Namespace) -> None:
    """The benchmarks without peers (``row-grad-pool``, ``masked-matmul``, ``plans``)."""
    if args.workload == "row-grad-pool":
        from recsys_mtl.bench.row_grad_pool import BATCH, DEFAULT_OUTPUT, run_row_grad_pool_bench

        run_row_grad_pool_bench(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size or BATCH,
                                output=args.output or DEFAULT_OUTPUT)
    elif args.workload == "masked-matmul":
        from recsys_mtl.bench.masked_matmul import BATCH_SIZES, DEFAULT_OUTPUT, run_masked_matmul_bench

        sizes = (args.batch_size,) if args.batch_size else BATCH_SIZES
        run_masked_matmul_bench(batch_sizes=sizes, step_batch_sizes=sizes, steps=args.steps, warmup=args.warmup,
                                output=args.output or DEFAULT_OUTPUT)
    else:
        from recsys_mtl.bench.plans import BATCH_SIZE, run_plans_bench

        run_plans_bench(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size or BATCH_SIZE,
                        wide_rows=args.wide_rows, output=args.output)


def _cmd_bench(args: argparse.Namespace) -> int:
    from recsys_mtl.distributed.malloc import tune_malloc

    try:  # glibc's malloc thresholds, process-wide: every contender and op in this run shares them
        _check_process_env()
        tune_malloc()
    except ValueError as e:
        print(f"recsys-mtl bench: error: {e}", file=sys.stderr)
        return 2
    if args.workload in ("row-grad-pool", "masked-matmul", "plans"):
        try:
            _run_op_or_plan_bench(args)
        except ValueError as e:
            print(f"recsys-mtl bench: error: {e}", file=sys.stderr)
            return 2
        return 0
    from recsys_mtl.bench import run_bench

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        run_bench(args.workload, peers=args.peers, output=args.output, steps=args.steps, warmup=args.warmup,
                  batch_size=args.batch_size, variants=variants)
    except ValueError as e:
        print(f"recsys-mtl bench: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-mtl",
        description="TorchRec-native multi-task recommendation: data, sharded training, benchmarks.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_data(sub)
    _add_train(sub)
    _add_compare(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
