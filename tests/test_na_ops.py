"""Native neighborhood-attention ops (dinat_m2f.ops) against the pure-PyTorch reference, on CPU and CUDA.

The (kernel size, dilation, shape) grid is sampled rather than exhausted: every odd k in 3..13, dilations up to
axis // k, axes that the dilation does not divide, non-square maps and the smallest legal maps all appear.
"""

from __future__ import annotations

import functools

import pytest
import torch
from op_recorder import RecordNativeOps

from dinat_m2f import ops
from dinat_m2f._ext import load_extension
from dinat_m2f.ops import na as _na  # noqa: F401  (registers the fakes and autograd test_opcheck needs)
from dinat_m2f.ops import reference as ref

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)
DEVICES = ["cpu", CUDA]

# (kernel_size, dilation, (H, W)) for 2D and (kernel_size, dilation, L) for 1D.
CASES_2D = [
    (3, 1, (3, 3)),  # smallest legal map
    (3, 2, (6, 7)),
    (3, 3, (10, 9)),  # axes not divisible by the dilation
    (3, 4, (13, 12)),  # dilation = axis // k
    (5, 1, (5, 8)),
    (5, 2, (11, 10)),
    (5, 3, (16, 15)),
    (7, 1, (7, 7)),
    (7, 2, (15, 14)),
    (9, 1, (9, 12)),
    (11, 1, (11, 13)),
    (13, 1, (13, 14)),
    # Dilation groups along W holding 16+ queries with unclamped windows: the CPU fused forward's query tiles.
    (3, 1, (4, 20)),
    (5, 2, (11, 42)),
]
CASES_1D = [(3, 1, 3), (3, 5, 16), (5, 2, 11), (7, 3, 23), (9, 2, 19), (11, 1, 30), (13, 1, 13), (7, 1, 24), (3, 2, 37)]

TOL = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def _case_id(case):
    k, d, shape = case
    return f"k{k}-d{d}-{shape}"


def _inputs(shape, dim, dtype, device, heads=3, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, *shape, dim, generator=g, dtype=torch.float64) for _ in range(3))
    return [t.to(dtype=dtype, device=device) for t in (q, k, v)]


def _rpb(heads, kernel_size, dims, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, *(2 * kernel_size - 1,) * dims, generator=g, dtype=torch.float64).to(
        dtype=dtype, device=device
    )


def _funcs(dims):
    if dims == 2:
        return ops.na2d_qk, ops.na2d_av, ops.na2d, ref.na2d_qk, ref.na2d_av, ref.na2d
    return ops.na1d_qk, ops.na1d_av, ops.na1d, ref.na1d_qk, ref.na1d_av, ref.na1d


def _all_cases():
    for k, d, shape in CASES_2D:
        yield pytest.param(2, k, d, shape, id=f"2d-{_case_id((k, d, shape))}")
    for k, d, length in CASES_1D:
        yield pytest.param(1, k, d, (length,), id=f"1d-{_case_id((k, d, length))}")


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in tensors]


# ----------------------------------------------------------------------------------------------- forward + backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims,k,d,shape", list(_all_cases()))
def test_ops_match_reference(dims, k, d, shape, dtype, device):
    qk, av, fused, rqk, rav, rfused = _funcs(dims)
    q, key, v = _inputs(shape, 5, dtype, device)  # head_dim 5: not a multiple of any vector width
    rpb = _rpb(3, k, dims, dtype, device)
    tol = TOL[dtype]

    # QK with and without bias, and its gradients (q, k, rpb).
    out, grads = _grads(lambda a, b, c: qk(a, b, k, d, c), [q, key, rpb])
    want, want_grads = _grads(lambda a, b, c: rqk(a, b, k, d, c), [q, key, rpb])
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)
    torch.testing.assert_close(qk(q, key, k, d), rqk(q, key, k, d), **tol)

    # AV and its gradients (attn, v).
    attn = want.softmax(-1)
    out, grads = _grads(lambda a, b: av(a, b, k, d), [attn, v])
    want, want_grads = _grads(lambda a, b: rav(a, b, k, d), [attn, v])
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)

    # Fused, with a non-default scale, and its gradients (q, k, v, rpb).
    out, grads = _grads(lambda a, b, c, r: fused(a, b, c, k, d, r, 0.6), [q, key, v, rpb])
    want, want_grads = _grads(lambda a, b, c, r: rfused(a, b, c, k, d, r, 0.6), [q, key, v, rpb])
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("saves_attn", [True, False], ids=["saved", "recompute"])
@pytest.mark.parametrize(
    "k,d,shape",
    # Head dim 32 (a compiled specialisation) on maps whose dilation groups along W hold 16+ unclamped windows: the
    # recomputing backward's query tiles (window widths 3..13 compiled), beside its per-query path at the borders;
    # k 15 has no compiled tile width and takes the per-query path everywhere. The saved-weights backward goes query
    # by query on all of them.
    [(7, 1, (9, 40)), (11, 1, (13, 44)), (5, 3, (16, 70)), (15, 1, (15, 40))],
)
def test_fused_gradients_on_query_tiles(k, d, shape, saves_attn, dtype):
    q, key, v = _inputs(shape, 32, dtype, "cpu", heads=2, batch=1)
    rpb = _rpb(2, k, 2, dtype, "cpu")
    fused = _fused_native(2, saves_attn)
    out, grads = _grads(lambda a, b, c, r: fused(a, b, c, k, d, r, 0.3), [q, key, v, rpb])
    want, want_grads = _grads(lambda a, b, c, r: ref.na2d(a, b, c, k, d, r, 0.3), [q, key, v, rpb])
    tol = TOL[dtype]
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("saves_attn", [True, False], ids=["saved", "recompute"])
@pytest.mark.parametrize("k,d", [(7, 1), (7, 2), (5, 3)])
@pytest.mark.parametrize("threads", [1, 4])
def test_fused_cpu_kernels_over_several_slice_groups(threads, k, d, saves_attn, dtype):
    """The CPU fused kernels work through the (batch, head) slices in groups whose transposed k / v and workspace fit
    about 2 MiB: at 2x3x40x40x32 both backwards take 2-3 groups, the last one partial, on query tiles and per-query
    borders alike. The forward does too with 4 threads (6 slices do not split evenly over them); with 1 thread it
    runs one task per slice instead (forward_slice_tasks)."""
    q, key, v = _inputs((40, 40), 32, dtype, "cpu", heads=3, batch=2)
    rpb = _rpb(3, k, 2, dtype, "cpu")
    fused = _fused_native(2, saves_attn)
    tensors = [q, key, v, rpb]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grads = _grads(lambda a, b, c, r: fused(a, b, c, k, d, r, 0.6), tensors)
    finally:
        torch.set_num_threads(before)
    # The reference in float64 on the same inputs: each bias gradient sums 3200 dS terms, whose float32 rounding
    # (up to 8e-5 in the float32 reference itself) exceeds the float32 tolerance; it gets its own below.
    want, want_grads = _grads(lambda a, b, c, r: ref.na2d(a, b, c, k, d, r, 0.6), [t.double() for t in tensors])
    tol = TOL[dtype]
    torch.testing.assert_close(out, want.to(dtype), **tol)
    for got, exp in zip(grads[:3], want_grads[:3]):
        torch.testing.assert_close(got, exp.to(dtype), **tol)
    rpb_tol = tol if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(grads[3], want_grads[3].to(dtype), **rpb_tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("k,d,shape", [(7, 1, (40, 40)), (11, 2, (30, 28))])
def test_fused_cpu_bias_gradient_when_slice_groups_cross_heads(k, d, shape, dtype):
    """The bias gradient is summed per group of (batch, head) slices, a task per head the group holds and bias row.
    With 5 heads and batch 2 the groups (2 MiB of workspace: 1-6 slices here) start inside a batch and wrap into the
    next one's heads, so a head left out, counted twice or confused with another changes the gradient. The query
    pass sums each query row's share, which rows a thread takes depends on the thread count, so the backward on 1
    and 3 threads must give the same bits."""
    heads, dim = 5, 16
    q, key, v = _inputs(shape, dim, torch.float64, "cpu", heads=heads, batch=2, seed=k)
    rpb = _rpb(heads, k, 2, torch.float64, "cpu", seed=d)
    tensors = [t.to(dtype) for t in (q, key, v, rpb)]
    _, grads = _grads(lambda a, b, c, r: _fused_native(2, True)(a, b, c, k, d, r, 0.5), tensors)
    _, want = _grads(lambda a, b, c, r: ref.na2d(a, b, c, k, d, r, 0.5), [t.double() for t in tensors])
    lib = torch.ops.dinat_m2f
    out, attn = lib.na2d_fused_forward_with_attn(*tensors[:3], tensors[3], k, d, 0.5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    before = torch.get_num_threads()
    by_threads = {}
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            by_threads[threads] = lib.na2d_fused_backward_with_attn(grad_out, *tensors, out, attn, k, d, 0.5)
    finally:
        torch.set_num_threads(before)
    for name, one, three in zip(("q", "k", "v", "rpb"), by_threads[1], by_threads[3]):
        assert torch.equal(one, three), f"grad {name}: the backward on 3 threads differs from 1"
    tol = {torch.float64: TOL[torch.float64], torch.float32: dict(rtol=1e-4, atol=2e-4)}.get(
        dtype, dict(rtol=5e-2, atol=5e-2)
    )
    for name, got, exp in zip(("q", "k", "v", "rpb"), grads, want):
        torch.testing.assert_close(got.double(), exp, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("saves_attn", [False, True], ids=["inference", "saved"])
@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
@pytest.mark.parametrize(
    "dims,k,d,shape,head_dim",
    [
        (2, 7, 2, (14, 14), 32),  # DiNAT-T's 14x14 d 2: 49 queries per group, tiles of 16 (8) and a partial one
        (2, 3, 4, (12, 12), 5),
        (2, 5, 3, (15, 15), 16),
        (2, 3, 5, (15, 15), 32),  # 25 groups: backward tasks of 8 groups (kGroupsPerTask) and a last one of 1
        (2, 3, 1, (3, 3), 32),  # dilation 1: the whole map is the one group
        (1, 7, 3, (21,), 32),
        (1, 5, 2, (10,), 5),
    ],
)
def test_fused_cpu_forward_on_whole_group_windows(dims, k, d, shape, head_dim, with_rpb, saves_attn, dtype):
    """Maps of exactly k * d per axis (every window is its whole dilation group) take the CPU fused forward's
    whole-group tiles, in inference and saving the weights (training); their output, the logsumexp the recomputing
    backward reads and the saved weights the other backward reads match the reference."""
    q, key, v = _inputs(shape, head_dim, dtype, "cpu")
    rpb = _rpb(3, k, dims, dtype, "cpu") if with_rpb else None
    fused, rfused = _funcs(dims)[2], _funcs(dims)[5]
    tol = TOL[dtype]
    with torch.no_grad():
        torch.testing.assert_close(fused(q, key, v, k, d, rpb, 0.6), rfused(q, key, v, k, d, rpb, 0.6), **tol)
    tensors = [q, key, v] + ([rpb] if with_rpb else [])
    op = _fused_native(dims, saves_attn=saves_attn)
    out, grads = _grads(lambda a, b, c, *r: op(a, b, c, k, d, r[0] if r else None, 0.6), tensors)
    want, want_grads = _grads(lambda a, b, c, *r: rfused(a, b, c, k, d, r[0] if r else None, 0.6), tensors)
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)
    if saves_attn:
        with_attn = getattr(torch.ops.dinat_m2f, f"na{dims}d_fused_forward_with_attn")
        _, attn = with_attn(q, key, v, rpb, k, d, 0.6)
        torch.testing.assert_close(attn, _funcs(dims)[3](q * 0.6, key, k, d, rpb).softmax(-1), **tol)


def _na2d_call(fn, kernel, dilation, q, k, v, rpb):
    return fn(q, k, v, kernel, dilation, rpb, 0.6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_cpu_whole_group_bias_follows_each_call(dtype):
    """The whole-group kernels keep the forward's bias rows per thread between calls (na_whole_group_cpu_isa.h: built
    once per call per head) and sum the bias gradient per (slice, group) task: a call right after one with another
    window or head count, or with the same bias tensor changed in place, gets its own rows. Out, the saved weights
    and every gradient (the bias's included) against the reference, call by call; the biases are far apart (unit
    normal), so bias rows of an earlier call would miss the tolerance by orders of magnitude."""
    g = torch.Generator().manual_seed(7)
    rpb7 = torch.empty(3, 13, 13, dtype=dtype)
    # (kernel, dilation, map, heads, head dim): whole groups each; the k 7 map twice in a row and once after other
    # windows, with the one bias tensor changed in place.
    calls = [(7, 2, 14, 3, 32), (7, 2, 14, 3, 32), (3, 1, 3, 5, 32), (5, 3, 15, 3, 12), (7, 2, 14, 3, 32)]
    tol = TOL[dtype]
    for kernel, dilation, size, heads, dim in calls:
        q, key, v = (torch.randn(2, heads, size, size, dim, generator=g, dtype=torch.float64).to(dtype) for _ in "qkv")
        if kernel == 7:
            rpb = rpb7
            rpb.copy_(torch.randn(3, 13, 13, generator=g, dtype=torch.float64))
        else:
            rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g, dtype=torch.float64).to(dtype)
        tensors = [q, key, v, rpb]
        want, want_grads = _grads(functools.partial(_na2d_call, ref.na2d, kernel, dilation), tensors)
        for saves_attn in (False, True):
            op = _fused_native(2, saves_attn)
            out, grads = _grads(functools.partial(_na2d_call, op, kernel, dilation), tensors)
            torch.testing.assert_close(out, want, **tol)
            for got, exp in zip(grads, want_grads):
                torch.testing.assert_close(got, exp, **tol)
        _, attn = torch.ops.dinat_m2f.na2d_fused_forward_with_attn(q, key, v, rpb, kernel, dilation, 0.6)
        torch.testing.assert_close(attn, ref.na2d_qk(q * 0.6, key, kernel, dilation, rpb).softmax(-1), **tol)


def _fused_native(dims, saves_attn):
    """The fused native op with its autograd: the saved-weights op (training on the CPU) or the recomputing one."""
    load_extension()  # registers torch.ops.dinat_m2f.* when no op was called yet (a test run on its own)
    lib = torch.ops.dinat_m2f
    if saves_attn:
        op = lib.na2d_fused_forward_with_attn if dims == 2 else lib.na1d_fused_forward_with_attn
    else:
        op = lib.na2d_fused_forward if dims == 2 else lib.na1d_fused_forward
    return lambda q, k, v, ks, d, rpb, scale: op(q, k, v, rpb, ks, d, scale)[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("saves_attn", [True, False], ids=["saved", "recompute"])
@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
@pytest.mark.parametrize("dims,k,d,shape", list(_all_cases()) + [pytest.param(2, 7, 1, (9, 40), id="2d-tiles-k7")])
def test_fused_backward_paths_match_reference(dims, k, d, shape, with_rpb, saves_attn, dtype):
    """Both CPU backwards of the fused op, each called directly: from the weights the forward saved, and recomputing
    them from the logsumexp; the saved weights themselves are the reference softmax."""
    head_dim = 32 if shape == (9, 40) else 5  # 32: a compiled head dim, whose maps hold query tiles
    q, key, v = _inputs(shape, head_dim, dtype, "cpu")
    rpb = _rpb(3, k, dims, dtype, "cpu") if with_rpb else None
    fused = _fused_native(dims, saves_attn)
    rfused = _funcs(dims)[5]
    tensors = [q, key, v] + ([rpb] if with_rpb else [])
    out, grads = _grads(lambda a, b, c, *r: fused(a, b, c, k, d, r[0] if r else None, 0.6), tensors)
    want, want_grads = _grads(lambda a, b, c, *r: rfused(a, b, c, k, d, r[0] if r else None, 0.6), tensors)
    tol = TOL[dtype]
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)
    if saves_attn:
        op = (
            torch.ops.dinat_m2f.na2d_fused_forward_with_attn
            if dims == 2
            else torch.ops.dinat_m2f.na1d_fused_forward_with_attn
        )
        _, attn = op(q, key, v, rpb, k, d, 0.6)
        rqk = _funcs(dims)[3]
        torch.testing.assert_close(attn, rqk(q * 0.6, key, k, d, rpb).softmax(-1), **tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("saves_attn", [True, False], ids=["saved", "recompute"])
@pytest.mark.parametrize(
    "k,d,shape",
    [
        # float32 forward tiles take two query rows of a dilation group at a time where 2 * kw logits fit the
        # registers (k <= 13 on AVX-512, k <= 5 on AVX2): windows 0 rows apart
        # (clamped at the top and bottom) and 1 row apart, and a group's odd last row alone
        pytest.param(7, 1, (11, 40), id="k7-d1"),
        pytest.param(7, 3, (23, 70), id="k7-d3"),  # groups of 8, 8 and 7 rows along H
        pytest.param(5, 2, (13, 44), id="k5-d2"),  # pairs on the AVX2 path too
        pytest.param(11, 1, (14, 60), id="k11-d1"),  # DiNAT-L's kernel
        pytest.param(13, 1, (15, 34), id="k13-d1"),  # the widest compiled tile; one row at a time on AVX2
    ],
)
def test_fused_cpu_query_tiles_of_two_rows(k, d, shape, saves_attn, threads):
    """The float32 two-row query tiles against the reference: the output, the saved weights and the gradients (from
    the saved weights, or recomputed from the forward's logsumexp), on one and two threads."""
    q, key, v = _inputs(shape, 32, torch.float32, "cpu", heads=2, batch=1)
    rpb = _rpb(2, k, 2, torch.float32, "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grads = _grads(lambda a, b, c, r: _fused_native(2, saves_attn)(a, b, c, k, d, r, 0.4), [q, key, v, rpb])
    finally:
        torch.set_num_threads(before)
    want, want_grads = _grads(lambda a, b, c, r: ref.na2d(a, b, c, k, d, r, 0.4), [q, key, v, rpb])
    tol = TOL[torch.float32]
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)
    if saves_attn:
        _, attn = torch.ops.dinat_m2f.na2d_fused_forward_with_attn(q, key, v, rpb, k, d, 0.4)
        torch.testing.assert_close(attn, ref.na2d_qk(q * 0.4, key, k, d, rpb).softmax(-1), **tol)


def _reference_na(dims):
    return ref.na2d if dims == 2 else ref.na1d


@pytest.mark.parametrize("path", ["saved", "recompute", "packed"])
@pytest.mark.parametrize(
    "dims,k,d,shape,head_dim",
    [
        # float32 on AVX-512 runs every query of a row through gathered tiles (16 consecutive queries in dilation
        # group order, their K / V columns permuted into lanes): tiles across dilation groups of 7-8 columns, all of
        # them clamped windows (no interior tile fits)
        pytest.param(2, 7, 8, (56, 60), 32, id="k7-d8-narrow-groups"),
        pytest.param(2, 7, 3, (21, 50), 32, id="k7-d3"),  # groups of 16-17: 10 unclamped windows each
        pytest.param(2, 7, 1, (9, 37), 32, id="k7-d1-partial-last-tile"),
        # a tile ends before 16 queries where the next query's keys would lie 32+ columns past its first key
        pytest.param(2, 11, 5, (56, 55), 32, id="k11-d5-short-tile"),  # 56 rows: not one whole group
        pytest.param(2, 13, 2, (26, 59), 32, id="k13-d2-short-tile"),
        pytest.param(2, 5, 2, (11, 37), 16, id="k5-d2-dim16"),
        pytest.param(2, 3, 4, (12, 30), 64, id="k3-d4-dim64"),
        pytest.param(2, 7, 2, (14, 30), 80, id="k7-d2-dim80"),  # a head dim past 64 (no compiled specialisation)
        pytest.param(1, 7, 3, (50,), 32, id="1d-k7-d3"),
    ],
)
def test_fused_cpu_forward_through_gathered_tiles(dims, k, d, shape, head_dim, path):
    """The float32 forward against the reference where rows are all borders, narrow dilation groups or partial and
    early-ending gathered tiles: the output, the saved weights and the gradients, on q, k, v apart (the op that saves
    the weights and the recomputing one) and on the packed qkv as the model calls it (strided tokens, heads-last
    output; with gradients it saves the weights). On the AVX2 path the same problems run through interior tiles and
    the per-query path. The saved-weights backward meets the same borders: its blocks of queries (or keys) whose
    windows (or inverse windows) are all the same, clamped at a group's edge (the first 4 queries of a group of 8
    columns at k 7), beside its blocks of shifted windows."""
    load_extension()
    heads, scale, saves_attn = 2, head_dim**-0.5, path == "saved"
    q, key, v = _inputs(shape, head_dim, torch.float32, "cpu", heads=heads, batch=2)
    rpb = _rpb(heads, k, dims, torch.float32, "cpu")
    if path == "packed":
        qkv = torch.stack([x.movedim(1, -2) for x in (q, key, v)], dim=-3)  # [B, *spatial, 3, heads, D]
        na_qkv = ops.na2d_qkv if dims == 2 else ops.na1d_qkv
        out, grads = _grads(lambda t, r: na_qkv(t, k, d, r, scale), [qkv, rpb])
        want, want_grads = _grads(
            lambda t, r: _reference_na(dims)(*(t.select(-3, i).movedim(-2, 1) for i in range(3)), k, d, r, scale),
            [qkv, rpb],
        )
    else:
        fused = _fused_native(dims, saves_attn)
        out, grads = _grads(lambda a, b, c, r: fused(a, b, c, k, d, r, scale), [q, key, v, rpb])
        want, want_grads = _grads(lambda a, b, c, r: _reference_na(dims)(a, b, c, k, d, r, scale), [q, key, v, rpb])
    tol = TOL[torch.float32]
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)
    if saves_attn:
        lib = torch.ops.dinat_m2f
        forward = lib.na2d_fused_forward_with_attn if dims == 2 else lib.na1d_fused_forward_with_attn
        _, attn = forward(q, key, v, rpb, k, d, scale)
        qk = ref.na2d_qk if dims == 2 else ref.na1d_qk
        torch.testing.assert_close(attn, qk(q * scale, key, k, d, rpb).softmax(-1), **tol)


@pytest.mark.parametrize("dims", [1, 2])
def test_training_on_cpu_saves_the_weights_and_inference_does_not(dims):
    fused = _funcs(dims)[2]
    shape = (9, 11) if dims == 2 else (17,)
    q, key, v = _inputs(shape, 8, torch.float32, "cpu")
    rpb = _rpb(3, 3, dims, torch.float32, "cpu").requires_grad_()
    with RecordNativeOps() as training:
        fused(q, key, v, 3, 2, rpb).sum().backward()
    assert training.names == [f"na{dims}d_fused_forward_with_attn", f"na{dims}d_fused_backward_with_attn"]
    for no_grad in (torch.no_grad(), torch.inference_mode()):
        with no_grad, RecordNativeOps() as inference:
            fused(q, key, v, 3, 2, rpb)
        assert inference.names == [f"na{dims}d_fused_forward"]
    with RecordNativeOps() as no_input_needs_grad:
        fused(q, key, v, 3, 2, rpb.detach())
    assert no_input_needs_grad.names == [f"na{dims}d_fused_forward"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [1, 2])
def test_fused_matches_unfused_and_default_scale(dims, device):
    qk, av, fused, *_ = _funcs(dims)
    shape = (9, 11) if dims == 2 else (17,)
    q, key, v = _inputs(shape, 16, torch.float32, device)
    rpb = _rpb(3, 3, dims, torch.float32, device)
    scale = 16**-0.5
    unfused = av(qk(q * scale, key, 3, 2, rpb).softmax(-1), v, 3, 2)
    torch.testing.assert_close(fused(q, key, v, 3, 2, rpb), unfused, rtol=1e-4, atol=1e-5)
    unfused = av(qk(q * scale, key, 3, 1).softmax(-1), v, 3, 1)
    torch.testing.assert_close(fused(q, key, v, 3), unfused, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_full_window_is_dense_attention(device):
    """A 7x7 window on a 7x7 map sees every token: NA is plain attention (large logits test the online softmax)."""
    q, key, v = _inputs((7, 7), 32, torch.float32, device)
    out = ops.na2d(q * 8, key, v, 7)
    dense = torch.nn.functional.scaled_dot_product_attention(q.flatten(2, 3) * 8, key.flatten(2, 3), v.flatten(2, 3))
    torch.testing.assert_close(out.flatten(2, 3), dense, rtol=1e-4, atol=1e-5)


def _fused_op_only(dims):
    """The fused native op itself, never the dense path that ops.na1d / ops.na2d take for whole-map windows."""
    op = torch.ops.dinat_m2f.na2d_fused_forward if dims == 2 else torch.ops.dinat_m2f.na1d_fused_forward
    return lambda q, k, v, ks, d, rpb, scale: op(q, k, v, rpb, ks, d, scale)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize(
    ("dims", "k", "d", "shape"),
    [
        (2, 7, 1, (7, 7)),
        (2, 3, 1, (3, 3)),
        (2, 13, 1, (13, 13)),
        (1, 7, 1, (7,)),
        # Every dilation group holds exactly k positions: each window is its whole group (DiNAT's dilated stages).
        (2, 7, 8, (56, 56)),
        (2, 3, 2, (6, 6)),
        (1, 5, 3, (15,)),
    ],
)
def test_whole_map_window_takes_dense_path_equal_to_na(monkeypatch, dims, k, d, shape, dtype, device):
    """Every window is its whole dilation group (each spatial size == k * dilation): dense matrix products with the
    bias per group equal the NA kernel. ops.na*d take them for whole maps (d == 1), on the CPU in inference only
    (training takes the fused kernel that saves the weights)."""
    if dtype == torch.bfloat16 and device != "cpu":
        pytest.skip("bf16 is covered on CPU")
    from dinat_m2f.ops import na

    calls = []
    dense = na._dense_attention
    monkeypatch.setattr(na, "_dense_attention", lambda *a: calls.append(1) or dense(*a))
    monkeypatch.setattr(na, "_DENSE_MIN_TOKENS_CPU", 0)  # these problems are small: the size rule is tested below
    q, key, v = (t.to(dtype) for t in _inputs(shape, 32, torch.float64, device))
    rpb = _rpb(3, k, dims, dtype, device)
    fused = _funcs(dims)[2]
    out, grads = _grads(lambda a, b, c, r: fused(a, b, c, k, d, r, 0.4), [q, key, v, rpb])
    # Training: dense for whole maps on CUDA only; the CPU's fused kernel with saved weights is faster.
    assert bool(calls) == (d == 1 and device != "cpu"), "the dense path choice is wrong"
    want, want_grads = _grads(lambda a, b, c, r: _fused_op_only(dims)(a, b, c, k, d, r, 0.4), [q, key, v, rpb])
    # bf16: the tolerances of test_low_precision_within_tolerance (both paths round their outputs to bf16).
    tol = TOL.get(dtype, dict(rtol=2e-2, atol=2e-2))
    grad_tol = TOL.get(dtype, dict(rtol=5e-2, atol=5e-2))
    # What ops.na*d computed above, and the dense products themselves (taken for whole maps in inference only).
    for got_out, got_grads in (
        (out, grads),
        _grads(lambda a, b, c, r: na._dense_attention(a, b, c, k, d, dims, r, 0.4), [q, key, v, rpb]),
    ):
        torch.testing.assert_close(got_out, want, **tol)
        for got, exp in zip(got_grads, want_grads):
            torch.testing.assert_close(got, exp, **grad_tol)
    # Inference: dilated groups keep the fused kernel (faster forward alone), whole maps go dense, except float32 and
    # bf16 on the CPU (their fused kernels are faster than the dense products).
    calls.clear()
    with torch.no_grad():
        fused(q, key, v, k, d, rpb, 0.4)
    assert bool(calls) == (d == 1 and not (dtype != torch.float64 and device == "cpu"))
    # One larger axis: the NA kernel again (windows no longer cover the map).
    calls.clear()
    wide = [torch.cat([t, t], dim=-2) for t in (q, key, v)]
    fused(*wide, k, d, rpb, 0.4)
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(("batch", "heads", "large"), [(1, 16, False), (8, 16, True)])
def test_dense_path_on_cpu_only_for_problems_large_enough(monkeypatch, batch, heads, large, grad, dtype):
    """7x7 maps at k=7 in float64 inference: 784 query tokens stay on the fused kernel (faster there), 6272 go
    dense; in training both take the fused kernel that saves the weights. float32 always takes the fused kernel (its
    whole-group tiles beat the dense products)."""
    dense = large and not grad and dtype == torch.float64
    from dinat_m2f.ops import na

    calls = []
    dense_attention = na._dense_attention
    monkeypatch.setattr(na, "_dense_attention", lambda *a: calls.append(1) or dense_attention(*a))
    q, key, v = (t.to(dtype).requires_grad_(grad) for t in _inputs((7, 7), 32, torch.float64, "cpu", heads, batch))
    out = ops.na2d(q, key, v, 7)
    assert bool(calls) == dense
    torch.testing.assert_close(out, ref.na2d(q, key, v, 7), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    q, key, v = (t.transpose(2, 3) for t in _inputs((9, 8), 4, torch.float64, device))  # [B, heads, W, H, D] views
    rpb = _rpb(3, 3, 2, torch.float64, device).transpose(1, 2)
    assert not q.is_contiguous()
    torch.testing.assert_close(ops.na2d_qk(q, key, 3, 2, rpb), ref.na2d_qk(q, key, 3, 2, rpb))
    attn = ref.na2d_qk(q, key, 3, 2).softmax(-1).transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(ops.na2d_av(attn, v, 3, 2), ref.na2d_av(attn, v, 3, 2))
    torch.testing.assert_close(ops.na2d(q, key, v, 3, 2, rpb), ref.na2d(q, key, v, 3, 2, rpb))


# ----------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dims,k,d,shape",
    # (4, 20): a full 16-query tile of unclamped windows along W, the recomputing CPU backward's query tiles.
    [(2, 3, 1, (4, 5)), (2, 3, 2, (6, 7)), (2, 3, 1, (4, 20)), (1, 3, 2, (7,)), (1, 5, 1, (6,))],
)
def test_gradcheck_float64(dims, k, d, shape, device):
    qk, av, fused, *_ = _funcs(dims)
    q, key, v = (t.requires_grad_() for t in _inputs(shape, 3, torch.float64, device, heads=2, batch=1))
    rpb = _rpb(2, k, dims, torch.float64, device).requires_grad_()
    attn = torch.randn(*q.shape[:-1], k**dims, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, r: qk(a, b, k, d, r), (q, key, rpb))
    assert torch.autograd.gradcheck(lambda a, b: av(a, b, k, d), (attn, v))
    assert torch.autograd.gradcheck(lambda a, b, c, r: fused(a, b, c, k, d, r, 0.8), (q, key, v, rpb))
    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c, k, d), (q, key, v))
    if device == "cpu":  # ops.na*d take the saved-weights backward above; the recomputing one directly here
        recompute = _fused_native(dims, saves_attn=False)
        assert torch.autograd.gradcheck(lambda a, b, c, r: recompute(a, b, c, k, d, r, 0.8), (q, key, v, rpb))
        saved = _fused_native(dims, saves_attn=True)
        assert torch.autograd.gradcheck(lambda a, b, c: saved(a, b, c, k, d, None, 0.8), (q, key, v))
    # The unfused ops' backward is made of NA primitives with their own autograd: double backward works.
    assert torch.autograd.gradgradcheck(lambda a, b, r: qk(a, b, k, d, r), (q, key, rpb))
    assert torch.autograd.gradgradcheck(lambda a, b: av(a, b, k, d), (attn, v))


@pytest.mark.parametrize("saves_attn", [True, False], ids=["saved", "recompute"])
@pytest.mark.parametrize(
    "dims,k,d,shape",
    # Query tiles inside dilation groups (16 unclamped windows per group along W), every border; k 13 per query.
    [(2, 5, 2, (10, 42)), (2, 3, 3, (9, 60)), (2, 13, 1, (13, 14)), (1, 7, 3, (23,)), (1, 3, 1, (40,))],
)
def test_fused_cpu_backward_paths_gradcheck_float64(dims, k, d, shape, saves_attn):
    fused = _fused_native(dims, saves_attn)
    q, key, v = (t.requires_grad_() for t in _inputs(shape, 3, torch.float64, "cpu", heads=1, batch=1))
    rpb = _rpb(1, k, dims, torch.float64, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, r: fused(a, b, c, k, d, r, 0.8), (q, key, v, rpb))


def test_fused_double_backward_says_it_is_unsupported():
    q, key, v = (t.requires_grad_() for t in _inputs((6, 7), 3, torch.float64, "cpu", heads=2, batch=1))
    (grad_q,) = torch.autograd.grad(ops.na2d(q, key, v, 3, 2).sum(), [q], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward of the fused na2d is not supported"):
        grad_q.sum().backward()


@pytest.mark.parametrize("saves_attn", [True, False], ids=["saved", "recompute"])
def test_fused_saved_output_is_not_differentiable(saves_attn):
    """The fused forward's second output (logsumexp or weights) is backward state: marked non-differentiable, so a
    loss on it is torch's loud error rather than a silent zero gradient, and the inputs' gradients through the
    output are the reference's."""
    load_extension()
    lib = torch.ops.dinat_m2f
    op = lib.na2d_fused_forward_with_attn if saves_attn else lib.na2d_fused_forward
    q, key, v = (t.requires_grad_() for t in _inputs((6, 7), 3, torch.float64, "cpu", heads=2, batch=1))
    out, saved = op(q, key, v, None, 3, 1, 0.5)
    assert out.requires_grad and not saved.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        saved.sum().backward()
    (grad_q,) = torch.autograd.grad(out.sum() + saved.sum(), [q])
    (expected,) = torch.autograd.grad(ref.na2d(q, key, v, 3, 1, scale=0.5).sum(), [q])
    torch.testing.assert_close(grad_q, expected)


# ----------------------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=CUDA.marks),
        pytest.param("cuda", torch.float16, marks=CUDA.marks),
    ],
)
@pytest.mark.parametrize("dims,k,d,shape", [(2, 5, 2, (11, 12)), (1, 7, 3, (23,))])
def test_low_precision_within_tolerance(dims, k, d, shape, device, dtype):
    """bf16/fp16 inputs, float32 accumulation: within 2e-2 (abs + rel) of float64 math on the same rounded inputs."""
    qk, av, fused, rqk, rav, rfused = _funcs(dims)
    q, key, v = _inputs(shape, 16, dtype, device)
    rpb = _rpb(3, k, dims, dtype, device)
    q64, k64, v64, rpb64 = (t.double() for t in (q, key, v, rpb))
    tol = dict(rtol=2e-2, atol=2e-2)
    logits = qk(q, key, k, d, rpb)
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.double(), rqk(q64, k64, k, d, rpb64), rtol=2e-2, atol=1e-1)
    attn = rqk(q64, k64, k, d, rpb64).softmax(-1)
    torch.testing.assert_close(av(attn.to(dtype), v, k, d).double(), rav(attn.to(dtype).double(), v64, k, d), **tol)
    out, grads = _grads(lambda a, b, c, r: fused(a, b, c, k, d, r), [q, key, v, rpb])
    want, want_grads = _grads(lambda a, b, c, r: rfused(a, b, c, k, d, r), [q64, k64, v64, rpb64])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, **tol)
    for got, exp in zip(grads, want_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------- torch.library / compile


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schemas, fake kernels and autograd registrations are consistent with the real kernels."""
    q, key, v = _inputs((6, 7), 4, torch.float32, device, heads=2, batch=1)
    rpb = _rpb(2, 3, 2, torch.float32, device)
    attn = torch.randn(1, 2, 6, 7, 9, device=device)
    lib = torch.ops.dinat_m2f
    q1, k1, v1 = (t.flatten(2, 3) for t in (q, key, v))
    rpb1 = _rpb(2, 3, 1, torch.float32, device)
    for op, args in [
        (lib.na2d_qk, (q, key, rpb, 3, 2)),
        (lib.na2d_qk, (q, key, None, 3, 2)),
        (lib.na2d_av, (attn, v, 3, 2)),
        (lib.na2d_inverse, (attn, v, 3, 2)),
        (lib.na2d_rpb_grad, (attn, 3, 2)),
        (lib.na2d_fused_forward, (q, key, v, rpb, 3, 2, 0.5)),
        (lib.na1d_qk, (q1, k1, rpb1, 3, 4)),
        (lib.na1d_av, (attn.flatten(2, 3)[..., :3], v1, 3, 4)),
        (lib.na1d_inverse, (attn.flatten(2, 3)[..., :3], v1, 3, 4)),
        (lib.na1d_rpb_grad, (attn.flatten(2, 3)[..., :3], 3, 4)),
        (lib.na1d_fused_forward, (q1, k1, v1, rpb1, 3, 4, 0.5)),
    ]:
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


def test_opcheck_saved_weights_ops():
    """The CPU-only ops of the saved-weights path (training): forward with autograd, and the backward they call."""
    q, key, v = _inputs((6, 7), 4, torch.float32, "cpu", heads=2, batch=1)
    rpb = _rpb(2, 3, 2, torch.float32, "cpu")
    q1, k1, v1 = (t.flatten(2, 3) for t in (q, key, v))
    rpb1 = _rpb(2, 3, 1, torch.float32, "cpu")
    lib = torch.ops.dinat_m2f
    for dims, tokens, bias, d in ((2, (q, key, v), rpb, 2), (1, (q1, k1, v1), rpb1, 4)):
        forward = getattr(lib, f"na{dims}d_fused_forward_with_attn")
        backward = getattr(lib, f"na{dims}d_fused_backward_with_attn")
        out, attn = forward(*tokens, bias, 3, d, 0.5)
        grad_out = torch.randn_like(out)
        for b in (bias, None):
            args = tuple(t.clone().requires_grad_() for t in tokens) + (
                b.clone().requires_grad_() if b is not None else None,
                3,
                d,
                0.5,
            )
            torch.library.opcheck(forward, args)
        torch.library.opcheck(backward, (grad_out, *tokens, bias, out, attn, 3, d, 0.5))
        torch.library.opcheck(backward, (grad_out, *tokens, None, out, attn, 3, d, 0.5))


class _TinyNA(torch.nn.Module):
    def __init__(self, heads=2, kernel_size=3, dilation=2):
        super().__init__()
        self.k, self.d = kernel_size, dilation
        self.rpb = torch.nn.Parameter(torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1) * 0.02)

    def forward(self, q, k, v):
        unfused = ops.na2d_av(
            ops.na2d_qk(q * q.shape[-1] ** -0.5, k, self.k, self.d, self.rpb).softmax(-1), v, self.k, self.d
        )
        fused = ops.na2d(q, k, v, self.k, self.d, self.rpb)
        one_d = ops.na1d(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), self.k, self.d)
        return unfused + fused + one_d.unflatten(2, q.shape[2:4])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch.manual_seed(0)
    module = _TinyNA().to(device)
    q, key, v = (t.requires_grad_() for t in _inputs((6, 7), 8, torch.float32, device, heads=2, batch=1))
    eager_out = module(q, key, v)
    eager_grads = torch.autograd.grad(eager_out.sum(), [q, key, v, module.rpb])
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(q, key, v)
    grads = torch.autograd.grad(out.sum(), [q, key, v, module.rpb])
    torch.testing.assert_close(out, eager_out)
    for got, exp in zip(grads, eager_grads):
        torch.testing.assert_close(got, exp)


# ----------------------------------------------------------------------------------------------- bad inputs


def _bad_calls():
    q, key, v = _inputs((7, 9), 4, torch.float32, "cpu")
    rpb = _rpb(3, 3, 2, torch.float32, "cpu")
    attn = torch.randn(2, 3, 7, 9, 9)
    return [
        ("even kernel", lambda: ops.na2d_qk(q, key, 4), "kernel_size must be an odd integer greater than 1, got 4"),
        ("kernel 1", lambda: ops.na2d(q, key, v, 1), "kernel_size must be an odd integer greater than 1, got 1"),
        ("dilation 0", lambda: ops.na2d_av(attn, v, 3, 0), "dilation must be an integer >= 1, got 0"),
        (
            "axis too small",
            lambda: ops.na2d_qk(q, key, 3, 3),
            r"the H axis of q has size 7, smaller than kernel_size \* dilation = 3 \* 3 = 9",
        ),
        (
            "1d axis too small",
            lambda: ops.na1d(q[:, :, 0], key[:, :, 0], v[:, :, 0], 5, 2),
            r"the L axis of q has size 9, smaller than kernel_size \* dilation = 5 \* 2 = 10",
        ),
        ("k shape", lambda: ops.na2d_qk(q, key[:, :, :5], 3), r"k must have the shape of q \[2, 3, 7, 9, 4\]"),
        ("v shape", lambda: ops.na2d(q, key, v[..., :2], 3), "v must have the shape of q"),
        ("dtype mismatch", lambda: ops.na2d(q, key.double(), v, 3), "k has dtype Double but q has dtype Float"),
        ("ndim", lambda: ops.na2d_qk(q[0], key[0], 3), r"q must be a 5-D tensor \[B, heads, H, W, D\]"),
        ("1d ndim", lambda: ops.na1d_qk(q, key, 3), r"q must be a 4-D tensor \[B, heads, L, D\]"),
        ("rpb shape", lambda: ops.na2d_qk(q, key, 3, 1, rpb[:, :3]), r"rpb must have shape \[heads, 2k-1, 2k-1\]"),
        ("rpb heads", lambda: ops.na2d(q, key, v, 3, 1, rpb[:2]), r"= \[3, 5, 5\], got \[2, 5, 5\]"),
        ("rpb dtype", lambda: ops.na2d(q, key, v, 3, 1, rpb.double()), "rpb has dtype Double"),
        ("attn window", lambda: ops.na2d_av(attn, v, 5), "must be the window size kernel_size\\*\\*2 = 25, got 9"),
        ("attn shape", lambda: ops.na2d_av(attn[:, :, :6], v, 3), "they must agree in every dimension but the last"),
        ("half on cpu", lambda: ops.na2d(q.half(), key.half(), v.half(), 3), "CPU kernels support float32"),
        ("int dtype", lambda: ops.na2d_qk(q.int(), key.int(), 3), "CPU kernels support float32"),
        # One input on the meta device sends the call to the fake kernel, which must refuse it like the real one.
        (
            "rpb on meta",
            lambda: ops.na2d_qk(q, key, 3, 1, rpb.to("meta")),
            "rpb is on meta but q is on cpu; all inputs must be on the same device",
        ),
        ("fused rpb on meta", lambda: ops.na2d(q, key, v, 3, 1, rpb.to("meta")), "rpb is on meta but q is on cpu"),
        ("attn on meta", lambda: ops.na2d_av(attn.to("meta"), v, 3), "attn is on meta but v is on cpu"),
        (
            "1d weights on meta",
            lambda: torch.ops.dinat_m2f.na1d_inverse(attn[:, :, 0, :, :3].to("meta"), v[:, :, 0], 3, 1),
            "weights is on meta but x is on cpu",
        ),
        (
            "lse on meta",
            lambda: torch.ops.dinat_m2f.na2d_fused_backward(
                q, q, key, v, None, v, torch.zeros(2, 3, 7, 9, device="meta"), 3, 1, 0.5
            ),
            r"lse must be a Float tensor of shape q.shape\[:-1\] on q's device, got Float \[2, 3, 7, 9\] on meta",
        ),
        (
            "saved attn dtype",
            lambda: torch.ops.dinat_m2f.na2d_fused_backward_with_attn(q, q, key, v, None, v, attn.double(), 3, 1, 0.5),
            r"na2d_fused_backward_with_attn: attn must be a Float tensor of shape \[\*q.shape\[:-1\], window\] on "
            r"q's device \(the weights the forward saved\), got Double \[2, 3, 7, 9, 9\] on cpu",
        ),
        (
            "saved attn window",
            lambda: torch.ops.dinat_m2f.na2d_fused_backward_with_attn(q, q, key, v, None, v, attn, 5, 1, 0.5),
            r"attn must be a Float tensor .* got Float \[2, 3, 7, 9, 9\] on cpu",
        ),
        # kernel_size * dilation past int64: the size check must not wrap, and messages print the true product.
        (
            "dilation 2**62",
            lambda: ops.na2d_qk(q, key, 3, 2**62),
            r"smaller than kernel_size \* dilation = 3 \* 4611686018427387904 = 13835058055282163712",
        ),
        (
            "1d dilation 2**62",
            lambda: ops.na1d(q[:, :, 0], key[:, :, 0], v[:, :, 0], 3, 2**62),
            r"= 3 \* 4611686018427387904 = 13835058055282163712\.",
        ),
        (
            "kernel 2**33+1",
            lambda: ops.na2d_av(attn, v, 2**33 + 1, 2**31),
            r"= 8589934593 \* 2147483648 = 18446744075857035264\.",
        ),
    ]


@pytest.mark.parametrize("name,call,message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise_clear_errors(name, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("name,call,message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_fake_kernels_refuse_what_real_kernels_refuse(name, call, message):
    """Traced (fake) calls get the real kernels' errors instead of an output shape for inputs the kernels refuse."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("op", [ops.na1d, ops.na2d])
def test_head_dim_zero_with_default_scale_raises_clear_error(op):
    shape = (5, 6) if op is ops.na2d else (6,)
    q, key, v = (t[..., :0] for t in _inputs(shape, 4, torch.float32, "cpu"))
    name = op.__name__
    with pytest.raises(ValueError, match=rf"{name}: q has head_dim 0 .* pass scale= explicitly"):
        op(q, key, v, 3)


@pytest.mark.parametrize("device", [CUDA])
def test_device_mismatch_raises(device):
    q, key, v = _inputs((7, 9), 4, torch.float32, device)
    with pytest.raises(RuntimeError, match="all inputs must be on the same device"):
        ops.na2d(q, key.cpu(), v, 3)
