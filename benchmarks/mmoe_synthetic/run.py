"""Reproduces the MMoE/PLE synthetic study (PLE §5.2, Fig. 7) on CPU, scaled down.

For each task correlation it generates the *mmoe* dataset (c=1, m=10, d=512 as in PLE §5.2.1),
trains single-task, Shared-Bottom, MMoE, CGC and PLE with `recsys-mtl compare` (2 ranks), and
plots each model's MTL gain (PLE Eq. 11 on MSE: single-task MSE minus model MSE) against the
correlation. Writes benchmarks/mmoe_synthetic/results.md and mtl_gain.png.

    .venv/bin/python benchmarks/mmoe_synthetic/run.py            # full run (~20-30 min on 2 cores)
    .venv/bin/python benchmarks/mmoe_synthetic/run.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MODELS = ["shared_bottom", "mmoe", "cgc", "ple"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--correlations", default="0.0,0.3,0.6,0.9,1.0")
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work-dir", default="runs/mmoe_synthetic")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args()
    if args.quick:
        args.correlations, args.rows, args.seeds, args.epochs = "0.0,1.0", 20_000, 1, 1
    work = Path(args.work_dir)
    corrs = [float(c) for c in args.correlations.split(",")]
    summary = {}
    for c in corrs:
        data, out = work / f"data_p{c}", work / f"cmp_p{c}"
        if not (data / "schema.json").exists():
            subprocess.run([str(BIN / "recsys-mtl"), "data", "synth", "mmoe", "--out", str(data), "--rows",
                            str(args.rows), "--correlation", str(c), "--seed", "0"], check=True)
        if not (out / "summary.json").exists():
            # PLE §5.2.2: [256, 128, 64] MLPs per task; experts the same size; Adam.
            subprocess.run([str(BIN / "recsys-mtl"), "compare", "--data", str(data), "--models", ",".join(MODELS),
                            "--seeds", str(args.seeds), "--output-dir", str(out), "--nproc-per-node", "2", "--",
                            "--epochs", str(args.epochs), "--batch-size", "512", "--embedding-dim", "4",
                            "--bottom-layer-sizes", "256,128,64", "--expert-layer-sizes", "256,128,64",
                            "--tower-layer-sizes", "32", "--num-experts", "4", "--num-task-experts", "1",
                            "--num-shared-experts", "2", "--num-levels", "2", "--dense-lr", "1e-3"], check=True)
        summary[c] = json.loads((out / "summary.json").read_text())
    write_report(summary, corrs)


def write_report(summary: dict, corrs: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(summary.values()))["single_task"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    lines = ["MTL gain (single-task MSE − model MSE; higher is better) vs task correlation, "
             "mean over seeds", ""]
    lines.append("| model | task | " + " | ".join(f"p={c}" for c in corrs) + " |")
    lines.append("|---|---|" + "---|" * len(corrs))
    for ax, task in zip(axes[0], tasks):
        for m in MODELS:
            gains = [summary[c][m][task]["gain"] for c in corrs]
            ax.plot(corrs, gains, marker="o", label=m)
            lines.append(f"| {m} | {task} | " + " | ".join(f"{g:+.4f}" for g in gains) + " |")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("task correlation")
        ax.set_ylabel("MTL gain (MSE)")
        ax.set_title(task)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "mtl_gain.png", dpi=120)
    lines += ["", "single-task MSE: " + ", ".join(
        f"p={c}: " + "/".join(f"{summary[c]['single_task'][t]['mean']:.4f}" for t in tasks) for c in corrs)]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
