"""The NaN guard: stop training at the first non-finite loss, naming the iteration and the loss term."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from detectron2.utils import comm


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


def check_losses_finite(loss_dict: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raise NonFiniteLossError naming ``iteration`` and the offending loss term(s) if any loss is NaN/inf.

    With several workers the values are summed across workers first (NaN/inf survive a sum), so every worker
    raises at the same iteration instead of some of them waiting forever in the next all-reduce.
    """
    names = sorted(loss_dict)
    values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])  # a new tensor: safe to reduce
    if comm.get_world_size() > 1:
        dist.all_reduce(values)
    bad = [(k, v) for k, v in zip(names, values.tolist()) if not math.isfinite(v)]
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in bad)
        where = " (summed over workers)" if comm.get_world_size() > 1 else ""
        raise NonFiniteLossError(
            f"NaN guard: non-finite loss at iteration {iteration}: {terms}{where}. "
            f"Stopping before the optimizer step so the last checkpoint stays clean; "
            "lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or disable AMP, then --resume."
        )


# Which loss terms each Mask2Former prediction feeds (for the message).
_TERMS_OF_OUTPUT = {"pred_logits": "loss_ce", "pred_masks": "loss_mask, loss_dice"}


def _nonfinite_counts(output: Mapping) -> dict[tuple[str, str], torch.Tensor]:
    """(label, prediction key) -> number of non-finite values, for the final and the auxiliary predictions."""
    layers = [("", output)] + [(f"_{i}", aux) for i, aux in enumerate(output.get("aux_outputs") or [])]
    return {
        (f"{key}{suffix}", key): (~torch.isfinite(preds[key].detach())).sum()
        for suffix, preds in layers
        for key in _TERMS_OF_OUTPUT
        if key in preds
    }


class PredictionGuard:
    """A forward hook on Mask2Former's ``sem_seg_head``: stops training when its predictions are not finite.

    A diverging model usually shows non-finite *predictions* first, and those reach the Hungarian matcher (which
    cannot solve a NaN cost matrix) before any loss is computed; this names the iteration, the prediction and the
    loss terms it feeds. Only active in training mode.
    """

    def __init__(self, get_iteration) -> None:
        self.get_iteration = get_iteration

    def __call__(self, module: torch.nn.Module, inputs, output) -> None:
        if not module.training or not isinstance(output, Mapping):
            return
        counts = _nonfinite_counts(output)
        if not counts:
            return
        values = torch.stack(list(counts.values())).float()
        if comm.get_world_size() > 1:
            dist.all_reduce(values)  # every worker runs this hook each step, so they all raise together
        bad = [(label, key, int(v)) for (label, key), v in zip(counts, values.tolist()) if v > 0]
        if bad:
            terms = sorted({_TERMS_OF_OUTPUT[key] for _, key, _ in bad})
            detail = ", ".join(f"{label} ({c} values)" for label, _, c in bad)
            raise NonFiniteLossError(
                f"NaN guard: non-finite predictions at iteration {self.get_iteration()}: {detail}; "
                f"they feed the loss terms {', '.join(terms)}. Stopping before the optimizer step; "
                "lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or disable AMP, then --resume."
            )


def install_prediction_guard(model: torch.nn.Module, get_iteration) -> bool:
    """Attach a PredictionGuard to ``model.sem_seg_head`` (through DDP) if there is one; returns whether it did."""
    inner = model.module if hasattr(model, "module") else model
    head = getattr(inner, "sem_seg_head", None)
    if head is None:
        return False
    head.register_forward_hook(PredictionGuard(get_iteration))
    return True
