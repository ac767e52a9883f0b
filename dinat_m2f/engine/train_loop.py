"""The training step: detectron2's SimpleTrainer with AMP on any device, the NaN guard and per-iteration seeding."""

from __future__ import annotations

import logging
import random
import time
import warnings

import numpy as np
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm

from dinat_m2f.engine.hooks import check_gradients_finite, check_losses_finite, install_prediction_guard
from dinat_m2f.engine.optimizer import total_grad_norm
from dinat_m2f.utils.cpu_bfloat16 import cpu_has_fast_bfloat16

logger = logging.getLogger(__name__)


def resolve_amp_dtype(name: str, device_type: str) -> torch.dtype | None:
    """SOLVER.AMP.DTYPE -> the autocast dtype, or None for float32 (no autocast). "auto" is float16 on CUDA; on the
    CPU bfloat16 where the CPU has AVX512_BF16 (and torch runs its AVX-512 code), else None: without those
    instructions bfloat16's products run many times slower than float32's (a DiNAT-T-Mask2Former training step
    12x slower on the AVX2 path, tools/speed_report.py), so AMP would only cost time there."""
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name == "auto":
        if device_type == "cuda":
            return torch.float16
        if cpu_has_fast_bfloat16():
            return torch.bfloat16
        logger.info(
            "SOLVER.AMP.DTYPE auto: this CPU has no AVX-512 bfloat16 instructions (torch's CPU capability: %s), "
            "so training runs in float32 (bfloat16 autocast would be many times slower here)",
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    if name not in table:
        raise ValueError(f"SOLVER.AMP.DTYPE: unknown dtype {name!r} (expected 'auto', 'float16' or 'bfloat16')")
    if table[name] == torch.bfloat16 and device_type == "cpu" and not cpu_has_fast_bfloat16():
        warnings.warn(
            f"SOLVER.AMP.DTYPE {name} on a CPU without AVX-512 bfloat16 instructions (torch's CPU capability: "
            f"{torch.backends.cpu.get_cpu_capability()}): bfloat16 autocast runs many times slower than float32 "
            "there (a training step 12x slower on the AVX2 path). Use SOLVER.AMP.DTYPE auto (float32 on this CPU).",
            stacklevel=2,
        )
    return table[name]


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """A seed that depends only on (seed, iteration, rank): a resumed run draws the same numbers as an unbroken one."""
    return (seed * 1_000_003 + iteration * 1_009 + rank) % (2**31)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class MaskFormerTrainLoop(SimpleTrainer):
    """One training step per call. Differences from detectron2's SimpleTrainer / AMPTrainer:

    - AMP works on CPU (bfloat16) and GPU (float16, with a GradScaler); AMPTrainer requires CUDA;
    - the NaN guard checks every loss term before backward and stops with the iteration and the term named, and
      checks the gradients before the optimizer step (one fused norm, shared with full-model clipping) and stops
      with the iteration and the first non-finite parameter named, so a NaN never reaches the weights. (With the
      float16 GradScaler a non-finite gradient is the scaler's business: it skips that step and lowers the scale.)
    - with ``seed`` set (deterministic mode), the RNGs are re-seeded from (seed, iteration, rank) before each step,
      so random point sampling, drop-path etc. do not depend on where a run was resumed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        amp_dtype: torch.dtype | None = None,
        nan_guard: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, data_loader, optimizer)
        self.device_type = next(model.parameters()).device.type
        self.amp_dtype = amp_dtype
        self.nan_guard = nan_guard
        self.seed = seed
        if nan_guard:
            install_prediction_guard(model, lambda: self.iter)
        self._named_params = self._optimized_named_params(model, optimizer)
        use_scaler = amp_dtype == torch.float16 and self.device_type == "cuda"
        self.grad_scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    @staticmethod
    def _optimized_named_params(
        model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[tuple[str, torch.nn.Parameter]]:
        """The optimizer's parameters with their names in the model (without DDP's ``module.`` prefix)."""
        inner = model.module if hasattr(model, "module") else model
        names = {id(p): name for name, p in inner.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [(names.get(id(p), f"<optimizer parameter {i}>"), p) for i, p in enumerate(params)]

    def _optimizer_step(self) -> None:
        """Step, after checking the gradients are finite (NaN guard). The norm computed for the check is handed to
        full-model clipping (same norm type), which would otherwise compute it again."""
        clip_norm_type = getattr(self.optimizer, "clip_norm_type", None)
        if not self.nan_guard:
            self.optimizer.step()
            return
        grad_norm = total_grad_norm((p for _, p in self._named_params), clip_norm_type or 2.0)
        check_gradients_finite(grad_norm, self.iter, self._named_params)
        if clip_norm_type is None:
            self.optimizer.step()
        else:
            self.optimizer.step(grad_norm=grad_norm)

    def reset_data_loader(self) -> None:
        """Start a new iterator over the data loader (after its sampler was moved to the resumed position)."""
        self._data_loader_iter = None  # let the old workers shut down first
        self._data_loader_iter = iter(self.data_loader)

    def run_step(self) -> None:
        assert self.model.training, "[MaskFormerTrainLoop] model was changed to eval mode!"
        if self.seed is not None:
            seed_everything(iteration_seed(self.seed, self.iter, comm.get_rank()))
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(
            self.device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        if self.nan_guard:
            check_losses_finite(loss_dict, self.iter)
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        # One device->host copy for all loss terms; detectron2's writer would .cpu().item() each term separately
        # (a sync per term, ~30 for Mask2Former with its auxiliary losses).
        host_losses = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()]).cpu()
        self._write_metrics(dict(zip(loss_dict, host_losses.unbind())), data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self._optimizer_step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
