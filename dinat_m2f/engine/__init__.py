"""Training machinery: optimizer, LR schedules, NaN guard, atomic checkpoints, resumable data, launch, Trainer."""

from dinat_m2f.engine.checkpoint import AtomicCheckpointer, MissingWeightsError
from dinat_m2f.engine.hooks import (
    FiniteWeightsPeriodicCheckpointer,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteWeightsError,
    check_gradients_finite,
    check_losses_finite,
)
from dinat_m2f.engine.launch import launch
from dinat_m2f.engine.lr_scheduler import build_lr_scheduler
from dinat_m2f.engine.optimizer import adamw_can_fuse, build_optimizer, build_param_groups, param_hyperparams
from dinat_m2f.engine.sampler import ResumableTrainingSampler
from dinat_m2f.engine.train_loop import MaskFormerTrainLoop, resolve_amp_dtype

__all__ = [
    "AtomicCheckpointer",
    "FiniteWeightsPeriodicCheckpointer",
    "MaskFormerTrainLoop",
    "MissingWeightsError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "ResumableTrainingSampler",
    "adamw_can_fuse",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "check_gradients_finite",
    "check_losses_finite",
    "launch",
    "param_hyperparams",
    "resolve_amp_dtype",
]
