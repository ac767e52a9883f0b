"""The optimizer of Mask2Former's train_net.py: AdamW/SGD, backbone LR multiplier, selective weight decay, clipping."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

# Parameters of these modules get SOLVER.WEIGHT_DECAY_NORM (detectron2's default 0.0).
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
# Swin's positional parameters, never decayed (Mask2Former's rule).
NO_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
# Neighborhood attention's relative positional bias; its decay is SOLVER.RPB_WEIGHT_DECAY (None = WEIGHT_DECAY).
RPB_PARAM_NAME = "rpb"


def param_hyperparams(cfg: CfgNode, model: nn.Module) -> list[tuple[str, nn.Parameter, float, float]]:
    """(name, param, lr, weight_decay) for every trainable parameter, each listed once."""
    solver = cfg.SOLVER
    out: list[tuple[str, nn.Parameter, float, float]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr = solver.BASE_LR
            wd = solver.WEIGHT_DECAY
            if "backbone" in module_name:
                lr = lr * solver.BACKBONE_MULTIPLIER
            if param_name in NO_DECAY_PARAM_NAMES:
                wd = 0.0
            if param_name == RPB_PARAM_NAME and solver.RPB_WEIGHT_DECAY is not None:
                wd = float(solver.RPB_WEIGHT_DECAY)
            if isinstance(module, NORM_MODULE_TYPES):
                wd = solver.WEIGHT_DECAY_NORM
            if isinstance(module, nn.Embedding):
                wd = solver.WEIGHT_DECAY_EMBED
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            out.append((full_name, param, lr, wd))
    return out


def build_param_groups(cfg: CfgNode, model: nn.Module) -> list[dict[str, Any]]:
    """Parameters grouped by (lr, weight_decay): the same update as one group per parameter, with fewer groups."""
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for _, param, lr, wd in param_hyperparams(cfg, model):
        group = groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})
        group["params"].append(param)
    return list(groups.values())


def total_grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type`` norm of all gradients together, as a 0-d tensor on their device (no host sync): one
    ``torch._foreach_norm`` per device and dtype. NaN/inf if any gradient holds a NaN/inf."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], norm_type)


def _with_full_model_clipping(optim_cls: type[torch.optim.Optimizer], max_norm: float, norm_type: float):
    """A subclass of ``optim_cls`` that clips the gradient norm of all its parameters together before each step.

    ``step(grad_norm=...)`` takes a total norm the caller already computed (the NaN guard of the training loop
    does, with the same ``norm_type``), so the norm is computed once per step.
    """

    class FullModelGradientClippingOptimizer(optim_cls):
        clip_norm_type = norm_type

        def step(self, closure=None, grad_norm: torch.Tensor | None = None):
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grad_norm is None:
                grad_norm = total_grad_norm(params, norm_type)
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = f"FullModelGradientClipping{optim_cls.__name__}"
    return FullModelGradientClippingOptimizer


# Where build_optimizer takes torch's fused AdamW. Not CUDA: there train_net's float16 AMP steps through a GradScaler,
# which hands a fused optimizer its gradients still scaled (the kernel unscales them), so the gradient clipping in
# front of the step (full-model or detectron2's) would clip scaled gradients. On the CPU AMP is bfloat16, unscaled.
_FUSED_ADAMW_DEVICES = ("cpu",)


def adamw_can_fuse(params: Iterable[torch.Tensor]) -> bool:
    """Whether build_optimizer takes torch's fused AdamW for these parameters: floating point, all on the CPU.

    Fused, the update of all parameters is one kernel per dtype instead of a dozen operators per parameter: the same
    update to float32 rounding (tests/test_train_engine.py), and on DiNAT-Tiny-Mask2Former's 705 parameters 36 ms
    instead of 110 ms per step (Intel Xeon, 2 threads)."""
    params = list(params)
    devices = {p.device.type for p in params}
    return bool(params) and devices <= set(_FUSED_ADAMW_DEVICES) and all(p.is_floating_point() for p in params)


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over ``model`` following Mask2Former's rules, plus the rpb switch of this project."""
    solver = cfg.SOLVER
    groups = build_param_groups(cfg, model)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    clip = solver.CLIP_GRADIENTS
    full_model_clip = clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0.0

    def maybe_full_model(optim_cls):
        return _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE) if full_model_clip else optim_cls

    name = solver.OPTIMIZER.upper()
    if name == "SGD":
        optimizer = maybe_full_model(torch.optim.SGD)(groups, solver.BASE_LR, momentum=solver.MOMENTUM)
    elif name == "ADAMW":
        fused = adamw_can_fuse(p for g in groups for p in g["params"])
        optimizer = maybe_full_model(torch.optim.AdamW)(groups, solver.BASE_LR, fused=fused or None)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER: unknown optimizer {solver.OPTIMIZER!r} (expected 'ADAMW' or 'SGD')")
    if not full_model_clip:
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer
