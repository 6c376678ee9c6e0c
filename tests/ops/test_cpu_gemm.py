"""``recsys_mtl.ops.cpu_gemm``: the choice between oneDNN and ATen's BLAS (override, calibration
once per process, ATen on a CUDA host), and oneDNN's linear against ``torch.addmm`` for every
operand layout (row-major, transposed, strided slices)."""

from __future__ import annotations

import pytest
import torch

from recsys_mtl.ops import cpu_gemm


@pytest.fixture
def fresh(monkeypatch):
    """No forced choice, no earlier measurement, the environment variable unset."""
    monkeypatch.delenv(cpu_gemm.ENV, raising=False)
    monkeypatch.setattr(cpu_gemm, "_measured", None)
    monkeypatch.setattr(cpu_gemm, "_forced", None)


def test_environment_variable_and_force(fresh, monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV, "aten")
    assert cpu_gemm.backend() == "aten"
    assert not cpu_gemm.use_onednn(torch.zeros(2, 2))
    with cpu_gemm.force("onednn"):
        assert cpu_gemm.backend() == "onednn"  # force beats the environment
        assert cpu_gemm.use_onednn(torch.zeros(2, 2))
        assert not cpu_gemm.use_onednn(torch.zeros(2, 2, dtype=torch.float64))  # float32 only
        assert not cpu_gemm.use_onednn(torch.zeros(0, 2))
    assert cpu_gemm.backend() == "aten"  # restored
    monkeypatch.setenv(cpu_gemm.ENV, "mkl")
    with pytest.raises(ValueError, match=r"RECSYS_MTL_CPU_GEMM must be one of auto, onednn, aten, got 'mkl'"):
        cpu_gemm.backend()
    with pytest.raises(ValueError, match="cpu_gemm.force takes one of"):
        with cpu_gemm.force("blas"):
            pass


def test_auto_measures_once_and_keeps_the_answer(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_gemm, "_calibrate", lambda: calls.append(1) or "onednn")
    assert [cpu_gemm.backend() for _ in range(3)] == ["onednn"] * 3
    assert len(calls) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host: ATen under auto
    assert cpu_gemm.backend() == "aten"
    with cpu_gemm.force("onednn"):
        assert cpu_gemm.backend() == "onednn"


def test_calibration_times_both_on_cpu_under_a_meta_default(fresh):
    with torch.device("meta"):  # models are built this way; the timing must still run on CPU
        choice = cpu_gemm._calibrate()
    assert choice in ("onednn", "aten")


def _layouts(rows: int, cols: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One ``rows x cols`` matrix in three layouts: row-major, column-major, a strided slice."""
    base = torch.randn(rows, cols, generator=gen)
    wide = torch.randn(rows, 3 * cols, generator=gen)
    wide[:, cols:2 * cols] = base
    return {"row": base.clone(), "col": base.t().contiguous().t(), "slice": wide[:, cols:2 * cols]}


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_addmm_for_every_layout(relu, bias):
    gen = torch.Generator().manual_seed(0)
    m, k, n = 37, 19, 23
    xs, ws = _layouts(m, k, gen), _layouts(n, k, gen)
    b = torch.randn(n, generator=gen) if bias else None
    for xl, x in xs.items():
        for wl, w in ws.items():
            want = x.double() @ w.double().t() + (0 if b is None else b.double())
            want = want.relu() if relu else want
            got = cpu_gemm.linear(x, w, b, relu=relu)
            assert got.shape == (m, n) and got.is_contiguous() and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"x {xl}, weight {wl}")
    a, bb = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    torch.testing.assert_close(cpu_gemm.mm(a, bb), a @ bb, rtol=1e-5, atol=1e-5)


def _agree_on_two_ranks(rank1_measures: str) -> tuple[str, bool]:
    """Rank 1's calibration answers ``rank1_measures``, rank 0's ``onednn``; after ``agree`` both
    hold rank 0's answer, and an Experts built then follows it."""
    import os

    from recsys_mtl.distributed.env import init_distributed
    from recsys_mtl.modules.experts import Experts

    os.environ.pop(cpu_gemm.ENV, None)  # auto (the test suite sets onednn)
    env = init_distributed()
    cpu_gemm._calibrate = lambda: "onednn" if env.rank == 0 else rank1_measures
    return cpu_gemm.agree(), Experts(4, [3], 2).fused


def test_agree_takes_rank_0s_measurement():
    from multirank import run_ranks

    assert run_ranks(_agree_on_two_ranks, 2, "aten", timeout=120) == [("onednn", True), ("onednn", True)]


def test_agree_without_a_process_group_or_with_an_override(fresh, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_calibrate", lambda: "aten")
    assert cpu_gemm.agree() == "aten"  # no process group: this process's own answer
    monkeypatch.setenv(cpu_gemm.ENV, "onednn")
    assert cpu_gemm.agree() == "onednn"
