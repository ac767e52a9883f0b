"""The NaN guard: stop training at the first non-finite loss, prediction or gradient, naming the iteration and
the loss term / parameter; and a checkpointer hook that refuses to save non-finite weights."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from detectron2.engine import hooks
from detectron2.utils import comm

_ADVICE = "lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or disable AMP, then --resume."


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient became NaN or infinite (with finite losses): the optimizer step was not taken."""


class NonFiniteWeightsError(FloatingPointError):
    """A weight is NaN or infinite at a checkpoint: the checkpoint was not written."""


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
            f"Stopping before the optimizer step so the last checkpoint stays clean; {_ADVICE}"
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
                f"they feed the loss terms {', '.join(terms)}. Stopping before the optimizer step; {_ADVICE}"
            )


def install_prediction_guard(model: torch.nn.Module, get_iteration) -> bool:
    """Attach a PredictionGuard to ``model.sem_seg_head`` (through DDP) if there is one; returns whether it did."""
    inner = model.module if hasattr(model, "module") else model
    head = getattr(inner, "sem_seg_head", None)
    if head is None:
        return False
    head.register_forward_hook(PredictionGuard(get_iteration))
    return True


def first_nonfinite(named_tensors: Iterable[tuple[str, torch.Tensor | None]]) -> tuple[str, int] | None:
    """(name, number of NaN/inf values) of the first tensor holding one, or None. A sync per tensor: call it only
    once a cheap whole-model check has found a problem."""
    for name, tensor in named_tensors:
        if tensor is not None and tensor.is_floating_point():
            count = int((~torch.isfinite(tensor.detach())).sum())
            if count:
                return name, count
    return None


def _nonfinite_ranks(local_bad: torch.Tensor) -> list[int]:
    """The ranks whose ``local_bad`` (a bool scalar) is true; with several workers one all-reduce of a
    world-size vector, so every worker learns the same answer and they all stop at the same iteration."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return [0] if bool(local_bad) else []
    flags = torch.zeros(world_size, device=local_bad.device)
    flags[comm.get_rank()] = local_bad.float()
    dist.all_reduce(flags)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]


def check_gradients_finite(
    grad_norm: torch.Tensor, iteration: int, named_params: Iterable[tuple[str, torch.nn.Parameter]]
) -> None:
    """Raise NonFiniteGradientError if the total gradient norm is NaN/inf on any worker.

    ``grad_norm`` is the norm of all gradients together (computed once per step with ``torch._foreach_norm``, the
    same number full-model clipping uses), so the check costs one device->host sync per step (plus a tiny
    all-reduce with several workers); only after a failure are the parameters searched for the first offending
    one. A NaN/inf gradient always gives a non-finite norm; so does a norm that overflows (gradients ~1e19 or more
    in float32), which the message then says.
    """
    bad_ranks = _nonfinite_ranks(~torch.isfinite(grad_norm.detach()).reshape(()))
    if not bad_ranks:
        return
    where = f" on worker(s) {bad_ranks}" if comm.get_world_size() > 1 else ""
    if comm.get_rank() in bad_ranks:
        first = first_nonfinite((name, p.grad) for name, p in named_params)
        if first is not None:
            detail = f"first in the gradient of {first[0]} ({first[1]} NaN/inf values)"
        else:
            detail = f"every gradient is finite but their norm overflowed ({float(grad_norm)})"
    else:
        detail = "the gradients of this worker are finite"
    raise NonFiniteGradientError(
        f"NaN guard: non-finite gradient at iteration {iteration}{where}: {detail}, with finite losses. "
        f"Stopped before the optimizer step, so the weights and the checkpoints stay finite; {_ADVICE}"
    )


def check_weights_finite(model: torch.nn.Module, iteration: int) -> None:
    """Raise NonFiniteWeightsError naming the first parameter/buffer that holds a NaN/inf (one sync in all)."""
    tensors = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point() and v.numel() > 0]
    if not tensors:
        return
    all_finite = torch.stack([torch.isfinite(v).all().to(tensors[0][1].device) for _, v in tensors]).all()
    if bool(all_finite):
        return
    name, count = first_nonfinite(tensors)
    raise NonFiniteWeightsError(
        f"NaN guard: the weights are not finite at iteration {iteration} ({name} holds {count} NaN/inf values); "
        f"refusing to write a checkpoint of them, the last checkpoint written stays the latest; {_ADVICE}"
    )


class FiniteWeightsPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's PeriodicCheckpointer hook that checks the weights are finite before each save.

    Finite gradients can still step the weights to inf (a huge learning rate); without this check such a
    checkpoint would be written and tagged as ``last_checkpoint`` before the next forward notices.
    """

    def _saves_at(self, iteration: int) -> bool:
        # fvcore's PeriodicCheckpointer.step saves at these iterations
        periodic = (iteration + 1) % self.period == 0
        return periodic or (self.max_iter is not None and iteration >= self.max_iter - 1)

    def step(self, iteration: int, **kwargs) -> None:
        if self._saves_at(int(iteration)):
            check_weights_finite(self.checkpointer.model, int(iteration))
        super().step(iteration, **kwargs)
