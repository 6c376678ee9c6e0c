"""Model shapes, gradient flow and gradient routing (the properties each paper relies on)."""

from __future__ import annotations

import pytest
import torch

from recsys_mtl.config import ModelConfig
from recsys_mtl.config import PAIR_MODELS
from recsys_mtl.models import MODELS, MMoE, build_model
from recsys_mtl.modules.embeddings import build_ebc
from recsys_mtl.modules.experts import Experts
from recsys_mtl.testing import tiny_batch, tiny_schema
from recsys_mtl.train.losses import MultiTaskLoss
from recsys_mtl.train.task import MTLTrainModule

CFG = ModelConfig(embedding_dim=4, expert_layer_sizes=(16, 8), tower_layer_sizes=(8,), gate_layer_sizes=(8,),
                  bottom_layer_sizes=(16, 8), num_experts=3, num_task_experts=2, num_shared_experts=2, num_levels=2)


def _cfg(name: str, **kw) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(CFG, name=name, **kw)


# (the pair models train on interaction datasets: tests/data/test_interactions.py, tests/models/test_graph_encoders.py)
@pytest.mark.parametrize("name", sorted(set(MODELS) - set(PAIR_MODELS)))
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_shapes_and_every_parameter_gets_gradient(name: str, num_tasks: int) -> None:
    torch.manual_seed(0)
    schema = tiny_schema(num_tasks=num_tasks)
    model = build_model(schema, _cfg(name))
    batch = tiny_batch(schema, batch_size=32)
    logits = model(batch.dense, batch.sparse)
    assert list(logits) == schema.task_names
    assert all(v.shape == (32,) and torch.isfinite(v).all() for v in logits.values())
    loss, _ = MultiTaskLoss(schema.tasks)(logits, batch.labels, batch.label_mask)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        if p.grad.dim() > 0 and "ebc" not in pname:
            assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


def _grad_of_task(model, batch, task: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(batch.dense, batch.sparse)
    torch.nn.functional.binary_cross_entropy_with_logits(logits[task], batch.labels[:, 0]).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _expert_grad(experts: Experts, layer: int, expert: int, grads: dict[str, torch.Tensor], prefix: str):
    wi, _ = experts.expert_index(layer, expert)
    return grads[f"{prefix}.weight_{layer}"][wi]


def test_cgc_task_tower_never_reaches_other_tasks_experts() -> None:
    torch.manual_seed(0)
    schema = tiny_schema()
    model = build_model(schema, _cfg("cgc"))
    grads = _grad_of_task(model, tiny_batch(schema, 32), "click")  # task 0
    level = model.levels[0]
    n = level.n
    for layer in range(2):
        for e in range(n):  # click's own experts: gradient
            assert _expert_grad(level.task_experts, layer, e, grads, "levels.0.task_experts").abs().sum() > 0
        for e in range(n, 2 * n):  # like's experts: none
            assert _expert_grad(level.task_experts, layer, e, grads, "levels.0.task_experts").abs().sum() == 0
    assert grads["levels.0.shared_experts.weight_0"].abs().sum() > 0
    assert grads["towers.like.out.weight"].abs().sum() == 0


def test_ple_last_level_routing_and_shared_path_below() -> None:
    torch.manual_seed(0)
    schema = tiny_schema()
    model = build_model(schema, _cfg("ple"))
    grads = _grad_of_task(model, tiny_batch(schema, 32), "click")
    last, first = model.levels[1], model.levels[0]
    n = last.n
    for e in range(n, 2 * n):  # like's last-level experts get nothing from click's tower
        assert _expert_grad(last.task_experts, 0, e, grads, "levels.1.task_experts").abs().sum() == 0
    # ... but like's first-level experts feed the shared gate of level 1, so click reaches them.
    assert _expert_grad(first.task_experts, 0, n, grads, "levels.0.task_experts").abs().sum() > 0
    assert last.shared_gate is None and first.shared_gate is not None


def _stem(stop_gradient: bool, specific: str = "all"):
    torch.manual_seed(0)
    schema = tiny_schema()
    return schema, build_model(schema, _cfg("stem", stem_stop_gradient=stop_gradient, stem_specific_fields=specific))


def test_stem_stop_gradient_isolates_other_tasks_tables_and_experts() -> None:
    schema, model = _stem(stop_gradient=True)
    grads = _grad_of_task(model, tiny_batch(schema, 32), "click")
    like_tables = [k for k in grads if k.startswith("task_ebcs.like.")]
    click_tables = [k for k in grads if k.startswith("task_ebcs.click.")]
    shared_tables = [k for k in grads if k.startswith("shared_ebc.")]
    assert like_tables and click_tables and shared_tables
    assert all(grads[k].abs().sum() == 0 for k in like_tables)
    assert all(grads[k].abs().sum() > 0 for k in click_tables)
    assert all(grads[k].abs().sum() > 0 for k in shared_tables)
    n = model.n
    for e in range(n):
        assert _expert_grad(model.task_experts, 0, e, grads, "task_experts").abs().sum() > 0
    for e in range(n, 2 * n):
        assert _expert_grad(model.task_experts, 0, e, grads, "task_experts").abs().sum() == 0
    assert grads["shared_experts.weight_0"].abs().sum() > 0
    assert all(grads[k].abs().sum() > 0 for k in grads if k.startswith("gates.click."))
    assert all(grads[k].abs().sum() == 0 for k in grads if k.startswith("gates.like."))


def test_stem_like_experts_still_contribute_forward() -> None:
    # All-forward: click's output depends on like's experts even though no gradient flows back.
    schema, model = _stem(stop_gradient=True)
    batch = tiny_batch(schema, 16)
    before = model(batch.dense, batch.sparse)["click"].detach()
    with torch.no_grad():
        wi, _ = model.task_experts.expert_index(0, model.n)  # like's first expert
        model.task_experts.weight_0[wi] += 1.0
    after = model(batch.dense, batch.sparse)["click"].detach()
    assert (before - after).abs().max() > 1e-4


def test_stem_without_stop_gradient_updates_other_tasks() -> None:
    schema, model = _stem(stop_gradient=False)
    grads = _grad_of_task(model, tiny_batch(schema, 32), "click")
    assert any(grads[k].abs().sum() > 0 for k in grads if k.startswith("task_ebcs.like."))
    assert _expert_grad(model.task_experts, 0, model.n, grads, "task_experts").abs().sum() > 0


def test_stem_specific_fields_user_side_only() -> None:
    schema, model = _stem(stop_gradient=True, specific="user")
    assert model.specific_features == {"user_id"}
    tables = {c.name for c in model.task_ebcs["click"].embedding_bag_configs()}
    assert tables == {"task_click__user_id"}
    grads = _grad_of_task(model, tiny_batch(schema, 32), "click")
    # item features come from the shared tables in every branch
    assert grads["shared_ebc.embedding_bags.shared__item_id.weight"].abs().sum() > 0


@pytest.mark.parametrize("gate_input", ["concat", "sum", "task", "shared"])
def test_stem_gate_inputs(gate_input: str) -> None:
    schema = tiny_schema()
    model = build_model(schema, _cfg("stem", stem_gate_input=gate_input))
    b = tiny_batch(schema, 8)
    assert model(b.dense, b.sparse)["like"].shape == (8,)
    first = model.gates["click"][0][0]
    d = model.task_experts.in_features
    assert first.in_features == (2 * d if gate_input == "concat" else d)


def test_mmoe_matches_the_paper_formula() -> None:
    torch.manual_seed(0)
    schema = tiny_schema()
    model = MMoE(build_ebc(schema, 4), len(schema.dense), schema.task_names, 3, [8, 6], [4])
    b = tiny_batch(schema, 10)
    x = model.input(b.dense, b.sparse)[:, : model.input.unpadded_features]  # B x D, without the zero padding
    outs = []
    for e in range(3):
        h = x
        for layer in range(2):
            w, bias = model.experts.expert_parameters(layer, e)
            h = torch.relu(h @ w + bias)
        outs.append(h)
    experts = torch.stack(outs, 1)  # B x E x H
    g = model.gates
    for k, t in enumerate(schema.task_names):
        wk, bk = g.gate_parameters(k)  # D x E, E
        gate = torch.softmax(x @ wk + bk, dim=1)  # B x E
        f = (gate.unsqueeze(-1) * experts).sum(1)
        expected = model.towers[t](f)
        assert torch.allclose(model(b.dense, b.sparse)[t], expected, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["aten", "fused"])
@pytest.mark.parametrize("grouped", [False, True])
def test_batched_experts_match_per_expert_mlps(grouped: bool, fused: bool) -> None:
    torch.manual_seed(0)
    ex = Experts(8, [16, 4, 3], num_experts=3, num_groups=2, grouped_input=grouped, fused=fused)
    x = torch.randn(2, 5, 8) if grouped else torch.randn(5, 8)
    ref = []
    for e in range(6):
        h = x[e // 3] if grouped else x
        for layer in range(3):
            w, b = ex.expert_parameters(layer, e)
            h = torch.relu(h @ w + b)
        ref.append(h)
    assert torch.allclose(ex(x), torch.stack(ref), atol=1e-6)


@pytest.mark.parametrize(("grouped", "n", "g", "sizes"), [
    (False, 3, 2, [16, 4, 3]), (False, 1, 1, [8]), (False, 2, 1, [12, 5]),
    (True, 3, 2, [16, 4]), (True, 1, 3, [8, 6]), (True, 2, 2, [5]),
])  # fmt: skip
def test_fused_experts_match_the_aten_layers(grouped: bool, n: int, g: int, sizes: list[int]) -> None:
    """The oneDNN op path (``fused``) and the addmm / baddbmm path compute the same outputs and
    gradients from the same parameters, and the gradients keep the parameters' strides (DDP)."""
    torch.manual_seed(0)
    a = Experts(8, sizes, n, g, grouped_input=grouped, zero_rows=2 if not grouped else 0, fused=False)
    b = Experts(8, sizes, n, g, grouped_input=grouped, zero_rows=2 if not grouped else 0, fused=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(g, 33, 8) if grouped else torch.randn(33, 8)
    if not grouped:
        x[:, -2:] = 0  # the zero padding columns
    ya, yb = a(x), b(x)
    assert ya.shape == yb.shape == (n * g, 33, sizes[-1])
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, list(a.parameters()), dy)
    gb = torch.autograd.grad(yb, list(b.parameters()), dy)
    for (name, p), da, db in zip(b.named_parameters(), ga, gb):
        torch.testing.assert_close(db, da, rtol=1e-5, atol=1e-5, msg=name)
        assert db.stride() == p.stride(), name
    if not grouped:
        assert gb[0][-2:].abs().max() == 0  # padding rows get no gradient


def test_experts_read_the_gemm_backend_when_built() -> None:
    from recsys_mtl.ops import cpu_gemm

    with cpu_gemm.force("aten"):
        assert not Experts(4, [3], 2).fused
    with cpu_gemm.force("onednn"):
        assert Experts(4, [3], 2).fused
    assert not Experts(4, [3], 2, fused=False).fused


def test_train_module_masks_out_of_space_samples() -> None:
    schema = tiny_schema()
    m = MTLTrainModule(build_model(schema, _cfg("mmoe")), MultiTaskLoss(schema.tasks))
    b = tiny_batch(schema, 8)
    loss_full, _ = m(b)
    b.labels[:4, 1] = 1 - b.labels[:4, 1]  # flip like labels on rows outside like's space
    b.label_mask[:4, 1] = False
    _, per_task = m.loss(m.model(b.dense, b.sparse), b.labels, b.label_mask)
    b.labels[:4, 1] = 1 - b.labels[:4, 1]
    _, per_task_again = m.loss(m.model(b.dense, b.sparse), b.labels, b.label_mask)
    assert torch.allclose(per_task, per_task_again)  # masked labels do not matter
    assert not torch.allclose(loss_full, per_task.sum())


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"model.name \(--model\) must be one of single_task, .*got 'nope'"):
        build_model(tiny_schema(), _cfg("nope"))


def test_fused_linear_matches_nn_linear() -> None:
    """``modules.mlp.Linear`` on the oneDNN op: nn.Linear's outputs and gradients for 2-D and 3-D
    inputs, gradients in the parameters' layout, the same state dict, and fx-traceable."""
    from recsys_mtl.modules.mlp import MLP, MIN_FUSED_OUT, Linear

    torch.manual_seed(0)
    plain, fused = Linear(12, 20, fused=False), Linear(12, 20, fused=True)
    fused.load_state_dict(plain.state_dict())
    for x in (torch.randn(9, 12), torch.randn(3, 5, 12)):
        ya, yb = plain(x), fused(x)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
        dy = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, list(plain.parameters()), dy)
        gb = torch.autograd.grad(yb, list(fused.parameters()), dy)
        for p, a, b in zip(fused.parameters(), ga, gb):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    fused.weight.grad = None
    fused(torch.randn(4, 12)).sum().backward()
    assert fused.weight.grad.stride() == fused.weight.stride()  # AccumulateGrad keeps the layout
    from recsys_mtl.ops import cpu_gemm

    with cpu_gemm.force("onednn"):
        assert Linear(4, MIN_FUSED_OUT).fused and not Linear(4, MIN_FUSED_OUT - 1).fused
        mlp = MLP(6, [32, 16])
    with cpu_gemm.force("aten"):
        assert not Linear(4, 64).fused
    gm = torch.fx.symbolic_trace(mlp)
    x = torch.randn(7, 6)
    torch.testing.assert_close(gm(x), mlp(x))
    assert sum("expert_linear" in str(n.target) for n in gm.graph.nodes) == 2
