"""The training machinery on toy models: optimizer rules, clipping, schedules, NaN guard, atomic checkpoints, sampler."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import train_helpers
from torch import nn

from dinat_m2f.config import get_cfg
from dinat_m2f.engine import (
    AtomicCheckpointer,
    MaskFormerTrainLoop,
    MissingWeightsError,
    NonFiniteLossError,
    ResumableTrainingSampler,
    adamw_can_fuse,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    param_hyperparams,
    resolve_amp_dtype,
    train_loop,
)


class ToyNA(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.rpb = nn.Parameter(torch.zeros(2, 3, 3))


class ToyModel(nn.Module):
    """Names like the real model: backbone.* with norms and rpb, a head with embeddings and GroupNorm."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.attn = ToyNA()
        self.backbone.norm0 = nn.LayerNorm(4)
        self.sem_seg_head = nn.Module()
        self.sem_seg_head.query_feat = nn.Embedding(5, 4)
        self.sem_seg_head.gn = nn.GroupNorm(2, 4)
        self.sem_seg_head.proj = nn.Linear(4, 4)
        self.sem_seg_head.level_embed = nn.Parameter(torch.zeros(3, 4))


def _cfg(**solver):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _table(cfg):
    return {name: (lr, wd) for name, _, lr, wd in param_hyperparams(cfg, ToyModel())}


def test_param_rules_follow_mask2former():
    t = _table(_cfg())
    assert t["backbone.attn.qkv.weight"] == pytest.approx((1e-4, 0.05))  # backbone LR x 0.1
    assert t["backbone.norm0.weight"] == pytest.approx((1e-4, 0.0))  # norms: WEIGHT_DECAY_NORM = 0
    assert t["sem_seg_head.query_feat.weight"] == pytest.approx((1e-3, 0.0))  # embeddings: WEIGHT_DECAY_EMBED
    assert t["sem_seg_head.gn.bias"] == pytest.approx((1e-3, 0.0))
    assert t["sem_seg_head.proj.weight"] == pytest.approx((1e-3, 0.05))
    assert t["sem_seg_head.level_embed"] == pytest.approx((1e-3, 0.05))  # a bare Parameter keeps wd, as in M2F
    # rpb: decayed like any weight by default (the paper's Mask2Former code) ...
    assert t["backbone.attn.rpb"] == pytest.approx((1e-4, 0.05))


def test_rpb_weight_decay_switch():
    assert _table(_cfg(RPB_WEIGHT_DECAY=0.0))["backbone.attn.rpb"] == pytest.approx((1e-4, 0.0))
    assert _table(_cfg(RPB_WEIGHT_DECAY=0.01))["backbone.attn.rpb"] == pytest.approx((1e-4, 0.01))


def test_optimizer_groups_cover_each_param_once():
    model = ToyModel()
    opt = build_optimizer(_cfg(), model)
    assert isinstance(opt, torch.optim.AdamW)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))


def test_adamw_is_fused_with_the_for_loop_update():
    cfg = _cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    torch.manual_seed(0)
    model, reference = ToyModel(), ToyModel()
    reference.load_state_dict(model.state_dict())
    initial = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(cfg, model)
    assert all(g["fused"] for g in opt.param_groups)
    # the same groups and clipping, the for-loop AdamW
    plain = build_param_groups(cfg, reference)
    ref_opt = torch.optim.AdamW(plain, cfg.SOLVER.BASE_LR, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_([q for group in plain for q in group["params"]], 0.01)  # in group order
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)  # the same formula, float32 rounding apart (1 ulp seen)
    assert not any(torch.equal(p, p0) for p, p0 in zip(model.parameters(), initial))


def test_adamw_fuses_only_floating_parameters_on_the_cpu():
    assert adamw_can_fuse([torch.zeros(2), torch.zeros(3, dtype=torch.float64)])
    assert not adamw_can_fuse([])
    assert not adamw_can_fuse([torch.zeros(2, dtype=torch.int64)])
    assert not adamw_can_fuse([torch.zeros(2), torch.zeros(2, device="meta")])

    class CudaParameter:  # a float parameter on CUDA, without a GPU
        device = torch.device("cuda")

        def is_floating_point(self) -> bool:
            return True

    # not on CUDA: a float16 GradScaler would hand the gradient clipping scaled gradients (optimizer.py's comment)
    assert not adamw_can_fuse([CudaParameter()])


def test_full_model_gradient_clipping():
    cfg = _cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    model = ToyModel().double()  # float64 so the tiny update is measured exactly
    opt = build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    # SGD step = lr * clipped grad; the clipped gradient of ALL params together has norm 0.01
    deltas = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert torch.linalg.vector_norm(deltas).item() == pytest.approx(1e-3 * 0.01, rel=1e-4)


def test_unknown_optimizer_and_scheduler_are_errors():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(_cfg(OPTIMIZER="LION"), ToyModel())
    opt = build_optimizer(_cfg(), ToyModel())
    with pytest.raises(ValueError, match="SOLVER.LR_SCHEDULER_NAME"):
        build_lr_scheduler(_cfg(LR_SCHEDULER_NAME="Cyclic"), opt)


def _lr_factors(cfg, model, iters: int) -> list[float]:
    """The scheduled learning rate over the base one at each of the first ``iters`` iterations."""
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    factors = []
    for _ in range(iters):
        factors.append(opt.param_groups[0]["lr"] / opt.param_groups[0]["initial_lr"])
        opt.step()
        sched.step()
    return factors


def test_poly_and_multistep_schedules():
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupPolyLR", MAX_ITER=100, WARMUP_ITERS=0, POLY_LR_POWER=0.9)
    model = ToyModel()
    lrs = _lr_factors(cfg, model, 50)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[49] == pytest.approx((1 - 49 / 100) ** 0.9, rel=1e-5)

    cfg = _cfg(LR_SCHEDULER_NAME="WarmupMultiStepLR", MAX_ITER=100, STEPS=(10, 20), WARMUP_ITERS=0, GAMMA=0.1)
    factors = _lr_factors(cfg, model, 25)
    assert factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(0.1) and factors[20] == pytest.approx(0.01)


class LossModel(nn.Module):
    """Returns two loss terms; ``loss_b`` is NaN at the iteration given."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, batch):
        loss_b = (self.w * batch).sum() ** 2
        if self.calls == self.nan_at:
            loss_b = loss_b * float("nan")
        self.calls += 1
        return {"loss_a": self.w.abs().sum(), "loss_b": loss_b}


def test_nan_guard_names_iteration_and_term_and_skips_the_step():
    model = LossModel(nan_at=3)
    loader = itertools.repeat(torch.ones(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loop = MaskFormerTrainLoop(model, loader, opt)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: loss_b=nan") as info:
        train_helpers.run_loop(loop, 10)
    assert "loss_a" not in str(info.value)
    assert torch.isfinite(model.w).all()  # the NaN never reached the weights


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_amp_dtype_resolution(monkeypatch, fast_bf16):
    """SOLVER.AMP.DTYPE auto on the CPU: bfloat16 where the CPU has fast bfloat16 (AVX512_BF16), float32 (None: no autocast)
    where bfloat16 autocast would only be slower; an explicit bfloat16 there is kept, with a warning."""
    monkeypatch.setattr(train_loop, "cpu_has_fast_bfloat16", lambda: fast_bf16)
    assert resolve_amp_dtype("auto", "cpu") is (torch.bfloat16 if fast_bf16 else None)
    assert resolve_amp_dtype("auto", "cuda") is torch.float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_amp_dtype("bfloat16", "cpu") is torch.bfloat16
        assert resolve_amp_dtype("bfloat16", "cuda") is torch.bfloat16
    assert [str(w.message).split(" on a CPU")[0] for w in caught] == (
        [] if fast_bf16 else ["SOLVER.AMP.DTYPE bfloat16"]
    )
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE"):
        resolve_amp_dtype("float8", "cpu")


def test_bfloat16_amp_on_cpu_runs_the_model_in_bfloat16():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, batch):
            out = self.lin(batch)
            seen["dtype"] = out.dtype
            return {"loss": out.float().pow(2).mean()}

    model = Probe()
    loop = MaskFormerTrainLoop(
        model, itertools.repeat(torch.ones(2, 3)), torch.optim.SGD(model.parameters(), 0.1), amp_dtype=torch.bfloat16
    )
    train_helpers.run_loop(loop, 1)
    assert seen["dtype"] is torch.bfloat16
    assert model.lin.weight.dtype is torch.float32


def test_missing_weights_file_is_a_clear_error(tmp_path):
    ckpt = AtomicCheckpointer(ToyModel(), save_dir=str(tmp_path))
    with pytest.raises(MissingWeightsError, match="weights file not found.*nope.pth"):
        ckpt.load(str(tmp_path / "nope.pth"))


def test_checkpoint_roundtrip_and_no_temp_files(tmp_path):
    model = ToyModel()
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000009", iteration=9)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    other = ToyModel()
    extra = AtomicCheckpointer(other, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_kill_during_save_leaves_previous_checkpoint_intact(tmp_path):
    """SIGKILL a process in the middle of writing a big checkpoint: the last complete one stays loadable."""
    script = textwrap.dedent(
        f"""
        import torch, sys
        from torch import nn
        from dinat_m2f.engine import AtomicCheckpointer
        m = nn.Linear(4, 4)
        c = AtomicCheckpointer(m, save_dir={str(tmp_path)!r})
        c.save("model_0000001", iteration=1)
        print("first", flush=True)
        big = nn.Linear(4096, 4096)  # ~64 MB: the save below takes a while
        c2 = AtomicCheckpointer(big, save_dir={str(tmp_path)!r})
        orig = torch.save
        def slow_save(obj, f, *a, **k):
            print("saving", flush=True)
            import time; time.sleep(30)
            orig(obj, f, *a, **k)
        torch.save = slow_save
        c2.save("model_0000002", iteration=2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        assert proc.stdout.readline().strip() == "saving"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    names = sorted(os.listdir(tmp_path))
    assert "model_0000002.pth" not in names
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    extra = AtomicCheckpointer(nn.Linear(4, 4), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1


def test_resumable_sampler_continues_the_same_stream():
    full = list(itertools.islice(iter(ResumableTrainingSampler(7, seed=3)), 40))
    resumed = ResumableTrainingSampler(7, seed=3)
    resumed.start = 15
    assert list(itertools.islice(iter(resumed), 25)) == full[15:]
    pos = ResumableTrainingSampler(7, seed=3, yield_position=True)
    pos.start = 15
    keys = list(itertools.islice(iter(pos), 5))
    assert [k % 7 for k in keys] == full[15:20] and [k // 7 for k in keys] == list(range(15, 20))
    with pytest.raises(ValueError, match="empty"):
        ResumableTrainingSampler(0)


def test_prediction_guard_names_the_prediction_and_its_loss_terms():
    from dinat_m2f.engine.hooks import install_prediction_guard

    class Head(nn.Module):
        def forward(self, x):
            masks = torch.zeros(1, 2, 4, 4)
            masks[0, 1, 2, 2] = float("inf")
            return {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": masks, "aux_outputs": []}

    model = nn.Module()
    model.sem_seg_head = Head()
    assert install_prediction_guard(model, lambda: 12)
    with pytest.raises(NonFiniteLossError, match=r"iteration 12: pred_masks \(1 values\).*loss_mask, loss_dice"):
        model.sem_seg_head(None)
    model.eval()
    model.sem_seg_head(None)  # inference is not guarded


def test_rules_hit_the_real_model_parameters():
    """On the real DiNAT-Mask2Former: every rpb is found, embeddings and norms are not decayed, the backbone is x0.1."""
    from detectron2.modeling import build_model

    from dinat_m2f.config import load_config

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "ade20k",
                          "semantic-segmentation", "dinat", "maskformer2_dinat_mini_bs16_160k.yaml")  # fmt: skip
    cfg = load_config(config, ["MODEL.DEVICE", "meta", "SOLVER.RPB_WEIGHT_DECAY", "0.0"])
    with torch.device("meta"):
        model = build_model(cfg)
    table = {name: (lr, wd) for name, _, lr, wd in param_hyperparams(cfg, model)}
    rpbs = [n for n in table if n.endswith(".rpb")]
    assert len(rpbs) == sum(cfg.MODEL.DINAT.DEPTHS)  # one per NA layer
    assert all(table[n] == (1e-5, 0.0) for n in rpbs)
    for name in ("sem_seg_head.predictor.query_feat.weight", "sem_seg_head.predictor.query_embed.weight"):
        assert table[name] == (1e-4, 0.0)
    assert all(wd == 0.0 for n, (_, wd) in table.items() if ".norm" in n and n.startswith("backbone."))
    assert all(lr == 1e-5 for n, (lr, _) in table.items() if n.startswith("backbone."))
    assert all(lr == 1e-4 for n, (lr, _) in table.items() if n.startswith("sem_seg_head."))
