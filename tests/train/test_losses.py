"""PLE joint loss (§4.3): δ masking, per-task normalisation (Eq. 9), dynamic weights (Eq. 10)."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_mtl.data.schema import TaskSpec
from recsys_mtl.train.losses import MultiTaskLoss

TASKS = [TaskSpec("click"), TaskSpec("share"), TaskSpec("watch", "regression")]


def _reference(logits, labels, mask, weights):
    """Eq. 9 written as a per-sample Python loop."""
    total, per_task = 0.0, []
    for k, t in enumerate(TASKS):
        num, den = 0.0, 0
        for i in range(labels.shape[0]):
            if not mask[i, k]:
                continue
            z, y = float(logits[t.name][i]), float(labels[i, k])
            if t.kind == "binary":
                p = 1 / (1 + math.exp(-z))
                num += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            else:
                num += (z - y) ** 2
            den += 1
        per_task.append(num / max(den, 1))
        total += weights[k] * per_task[-1]
    return total, per_task


def _inputs(seed=0, b=12):
    g = torch.Generator().manual_seed(seed)
    logits = {t.name: torch.randn(b, generator=g) for t in TASKS}
    labels = torch.stack([torch.randint(0, 2, (b,), generator=g).float(), torch.randint(0, 2, (b,), generator=g).float(),
                          torch.randn(b, generator=g)], 1)
    mask = torch.rand(b, 3, generator=g) > 0.3
    mask[:, 1] &= labels[:, 0].bool()  # share only defined after click: a nested sample space
    return logits, labels, mask


def test_sample_space_masking_and_normalisation_match_eq9() -> None:
    logits, labels, mask = _inputs()
    loss = MultiTaskLoss(TASKS, weights={"click": 1.0, "share": 2.0, "watch": 0.5})
    total, per_task = loss(logits, labels, mask)
    ref_total, ref_per_task = _reference(logits, labels, mask, [1.0, 2.0, 0.5])
    assert per_task.tolist() == pytest.approx(ref_per_task, rel=1e-5)
    assert float(total) == pytest.approx(ref_total, rel=1e-5)


def test_out_of_space_labels_do_not_matter_and_normalisation_is_per_task() -> None:
    logits, labels, mask = _inputs(seed=1)
    loss = MultiTaskLoss(TASKS)
    _, a = loss(logits, labels, mask)
    garbage = labels.clone()
    garbage[~mask] = 1e6
    _, b = loss(logits, garbage, mask)
    assert torch.equal(a, b)
    # Duplicating the in-space samples of one task leaves its (normalised) loss unchanged.
    doubled = {k: torch.cat([v, v]) for k, v in logits.items()}
    _, c = loss(doubled, torch.cat([labels, labels]), torch.cat([mask, mask]))
    assert torch.allclose(a, c, atol=1e-6)


def test_task_with_empty_space_contributes_zero() -> None:
    logits, labels, mask = _inputs()
    mask[:, 1] = False
    _, per_task = MultiTaskLoss(TASKS)(logits, labels, mask)
    assert float(per_task[1]) == 0.0


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_dynamic_weights_follow_eq10(unit: str) -> None:
    loss = MultiTaskLoss(TASKS, weights={"click": 2.0}, decay={"click": 0.9, "share": 1.1}, weight_unit=unit)
    for t in range(4):
        assert loss.current_weights().tolist() == pytest.approx([2.0 * 0.9**t, 1.1**t, 1.0])
        for _ in range(3):
            loss.step_done()
            if unit == "step":
                break
        if unit == "epoch":
            loss.epoch_done()
    logits, labels, mask = _inputs()
    total, per_task = loss(logits, labels, mask)
    assert float(total) == pytest.approx(float((loss.current_weights() * per_task).sum()), rel=1e-6)


def test_weight_schedule_is_in_the_state_dict() -> None:
    a = MultiTaskLoss(TASKS, decay={"click": 0.5})
    a.epoch_done()
    a.epoch_done()
    b = MultiTaskLoss(TASKS, decay={"click": 0.5})
    b.load_state_dict(a.state_dict())
    assert b.current_weights().tolist() == pytest.approx([0.25, 1.0, 1.0])


def test_unknown_task_names_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown tasks"):
        MultiTaskLoss(TASKS, decay={"like": 0.5})
