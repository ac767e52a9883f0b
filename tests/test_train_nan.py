"""A run whose loss or gradient becomes NaN/inf stops at once, naming the iteration and the loss term(s) or the
parameter, before the optimizer step; no checkpoint ever holds non-finite weights."""

from __future__ import annotations

import itertools
import os
import re

import pytest
import torch
import train_helpers
from detectron2.engine import HookBase
from torch import nn

from dinat_m2f.engine import NonFiniteLossError


def test_diverging_run_stops_naming_iteration_and_term(tmp_path):
    import train_net

    train_helpers.make_tiny_dataset(str(tmp_path / "datasets"))
    argv = ["--config-file", train_helpers.DEMO_CONFIG, *train_helpers.TINY_OPTS]
    # An absurd learning rate without clipping: the first step blows the weights up, the next loss is not finite.
    argv += ["SOLVER.BASE_LR", "1e8", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CLIP_GRADIENTS.ENABLED", "False"]
    argv += ["SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(NonFiniteLossError) as info:
        train_net.main(train_net.argument_parser().parse_args(argv))
    message = str(info.value)
    match = re.search(r"non-finite (?:loss|predictions) at iteration (\d+): ", message)
    assert match, message
    assert int(match.group(1)) >= 1  # iteration 0 was finite: the guard names the one that was not
    assert re.search(r"loss_(ce|mask|dice)", message), message  # names the loss term(s) affected
    assert not (tmp_path / "out" / "model_final.pth").exists()


# ---- non-finite gradients (finite losses) ---------------------------------------------------------------------


class NaNGradModel(nn.Module):
    """Finite losses; from iteration ``nan_at`` on, the gradient of ``head.b`` is NaN (``a`` stays finite)."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.a = nn.Parameter(torch.ones(3))
        self.head = nn.Module()
        self.head.b = nn.Parameter(torch.ones(3))
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, batch):
        b = self.head.b
        if self.calls >= self.nan_at:
            b = _nan_gradient(b)
        self.calls += 1
        return {"loss_a": (self.a * batch).sum() ** 2, "loss_b": (b * batch).sum()}


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_gradient(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, NaN gradient backward."""
    return _NaNBackward.apply(x)


def _sgd_cfg(clip: bool):
    from dinat_m2f.config import get_cfg

    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = clip
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    return cfg


@pytest.mark.parametrize("clip", [False, True], ids=["no-clipping", "full-model-clipping"])
def test_nan_gradient_stops_before_the_step_naming_iteration_and_parameter(clip):
    from dinat_m2f.engine import MaskFormerTrainLoop, NonFiniteGradientError, build_optimizer

    model = NaNGradModel(nan_at=3)
    loop = MaskFormerTrainLoop(model, itertools.repeat(torch.ones(3)), build_optimizer(_sgd_cfg(clip), model))
    snapshot = {}

    class Snapshot:  # the weights after iteration 2's step
        def __call__(self, *_):
            if loop.iter == 2:
                snapshot.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    loop.optimizer.register_step_post_hook(Snapshot())
    with pytest.raises(NonFiniteGradientError, match=r"iteration 3: first in the gradient of head\.b \(3 NaN"):
        train_helpers.run_loop(loop, 10)
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, snapshot[name]), f"{name} changed: the step of iteration 3 was taken"


def test_full_model_clipping_reuses_the_guards_norm(monkeypatch):
    """One gradient norm per step: the NaN guard computes it, full-model clipping takes it."""
    from dinat_m2f.engine import MaskFormerTrainLoop, build_optimizer
    from dinat_m2f.engine import optimizer as optimizer_module

    calls = []
    original = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = NaNGradModel(nan_at=100)
    loop = MaskFormerTrainLoop(model, itertools.repeat(torch.ones(3)), build_optimizer(_sgd_cfg(True), model))
    train_helpers.run_loop(loop, 3)
    assert len(calls) == 3
    # and the clipped step is the one clip_grad_norm_ gives
    reference = NaNGradModel(nan_at=100)
    opt = torch.optim.SGD(reference.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        sum(reference(torch.ones(3)).values()).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7), name
    assert optimizer_module.total_grad_norm([]).item() == 0.0


class _InjectNaNGradient(HookBase):
    """From iteration ``at`` on, the gradient of the first backbone parameter is NaN (the losses stay finite)."""

    def __init__(self, at: int):
        self.at = at
        self.handle = None

    def before_step(self):
        if self.trainer.iter == self.at:
            model = self.trainer.model
            param = next((model.module if hasattr(model, "module") else model).backbone.parameters())
            self.handle = param.register_hook(lambda g: g * float("nan"))


def test_nan_gradient_never_reaches_a_checkpoint(tmp_path):
    """Checkpoint every iteration; NaN gradients at iteration 2: training stops there naming it, no checkpoint of
    iteration 2 exists, and last_checkpoint points to iteration 1's, whose weights are finite."""
    import train_net
    from dinat_m2f.engine import NonFiniteGradientError

    train_helpers.make_tiny_dataset(str(tmp_path / "datasets"))
    out = tmp_path / "out"
    argv = ["--config-file", train_helpers.DEMO_CONFIG, *train_helpers.TINY_OPTS]
    argv += ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(out)]
    trainer = train_net.Trainer(train_net.setup(train_net.argument_parser().parse_args(argv)))
    trainer.register_hooks([_InjectNaNGradient(at=2)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(NonFiniteGradientError, match=r"iteration 2: first in the gradient of backbone\."):
        trainer.train()
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000000.pth", "model_0000001.pth"]
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    weights = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_checkpointer_refuses_non_finite_weights(tmp_path):
    """Finite gradients can still step weights to inf: the checkpoint hook then refuses to save."""
    from dinat_m2f.engine import AtomicCheckpointer, FiniteWeightsPeriodicCheckpointer, NonFiniteWeightsError

    model = NaNGradModel(nan_at=100)
    hook = FiniteWeightsPeriodicCheckpointer(AtomicCheckpointer(model, str(tmp_path)), period=1, max_iter=10)
    hook.step(0)
    with torch.no_grad():
        model.head.b[1] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"iteration 1 \(head\.b holds 1 NaN/inf"):
        hook.step(1)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"


def _two_worker_nan_on_rank1(out_dir: str) -> None:
    """A worker of test_all_workers_stop: a plain (non-DDP) loop whose gradient is NaN only on rank 1."""
    from detectron2.utils import comm

    from dinat_m2f.engine import MaskFormerTrainLoop, NonFiniteGradientError

    rank = comm.get_rank()
    model = NaNGradModel(nan_at=2 if rank == 1 else 100)
    loop = MaskFormerTrainLoop(model, itertools.repeat(torch.ones(3)), torch.optim.SGD(model.parameters(), lr=0.01))
    try:
        train_helpers.run_loop(loop, 5)
        outcome = "finished"
    except NonFiniteGradientError as e:
        outcome = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    comm.synchronize()


@pytest.mark.slow
def test_all_workers_stop_when_one_has_a_nan_gradient(tmp_path):
    from dinat_m2f.engine import launch

    launch(_two_worker_nan_on_rank1, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert "iteration 2 on worker(s) [1]" in r0 and "the gradients of this worker are finite" in r0, r0
    assert "iteration 2 on worker(s) [1]: first in the gradient of head.b" in r1, r1
