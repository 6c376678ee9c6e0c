"""The model zoo beyond MMoE/PLE/STEM: gradient routing each paper relies on, and exact formulas."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from recsys_mtl.config import ModelConfig
from recsys_mtl.models import ESMM, MODELS, MLMMoE, build_model
from recsys_mtl.models.esmm import chained_product_logits, ctcvr_targets
from recsys_mtl.modules.embeddings import build_ebc
from recsys_mtl.testing import tiny_batch, tiny_schema

CFG = ModelConfig(embedding_dim=4, expert_layer_sizes=(16, 8), tower_layer_sizes=(8,), gate_layer_sizes=(8,),
                  bottom_layer_sizes=(16, 8), num_experts=3, num_task_experts=2, num_shared_experts=2, num_levels=2)
ZOO = ["ml_mmoe", "esmm", "aitm", "me_mmoe", "me_ple", "asymmetric_sharing", "customized_sharing", "cross_stitch",
       "sluice"]


def _build(name: str, num_tasks: int = 2, **kw):
    torch.manual_seed(0)
    schema = tiny_schema(num_tasks=num_tasks)
    return schema, build_model(schema, dataclasses.replace(CFG, name=name, **kw))


def _grads(model, batch, task: str, label_col: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of one task's BCE only; parameters it does not reach get zeros."""
    model.zero_grad(set_to_none=True)
    logits = model(batch.dense, batch.sparse)
    F.binary_cross_entropy_with_logits(logits[task], batch.labels[:, label_col]).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _nonzero(grads: dict[str, torch.Tensor], prefix: str) -> list[bool]:
    keys = [k for k in grads if k.startswith(prefix)]
    assert keys, f"no parameters under {prefix!r}"
    return [bool(grads[k].abs().sum() > 0) for k in keys]


def test_zoo_is_registered() -> None:
    assert set(ZOO) <= set(MODELS)


@pytest.mark.parametrize("name", ZOO + ["stem_none"])
def test_every_parameter_gets_a_finite_gradient(name: str) -> None:
    kw = {"stem_specific_fields": "none"} if name == "stem_none" else {}
    schema, model = _build("stem" if name == "stem_none" else name, num_tasks=3, **kw)
    batch = tiny_batch(schema, 16)
    logits = model(batch.dense, batch.sparse)
    assert list(logits) == schema.task_names and all(v.shape == (16,) for v in logits.values())
    loss = sum(F.binary_cross_entropy_with_logits(logits[t], batch.labels[:, k]) for k, t in enumerate(schema.task_names))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0 or "ebc" in pname, f"{name}: {pname} has an all-zero gradient"


# ---- STEM-Net without task-specific fields --------------------------------------------------

def test_stem_none_fields_task_experts_read_shared_embeddings() -> None:
    schema, model = _build("stem", stem_specific_fields="none")
    assert len(model.task_ebcs) == 0 and model.tasks == schema.task_names
    batch = tiny_batch(schema, 16)
    x_s, x_t = model.embed(batch.dense, batch.sparse)
    assert torch.equal(x_t[0], x_s) and torch.equal(x_t[1], x_s)
    grads = _grads(model, batch, "click")
    assert all(_nonzero(grads, "shared_ebc."))
    n = model.n  # stop-gradient still keeps like's experts out of click's backward
    wi, _ = model.task_experts.expert_index(0, n)
    assert grads["task_experts.weight_0"][wi].abs().sum() == 0
    wi, _ = model.task_experts.expert_index(0, 0)
    assert grads["task_experts.weight_0"][wi].abs().sum() > 0


# ---- ME-PLE / ME-MMoE (STEM's "Comparison of Gating Networks") ------------------------------

def _me_ple_expert_grad(grads, level: int, layer: int, expert: int, model) -> torch.Tensor:
    wi, _ = model.levels[level].task_experts.expert_index(layer, expert)
    return grads[f"levels.{level}.task_experts.weight_{layer}"][wi]


def test_me_ple_one_level_isolates_other_tasks_tables_and_experts() -> None:
    schema, model = _build("me_ple", num_levels=1)
    grads = _grads(model, tiny_batch(schema, 32), "click")
    assert not any(_nonzero(grads, "input.ebcs.like."))
    assert all(_nonzero(grads, "input.ebcs.click."))
    assert all(_nonzero(grads, "input.shared_ebc."))
    n = model.levels[0].n
    for layer in range(2):
        assert all(_me_ple_expert_grad(grads, 0, layer, e, model).abs().sum() > 0 for e in range(n))
        assert all(_me_ple_expert_grad(grads, 0, layer, e, model).abs().sum() == 0 for e in range(n, 2 * n))
    assert grads["levels.0.shared_experts.weight_0"].abs().sum() > 0


def test_me_ple_two_levels_routes_like_ple() -> None:
    schema, model = _build("me_ple", num_levels=2)
    grads = _grads(model, tiny_batch(schema, 32), "click")
    n = model.levels[1].n
    # like's last-level experts are out of click's reach ...
    assert all(_me_ple_expert_grad(grads, 1, 0, e, model).abs().sum() == 0 for e in range(n, 2 * n))
    # ... but level 1's shared gate mixes like's level-0 experts, so click reaches them and like's tables.
    assert _me_ple_expert_grad(grads, 0, 0, n, model).abs().sum() > 0
    assert any(_nonzero(grads, "input.ebcs.like."))


def test_me_ple_task_tables_may_cover_a_subset_of_features() -> None:
    schema, model = _build("me_ple", stem_specific_fields="user")
    assert {c.name for c in model.input.ebcs["click"].embedding_bag_configs()} == {"task_click__user_id"}
    b = tiny_batch(schema, 4)
    assert model(b.dense, b.sparse)["like"].shape == (4,)
    with pytest.raises(ValueError, match="use ple"):
        _build("me_ple", stem_specific_fields="none")


def test_me_mmoe_all_backward_reaches_every_experts_tables() -> None:
    schema, model = _build("me_mmoe")
    assert len(model.input.ebcs) == CFG.num_experts
    grads = _grads(model, tiny_batch(schema, 32), "click")
    for i in range(CFG.num_experts):
        assert all(_nonzero(grads, f"input.ebcs.expert_{i}."))
        wi, _ = model.experts.expert_index(0, i)
        assert grads["experts.weight_0"][wi].abs().sum() > 0
    assert not any(_nonzero(grads, "towers.like."))


# ---- ESMM ---------------------------------------------------------------------------------

def test_esmm_ctcvr_is_the_product_of_ctr_and_cvr() -> None:
    schema, model = _build("esmm")
    b = tiny_batch(schema, 64)
    out, raw = model(b.dense, b.sparse), model.tower_logits(b.dense, b.sparse)
    assert torch.equal(out["click"], raw["click"])  # CTR passes through
    expected = torch.sigmoid(raw["click"]) * torch.sigmoid(raw["like"])
    assert (torch.sigmoid(out["like"]) - expected).abs().max() < 1e-6


def test_esmm_cvr_tower_learns_only_through_the_product() -> None:
    schema, model = _build("esmm")
    b = tiny_batch(schema, 32)
    grads = _grads(model, b, "click", 0)
    assert not any(_nonzero(grads, "towers.like."))  # the CTR loss never touches the CVR tower
    # The CTCVR loss: the CVR tower's gradient is that of BCE(pCTR * pCVR, y) on probabilities.
    grads = _grads(model, b, "like", 1)
    model.zero_grad(set_to_none=True)
    raw = model.tower_logits(b.dense, b.sparse)
    p = torch.sigmoid(raw["click"]) * torch.sigmoid(raw["like"])
    F.binary_cross_entropy(p, b.labels[:, 1]).backward()
    for name, param in model.towers["like"].named_parameters():
        assert torch.allclose(grads[f"towers.like.{name}"], param.grad, atol=1e-6), name
    assert all(_nonzero(grads, "towers.like."))


def test_chained_product_logits_stay_finite_at_extremes() -> None:
    a = torch.tensor([60.0, -60.0, 60.0, 0.0], requires_grad=True)
    b = torch.tensor([60.0, 60.0, -60.0, 0.0], requires_grad=True)
    z = chained_product_logits([a, b])[1]
    assert torch.isfinite(z).all()
    assert torch.allclose(z[3], torch.logit(torch.tensor(0.25)), atol=1e-6)
    F.binary_cross_entropy_with_logits(z, torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # three-step funnel
    c = torch.tensor([0.5])
    z3 = chained_product_logits([torch.tensor([1.0]), torch.tensor([-2.0]), c])[2]
    assert torch.allclose(torch.sigmoid(z3), torch.sigmoid(torch.tensor([1.0])) * torch.sigmoid(torch.tensor([-2.0]))
                          * torch.sigmoid(c), atol=1e-7)


def test_ctcvr_targets_fill_the_entire_space() -> None:
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # row 1's conversion is outside click space
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    y, m = ctcvr_targets(labels, mask)
    assert y.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]] and bool(m.all())


def test_esmm_needs_two_tasks() -> None:
    s = tiny_schema(num_tasks=1)
    with pytest.raises(ValueError, match=">= 2"):
        ESMM(build_ebc(s, 4), 3, s.task_names, [4])


# ---- AITM ---------------------------------------------------------------------------------

def test_aitm_transfers_forward_along_the_funnel_only() -> None:
    schema, model = _build("aitm")
    b = tiny_batch(schema, 32)
    g_click = _grads(model, b, "click")
    assert not any(_nonzero(g_click, "bottoms.like.")) and not any(_nonzero(g_click, "transfer.like."))
    assert not any(_nonzero(g_click, "info.click."))
    g_like = _grads(model, b, "like", 1)
    assert all(_nonzero(g_like, "bottoms.click."))  # like's loss trains click's tower through the AIT
    assert all(_nonzero(g_like, "info.click.")) and all(_nonzero(g_like, "transfer.like."))


def test_aitm_attention_weights_and_calibrator() -> None:
    schema, model = _build("aitm")
    ait = model.transfer["like"]
    u = torch.randn(5, 2, CFG.bottom_layer_sizes[-1])
    w = ait.attention_weights(u)
    assert w.shape == (5, 2) and torch.allclose(w.sum(1), torch.ones(5))
    assert torch.allclose(ait(u[:, 0], u[:, 1]), (w.unsqueeze(-1) * ait.value(u)).sum(1), atol=1e-6)
    ok = {"click": torch.tensor([2.0, 0.0]), "like": torch.tensor([1.0, -1.0])}  # pCVR-ish below pCTR
    assert model.calibrator_loss(ok) == 0
    bad = {"click": torch.tensor([0.0, 0.0]), "like": torch.tensor([0.0, 2.0])}
    expected = model.calibrator_weight * (torch.sigmoid(torch.tensor(2.0)) - 0.5) / 2
    assert torch.allclose(model.calibrator_loss(bad), expected)


# ---- hard sharing: asymmetric, customized, cross-stitch, sluice -----------------------------

def test_asymmetric_sharing_flows_one_way() -> None:
    schema, model = _build("asymmetric_sharing")
    b = tiny_batch(schema, 32)
    assert not any(_nonzero(_grads(model, b, "click"), "bottoms.like."))
    assert all(_nonzero(_grads(model, b, "like", 1), "bottoms.click."))
    for fusion, width in (("sum", 8), ("mean", 8), ("concat", 16)):
        _, m = _build("asymmetric_sharing", asymmetric_fusion=fusion)
        assert m.towers["like"].mlp[0].in_features == width
        assert m(b.dense, b.sparse)["like"].shape == (32,)


def test_customized_sharing_separates_task_bottoms() -> None:
    schema, model = _build("customized_sharing")
    g = _grads(model, tiny_batch(schema, 32), "click")
    assert not any(_nonzero(g, "task_bottoms.like.")) and all(_nonzero(g, "task_bottoms.click."))
    assert all(_nonzero(g, "shared_bottom."))


@pytest.mark.parametrize("name", ["cross_stitch", "sluice"])
def test_identity_alpha_gives_separate_columns(name: str) -> None:
    schema, model = _build(name, cross_stitch_self_weight=1.0)
    for unit in model.stitches:
        assert torch.equal(unit.alpha, torch.eye(unit.num_channels))
    g = _grads(model, tiny_batch(schema, 32), "click")
    for layer in range(len(CFG.bottom_layer_sizes)):
        for task, reached in ((0, True), (1, False)):
            wi, bi = model.columns.layers[layer].expert_index(0, task)
            assert bool(g[f"columns.layers.{layer}.weight_0"][wi].abs().sum() > 0) == reached
            assert bool(g[f"columns.layers.{layer}.bias_0"][bi].abs().sum() > 0) == reached
    # the off-diagonal alphas still learn: click's loss asks how much of like's column to take
    per_task = model.stitches[0].num_channels // 2  # sluice: G (task, subspace) channels per task
    alpha_grad = g["stitches.0.alpha"]
    assert alpha_grad[:per_task].abs().sum() > 0 and alpha_grad[per_task:].abs().sum() == 0


def test_cross_stitch_default_alpha_is_near_identity_and_mixes() -> None:
    schema, model = _build("cross_stitch")
    alpha = model.stitches[0].alpha.detach()
    assert torch.allclose(alpha, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    g = _grads(model, tiny_batch(schema, 32), "click")
    wi, _ = model.columns.layers[0].expert_index(0, 1)
    assert g["columns.layers.0.weight_0"][wi].abs().sum() > 0  # with α_D > 0 like's column is shared


def test_sluice_mixes_subspaces_across_tasks() -> None:
    schema, model = _build("sluice", sluice_num_subspaces=2)
    unit = model.stitches[0]
    assert unit.num_channels == 4  # T * G
    h = torch.randn(2, 3, 16)  # T x B x H
    with torch.no_grad():
        unit.alpha.copy_(torch.eye(4)[[0, 3, 2, 1]])  # channels (task, subspace): swap (click,1) <-> (like,1)
    mixed = model._mix(unit, h)
    assert torch.equal(mixed[0, :, :8], h[0, :, :8]) and torch.equal(mixed[0, :, 8:], h[1, :, 8:])
    assert torch.equal(mixed[1, :, 8:], h[0, :, 8:]) and torch.equal(mixed[1, :, :8], h[1, :, :8])
    with pytest.raises(ValueError, match="divisible"):
        _build("sluice", sluice_num_subspaces=3)


# ---- ML-MMoE ------------------------------------------------------------------------------

def test_ml_mmoe_matches_its_definition() -> None:
    torch.manual_seed(0)
    schema = tiny_schema()
    m = MLMMoE(build_ebc(schema, 4), len(schema.dense), schema.task_names, 2, 3, [6], [4])
    b = tiny_batch(schema, 7)
    x = m.input(b.dense, b.sparse)  # B x (D + zero padding)
    assert m.input.padding > 0 and x[:, m.input.unpadded_features:].abs().sum() == 0
    x = x[:, : m.input.unpadded_features]  # B x D

    def expert(experts, i, inp):
        w, bias = experts.expert_parameters(0, i)
        return torch.relu(inp @ w + bias)

    def gate(gates, g, inp):
        w, bias = gates.gate_parameters(g)  # D x E (no padding rows), E
        return torch.softmax(inp @ w + bias, dim=1)

    lower = torch.stack([expert(m.experts[0], i, x) for i in range(3)], 1)  # B x E x H
    upper = torch.stack(
        [expert(m.experts[1], i, (gate(m.level_gates[0], i, x).unsqueeze(-1) * lower).sum(1)) for i in range(3)], 1
    )  # B x E x H: expert i reads its own mixture, gated on x
    out = m(b.dense, b.sparse)
    for k, t in enumerate(schema.task_names):
        expected = m.towers[t]((gate(m.task_gates, k, x).unsqueeze(-1) * upper).sum(1))
        assert torch.allclose(out[t], expected, atol=1e-5)


def test_train_wrapper_uses_esmm_targets_and_aitm_calibrator() -> None:
    """ESMM trains on entire-space CTCVR labels; AITM's calibrator is added to the loss."""
    import dataclasses as _dc

    from recsys_mtl.config import ModelConfig as _MC
    from recsys_mtl.models import build_model as _build
    from recsys_mtl.testing import tiny_batch as _batch, tiny_schema as _schema
    from recsys_mtl.train.losses import MultiTaskLoss as _Loss
    from recsys_mtl.train.task import MTLTrainModule as _Train

    torch.manual_seed(0)
    s = _schema()
    cfg = _MC(embedding_dim=4, bottom_layer_sizes=(8,), tower_layer_sizes=(4,))
    b = _batch(s, 16)
    b.label_mask[:, 1] = b.labels[:, 0].bool()  # conversion only observed after a click
    esmm = _Train(_build(s, _dc.replace(cfg, name="esmm")), _Loss(s.tasks))
    _, (_, _, labels, mask) = esmm(b)
    assert bool(mask.all())  # entire space
    assert torch.equal(labels[:, 1], b.labels[:, 0] * torch.where(b.label_mask[:, 1], b.labels[:, 1], 0.0))
    aitm = _Train(_build(s, _dc.replace(cfg, name="aitm")), _Loss(s.tasks))
    total, (_, logits, _, _) = aitm(b)
    plain, _ = aitm.loss({t: logits[:, k] for k, t in enumerate(s.task_names)}, b.labels, b.label_mask)
    expected = aitm.model.calibrator_loss({t: logits[:, k] for k, t in enumerate(s.task_names)})
    assert float(total) == pytest.approx(float(plain + expected), rel=1e-6)
    # the calibrator penalises a later task predicted above the earlier one, and only that
    up = aitm.model.calibrator_loss({s.task_names[0]: torch.full((4,), -2.0), s.task_names[1]: torch.full((4,), 2.0)})
    down = aitm.model.calibrator_loss({s.task_names[0]: torch.full((4,), 2.0), s.task_names[1]: torch.full((4,), -2.0)})
    assert float(up) > 0 and float(down) == 0
