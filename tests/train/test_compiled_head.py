"""The compiled dense head (``--compile-head``, recsys_mtl.train.compiled) computes what the eager
model computes: losses and every gradient, for every model of the zoo whose head compiles, as one
graph after the table lookups. The sharded trainer runs are in test_compiled_head_runs.py.

Every model is compiled with the ``aot_eager`` backend (dynamo's tracing, the graph breaks at the
lookups, AOTAutograd's joint graph and partition: everything but inductor's code generation) so
that the whole zoo costs seconds; PLE is also compiled with inductor, whose code is checked for the
ReLU masks the mask-free ReLU avoids.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from recsys_mtl.config import MASKED_SHARING_MODELS, MODEL_NAMES, PAIR_MODELS, GradConfig, ModelConfig, TrainConfig
from recsys_mtl.models import build_model
from recsys_mtl.modules.experts import Experts
from recsys_mtl.ops import cpu_gemm
from recsys_mtl.testing import tiny_batch, tiny_schema
from recsys_mtl.train.compiled import compile_head, eager_reason
from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.train.task import MTLTrainModule

COMPILED_MODELS = [m for m in MODEL_NAMES if m not in PAIR_MODELS and m not in MASKED_SHARING_MODELS]
CFG = ModelConfig(embedding_dim=4, expert_layer_sizes=(16, 8), tower_layer_sizes=(8,), gate_layer_sizes=(8,),
                  bottom_layer_sizes=(16, 8), num_experts=3, num_task_experts=2, num_shared_experts=2, num_levels=2,
                  stem_specific_fields="user_id,item_tags")


class CountingBackend:
    """``aot_eager`` (or inductor) that records the size of every graph it is given."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.inner = lookup_backend(inner)
        self.graphs: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(sum(n.op == "call_function" for n in gm.graph.nodes))
        return self.inner(gm, example_inputs)


def _pair(name: str, backend, loss: MultiTaskLoss | None = None, **kw):
    schema = tiny_schema()
    torch.manual_seed(0)
    eager = MTLTrainModule(build_model(schema, dataclasses.replace(CFG, name=name, **kw)),
                           loss or MultiTaskLoss(schema.tasks))
    compiled = compile_head(copy.deepcopy(eager), backend=backend)
    return schema, eager, compiled


def _steps_match(schema, eager, compiled, steps: int = 2, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``steps`` SGD steps of both: equal losses, outputs and gradients (parameters stay equal)."""
    for step in range(steps):
        batch = tiny_batch(schema, 16, seed=step)
        (la, (_, logits_a, _, _)), (lb, (_, logits_b, _, _)) = eager(batch), compiled(batch)
        torch.testing.assert_close(lb, la, rtol=rtol, atol=atol)
        torch.testing.assert_close(logits_b, logits_a, rtol=rtol, atol=atol)
        la.backward()
        lb.backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=name)
        with torch.no_grad():
            for p, q in zip(eager.parameters(), compiled.parameters()):
                if p.grad is not None:
                    p -= 0.5 * p.grad
                    q -= 0.5 * q.grad
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
        eager.loss.step_done()
        compiled.loss.step_done()


@pytest.mark.parametrize("name", COMPILED_MODELS)
def test_compiled_head_matches_eager(name: str) -> None:
    backend = CountingBackend()
    # A per-step loss-weight schedule: the weights change every step without recompiling.
    loss = MultiTaskLoss(tiny_schema().tasks, decay={"like": 0.5}, weight_unit="step")
    schema, eager, compiled = _pair(name, backend, loss=loss)
    _steps_match(schema, eager, compiled, steps=3)
    # One graph after the lookups (those between two lookups hold no op), compiled once.
    assert backend.graphs and sum(n > 0 for n in backend.graphs) == 1, backend.graphs
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod. prefixes


def test_evaluation_and_hooked_steps_stay_eager() -> None:
    backend = CountingBackend()
    schema, eager, compiled = _pair("mmoe", backend)
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(tiny_batch(schema, 8))[1][1], eager.eval()(tiny_batch(schema, 8))[1][1])
    assert backend.graphs == []  # evaluation is not compiled
    compiled.train()
    compiled.objective = lambda logits, labels, mask: logits["click"].sum()  # a procedure's step
    loss, out = compiled(tiny_batch(schema, 8))
    assert out is None and backend.graphs == []


def test_padding_rows_stay_zero_and_init_is_unchanged() -> None:
    """The first layer's zero padding rows (the input is padded to a multiple of 16) start at zero
    and stay zero through Adam; the real rows get the values an unpadded model would get."""
    from recsys_mtl.modules.embeddings import SparseDenseInput

    schema = tiny_schema()
    model = build_model(schema, dataclasses.replace(CFG, name="ple"))
    level = model.levels[0]
    pad, real = model.input.padding, model.input.unpadded_features
    assert pad > 0 and model.input.out_features % 16 == 0
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    tm = MTLTrainModule(model, MultiTaskLoss(schema.tasks))
    for step in range(3):
        opt.zero_grad()
        tm(tiny_batch(schema, 16, seed=step))[0].backward()
        opt.step()
    for w in (level.task_experts.weight_0, level.shared_experts.weight_0):
        assert w[real:].abs().sum() == 0 and w[:real].abs().sum() > 0
    for g in (level.task_gates, level.shared_gate):
        assert g.weight[real:].abs().sum() == 0
    # Same random draws as without padding.
    torch.manual_seed(3)
    padded = build_model(schema, dataclasses.replace(CFG, name="mmoe"))
    torch.manual_seed(3)
    init = SparseDenseInput.__init__.__defaults__
    SparseDenseInput.__init__.__defaults__ = (1,)
    try:
        unpadded = build_model(schema, dataclasses.replace(CFG, name="mmoe"))
    finally:
        SparseDenseInput.__init__.__defaults__ = init
    assert unpadded.input.padding == 0
    assert torch.equal(padded.experts.weight_0[:real], unpadded.experts.weight_0)
    assert torch.equal(padded.gates.weight[:real], unpadded.gates.weight)
    b = tiny_batch(schema, 8)
    torch.testing.assert_close(padded(b.dense, b.sparse)["click"], unpadded(b.dense, b.sparse)["click"])


@pytest.mark.parametrize("gemm", ["aten", "onednn"])
def test_inductor_head_matches_eager_without_relu_masks(gemm: str) -> None:
    """PLE through inductor: equal losses and gradients, and no ``bool`` tensor is written by the
    generated code (a saved ReLU mask; the only ``bool`` input is the label mask). With ATen's GEMMs
    the experts are addmm / baddbmm + ReLU inside the graph; with oneDNN's each expert layer is one
    opaque ``recsys_mtl::expert_linear_relu`` node (forward and backward)."""
    from torch._inductor.utils import run_and_get_code

    backend = CountingBackend("inductor")
    with cpu_gemm.force(gemm):  # read when the experts are built
        schema, eager, compiled = _pair("ple", backend, num_levels=2, expert_layer_sizes=(16, 8))
    assert all(m.fused == (gemm == "onednn") for m in eager.modules() if isinstance(m, Experts))

    def first_step():
        loss, _ = compiled(tiny_batch(schema, 16, seed=9))
        loss.backward()
        return loss

    with torch._inductor.config.patch(fx_graph_cache=False):  # generate (and capture) the code
        loss, codes = run_and_get_code(first_step)
    la, _ = eager(tiny_batch(schema, 16, seed=9))
    la.backward()
    torch.testing.assert_close(loss, la, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    eager.zero_grad(set_to_none=True)
    compiled.zero_grad(set_to_none=True)
    code = "\n".join(codes)
    assert "extern_kernels" in code and "relu" in code and "threshold_backward" in code  # forward and backward
    fused_ops = code.count("torch.ops.recsys_mtl.expert_linear_relu.default") + code.count(
        "torch.ops.recsys_mtl.expert_linear_relu_backward.default")
    assert (fused_ops > 0) == (gemm == "onednn"), fused_ops
    # No kernel writes a bool tensor and none is allocated (the label mask is read: "const bool*").
    written = [ln for ln in code.splitlines() if "bool* out_ptr" in ln or ("empty_strided" in ln and "torch.bool" in ln)]
    assert not written, written
    _steps_match(schema, eager, compiled, steps=2, rtol=1e-4)
    assert sum(n > 0 for n in backend.graphs) == 1, backend.graphs


def test_eager_reason_names_the_runs_that_stay_eager() -> None:
    def cfg(name: str, **kw) -> TrainConfig:
        return TrainConfig(data="", output_dir="", compile_head=True, model=ModelConfig(name=name), **kw)

    assert eager_reason(cfg("ple")) is None and eager_reason(cfg("stem")) is None
    assert "no dense head" in eager_reason(cfg("mf"))
    assert "masked-sharing" in eager_reason(cfg("csrec"))
    assert "--grad-combiner pmtrec" in eager_reason(cfg("mmoe", grad=GradConfig(combiner="pmtrec")))
    with pytest.raises(ValueError, match="compile_head"):
        TrainConfig(data="", output_dir="", compile_head="yes")


def test_compiled_by_default_on_cpu_only() -> None:
    from recsys_mtl.cli import build_parser, config_from_args
    from recsys_mtl.train.loop import head_compiles

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    base = TrainConfig(data="", output_dir="")
    assert base.compile_head is None
    assert head_compiles(base, cpu) and not head_compiles(base, cuda)
    assert not head_compiles(dataclasses.replace(base, compile_head=False), cpu)
    assert head_compiles(dataclasses.replace(base, compile_head=True), cuda)

    def flag(*argv: str) -> bool | None:
        args = build_parser().parse_args(["train", "--data", "d", "--output-dir", "o", *argv])
        return config_from_args(args).compile_head

    assert flag() is None and flag("--compile-head") is True and flag("--no-compile-head") is False


def test_trainer_says_when_the_flag_trains_eagerly(capsys) -> None:
    from recsys_mtl.distributed.env import DistEnv
    from recsys_mtl.train.loop import setup_compiled_head

    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    schema = tiny_schema()
    tm = MTLTrainModule(build_model(schema, dataclasses.replace(CFG, name="sparse_sharing")),
                        MultiTaskLoss(schema.tasks))
    cfg = TrainConfig(data="", output_dir="", compile_head=True, model=ModelConfig(name="sparse_sharing"))
    assert not setup_compiled_head(cfg, tm, env) and tm.compiled_step is None
    assert "--compile-head: training eagerly: sparse_sharing" in capsys.readouterr().err
    # by default (compile_head None) a model that stays eager says nothing
    assert not setup_compiled_head(dataclasses.replace(cfg, compile_head=None), tm, env)
    assert capsys.readouterr().err == ""
    tm = MTLTrainModule(build_model(schema, dataclasses.replace(CFG, name="mmoe")), MultiTaskLoss(schema.tasks))
    assert setup_compiled_head(dataclasses.replace(cfg, model=ModelConfig(name="mmoe")), tm, env)
    assert tm.compiled_step is not None and "compiles at the first" in capsys.readouterr().err
