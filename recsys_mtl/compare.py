"""``recsys-mtl compare``: train models x seeds on one dataset and tabulate them.

Every run is an ordinary sharded training run (``recsys_mtl.train.loop.train``) on the current
process group, so the comparison works on any world size; the runs share one launch. Rank 0
writes ``OUT/results.csv`` (one row per model x seed x task), ``OUT/results.md`` (mean ± std per
task, MTL gain vs single-task per PLE Eq. 11, #params) and ``OUT/results.png`` (bar chart).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from recsys_mtl.analysis import SubsetSpec, mtl_gain, plot_subsets, subset_analysis
from recsys_mtl.config import TrainConfig
from recsys_mtl.data.schema import Schema

BASELINE = "single_task"

# Ablations run by name beside the models (CSRec Fig. 4): label -> (model, its csrec settings).
VARIANTS: dict[str, tuple[str, dict]] = {
    "csrec_at": ("csrec", {"contrastive_loss": False}),  # CSRec(AT): alternate training, no contrastive term
    "csrec_cl": ("csrec", {"mode": "fused"}),  # CSRec(CL): contrastive term, tasks trained in parallel
}


def with_model(base: TrainConfig, label: str) -> TrainConfig:
    """``base`` for the model or variant ``label`` (a :data:`VARIANTS` key or a model name)."""
    name, csrec = VARIANTS.get(label, (label, {}))
    return dataclasses.replace(base, model=dataclasses.replace(base.model, name=name),
                               csrec=dataclasses.replace(base.csrec, **csrec))


def count_parameters(schema: Schema, cfg: TrainConfig) -> int:
    """Parameters (embedding rows x dim + dense) of ``cfg.model``, counted on ``meta``."""
    from recsys_mtl.models import build_model

    return sum(p.numel() for p in build_model(schema, cfg.model, device="meta").parameters())


def run_configs(base: TrainConfig, models: Sequence[str], seeds: int) -> list[TrainConfig]:
    """One config per model x seed, each writing to ``OUT/runs/MODEL/seedS`` (and, with a
    checkpoint directory, checkpointing to ``CK/MODEL/seedS``, so an interrupted comparison
    resumes every run where it stopped)."""
    out = Path(base.output_dir)
    ck = Path(base.checkpoint_dir) if base.checkpoint_dir else None
    return [
        dataclasses.replace(
            with_model(base, m), seed=seed, output_dir=str(out / "runs" / m / f"seed{seed}"),
            checkpoint_dir=str(ck / m / f"seed{seed}") if ck else None,
        )
        for m in models
        for seed in range(seeds)
    ]


def compare(base: TrainConfig, models: Sequence[str], seeds: int) -> list[dict] | None:
    """Trains every model x seed on the current process group; rank 0 writes the reports and
    returns the per-run metrics (None on other ranks)."""
    from recsys_mtl.train.loop import train

    results = []
    for label, cfg in zip([m for m in models for _ in range(seeds)], run_configs(base, models, seeds)):
        metrics = train(cfg)
        if metrics is not None:
            metrics["model"] = label  # the variant's name where it is one
            results.append(metrics)
    if not results:
        return None
    schema = Schema.load(base.data)
    params = {m: count_parameters(schema, with_model(base, m)) for m in models}
    write_reports(Path(base.output_dir), results, schema, list(models), params)
    write_subset_analysis(Path(base.output_dir), schema, list(models))
    write_mask_analysis(Path(base.output_dir), results)
    return results


def write_mask_analysis(out: Path, results: list[dict]) -> Path | None:
    """``OUT/mask_analysis.json``/``.png``: the masked-sharing runs of seed 0 side by side —
    sharing and conflict ratios over training (CSRec Fig. 5), first-layer field occupation (Fig. 6),
    subnet and union parameter counts. None when no masked-sharing model ran."""
    from recsys_mtl.train.masked_sharing import plot_logs

    runs = {r["model"]: r["masked_sharing"] for r in results if "masked_sharing" in r and r["config"]["seed"] == 0}
    if not runs:
        return None
    (out / "mask_analysis.json").write_text(json.dumps(runs, indent=1))
    return plot_logs(out / "mask_analysis.png", runs, title="masked sharing (seed 0)")


def _metric_of(task_kind: str) -> tuple[str, bool]:
    return ("auc", True) if task_kind == "binary" else ("mse", False)


def summarise(results: list[dict], schema: Schema, models: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {task: {"mean", "std", "n", "gain"}}}`` of each task's main metric (AUC / MSE)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for m in models:
        table[m] = {}
        for t in schema.tasks:
            key, _ = _metric_of(t.kind)
            vals = np.array([r["tasks"][t.name][key] for r in results if r["model"] == m])
            table[m][t.name] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                "n": float(len(vals))}
    if BASELINE in table:
        for m in models:
            for t in schema.tasks:
                _, higher = _metric_of(t.kind)
                table[m][t.name]["gain"] = mtl_gain(table[m][t.name]["mean"], table[BASELINE][t.name]["mean"], higher)
    return table


def write_reports(out: Path, results: list[dict], schema: Schema, models: list[str], params: dict[str, int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "seed", "task", "metric", "value", "logloss", "steps", "samples_per_s", "params"])
        for r in results:
            for t in schema.tasks:
                key, _ = _metric_of(t.kind)
                m = r["tasks"][t.name]
                w.writerow([r["model"], r["config"]["seed"], t.name, key, m[key], m.get("logloss", ""), r["steps"],
                            round(r["samples_per_s"], 1), params[r["model"]]])
    table = summarise(results, schema, models)
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    lines = [f"dataset `{results[0]['config']['data']}`, {int(max(v['n'] for mt in table.values() for v in mt.values()))} "
             f"seed(s) per model; mean ± std; MTL gain = PLE Eq. 11 vs `{BASELINE}`"
             + ("" if BASELINE in table else " (not run)"), ""]
    header = ["model", "#params"]
    for t in schema.tasks:
        key, _ = _metric_of(t.kind)
        header += [f"{t.name} {key.upper()}", f"{t.name} gain"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        row = [m, f"{params[m]:,}"]
        for t in schema.tasks:
            s = table[m][t.name]
            row += [f"{s['mean']:.4f} ± {s['std']:.4f}", f"{s['gain']:+.4f}" if "gain" in s else "-"]
        lines.append("| " + " | ".join(row) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_comparison(table, schema, out / "results.png")


def plot_comparison(table: dict, schema: Schema, path: Path) -> Path:
    from recsys_mtl.analysis import _pyplot

    plt = _pyplot()
    models = list(table)
    fig, axes = plt.subplots(1, len(schema.tasks), figsize=(4 + 1.2 * len(models), 3.5), squeeze=False)
    for ax, t in zip(axes[0], schema.tasks):
        key, _ = _metric_of(t.kind)
        means = [table[m][t.name]["mean"] for m in models]
        stds = [table[m][t.name]["std"] for m in models]
        ax.bar(range(len(models)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=30, ha="right")
        finite = [v for v in means if math.isfinite(v)]
        spread = (max(finite) - min(finite)) if finite else 0
        if finite:
            ax.set_ylim(min(finite) - max(spread, 0.01), max(finite) + max(spread, 0.01))
        ax.set_title(f"{t.name} {key.upper()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_subset_analysis(out: Path, schema: Schema, models: list[str], seed: int = 0) -> Path | None:
    """STEM-Net's subset analysis on seed ``seed``: the single-task model's predictions for the
    first two binary tasks A and B define the A-overwhelming / comparable / B-overwhelming
    subsets; every model's AUC is reported on each subset, for each of the two tasks.

    Needs the single-task run and every run's ``eval_predictions.parquet`` (same eval rows in the
    same order: same dataset and world size). Writes ``OUT/subsets.md`` and ``OUT/subsets_TASK.png``.
    """
    import pyarrow.parquet as pq

    binary = [t.name for t in schema.tasks if t.kind == "binary"][:2]
    files = {m: out / "runs" / m / f"seed{seed}" / "eval_predictions.parquet" for m in models}
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
    lines = [f"STEM-Net subset analysis (seed {seed}): subsets by the difference of the single-task "
             f"models' bucket indices (10 equal-frequency buckets), A = {a}, B = {b}; AUC per subset.", ""]
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
