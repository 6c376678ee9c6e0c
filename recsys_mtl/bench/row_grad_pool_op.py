"""Micro-benchmark of ``recsys_mtl::row_grad_pool`` on CPU: the op's fused PyTorch path against
the step-by-step reference (:func:`recsys_mtl.ops.pytorch.row_grad_pool.row_grad_pool_reference`).

Both get the same float32 inputs: ``T`` tasks' gradients at ``N`` lookup positions, rows drawn
uniformly from ``U`` (so rows repeat and some are unused), ``D``-wide, focus ``α = 2`` on task 0,
``τ = 0.5``. One untimed call of each first, then ``repeats`` calls of each, alternating; the
reported time is the median per call (``time.perf_counter``), in milliseconds.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from recsys_mtl.ops.pytorch.row_grad_pool import row_grad_pool_reference
from recsys_mtl.ops.row_grad_pool import _force_impl, row_grad_pool

__all__ = ["bench_op"]


def _time_s(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_op(T: int = 3, N: int = 8192, U: int = 3000, D: int = 32, repeats: int = 20) -> dict:
    """Times the fused CPU path and the reference on one random ``T x N x D`` input.

    Args:
        T (int): tasks.
        N (int): lookup positions.
        U (int): unique rows.
        D (int): embedding dim.
        repeats (int): timed calls of each (after one warm-up call of each).

    Returns:
        dict: ``{"fused_ms", "reference_ms", "ratio" (reference / fused), "shape": {T, N, U, D},
        "repeats", "torch_threads"}``.

    Example::

        >>> r = bench_op(T=2, N=16, U=5, D=3, repeats=1)
        >>> sorted(r)
        ['fused_ms', 'ratio', 'reference_ms', 'repeats', 'shape', 'torch_threads']
    """
    if min(T, U, repeats) < 1 or min(N, D) < 0:
        raise ValueError(f"need T, U, repeats >= 1 and N, D >= 0, got T={T}, N={N}, U={U}, D={D}, repeats={repeats}")
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(T, N, D, generator=g)  # T x N x D
    rows = torch.randint(0, U, (N,), generator=g)  # N
    focus = torch.ones(T)
    focus[0] = 2.0
    tau = 0.5

    def fused() -> object:
        with _force_impl("torch"):
            return row_grad_pool(grads, rows, U, focus, tau)

    def reference() -> object:
        return row_grad_pool_reference(grads, rows, U, focus, tau)

    fused(), reference()  # warm-up
    times: dict[str, list[float]] = {"fused": [], "reference": []}
    for _ in range(repeats):
        times["fused"].append(_time_s(fused))
        times["reference"].append(_time_s(reference))
    fused_ms = 1e3 * statistics.median(times["fused"])
    reference_ms = 1e3 * statistics.median(times["reference"])
    return {
        "fused_ms": fused_ms,
        "reference_ms": reference_ms,
        "ratio": reference_ms / fused_ms if fused_ms > 0 else float("inf"),
        "shape": {"T": T, "N": N, "U": U, "D": D},
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
    }
