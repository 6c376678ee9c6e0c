"""``recsys_mtl::expert_linear`` (the gates' logits: ``x @ W + b`` in the expert op's layouts, no
ReLU): parity with float64 ``addmm`` / ``baddbmm`` on both CPU GEMM backends, every operand
layout, only the asked-for gradients, opcheck, compile as one opaque op, bad inputs; and
:class:`Gates` on it against its ``addmm`` path."""

from __future__ import annotations

import pytest
import torch

from recsys_mtl.modules.gates import Gates
from recsys_mtl.ops import cpu_gemm
from recsys_mtl.ops.fused_expert import expert_linear

CASES = [(None, 7, 5, 3, "n"), (None, 9, 13, 8, "1n"), (None, 6, 4, 2, None), (2, 5, 7, 4, "g1n"), (3, 4, 6, 9, None)]


def _case(g, b, k, n, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if g is None else (g,)
    x = torch.randn((*lead, b, k), generator=gen)
    w = torch.randn((*lead, k, n), generator=gen)
    shape = {"n": (n,), "1n": (1, n), "g1n": (g, 1, n), None: None}[bias]
    bb = None if shape is None else torch.randn(shape, generator=gen)
    dy = torch.randn((*lead, b, n), generator=gen, dtype=torch.float64)
    return x, w, bb, dy


def _reference(x, w, b):
    x, w = x.double(), w.double()
    z = torch.matmul(x, w)  # B x N or G x B x N
    return z if b is None else z + b.double()


def _grads(fn, x, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


@pytest.mark.parametrize("gemm", ["onednn", "aten"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_reference(case, gemm):
    x, w, b, dy = _case(*case)
    with cpu_gemm.force(gemm):
        got = _grads(expert_linear, x, w, b, dy)
        # Transposed and sliced operands give the same (oneDNN copies what it cannot read in place).
        xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        wt = torch.cat([w, w], -1)[..., : w.shape[-1]]
        got_strided = _grads(expert_linear, xt, wt, b, dy)
    want = _grads(_reference, x.double(), w.double(), None if b is None else b.double(), dy)  # float64 throughout
    for name, a, s, e in zip(("y", "dx", "dw", "db"), got, got_strided, want):
        if e is None:
            assert a is None
            continue
        assert a.shape == e.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(s.double(), e.double(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert (got[0] < 0).any()  # no ReLU


def test_only_the_needed_gradients():
    x, w, b, dy = _case(2, 5, 6, 7, "g1n")
    dx, dw, db = torch.ops.recsys_mtl.expert_linear_backward(dy.float(), x, w, False, False, True)
    assert dx.numel() == dw.numel() == 0 and db.shape == b.shape
    wr = w.clone().requires_grad_()
    (g,) = torch.autograd.grad(expert_linear(x, wr, b), wr, dy.float())
    torch.testing.assert_close(g.double(), torch.matmul(x.double().transpose(1, 2), dy), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck(case):
    x, w, b, dy = _case(*case)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.recsys_mtl.expert_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.recsys_mtl.expert_linear_backward.default,
                          (dy.float(), x.detach(), w.detach(), True, True, b is not None))


def test_compiles_to_one_opaque_op_each_way():
    x, w, b, dy = _case(None, 8, 6, 4, "1n")
    w.requires_grad_()
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w, b: expert_linear(x, w, b).sin().sum(), backend="aot_eager", fullgraph=True)
    fn(x, w, b).backward()
    torch.testing.assert_close(w.grad.double(), x.double().t() @ _reference(x, w.detach(), b).cos(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_op():
    with pytest.raises(ValueError, match=r"expert_linear: x B x K needs weight K x N with the same K"):
        expert_linear(torch.randn(3, 4), torch.randn(5, 2), None)
    with pytest.raises(ValueError, match=r"expert_linear_backward: grad must be \(3, 2\)"):
        torch.ops.recsys_mtl.expert_linear_backward(torch.randn(3, 3), torch.randn(3, 4), torch.randn(4, 2),
                                                    True, True, True)


@pytest.mark.parametrize("grouped", [False, True])
def test_fused_gates_match_the_addmm_gates(grouped):
    torch.manual_seed(0)
    a = Gates(10, 3, 2, grouped_input=grouped, zero_rows=0 if grouped else 2, fused=False)
    b = Gates(10, 3, 2, grouped_input=grouped, zero_rows=0 if grouped else 2, fused=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 17, 10) if grouped else torch.randn(17, 10)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(ya)
    for p, da, db in zip(b.parameters(), torch.autograd.grad(ya, list(a.parameters()), dy),
                         torch.autograd.grad(yb, list(b.parameters()), dy)):
        torch.testing.assert_close(db, da, rtol=1e-5, atol=1e-6)
        assert db.stride() == p.stride()
    with cpu_gemm.force("aten"):
        assert not Gates(4, 2).fused
    with cpu_gemm.force("onednn"):
        assert Gates(4, 2).fused
