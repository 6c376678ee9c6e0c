"""``recsys_mtl::row_grad_pool``: parity with the float64 reference (PyTorch path and, under
``TRITON_INTERPRET=1``, the Triton kernel), the end-to-end meaning against autograd through
``embedding_bag``, numerical stability of the softmax, opcheck, torch.compile, bad inputs, and the
micro-benchmark's smoke test."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import recsys_mtl.ops.row_grad_pool as rgp
from recsys_mtl.ops.pytorch.row_grad_pool import row_grad_pool_reference
from recsys_mtl.ops.row_grad_pool import row_grad_pool

ROOT = Path(__file__).resolve().parents[2]


def _case(t: int, n: int, u: int, d: int, *, used: int | None = None, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(grads T x N x D, rows N in [0, used), focus T)``; ``used`` defaults to ``u`` (rows repeat)."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(t, n, d, generator=g, dtype=dtype)  # T x N x D
    rows = torch.randint(0, max(1, used or u), (n,), generator=g)  # N
    focus = torch.ones(t, dtype=dtype)
    return grads, rows, focus


def _reference(grads, rows, u, focus, tau, mask=None, norms=None):
    """The float64 reference."""
    return row_grad_pool_reference(grads.double(), rows, u, focus.double(), tau, mask,
                                   None if norms is None else norms.double())


def _assert_close(got, want, tol: float = 1e-5) -> None:
    for name, a, e in zip(("out", "weights"), got, want):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


# (name, T, N, U, D, options): options are used (rows drawn from [0, used)), mask, focus, tau,
# norms ("random" or "computed") and single (every row looked up once).
CASES = [
    ("repeated_rows", 3, 40, 6, 8, {}),
    ("single_positions", 3, 12, 12, 4, {"single": True}),
    ("unused_rows", 3, 30, 20, 6, {"used": 5}),
    ("empty_batch", 3, 0, 4, 6, {}),
    ("no_rows", 2, 0, 0, 4, {}),
    ("one_task", 1, 25, 7, 4, {}),
    ("masked_task", 3, 40, 6, 8, {"mask": [True, False, True]}),
    ("focus_task0", 3, 40, 6, 8, {"focus": [3.0, 1.0, 1.0]}),
    ("tiny_tau", 3, 40, 6, 8, {"tau": 1e-6}),
    ("huge_tau", 3, 40, 6, 8, {"tau": 1e6}),
    ("given_norms", 3, 40, 6, 8, {"norms": "random"}),
    ("given_norms_masked", 4, 40, 6, 8, {"norms": "random", "mask": [False, True, True, False]}),
    ("odd_d5", 2, 31, 9, 5, {"focus": [1.5, 1.0]}),
    ("odd_d33", 3, 50, 8, 33, {"mask": [True, True, False], "focus": [2.0, 1.0, 1.0]}),
]


def _inputs(t: int, n: int, u: int, d: int, opts: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    grads, rows, focus = _case(t, n, u, d, used=opts.get("used"), seed=seed, dtype=dtype)
    if opts.get("single"):
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # N, each row once
    if "focus" in opts:
        focus = torch.tensor(opts["focus"], dtype=dtype)
    mask = torch.tensor(opts["mask"]) if "mask" in opts else None
    norms = None
    if opts.get("norms") == "random":
        norms = 3 * torch.rand(u, t, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)  # U x T
    return grads, rows, u, focus, opts.get("tau", 0.5), mask, norms


# ---- PyTorch path (CPU) --------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cpu_matches_reference(case):
    _, t, n, u, d, opts = case
    args = _inputs(t, n, u, d, opts)
    got = row_grad_pool(*args)
    _assert_close(got, _reference(*args))
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].shape == (n, d) and got[1].shape == (u, t)
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[0]).all()
    # float64 through the op agrees with the reference to rounding.
    args64 = _inputs(t, n, u, d, opts, dtype=torch.float64)
    _assert_close(row_grad_pool(*args64), _reference(*args64), tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_inputs(dtype):
    args = _inputs(3, 40, 6, 8, {"focus": [2.0, 1.0, 1.0], "mask": [True, True, False]}, dtype=dtype)
    out, w = row_grad_pool(*args)
    assert out.dtype == w.dtype == dtype
    _assert_close((out, w), _reference(*args), tol=1e-2)


def test_weights_are_a_softmax_over_kept_tasks():
    grads, rows, u, focus, tau, _, _ = _inputs(3, 40, 9, 8, {"used": 6})
    mask = torch.tensor([True, False, True])
    out, w = row_grad_pool(grads, rows, u, focus, tau, mask)
    torch.testing.assert_close(w.sum(1), torch.ones(u))
    assert (w[:, 1] == 0).all() and (w[:, [0, 2]] > 0).all()
    # Rows 6..8 have no position: zero norms, uniform over the kept tasks.
    torch.testing.assert_close(w[6:], torch.tensor([[0.5, 0.0, 0.5]]).expand(3, 3))
    # A masked task's gradients never reach out (not even NaN ones).
    poisoned = grads.clone()
    poisoned[1] = float("nan")
    out_p, w_p = row_grad_pool(poisoned, rows, u, focus, tau, mask)
    assert torch.equal(out_p, out) and torch.equal(w_p, w)


def test_one_task_returns_its_gradients():
    grads, rows, u, focus, _, _, _ = _inputs(1, 20, 5, 7, {})
    out, w = row_grad_pool(grads, rows, u, focus * 7.0, 1e-3)
    assert torch.equal(out, grads[0]) and torch.equal(w, torch.ones(u, 1))


def test_huge_tau_gives_uniform_weights():
    grads, rows, u, focus, _, _, _ = _inputs(3, 40, 6, 8, {})
    out, w = row_grad_pool(grads, rows, u, focus, 1e6)
    torch.testing.assert_close(w, torch.full((u, 3), 1 / 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, grads.mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau", [1e-6, 1e-45, 1e-300], ids=["1e-6", "below_fp32_tiny", "below_fp64_tiny"])
def test_tiny_tau_and_large_focus_stay_finite(tau):
    """α^s large and τ tiny: logits far beyond float32's range; the weights are the argmax's one-hot."""
    grads, rows, u, _, _, _, _ = _inputs(3, 40, 6, 8, {})
    focus = torch.tensor([2.0**60, 1.0, 1.0])  # α^epoch on task 0
    for dtype in (torch.float32, torch.float64):
        out, w = row_grad_pool(grads.to(dtype), rows, u, focus.to(dtype), tau)
        assert torch.isfinite(w).all() and torch.isfinite(out).all()
        assert torch.equal(w, torch.tensor([[1.0, 0.0, 0.0]], dtype=dtype).expand(u, 3))
        torch.testing.assert_close(out, grads[0].to(dtype))
    # Tasks 1, 2 alone (task 0 masked): the larger focused norm per row wins outright.
    mask = torch.tensor([False, True, True])
    _, w = row_grad_pool(grads, rows, u, focus, tau, mask)
    _, want = _reference(grads, rows, u, focus, tau, mask)
    assert torch.equal(w.double(), want) and set(w.sum(1).tolist()) == {1.0}


def test_given_norms_equal_to_computed_ones():
    grads, rows, u, focus, tau, _, _ = _inputs(3, 40, 9, 8, {"used": 7, "focus": [2.0, 1.0, 1.0]})
    seg = torch.zeros(3, u, 8).index_add_(1, rows, grads)  # T x U x D
    norms = seg.norm(dim=2).t().contiguous()  # U x T
    _assert_close(row_grad_pool(grads, rows, u, focus, tau, norms=norms), row_grad_pool(grads, rows, u, focus, tau))


def test_non_contiguous_inputs():
    grads, rows, u, focus, tau, _, _ = _inputs(3, 40, 6, 8, {"focus": [2.0, 1.0, 1.0]})
    g_nc = grads.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # T x N x D, stored N x T x D
    norms = torch.rand(3, u).t()  # U x T, column-major
    _assert_close(row_grad_pool(g_nc, rows, u, focus, tau), _reference(grads, rows, u, focus, tau))
    _assert_close(row_grad_pool(g_nc, rows, u, focus, tau, norms=norms),
                  _reference(grads, rows, u, focus, tau, None, norms))


# ---- end-to-end meaning: autograd through an embedding-bag lookup ---------------------------


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_matches_autograd_per_task_row_gradients(mode):
    """The pooled gradient of each table row from per-task autograd equals ``out`` summed per row."""
    torch.manual_seed(0)
    num_tasks, table_rows, d, tau = 3, 10, 4, 0.5
    focus = torch.tensor([1.5, 1.0, 1.0], dtype=torch.float64)
    # 6 bags: repeated ids inside bags (3 in bag 0, 7 in bag 3), two empty bags (2 and 5), ids 8, 9 unused.
    ids = torch.tensor([3, 1, 3, 0, 5, 7, 2, 7, 7, 1, 4, 6, 3])
    offsets = torch.tensor([0, 3, 6, 6, 9, 13])
    table = torch.randn(table_rows, d, dtype=torch.float64, requires_grad=True)  # U_table x D
    pooled = F.embedding_bag(ids, table, offsets, mode=mode)  # B x D
    heads = torch.randn(num_tasks, d, 2, dtype=torch.float64)  # T x D x 2
    scales = (1.0, 3.0, 0.3)
    losses = [scales[t] * torch.tanh(pooled @ heads[t]).pow(2).sum() for t in range(num_tasks)]

    table_grads, pooled_grads = [], []
    for loss in losses:  # one autograd.grad per task
        g_table, g_pooled = torch.autograd.grad(loss, (table, pooled), retain_graph=True)
        table_grads.append(g_table)  # U_table x D
        pooled_grads.append(g_pooled)  # B x D
    g_rows = torch.stack(table_grads)  # T x U_table x D
    # By hand: softmax over tasks of the focused row norms, then the weighted sum.
    logits = g_rows.norm(dim=2).t() * focus / tau  # U_table x T
    w_want = torch.softmax(logits, dim=1)  # U_table x T
    combined = torch.einsum("ut,tud->ud", w_want, g_rows)  # U_table x D

    # The op: one position per id occurrence, its bag's pooled gradient (1 / bag length for mean).
    lengths = torch.diff(offsets, append=torch.tensor([ids.numel()]))  # B
    bag_of = torch.repeat_interleave(torch.arange(offsets.numel()), lengths)  # N
    scale = (1.0 / lengths[bag_of].double()) if mode == "mean" else torch.ones(ids.numel(), dtype=torch.float64)
    grads = torch.stack([g[bag_of] * scale[:, None] for g in pooled_grads])  # T x N x D
    uniq, rows = torch.unique(ids, return_inverse=True)  # U, N
    out, w = row_grad_pool(grads, rows, uniq.numel(), focus, tau)
    per_row = torch.zeros(uniq.numel(), d, dtype=torch.float64).index_add_(0, rows, out)  # U x D

    torch.testing.assert_close(per_row, combined[uniq], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, w_want[uniq], rtol=1e-10, atol=1e-12)
    unused = torch.ones(table_rows, dtype=torch.bool)
    unused[uniq] = False
    assert combined[unused].abs().max() == 0 and unused.sum() == 2


# ---- torch.library / compile ---------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "mask_norms_check", "empty_batch", "non_contiguous"])
def test_opcheck(variant):
    n = 0 if variant == "empty_batch" else 14
    grads, rows, u, focus, tau, _, _ = _inputs(3, n, 5, 6, {"focus": [2.0, 1.0, 1.0]})
    mask = norms = None
    if variant == "mask_norms_check":
        mask, norms = torch.tensor([True, False, True]), torch.rand(u, 3)
    if variant == "non_contiguous":  # outputs are contiguous whatever the inputs' strides
        grads, norms = grads.permute(1, 0, 2).contiguous().permute(1, 0, 2), torch.rand(3, u).t()
    # The op has no autograd formula (its inputs are gradients): inputs do not require grad.
    torch.library.opcheck(torch.ops.recsys_mtl.row_grad_pool.default,
                          (grads, rows, u, focus, tau, mask, norms, variant == "mask_norms_check"))


def test_not_differentiable():
    grads, rows, u, focus, tau, _, _ = _inputs(2, 8, 3, 4, {})
    out, _ = row_grad_pool(grads.requires_grad_(), rows, u, focus, tau)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_torch_compile_fullgraph_one_opaque_op():
    grads, rows, u, focus, tau, _, _ = _inputs(3, 20, 6, 5, {"focus": [2.0, 1.0, 1.0]})
    mask = torch.tensor([True, True, False])

    def step(grads, rows, focus, mask):
        out, w = row_grad_pool(grads * 2.0, rows, u, focus, tau, mask)
        return out.sum(1), w.max(1).values

    nodes: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        nodes.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend=recording_backend)(grads, rows, focus, mask)
    assert sum("recsys_mtl.row_grad_pool" in x for x in nodes) == 1, nodes
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for a, e in zip(compiled(grads, rows, focus, mask), step(grads, rows, focus, mask)):
        torch.testing.assert_close(a, e)


# ---- bad inputs ----------------------------------------------------------------------------


def _bad(name: str):
    grads, rows, u, focus, tau, _, _ = _inputs(3, 10, 4, 5, {})
    args = {"grads": grads, "rows": rows, "num_rows": u, "focus": focus, "tau": tau, "task_mask": None,
            "norms": None}
    changes = {
        "grads_2d": {"grads": grads[0]},
        "grads_int": {"grads": grads.long()},
        "rows_int32": {"rows": rows.int()},
        "rows_2d": {"rows": rows.view(2, 5)},
        "rows_length": {"rows": rows[:7]},
        "num_rows_zero": {"num_rows": 0},
        "focus_length": {"focus": focus[:2]},
        "mask_dtype": {"task_mask": torch.ones(3)},
        "mask_length": {"task_mask": torch.ones(2, dtype=torch.bool)},
        "all_masked": {"task_mask": torch.zeros(3, dtype=torch.bool)},
        "norms_shape": {"norms": torch.rand(3, 4)},
        "tau_zero": {"tau": 0.0},
        "tau_negative": {"tau": -1.0},
        "tau_nan": {"tau": math.nan},
    }[name]
    return {**args, **changes}


BAD = [("grads_2d", "grads must be"), ("grads_int", "grads must be"), ("rows_int32", "rows must be"),
       ("rows_2d", "rows must be"), ("rows_length", "rows must be"), ("num_rows_zero", "num_rows"),
       ("focus_length", "focus must be"), ("mask_dtype", "task_mask must be"),
       ("mask_length", "task_mask must be"), ("all_masked", "masks every task"), ("norms_shape", "norms must be"),
       ("tau_zero", "tau must be > 0"), ("tau_negative", "tau must be > 0"), ("tau_nan", "tau must be > 0")]


@pytest.mark.parametrize("name,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise(name, match):
    kw = _bad(name)
    with pytest.raises(ValueError, match=match):
        row_grad_pool(**kw)
    with pytest.raises(ValueError, match=match):
        row_grad_pool_reference(**kw)


def test_row_range_checked_on_request():
    grads, rows, u, focus, tau, _, _ = _inputs(2, 10, 4, 3, {})
    rows[3] = u
    with pytest.raises(ValueError, match=r"rows must lie in \[0, num_rows\)"):
        row_grad_pool(grads, rows, u, focus, tau, check=True)
    with pytest.raises(ValueError, match=r"rows must lie in"):
        row_grad_pool_reference(grads, rows, u, focus, tau)
    rows[3] = -1
    with pytest.raises(ValueError, match=r"rows must lie in"):
        row_grad_pool(grads, rows, u, focus, tau, check=True)


def test_impl_env_var_is_checked(monkeypatch):
    grads, rows, u, focus, tau, _, _ = _inputs(2, 4, 3, 3, {})
    monkeypatch.setenv(rgp.IMPL_ENV, "cuda-please")
    with pytest.raises(ValueError, match=rgp.IMPL_ENV):
        row_grad_pool(grads, rows, u, focus, tau)


def test_bench_op_smoke():
    from recsys_mtl.bench.row_grad_pool_op import bench_op  # recsys_mtl.bench imports torchrec

    r = bench_op(T=2, N=16, U=5, D=3, repeats=1)
    assert r["fused_ms"] > 0 and r["reference_ms"] > 0 and r["ratio"] > 0
    assert r["shape"] == {"T": 2, "N": 16, "U": 5, "D": 3} and r["repeats"] == 1


# ---- Triton kernel under the interpreter ---------------------------------------------------
#
# ``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is first imported (every
# ``@triton.jit`` reads it when it decorates), so the kernel runs in a fresh interpreter started
# with it and with ``RECSYS_MTL_ROW_GRAD_POOL_IMPL=triton``: it loads this file as a module and
# calls :func:`_run_triton_cases`, which prints one line per case checked.

TRITON_CASES = [
    # (name, T, N, U, D, options, chunk cap); 33-wide D and the 4-position chunk make ragged tiles.
    ("repeated_rows", 3, 37, 6, 5, {"focus": [2.0, 1.0, 1.0]}, None),
    ("long_segment", 2, 170, 4, 16, {}, None),  # row 0 holds 150 positions > CHUNK_CAP (64)
    ("small_chunks_odd_d", 3, 45, 5, 33, {}, 4),
    ("masked_task", 3, 30, 5, 7, {"mask": [True, False, True]}, 4),
    ("given_norms", 3, 30, 7, 6, {"norms": "random", "used": 5}, None),
    ("given_norms_masked", 4, 30, 6, 6, {"norms": "random", "mask": [False, True, True, False]}, 4),
    ("empty_batch", 3, 0, 4, 6, {}, None),
    ("no_rows", 2, 0, 0, 4, {}, None),
    ("one_task", 1, 20, 5, 3, {}, None),
    ("unused_rows", 3, 20, 12, 8, {"used": 4}, None),
    ("tiny_tau", 3, 30, 5, 8, {"tau": 1e-6, "focus": [2.0**60, 1.0, 1.0]}, None),
    ("huge_tau", 3, 30, 5, 8, {"tau": 1e6}, None),
]
TRITON_EXTRA = ["float64", "non_contiguous", "masked_nan_not_read", "launcher_block_sizes"]


def _run_triton_cases() -> None:
    """Every :data:`TRITON_CASES` entry through :func:`row_grad_pool` (the env var routes it to the
    interpreted kernel) against the float64 reference, plus :data:`TRITON_EXTRA`."""
    from triton.runtime.interpreter import InterpretedFunction

    import recsys_mtl.ops.triton.row_grad_pool as tk

    assert os.environ.get(rgp.IMPL_ENV) == "triton" and rgp._use_triton(torch.empty(0))
    assert isinstance(tk._row_grad_pool_kernel, InterpretedFunction)
    default_cap = tk.CHUNK_CAP
    calls = 0
    launch = tk.row_grad_pool_fwd

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return launch(*args, **kwargs)

    tk.row_grad_pool_fwd = counted
    for name, t, n, u, d, opts, cap in TRITON_CASES:
        tk.CHUNK_CAP = cap or default_cap
        args = _inputs(t, n, u, d, opts, seed=len(name))
        if name == "long_segment":
            args = (args[0], torch.cat([torch.zeros(150, dtype=torch.int64), args[1][150:]]), *args[2:])
        before = calls
        got = row_grad_pool(*args)
        assert calls == before + 1, name  # the kernel ran
        _assert_close(got, _reference(*args))
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all(), name
        print("ok", name, flush=True)
    tk.CHUNK_CAP = 4

    args = _inputs(3, 25, 6, 9, {"mask": [True, True, False], "focus": [1.5, 1.0, 1.0]}, dtype=torch.float64)
    _assert_close(row_grad_pool(*args), _reference(*args), tol=1e-12)
    print("ok float64", flush=True)

    grads, rows, u, focus, tau, _, _ = _inputs(3, 30, 5, 7, {"focus": [2.0, 1.0, 1.0]})
    g_nc = grads.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # T x N x D stored N x T x D
    norms = torch.rand(3, u).t()  # U x T, column-major
    _assert_close(row_grad_pool(g_nc, rows, u, focus, tau), _reference(grads, rows, u, focus, tau))
    _assert_close(row_grad_pool(g_nc, rows, u, focus, tau, norms=norms),
                  _reference(grads, rows, u, focus, tau, None, norms))
    print("ok non_contiguous", flush=True)

    mask = torch.tensor([True, False, True])
    poisoned = grads.clone()
    poisoned[1] = float("nan")
    out, w = row_grad_pool(poisoned, rows, u, focus, tau, mask)
    _assert_close((out, w), _reference(grads, rows, u, focus, tau, mask))
    print("ok masked_nan_not_read", flush=True)

    tk.CHUNK_CAP = default_cap
    for t, d in [(1, 1), (3, 5), (4, 33), (8, 512)]:
        bt, bp, bd = tk.block_sizes(t, d)
        assert bt >= max(2, t) and bd >= max(16, d) and 2 <= bp <= tk.CHUNK_CAP
        assert all(b & (b - 1) == 0 for b in (bt, bp, bd))
    print("ok launcher_block_sizes", flush=True)


def test_triton_kernel_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", rgp.IMPL_ENV: "triton"}
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('row_grad_pool_tests', {str(Path(__file__))!r})\n"
        "m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "m._run_triton_cases()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for name in [c[0] for c in TRITON_CASES] + TRITON_EXTRA:
        assert f"ok {name}\n" in r.stdout, (name, out[-3000:])
