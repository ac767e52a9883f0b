"""Layouts of the native neighborhood-attention ops: strided views in, outputs in the input's memory order, and the
packed-qkv path (ops.na1d_qkv / ops.na2d_qkv) with no layout copies around the attention (CPU kernels).

Every op must give bit-identical results on strided views (heads-last slices of a packed qkv, as the backbone's
projection produces them) and on contiguous copies of them: the kernels read the same numbers in the same order.
"""

from __future__ import annotations

import pytest
import torch
from op_recorder import RecordNativeOps
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from dinat_m2f import ops
from dinat_m2f._ext import load_extension
from dinat_m2f.ops import na as _na  # noqa: F401  (registers the fakes and autograd opcheck needs)
from dinat_m2f.ops import reference as ref

LIB = torch.ops.dinat_m2f

# (dims, kernel_size, dilation, spatial shape): odd sizes, borders, the largest dilation (axis // k), and maps whose
# dilation groups along W hold full query tiles (the fused kernels' lane-parallel paths). 11 x 11 windows without
# tiles on a map whose slices take several groups: the CPU kernels stage token-strided slices there, group by
# group (stage_slices in native/na/na_fused_cpu_isa.h).
CASES = [
    (2, 3, 1, (3, 3)),
    (2, 3, 4, (13, 12)),
    (2, 5, 2, (11, 10)),
    (2, 3, 3, (10, 9)),
    (2, 7, 1, (9, 40)),
    (2, 5, 3, (16, 70)),
    (1, 3, 5, (16,)),
    (1, 7, 3, (23,)),
    (1, 5, 1, (37,)),
    (2, 11, 3, (40, 36)),
]


@pytest.fixture(autouse=True)
def _extension():
    load_extension()  # torch.ops.dinat_m2f.* exist once the extension is loaded (ops.* calls load it lazily)


def _case_id(case):
    dims, k, d, shape = case
    return f"{dims}d-k{k}-d{d}-{'x'.join(map(str, shape))}"


def _packed(dims, shape, heads, dim, dtype, batch=2, seed=0):
    """A packed qkv [B, *shape, 3, heads, D] (a projection's output viewed per head) and its q, k, v views."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, *shape, 3, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    packed = dims + 1
    return qkv, [qkv.select(packed, i).movedim(packed, 1) for i in range(3)]


def _rpb(dims, heads, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, *(2 * k - 1,) * dims, generator=g, dtype=torch.float64).to(dtype)


def _heads_last_like(t, seed):
    """A random tensor of t's shape stored like t's heads-last layout ([B, *spatial, heads, X] memory)."""
    g = torch.Generator().manual_seed(seed)
    physical = torch.randn(t.shape[0], *t.shape[2:-1], t.shape[1], t.shape[-1], generator=g, dtype=torch.float64)
    return physical.to(t.dtype).movedim(-2, 1)


def _ops(dims):
    p = f"na{dims}d"
    return (getattr(LIB, f"{p}_{name}") for name in ("qk", "av", "inverse", "rpb_grad", "fused_forward"))


def _equal(got, want):
    assert got.shape == want.shape
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_op_reads_strided_views_in_place(case, dtype):
    dims, k, d, shape = case
    head_dim = 32 if dtype == torch.float32 else 5  # 32: the kernels' compiled head-dim specialisation
    _, (q, key, v) = _packed(dims, shape, 3, head_dim, dtype)
    assert not q.is_contiguous() and q.stride(-1) == 1
    qc, kc, vc = (t.contiguous() for t in (q, key, v))
    rpb = _rpb(dims, 3, k, dtype)
    qk, av, inverse, rpb_grad, fused_forward = _ops(dims)

    attn = qk(q, key, rpb, k, d)
    _equal(attn, qk(qc, kc, rpb, k, d))
    weights = _heads_last_like(attn, seed=2).copy_(attn.softmax(-1))
    assert not weights.is_contiguous()
    _equal(av(weights, v, k, d), av(weights.contiguous(), vc, k, d))
    _equal(inverse(weights, q, k, d), inverse(weights.contiguous(), qc, k, d))
    _equal(rpb_grad(weights, k, d), rpb_grad(weights.contiguous(), k, d))

    out, lse = fused_forward(q, key, v, rpb, k, d, 0.6)
    want_out, want_lse = fused_forward(qc, kc, vc, rpb, k, d, 0.6)
    _equal(out, want_out)
    _equal(lse, want_lse)
    # The reference agrees too (the comparison above would pass for two equally wrong results).
    reference = ref.na2d if dims == 2 else ref.na1d
    torch.testing.assert_close(out, reference(qc, kc, vc, k, d, rpb, 0.6), rtol=1e-4, atol=2e-5)

    # Backward with a heads-last grad_out and out, as autograd hands them over from the output projection.
    backward = getattr(LIB, f"na{dims}d_fused_backward")
    grad_out = _heads_last_like(out, seed=3)
    strided_out = _heads_last_like(out, seed=4).copy_(out)
    got = backward(grad_out, q, key, v, rpb, strided_out, lse, k, d, 0.6)
    want = backward(grad_out.contiguous(), qc, kc, vc, rpb, out.contiguous(), lse, k, d, 0.6)
    for g, w in zip(got, want):
        _equal(g, w)


@pytest.mark.parametrize("case", CASES[1:2] + CASES[4:5] + CASES[9:], ids=_case_id)
def test_saved_weights_ops_read_strided_views_in_place(case):
    """The training pair (forward saving the weights, backward reading them) on q, k, v sliced from a packed qkv and a
    heads-last grad_out, bit for bit as on contiguous copies: without tiles the backward (and, with 11 x 11 windows,
    the forward) reads staged copies of the strided slices, several groups of slices at the last case."""
    dims, k, d, shape = case
    _, (q, key, v) = _packed(dims, shape, 3, 32, torch.float32)
    qc, kc, vc = (t.contiguous() for t in (q, key, v))
    rpb = _rpb(dims, 3, k, torch.float32)
    forward = getattr(LIB, f"na{dims}d_fused_forward_with_attn")
    backward = getattr(LIB, f"na{dims}d_fused_backward_with_attn")
    out, attn = forward(q, key, v, rpb, k, d, 0.6)
    want_out, want_attn = forward(qc, kc, vc, rpb, k, d, 0.6)
    _equal(out, want_out)
    _equal(attn, want_attn)
    grad_out = _heads_last_like(out, seed=3)
    got = backward(grad_out, q, key, v, rpb, out, attn, k, d, 0.6)
    want = backward(grad_out.contiguous(), qc, kc, vc, rpb, want_out.contiguous(), want_attn, k, d, 0.6)
    for g, w in zip(got, want):
        _equal(g, w)


@pytest.mark.parametrize("case", CASES[:3] + CASES[6:7], ids=_case_id)
def test_outputs_follow_the_memory_order_of_the_inputs(case):
    dims, k, d, shape = case
    qkv, (q, key, v) = _packed(dims, shape, 2, 4, torch.float32)
    rpb = _rpb(dims, 2, k, torch.float32)
    to_tokens_last = (0, *range(2, dims + 2), 1, dims + 2)  # [B, heads, *S, X] -> [B, *S, heads, X]
    out, lse = getattr(LIB, f"na{dims}d_fused_forward")(q, key, v, rpb, k, d, 0.5)
    # Stored [B, *spatial, heads, D]: the reshape to [B, *spatial, C] for the output projection is a view.
    assert out.permute(to_tokens_last).is_contiguous()
    assert lse.is_contiguous()
    attn = getattr(LIB, f"na{dims}d_qk")(q, key, rpb, k, d)
    assert attn.permute(to_tokens_last).is_contiguous()
    # Contiguous inputs keep contiguous outputs.
    qc, kc, vc = (t.contiguous() for t in (q, key, v))
    assert getattr(LIB, f"na{dims}d_fused_forward")(qc, kc, vc, rpb, k, d, 0.5)[0].is_contiguous()
    grads = getattr(LIB, f"na{dims}d_fused_backward")(out, q, key, v, rpb, out, lse, k, d, 0.5)
    for g in grads[:3]:
        assert g.permute(to_tokens_last).is_contiguous()
    grad_qkv, _ = getattr(LIB, f"na{dims}d_qkv_fused_backward")(out, qkv, rpb, out, lse, k, d, 0.5)
    assert grad_qkv.shape == qkv.shape and grad_qkv.is_contiguous()


def test_strided_last_dim_is_copied_once_at_the_entry():
    """A head dim that is not unit-stride is made contiguous by the entry point (one copy), not refused."""
    g = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(1, 2, 7, 4, 9, generator=g, dtype=torch.float64).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) != 1
    rpb = _rpb(2, 2, 3, torch.float64)
    qc, kc, vc = (t.contiguous() for t in (q, key, v))
    _equal(LIB.na2d_fused_forward(q, key, v, rpb, 3, 2, 0.5)[0], LIB.na2d_fused_forward(qc, kc, vc, rpb, 3, 2, 0.5)[0])
    _equal(LIB.na2d_qk(q, key, rpb, 3, 2), LIB.na2d_qk(qc, kc, rpb, 3, 2))
    attn = torch.randn(1, 2, 7, 9, 9, dtype=torch.float64).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert attn.stride(-1) != 1
    _equal(LIB.na2d_av(attn, v, 3, 2), LIB.na2d_av(attn.contiguous(), vc, 3, 2))


def _opcheck_cases():
    load_extension()
    cases = []
    for dims, k, d, shape in (CASES[1], CASES[6]):
        qkv, (q, key, v) = _packed(dims, shape, 2, 4, torch.float32, batch=1)
        rpb = _rpb(dims, 2, k, torch.float32)
        p = f"na{dims}d"
        out, lse = getattr(LIB, f"{p}_fused_forward")(q, key, v, rpb, k, d, 0.5)
        attn = getattr(LIB, f"{p}_qk")(q, key, rpb, k, d)
        grad_out = _heads_last_like(out, seed=5).float()
        weights = getattr(LIB, f"{p}_qkv_fused_forward_with_attn")(qkv, rpb, k, d, 0.5)[1]
        cases += [
            (getattr(LIB, f"{p}_qk"), (q, key, rpb, k, d)),
            (getattr(LIB, f"{p}_av"), (attn, v, k, d)),
            (getattr(LIB, f"{p}_inverse"), (attn, v, k, d)),
            (getattr(LIB, f"{p}_rpb_grad"), (attn, k, d)),
            (getattr(LIB, f"{p}_fused_forward"), (q, key, v, rpb, k, d, 0.5)),
            (getattr(LIB, f"{p}_fused_backward"), (grad_out, q, key, v, rpb, out, lse, k, d, 0.5)),
            (getattr(LIB, f"{p}_qkv_fused_forward"), (qkv, rpb, k, d, 0.5)),
            (getattr(LIB, f"{p}_qkv_fused_forward"), (qkv, None, k, d, 0.5)),
            (getattr(LIB, f"{p}_qkv_fused_backward"), (grad_out, qkv, rpb, out, lse, k, d, 0.5)),
            (getattr(LIB, f"{p}_qkv_fused_forward_with_attn"), (qkv, rpb, k, d, 0.5)),
            (getattr(LIB, f"{p}_qkv_fused_backward_with_attn"), (grad_out, qkv, rpb, out, weights, k, d, 0.5)),
        ]
    return cases


@pytest.mark.parametrize("index", range(22))
def test_fake_kernels_give_the_real_strides(index):
    """opcheck (schema, fake vs real incl. strides, autograd registration) on strided inputs, and the strides
    compared explicitly."""
    op, args = _opcheck_cases()[index]
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = op(*fake_args)
    real = op(*args)
    for f, r in zip(fake, real) if isinstance(real, tuple) else [(fake, real)]:
        assert f.shape == r.shape and f.stride() == r.stride()
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------- packed path


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_packed_path_matches_reference_forward_and_backward(case):
    dims, k, d, shape = case
    qkv, _ = _packed(dims, shape, 3, 5, torch.float64)
    rpb = _rpb(dims, 3, k, torch.float64)
    fn = ops.na2d_qkv if dims == 2 else ops.na1d_qkv
    _assert_packed_op_matches_reference(case, qkv, rpb, lambda x, r: fn(x, k, d, r, 0.6, backend="native"))


@pytest.mark.parametrize("saves_attn", [True, False], ids=["saved", "recompute"])
@pytest.mark.parametrize("case", CASES[1:6:2] + CASES[6:7] + CASES[9:], ids=_case_id)
def test_both_packed_backwards_match_reference(case, saves_attn):
    """The packed op's two CPU backwards, each through its own forward op: from the saved weights (what training
    on the CPU runs) and recomputing them from the logsumexp."""
    dims, k, d, shape = case
    qkv, _ = _packed(dims, shape, 3, 5, torch.float64)
    rpb = _rpb(dims, 3, k, torch.float64)
    name = f"na{dims}d_qkv_fused_forward" + ("_with_attn" if saves_attn else "")
    op = getattr(LIB, name)
    _assert_packed_op_matches_reference(case, qkv, rpb, lambda x, r: op(x, r, k, d, 0.6)[0])


def _assert_packed_op_matches_reference(case, qkv, rpb, packed_op):
    """``packed_op(qkv, rpb)``'s output and the gradients of qkv and rpb equal the reference's on the unpacked views."""
    dims, k, d, _ = case
    reference = ref.na2d if dims == 2 else ref.na1d
    packed = dims + 1
    qkv1, rpb1, qkv2, rpb2 = (t.clone().requires_grad_() for t in (qkv, rpb, qkv, rpb))
    out = packed_op(qkv1, rpb1)
    want = reference(*(qkv2.select(packed, i).movedim(packed, 1) for i in range(3)), k, d, rpb2, 0.6)
    torch.testing.assert_close(out, want, rtol=1e-7, atol=1e-9)
    g = _heads_last_like(out, seed=9)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(qkv1.grad, qkv2.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(rpb1.grad, rpb2.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dims", [1, 2])
def test_packed_path_saves_the_weights_in_cpu_training_only(dims):
    shape = (9, 11) if dims == 2 else (17,)
    qkv, _ = _packed(dims, shape, 2, 8, torch.float32)
    rpb = _rpb(dims, 2, 3, torch.float32)
    fn = ops.na2d_qkv if dims == 2 else ops.na1d_qkv
    with RecordNativeOps() as training:
        fn(qkv.clone().requires_grad_(), 3, 2, rpb, backend="native").sum().backward()
    p = f"na{dims}d_qkv_fused"
    assert training.names == [f"{p}_forward_with_attn", f"{p}_backward_with_attn"]
    with torch.no_grad(), RecordNativeOps() as inference:
        fn(qkv.clone().requires_grad_(), 3, 2, rpb, backend="native")
    assert inference.names == [f"{p}_forward"]


@pytest.mark.parametrize("dims,k,d,shape", [(2, 3, 1, (4, 5)), (2, 3, 2, (6, 7)), (2, 3, 1, (4, 20)), (1, 3, 2, (7,))])
def test_packed_path_gradcheck_float64(dims, k, d, shape):
    qkv, _ = _packed(dims, shape, 2, 3, torch.float64, batch=1)
    rpb = _rpb(dims, 2, k, torch.float64)
    fn = ops.na2d_qkv if dims == 2 else ops.na1d_qkv
    qkv.requires_grad_()
    rpb.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, r: fn(x, k, d, r, 0.8, backend="native"), (qkv, rpb))
    assert torch.autograd.gradcheck(lambda x: fn(x, k, d, backend="native"), (qkv,))


class _CopyCounter(TorchDispatchMode):
    """Counts the aten ops that copy a tensor of at least `min_numel` elements (outside the native ops' own work)."""

    COPIES = {"aten::copy_", "aten::clone", "aten::select_backward", "aten::stack", "aten::cat", "aten::_to_copy"}

    def __init__(self, min_numel):
        super().__init__()
        self.min_numel = min_numel
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in self.COPIES:
            tensors = [r for r in (result if isinstance(result, (tuple, list)) else [result])]
            if any(isinstance(t, torch.Tensor) and t.numel() >= self.min_numel for t in tensors):
                self.copies.append(name)
        return result


@pytest.mark.parametrize("dims", [1, 2])
def test_packed_path_makes_no_layout_copies(dims):
    """Projection -> packed attention -> projection, forward and backward: no copy of a q/k/v/out-sized tensor."""
    batch, heads, head_dim = 2, 2, 8
    shape = (9, 10) if dims == 2 else (23,)
    channels = heads * head_dim
    qkv_proj, proj = torch.nn.Linear(channels, 3 * channels), torch.nn.Linear(channels, channels)
    x = torch.randn(batch, *shape, channels, requires_grad=True)
    rpb = _rpb(dims, heads, 3, torch.float32).requires_grad_()
    fn = ops.na2d_qkv if dims == 2 else ops.na1d_qkv
    to_tokens_last = (0, *range(2, dims + 2), 1, dims + 2)
    with _CopyCounter(min_numel=batch * heads * x[0, ..., 0].numel() * head_dim) as counter:
        qkv = qkv_proj(x).view(batch, *shape, 3, heads, head_dim)
        out = fn(qkv, 3, 2, rpb, backend="native")
        y = proj(out.permute(to_tokens_last).reshape(batch, *shape, channels))
        y.sum().backward()
    assert counter.copies == []
    assert x.grad is not None and rpb.grad is not None


def test_packed_path_refuses_a_tensor_that_is_not_packed():
    with pytest.raises(RuntimeError, match=r"na2d_qkv: qkv must be a 6-D tensor \[B, H, W, 3, heads, D\]"):
        ops.na2d_qkv(torch.randn(1, 5, 5, 2, 2, 4), 3, backend="native")
    with pytest.raises(RuntimeError, match=r"na1d_qkv: qkv must be a 5-D tensor \[B, L, 3, heads, D\]"):
        ops.na1d_qkv(torch.randn(1, 5, 4, 4), 3, backend="native")


@pytest.mark.parametrize("dims,k,d,shape", [(2, 3, 4, (13, 12)), (2, 5, 2, (11, 10)), (1, 7, 3, (23,))])
def test_cpu_ops_copy_no_strided_input(dims, k, d, shape):
    """The native ops (every one, forward and backward) read heads-last views without copying them: the profiler
    sees no copy inside them. (Maps without query tiles: the tiles regroup k and v by design.)"""
    qkv, (q, key, v) = _packed(dims, shape, 2, 8, torch.float32)
    rpb = _rpb(dims, 2, k, torch.float32)
    qk, av, inverse, rpb_grad, fused_forward = _ops(dims)
    out, lse = fused_forward(q, key, v, rpb, k, d, 0.5)
    attn = qk(q, key, rpb, k, d)
    grad_out = _heads_last_like(out, seed=6).float()
    backward = getattr(LIB, f"na{dims}d_fused_backward")
    qkv_backward = getattr(LIB, f"na{dims}d_qkv_fused_backward")
    qkv_forward = getattr(LIB, f"na{dims}d_qkv_fused_forward")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        qk(q, key, rpb, k, d)
        av(attn, v, k, d)
        inverse(attn, q, k, d)
        rpb_grad(attn, k, d)
        fused_forward(q, key, v, rpb, k, d, 0.5)
        backward(grad_out, q, key, v, rpb, out, lse, k, d, 0.5)
        qkv_forward(qkv, rpb, k, d, 0.5)
        qkv_backward(grad_out, qkv, rpb, out, lse, k, d, 0.5)
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert copies == []


def test_dense_path_writes_the_packed_layout_and_matches_contiguous_inputs():
    """A window that is the whole map (DiNAT's 7x7 stage at k=7, in inference) takes the dense path (on the CPU in
    float64 only: the float32 and bf16 kernels are faster there): from a packed qkv its output is heads-last too, and
    equal to the dense path on contiguous q, k, v to float64 rounding. Not bit for bit: the BLAS may round a product of
    strided operands differently (MKL on an AMD EPYC: 2e-15; bit-identical on an Intel Xeon)."""
    qkv, (q, key, v) = _packed(2, (7, 7), 8, 32, torch.float64, batch=8)  # 8 * 8 * 49 tokens: dense pays off
    rpb = _rpb(2, 8, 7, torch.float64)
    with torch.no_grad():
        out = ops.na2d_qkv(qkv, 7, 1, rpb, 0.5, backend="native")
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()
    contiguous = [t.contiguous() for t in (q, key, v)]
    want = _na._dense_attention(*contiguous, 7, 1, 2, rpb, 0.5)
    assert want.is_contiguous()
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out, ref.na2d(*contiguous, 7, 1, rpb, 0.5))
