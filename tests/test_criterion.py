"""SetCriterion on cases whose losses can be computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dinat_m2f.modeling.criterion import SetCriterion, dice_loss, sigmoid_ce_loss
from dinat_m2f.modeling.matcher import HungarianMatcher


def make_criterion(num_classes=2, num_points=100):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(
        num_classes,
        matcher=matcher,
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )


def test_hand_checkable_losses():
    # 2 queries, 2 classes (+ no-object). One target of class 0 with an empty mask (0 at every sampled point,
    # wherever the points fall). Query 0: logits [2, 0, 0]; query 1: logits [0, 0, 0]; all mask logits 0.
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    masks = torch.zeros(1, 2, 4, 4)
    targets = [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 16, 16)}]
    criterion = make_criterion(num_points=100)
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, targets)

    # query 0 is matched (same mask costs, cheaper class cost); query 1 targets no-object with weight 0.1
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce1 = math.log(3)
    assert losses["loss_ce"].item() == pytest.approx((1.0 * ce0 + 0.1 * ce1) / 1.1, rel=1e-6)
    # the matched mask logits are 0 at every point: BCE = log 2; dice = 1 - (0 + 1) / (0.5 * points + 0 + 1)
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(1 - 1 / (0.5 * 100 + 1), rel=1e-6)
    assert criterion.empty_weight.tolist() == pytest.approx([1.0, 1.0, 0.1])


def test_aux_outputs_are_matched_on_their_own():
    # in the auxiliary prediction the roles of the queries are swapped: matching must follow
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 1] = 1.0  # a different mask for query 1, so that a wrong match changes the mask losses too
    aux = {"pred_logits": logits.flip(1), "pred_masks": masks.flip(1)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 16, 16)}]
    criterion = make_criterion()
    losses = criterion({"pred_logits": logits, "pred_masks": masks, "aux_outputs": [aux, aux]}, targets)
    assert set(losses) == {f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0", "_1")}
    for suffix in ("_0", "_1"):
        for k in ("loss_ce", "loss_mask", "loss_dice"):
            assert losses[k + suffix].item() == pytest.approx(losses[k].item(), rel=1e-6)


def test_num_masks_normalisation_and_empty_targets():
    criterion = make_criterion()
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 3, 3, generator=g), "pred_masks": torch.randn(2, 3, 4, 4, generator=g)}
    targets = [
        {"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 16, 16, generator=g) > 0.5},
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)},
    ]
    assert criterion.num_masks_across_workers(targets, "cpu") == 2.0
    assert criterion.num_masks_across_workers(targets[1:], "cpu") == 1.0  # clamped to at least 1
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # no target at all: mask losses are zero, the classification loss pushes every query to no-object
    losses = criterion(outputs, [targets[1], targets[1]])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_ce"].item() > 0


def test_loss_functions():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sigmoid_ce_loss(logits, targets, 2.0).item() == pytest.approx((math.log(2) + 4.54e-5) / 2, rel=1e-3)
    # perfect prediction: dice = 1 - (2 * 1 + 1) / (1 + 1 + 1) = 0 (up to sigmoid(10) != 1)
    assert dice_loss(logits[1:], targets[1:], 1.0).item() == pytest.approx(0.0, abs=1e-4)


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(2, HungarianMatcher(1, 1, 1, 10), {}, 0.1, ["boxes"], 10, 3.0, 0.75)


def test_matched_target_masks_follow_the_matching_and_pad_smaller_images():
    from dinat_m2f.modeling.criterion import _matched_target_masks

    g = torch.Generator().manual_seed(0)
    targets = [
        {"masks": torch.rand(3, 6, 5, generator=g) > 0.5},
        {"masks": torch.rand(2, 4, 7, generator=g) > 0.5},
        {"masks": torch.zeros(0, 6, 7, dtype=torch.bool)},
    ]
    indices = [(torch.tensor([4, 0]), torch.tensor([2, 0])), (torch.tensor([1]), torch.tensor([1]))]
    indices.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
    out = _matched_target_masks(targets, indices, torch.zeros(1, dtype=torch.float64))
    # reference: every target zero-padded into a [B, max T, max H, max W] batch, then the matched ones in order
    ref = torch.zeros(3, 3, 6, 7, dtype=torch.float64)
    for b, t in enumerate(targets):
        m = t["masks"]
        ref[b, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    expected = torch.stack([ref[0, 2], ref[0, 0], ref[1, 1]])
    assert out.dtype == torch.float64 and out.shape == (3, 6, 7)
    assert torch.equal(out, expected)
