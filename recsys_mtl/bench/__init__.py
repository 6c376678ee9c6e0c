"""Throughput benchmarks against peers (docs/design.md §7, §4.4).

:func:`run_bench` trains recsys_mtl's pipelined, sharded model — eagerly (``recsys_mtl``) and with
the compiled dense head (``recsys_mtl_compiled``, ``--compile-head``) — and, with ``peers=True``,
the same architecture in plain PyTorch and (W1 only: torch-rechub has no STEM-Net) torch-rechub's
PLE on the same pre-generated synthetic batches in one process, with ``torch`` on 2 threads, and
returns (and optionally writes) the ``bench`` JSON, each contender's ``torch.profiler`` op-group
profile included (:mod:`recsys_mtl.bench.profile`).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from typing import Sequence

import torch

from recsys_mtl.bench.gemm import dense_flops_per_sample, measure_gemm_gflops
from recsys_mtl.bench.report import emit
from recsys_mtl.bench.runner import median_s, run_contenders
from recsys_mtl.bench.timing import peak_rss_mb
from recsys_mtl.bench.workloads import Workload, get_workload, make_batches
from recsys_mtl.distributed.malloc import tune_malloc

__all__ = ["run_bench", "format_table", "get_workload", "Workload"]

THREADS = 2
CONTENDERS = ("recsys_mtl", "recsys_mtl_compiled", "plain_pytorch", "torch_rechub")
# recsys_mtl's variants: eager, and the dense head compiled (recsys_mtl.train.compiled).
VARIANTS = {"eager": "recsys_mtl", "compiled": "recsys_mtl_compiled"}
# Peers that implement each model; torch-rechub has no STEM-Net, so W2 reports no torch_rechub key.
PEERS_FOR_MODEL = {"ple": ("plain_pytorch", "torch_rechub"), "stem": ("plain_pytorch",)}


def _machine() -> dict:
    from recsys_mtl.distributed.malloc import malloc_state
    from recsys_mtl.ops import cpu_gemm

    cpu, info = platform.processor() or "", {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                key, _, value = ln.partition(":")
                info.setdefault(key.strip(), value.strip())
        cpu = info.get("model name", cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        # A VM may name only the vendor ("AMD EPYC"): the family / model tell its generation.
        "cpu_family": info.get("cpu family"),
        "cpu_model": info.get("model"),
        # Where this process's float32 CPU GEMMs go (the fused expert op; recsys_mtl.ops.cpu_gemm).
        "cpu_gemm": cpu_gemm.backend(),
        # glibc malloc thresholds of this process (recsys_mtl.distributed.malloc; every contender's).
        "malloc": malloc_state(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _gemm_rates() -> dict[str, float]:
    """2048³ float32 GEMM rate through MKL (``torch.mm``) and, where the build has it, oneDNN."""
    from recsys_mtl.ops import cpu_gemm

    rates = {"aten": measure_gemm_gflops(threads=THREADS)}
    if cpu_gemm._onednn_available():
        rates["onednn"] = measure_gemm_gflops(threads=THREADS, backend="onednn")
    return rates


def run_metadata(load_before: tuple[float, ...], load_after: tuple[float, ...] | None = None) -> dict:
    """The keys every benchmark result records about its run: the load average before and after it
    (``load_after`` None: now), the UTC date and the machine."""
    return {"load_average": {"before": list(load_before), "after": list(load_after or os.getloadavg())},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": _machine()}


def run_bench(
    workload: str,
    *,
    peers: bool = False,
    output: str | None = None,
    steps: int = 20,
    warmup: int = 5,
    batch_size: int | None = None,
    show_progress: bool | None = None,
    print_table: bool = True,
    variants: Sequence[str] = ("eager", "compiled"),
) -> dict:
    """Benchmarks ``workload`` and returns the ``bench`` JSON (docs/design.md §4.4), extra keys included.

    Args:
        workload (str): ``w1`` or ``w2`` (``w1_tiny`` / ``w2_tiny`` are toy-size smoke tests).
        peers (bool): also run the peers: plain PyTorch and torch-rechub for W1, plain PyTorch
            only for W2 (torch-rechub has no STEM-Net; its key is omitted).
        output (str | None): write the JSON there too.
        steps (int): timed steps per contender.
        warmup (int): untimed steps per contender before profiling and before timing.
        batch_size (int | None): override the workload's batch size.
        show_progress (bool | None): tqdm bar on stderr (default: when stderr is a terminal).
        print_table (bool): print :func:`format_table`'s summary to stdout.
        variants (Sequence[str]): recsys_mtl's variants to run: ``eager`` (contender
            ``recsys_mtl``) and/or ``compiled`` (``recsys_mtl_compiled``: the dense head compiled;
            its warm-up includes a cold compile of tens of seconds).

    Returns:
        dict: ``{"workload", "batch_size", "samples_per_s": {contender: float}, "gemm_gflops",
        "ratios", "profile": {contender: {"ms": {group: ms/step}, "gemm_gflops", "wall_ms"}}, ...}``.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown recsys_mtl variants {unknown or list(variants)}; choose from {', '.join(VARIANTS)}")
    w = get_workload(workload)
    bsz = batch_size or w.batch_size
    ours = [VARIANTS[v] for v in dict.fromkeys(variants)]
    names = ours + (list(PEERS_FOR_MODEL[w.model.name]) if peers else [])
    tune_malloc()  # process-wide, before any contender allocates: all of them train under it
    threads_before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        load_before = os.getloadavg()
        gemm_by = _gemm_rates()
        batches = make_batches(w, num_batches=min(steps + warmup, 16), batch_size=bsz, seed=0)
        progress = None
        if show_progress if show_progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            progress = lambda total: tqdm(total=total, desc=f"bench {workload}", file=sys.stderr, leave=False)  # noqa: E731
        contenders = run_contenders(w, batches, names, steps=steps, warmup=warmup, progress=progress)
        gemm_by = {k: max(v, _gemm_rates()[k]) for k, v in gemm_by.items()}  # best of before and after
        gemm = max(gemm_by.values())  # the machine's best float32 GEMM rate
        load_after = os.getloadavg()
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)

    flops = dense_flops_per_sample(w.model, len(w.schema.sparse), len(w.schema.dense), len(w.schema.tasks))
    sps = {c.name: bsz / median_s(c) for c in contenders}
    result: dict = {
        "workload": workload,
        "batch_size": bsz,
        "samples_per_s": sps,
        "gemm_gflops": gemm,
        "gemm_gflops_by_backend": gemm_by,
        "samples_per_s_mean": {c.name: bsz * len(c.step_times) / sum(c.step_times) for c in contenders},
        "samples_per_s_best_step": {c.name: bsz / min(c.step_times) for c in contenders},
        "ms_per_step": {c.name: {"median": 1e3 * median_s(c), **c.ms_per_step} for c in contenders},
        "dense_gflop_per_sample": flops["fwd_bwd"] / 1e9,
        "fraction_of_gemm_limit": {k: v * flops["fwd_bwd"] / (gemm * 1e9) for k, v in sps.items()},
        # each recsys_mtl variant over each peer, and the compiled head over eager
        "ratios": {f"{o}/{k}": sps[o] / v for o in ours for k, v in sps.items() if k not in VARIANTS.values()}
        | ({"recsys_mtl_compiled/recsys_mtl": sps["recsys_mtl_compiled"] / sps["recsys_mtl"]}
           if len(ours) == 2 else {}),
        "profile": {c.name: c.profile for c in contenders},
        "peak_rss_mb": peak_rss_mb(),
        "rss_delta_mb": {c.name: c.rss_delta_mb for c in contenders},
        "scale": w.scale,
        "sequential": w.sequential,
        "steps": steps,
        "warmup": warmup,
        "torch_threads": threads,
        **run_metadata(load_before, load_after),
    }
    if w.sequential:
        result["rss_mb"] = {c.name: c.rss_mb for c in contenders}  # process RSS while each one lived
    if peers and "torch_rechub" not in names:
        result["absent"] = {"torch_rechub": f"torch-rechub has no {w.model.name} model"}
    return emit(result, output, format_table, print_table)


def format_table(result: dict) -> str:
    """Readable summary: samples/s, median ms/step and its breakdown, ratio of each recsys_mtl
    variant over each contender, and each contender's profiled op groups (ms/step)."""
    sps, ms = result["samples_per_s"], result["ms_per_step"]
    ours = [n for n in VARIANTS.values() if n in sps]
    short = {"recsys_mtl": "eager/x", "recsys_mtl_compiled": "compiled/x"}
    lines = [
        f"workload {result['workload']}  batch {result['batch_size']}  threads {result['torch_threads']}  "
        f"GEMM {result['gemm_gflops']:.0f} GFLOP/s  dense {result['dense_gflop_per_sample'] * 1e3:.2f} MFLOP/sample",
        f"{'contender':<20}{'samples/s':>11}{'ms/step':>9}{'emb':>8}{'dense':>8}{'optim':>8}{'%GEMM':>7}"
        + "".join(f"{short[o]:>12}" for o in ours),
    ]
    for name, v in sps.items():
        b = ms[name]
        lines.append(
            f"{name:<20}{v:>11.0f}{b['median']:>9.1f}{b['embedding']:>8.1f}{b['dense']:>8.1f}{b['optimizer']:>8.1f}"
            f"{100 * result['fraction_of_gemm_limit'][name]:>6.1f}%" + "".join(f"{sps[o] / v:>11.2f}x" for o in ours)
        )
    groups = ("gemm", "elementwise", "copies", "compiled_kernels", "embedding", "optimizer", "other")
    lines.append(f"{'profile (ms/step)':<20}" + "".join(f"{g[:10]:>11}" for g in groups) + f"{'GEMM GF/s':>11}")
    for name, p in result.get("profile", {}).items():
        if p:
            lines.append(f"{name:<20}" + "".join(f"{p['ms'][g]:>11.1f}" for g in groups) + f"{p['gemm_gflops']:>11.0f}")
    lines.append(
        f"samples/s = batch / median step; emb/dense/optim = unpipelined breakdown (ms/step); profile = "
        f"torch.profiler self time by op group over {next(iter(result.get('profile', {}).values()), {}).get('steps', 0)} "
        f"steps; peak RSS {result['peak_rss_mb']:.0f} MiB"
    )
    return "\n".join(lines)
