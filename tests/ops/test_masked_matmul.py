"""``recsys_mtl::masked_linear``: parity with the float64 reference (PyTorch path and Triton kernels
under ``TRITON_INTERPRET=1``), forward and backward, both input forms; opcheck, torch.compile,
torch.fx; bit packing; nothing dense per subnet saved for backward."""

from __future__ import annotations

import os

import pytest
import torch
from triton_interpreted import run_interpreted
import torch.nn.functional as F

import recsys_mtl.ops.masked_matmul as mm
from recsys_mtl.ops.masked_matmul import masked_linear, pack_masks, unpack_masks
from recsys_mtl.ops.pytorch.masked_matmul import masked_linear_reference

# (S, B, N, K): odd sizes, K not a multiple of 8 (and below 8), S = 1..4.
SHAPES = [(1, 1, 1, 1), (1, 3, 5, 7), (2, 5, 7, 13), (3, 4, 9, 8), (4, 6, 3, 17), (2, 9, 16, 33), (3, 2, 11, 64)]


def _masks(s: int, n: int, k: int, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(s, n, k, dtype=torch.bool)
    if kind == "ones":
        return torch.ones(s, n, k, dtype=torch.bool)
    return torch.rand(s, n, k, generator=g) < 0.5  # S x N x K


def _case(s: int, b: int, n: int, k: int, shared: bool, bias: bool, kind: str = "random", seed: int = 0,
          dtype: torch.dtype = torch.float32):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, k) if shared else (s, b, k), generator=g, dtype=dtype)  # B x K or S x B x K
    w = torch.randn(n, k, generator=g, dtype=dtype)  # N x K
    bb = torch.randn(n, generator=g, dtype=dtype) if bias else None  # N
    packed = pack_masks(_masks(s, n, k, kind, g))  # S x N x C
    dy = torch.randn(s, b, n, generator=g, dtype=torch.float64)  # S x B x N
    return x, w, bb, packed, dy


def _grads(fn, x, w, b, packed, dy):
    """``(y, dx, dw, db)`` of ``fn`` with the upstream gradient ``dy`` (cast to ``y``'s dtype)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], leaves[1], leaves[2], packed)
    y.backward(dy.to(y.dtype))
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


def _reference(x, w, b, packed, dy):
    f64 = [t.double() if t is not None else None for t in (x, w, b)]
    return _grads(masked_linear_reference, *f64, packed, dy)


def _assert_match(got, want, tol: float) -> None:
    for name, a, e in zip(("y", "dx", "dw", "db"), got, want):
        if e is None:
            assert a is None, name
            continue
        assert a.shape == e.shape, (name, a.shape, e.shape)
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


# ---- bit packing ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 8, 9, 16, 45])
def test_pack_unpack_round_trip(k):
    m = torch.rand(3, 5, k, generator=torch.Generator().manual_seed(k)) < 0.5
    p = pack_masks(m)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, (k + 7) // 8)
    assert torch.equal(unpack_masks(p, k), m)
    assert torch.equal(mm._unpack_as(p, k, torch.float32), m.float())  # the fast path's unpacking


def test_bit_order_is_little_endian_within_a_byte():
    m = torch.zeros(1, 1, 12, dtype=torch.bool)
    m[0, 0, [0, 3, 9]] = True
    assert pack_masks(m).tolist() == [[[0b1001, 0b10]]]


# ---- PyTorch path (CPU) --------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_subnet_x"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_matches_reference(shape, bias, shared):
    x, w, b, p, dy = _case(*shape, shared=shared, bias=bias)
    _assert_match(_grads(masked_linear, x, w, b, p, dy), _reference(x, w, b, p, dy), tol=1e-5)
    # float64 through the op agrees with the float64 reference to rounding.
    x, w, b = (t.double() if t is not None else None for t in (x, w, b))
    _assert_match(_grads(masked_linear, x, w, b, p, dy), _reference(x, w, b, p, dy), tol=1e-12)


@pytest.mark.parametrize("kind", ["zeros", "ones"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_subnet_x"])
def test_cpu_all_zero_and_all_one_masks(kind, shared):
    s, bsz, n, k = 3, 5, 6, 11
    x, w, b, p, dy = _case(s, bsz, n, k, shared=shared, bias=True, kind=kind)
    got = _grads(masked_linear, x, w, b, p, dy)
    _assert_match(got, _reference(x, w, b, p, dy), tol=1e-5)
    y, dx, dw, db = got
    if kind == "zeros":
        assert torch.equal(y, b.expand(s, bsz, n)) and dx.abs().max() == 0 and dw.abs().max() == 0
    else:  # the dense layer
        torch.testing.assert_close(y, F.linear(x, w, b).expand(s, bsz, n) if shared else F.linear(x, w, b))
    torch.testing.assert_close(db, dy.sum((0, 1)).float())


def test_one_flipped_bit_changes_exactly_one_output_column():
    x, w, b, p, _ = _case(2, 4, 5, 13, shared=True, bias=True)
    m = unpack_masks(p, 13)
    m[1, 3, 10] = ~m[1, 3, 10]
    delta = masked_linear(x, w, b, pack_masks(m)) - masked_linear(x, w, b, p)  # S x B x N
    sign = 1.0 if m[1, 3, 10] else -1.0
    torch.testing.assert_close(delta[1, :, 3], sign * x[:, 10] * w[3, 10])
    delta[1, :, 3] = 0
    assert delta.abs().max() == 0


def _sum_backward(x, w, b, p):
    """``(dx, dw, db)`` of ``y.sum()``: the upstream gradient is an expanded (all strides 0) tensor."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    masked_linear(*leaves, p).sum().backward()
    return [t.grad for t in leaves]


def _check_sum_backward(shared: bool) -> None:
    x, w, b, p, dy = _case(3, 4, 5, 11, shared=shared, bias=True, seed=7)
    want = _reference(x, w, b, p, torch.ones_like(dy))
    for got, e in zip(_sum_backward(x, w, b, p), want[1:]):
        torch.testing.assert_close(got.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_subnet_x"])
def test_cpu_expanded_upstream_gradient(shared):
    _check_sum_backward(shared)


def test_cpu_chunks_of_subnets_match(monkeypatch):
    # A chunk budget below one subnet's N x K masks: every subnet is its own chunk.
    monkeypatch.setattr(mm, "CHUNK_BYTES", 16)
    for shared in (True, False):
        x, w, b, p, dy = _case(4, 5, 7, 19, shared=shared, bias=True, seed=3)
        _assert_match(_grads(masked_linear, x, w, b, p, dy), _reference(x, w, b, p, dy), tol=1e-5)


def test_only_the_needed_gradients():
    x, w, b, p, dy = _case(2, 3, 4, 9, shared=False, bias=True)
    xr, wr = x.clone().requires_grad_(), w.clone()  # frozen weight and bias
    masked_linear(xr, wr, b, p).backward(dy.float())
    want = _reference(x, w, b, p, dy)
    torch.testing.assert_close(xr.grad.double(), want[1], rtol=1e-5, atol=1e-5)
    wr.requires_grad_()
    y = masked_linear(x, wr, None, p)
    (dw,) = torch.autograd.grad(y, wr, dy.float())
    torch.testing.assert_close(dw.double(), want[2], rtol=1e-5, atol=1e-5)


def test_backward_keeps_no_dense_masked_weight():
    s, bsz, n, k = 4, 3, 8, 16
    x, w, b, p, _ = _case(s, bsz, n, k, shared=True, bias=True)
    w.requires_grad_()

    def saved_shapes(fn) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            fn(x, w, b, p)
        return shapes

    assert (s, n, k) in saved_shapes(masked_linear_reference)  # the reference does keep one
    assert sorted(saved_shapes(masked_linear)) == sorted([(bsz, k), (n, k), (s, n, (k + 7) // 8)])


def test_bad_shapes_raise():
    x, w, b, p, _ = _case(2, 3, 4, 9, shared=True, bias=True)
    with pytest.raises(ValueError, match="packed_masks"):
        masked_linear(x, w, b, p[:, :, :1])
    with pytest.raises(ValueError, match="x must be"):
        masked_linear(torch.randn(3, 3, 9), w, b, p)
    with pytest.raises(ValueError, match="bias"):
        masked_linear(x, w, b[:3], p)
    with pytest.raises(ValueError, match="dtype"):
        masked_linear(x.double(), w, b, p)


# ---- torch.library / compile / fx ----------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_subnet_x"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck(shared, bias):
    x, w, b, p, dy = _case(3, 5, 6, 11, shared=shared, bias=bias)
    x.requires_grad_(), w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    torch.library.opcheck(torch.ops.recsys_mtl.masked_linear.default, (x, w, b, p))
    torch.library.opcheck(torch.ops.recsys_mtl.masked_linear_backward.default,
                          (dy.float(), x.detach(), w.detach(), p, True, True, bias))


def test_torch_compile_fullgraph_matches_eager():
    x, w, b, p, dy = _case(3, 5, 6, 11, shared=True, bias=True)

    def layer(x, w, b, p):
        h = torch.relu(masked_linear(x, w, b, p))  # S x B x N
        return masked_linear(h, w[:, :6].contiguous(), b, p[:, :, :1].contiguous())  # S x B x N

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    _assert_match(_grads(compiled, x, w, b, p, dy), _grads(layer, x, w, b, p, dy), tol=1e-6)


class _Layer(torch.nn.Module):
    def __init__(self, packed: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
        self.register_buffer("masks", packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.bias, self.masks).sum(0)  # B x N


def test_fx_symbolic_trace():
    x, w, b, p, _ = _case(2, 4, 5, 10, shared=True, bias=True)
    m = _Layer(p, w, b)
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert any("recsys_mtl.masked_linear" in str(t) for t in targets), targets
    torch.testing.assert_close(gm(x), m(x))


def test_impl_env_var_is_checked(monkeypatch):
    x, w, b, p, _ = _case(1, 2, 3, 4, shared=True, bias=True)
    monkeypatch.setenv(mm.IMPL_ENV, "cuda-please")
    with pytest.raises(ValueError, match=mm.IMPL_ENV):
        masked_linear(x, w, b, p)


# ---- Triton kernels under the interpreter --------------------------------------------------
#
# ``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is first imported (every
# ``@triton.jit``, triton.language's own included, reads it when it decorates), and torchrec imports
# triton, so these tests run in a fresh pytest process started with the variable set:
# ``test_triton_kernels_under_the_interpreter`` below starts it; the tests themselves are only
# defined in a process that has the variable.

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Tiny: the interpreter runs every program in numpy. With 16-wide tiles these still cover multi-tile
# loops over B, N and K, ragged edges and K % 8 != 0.
TRITON_CASES = [
    # (S, B, N, K, shared, bias, masks)
    (1, 3, 5, 7, True, True, "random"),
    (2, 17, 19, 37, True, False, "random"),
    (3, 5, 20, 13, False, True, "random"),
    (4, 18, 6, 33, False, False, "random"),
    (2, 4, 5, 9, True, True, "zeros"),
    (2, 4, 5, 9, False, True, "ones"),
]
TRITON_TESTS = len(TRITON_CASES) + 12  # + expanded gradients (2), batch splits (8), launchers, tile sizes

if INTERPRETED:

    @pytest.fixture(scope="module")
    def triton_kernels():
        """The kernel module (interpreted), 16-wide tiles, every :func:`masked_linear` call routed to it."""
        from triton.runtime.interpreter import InterpretedFunction

        import recsys_mtl.ops.triton.masked_matmul as tk

        assert isinstance(tk._masked_linear_fwd_kernel, InterpretedFunction)
        cap, tk.TILE_CAP = tk.TILE_CAP, 16
        try:
            with mm._force_impl("triton"):
                yield tk
        finally:
            tk.TILE_CAP = cap

    @pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
    def test_triton_interpreted_matches_reference(triton_kernels, case):
        s, bsz, n, k, shared, bias, kind = case
        x, w, b, p, dy = _case(s, bsz, n, k, shared=shared, bias=bias, kind=kind, seed=s + k)
        _assert_match(_grads(masked_linear, x, w, b, p, dy), _reference(x, w, b, p, dy), tol=1e-5)

    @pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_subnet_x"])
    def test_triton_interpreted_expanded_upstream_gradient(triton_kernels, shared):
        _check_sum_backward(shared)

    def test_triton_interpreted_launchers_directly(triton_kernels):
        """The launchers without the op: non-contiguous inputs, ``dW`` without ``db``."""
        tk = triton_kernels
        x, w, b, p, dy = _case(2, 9, 7, 21, shared=False, bias=True, seed=5)
        xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # S x B x K, strides (B K, 1, B)
        wt = w.t().contiguous().t()  # N x K, column-major
        want = _reference(x, w, b, p, dy)
        torch.testing.assert_close(tk.masked_linear_fwd(xt, wt, b, p).double(), want[0], rtol=1e-5, atol=1e-5)
        dyt = dy.float().transpose(1, 2).contiguous().transpose(1, 2)  # S x B x N, column-major per subnet
        dx = tk.masked_linear_bwd_input(dyt, wt, p, shared=False)
        torch.testing.assert_close(dx.double(), want[1], rtol=1e-5, atol=1e-5)
        dw, db = tk.masked_linear_bwd_params(dy.float(), xt, p, 21, with_bias=False)
        torch.testing.assert_close(dw.double(), want[2], rtol=1e-5, atol=1e-5)
        assert db.numel() == 0

    @pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_subnet_x"])
    @pytest.mark.parametrize("splits", [1, 2, 3, 5])
    def test_triton_interpreted_weight_gradient_batch_splits(triton_kernels, splits, shared):
        """``dW`` / ``db`` from ``P`` batch splits (3 row tiles of 16: 5 asks for more than there are)."""
        x, w, b, p, dy = _case(3, 37, 6, 19, shared=shared, bias=True, seed=splits)
        want = _reference(x, w, b, p, dy)
        dw, db = triton_kernels.masked_linear_bwd_params(dy.float(), x, p, 19, with_bias=True, splits=splits)
        torch.testing.assert_close(dw.double(), want[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db.double(), want[3], rtol=1e-5, atol=1e-5)
        assert dw.dtype == db.dtype == torch.float32 and dw.shape == (6, 19) and db.shape == (6,)

    def test_triton_interpreted_block_sizes_are_powers_of_two_from_16(triton_kernels):
        for dims in [(1, 1, 1), (17, 100, 3), (4096, 256, 448)]:
            for t in triton_kernels.block_sizes(*dims, cap=64):
                assert t >= 16 and t & (t - 1) == 0

else:

    def test_triton_kernels_under_the_interpreter():
        run_interpreted(__file__, TRITON_TESTS)
