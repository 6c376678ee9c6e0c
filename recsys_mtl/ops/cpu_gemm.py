"""float32 CPU GEMMs through oneDNN or through ATen's BLAS (MKL), whichever this CPU runs faster.

ATen sends a float32 ``mm`` / ``addmm`` / ``bmm`` on CPU to MKL. MKL picks its code path by CPU
vendor: on AMD it takes the AVX2 kernels even where the CPU has AVX-512. oneDNN, which PyTorch
also ships (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's CPU Linear fusion
uses), dispatches on the instruction set alone. Measured 2026-12-02 on the 2-core AMD EPYC
(family 26, AVX-512 with a full-width datapath) at 2 threads, float32, B = 2048::

    GEMM (M x K x N)            MKL mm     oneDNN linear
    2048 x 432 x 1024            143          357-403   GFLOP/s  (W1's first expert layer)
    2048 x 1024 x 432            175          349-369             (its input gradient)
    432 x 2048 x 1024            173          248-389             (its weight gradient)
    2048 x 256 x 128             140          187-329             (one expert's second layer)

Elsewhere (an Intel CPU, where MKL takes its AVX-512 path, or an older core) the two are close,
so the choice is measured, not assumed: :func:`backend` times one 1024 x 512 x 512 GEMM both
ways the first time it is asked (about 30 ms, once per process) and keeps the faster. The
environment variable ``RECSYS_MTL_CPU_GEMM`` (``auto``, ``onednn`` or ``aten``) overrides it;
:func:`force` does so inside a block (tests, benchmarks). A process that sees a CUDA device
answers ``aten`` under ``auto``: its models train on the GPU. In a multi-rank job the trainer
makes every rank keep rank 0's measurement (:func:`agree`).

Results agree with MKL's to float32 rounding (a different summation order: relative 1e-6), not
bit for bit. oneDNN reads plain row-major and column-major (transposed) operands in place; a
tensor with any other strides (a slice of a wider matrix, say) is copied first: such layouts can
fall to oneDNN's reference kernels, measured three orders of magnitude slower.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator

import torch

__all__ = ["ENV", "BACKENDS", "check_env", "backend", "agree", "force", "use_onednn", "linear", "mm"]

logger = logging.getLogger(__name__)

ENV = "RECSYS_MTL_CPU_GEMM"
BACKENDS = ("auto", "onednn", "aten")

_forced: str | None = None
_measured: str | None = None


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _best_ms(f, reps: int = 5) -> float:
    f()  # warm-up (oneDNN creates its primitive on the first call)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@torch.no_grad()
def _calibrate() -> str:
    """Times one 1024 x 512 x 512 float32 GEMM through MKL and through oneDNN; the faster by 10 %
    wins (ties stay with ATen). Runs without autograd, on CPU whatever the default device."""
    gen = torch.Generator().manual_seed(0)
    # device="cpu": models are often built under a `with torch.device("meta")` default.
    a = torch.randn(1024, 512, generator=gen, device="cpu")
    b = torch.randn(512, 512, generator=gen, device="cpu")
    aten_ms = _best_ms(lambda: torch.mm(a, b))
    onednn_ms = _best_ms(lambda: linear(a, b.t()))
    choice = "onednn" if onednn_ms < 0.9 * aten_ms else "aten"
    logger.info("float32 CPU GEMMs: %s (1024x512x512: MKL %.2f ms, oneDNN %.2f ms)", choice, aten_ms, onednn_ms)
    return choice


def _wanted() -> str:
    """The forced choice, else ``RECSYS_MTL_CPU_GEMM``, else ``auto`` (validated)."""
    want = _forced or os.environ.get(ENV, "auto")
    if want not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}, got {want!r}")
    return want


def check_env() -> str:
    """``RECSYS_MTL_CPU_GEMM`` (``auto`` when unset), validated; the CLI calls it before any rank starts.

    Raises:
        ValueError: it is not one of ``auto``, ``onednn``, ``aten``.
    """
    return _wanted()


def _measures() -> bool:
    """The choice is this process's measurement: ``auto``, oneDNN built, no CUDA device."""
    return _wanted() == "auto" and _onednn_available() and not torch.cuda.is_available()


def backend() -> str:
    """``"onednn"`` or ``"aten"``: what float32 CPU GEMMs of the fused ops and the experts take.

    Raises:
        ValueError: ``RECSYS_MTL_CPU_GEMM`` set to something other than ``auto``, ``onednn`` or ``aten``.
    """
    global _measured
    want = _wanted()
    if not _onednn_available():
        return "aten"
    if want != "auto":
        return want
    if not _measures():  # a CUDA host
        return "aten"
    if _measured is None:
        _measured = _calibrate()
    return _measured


def agree() -> str:
    """:func:`backend`, with every rank of the default process group on rank 0's measurement.

    Under ``auto`` each process times the GEMMs itself, and two ranks of one job could pick
    differently (their results would then differ at float32 rounding). The trainer calls this once,
    before it builds the model: every rank measures, and rank 0's answer is broadcast and kept.
    Without a process group, with one rank, with the choice forced or set by ``RECSYS_MTL_CPU_GEMM``,
    or on a CUDA host, it is :func:`backend` as is (no collective).
    """
    global _measured
    import torch.distributed as dist

    choice = backend()
    if not _measures() or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choice
    box = [choice]
    dist.broadcast_object_list(box, src=0)
    _measured = box[0]
    return backend()


@contextlib.contextmanager
def force(choice: str | None) -> Iterator[None]:
    """Within the block :func:`backend` answers ``choice`` (``"onednn"``, ``"aten"``, ``"auto"``;
    None: as outside). A module reads the backend when it is built (see
    :class:`~recsys_mtl.modules.experts.Experts`), so build it inside the block too."""
    global _forced
    if choice not in (None, *BACKENDS):
        raise ValueError(f"cpu_gemm.force takes one of {', '.join(BACKENDS)} or None, got {choice!r}")
    before, _forced = _forced, choice
    try:
        yield
    finally:
        _forced = before


def use_onednn(t: torch.Tensor) -> bool:
    """This tensor's GEMMs go to oneDNN: float32 on CPU, non-empty, and the backend is oneDNN."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 and backend() == "onednn"


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) if it is row-major or column-major dense, else a contiguous copy."""
    rows, cols = t.shape
    s0, s1 = t.stride()
    if (s1 == 1 and (s0 == cols or rows == 1)) or (s0 == 1 and (s1 == rows or cols == 1)):
        return t
    return t.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``x @ weight.T (+ bias) (then ReLU)`` as one oneDNN inner product (the ReLU a post-op).

    Args:
        x (Tensor): ``M x K`` float32 on CPU.
        weight (Tensor): ``N x K`` (``nn.Linear``'s layout; a transposed view of ``K x N`` is
            read in place).
        bias (Tensor | None): ``N`` (any shape with ``N`` entries).
        relu (bool): apply ReLU to the result.

    Returns:
        Tensor: ``M x N``, contiguous.
    """
    b = None if bias is None else bias.reshape(-1)
    y = torch.ops.mkldnn._linear_pointwise(_plain(x), _plain(weight), b, "relu" if relu else "none", [], "")
    return y if y.is_contiguous() else y.contiguous()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``M x K``, ``K x N``) through oneDNN: :func:`linear` of ``a`` and ``b.T``."""
    return linear(a, b.t())
