"""SetCriterion of Mask2Former: classification and point-sampled mask losses on Hungarian-matched pairs.

- loss_ce: cross-entropy over K+1 classes (unmatched queries target the no-object class, weighted NO_OBJECT_WEIGHT).
- loss_mask / loss_dice: sigmoid BCE and dice of the matched masks at TRAIN_NUM_POINTS points, of which
  IMPORTANCE_SAMPLE_RATIO are the most uncertain among OVERSAMPLE_RATIO x as many random candidates
  (PointRend's sampling), the rest uniform.
Both mask losses are normalised by the number of ground-truth masks, averaged over all workers. With deep
supervision each auxiliary prediction is matched on its own and its losses get the suffix ``_i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import nn


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """inputs [N, P] logits, targets [N, P] in [0, 1]; summed over masks, divided by num_masks."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Mean sigmoid BCE per mask, summed over masks, divided by num_masks."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of mask logits [R, 1, ...]: -|logit| (highest at the decision boundary)."""
    return -torch.abs(logits)


def _matched_target_masks(targets: list[dict], indices, like: torch.Tensor) -> torch.Tensor:
    """The matched target masks [sum of matches, H, W] in the matcher's order, as ``like``'s dtype/device; images
    of different sizes are zero-padded at the bottom/right to the largest. Only the matched masks are converted
    and padded (this runs once per decoder layer)."""
    h = max(t["masks"].shape[-2] for t in targets)
    w = max(t["masks"].shape[-1] for t in targets)
    matched = []
    for t, (_, j) in zip(targets, indices):
        m = t["masks"][j.to(t["masks"].device)].to(like)
        matched.append(F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2])))
    return torch.cat(matched)


class SetCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: dict[str, float],
        eos_coef: float,
        losses: list[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
    ):
        """
        Args:
            num_classes: classes without the no-object class.
            matcher: computes the matching between predictions and targets.
            weight_dict: loss name -> weight (the model applies it; kept here for reference).
            eos_coef: classification weight of the no-object class.
            losses: which losses to compute, among "labels" and "masks".
        """
        super().__init__()
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}; known: labels, masks")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)  # in the official checkpoints too
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    @staticmethod
    def _src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs: dict, targets: list[dict], indices, num_masks: float) -> dict:
        src_logits = outputs["pred_logits"].float()
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device)
        target_classes[idx] = target_classes_o.to(src_logits.device)
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def loss_masks(self, outputs: dict, targets: list[dict], indices, num_masks: float) -> dict:
        src_idx = self._src_permutation_idx(indices)
        src_masks = outputs["pred_masks"][src_idx]
        target_masks = _matched_target_masks(targets, indices, src_masks)
        # no upsampling: predictions and targets are compared at the same normalised points
        src_masks = src_masks[:, None]
        target_masks = target_masks[:, None]
        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits.float(), point_labels.float(), num_masks),
            "loss_dice": dice_loss(point_logits.float(), point_labels.float(), num_masks),
        }

    def get_loss(self, loss: str, outputs: dict, targets: list[dict], indices, num_masks: float) -> dict:
        loss_fn = {"labels": self.loss_labels, "masks": self.loss_masks}[loss]
        return loss_fn(outputs, targets, indices, num_masks)

    def num_masks_across_workers(self, targets: list[dict], device) -> float:
        """Ground-truth masks in the batch, averaged over workers (all-reduced), at least 1."""
        num_masks = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device)
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num_masks)
        return torch.clamp(num_masks / world_size, min=1).item()

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """outputs: the decoder's dict (with "aux_outputs" for deep supervision); targets: per image "labels" and
        "masks". Returns the unweighted losses."""
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs_without_aux, targets)
        num_masks = self.num_masks_across_workers(targets, outputs["pred_logits"].device)

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_masks))
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux_outputs, targets)  # each layer is matched on its own
            for loss in self.losses:
                l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_masks)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )
