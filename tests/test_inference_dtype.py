"""MODEL.MASK_FORMER.TEST.DTYPE: bfloat16 inference on the CPU (backbone and transformer decoder under autocast, our
bf16 NA kernels, post-processing in float32), float32 by default, honoured by the predictor; training unaffected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import train_helpers
from detectron2.modeling import build_model
from torch.utils._python_dispatch import TorchDispatchMode

from dinat_m2f import Predictor
from dinat_m2f.config import load_config


class RecordDtypes(TorchDispatchMode):
    """(op name, dtype of its first floating-point tensor argument) of every op below autocast."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        if flat:
            self.calls.append((f"{func.namespace}::{func.__name__.split('.')[0]}", flat[0].dtype))
        return func(*args, **(kwargs or {}))

    def dtypes(self, name: str) -> set[torch.dtype]:
        return {dtype for op, dtype in self.calls if op == name}


def tiny_model(*opts: str):
    cfg = load_config(train_helpers.DEMO_CONFIG, [*train_helpers.TINY_OPTS, "MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def image_input(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, 64, 80, generator=g) * 255, "height": 64, "width": 80}]


def run(model, inputs) -> tuple[dict, RecordDtypes]:
    # no_grad, not inference_mode: under inference_mode a dispatch mode receives einsum undecomposed, below autocast
    with torch.no_grad(), RecordDtypes() as rec:
        out = model(inputs)[0]
    return out, rec


def test_default_is_float32_without_autocast():
    model = tiny_model()
    assert model.inference_dtype is None
    out, rec = run(model, image_input())
    assert {dtype for _, dtype in rec.calls} <= {torch.float32, torch.float64}
    assert out["sem_seg"].dtype == torch.float32


def output_dtypes(model, inputs, train: bool = False) -> dict[str, torch.dtype]:
    """The output dtype of some pixel-decoder modules in one forward (training: a loss, under bf16 autocast)."""
    layer = model.sem_seg_head.pixel_decoder.transformer.encoder.layers[0]
    modules = {
        "value_proj": layer.self_attn.value_proj,
        "sampling_offsets": layer.self_attn.sampling_offsets,
        "linear1": layer.linear1,
        "output_proj": layer.self_attn.output_proj,
    }
    seen: dict[str, torch.dtype] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            seen.setdefault(name, output.dtype)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    # the attention weights come from the module's own product (its projection's rows reordered), not its forward
    attn = layer.self_attn
    attention_weights = attn._attention_weights

    def recorded_attention_weights(query: torch.Tensor) -> torch.Tensor:
        out = attention_weights(query)
        seen.setdefault("attention_weights", out.dtype)
        return out

    attn._attention_weights = recorded_attention_weights
    try:
        if train:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(inputs)
        else:
            run(model, inputs)
    finally:
        for h in handles:
            h.remove()
        del attn._attention_weights  # the class's method again
    return seen


def test_bfloat16_runs_the_network_in_bfloat16_with_the_bf16_na_kernels():
    model = tiny_model("MODEL.MASK_FORMER.TEST.DTYPE", "bfloat16")
    assert model.inference_dtype == torch.bfloat16
    out, rec = run(model, image_input())
    na_ops = {op for op, _ in rec.calls if op.startswith("dinat_m2f::na")}
    assert na_ops, "no NA op ran"
    for op in na_ops:  # the backbone's attention: our bf16 kernels
        assert rec.dtypes(op) == {torch.bfloat16}, op
    assert torch.bfloat16 in rec.dtypes("aten::addmm")  # the Linears (backbone, decoder)
    assert torch.bfloat16 in rec.dtypes("aten::convolution")  # the patch embedding
    # the pixel decoder's projections and FFN in bf16, its deformable sampling in float32
    assert rec.dtypes("dinat_m2f::ms_deform_attn_forward") == {torch.float32}
    assert output_dtypes(model, image_input()) == {
        "value_proj": torch.bfloat16,
        "sampling_offsets": torch.float32,
        "attention_weights": torch.float32,
        "output_proj": torch.bfloat16,
        "linear1": torch.bfloat16,
    }
    # post-processing in float32: the outputs are float32 whatever the network ran in
    assert out["sem_seg"].dtype == torch.float32 and out["instances"].scores.dtype == torch.float32


def test_bfloat16_outputs_are_close_to_float32():
    """Same weights and images: class scores within 0.02 (bf16 keeps 8 bits of mantissa; seen: at most 0.0054 on
    these images) and the predicted class of at least 99% of the pixels unchanged (seen: all)."""
    full = tiny_model()
    half = tiny_model("MODEL.MASK_FORMER.TEST.DTYPE", "bfloat16")
    half.load_state_dict(full.state_dict())
    for seed in range(3):
        want, _ = run(full, image_input(seed))
        got, _ = run(half, image_input(seed))
        assert not torch.equal(got["sem_seg"], want["sem_seg"])  # it did run in another precision
        torch.testing.assert_close(got["sem_seg"], want["sem_seg"], atol=0.02, rtol=0)
        same = (got["sem_seg"].argmax(0) == want["sem_seg"].argmax(0)).float().mean().item()
        assert same >= 0.99, same


def test_training_ignores_the_inference_dtype():
    model = tiny_model("MODEL.MASK_FORMER.TEST.DTYPE", "bfloat16").train()
    from detectron2.structures import Instances

    inst = Instances((64, 80))
    masks = torch.zeros(1, 64, 80, dtype=torch.bool)
    masks[0, :32] = True
    inst.gt_masks, inst.gt_classes = masks, torch.tensor([1])
    with RecordDtypes() as rec:
        losses = model([{**image_input()[0], "instances": inst}])
    assert {dtype for _, dtype in rec.calls} <= {torch.float32, torch.float64}
    assert all(v.dtype == torch.float32 for v in losses.values())
    # and under training's own autocast (SOLVER.AMP) the pixel decoder stays float32, as in the official code
    batch = [{**image_input()[0], "instances": inst}]
    assert set(output_dtypes(model, batch, train=True).values()) == {torch.float32}


def test_bad_dtypes_are_config_errors():
    with pytest.raises(ValueError, match=r"MODEL.MASK_FORMER.TEST.DTYPE must be one of .*'int8'"):
        tiny_model("MODEL.MASK_FORMER.TEST.DTYPE", "int8")
    with pytest.raises(ValueError, match="float16 runs on CUDA only"):
        tiny_model("MODEL.MASK_FORMER.TEST.DTYPE", "float16")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from dinat_m2f.engine import AtomicCheckpointer

    folder = tmp_path_factory.mktemp("dtype")
    AtomicCheckpointer(tiny_model(), save_dir=str(folder)).save("tiny")
    return str(folder / "tiny.pth")


def test_predictor_takes_the_config_dtype_unless_told_otherwise(weights):
    opts = [*train_helpers.TINY_OPTS, "MODEL.MASK_FORMER.TEST.DTYPE", "bfloat16"]
    from_config = Predictor(train_helpers.DEMO_CONFIG, weights=weights, device="cpu", opts=opts)
    assert from_config.dtype == from_config.model.inference_dtype == torch.bfloat16
    told = Predictor(train_helpers.DEMO_CONFIG, weights=weights, device="cpu", dtype="float32", opts=opts)
    assert told.dtype is None and told.model.inference_dtype is None
    default = Predictor(train_helpers.DEMO_CONFIG, weights=weights, device="cpu", opts=train_helpers.TINY_OPTS)
    assert default.model.inference_dtype is None
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    full = told(image).raw["sem_seg"]
    half = from_config(image).raw["sem_seg"]
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)


class RecordCastsOf(TorchDispatchMode):
    """How many times a tensor whose storage is one of ``data_ptrs`` is cast (aten::_to_copy)."""

    def __init__(self, data_ptrs: set[int]):
        super().__init__()
        self.data_ptrs, self.casts = data_ptrs, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.data_ptrs:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_weights_are_cast_once_and_again_only_after_an_update(monkeypatch):
    """The bf16 copies of the weights give autocast's own results bit for bit, spare its casts at every forward,
    and follow in-place updates of the float32 parameters."""
    import contextlib

    model = tiny_model("MODEL.MASK_FORMER.TEST.DTYPE", "bfloat16")
    weights = {p.data_ptr() for m, n in model._low_precision_weights.slots(model) for p in [getattr(m, n)]}
    inputs = image_input()
    first, _ = run(model, inputs)  # makes the copies
    with RecordCastsOf(weights) as rec:
        again, _ = run(model, inputs)
    assert rec.casts == 0
    with monkeypatch.context() as m:  # plain autocast: every weight cast at its op
        m.setattr(model._low_precision_weights, "swapped_in", lambda *a: contextlib.nullcontext())
        with RecordCastsOf(weights) as rec:
            plain, _ = run(model, inputs)
        assert rec.casts >= len(weights)
        assert torch.equal(again["sem_seg"], plain["sem_seg"]) and torch.equal(first["sem_seg"], plain["sem_seg"])
        with torch.no_grad():
            model.sem_seg_head.predictor.class_embed.weight.mul_(3.0)
        plain_updated, _ = run(model, inputs)
    updated, _ = run(model, inputs)
    assert torch.equal(updated["sem_seg"], plain_updated["sem_seg"])
    assert not torch.equal(updated["sem_seg"], plain["sem_seg"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model's own parameters untouched


def test_bfloat16_on_a_cpu_without_fast_bfloat16_warns(monkeypatch):
    """On the AVX2 path the bf16 matrix products and convolutions are many times slower than float32: a warning
    that says so and suggests float32."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match=r"without AVX-512 bfloat16 instructions.*capability: AVX2.*Use float32"):
        tiny_model("MODEL.MASK_FORMER.TEST.DTYPE", "bfloat16")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model()  # float32: no warning
