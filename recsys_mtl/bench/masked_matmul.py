"""``recsys-mtl bench masked-matmul``: the fused masked linear op against per-subnet dense masking.

CSRec (Bai et al., WWW'22), Eq. 7 evaluates ``S = 2T`` subnets ``s(x; M_s ⊙ Θ_s)`` of one shared
bottom MLP. Two implementations of one layer, ``y_s = x_s (W ⊙ M_s)ᵀ + b`` for all ``s``, forward
and backward (``dX``, ``dW``, ``db``), fp32, ``torch`` on 2 threads:

* ``naive``: what a module without the op does: dense float masks (``S x N x K`` buffer), and per
  subnet a dense masked weight copy ``W * M_s`` and ``F.linear``; the outputs stacked to
  ``S x B x N``; autograd for the backward (it keeps the ``S`` masked copies for it).
* ``fused``: :func:`recsys_mtl.ops.masked_matmul.masked_linear`, one op with bit-packed masks
  (on CPU: masks unpacked once per call, batched GEMMs; see its module docstring).

Layers (defaults): a CSRec-like bottom ``K=429 -> 256 -> 128`` (429 = 26 sparse features x 16 +
13 dense features, W1's input width; not a multiple of 8): the first layer reads one input for
every subnet (``B x K``), the second one input per subnet (``S x B x K``); ``S`` = 2 and 4
(``2T`` for ``T = 1, 2``); batch 512 and 2048. Calls of both contenders alternate (round-robin),
and each contender's time is the median over ``steps`` calls after ``warmup``.

Per layer the JSON holds ``ms_per_call`` (forward + backward), ``ratio`` (naive / fused), the
achieved GFLOP/s, the bytes autograd keeps between forward and backward (measured with saved-tensor
hooks), and ``bytes_per_step``: an analytic count of the bytes each kernel reads and writes, every
operand counted once per kernel (a PyTorch op or a Triton kernel; cache re-reads of tiles not
counted), for ``naive``, ``fused_cpu`` (the PyTorch path as implemented) and ``fused_kernel`` (the
Triton kernels: mask bits and ``W`` read, the masked tile built in registers). ``gpu_model`` puts
the ``naive`` and ``fused_kernel`` counts against a data-centre GPU's datasheet figures: a
documented roofline estimate, **not a measurement**.

:func:`bench_layer` times one layer and returns its dict; a full training-step benchmark can reuse
it and add its own entries to :func:`run_masked_matmul_bench`'s result.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from recsys_mtl.bench.csrec_step import bench_csrec_step
from recsys_mtl.bench.gemm import measure_gemm_gflops
from recsys_mtl.bench.report import emit
from recsys_mtl.ops.masked_matmul import masked_linear, pack_masks

__all__ = ["bench_layer", "run_masked_matmul_bench", "bytes_per_step", "gpu_model", "format_masked_matmul_table",
           "DEFAULT_OUTPUT", "LAYERS", "BATCH_SIZES", "SUBNETS", "GPU"]

THREADS = 2
DEFAULT_OUTPUT = "benchmarks/results/masked_matmul.json"
LAYERS: tuple[tuple[int, int, bool], ...] = ((429, 256, True), (256, 128, False))
"""``(K, N, shared_input)`` of the layers: the bottom MLP's first layer reads one input for all subnets."""
BATCH_SIZES: tuple[int, ...] = (512, 2048)
SUBNETS: tuple[int, ...] = (2, 4)
TARGET_RATIO = 1.3
FP32 = 4

GPU = {
    "name": "NVIDIA H100 SXM5 80GB (datasheet figures)",
    "hbm_bytes_per_s": 3.35e12,
    "fp32_flops_per_s": 67e12,  # FMA units: what input_precision="ieee" runs on
    "tf32_tensor_flops_per_s": 495e12,  # dense; for comparison only
    "kernel_launch_s": 4e-6,  # typical launch + dispatch per eager PyTorch op
}
"""The GPU of :func:`gpu_model`: datasheet numbers, not measured here."""


def _naive_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dense_masks: torch.Tensor) -> torch.Tensor:
    """Per-subnet dense masking: ``S x N x K`` float masks, one ``W * M_s`` copy and ``F.linear`` each."""
    s = dense_masks.shape[0]
    xs = [x] * s if x.dim() == 2 else x.unbind(0)  # S x (B x K)
    return torch.stack([F.linear(xs[i], weight * dense_masks[i], bias) for i in range(s)])  # S x B x N


def _fused_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return masked_linear(x, weight, bias, packed)  # S x B x N


def bytes_per_step(b: int, n: int, k: int, s: int, shared_input: bool) -> dict[str, dict[str, int]]:
    """Analytic bytes read + written by one forward + backward of the layer (fp32), per contender.

    Every operand of every kernel counted once (``f = 4`` bytes, ``C = ceil(K/8)``,
    ``X = B K`` shared or ``S B K`` per subnet, ``Y = S B N``):

    * ``naive``, per subnet: ``W * M_s`` (read ``W``, ``M_s``; write the copy: ``3 N K f``),
      ``F.linear`` (``x_s``, the copy, ``b``; write ``y_s``), ``torch.stack`` (``2 Y f``); backward per
      subnet: ``dX_s`` GEMM (``dY_s``, the copy; write ``B K``), ``dW_s`` GEMM (``dY_s``, ``x_s``;
      write ``N K``), its product with ``M_s`` (``3 N K f``), ``db_s``; autograd's accumulations over
      subnets (``3 N K f`` for ``dW``, ``3 B K f`` for a shared ``dX``).
    * ``fused_cpu``, per call: bits -> float masks (read ``S N C`` bytes, write ``S N K f``) and
      ``W * M`` (``2 S N K f + N K f``) in forward and again in backward; one ``baddbmm``; ``dX``
      (``addmm_`` per subnet reading and writing ``dX`` when shared, one ``bmm`` otherwise);
      ``dW``: ``bmm`` to ``S x N x K`` partials, ``mul_`` by the masks, ``sum(0)``, ``+=``; ``db``.
    * ``fused_kernel``, the three Triton kernels: forward (``x``, ``W``, bits, ``b``; write ``Y``),
      ``dX`` (``dY``, ``W``, bits; write ``X``), ``dW`` + ``db`` (``dY``, ``x``, bits; write ``N K`` and
      ``N``).

    Returns:
        dict: ``{contender: {"masks", "weights", "activations", "total"}}`` in bytes; ``masks`` is
        mask traffic (dense masks, bits, unpacked masks), ``weights`` is ``W``, its masked copies and
        gradients, ``activations`` is ``x``, ``y``, their gradients and ``b``.
    """
    f, c = FP32, (k + 7) // 8
    nk, bk, bn = n * k, b * k, b * n
    xb = bk if shared_input else s * bk  # X
    y = s * bn  # Y
    naive = {
        "masks": s * nk * f * 2,  # M_s read by W * M_s (fwd) and by dW_s * M_s (bwd)
        "weights": s * (nk * 2 + nk + nk) * f  # fwd: read W, write copy; GEMM reads copy; bwd dX reads copy
        + s * (nk + nk * 2) * f  # bwd: write dW_s; read it, write dW_s * M_s
        + (s - 1) * 3 * nk * f,  # accumulate dW over subnets
        "activations": (s * bk + y + s * n) * f  # fwd GEMMs: x_s, y_s, b
        + 2 * y * f  # stack
        + (y + s * bk) * f  # dX_s GEMMs: dY_s, write dX_s
        + (y + s * bk) * f  # dW_s GEMMs: dY_s, x_s
        + (y + s * n) * f + (s - 1) * 3 * n * f  # db_s, accumulated
        + ((s - 1) * 3 * bk * f if shared_input else 0),  # accumulate a shared dX
    }
    unpack = s * n * c + s * nk * f  # read bits, write float masks
    fused_cpu = {
        "masks": 2 * unpack + 2 * s * nk * f + s * nk * f,  # fwd/bwd unpack, W * M reads M (twice), dW mul_ reads M
        "weights": 2 * (nk + s * nk) * f  # W * M: read W, write W ⊙ M (fwd, bwd)
        + s * nk * f  # baddbmm reads W ⊙ M
        + s * nk * f  # dX reads W ⊙ M
        + (s * nk + 2 * s * nk + s * nk + nk + 3 * nk) * f,  # dW: write partials, mul_, sum(0), +=
        "activations": (xb + y + n) * f  # baddbmm
        + ((y + 2 * s * bk) if shared_input else (y + xb)) * f  # dX
        + (y + xb) * f  # dW bmm
        + (y + n) * f,  # db
    }
    bits = s * n * c
    fused_kernel = {
        "masks": 3 * bits,  # every kernel reads the bits once
        "weights": (nk + nk + nk) * f,  # fwd reads W, dX reads W, dW writes N x K
        "activations": (xb + n + y) * f + (y + xb) * f + (y + xb + n) * f,
    }
    out = {"naive": naive, "fused_cpu": fused_cpu, "fused_kernel": fused_kernel}
    for v in out.values():
        v["total"] = v["masks"] + v["weights"] + v["activations"]
    return out


def _launches(s: int, shared_input: bool) -> dict[str, int]:
    """Eager kernels per forward + backward (``naive``: per subnet mul, linear; stack; backward per
    subnet 2 GEMMs, a mask product and a bias sum; the accumulations)."""
    naive = s * 2 + 1 + s * 4 + 2 * (s - 1) + (s - 1 if shared_input else 0)
    return {"naive": naive, "fused_kernel": 3}


def gpu_model(b: int, n: int, k: int, s: int, shared_input: bool, gpu: dict | None = None) -> dict:
    """Roofline estimate of one forward + backward on :data:`GPU`: documented, not measured.

    ``time ≥ max(FLOPs / fp32 rate, bytes / HBM bandwidth) + launches x launch cost`` with the
    ``fused_kernel`` and ``naive`` counts of :func:`bytes_per_step` (fp32 ``tl.dot`` with
    ``input_precision="ieee"``, so the FMA rate, not TF32 tensor cores).

    Returns:
        dict: ``{"gpu", "flops", "note", contender: {"bytes", "flop_per_byte", "bound",
        "time_lower_bound_us"}}``.
    """
    gpu = gpu or GPU
    flops = 3 * 2 * s * b * n * k
    moved = bytes_per_step(b, n, k, s, shared_input)
    launches = _launches(s, shared_input)
    out: dict = {"gpu": gpu["name"], "flops": flops,
                 "note": "roofline from datasheet figures and the analytic byte count; not measured"}
    for name in ("naive", "fused_kernel"):
        by = moved[name]["total"]
        t_flop, t_mem = flops / gpu["fp32_flops_per_s"], by / gpu["hbm_bytes_per_s"]
        out[name] = {
            "bytes": by,
            "flop_per_byte": flops / by,
            "bound": "compute" if t_flop >= t_mem else "memory",
            "kernel_launches": launches[name],
            "time_lower_bound_us": 1e6 * (max(t_flop, t_mem) + launches[name] * gpu["kernel_launch_s"]),
        }
    out["ratio_naive_over_fused"] = out["naive"]["time_lower_bound_us"] / out["fused_kernel"]["time_lower_bound_us"]
    return out


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs its forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench_layer(
    batch_size: int,
    in_features: int,
    out_features: int,
    num_subnets: int,
    shared_input: bool,
    *,
    steps: int = 20,
    warmup: int = 5,
    density: float = 0.5,
    seed: int = 0,
) -> dict:
    """Times one masked layer, forward + backward, ``naive`` and ``fused`` alternating.

    Args:
        batch_size (int): ``B``.
        in_features (int): ``K``.
        out_features (int): ``N``.
        num_subnets (int): ``S``.
        shared_input (bool): ``x`` is ``B x K`` (read by every subnet) instead of ``S x B x K``.
        steps (int): timed calls per contender.
        warmup (int): untimed calls per contender first.
        density (float): fraction of ones in the random masks.
        seed (int): of the inputs and masks.

    Returns:
        dict: ``{"B", "K", "N", "S", "shared_input", "ms_per_call": {contender: float}, "ratio"
        (naive / fused, medians), "ms_per_call_best", "ratio_best" (fastest calls), "gflops_per_s",
        "saved_for_backward_bytes", "bytes_per_step", "gpu_model", "max_abs_diff"}``.
    """
    b, k, n, s = batch_size, in_features, out_features, num_subnets
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, k) if shared_input else (s, b, k), generator=g).requires_grad_()  # (S x) B x K
    w = (torch.randn(n, k, generator=g) / k**0.5).requires_grad_()  # N x K
    bias = torch.randn(n, generator=g).requires_grad_()  # N
    masks = torch.rand(s, n, k, generator=g) < density  # S x N x K
    dense, packed = masks.float(), pack_masks(masks)  # S x N x K float; S x N x ceil(K/8) uint8
    dy = torch.randn(s, b, n, generator=g)  # S x B x N
    layers = {"naive": lambda: _naive_layer(x, w, bias, dense), "fused": lambda: _fused_layer(x, w, bias, packed)}

    def step(name: str) -> tuple[torch.Tensor, ...]:
        y = layers[name]()
        return (y, *torch.autograd.grad(y, (x, w, bias), dy))

    ref, got = step("naive"), step("fused")
    diffs = {nm: (a - e).abs().max().item() for nm, a, e in zip(("y", "dx", "dw", "db"), got, ref)}
    saved = {name: _saved_bytes(fn) for name, fn in layers.items()}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(warmup + steps):
        for name in layers:
            t0 = time.perf_counter()
            step(name)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    best = {name: 1e3 * min(v) for name, v in times.items()}
    flops = 3 * 2 * s * b * n * k
    return {
        "B": b, "K": k, "N": n, "S": s, "shared_input": shared_input, "mask_density": density,
        "ms_per_call": ms,
        "ratio": ms["naive"] / ms["fused"],
        "ms_per_call_best": best,
        "ratio_best": best["naive"] / best["fused"],
        "gflops_per_s": {name: flops / (1e-3 * v) / 1e9 for name, v in ms.items()},
        "flops_per_step": flops,
        "saved_for_backward_bytes": saved,
        "mask_storage_bytes": {"dense_fp32": s * n * k * FP32, "bit_packed": packed.numel()},
        "bytes_per_step": bytes_per_step(b, n, k, s, shared_input),
        "gpu_model": gpu_model(b, n, k, s, shared_input),
        "max_abs_diff": diffs,
    }  # fmt: skip


def run_masked_matmul_bench(
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    subnets: Sequence[int] = SUBNETS,
    layers: Sequence[tuple[int, int, bool]] = LAYERS,
    steps: int = 20,
    warmup: int = 5,
    output: str | None = DEFAULT_OUTPUT,
    print_table: bool = True,
    step_batch_sizes: Sequence[int] = (512, 2048),
) -> dict:
    """Every ``(batch, S, layer)`` of :func:`bench_layer` and one full CSRec training step per
    ``step_batch_sizes`` (:func:`recsys_mtl.bench.csrec_step.bench_csrec_step`: ours vs the naive
    per-task masked-copy step) in one run, on :data:`THREADS` threads.

    Returns:
        dict: ``{"benchmark": "masked_matmul", "layers": [bench_layer dicts], "ratio_min",
        "ratio_geomean", "target_ratio", "gemm_gflops", "gpu", ...}`` (also written to ``output``).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    from recsys_mtl.bench import run_metadata

    threads_before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        load_before = os.getloadavg()
        gemm = measure_gemm_gflops(threads=THREADS)
        rows = [bench_layer(bsz, k, n, s, shared, steps=steps, warmup=warmup)
                for bsz in batch_sizes for s in subnets for k, n, shared in layers]
        step_rows = [bench_csrec_step(bsz, steps=max(1, steps // 2), warmup=warmup) for bsz in step_batch_sizes]
        gemm = max(gemm, measure_gemm_gflops(threads=THREADS))
        load_after = os.getloadavg()
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    ratios, best = [r["ratio"] for r in rows], [r["ratio_best"] for r in rows]
    result = {
        "benchmark": "masked_matmul",
        "what": "one masked layer of S subnets, forward + backward (dX, dW, db), fp32, CPU",
        "contenders": {"naive": "per subnet: dense float mask, W * M_s copy, F.linear; stack; autograd",
                       "fused": "recsys_mtl.ops.masked_matmul.masked_linear (bit-packed masks, one op)"},
        "layers": rows,
        "training_step": step_rows,
        "training_step_contenders": {
            "naive": "per task: copy the shared weights, mask them in place with M_t, forward + backward; restore, "
                     "mask with M'_t, contrastive forward + backward; combine the gradients, restore, step",
            "ours": "MaskedSharingProcedure, reference mode: per task one forward of both subnets (one op per "
                    "layer), one backward, one step (the same step as naive: see max_param_diff)",
            "ours_fused": "MaskedSharingProcedure, fused mode: all 2T subnets, one backward, one step per batch",
        },
        "training_step_target_ratio": 2.0,
        "ratio_min": min(ratios),
        "ratio_geomean": statistics.geometric_mean(ratios),
        "ratio_best_geomean": statistics.geometric_mean(best),
        "target_ratio": TARGET_RATIO,
        "gemm_gflops": gemm,
        "gpu": GPU,
        "torch_threads": threads,
        "steps": steps,
        "warmup": warmup,
        **run_metadata(load_before, load_after),
    }
    return emit(result, output, format_masked_matmul_table, print_table)


def format_masked_matmul_table(result: dict) -> str:
    """Readable summary: per layer ms/call of both contenders, naive / fused, GFLOP/s, MB moved."""
    lines = [
        f"masked linear, fwd+bwd, fp32, {result['torch_threads']} threads, GEMM {result['gemm_gflops']:.0f} GFLOP/s",
        f"{'B':>5}{'S':>3}{'K->N':>10}{'x':>7}{'naive ms':>10}{'fused ms':>10}{'naive/fused':>12}"
        f"{'best':>7}{'GFLOP/s':>9}{'MB naive':>10}{'MB fused':>10}{'MB kernel':>10}{'saved MB n/f':>14}",
    ]
    for r in result["layers"]:
        ms, by, sv = r["ms_per_call"], r["bytes_per_step"], r["saved_for_backward_bytes"]
        lines.append(
            f"{r['B']:>5}{r['S']:>3}{str(r['K']) + '->' + str(r['N']):>10}"
            f"{'shared' if r['shared_input'] else 'per-s':>7}"
            f"{ms['naive']:>10.2f}{ms['fused']:>10.2f}{r['ratio']:>11.2f}x{r['ratio_best']:>6.2f}x"
            f"{r['gflops_per_s']['fused']:>9.0f}"
            f"{by['naive']['total'] / 1e6:>10.1f}{by['fused_cpu']['total'] / 1e6:>10.1f}"
            f"{by['fused_kernel']['total'] / 1e6:>10.1f}{sv['naive'] / 1e6:>8.1f}/{sv['fused'] / 1e6:<5.1f}"
        )
    for r in result.get("training_step", []):
        ms = r["ms_per_step"]
        lines.append(
            f"CSRec training step, B={r['B']}, K={r['K']}, bottom {r['bottom']}: naive {ms['naive']:.1f} ms, ours "
            f"{ms['ours']:.1f} ms ({r['ratio']:.2f}x), ours fused mode {ms['ours_fused']:.1f} ms "
            f"({r['ratio_fused']:.2f}x); max param diff naive vs ours {r['max_param_diff']:.1e}"
        )
    lines.append(
        f"naive/fused (medians): min {result['ratio_min']:.2f}x, geomean {result['ratio_geomean']:.2f}x; fastest "
        f"calls: geomean {result['ratio_best_geomean']:.2f}x (target {result['target_ratio']}x). MB: analytic "
        f"bytes moved per step; saved: kept for backward; load {result['load_average']['before'][0]:.1f}"
    )
    return "\n".join(lines)
