"""The NaN guard: stop training at the first non-finite loss, naming the iteration and the loss term."""

from __future__ import annotations

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
    values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
    if comm.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    bad = [(k, v) for k, v in zip(names, values.tolist()) if not torch.isfinite(torch.tensor(v))]
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in bad)
        where = " (summed over workers)" if comm.get_world_size() > 1 else ""
        raise NonFiniteLossError(
            f"NaN guard: non-finite loss at iteration {iteration}: {terms}{where}. "
            f"Stopping before the optimizer step so the last checkpoint stays clean; "
            "lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or disable AMP, then --resume."
        )
