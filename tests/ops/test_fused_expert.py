"""``recsys_mtl::expert_linear_relu``: parity with the float64 reference (PyTorch path, both its
oneDNN and addmm forwards, and the Triton kernels under ``TRITON_INTERPRET=1``), forward and
backward, both layouts; ties at zero; non-contiguous inputs; bias shapes; the backward keeps the
output, not a mask; the Experts module's layouts; opcheck, torch.compile, torch.fx; bad inputs."""

from __future__ import annotations

import os
import re

import pytest
import torch
from triton_interpreted import run_interpreted

import recsys_mtl.ops.fused_expert as fe
from recsys_mtl.ops import cpu_gemm
from recsys_mtl.ops.fused_expert import expert_linear_relu
from recsys_mtl.ops.pytorch.fused_expert import expert_linear_relu_reference

# (G, B, K, N, bias): G None is the 2-D layout (x B x K, weight K x N); bias "n" is N, "1n" 1 x N,
# "g1n" G x 1 x N, None none.
CASES = [
    (None, 1, 1, 1, "n"),
    (None, 5, 7, 3, "1n"),
    (None, 9, 13, 24, "n"),
    (None, 6, 17, 11, None),
    (1, 4, 5, 6, "g1n"),
    (2, 5, 7, 3, "g1n"),
    (3, 9, 16, 33, "g1n"),
    (4, 6, 3, 17, None),
]


def _ids(c) -> str:
    g, b, k, n, bias = c
    return f"{'2d' if g is None else f'3d_g{g}'}-{b}x{k}x{n}-bias_{bias}"


def _bias(g: int | None, n: int, kind: str | None, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor | None:
    shape = {"n": (n,), "1n": (1, n), "g1n": (g, 1, n), None: None}[kind]
    return None if shape is None else torch.randn(shape, generator=gen, dtype=dtype)


def _case(g: int | None, b: int, k: int, n: int, bias: str | None, seed: int = 0,
          dtype: torch.dtype = torch.float32):  # fmt: skip
    """``(x, weight, bias, dy)``; ``dy`` is float64 (cast to the output's dtype when used)."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if g is None else (g,)
    x = torch.randn((*lead, b, k), generator=gen, dtype=dtype)  # (G x) B x K
    w = torch.randn((*lead, k, n), generator=gen, dtype=dtype)  # (G x) K x N
    bb = _bias(g, n, bias, gen, dtype)
    dy = torch.randn((*lead, b, n), generator=gen, dtype=torch.float64)  # (G x) B x N
    return x, w, bb, dy


def _grads(fn, x, w, b, dy):
    """``(y, dx, dw, db)`` of ``fn`` with the upstream gradient ``dy`` (cast to ``y``'s dtype)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


def _reference(x, w, b, dy):
    f64 = [t.double() if t is not None else None for t in (x, w, b)]
    return _grads(expert_linear_relu_reference, *f64, dy)


def _assert_match(got, want, tol: float) -> None:
    for name, a, e in zip(("y", "dx", "dw", "db"), got, want):
        if e is None:
            assert a is None, name
            continue
        assert a.shape == e.shape, (name, a.shape, e.shape)
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _tie_case(g: int | None, seed: int = 0):
    """Small integers everywhere: every sum is exact in float32, and many pre-activations are exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if g is None else (g,)
    b, k, n = 12, 3, 20
    x = torch.randint(-2, 3, (*lead, b, k), generator=gen).float()  # (G x) B x K
    w = torch.randint(-2, 3, (*lead, k, n), generator=gen).float()  # (G x) K x N
    bias = torch.randint(-2, 3, (n,) if g is None else (g, 1, n), generator=gen).float()
    dy = torch.randint(1, 4, (*lead, b, n), generator=gen).double()  # > 0: a tie let through would show
    z = x @ w + bias  # (G x) B x N
    assert (z == 0).sum() >= 10, "the case needs exact zeros"
    return x, w, bias, dy, z


def _check_ties(g: int | None) -> None:
    x, w, b, dy, z = _tie_case(g, seed=0 if g is None else g)
    got = _grads(expert_linear_relu, x, w, b, dy)
    want = _grads(expert_linear_relu_reference, x, w, b, dy)  # float32 torch.relu: exact here too
    for name, a, e in zip(("y", "dx", "dw", "db"), got, want):
        assert torch.equal(a, e), name
    # By hand: dZ = dY ⊙ [Z > 0], so the exact zeros pass nothing (a [Z >= 0] mask would differ).
    dz = dy.float() * (z > 0)
    assert not torch.equal(dz, dy.float() * (z >= 0))
    assert torch.equal(got[2], x.transpose(-1, -2) @ dz)


def _check_explicit_tie() -> None:
    """One pre-activation of exactly 0: y = 0 and every gradient 0, as ``torch.relu`` gives."""
    x = torch.tensor([[1.0, -1.0]], requires_grad=True)
    w = torch.tensor([[1.0], [1.0]], requires_grad=True)
    b = torch.tensor([0.0], requires_grad=True)
    y = expert_linear_relu(x, w, b)
    y.backward(torch.ones_like(y))
    assert y.item() == 0.0 and x.grad.abs().max() == 0 and w.grad.abs().max() == 0 and b.grad.item() == 0.0


def _non_contiguous(g: int | None):
    """Column-major ``x`` and ``weight``, a strided bias (the 3-D ``x`` is the ``E x B x H`` transpose
    view the experts' first layer hands on); contiguous copies for the reference."""
    gen = torch.Generator().manual_seed(11)
    b, k, n = 9, 13, 18
    if g is None:
        x = torch.randn(k, b, generator=gen).t()  # B x K, strides (1, B)
        w = torch.randn(n, k, generator=gen).t()  # K x N, strides (1, K)
        bias = torch.randn(n, 2, generator=gen)[:, 0]  # N, stride 2
    else:
        x = torch.randn(b, g, k, generator=gen).transpose(0, 1)  # G x B x K, strides (K, G K, 1)
        w = torch.randn(g, n, k, generator=gen).transpose(1, 2)  # G x K x N, per group column-major
        bias = torch.randn(g, 2, n, generator=gen)[:, :1, :]  # G x 1 x N, strides (2 N, N, 1)
    assert not x.is_contiguous() and not w.is_contiguous()
    dy = torch.randn(*x.shape[:-1], n, generator=gen, dtype=torch.float64)
    return x, w, bias, dy


def _check_non_contiguous(g: int | None) -> None:
    x, w, b, dy = _non_contiguous(g)
    want = _reference(x.contiguous(), w.contiguous(), b.contiguous(), dy)
    _assert_match(_grads(expert_linear_relu, x, w, b, dy), want, tol=1e-5)
    # A transposed (non-contiguous) upstream gradient, and an expanded one (y.sum()).
    dyt = dy.transpose(-1, -2).contiguous().transpose(-1, -2)
    _assert_match(_grads(expert_linear_relu, x, w, b, dyt), want, tol=1e-5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    expert_linear_relu(*leaves).sum().backward()
    ones = _reference(x, w, b, torch.ones_like(dy))
    for t, e in zip(leaves, ones[1:]):
        torch.testing.assert_close(t.grad.double(), e, rtol=1e-5, atol=1e-5)


# ---- PyTorch path (CPU) --------------------------------------------------------------------


GEMMS = ["onednn", "aten"]  # the pinned CPU torch is built with oneDNN (no skip: both must run)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cpu_matches_reference(case, gemm):
    x, w, b, dy = _case(*case)
    with cpu_gemm.force(gemm):
        assert cpu_gemm.use_onednn(x) == (gemm == "onednn" and x.numel() > 0)
        got = _grads(expert_linear_relu, x, w, b, dy)
    _assert_match(got, _reference(x, w, b, dy), tol=1e-5)
    assert got[0].is_contiguous() and got[0].dtype == torch.float32
    if got[0].numel() >= 8:
        assert (got[0] == 0).any() and (got[0] > 0).any()  # both sides of the ReLU are exercised
    # float64 (never oneDNN) agrees with the float64 reference to rounding.
    x, w, b = (t.double() if t is not None else None for t in (x, w, b))
    _assert_match(_grads(expert_linear_relu, x, w, b, dy), _reference(x, w, b, dy), tol=1e-12)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("g", [None, 3], ids=["2d", "3d"])
def test_cpu_ties_at_zero(g, gemm):
    with cpu_gemm.force(gemm):
        _check_ties(g)
        _check_explicit_tie()


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("g", [None, 3], ids=["2d", "3d"])
def test_cpu_non_contiguous_inputs(g, gemm):
    with cpu_gemm.force(gemm):
        _check_non_contiguous(g)


def test_cpu_bias_shapes_give_gradients_of_their_shape():
    x, w, _, dy = _case(None, 6, 5, 7, None)
    b = torch.randn(7)
    for bias in (b, b.view(1, 7)):
        y, _, _, db = _grads(expert_linear_relu, x, w, bias, dy)
        assert db.shape == bias.shape
        _assert_match((y, db), _reference(x, w, bias, dy)[::3], tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision(dtype):
    for g in (None, 2):
        x, w, b, dy = _case(g, 6, 8, 10, "g1n" if g else "1n", dtype=dtype)
        got = _grads(expert_linear_relu, x, w, b, dy)
        assert all(t.dtype == dtype for t in got)
        _assert_match(got, _reference(x, w, b, dy), tol=3e-2)


def test_empty_batch():
    for g in (None, 2):
        x, w, b, dy = _case(g, 0, 5, 4, "g1n" if g else "n")
        y, dx, dw, db = _grads(expert_linear_relu, x, w, b, dy)
        assert y.shape == dy.shape and dx.shape == x.shape
        assert dw.abs().max() == 0 and db.abs().max() == 0


def test_only_the_needed_gradients():
    x, w, b, dy = _case(2, 5, 6, 7, "g1n")
    want = _reference(x, w, b, dy)
    xr = x.clone().requires_grad_()  # frozen weight and bias
    expert_linear_relu(xr, w, b).backward(dy.float())
    torch.testing.assert_close(xr.grad.double(), want[1], rtol=1e-5, atol=1e-5)
    wr = w.clone().requires_grad_()
    (dw,) = torch.autograd.grad(expert_linear_relu(x, wr, b), wr, dy.float())
    torch.testing.assert_close(dw.double(), want[2], rtol=1e-5, atol=1e-5)
    br = b.clone().requires_grad_()
    (db,) = torch.autograd.grad(expert_linear_relu(x, w, br), br, dy.float())
    torch.testing.assert_close(db.double(), want[3], rtol=1e-5, atol=1e-5)
    dx, dw, db = torch.ops.recsys_mtl.expert_linear_relu_backward(dy.float(), x, w, want[0].float(), False, False, True)
    assert dx.numel() == dw.numel() == 0 and db.shape == b.shape


def test_backward_saves_the_output_not_a_mask():
    x, w, b, _ = _case(3, 5, 6, 7, "g1n")
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = expert_linear_relu(x, w, b)
    assert sorted(tuple(t.shape) for t in saved) == sorted([x.shape, w.shape, y.shape])
    assert all(t.dtype == torch.float32 for t in saved)  # no bool mask
    assert any(t.data_ptr() == y.data_ptr() for t in saved)  # the output itself, not a copy of Z
    assert not any(t.data_ptr() == b.data_ptr() for t in saved)


@pytest.mark.parametrize("grouped", [False, True], ids=["shared_input", "grouped_input"])
def test_matches_the_experts_module(grouped):
    """The op on :class:`Experts`' parameters as they are stored (no permute copy) gives its forward and gradients."""
    from recsys_mtl.modules.experts import Experts

    torch.manual_seed(0)
    d, sizes, n, g, bsz = 10, [8, 6, 5], 3, 2, 7
    m = Experts(d, sizes, num_experts=n, num_groups=g, grouped_input=grouped)
    x = torch.randn(g, bsz, d) if grouped else torch.randn(bsz, d)
    e = n * g
    h = expert_linear_relu(x, m.weight_0, m.bias_0)  # B x (E H1) or G x B x (n H1)
    if grouped:
        h = h.view(g, bsz, n, sizes[0]).transpose(1, 2).reshape(e, bsz, sizes[0])  # E x B x H1
    else:
        h = h.view(bsz, e, sizes[0]).transpose(0, 1)  # E x B x H1, a non-contiguous view
    for i in range(1, m.num_layers):
        h = expert_linear_relu(h, getattr(m, f"weight_{i}"), getattr(m, f"bias_{i}"))  # E x B x H_next
    dy = torch.randn(e, bsz, sizes[-1])
    got = torch.autograd.grad(h, list(m.parameters()), dy)
    want_y = m(x)
    want = torch.autograd.grad(want_y, list(m.parameters()), dy)
    torch.testing.assert_close(h, want_y, rtol=1e-5, atol=1e-6)
    for a, e_ in zip(got, want):
        assert a.shape == e_.shape
        torch.testing.assert_close(a, e_, rtol=1e-5, atol=1e-5)


BAD = [
    ("x_1d", (torch.randn(4), torch.randn(4, 3), None), ValueError, r"x B x K with weight K x N.*\(4,\), \(4, 3\)"),
    ("rank_mix", (torch.randn(2, 5, 4), torch.randn(4, 3), None), ValueError, r"G x B x K.*\(2, 5, 4\), \(4, 3\)"),
    ("k_2d", (torch.randn(5, 4), torch.randn(6, 3), None), ValueError, r"same K.*\(5, 4\).*\(6, 3\)"),
    ("k_3d", (torch.randn(2, 5, 4), torch.randn(2, 6, 3), None), ValueError, r"same G and K.*\(2, 6, 3\)"),
    ("g_3d", (torch.randn(2, 5, 4), torch.randn(3, 4, 3), None), ValueError, r"same G and K.*\(3, 4, 3\)"),
    ("bias_2d", (torch.randn(5, 4), torch.randn(4, 3), torch.randn(2)), ValueError, r"bias must be \(3,\) or \(1, 3\)"),
    ("bias_2d_rank", (torch.randn(5, 4), torch.randn(4, 3), torch.randn(1, 1, 3)), ValueError, r"bias must be"),
    ("bias_3d", (torch.randn(2, 5, 4), torch.randn(2, 4, 3), torch.randn(2, 3)), ValueError,
     r"bias must be \(2, 1, 3\).*got \(2, 3\)"),
    ("int_dtype", (torch.ones(5, 4, dtype=torch.long), torch.ones(4, 3, dtype=torch.long), None), TypeError,
     "floating-point"),
    ("mixed_dtype", (torch.randn(5, 4), torch.randn(4, 3).double(), None), TypeError, "share one"),
    ("bias_dtype", (torch.randn(5, 4), torch.randn(4, 3), torch.randn(3).half()), TypeError, "share one"),
    ("devices", (torch.randn(5, 4), torch.randn(4, 3, device="meta"), None), ValueError, "one device"),
]


@pytest.mark.parametrize("args,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(args, exc, match):
    with pytest.raises(exc, match=match):
        expert_linear_relu(*args)


def test_bad_backward_inputs_raise():
    x, w, b, dy = _case(None, 5, 4, 3, "n")
    y = expert_linear_relu(x, w, b)
    with pytest.raises(ValueError, match=r"grad and y must be \(5, 3\)"):
        torch.ops.recsys_mtl.expert_linear_relu_backward(dy.float()[:4], x, w, y, True, True, True)
    with pytest.raises(TypeError, match="grad and y must be torch.float32"):
        torch.ops.recsys_mtl.expert_linear_relu_backward(dy, x, w, y, True, True, True)


def test_impl_env_var_is_checked(monkeypatch):
    x, w, b, _ = _case(None, 2, 3, 4, "n")
    monkeypatch.setenv(fe.IMPL_ENV, "cuda-please")
    with pytest.raises(ValueError, match=fe.IMPL_ENV):
        expert_linear_relu(x, w, b)


# ---- torch.library / compile / fx ----------------------------------------------------------


@pytest.mark.parametrize("case", [(None, 5, 6, 7, "n"), (None, 5, 6, 7, "1n"), (None, 4, 3, 5, None),
                                  (3, 5, 6, 7, "g1n"), (2, 4, 3, 5, None)], ids=_ids)  # fmt: skip
def test_opcheck(case):
    x, w, b, dy = _case(*case)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.recsys_mtl.expert_linear_relu.default, (x, w, b))
    y = expert_linear_relu(x, w, b).detach()
    torch.library.opcheck(torch.ops.recsys_mtl.expert_linear_relu_backward.default,
                          (dy.float(), x.detach(), w.detach(), y, True, True, b is not None))


class _TwoLayerExperts(torch.nn.Module):
    """An Experts-shaped stack on the op: one wide first layer (``B x K`` · ``K x (E H)``), then ``E``
    batched layers on the ``E x B x H`` transpose view."""

    def __init__(self, d: int, h: int, out: int, e: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.e, self.h = e, h
        self.weight_0 = torch.nn.Parameter(torch.randn(d, e * h, generator=g) / d**0.5)
        self.bias_0 = torch.nn.Parameter(torch.randn(1, e * h, generator=g))
        self.weight_1 = torch.nn.Parameter(torch.randn(e, h, out, generator=g) / h**0.5)
        self.bias_1 = torch.nn.Parameter(torch.randn(e, 1, out, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = expert_linear_relu(x, self.weight_0, self.bias_0)  # B x (E H)
        h = h.view(x.shape[0], self.e, self.h).transpose(0, 1)  # E x B x H
        return expert_linear_relu(h, self.weight_1, self.bias_1)  # E x B x out


def _module_grads(m: torch.nn.Module, fn, x: torch.Tensor, dy: torch.Tensor):
    m.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    y = fn(xr)
    y.backward(dy)
    return [y.detach(), xr.grad, *(p.grad.clone() for p in m.parameters())]


def test_torch_compile_fullgraph_one_opaque_op_each_way():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    m = _TwoLayerExperts(6, 5, 4, 3)
    x = torch.randn(7, 6)
    dy = torch.randn(3, 7, 4)
    graphs: dict[str, list[str]] = {"fw": [], "bw": []}

    def recorder(kind: str):
        def compiler(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            graphs[kind].extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw"))
    recorded = torch.compile(m, fullgraph=True, dynamic=False, backend=backend)
    _module_grads(m, recorded, x, dy)
    fw, bw = graphs["fw"], graphs["bw"]
    assert sum("recsys_mtl.expert_linear_relu.default" in t for t in fw) == 2, fw
    assert sum("recsys_mtl.expert_linear_relu_backward.default" in t for t in bw) == 2, bw
    # Opaque: no GEMM or ReLU of its own is traced around or into it.
    for t in fw + bw:
        assert not re.search(r"aten\.(addmm|baddbmm|bmm|mm|relu|threshold_backward)\.", t), t

    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    for a, e in zip(_module_grads(m, compiled, x, dy), _module_grads(m, m, x, dy)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_fx_symbolic_trace_one_call_function_node():
    m = _TwoLayerExperts(6, 5, 4, 3)
    gm = torch.fx.symbolic_trace(m)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("recsys_mtl.expert_linear_relu" in t for t in targets) == 2, targets
    x = torch.randn(7, 6)
    torch.testing.assert_close(gm(x), m(x))


# ---- Triton kernels under the interpreter --------------------------------------------------
#
# ``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is first imported (every
# ``@triton.jit``, triton.language's own included, reads it when it decorates), and torchrec imports
# triton, so these tests run in a fresh pytest process started with the variable set:
# ``test_triton_kernels_under_the_interpreter`` below starts it; the tests themselves are only
# defined in a process that has the variable.

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Tiny: the interpreter runs every program in numpy. With 16-wide tiles these still cover multi-tile
# loops over B, N and K and ragged edges, in both layouts and every bias shape.
TRITON_CASES = [
    (None, 3, 5, 7, "n"),
    (None, 17, 19, 37, "1n"),
    (None, 18, 33, 6, None),
    (2, 5, 20, 13, "g1n"),
    (3, 18, 6, 33, "g1n"),
    (2, 4, 9, 5, None),
]
TRITON_TESTS = 2 * len(TRITON_CASES) + 2 + 2 + 8 + 2  # + ties, non-contiguous, splits, launchers

if INTERPRETED:

    @pytest.fixture(scope="module")
    def triton_kernels():
        """The kernel module (interpreted), 16-wide tiles, every :func:`expert_linear_relu` call routed to it."""
        from triton.runtime.interpreter import InterpretedFunction

        import recsys_mtl.ops.triton.fused_expert as tk

        for kernel in (tk._expert_fwd_kernel, tk._expert_bwd_input_kernel, tk._expert_bwd_params_kernel):
            assert isinstance(kernel, InterpretedFunction)
        cap, tk.TILE_CAP = tk.TILE_CAP, 16
        try:
            with fe._force_impl("triton"):
                yield tk
        finally:
            tk.TILE_CAP = cap

    @pytest.mark.parametrize("case", TRITON_CASES, ids=_ids)
    def test_triton_interpreted_matches_reference(triton_kernels, case):
        x, w, b, dy = _case(*case, seed=case[1] + case[2])
        assert fe._use_triton(x)
        _assert_match(_grads(expert_linear_relu, x, w, b, dy), _reference(x, w, b, dy), tol=1e-5)

    @pytest.mark.parametrize("case", TRITON_CASES, ids=_ids)
    def test_triton_interpreted_float64(triton_kernels, case):
        """fp64 operands accumulate in fp64: agreement to rounding."""
        x, w, b, dy = _case(*case, seed=case[3], dtype=torch.float64)
        _assert_match(_grads(expert_linear_relu, x, w, b, dy), _reference(x, w, b, dy), tol=1e-12)

    @pytest.mark.parametrize("g", [None, 3], ids=["2d", "3d"])
    def test_triton_interpreted_ties_at_zero(triton_kernels, g):
        _check_ties(g)
        _check_explicit_tie()

    @pytest.mark.parametrize("g", [None, 3], ids=["2d", "3d"])
    def test_triton_interpreted_non_contiguous_inputs(triton_kernels, g):
        _check_non_contiguous(g)

    @pytest.mark.parametrize("g", [None, 2], ids=["2d", "3d"])
    @pytest.mark.parametrize("splits", [1, 2, 3, 5])
    def test_triton_interpreted_weight_gradient_batch_splits(triton_kernels, splits, g):
        """``dW`` / ``db`` from ``P`` batch splits (3 row tiles of 16: 5 asks for more than there are)."""
        x, w, b, dy = _case(g, 37, 6, 19, "g1n" if g else "n", seed=splits)
        want = _reference(x, w, b, dy)
        dw, db = triton_kernels.expert_linear_relu_bwd_params(dy.float(), want[0].float(), x, True, splits=splits)
        torch.testing.assert_close(dw.double(), want[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db.double(), want[3], rtol=1e-5, atol=1e-5)
        assert dw.dtype == db.dtype == torch.float32 and dw.shape == w.shape and db.shape == b.shape

    def test_triton_interpreted_launchers_directly(triton_kernels):
        """The launchers without the op: ``dW`` without ``db``, the bias-only backward, ``K = 0``."""
        tk = triton_kernels
        x, w, b, dy = _case(2, 9, 7, 21, "g1n", seed=5)
        want = _reference(x, w, b, dy)
        y = tk.expert_linear_relu_fwd(x, w, b)
        torch.testing.assert_close(y.double(), want[0], rtol=1e-5, atol=1e-5)
        dw, db = tk.expert_linear_relu_bwd_params(dy.float(), y, x, with_bias=False)
        torch.testing.assert_close(dw.double(), want[2], rtol=1e-5, atol=1e-5)
        assert db.numel() == 0
        dx, dw, db = torch.ops.recsys_mtl.expert_linear_relu_backward(dy.float(), x, w, y, False, False, True)
        assert dx.numel() == dw.numel() == 0
        torch.testing.assert_close(db.double(), want[3], rtol=1e-5, atol=1e-5)
        # K = 0: Y = relu(b) broadcast, dX empty, dW empty, db = Σ_b dY ⊙ [Y > 0].
        x0, w0 = torch.randn(4, 0), torch.randn(0, 5)
        b0 = torch.randn(5)
        got = _grads(expert_linear_relu, x0, w0, b0, torch.ones(4, 5, dtype=torch.float64))
        torch.testing.assert_close(got[0], torch.relu(b0).expand(4, 5))
        torch.testing.assert_close(got[3], 4.0 * (b0 > 0).float())

    def test_triton_interpreted_empty_batch(triton_kernels):
        for g in (None, 2):
            x, w, b, dy = _case(g, 0, 5, 4, "g1n" if g else "n")
            y, dx, dw, db = _grads(expert_linear_relu, x, w, b, dy)
            assert y.shape == dy.shape and dx.shape == x.shape
            assert dw.abs().max() == 0 and db.abs().max() == 0

else:

    def test_triton_kernels_under_the_interpreter():
        run_interpreted(__file__, TRITON_TESTS)
