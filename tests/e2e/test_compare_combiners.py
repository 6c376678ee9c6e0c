"""`recsys-mtl compare` with gradient-combiner labels, PMTRec ablations and sweeps: the label
grammar, the report writer on full-ranking metrics (Imp vs MODEL/ew, sweep tables), the CLI's
refusals, and one tiny real comparison."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsys_mtl.cli import main
from recsys_mtl.compare import (
    Sweep,
    check_labels,
    label_dir,
    relative_improvement,
    run_specs,
    summarise,
    with_model,
    write_reports,
)
from recsys_mtl.config import GradConfig, TrainConfig
from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KS = (5, 10, 20, 40)


# ---- labels and run plans (no training) ------------------------------------------------------

def test_labels_set_combiner_ablations_and_main_only(tmp_path: Path) -> None:
    base = TrainConfig(data="unused", output_dir=str(tmp_path))
    tasks = ["rec", "social", "category"]
    assert with_model(base, "mmoe").grad == base.grad
    assert with_model(base, "mmoe/pcgrad").grad.combiner == "pcgrad"
    no_focus = with_model(base, "mmoe/pmtrec_no_focus").grad
    assert (no_focus.combiner, no_focus.alpha, no_focus.tau) == ("pmtrec", 1.0, base.grad.tau)
    no_balance = with_model(base, "mmoe/pmtrec_no_balance").grad
    assert (no_balance.combiner, no_balance.alpha, no_balance.tau) == ("pmtrec", base.grad.alpha, 1.0)
    main_only = with_model(base, "mmoe/main_only", tasks)
    assert main_only.loss.task_weights == {"social": 0.0, "category": 0.0}
    assert main_only.grad.combiner == "ew" and main_only.model.name == "mmoe"
    other_main = with_model(dataclasses.replace(base, grad=GradConfig(main_task="social")), "mmoe/main_only", tasks)
    assert other_main.loss.task_weights == {"rec": 0.0, "category": 0.0}
    at = with_model(base, "csrec_at")  # the CSRec ablations keep working
    assert at.model.name == "csrec" and at.csrec.contrastive_loss is False
    assert label_dir("mf/pmtrec") == "mf__pmtrec"


def test_check_labels_refuses_unknown_models_combiners_and_repeats() -> None:
    check_labels(["mmoe", "mmoe/pcgrad", "ple/pmtrec_no_balance", "csrec_cl", "mmoe/main_only", "stem/ew"])
    with pytest.raises(ValueError, match=r"unknown models \['nope/pcgrad'\]"):
        check_labels(["mmoe", "nope/pcgrad"])
    with pytest.raises(ValueError, match=r"unknown combiners in \['mmoe/nope'\]"):
        check_labels(["mmoe/nope"])
    with pytest.raises(ValueError, match="more than once"):
        check_labels(["mmoe/ew", "mmoe/ew"])


def test_run_specs_sweep_directories_and_values(tmp_path: Path) -> None:
    base = TrainConfig(data="unused", output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ck"))
    sweep = Sweep.parse("pmtrec-tau=10,0.01")
    specs = run_specs(base, ["mmoe", "mmoe/pmtrec"], 2, sweep, ["a", "b"])
    assert len(specs) == 2 * 2 * 2
    assert [s.sweep for s in specs[:4]] == ["tau=10", "tau=10", "tau=0.01", "tau=0.01"]
    last = specs[-1]
    assert (last.label, last.seed, last.config.seed) == ("mmoe/pmtrec", 1, 1)
    assert last.config.grad.tau == 0.01 and last.config.grad.combiner == "pmtrec"
    assert last.config.output_dir == str(tmp_path / "out" / "runs" / "mmoe__pmtrec" / "tau=0.01" / "seed1")
    assert last.config.checkpoint_dir == str(tmp_path / "ck" / "mmoe__pmtrec" / "tau=0.01" / "seed1")
    plain = run_specs(base, ["mmoe"], 1)[0]
    assert plain.config.output_dir == str(tmp_path / "out" / "runs" / "mmoe" / "seed0") and plain.sweep == ""
    with pytest.raises(ValueError, match="set grad.tau themselves"):
        sweep.check(["mmoe/pmtrec_no_balance"], base)
    with pytest.raises(ValueError, match=r"--pmtrec-tau\) must be a finite number > 0"):
        Sweep.parse("pmtrec-tau=1,-1").check(["mmoe/pmtrec"], base)
    assert Sweep.parse("pmtrec-alpha=1.0,1.04").tags == ["alpha=1", "alpha=1.04"]
    for bad, msg in (("nope=1", "unknown parameter 'nope'"), ("pmtrec-tau", "PARAM=V1,V2"),
                     ("pmtrec-tau=a,b", "PARAM=V1,V2"), ("pmtrec-tau=1,1.0", "repeated values")):
        with pytest.raises(ValueError, match=msg):
            Sweep.parse(bad)


# ---- the report writer on full-ranking metrics (hand-made results) ----------------------------

def _ranking(level: float) -> dict[str, float]:
    """Every ranking metric at every K, growing with K, scaled by ``level``."""
    return {f"{m}@{k}": level * (1 + i) * k / 40 for i, m in enumerate(("recall", "ndcg", "hit")) for k in KS} | {
        "users": 50}


def _run(label: str, seed: int, rec: float, social: float, category_auc: float | None, sweep: str = "") -> dict:
    return {"model": label, "sweep": sweep, "steps": 10, "samples_per_s": 100.0,
            "config": {"seed": seed, "data": "ranking-data", "grad": {"main_task": None}},
            "tasks": {"rec": _ranking(rec), "social": _ranking(social), "category": {"auc": category_auc}}}


def _schema() -> Schema:
    return Schema(sparse=(SparseFeature("u", 3),), dense=(),
                  tasks=(TaskSpec("rec"), TaskSpec("social"), TaskSpec("category")))


def test_results_md_reports_the_test_split(tmp_path: Path) -> None:
    runs = []
    for label, vals in (("mf/ew", (0.10, 0.12)), ("mf/pmtrec", (0.13, 0.15))):
        for seed, v in enumerate(vals):
            r = _run(label, seed, v, 0.3, 0.6)
            r["test"] = {"rec": _ranking(v / 2)}  # the test split's own numbers
            runs.append(r)
    models = ["mf/ew", "mf/pmtrec"]
    write_reports(tmp_path, runs, _schema(), models, {m: 10 for m in models})
    md = (tmp_path / "results.md").read_text()
    test = md[md.index("on the **test** split"):]
    assert "| model | recall@20 | recall@20 Imp | ndcg@20 | ndcg@20 Imp |" in test
    ew, pm = np.mean([0.05, 0.06]) * 20 / 40, np.mean([0.065, 0.075]) * 20 / 40  # _ranking's recall@20
    row = next(line for line in test.splitlines() if line.startswith("| mf/pmtrec |"))
    assert f"{pm:.4f} ± {np.std([0.065 / 2, 0.075 / 2], ddof=1):.4f}" in row
    assert f"{100 * (pm - ew) / ew:+.2f}%" in row
    runs_without = [{k: v for k, v in r.items() if k != "test"} for r in runs]
    write_reports(tmp_path / "v", runs_without, _schema(), models, {m: 10 for m in models})
    assert "test** split" not in (tmp_path / "v" / "results.md").read_text()


def test_reports_on_ranking_metrics_imp_vs_ew(tmp_path: Path) -> None:
    runs = [
        _run("mf/ew", 0, 0.10, 0.30, 0.60), _run("mf/ew", 1, 0.12, 0.30, 0.62),
        _run("mf/pmtrec", 0, 0.13, 0.28, 0.61), _run("mf/pmtrec", 1, 0.14, 0.28, None),  # an undefined AUC
        _run("mf/main_only", 0, 0.08, 0.10, 0.50), _run("mf/main_only", 1, 0.09, 0.11, 0.52),
    ]
    models = ["mf/ew", "mf/pmtrec", "mf/main_only"]
    params = {m: 1000 for m in models}
    write_reports(tmp_path, runs, _schema(), models, params)

    t = summarise(runs, _schema(), models)
    assert t["mf/ew"]["rec"]["metric"] == "recall@20"
    assert set(t["mf/ew"]["rec"]["metrics"]) == {"recall@20", "ndcg@20"}
    assert list(t["mf/ew"]["category"]["metrics"]) == ["auc"]
    ew, pm = np.mean([0.10, 0.12]) * 20 / 40, np.mean([0.13, 0.14]) * 20 / 40  # recall@20 means
    assert t["mf/pmtrec"]["rec"]["mean"] == pytest.approx(pm)
    assert t["mf/pmtrec"]["rec"]["imp"] == pytest.approx((pm - ew) / ew)
    assert t["mf/pmtrec"]["rec"]["metrics"]["ndcg@20"]["imp"] == pytest.approx((pm - ew) / ew)  # same ratio
    assert t["mf/pmtrec"]["category"]["n"] == 1 and t["mf/pmtrec"]["category"]["mean"] == pytest.approx(0.61)
    assert t["mf/pmtrec"]["category"]["imp"] == pytest.approx((0.61 - 0.61) / 0.61)
    assert "imp" not in t["mf/ew"]["rec"] and "gain" not in t["mf/ew"]["rec"]  # no single_task: no gain
    assert relative_improvement(0.9, 1.0, higher=False) == pytest.approx(0.1)
    assert math.isnan(relative_improvement(1.0, 0.0))

    md = (tmp_path / "results.md").read_text()
    assert "| rec recall@20 | rec recall@20 Imp | rec ndcg@20 | rec ndcg@20 Imp |" in md
    assert "gain" not in md  # a ranking comparison without single_task
    pm_row = next(line for line in md.splitlines() if line.startswith("| mf/pmtrec |"))
    assert f"{pm:.4f} ± {np.std([0.065, 0.07], ddof=1):.4f}" in pm_row
    assert f"{100 * (pm - ew) / ew:+.2f}%" in pm_row
    ew_row = next(line for line in md.splitlines() if line.startswith("| mf/ew |"))
    assert ew_row.count("| - |") >= 1  # no Imp of the reference on itself
    assert "main task `rec`, every ranking metric" in md and "hit@40" in md

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 3 * 2 * 3  # labels x seeds x tasks
    rec = next(r for r in rows if (r["model"], r["seed"], r["task"]) == ("mf/pmtrec", "1", "rec"))
    assert rec["metric"] == "recall@20" and float(rec["value"]) == pytest.approx(0.07)
    assert float(rec["hit@40"]) == pytest.approx(0.14 * 3) and rec["auc"] == "" and rec["users"] == "50"
    cat = next(r for r in rows if (r["model"], r["seed"], r["task"]) == ("mf/pmtrec", "1", "category"))
    assert (cat["metric"], cat["value"], cat["recall@20"]) == ("auc", "", "")
    assert rows[0]["sweep"] == "" and rows[0]["params"] == "1000"
    summary = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: NaN as null
    assert summary["mf/ew"]["rec"]["metrics"]["recall@20"]["mean"] == pytest.approx(ew)
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_reports_without_ew_reference_omit_imp(tmp_path: Path) -> None:
    runs = [_run("mf/pmtrec", 0, 0.1, 0.2, 0.6), _run("mmoe/pcgrad", 0, 0.2, 0.2, 0.6)]
    write_reports(tmp_path, runs, _schema(), ["mf/pmtrec", "mmoe/pcgrad"], {"mf/pmtrec": 1, "mmoe/pcgrad": 2})
    md = (tmp_path / "results.md").read_text()
    assert "Imp" not in md and "gain" not in md and "| mmoe/pcgrad |" in md


def test_sweep_tables(tmp_path: Path) -> None:
    sweep = Sweep("pmtrec-tau", (10.0, 0.1))
    runs = []
    for tag, shift in zip(sweep.tags, (0.0, 0.02)):
        for seed, noise in enumerate((0.0, 0.01)):
            runs += [_run("mf/ew", seed, 0.10 + noise, 0.3, 0.6, tag),
                     _run("mf/pmtrec", seed, 0.12 + shift + noise, 0.3, 0.6, tag)]
    models = ["mf/ew", "mf/pmtrec"]
    write_reports(tmp_path, runs, _schema(), models, {m: 10 for m in models}, sweep)

    md = (tmp_path / "sweep_pmtrec-tau.md").read_text()
    assert "| model | tau=10 | tau=0.1 |" in md
    section = md.split("**rec recall@20**")[1].split("**")[0]
    pm_row = next(line for line in section.splitlines() if line.startswith("| mf/pmtrec |"))
    std = np.std([0.0, 0.005], ddof=1)
    assert pm_row == f"| mf/pmtrec | {0.0625:.4f} ± {std:.4f} | {0.0725:.4f} ± {std:.4f} |"
    assert "**category AUC**" in md and "**social ndcg@20**" in md
    assert (tmp_path / "sweep_pmtrec-tau.png").read_bytes()[:4] == b"\x89PNG"

    results_md = (tmp_path / "results.md").read_text()
    assert "| model | sweep | #params |" in results_md
    row = next(line for line in results_md.splitlines() if line.startswith("| mf/pmtrec | tau=0.1 |"))
    assert f"{100 * (0.0725 - 0.0525) / 0.0525:+.2f}%" in row  # Imp vs mf/ew at the same value
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 2 * 2 * 2 * 3 and {r["sweep"] for r in rows} == {"tau=10", "tau=0.1"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tau=0.1"]["mf/pmtrec"]["rec"]["mean"] == pytest.approx(0.0725)


# ---- CLI refusals -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from recsys_mtl.data.synth import generate_recsys

    d = tmp_path_factory.mktemp("cmb") / "synth"
    generate_recsys(d, rows=2_000, seed=0, num_users=50, num_items=80, progress=False)
    return d


@pytest.mark.parametrize("flags, expected", [
    (["--models", "mmoe/nope"], "unknown combiners in ['mmoe/nope']"),
    (["--models", "nope/pcgrad"], "unknown models ['nope/pcgrad']"),
    (["--models", "mmoe,mmoe"], "more than once"),
    (["--models", "csrec/pcgrad"], "csrec/pcgrad: --grad-combiner pcgrad cannot train csrec"),
    (["--models", "mmoe", "--sweep", "nope=1,2"], "--sweep: unknown parameter 'nope'"),
    (["--models", "mmoe", "--sweep", "pmtrec-tau=1", "--sweep", "pmtrec-alpha=1"], "one --sweep per comparison"),
    (["--models", "mmoe", "--sweep", "pmtrec-tau="], "--sweep expects PARAM=V1,V2,..."),
    (["--models", "mmoe", "--sweep", "pmtrec-tau=1,0"], "--pmtrec-tau) must be a finite number > 0"),
    (["--models", "mmoe/pmtrec_no_balance", "--sweep", "pmtrec-tau=1,2"], "set grad.tau themselves"),
    (["--models", "mmoe", "--sweep", "pmtrec-tau=1,2", "--", "--pmtrec-tau", "3"], "set by --sweep pmtrec-tau"),
    (["--models", "mmoe/main_only", "--", "--pmtrec-main-task", "nope"], "'nope' is not a task of the dataset"),
])
def test_compare_refuses_bad_labels_and_sweeps(capsys, data, tmp_path, flags, expected):
    assert main(["compare", "--data", str(data), "--output-dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out" / "runs").exists()


# ---- one tiny real comparison -------------------------------------------------------------------

@pytest.mark.e2e
def test_compare_combiner_labels_and_tau_sweep(data: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "cmp"
    labels = ["mmoe", "mmoe/pmtrec", "mmoe/pmtrec_no_focus", "mmoe/main_only"]
    proc = subprocess.run(  # one in-process rank: no launcher start-up
        [str(BIN / "recsys-mtl"), "compare", "--data", str(data), "--models", ",".join(labels), "--seeds", "1",
         "--no-single-task", "--sweep", "pmtrec-tau=10,0.1", "--output-dir", str(out), "--",
         "--steps", "2", "--batch-size", "128", "--embedding-dim", "4", "--expert-layer-sizes", "8",
         "--tower-layer-sizes", "4", "--no-eval-outputs", "--pmtrec-alpha", "1.2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = {(m, tag): json.loads((out / "runs" / label_dir(m) / tag / "seed0" / "metrics.json").read_text())["config"]
           for m in labels for tag in ("tau=10", "tau=0.1")}
    for tag, tau in (("tau=10", 10.0), ("tau=0.1", 0.1)):
        assert {cfg[(m, tag)]["grad"]["tau"] for m in labels} == {tau}
        assert cfg[("mmoe", tag)]["grad"]["combiner"] == "ew"
        assert (cfg[("mmoe/pmtrec", tag)]["grad"]["combiner"], cfg[("mmoe/pmtrec", tag)]["grad"]["alpha"]) == \
            ("pmtrec", 1.2)
        assert (cfg[("mmoe/pmtrec_no_focus", tag)]["grad"]["combiner"],
                cfg[("mmoe/pmtrec_no_focus", tag)]["grad"]["alpha"]) == ("pmtrec", 1.0)
        assert cfg[("mmoe/main_only", tag)]["grad"]["combiner"] == "ew"
        assert cfg[("mmoe/main_only", tag)]["loss"]["task_weights"] == {"like": 0.0}
        assert cfg[("mmoe", tag)]["loss"]["task_weights"] == {}
        assert {cfg[(m, tag)]["model"]["name"] for m in labels} == {"mmoe"}

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 * 2 * 2  # labels x values x tasks (1 seed)
    assert {(r["model"], r["sweep"]) for r in rows} == {(m, t) for m in labels for t in ("tau=10", "tau=0.1")}
    assert {r["metric"] for r in rows} == {"auc"} and all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    md = (out / "results.md").read_text()
    for m in labels:
        assert f"| {m} | tau=10 |" in md and f"| {m} | tau=0.1 |" in md
    sweep_md = (out / "sweep_pmtrec-tau.md").read_text()
    assert "| model | tau=10 | tau=0.1 |" in sweep_md and "**click AUC**" in sweep_md
    assert all(f"| {m} |" in sweep_md for m in labels)
    for png in ("results.png", "sweep_pmtrec-tau.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
