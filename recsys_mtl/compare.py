"""``recsys-mtl compare``: train models x seeds (x swept values) on one dataset and tabulate them.

Every run is an ordinary sharded training run (``recsys_mtl.train.loop.train``) on the current
process group, so the comparison works on any world size; the runs share one launch. A compare
*label* names what one row of the reports trains:

* ``MODEL``: a model of ``recsys_mtl.config.MODEL_NAMES`` or a CSRec ablation of :data:`VARIANTS`;
* ``MODEL/COMBINER``: that model with ``--grad-combiner COMBINER`` (``mmoe/pcgrad``, ``mf/pmtrec``);
* ``MODEL/pmtrec_no_focus`` / ``MODEL/pmtrec_no_balance``: PMTRec without task focusing
  (``α = 1``) / without gradient magnitude balancing (``τ = 1``), PMTRec Fig. 4 variants 1 and 2;
* ``MODEL/main_only``: the main task alone (every other task's loss weight 0, the summed loss).

An optional :class:`Sweep` trains every label at every value of one ``GradConfig`` field
(PMTRec Fig. 5). Rank 0 writes ``OUT/results.csv`` (one row per label x value x seed x task, with
every metric the runs reported), ``OUT/results.md`` (mean ± std of each task's headline metrics,
MTL gain vs single-task per PLE Eq. 11, relative improvement over ``MODEL/ew``, #params),
``OUT/results.png`` (bar chart), ``OUT/summary.json`` and, with a sweep, ``OUT/sweep_PARAM.md`` /
``.png``. Headline metrics are ``recall@20`` and ``ndcg@20`` for full-ranking tasks, else ``auc``
(binary) or ``mse`` (regression).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from recsys_mtl.analysis import SubsetSpec, mtl_gain, plot_subsets, subset_analysis
from recsys_mtl.config import GRAD_COMBINERS, MODEL_NAMES, TrainConfig
from recsys_mtl.data.interactions import load_training_schema
from recsys_mtl.data.schema import Schema

BASELINE = "single_task"
EW = "ew"  # the combiner of the "Imp" reference label MODEL/ew
MAIN_ONLY = "main_only"

# Ablations run by name beside the models (CSRec Fig. 4): label -> (model, its csrec settings).
VARIANTS: dict[str, tuple[str, dict]] = {
    "csrec_at": ("csrec", {"contrastive_loss": False}),  # CSRec(AT): alternate training, no contrastive term
    "csrec_cl": ("csrec", {"mode": "fused"}),  # CSRec(CL): contrastive term, tasks trained in parallel
}

# Named gradient-combiner settings a label may carry after "/" (PMTRec Fig. 4): suffix -> GradConfig fields.
GRAD_VARIANTS: dict[str, dict[str, Any]] = {
    "pmtrec_no_focus": {"combiner": "pmtrec", "alpha": 1.0},  # variant 1: no task focusing (α = 1)
    "pmtrec_no_balance": {"combiner": "pmtrec", "tau": 1.0},  # variant 2: no magnitude balancing (τ = 1)
}
# Everything a label may carry after "/": a combiner, a named PMTRec ablation, or main_only.
LABEL_SUFFIXES: tuple[str, ...] = (*GRAD_COMBINERS, *GRAD_VARIANTS, MAIN_ONLY)


def split_label(label: str) -> tuple[str, str | None]:
    """A compare label's model part and its ``/`` suffix.

    Example::

        >>> split_label("mmoe/pcgrad"), split_label("csrec_at")
        (('mmoe', 'pcgrad'), ('csrec_at', None))
    """
    model, sep, suffix = label.partition("/")
    return model, (suffix if sep else None)


def label_dir(label: str) -> str:
    """The directory name of a label's runs: ``/`` becomes ``__`` (``mmoe/pcgrad`` -> ``mmoe__pcgrad``)."""
    return label.replace("/", "__")


def check_labels(labels: Sequence[str]) -> None:
    """Raises ``ValueError`` (one line) for an unknown model or combiner or a repeated label.

    Args:
        labels: compare labels, ``MODEL`` or ``MODEL/SUFFIX`` (see the module docstring).
    """
    unknown = [m for m in labels if split_label(m)[0] not in MODEL_NAMES and split_label(m)[0] not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODEL_NAMES)} or the ablations "
                         f"{', '.join(VARIANTS)}, optionally as MODEL/COMBINER")
    bad = [m for m in labels if split_label(m)[1] is not None and split_label(m)[1] not in LABEL_SUFFIXES]
    if bad:
        raise ValueError(f"unknown combiners in {bad}; MODEL/COMBINER takes a --grad-combiner "
                         f"({', '.join(GRAD_COMBINERS)}) or {', '.join((*GRAD_VARIANTS, MAIN_ONLY))}")
    repeated = sorted({m for m in labels if list(labels).count(m) > 1})
    if repeated:
        raise ValueError(f"--models names {repeated} more than once")


def main_task_of(cfg: TrainConfig, task_names: Sequence[str]) -> str:
    """``cfg.grad.main_task``, or the first task when unset; ``ValueError`` for an unknown task."""
    main = cfg.grad.main_task or task_names[0]
    if main not in task_names:
        raise ValueError(f"grad.main_task (--pmtrec-main-task) {main!r} is not a task of the dataset; "
                         f"tasks: {', '.join(task_names)}")
    return main


def with_model(base: TrainConfig, label: str, task_names: Sequence[str] | None = None) -> TrainConfig:
    """``base`` for the compare label ``label``.

    Args:
        base: the settings every run shares.
        label: ``MODEL`` (a model name or a :data:`VARIANTS` key), ``MODEL/COMBINER`` (sets
            ``grad.combiner``), ``MODEL/pmtrec_no_focus`` / ``MODEL/pmtrec_no_balance``
            (:data:`GRAD_VARIANTS`) or ``MODEL/main_only`` (loss weight 0 for every task but the
            main one, ``grad.combiner = ew``).
        task_names: the dataset's tasks (for ``main_only``); None: read from ``base.data``.

    Returns:
        TrainConfig: the run's configuration (output directory and seed still those of ``base``).
    """
    model, suffix = split_label(label)
    name, csrec = VARIANTS.get(model, (model, {}))
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, name=name),
                              csrec=dataclasses.replace(base.csrec, **csrec))
    if suffix is None:
        return cfg
    if suffix == MAIN_ONLY:
        names = list(task_names) if task_names is not None else load_training_schema(base.data).task_names
        main = main_task_of(cfg, names)
        weights = {**cfg.loss.task_weights, **{t: 0.0 for t in names if t != main}}
        return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, task_weights=weights),
                                   grad=dataclasses.replace(cfg.grad, combiner=EW))
    settings = GRAD_VARIANTS.get(suffix, {"combiner": suffix})
    return dataclasses.replace(cfg, grad=dataclasses.replace(cfg.grad, **settings))


# Sweepable GradConfig fields: --sweep name -> (field, x axis log-scaled in the sweep plot).
SWEEPS: dict[str, tuple[str, bool]] = {
    "pmtrec-alpha": ("alpha", False),
    "pmtrec-tau": ("tau", True),
    "cagrad-c": ("cagrad_c", False),
    "nash-max-norm": ("nash_max_norm", False),
}


def _number(value: float) -> str:
    """``10.0`` -> ``"10"``, ``1.04`` -> ``"1.04"``, ``1e-05`` -> ``"1e-05"`` (exact, shortest)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Sweep:
    """One ``GradConfig`` field trained at several values (``--sweep PARAM=V1,V2,...``).

    Args:
        param: the ``--sweep`` name, a :data:`SWEEPS` key (``pmtrec-alpha``, ``pmtrec-tau``, ...).
        values: the values, in the order of the reports.
    """

    param: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.param not in SWEEPS:
            raise ValueError(f"--sweep: unknown parameter {self.param!r}; choose from {', '.join(SWEEPS)}")
        if not self.values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.values):
            raise ValueError(f"--sweep {self.param}=V1,V2,...: needs finite numbers, got {list(self.values)}")
        if len(set(self.tags)) != len(self.tags):
            raise ValueError(f"--sweep {self.param}: repeated values {list(self.values)}")

    @classmethod
    def parse(cls, text: str) -> "Sweep":
        """``"pmtrec-tau=10,1,0.1"`` -> ``Sweep("pmtrec-tau", (10.0, 1.0, 0.1))``; ValueError otherwise."""
        param, sep, values = text.partition("=")
        if param not in SWEEPS:
            raise ValueError(f"--sweep: unknown parameter {param!r} (in {text!r}); choose from {', '.join(SWEEPS)}")
        try:
            numbers = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            numbers = ()
        if not sep or not numbers:
            raise ValueError(f"--sweep expects PARAM=V1,V2,... with numbers, got {text!r}")
        return cls(param, numbers)

    @property
    def field(self) -> str:
        """The swept ``GradConfig`` field (``alpha``, ``tau``, ``cagrad_c``, ``nash_max_norm``)."""
        return SWEEPS[self.param][0]

    @property
    def log_x(self) -> bool:
        """Whether the sweep plot's x axis is log-scaled (``tau``, when every value is > 0)."""
        return SWEEPS[self.param][1] and all(v > 0 for v in self.values)

    def tag(self, value: float) -> str:
        """The ``sweep`` column / run directory of one value: ``alpha=1.04``, ``tau=0.01``."""
        return f"{self.field}={_number(value)}"

    @property
    def tags(self) -> list[str]:
        """:meth:`tag` of every value, in order."""
        return [self.tag(v) for v in self.values]

    def apply(self, cfg: TrainConfig, value: float) -> TrainConfig:
        """``cfg`` with the swept field set to ``value``."""
        return dataclasses.replace(cfg, grad=dataclasses.replace(cfg.grad, **{self.field: value}))

    def check(self, labels: Sequence[str], base: TrainConfig) -> None:
        """Raises ``ValueError`` for a value ``GradConfig`` refuses, or a label that fixes the swept
        field itself (``MODEL/pmtrec_no_focus`` with ``pmtrec-alpha``, ``.../pmtrec_no_balance`` with
        ``pmtrec-tau``)."""
        for v in self.values:
            self.apply(base, v)
        fixed = [m for m in labels if self.field in GRAD_VARIANTS.get(split_label(m)[1] or "", {})]
        if fixed:
            raise ValueError(f"--sweep {self.param}: the ablation labels {fixed} set grad.{self.field} "
                             f"themselves; sweep without them")

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Sweep | None":
        """Inverse of :meth:`to_dict`; None stays None."""
        return None if d is None else cls(d["param"], tuple(float(v) for v in d["values"]))


def count_parameters(schema: Schema, cfg: TrainConfig) -> int:
    """Parameters (embedding rows x dim + dense) of ``cfg.model``, counted on ``meta``; the zero
    padding rows of a padded input's first layer are not counted."""
    from recsys_mtl.models import build_model

    model = build_model(schema, cfg.model, device="meta")
    padding = sum(m.padding_numel() for m in model.modules() if hasattr(m, "padding_numel"))
    return sum(p.numel() for p in model.parameters()) - padding


def run_dir(out: Path, label: str, seed: int, sweep: str = "") -> Path:
    """``OUT/runs/LABEL_DIR[/SWEEP]/seedS``: one run's output directory (see :func:`label_dir`)."""
    d = Path(out) / "runs" / label_dir(label)
    return (d / sweep if sweep else d) / f"seed{seed}"


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison.

    Args:
        label: its compare label (``mmoe/pcgrad``).
        sweep: its :meth:`Sweep.tag` (``tau=0.1``), ``""`` without a sweep.
        seed: its seed.
        config: its full training configuration.
    """

    label: str
    sweep: str
    seed: int
    config: TrainConfig


def run_specs(base: TrainConfig, models: Sequence[str], seeds: int, sweep: Sweep | None = None,
              task_names: Sequence[str] | None = None) -> list[RunSpec]:
    """Every run of a comparison, label-major, then swept value, then seed.

    Each run writes to :func:`run_dir` (``OUT/runs/LABEL_DIR[/SWEEP]/seedS``) and, with a checkpoint
    directory ``CK``, checkpoints to the same path under ``CK`` (so an interrupted comparison
    resumes every run where it stopped). The swept value is set before the label's own settings;
    :meth:`Sweep.check` refuses labels that would override it.

    Args:
        base: the settings every run shares (``output_dir`` is the comparison's ``OUT``).
        models: compare labels.
        seeds: seeds ``0 .. seeds-1`` per label and value.
        sweep: the swept field, or None.
        task_names: the dataset's tasks (for ``main_only``); None: read from ``base.data`` if needed.

    Returns:
        list[RunSpec]: ``len(models) * len(sweep.values or [1]) * seeds`` runs.
    """
    out = Path(base.output_dir)
    ck = Path(base.checkpoint_dir) if base.checkpoint_dir else None
    if task_names is None and any(split_label(m)[1] == MAIN_ONLY for m in models):
        task_names = load_training_schema(base.data).task_names
    points: list[tuple[str, float | None]] = [(sweep.tag(v), v) for v in sweep.values] if sweep else [("", None)]
    specs = []
    for m in models:
        for tag, value in points:
            cfg = with_model(sweep.apply(base, value) if sweep is not None else base, m, task_names)
            for seed in range(seeds):
                d = run_dir(out, m, seed, tag)
                specs.append(RunSpec(m, tag, seed, dataclasses.replace(
                    cfg, seed=seed, output_dir=str(d),
                    checkpoint_dir=str(ck / d.relative_to(out / "runs")) if ck else None,
                )))
    return specs


def run_configs(base: TrainConfig, models: Sequence[str], seeds: int, sweep: Sweep | None = None) -> list[TrainConfig]:
    """The configurations of :func:`run_specs`, in the same order."""
    return [s.config for s in run_specs(base, models, seeds, sweep)]


def compare(base: TrainConfig, models: Sequence[str], seeds: int, sweep: Sweep | None = None) -> list[dict] | None:
    """Trains every label x swept value x seed on the current process group; rank 0 writes the
    reports and returns the per-run metrics (each ``metrics.json`` dict plus ``"model"``: the
    label and ``"sweep"``: the value's tag or ``""``); None on other ranks."""
    from recsys_mtl.train.loop import train

    schema = load_training_schema(base.data, base.model)
    results = []
    for spec in run_specs(base, models, seeds, sweep, schema.task_names):
        metrics = train(spec.config)
        if metrics is not None:
            metrics["model"] = spec.label  # the label, not the model name
            metrics["sweep"] = spec.sweep
            results.append(metrics)
    if not results:
        return None
    params = {m: count_parameters(load_training_schema(base.data, c.model), c)  # each model's own batch layout
              for m in models for c in [with_model(base, m, schema.task_names)]}
    out = Path(base.output_dir)
    write_reports(out, results, schema, list(models), params, sweep)
    write_subset_analysis(out, schema, list(models), sweep=sweep.tags[0] if sweep else "")
    write_mask_analysis(out, results)
    return results


def write_mask_analysis(out: Path, results: list[dict]) -> Path | None:
    """``OUT/mask_analysis.json``/``.png``: the masked-sharing runs of seed 0 side by side —
    sharing and conflict ratios over training (CSRec Fig. 5), first-layer field occupation (Fig. 6),
    subnet and union parameter counts. None when no masked-sharing model ran."""
    from recsys_mtl.train.masked_sharing import plot_logs

    runs = {_row_name(r["model"], r.get("sweep", "")): r["masked_sharing"] for r in results
            if "masked_sharing" in r and r["config"]["seed"] == 0}
    if not runs:
        return None
    (out / "mask_analysis.json").write_text(json.dumps(runs, indent=1))
    return plot_logs(out / "mask_analysis.png", runs, title="masked sharing (seed 0)")


# ---- metrics and summaries ---------------------------------------------------------------------

LOWER_IS_BETTER = frozenset({"mse", "logloss", "ne", "rmse", "mae"})
RANKING_METRICS: tuple[str, ...] = ("recall", "ndcg", "hit")
HEADLINE_K = 20  # full-ranking headline cut-off: recall@20 and ndcg@20


def is_ranking_metric(name: str) -> bool:
    """``recall@K``, ``ndcg@K`` and ``hit@K`` are full-ranking metrics."""
    base, sep, k = name.partition("@")
    return bool(sep) and base in RANKING_METRICS and k.isdigit()


def higher_is_better(metric: str) -> bool:
    """False for the error metrics of :data:`LOWER_IS_BETTER`, True otherwise."""
    return metric not in LOWER_IS_BETTER


def headline_metrics(names: Sequence[str]) -> list[str]:
    """A task's headline metrics, from the metric names its runs reported.

    ``recall@20`` and ``ndcg@20`` when present (the largest K when 20 is not), else ``auc``, else
    ``mse``, else the first name.

    Example::

        >>> headline_metrics(["recall@5", "recall@20", "ndcg@5", "ndcg@20", "users"]), headline_metrics(["auc", "ne"])
        (['recall@20', 'ndcg@20'], ['auc'])
    """
    ks = sorted({int(n.partition("@")[2]) for n in names if is_ranking_metric(n) and not n.startswith("hit@")})
    if ks:
        k = HEADLINE_K if HEADLINE_K in ks else ks[-1]
        return [f"{m}@{k}" for m in ("recall", "ndcg") if f"{m}@{k}" in names]
    for m in ("auc", "mse"):
        if m in names:
            return [m]
    return list(names[:1])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_names(results: Sequence[dict], task: str) -> list[str]:
    """Every numeric metric the runs reported for ``task``, in the order first seen."""
    names: list[str] = []
    for r in results:
        for k, v in r["tasks"].get(task, {}).items():
            if k not in names and (v is None or _is_number(v)):
                names.append(k)
    return names


def task_headlines(results: Sequence[dict], schema: Schema) -> dict[str, list[str]]:
    """``{task: headline metrics}`` for the schema's tasks (in schema order) that have metrics."""
    out = {}
    for t in schema.task_names:
        h = headline_metrics(metric_names(results, t))
        if h:
            out[t] = h
    return out


def _values(results: Sequence[dict], label: str, sweep: str, task: str, metric: str,
            split: str = "tasks") -> list[float]:
    """The finite values of one metric over the runs of ``label`` at ``sweep`` (one per seed);
    ``split="test"``: the test-split metrics of an interaction dataset (``metrics.json`` ``test``)."""
    vals = [(r.get(split) or {}).get(task, {}).get(metric) for r in results
            if r["model"] == label and r.get("sweep", "") == sweep]
    return [float(v) for v in vals if _is_number(v) and math.isfinite(v)]


def _stats(vals: Sequence[float]) -> dict[str, float]:
    a = np.asarray(vals, dtype=np.float64)
    return {"mean": float(a.mean()) if len(a) else math.nan,
            "std": float(a.std(ddof=1)) if len(a) > 1 else (0.0 if len(a) else math.nan), "n": float(len(a))}


def relative_improvement(value: float, reference: float, higher: bool = True) -> float:
    """The "Imp" of PMTRec Table 2: ``(value - reference) / |reference|`` (sign flipped for an
    error metric); NaN when the reference is 0 or not finite.

    Example::

        >>> round(relative_improvement(0.0170, 0.0130), 4), round(relative_improvement(0.9, 1.0, higher=False), 4)
        (0.3077, 0.1)
    """
    if not (math.isfinite(reference) and math.isfinite(value)) or reference == 0:
        return math.nan
    return ((value - reference) if higher else (reference - value)) / abs(reference)


def ew_reference(label: str) -> str:
    """The label a row's "Imp" is measured against: ``MODEL/ew`` for the label's model part."""
    return f"{split_label(label)[0]}/{EW}"


def summarise(results: list[dict], schema: Schema, models: list[str], sweep: str = "",
              headlines: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean ± std over seeds of each task's headline metrics, per label, at one swept value.

    Args:
        results: per-run metrics (``"model"``: the label, ``"tasks"``: ``{task: {metric: value}}``,
            optional ``"sweep"``: the value's tag).
        schema: the dataset's schema (its task order).
        models: the labels, in report order.
        sweep: the swept value's tag (``""``: no sweep).
        headlines: ``{task: metrics}``; None: :func:`task_headlines` of ``results``.

    Returns:
        ``{label: {task: {"metric", "mean", "std", "n", "gain"?, "imp"?, "metrics": {metric:
        {"mean", "std", "n", "gain"?, "imp"?}}}}}``: the top-level numbers are those of the task's
        first headline metric; ``gain`` is PLE Eq. 11 vs ``single_task`` (when it ran), ``imp`` the
        relative improvement over ``MODEL/ew`` (when that label ran, not on itself). Non-finite
        values (an undefined AUC) are left out; a metric with none has ``n`` 0 and NaN mean.
    """
    headlines = dict(headlines) if headlines is not None else task_headlines(results, schema)
    stats = {m: {t: {h: _stats(_values(results, m, sweep, t, h)) for h in hs} for t, hs in headlines.items()}
             for m in models}
    for m in models:
        ref = ew_reference(m)
        for t, hs in headlines.items():
            for h in hs:
                s = stats[m][t][h]
                if BASELINE in stats:
                    s["gain"] = mtl_gain(s["mean"], stats[BASELINE][t][h]["mean"], higher_is_better(h))
                if ref in stats and ref != m:
                    s["imp"] = relative_improvement(s["mean"], stats[ref][t][h]["mean"], higher_is_better(h))
    return {m: {t: {"metric": hs[0], **stats[m][t][hs[0]], "metrics": stats[m][t]} for t, hs in headlines.items()}
            for m in models}


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _row_name(label: str, sweep: str) -> str:
    return f"{label} [{sweep}]" if sweep else label


def _display(metric: str) -> str:
    return metric if "@" in metric else metric.upper()


def _mean_std(s: Mapping[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if s["n"] else "n/a"


def _signed(x: float | None, percent: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{100 * x:+.2f}%" if percent else f"{x:+.4f}"


def _main_task(results: Sequence[dict], schema: Schema) -> str:
    main = (results[0].get("config", {}).get("grad") or {}).get("main_task") if results else None
    return main if main in schema.task_names else schema.task_names[0]


# ---- reports -------------------------------------------------------------------------------------

_CSV_FIXED = ("model", "sweep", "seed", "task", "metric", "value")
_CSV_TAIL = ("steps", "samples_per_s", "params")


def write_results_csv(path: Path, results: Sequence[dict], headlines: Mapping[str, Sequence[str]],
                      params: Mapping[str, int]) -> Path:
    """``results.csv``: one row per run x task (runs in order, tasks in schema order).

    Columns: ``model`` (the label), ``sweep`` (the value's tag, empty without a sweep), ``seed``,
    ``task``, ``metric`` / ``value`` (the task's first headline metric), then one column per metric
    any task reported (empty where a task lacks it or it is undefined), ``steps``,
    ``samples_per_s``, ``params``.
    """
    names: list[str] = []
    for t in headlines:
        names += [n for n in metric_names(results, t) if n not in names]
    columns = [f"metric_{n}" if n in _CSV_FIXED + _CSV_TAIL else n for n in names]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*_CSV_FIXED, *columns, *_CSV_TAIL])
        for r in results:
            for t, hs in headlines.items():
                m = r["tasks"].get(t, {})
                cells = ["" if not _is_number(m.get(n)) else m[n] for n in names]
                w.writerow([r["model"], r.get("sweep", ""), r["config"]["seed"], t, hs[0],
                            "" if not _is_number(m.get(hs[0])) else m[hs[0]], *cells, r.get("steps", ""),
                            round(r["samples_per_s"], 1) if _is_number(r.get("samples_per_s")) else "",
                            params.get(r["model"], "")])
    return path


def results_markdown(results: Sequence[dict], tables: Mapping[str, Mapping[str, Any]], schema: Schema,
                     models: Sequence[str], params: Mapping[str, int], headlines: Mapping[str, Sequence[str]],
                     sweep: Sweep | None = None) -> str:
    """The text of ``results.md``.

    One row per label (x swept value): ``#params`` and, per task and headline metric, mean ± std
    over seeds; a ``gain`` column (PLE Eq. 11 vs ``single_task``) when ``single_task`` ran or no
    task is a full-ranking one; an ``Imp`` column (relative improvement over ``MODEL/ew``, in %)
    when some label has its ``MODEL/ew`` in the comparison. For a full-ranking main task, a second
    table holds its every ranking metric (mean over seeds), and when the runs evaluated a test split
    (interaction datasets), a third its headline metrics on test (mean ± std, Imp over ``MODEL/ew``).

    Args:
        tables: ``{sweep tag: summarise(...)}`` (the tag ``""`` without a sweep).
    """
    ranking = any(is_ranking_metric(h) for hs in headlines.values() for h in hs)
    show_gain = BASELINE in models or not ranking
    show_imp = any(ew_reference(m) in models and ew_reference(m) != m for m in models)
    tags = sweep.tags if sweep else [""]
    n = int(max((v["n"] for tb in tables.values() for mt in tb.values() for v in mt.values()), default=0))
    notes = [f"dataset `{results[0]['config']['data']}`, {n} seed(s) per model; mean ± std"]
    if show_gain:
        notes.append(f"MTL gain = PLE Eq. 11 vs `{BASELINE}`" + ("" if BASELINE in models else " (not run)"))
    if show_imp:
        notes.append("Imp = relative improvement over `MODEL/ew`, (x − ew) / ew")
    if sweep:
        notes.append(f"`--sweep {sweep.param}`: every label at grad.{sweep.field} = "
                     f"{', '.join(_number(v) for v in sweep.values)}")
    lines = ["; ".join(notes), ""]
    header = ["model", *(["sweep"] if sweep else []), "#params"]
    for t, hs in headlines.items():
        for h in hs:
            header.append(f"{t} {_display(h)}")
            suffix = f"{t} {_display(h)}" if len(hs) > 1 else t
            header += ([f"{suffix} gain"] if show_gain else []) + ([f"{suffix} Imp"] if show_imp else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        for tag in tags:
            row = [m, *([tag] if sweep else []), f"{params[m]:,}" if m in params else "-"]
            for t, hs in headlines.items():
                for h in hs:
                    s = tables[tag][m][t]["metrics"][h]
                    row.append(_mean_std(s))
                    row += ([_signed(s.get("gain"))] if show_gain else []) + \
                           ([_signed(s.get("imp"), percent=True)] if show_imp else [])
            lines.append("| " + " | ".join(row) + " |")
    main = _main_task(results, schema)
    every = [k for k in metric_names(results, main) if is_ranking_metric(k)]
    if every:
        lines += ["", f"main task `{main}`, every ranking metric (mean over seeds):", "",
                  "| model | " + ("sweep | " if sweep else "") + " | ".join(every) + " |",
                  "|" + "---|" * (len(every) + 1 + bool(sweep))]
        for m in models:
            for tag in tags:
                cells = []
                for k in every:
                    s = _stats(_values(results, m, tag, main, k))
                    cells.append(f"{s['mean']:.4f}" if s["n"] else "n/a")
                lines.append(f"| {m} | " + (f"{tag} | " if sweep else "") + " | ".join(cells) + " |")
    tested = [h for h in headlines.get(main, []) if any(_values(results, m, tag, main, h, "test")
                                                        for m in models for tag in tags)]
    if tested:
        lines += ["", f"main task `{main}` on the **test** split (the tables above: validation), mean ± std over "
                      "seeds" + ("; Imp over `MODEL/ew`" if show_imp else "") + ":", ""]
        head = ["model", *(["sweep"] if sweep else [])]
        for h in tested:
            head += [_display(h)] + ([f"{_display(h)} Imp"] if show_imp else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in models:
            for tag in tags:
                row = [m, *([tag] if sweep else [])]
                for h in tested:
                    st = _stats(_values(results, m, tag, main, h, "test"))
                    row.append(_mean_std(st))
                    if show_imp:
                        ref = _stats(_values(results, ew_reference(m), tag, main, h, "test"))
                        imp = (relative_improvement(st["mean"], ref["mean"], higher_is_better(h))
                               if ew_reference(m) != m and ref["n"] else None)
                        row.append(_signed(imp, percent=True))
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_reports(out: Path, results: list[dict], schema: Schema, models: list[str], params: dict[str, int],
                  sweep: Sweep | None = None) -> None:
    """Writes ``results.csv``, ``summary.json``, ``results.md``, ``results.png`` and, with a sweep,
    ``sweep_PARAM.md`` / ``sweep_PARAM.png`` under ``out``.

    Args:
        out: the comparison's output directory.
        results: per-run metrics (see :func:`summarise`); any metric names (AUC-style or
            full-ranking); a task without ``auc`` is fine.
        schema: the dataset's schema.
        models: the labels, in report order.
        params: parameters per label.
        sweep: the swept field, or None.

    ``summary.json`` is ``{label: {task: ...}}`` (:func:`summarise`) without a sweep and
    ``{sweep tag: {label: {task: ...}}}`` with one; undefined numbers are ``null``.
    """
    out.mkdir(parents=True, exist_ok=True)
    headlines = task_headlines(results, schema)
    write_results_csv(out / "results.csv", results, headlines, params)
    tags = sweep.tags if sweep else [""]
    tables = {tag: summarise(results, schema, models, tag, headlines) for tag in tags}
    summary = tables[""] if sweep is None else tables
    (out / "summary.json").write_text(json.dumps(_finite_or_none(summary), indent=2))
    (out / "results.md").write_text(results_markdown(results, tables, schema, models, params, headlines, sweep))
    plot_comparison({_row_name(m, tag): tables[tag][m] for m in models for tag in tags}, headlines,
                    out / "results.png")
    if sweep is not None:
        write_sweep_report(out, results, tables, schema, models, headlines, sweep)


def plot_comparison(table: Mapping[str, Mapping[str, Any]], headlines: Mapping[str, Sequence[str]], path: Path) -> Path:
    """Bar chart, one panel per task x headline metric, one bar (mean, std error bar) per row.

    Args:
        table: ``{row name: {task: summary}}`` (the per-label entries of :func:`summarise`).
        headlines: ``{task: headline metrics}``.
        path: the PNG to write.
    """
    from recsys_mtl.analysis import _pyplot

    plt = _pyplot()
    rows = list(table)
    panels = [(t, h) for t, hs in headlines.items() for h in hs]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 + 1.2 * len(rows) * max(len(panels), 1) / 2, 3.5),
                             squeeze=False)
    for ax, (t, h) in zip(axes[0], panels):
        means = [table[r][t]["metrics"][h]["mean"] for r in rows]
        stds = [table[r][t]["metrics"][h]["std"] for r in rows]
        ax.bar(range(len(rows)), means, yerr=[s if math.isfinite(s) else 0.0 for s in stds], capsize=3,
               color="tab:blue")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=30, ha="right")
        finite = [v for v in means if math.isfinite(v)]
        spread = (max(finite) - min(finite)) if finite else 0
        if finite:
            pad = max(spread, 0.01 * max(abs(v) for v in finite), 1e-4)
            ax.set_ylim(min(finite) - pad, max(finite) + pad)
        ax.set_title(f"{t} {_display(h)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_sweep_report(out: Path, results: Sequence[dict], tables: Mapping[str, Mapping[str, Any]], schema: Schema,
                       models: Sequence[str], headlines: Mapping[str, Sequence[str]],
                       sweep: Sweep) -> tuple[Path, Path]:
    """``OUT/sweep_PARAM.md`` and ``OUT/sweep_PARAM.png`` (PMTRec Fig. 5).

    The markdown has one table per task x headline metric: a row per label, a column per value,
    mean ± std over seeds. The plot draws the headline metric against the swept value, one line
    per label with std error bars (x log-scaled for ``tau``): one panel per headline metric of the
    main task when it is a full-ranking task (``recall@20``, ``ndcg@20``), else one per task
    (its first headline metric, ``auc``).

    Args:
        tables: ``{sweep tag: summarise(...)}``, one per value.

    Returns:
        tuple[Path, Path]: the markdown and PNG paths.
    """
    from recsys_mtl.analysis import _pyplot

    tags = sweep.tags
    n = int(max((v["n"] for tb in tables.values() for mt in tb.values() for v in mt.values()), default=0))
    lines = [f"`--sweep {sweep.param}`: grad.{sweep.field} = {', '.join(_number(v) for v in sweep.values)}; "
             f"each task's headline metrics, mean ± std over {n} seed(s)", ""]
    for t, hs in headlines.items():
        for h in hs:
            lines += [f"**{t} {_display(h)}**", "", "| model | " + " | ".join(tags) + " |",
                      "|---|" + "---|" * len(tags)]
            for m in models:
                cells = [_mean_std(tables[tag][m][t]["metrics"][h]) for tag in tags]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    md = out / f"sweep_{sweep.param}.md"
    md.write_text("\n".join(lines))
    main = _main_task(results, schema)
    if main in headlines and any(is_ranking_metric(h) for h in headlines[main]):
        panels = [(main, h) for h in headlines[main]]
    else:
        panels = [(t, hs[0]) for t, hs in headlines.items()]
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6), squeeze=False)
    x = list(sweep.values)
    for ax, (t, h) in zip(axes[0], panels):
        for m in models:
            s = [tables[tag][m][t]["metrics"][h] for tag in tags]
            ax.errorbar(x, [v["mean"] for v in s], yerr=[v["std"] if math.isfinite(v["std"]) else 0.0 for v in s],
                        marker="o", capsize=3, label=m)
        if sweep.log_x:
            ax.set_xscale("log")
        ax.set_xlabel(sweep.field)
        ax.set_ylabel(_display(h))
        ax.set_title(f"{t} {_display(h)} vs {sweep.field}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    png = out / f"sweep_{sweep.param}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, png


def write_subset_analysis(out: Path, schema: Schema, models: list[str], seed: int = 0,
                          sweep: str = "") -> Path | None:
    """STEM-Net's subset analysis on seed ``seed``: the single-task model's predictions for the
    first two binary tasks A and B define the A-overwhelming / comparable / B-overwhelming
    subsets; every model's AUC is reported on each subset, for each of the two tasks.

    Needs the single-task run and every run's ``eval_predictions.parquet`` (same eval rows in the
    same order: same dataset and world size). With a sweep, the runs of the value tagged
    ``sweep`` are compared. Writes ``OUT/subsets.md`` and ``OUT/subsets_TASK.png``.
    """
    import pyarrow.parquet as pq

    binary = [t.name for t in schema.tasks if t.kind == "binary"][:2]
    files = {m: run_dir(out, m, seed, sweep) / "eval_predictions.parquet" for m in models}
    if BASELINE not in models or len(binary) < 2 or not all(f.exists() for f in files.values()):
        return None
    # column name -> numpy array per model (pyarrow only: compare needs no pandas)
    tables = {m: {c: t.column(c).to_numpy() for c in t.column_names} for m, t in
              ((m, pq.read_table(f)) for m, f in files.items())}
    ref = tables[BASELINE]
    a, b = binary
    if any(len(t[f"{a}_label"]) != len(ref[f"{a}_label"]) or not (t[f"{a}_label"] == ref[f"{a}_label"]).all()
           for t in tables.values()):
        return None  # eval rows differ between runs: nothing to align
    lines = [f"STEM-Net subset analysis (seed {seed}{', ' + sweep if sweep else ''}): subsets by the difference "
             f"of the single-task models' bucket indices (10 equal-frequency buckets), A = {a}, B = {b}; "
             f"AUC per subset.", ""]
    for task in binary:
        m = ref[f"{task}_mask"] & ref[f"{a}_mask"] & ref[f"{b}_mask"]  # N bool
        res = subset_analysis(
            ref[f"{a}_pred"][m], ref[f"{b}_pred"][m],
            {name: t[f"{task}_pred"][m] for name, t in tables.items()},
            ref[f"{task}_label"][m], SubsetSpec(),
        )
        subsets = list(res)
        lines += [f"**{task}**", "", "| model | " + " | ".join(f"{s} (n={int(res[s]['size'])})" for s in subsets) + " |",
                  "|---|" + "---|" * len(subsets)]
        for name in models:
            lines.append(f"| {name} | " + " | ".join(f"{res[s][name]:.4f}" for s in subsets) + " |")
        lines.append("")
        plot_subsets(res, out / f"subsets_{task}.png", title=f"{task}: AUC by subset ({a} vs {b} feedback)")
    (out / "subsets.md").write_text("\n".join(lines) + "\n")
    return out / "subsets.md"
