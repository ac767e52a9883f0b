"""The bfloat16 fused forward and backward from saved weights on the CPU (native/na/na_fused_bf16_cpu_isa.h): bf16
q/k/v read in place, float32 logits/softmax/accumulation, bf16 outputs, float32 logsumexp and saved weights.

Checked on every kernel path this CPU has: AVX-512 with the AVX512_BF16 instructions (vdpbf16ps logits), AVX-512
without them (DINAT_M2F_CPU_BF16=off) and AVX2 (DINAT_M2F_CPU_ISA=avx2), against float64 math on the same
bf16-rounded inputs (the bf16 tolerances of tests/test_na_ops.py) and, tighter, against the float32 kernel on the
upcast inputs: the two differ by the output's bf16 rounding only.
"""

from __future__ import annotations

import pytest
import torch

import dinat_m2f
from dinat_m2f import ops
from dinat_m2f.ops import na as _na  # noqa: F401  (loads the extension, registers the ops)
from dinat_m2f.ops import reference as ref

ISA_ENV = "DINAT_M2F_CPU_ISA"
BF16_ENV = "DINAT_M2F_CPU_BF16"
# tests/test_na_ops.py's bf16 tolerance against float64 math (test_low_precision_within_tolerance).
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
# Against the float32 kernel on the same (upcast) inputs: one bf16 rounding of the output (relative 2^-8, up to one
# ulp 2^-7 where the float32 results round apart) and float32 summation-order differences.
ROUNDING_TOL = dict(rtol=2**-7, atol=1e-5)


def _paths() -> list:
    info = dinat_m2f.build_info()
    has_avx512 = "avx512" in info["cpu_isas_supported"]
    has_bf16 = bool(info["cpu_has_avx512_bf16"])
    skip_avx512 = pytest.mark.skipif(not has_avx512, reason="this CPU lacks AVX-512")
    skip_bf16 = pytest.mark.skipif(not has_bf16, reason="this CPU lacks AVX512_BF16")
    return [
        pytest.param(("avx512", "on"), marks=[skip_avx512, skip_bf16], id="avx512-bf16dot"),
        pytest.param(("avx512", "off"), marks=skip_avx512, id="avx512-nobf16"),
        pytest.param(("avx2", "auto"), id="avx2"),
    ]


@pytest.fixture(params=_paths())
def path(request, monkeypatch):
    isa, bf16 = request.param
    monkeypatch.setenv(ISA_ENV, isa)
    monkeypatch.setenv(BF16_ENV, bf16)
    info = dinat_m2f.build_info()
    assert info["cpu_isa"] == isa
    assert info["cpu_bf16_dot"] == (bf16 == "on")
    return request.param


# (dims, kernel, dilation, spatial shape): borders on every side, odd and even sizes, every dilation from 1 to
# "each window is its whole group", maps smaller than 2 windows, DiNAT's 7x7 stage-4 map.
CASES = [
    (2, 5, 2, (13, 17)),
    (2, 7, 1, (21, 40)),
    (2, 5, 3, (24, 33)),
    (2, 3, 2, (9, 70)),
    (2, 7, 1, (7, 7)),
    (2, 7, 8, (56, 56)),
    (2, 3, 4, (15, 13)),
    (1, 7, 3, (23,)),
    (1, 5, 1, (9,)),
]
# The forward's query tiles (kLanes queries per vector: 16 on the AVX-512 paths, 8 on AVX2), reached on every path:
# - interior tiles (a row's windows not clamped along W, more than a quarter tile of them in a dilation group):
#   several groups, a row's last interior queries as a partial tile or (two or fewer) one by one, a group whose
#   interior is shorter than a tile (14x14 k7 on AVX-512), window widths that are not a multiple of the tile's 8-key
#   runs (3, 5, 7, 9, 11), 1D;
# - whole-group tiles (every window is its whole dilation group): a group's last tile partial (5x5, 3x3, 7 in 1D).
# CASES' (21, 40) k7 d1 and (9, 70) k3 d2 have interior tiles too, (7, 7) k7 d1 and (56, 56) k7 d8 whole groups.
TILE_CASES = [
    (2, 5, 1, (6, 30)),
    (2, 3, 2, (6, 47)),
    (2, 11, 1, (13, 40)),
    (2, 7, 1, (14, 14)),
    (1, 9, 2, (61,)),
    (2, 5, 2, (10, 10)),
    (2, 3, 5, (15, 15)),
    (1, 7, 3, (21,)),
]
# The backward's whole-group path (every window is its whole dilation group: maps of k * d): 1D and 2D, d 1 to 4,
# groups of kh kw queries that are not whole tiles (9, 25, 49 slots; 3, 5, 7 in 1D) and one smaller than a tile.
# CASES' (7, 7) k7 d1 and (56, 56) k7 d8 are whole groups too.
WHOLE_GROUP_CASES = [
    (2, 3, 1, (3, 3)),
    (2, 5, 2, (10, 10)),
    (2, 3, 3, (9, 9)),
    (2, 7, 4, (28, 28)),
    (2, 7, 2, (14, 14)),
    (1, 7, 3, (21,)),
    (1, 5, 4, (20,)),
    (1, 3, 1, (3,)),
]
# 32: DiNAT's head dim (vdpbf16ps logits); 48: a multiple of 16 that is not compiled in; 12: not a multiple of 16
# (the float32 logits of the AVX512_BF16 variant too), nor of the vector width.
HEAD_DIMS = [32, 48, 12]


def _fused(dims: int, saves_attn: bool):
    name = f"na{dims}d_fused_forward" + ("_with_attn" if saves_attn else "")
    return getattr(torch.ops.dinat_m2f, name)


def _tokens(shape, dim, heads_last: bool, g: torch.Generator) -> torch.Tensor:
    """bf16 [B, heads, *shape, dim]; heads_last: a strided view of [B, *shape, heads, dim] memory (as the packed qkv
    projection output gives), which the kernel must read in place."""
    batch, heads = 2, 3
    if heads_last:
        x = torch.randn(batch, *shape, heads, dim, generator=g).to(torch.bfloat16)
        return x.movedim(-2, 1)
    return torch.randn(batch, heads, *shape, dim, generator=g).to(torch.bfloat16)


def _reference(q, k, v, kernel, dilation, rpb, scale, dims):
    """float64 out, logsumexp and weights on the bf16 inputs."""
    q64, k64, v64, rpb64 = (t.double() for t in (q, k, v, rpb))
    qk = ref.na2d_qk if dims == 2 else ref.na1d_qk
    av = ref.na2d_av if dims == 2 else ref.na1d_av
    logits = qk(q64 * scale, k64, kernel, dilation, rpb64)
    attn = logits.softmax(-1)
    return av(attn, v64, kernel, dilation), logits.logsumexp(-1), attn


@pytest.mark.parametrize("saves_attn", [False, True], ids=["lse", "attn"])
@pytest.mark.parametrize("heads_last", [False, True], ids=["contig", "headslast"])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize(("dims", "kernel", "dilation", "shape"), CASES + TILE_CASES)
def test_bf16_fused_forward_matches_float64(path, dims, kernel, dilation, shape, dim, heads_last, saves_attn):
    g = torch.Generator().manual_seed(kernel * 100 + dilation * 10 + dim)
    q, k, v = (_tokens(shape, dim, heads_last, g) for _ in range(3))
    rpb = torch.randn(3, *[2 * kernel - 1] * dims, generator=g).to(torch.bfloat16)
    scale = dim**-0.5
    out, second = _fused(dims, saves_attn)(q, k, v, rpb, kernel, dilation, scale)
    want, want_lse, want_attn = _reference(q, k, v, kernel, dilation, rpb, scale, dims)
    assert out.dtype == torch.bfloat16 and second.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, **BF16_TOL)
    if saves_attn:
        torch.testing.assert_close(second.double(), want_attn, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(second.double(), want_lse, rtol=1e-4, atol=1e-4)
    # The float32 kernel on the upcast inputs: bf16 rounding apart, no more.
    want32, second32 = _fused(dims, saves_attn)(q.float(), k.float(), v.float(), rpb.float(), kernel, dilation, scale)
    torch.testing.assert_close(out.float(), want32, **ROUNDING_TOL)
    torch.testing.assert_close(second, second32, rtol=1e-5, atol=1e-5)


# The inference forward of maps that are not whole groups on the AVX2 and AVX-512 paths takes float32's rows on
# widened slices where the slices split evenly over the threads, else the row blocks (saving the weights, widened
# slices on the AVX-512 path for windows of 81 keys or more: the k 11 cases); the
# AVX512_BF16 path hands it the inference maps where its row blocks would take no interior tile or a half-empty one
# (bf16_dot_forward_prefers_widened_slices: (16, 16) k11 d1, (40, 40) k11 d3, (15, 13) k3 d4, (12, 18) k11 d1) and
# keeps the others ((28, 28) k7 d1, (20, 20) k11 d1).
# Borders, odd sizes, dilation 1 to one short of whole groups.
WIDENED_CASES = [
    (11, 1, (16, 16)),
    (11, 3, (40, 40)),
    (3, 4, (15, 13)),
    (11, 1, (12, 18)),
    (7, 1, (28, 28)),
    (11, 1, (20, 20)),
    (5, 2, (13, 17)),
    (7, 1, (9, 31)),
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in one of the token layouts the widening reads: contiguous slices (one run per slice), rows of
    contiguous tokens a row stride apart (a view of wider rows: one run per row), or heads-last (token by token)."""
    if layout == "contig":
        return x.contiguous()
    if layout == "rows":
        wide = x.new_zeros(*x.shape[:-2], x.shape[-2] + 3, x.shape[-1])
        wide[..., : x.shape[-2], :] = x
        return wide[..., : x.shape[-2], :]
    return x.movedim(1, -2).contiguous().movedim(-2, 1)


@pytest.mark.parametrize("layout", ["contig", "rows", "headslast"])
@pytest.mark.parametrize("heads", [4, 3], ids=["slices", "rowblocks"])
@pytest.mark.parametrize("saves_attn", [False, True], ids=["lse", "attn"])
@pytest.mark.parametrize(("kernel", "dilation", "shape"), WIDENED_CASES)
def test_bf16_forward_widened_slices_and_row_blocks(path, kernel, dilation, shape, saves_attn, heads, layout):
    """With two threads 4 slices split evenly (in inference: widened slices on the AVX2 and AVX-512 paths), 3 do not
    (row blocks): out, logsumexp or weights against float64 math on the bf16 inputs and against the float32 kernel on the upcast
    inputs (one rounding of the output apart)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(kernel * 100 + dilation * 10 + heads)
        q, k, v = (_layout(torch.randn(1, heads, *shape, 32, generator=g).to(torch.bfloat16), layout) for _ in range(3))
        rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(torch.bfloat16)
        scale = 32**-0.5
        out, second = _fused(2, saves_attn)(q, k, v, rpb, kernel, dilation, scale)
        want, want_lse, want_attn = _reference(q, k, v, kernel, dilation, rpb, scale, 2)
        torch.testing.assert_close(out.double(), want, **BF16_TOL)
        if saves_attn:
            torch.testing.assert_close(second.double(), want_attn, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(second.double(), want_lse, rtol=1e-4, atol=1e-4)
        want32, second32 = _fused(2, saves_attn)(q.float(), k.float(), v.float(), rpb.float(), kernel, dilation, scale)
        torch.testing.assert_close(out.float(), want32, **ROUNDING_TOL)
        torch.testing.assert_close(second, second32, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_bf16_fused_forward_without_bias_and_special_values(path):
    """No rpb, and the output rounding keeps NaN a NaN and rounds half-way values to even (as torch's .to(bf16))."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (_tokens((11, 12), 32, False, g) for _ in range(3))
    out, lse = _fused(2, False)(q, k, v, None, 5, 2, 0.25)
    want, want_lse, _ = _reference(q, k, v, 5, 2, torch.zeros(3, 9, 9), 0.25, 2)
    torch.testing.assert_close(out.double(), want, **BF16_TOL)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-4, atol=1e-4)
    # v constant along the window: out = v exactly, so out's rounding is the rounding of these floats.
    halfway = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("nan")]).repeat(8)
    v_const = halfway.expand(2, 3, 11, 12, 32).to(torch.bfloat16)
    out_const, _ = _fused(2, False)(q, k, v_const, None, 5, 2, 0.25)
    assert torch.equal(out_const[..., :3].float(), v_const[..., :3].float())
    assert out_const[..., 3].isnan().all()


def test_bf16_override_is_honoured_and_loud_when_wrong(monkeypatch):
    info = dinat_m2f.build_info()
    monkeypatch.delenv(ISA_ENV, raising=False)
    monkeypatch.delenv(BF16_ENV, raising=False)
    has_bf16 = bool(info["cpu_has_avx512_bf16"])
    on_avx512 = dinat_m2f.build_info()["cpu_isa"] == "avx512"
    assert dinat_m2f.build_info()["cpu_bf16_dot"] == (has_bf16 and on_avx512)
    monkeypatch.setenv(BF16_ENV, "off")
    assert dinat_m2f.build_info()["cpu_bf16_dot"] is False
    q = torch.randn(1, 1, 7, 7, 32).to(torch.bfloat16)
    monkeypatch.setenv(BF16_ENV, "yes")
    with pytest.raises(RuntimeError, match="DINAT_M2F_CPU_BF16='yes' is not a choice.*on, off or auto"):
        _fused(2, False)(q, q, q, None, 3, 1, 1.0)
    monkeypatch.setenv(BF16_ENV, "on")
    if not has_bf16:
        with pytest.raises(RuntimeError, match="DINAT_M2F_CPU_BF16=on but this CPU lacks AVX512_BF16"):
            _fused(2, False)(q, q, q, None, 3, 1, 1.0)
        return
    assert dinat_m2f.build_info()["cpu_bf16_dot"] is True
    monkeypatch.setenv(ISA_ENV, "avx2")
    with pytest.raises(RuntimeError, match="DINAT_M2F_CPU_BF16=on needs the AVX-512 path"):
        _fused(2, False)(q, q, q, None, 3, 1, 1.0)


class _SavedBackwardCase:
    """bf16 q, k, v, dO and bias (3 heads, batch 2), the forward that saves the weights (out, attn) and the bf16
    backward from them (grads); seeded by the case and ``seed``."""

    def __init__(self, dims, kernel, dilation, shape, dim, heads_last, seed):
        g = torch.Generator().manual_seed(kernel * 100 + dilation * 10 + dim + seed)
        self.q, self.k, self.v, self.grad_out = (_tokens(shape, dim, heads_last, g) for _ in range(4))
        self.rpb = torch.randn(3, *[2 * kernel - 1] * dims, generator=g).to(torch.bfloat16)
        self.dims, self.kernel, self.dilation, self.scale = dims, kernel, dilation, dim**-0.5
        self.backward = getattr(torch.ops.dinat_m2f, f"na{dims}d_fused_backward_with_attn")
        tokens = (self.q, self.k, self.v, self.rpb, kernel, dilation, self.scale)
        self.out, self.attn = _fused(dims, True)(*tokens)
        self.grads = self.backward(self.grad_out, *tokens[:4], self.out, self.attn, *tokens[4:])

    def assert_near_float64_autograd(self):
        """The gradients within the bf16 tolerance of float64 autograd of the reference on the same bf16 inputs."""
        leaves = [t.double().requires_grad_() for t in (self.q, self.k, self.v, self.rpb)]
        want_out, _, _ = _reference(*leaves[:3], self.kernel, self.dilation, leaves[3], self.scale, self.dims)
        want = torch.autograd.grad(want_out, leaves, self.grad_out.double())
        for got, exp in zip(self.grads, want):
            torch.testing.assert_close(got.double(), exp, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("heads_last", [False, True], ids=["contig", "headslast"])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize(("dims", "kernel", "dilation", "shape"), CASES + WHOLE_GROUP_CASES)
def test_bf16_fused_backward_from_saved_weights(path, dims, kernel, dilation, shape, dim, heads_last):
    """Training's backward (ops.na*d on the CPU with grad: the forward saves the weights) in bf16: gradients within
    the bf16 tolerance of float64 autograd, and the float32 kernel's on the upcast inputs up to bf16 rounding."""
    c = _SavedBackwardCase(dims, kernel, dilation, shape, dim, heads_last, seed=1)
    assert all(t.dtype == torch.bfloat16 for t in c.grads)
    c.assert_near_float64_autograd()
    # The float32 kernel on the upcast inputs (and the float32 out and attn it saved).
    q32, k32, v32, go32, rpb32 = (t.float() for t in (c.q, c.k, c.v, c.grad_out, c.rpb))
    out32, attn32 = _fused(dims, True)(q32, k32, v32, rpb32, kernel, dilation, c.scale)
    want32 = c.backward(go32, q32, k32, v32, rpb32, c.out.float(), attn32, kernel, dilation, c.scale)
    for got, exp in zip(c.grads, want32):
        torch.testing.assert_close(got.float(), exp, rtol=2**-7, atol=1e-4)


def _assert_bf16_backward_matches_float32(q, k, v, grad_out, rpb, kernel, dilation, scale):
    """The bf16 fused backward (saved weights) against the float32 kernel on the upcast inputs, to bf16's rounding."""
    out, attn = _fused(2, True)(q, k, v, rpb, kernel, dilation, scale)
    grads = torch.ops.dinat_m2f.na2d_fused_backward_with_attn(
        grad_out, q, k, v, rpb, out, attn, kernel, dilation, scale
    )
    q32, k32, v32, go32, rpb32 = (t.float() for t in (q, k, v, grad_out, rpb))
    _, attn32 = _fused(2, True)(q32, k32, v32, rpb32, kernel, dilation, scale)
    want32 = torch.ops.dinat_m2f.na2d_fused_backward_with_attn(
        go32, q32, k32, v32, rpb32, out.float(), attn32, kernel, dilation, scale
    )
    for got, exp in zip(grads, want32):
        torch.testing.assert_close(got.float(), exp, rtol=2**-7, atol=1e-4)


def test_bf16_fused_backward_over_several_workspace_groups(path):
    """A slice's dS (224 x 224 queries x 169 weights, 32 MiB) is more than the backward's group of slices holds (the
    float32 kernel's slices_per_group, about the L2 caches, at least one slice), so the three slices run as three
    groups: the query pass of a later group writes its rows from the workspace's start and the key pass and bias
    gradient read them there. Checked against the float32 kernel (which groups the same way) on
    the upcast inputs; the float64 reference would gather [tokens, 169, D] per slice."""
    g = torch.Generator().manual_seed(7)
    kernel, dilation, dim, scale = 13, 2, 16, 0.25
    q, k, v, grad_out = (torch.randn(1, 3, 224, 224, dim, generator=g).to(torch.bfloat16) for _ in range(4))
    rpb = torch.randn(3, 25, 25, generator=g).to(torch.bfloat16)
    _assert_bf16_backward_matches_float32(q, k, v, grad_out, rpb, kernel, dilation, scale)


def test_bf16_fused_backward_over_groups_of_several_slices(path):
    """A slice's dS here (40 x 40 queries x 121 weights, 0.74 MiB) lets about two slices into a group of the backward
    (slices_per_group), so five slices run as groups of two, two and one: slices past a group's first read their dS
    rows at their offset in the workspace, and the bias gradient sums each group's heads. Checked against the float32
    kernel on the upcast inputs."""
    g = torch.Generator().manual_seed(8)
    kernel, dilation, dim, scale = 11, 1, 32, 32**-0.5
    q, k, v, grad_out = (torch.randn(1, 5, 40, 40, dim, generator=g).to(torch.bfloat16) for _ in range(4))
    rpb = torch.randn(5, 21, 21, generator=g).to(torch.bfloat16)
    _assert_bf16_backward_matches_float32(q, k, v, grad_out, rpb, kernel, dilation, scale)


@pytest.mark.parametrize(
    ("kernel", "dilation", "shape"), [(7, 2, (14, 14)), (3, 4, (12, 12)), (7, 1, (7, 7)), (5, 3, (17, 16))]
)
def test_bf16_qkv_training_matches_float64(path, kernel, dilation, shape):
    """The model's call (ops.na2d_qkv with grad: q, k, v strided views of the packed projection, the gradients
    written into one buffer of its shape) in bf16, whole-group maps and one that is not: out and the gradients of qkv
    and rpb within the bf16 tolerances of float64 autograd on the same inputs (test_bf16_fused_backward_from_saved_weights
    compares the kernels with float32's more tightly)."""
    g = torch.Generator().manual_seed(kernel * 10 + dilation)
    qkv = torch.randn(2, *shape, 3, 3, 32, generator=g).to(torch.bfloat16).requires_grad_()
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(2, 3, *shape, 32, generator=g).to(torch.bfloat16)
    out = ops.na2d_qkv(qkv, kernel, dilation, rpb=rpb, backend="native")
    grads = torch.autograd.grad(out, (qkv, rpb), grad_out)
    assert out.dtype == grads[0].dtype == torch.bfloat16
    leaves = [t.detach().double().requires_grad_() for t in (qkv, rpb)]
    q, k, v = (leaves[0][..., i, :, :].permute(0, 3, 1, 2, 4) for i in range(3))
    want_out, _, _ = _reference(q, k, v, kernel, dilation, leaves[1], 32**-0.5, 2)
    want = torch.autograd.grad(want_out, leaves, grad_out.double())
    torch.testing.assert_close(out.double(), want_out, **BF16_TOL)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double(), exp, rtol=5e-2, atol=5e-2)


def test_bf16_whole_group_scratch_follows_each_call(path):
    """The whole-group kernels keep scratch per thread between calls (na_fused_bf16_cpu_isa.h: the forward's bias rows
    per head, built once per call, and the backward's P / dS tables): a call right after one with another window,
    head count or head dim, or with the same bias tensor changed in place, gets its own. Out and the gradients
    against the float32 kernel on the upcast inputs, call by call; the biases are far apart (unit normal), so bias
    rows of an earlier call would miss the tolerance by orders of magnitude."""
    g = torch.Generator().manual_seed(11)
    rpb7 = torch.empty(3, 13, 13, dtype=torch.bfloat16)
    # (kernel, dilation, map, heads, head dim): whole groups each; the k 7 map twice in a row and once after another
    # window of as many heads, with the one bias tensor.
    calls = [(7, 1, 7, 3, 32), (7, 1, 7, 3, 32), (3, 1, 3, 5, 32), (5, 2, 10, 3, 12), (7, 1, 7, 3, 32)]
    for kernel, dilation, size, heads, dim in calls:
        q, k, v, grad_out = (torch.randn(2, heads, size, size, dim, generator=g).to(torch.bfloat16) for _ in range(4))
        if kernel == 7:
            rpb = rpb7
            rpb.copy_(torch.randn(3, 13, 13, generator=g))
        else:
            rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(torch.bfloat16)
        scale = dim**-0.5
        out, attn = _fused(2, True)(q, k, v, rpb, kernel, dilation, scale)
        grads = torch.ops.dinat_m2f.na2d_fused_backward_with_attn(
            grad_out, q, k, v, rpb, out, attn, kernel, dilation, scale
        )
        q32, k32, v32, go32, rpb32 = (t.float() for t in (q, k, v, grad_out, rpb))
        out32, attn32 = _fused(2, True)(q32, k32, v32, rpb32, kernel, dilation, scale)
        torch.testing.assert_close(out.float(), out32, **ROUNDING_TOL)
        torch.testing.assert_close(attn, attn32, rtol=1e-5, atol=1e-5)
        want32 = torch.ops.dinat_m2f.na2d_fused_backward_with_attn(
            go32, q32, k32, v32, rpb32, out.float(), attn32, kernel, dilation, scale
        )
        for got, exp in zip(grads, want32):
            torch.testing.assert_close(got.float(), exp, rtol=2**-7, atol=1e-4)


# Windows of 81 keys or more that are not whole groups: on the AVX-512 path without vdpbf16ps the bf16 backward runs
# float32's passes on widened slices (bf16_widened_saved_backward); the row blocks elsewhere, the same sums in the same
# order on the paths checked. 1D and 2D, borders, dilations 1-3, a map a window wide along one side.
WIDENED_BACKWARD_CASES = [
    (2, 9, 1, (13, 17)),
    (2, 11, 2, (25, 30)),
    (2, 11, 1, (11, 23)),
    (2, 9, 3, (30, 27)),
    (1, 9, 3, (40,)),
    (1, 11, 1, (12,)),
]


@pytest.mark.parametrize("heads_last", [False, True], ids=["contig", "headslast"])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize(("dims", "kernel", "dilation", "shape"), WIDENED_BACKWARD_CASES)
def test_bf16_backward_on_widened_slices_is_float32s(path, dims, kernel, dilation, shape, dim, heads_last):
    """Large windows without vdpbf16ps: the bf16 gradients of q, k and v are the float32 kernel's on the upcast
    inputs (the same saved weights and out) rounded to bf16, bit for bit; with vdpbf16ps (its row blocks), and the
    bias gradient (summed over groups of slices of another size), within bf16's rounding. And within the bf16
    tolerance of float64 autograd either way."""
    c = _SavedBackwardCase(dims, kernel, dilation, shape, dim, heads_last, seed=3)
    upcast = (t.float() for t in (c.grad_out, c.q, c.k, c.v, c.rpb, c.out))
    want32 = c.backward(*upcast, c.attn, kernel, dilation, c.scale)
    for name, got, exp in zip(("q", "k", "v", "rpb"), c.grads, want32):
        if path[1] == "on" or name == "rpb":  # the bias gradient sums groups of slices of another size
            torch.testing.assert_close(got.float(), exp, rtol=2**-7, atol=1e-4)
        else:
            assert torch.equal(got, exp.to(torch.bfloat16)), f"grad {name} differs from float32's rounded"
    c.assert_near_float64_autograd()


@pytest.mark.parametrize(
    ("kernel", "dilation", "shape"),
    [(11, 1, (23, 30)), (7, 1, (40, 17)), (5, 3, (26, 20)), (7, 2, (14, 14))],
    ids=["k11", "k7", "k5-d3", "whole-groups"],
)
def test_bf16_backward_same_bits_on_any_thread_count(path, kernel, dilation, shape):
    """The bf16 saved-weights backward splits its row blocks by the thread count (bf16_backward_row_blocks) and the
    widened slices into groups: every query's dQ and every key's dK, dV are summed by one task in a fixed order, so
    1, 2, 3 and 5 threads give the same gradients, bit for bit (a block left out or done twice would not)."""
    g = torch.Generator().manual_seed(kernel + dilation)
    q, k, v, grad_out = (torch.randn(2, 3, *shape, 32, generator=g).to(torch.bfloat16) for _ in range(4))
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(torch.bfloat16)
    out, attn = _fused(2, True)(q, k, v, rpb, kernel, dilation, 32**-0.5)
    before = torch.get_num_threads()
    grads = {}
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            grads[threads] = torch.ops.dinat_m2f.na2d_fused_backward_with_attn(
                grad_out, q, k, v, rpb, out, attn, kernel, dilation, 32**-0.5
            )
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3, 5):
        for name, got, exp in zip(("q", "k", "v", "rpb"), grads[threads], grads[1]):
            assert torch.equal(got, exp), f"grad {name}: {threads} threads differ from one"
