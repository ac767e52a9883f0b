"""HungarianMatcher: costs as specified and an assignment as good as brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample

from dinat_m2f.modeling.matcher import HungarianMatcher, batch_dice_loss, batch_sigmoid_ce_loss


def brute_force_min_cost(cost: torch.Tensor) -> float:
    """Smallest total cost over all ways to give each target its own query (Q >= T)."""
    q, t = cost.shape
    best = math.inf
    for rows in itertools.permutations(range(q), t):
        best = min(best, sum(cost[r, c].item() for c, r in enumerate(rows)))
    return best


def expected_cost(logits, masks, labels, tgt_masks, coords, wc, wm, wd):
    """The cost written out per pair, independently of the matcher's batched formulas."""
    prob = logits.softmax(-1)
    p = point_sample(masks[:, None], coords.repeat(masks.shape[0], 1, 1), align_corners=False)[:, 0]
    t = point_sample(tgt_masks[:, None].float(), coords.repeat(tgt_masks.shape[0], 1, 1), align_corners=False)[:, 0]
    cost = torch.empty(masks.shape[0], tgt_masks.shape[0])
    for i in range(masks.shape[0]):
        for j in range(tgt_masks.shape[0]):
            ce = F.binary_cross_entropy_with_logits(p[i], t[j])
            s = p[i].sigmoid()
            dice = 1 - (2 * (s * t[j]).sum() + 1) / (s.sum() + t[j].sum() + 1)
            cost[i, j] = wm * ce - wc * prob[i, labels[j]] + wd * dice
    return cost


def random_case(seed, batch=2, queries=5, classes=4, size=8):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=g) * 2,
        "pred_masks": torch.randn(batch, queries, size // 2, size // 2, generator=g) * 3,
    }
    targets = []
    for _ in range(batch):
        t = int(torch.randint(0, queries + 1, (1,), generator=g))
        targets.append(
            {
                "labels": torch.randint(0, classes, (t,), generator=g),
                "masks": torch.rand(t, size, size, generator=g) > 0.5,
            }
        )
    return outputs, targets


@pytest.mark.parametrize("seed", range(8))
def test_matching_equals_brute_force(seed):
    outputs, targets = random_case(seed)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    torch.manual_seed(seed)
    indices = matcher(outputs, targets)
    torch.manual_seed(seed)  # the matcher draws one set of points per image, in image order
    for b, (rows, cols) in enumerate(indices):
        coords = torch.rand(1, 64, 2)
        cost = expected_cost(
            outputs["pred_logits"][b],
            outputs["pred_masks"][b],
            targets[b]["labels"],
            targets[b]["masks"],
            coords,
            2.0,
            5.0,
            5.0,
        )
        num_targets = len(targets[b]["labels"])
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == num_targets
        assert sorted(cols.tolist()) == list(range(num_targets))
        assert len(set(rows.tolist())) == num_targets
        matched = sum(cost[r, c].item() for r, c in zip(rows.tolist(), cols.tolist()))
        assert matched == pytest.approx(brute_force_min_cost(cost), abs=1e-4)


def test_cost_matrix_matches_pairwise_formula():
    outputs, targets = random_case(42, batch=1, queries=4)
    while len(targets[0]["labels"]) == 0:
        outputs, targets = random_case(43, batch=1, queries=4)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=32)
    coords = torch.rand(1, 32, 2)
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"], targets[0]["masks"], coords
    )
    ref = expected_cost(
        outputs["pred_logits"][0],
        outputs["pred_masks"][0],
        targets[0]["labels"],
        targets[0]["masks"],
        coords,
        2.0,
        5.0,
        5.0,
    )
    torch.testing.assert_close(cost, ref, rtol=1e-5, atol=1e-5)


def test_obvious_match():
    # query 2 predicts class 1 with the target's exact mask; query 0 predicts class 0 with the other mask
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :, :4] = True
    masks[1, :, 4:] = True
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, 2, 1] = 5.0
    logits[0, 0, 0] = 5.0
    pred = torch.full((1, 3, 8, 8), -10.0)
    pred[0, 2][masks[0]] = 10.0
    pred[0, 0][masks[1]] = 10.0
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=256)
    ((rows, cols),) = matcher(
        {"pred_logits": logits, "pred_masks": pred}, [{"labels": torch.tensor([1, 0]), "masks": masks}]
    )
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0, 0, 0, num_points=10)
    with pytest.raises(ValueError, match="num_points must be positive"):
        HungarianMatcher(1, 1, 1, num_points=0)


@pytest.mark.parametrize("num_targets", [0, 3])
def test_cost_matrix_samples_the_masks_as_the_official_code_bitwise(num_targets):
    """The masks are sampled as the channels of one image (one grid); the official code samples each as an image
    of its own with a repeated grid: the same cost, bit for bit."""
    g = torch.Generator().manual_seed(0)
    pred_logits, pred_masks = torch.randn(7, 4, generator=g), torch.randn(7, 24, 20, generator=g)
    labels = torch.randint(0, 3, (num_targets,), generator=g)
    masks = torch.rand(num_targets, 96, 80, generator=g) > 0.5
    coords = torch.rand(1, 50, 2, generator=g)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=50)
    cost = matcher.cost_matrix(pred_logits, pred_masks, labels, masks, coords)

    def per_mask(m):
        return point_sample(m[:, None], coords.repeat(m.shape[0], 1, 1), align_corners=False).squeeze(1)

    out_points, tgt_points = per_mask(pred_masks), per_mask(masks.float())
    official = (
        5.0 * batch_sigmoid_ce_loss(out_points, tgt_points)
        - 2.0 * pred_logits.softmax(-1)[:, labels]
        + 5.0 * batch_dice_loss(out_points, tgt_points)
    )
    assert cost.shape == (7, num_targets) and torch.equal(cost, official)


def official_batch_sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mask2Former's batch_sigmoid_ce_loss as published (BCE against all-ones and all-zeros targets)."""
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, (1 - targets))
    return loss / inputs.shape[1]


@pytest.mark.parametrize("queries, points, targets", [(100, 12544, 3), (7, 33, 5), (1, 1, 1)])
def test_batch_sigmoid_ce_loss_equals_the_official_formulation_bit_for_bit(queries, points, targets):
    g = torch.Generator().manual_seed(queries + points)
    inputs = torch.randn(queries, points, generator=g) * 20  # saturating logits too
    inputs.view(-1)[:4] = torch.tensor([0.0, -0.0, 88.0, -104.0])[: inputs.numel()]
    tgt = (torch.rand(targets, points, generator=g) > 0.5).float()
    assert torch.equal(batch_sigmoid_ce_loss(inputs, tgt), official_batch_sigmoid_ce_loss(inputs, tgt))
    # and the per-element terms themselves, signed zeros included
    log_sigmoid = F.logsigmoid(inputs)
    ours = ((inputs * 0).sub_(log_sigmoid), inputs - log_sigmoid)
    for target, got in zip((torch.ones_like(inputs), torch.zeros_like(inputs)), ours):
        want = F.binary_cross_entropy_with_logits(inputs, target, reduction="none")
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
