"""Per-group time of a training step from ``torch.profiler`` (the bench JSON's ``profile``).

Ops are grouped by name from their *self* CPU time (time in the op itself, not in the ops it
calls, so nothing is counted twice), averaged per step:

* ``gemm``: ``mm``/``addmm``/``bmm``/``baddbmm`` (and oneDNN / MKL variants), with the GFLOP/s the
  profiler's FLOP counts give;
* ``elementwise``: activations and their backwards, arithmetic, reductions, softmax, losses, fills;
* ``copies``: ``copy_``, ``cat``, ``clone``, ``stack``, index and layout copies;
* ``compiled_kernels``: inductor's generated kernels (fused elementwise / copies of a compiled
  head; they show as ``cpp_fused_*`` or the compiled region's own self time);
* ``embedding``: fbgemm's table lookups and their backward with the fused sparse optimizer
  (and any ``embedding_bag`` op);
* ``optimizer``: everything under an ``Optimizer.step`` / the pipeline's ``## optimizer`` range
  (the dense Adam of a recsys_mtl step, the peers' optimizers);
* ``communication``: ``c10d`` collectives (one-rank groups in the bench: their overhead only);
* ``other``: the rest (allocation, views, autograd bookkeeping).

``wall`` is the profiled steps' wall time per step; ``wall - sum(groups)`` is Python,
dispatcher and framework time not inside any op.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
            "aten::_addmm_activation", "mkldnn::_linear_pointwise", "aten::mkldnn_linear", "aten::_mkl_linear",
            "mkl::_mkl_linear"}
COPY_OPS = {"aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::stack", "aten::_to_copy",
            "aten::index", "aten::index_select", "aten::index_add_", "aten::index_put_", "aten::_index_put_impl_",
            "aten::gather", "aten::scatter_add_", "aten::masked_select", "aten::repeat", "aten::flip",
            "aten::embedding_dense_backward", "aten::constant_pad_nd", "aten::slice_backward", "aten::select_backward",
            "aten::as_strided_scatter", "aten::new_zeros", "aten::narrow_copy", "aten::split_with_sizes_copy"}
ELEMENTWISE_PREFIXES = (
    "aten::relu", "aten::threshold", "aten::clamp", "aten::mul", "aten::add", "aten::sub", "aten::div", "aten::where",
    "aten::sum", "aten::mean", "aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::_log_softmax",
    "aten::exp", "aten::log", "aten::sigmoid", "aten::neg", "aten::pow", "aten::sqrt", "aten::rsqrt",
    "aten::binary_cross_entropy", "aten::log_sigmoid", "aten::fill_", "aten::zero_", "aten::zeros", "aten::ones",
    "aten::full", "aten::lerp", "aten::addcmul", "aten::addcdiv", "aten::maximum", "aten::minimum", "aten::abs",
    "aten::sign", "aten::eq", "aten::ne", "aten::gt", "aten::lt", "aten::ge", "aten::le", "aten::logical",
    "aten::_foreach", "aten::_fused_adam", "aten::_fused_adamw", "aten::leaky_relu", "aten::square",
    "aten::native_dropout", "aten::bernoulli", "aten::rsub", "aten::reciprocal", "aten::amax", "aten::max",
    "aten::_local_scalar_dense", "aten::norm", "aten::linalg_vector_norm", "aten::sort", "aten::topk",
)
OPTIMIZER_RANGES = ("Optimizer.step", "## optimizer", "Optimizer.zero_grad")


def _linear_flops(e) -> float:
    """FLOPs of a ``mkldnn::_linear_pointwise`` event (the profiler has no formula for it): input
    ``... x K``, weight ``N x K``: ``2 x rows x K x N``."""
    if e.name != "mkldnn::_linear_pointwise" or len(e.input_shapes or []) < 2:
        return 0.0
    x, w = e.input_shapes[0], e.input_shapes[1]
    if not x or len(w) != 2:
        return 0.0
    rows = 1
    for d in x[:-1]:
        rows *= d
    return 2.0 * rows * x[-1] * w[0]


GROUPS = ("gemm", "elementwise", "copies", "compiled_kernels", "embedding", "optimizer", "communication", "other")


def op_group(name: str) -> str:
    """The group of a profiled op named ``name`` (outside an optimizer step).

    Example::

        >>> [op_group(n) for n in ("aten::addmm", "aten::threshold_backward", "aten::cat",
        ...                        "fbgemm::split_embedding_codegen_forward_cpu", "cpp_fused_relu_0")]
        ['gemm', 'elementwise', 'copies', 'embedding', 'compiled_kernels']
    """
    if name in GEMM_OPS:
        return "gemm"
    if name.startswith("fbgemm::") or "embedding_bag" in name or name.startswith("aten::embedding"):
        return "embedding"
    if name in COPY_OPS:
        return "copies"
    if name.startswith(ELEMENTWISE_PREFIXES):
        return "elementwise"
    if (name.startswith(("cpp_fused", "graph_", "triton_", "Torch-Compiled Region", "CompiledFunction",
                         "## Call CompiledFxGraph", "inductor"))
            or "cpp_fused" in name):
        return "compiled_kernels"
    if name.startswith("c10d::") or name.startswith("gloo:") or name.startswith("nccl:"):
        return "communication"
    return "other"


def _in_optimizer(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(OPTIMIZER_RANGES):
            return True
        parent = parent.cpu_parent
    return False


def profile_groups(step: Callable[[], None], steps: int = 3) -> dict:
    """Runs ``step()`` ``steps`` times under ``torch.profiler`` (CPU, FLOP counts) and returns
    ms per step by group (:data:`GROUPS`), GEMM GFLOP/s and the steps' wall time.

    Example::

        >>> w = torch.randn(64, 64, requires_grad=True)
        >>> p = profile_groups(lambda: torch.relu(torch.randn(32, 64) @ w).sum().backward(), steps=2)
        >>> sorted(p) == sorted(("ms", "gemm_gflops", "wall_ms", "steps"))
        True
        >>> p["ms"]["gemm"] > 0
        True
    """
    ms: dict[str, float] = defaultdict(float)
    flops = 0.0
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        group = "optimizer" if _in_optimizer(e) else op_group(e.name)
        ms[group] += e.self_cpu_time_total / 1e3 / steps  # us -> ms per step
        if group == "gemm":
            flops += (e.flops or _linear_flops(e)) / steps
    gemm_s = ms["gemm"] / 1e3
    return {
        "ms": {g: round(ms[g], 3) for g in GROUPS},
        "gemm_gflops": round(flops / gemm_s / 1e9, 2) if gemm_s > 0 else 0.0,
        "wall_ms": round(1e3 * wall / steps, 3),
        "steps": steps,
    }
