"""The machine's fp32 GEMM rate and the analytic dense FLOPs of a workload."""

from __future__ import annotations

import time

import torch

from recsys_mtl.config import ModelConfig


def measure_gemm_gflops(size: int = 2048, repeats: int = 5, threads: int = 2, backend: str = "aten") -> float:
    """Best-of-``repeats`` fp32 ``size x size @ size x size`` matmul rate in GFLOP/s on ``threads`` threads,
    through ATen's BLAS (``backend="aten"``: ``torch.mm``, MKL) or oneDNN (``"onednn"``: the inner
    product :func:`recsys_mtl.ops.cpu_gemm.linear` runs)."""
    if backend not in ("aten", "onednn"):
        raise ValueError(f"backend must be 'aten' or 'onednn', got {backend!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g)
        b = torch.randn(size, size, generator=g)
        c = torch.empty(size, size)
        if backend == "aten":
            run = lambda: torch.mm(a, b, out=c)  # noqa: E731
        else:
            from recsys_mtl.ops.cpu_gemm import linear

            run = lambda: linear(a, b.t())  # noqa: E731
        run()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        return 2.0 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(old)


def _mlp_macs(d_in: int, sizes: tuple[int, ...] | list[int]) -> tuple[int, int]:
    macs = 0
    for s in sizes:
        macs += d_in * s
        d_in = s
    return macs, d_in


def ple_dense_flops_per_sample(model: ModelConfig, num_sparse: int, num_dense: int, num_tasks: int) -> dict[str, float]:
    """Dense FLOPs per sample of PLE (matmul multiply-adds x 2; biases, activations, softmax ignored).

    Backward costs twice the forward (gradients w.r.t. weights and inputs; the first layer's input
    gradient is needed because it flows into the embeddings), so fwd+bwd = 3 x fwd.

    Example::

        >>> from recsys_mtl.bench.workloads import w1
        >>> w = w1()
        >>> f = ple_dense_flops_per_sample(w.model, 26, 13, 2)
        >>> round(f["fwd_bwd"] / 1e6, 2)
        7.65
    """
    d = num_sparse * model.embedding_dim + num_dense
    t, n, m = num_tasks, model.num_task_experts, model.num_shared_experts
    macs = 0
    for level in range(model.num_levels):
        e_macs, h = _mlp_macs(d, model.expert_layer_sizes)
        macs += (t * n + m) * e_macs  # experts
        macs += t * d * (n + m)  # task gates
        if level < model.num_levels - 1:
            macs += d * (t * n + m)  # shared gate
        macs += t * (n + m) * h  # task mixing
        if level < model.num_levels - 1:
            macs += (t * n + m) * h  # shared mixing
        d = h
    tower_macs, last = _mlp_macs(d, model.tower_layer_sizes)
    macs += t * (tower_macs + last)
    fwd = 2.0 * macs
    return {"fwd": fwd, "fwd_bwd": 3.0 * fwd}


def stem_dense_flops_per_sample(model: ModelConfig, num_sparse: int, num_dense: int, num_tasks: int) -> dict[str, float]:
    """Dense FLOPs per sample of STEM-Net with every feature task-specific (as
    :func:`ple_dense_flops_per_sample`: matmul multiply-adds x 2, fwd+bwd = 3 x fwd).

    Example::

        >>> from recsys_mtl.bench.workloads import w2
        >>> w = w2()
        >>> f = stem_dense_flops_per_sample(w.model, 26, 0, 2)
        >>> round(f["fwd_bwd"] / 1e6, 2)
        4.68
    """
    d = num_sparse * model.embedding_dim + num_dense
    t, n, m = num_tasks, model.num_task_experts, model.num_shared_experts
    e_macs, h = _mlp_macs(d, model.expert_layer_sizes)
    macs = (t * n + m) * e_macs  # task-specific + shared experts
    gate_in = 2 * d if model.stem_gate_input == "concat" else d
    g_macs, g_last = _mlp_macs(gate_in, model.gate_layer_sizes)
    macs += t * (g_macs + g_last * (t * n + m))  # one gate MLP + score layer per task
    macs += t * (t * n + m) * h  # mixing
    tower_macs, last = _mlp_macs(h, model.tower_layer_sizes)
    macs += t * (tower_macs + last)
    fwd = 2.0 * macs
    return {"fwd": fwd, "fwd_bwd": 3.0 * fwd}


def dense_flops_per_sample(model: ModelConfig, num_sparse: int, num_dense: int, num_tasks: int) -> dict[str, float]:
    """Dense FLOPs per sample of a benchmark model (``ple`` or ``stem``)."""
    if model.name == "ple":
        return ple_dense_flops_per_sample(model, num_sparse, num_dense, num_tasks)
    if model.name == "stem":
        return stem_dense_flops_per_sample(model, num_sparse, num_dense, num_tasks)
    raise ValueError(f"no dense FLOP count for model {model.name!r}")
