"""The native multi-scale deformable attention op against the grid_sample reference."""

from __future__ import annotations

import pytest
import torch

from dinat_m2f.ops.ms_deform_attn import ms_deform_attn
from dinat_m2f.ops.ms_deform_attn_reference import ms_deform_attn_reference

CUDA = torch.cuda.is_available() and "cuda" in __import__("dinat_m2f").build_info()["backends"]


def make_inputs(
    seed, shapes, n=2, heads=3, channels=5, queries=7, points=4, dtype=torch.float64, device="cpu", spread=0.4
):
    """Random inputs; sampling locations in [-spread, 1 + spread], so some fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(n, int(areas.sum()), heads, channels, generator=g, dtype=torch.float64)
    loc = torch.rand(n, queries, heads, levels, points, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    attn = torch.rand(n, queries, heads, levels, points, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    to = dict(dtype=dtype, device=device)
    return (value.to(**to), spatial_shapes.to(device), level_start_index.to(device), loc.to(**to), attn.to(**to))


SHAPE_CASES = [
    ([(6, 5), (3, 4), (2, 2)], dict()),
    ([(1, 1)], dict(n=1, heads=1, channels=1, queries=1, points=1)),
    ([(7, 3), (4, 9)], dict(n=3, heads=2, channels=8, queries=11, points=3)),
    ([(5, 5), (3, 3), (2, 2), (1, 1)], dict(n=1, heads=4, channels=4, queries=5, points=2)),
]


@pytest.mark.parametrize("case", range(len(SHAPE_CASES)))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_forward_matches_reference(case, dtype, tol):
    shapes, kw = SHAPE_CASES[case]
    value, ss, lsi, loc, attn = make_inputs(case, shapes, dtype=dtype, **kw)
    out = ms_deform_attn(value, ss, lsi, loc, attn)
    ref = ms_deform_attn_reference(value, ss, loc, attn)
    assert out.shape == ref.shape == (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_forward_and_backward_match_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    levels = int(torch.randint(1, 4, (1,), generator=g))
    shapes = [tuple(int(v) for v in torch.randint(1, 9, (2,), generator=g)) for _ in range(levels)]
    kw = {k: int(torch.randint(1, 6, (1,), generator=g)) for k in ("n", "heads", "channels", "queries", "points")}
    value, ss, lsi, loc, attn = make_inputs(seed, shapes, **kw)
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(value, ss, lsi, loc, attn)
    ref = ms_deform_attn_reference(value, ss, loc, attn)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    grads_ref = torch.autograd.grad(ref, inputs, grad)
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_gradcheck_float64():
    value, ss, lsi, loc, attn = make_inputs(7, [(4, 3), (2, 3)], n=1, heads=2, channels=3, queries=3, points=2)
    assert torch.autograd.gradcheck(
        lambda v, p, a: ms_deform_attn(v, ss, lsi, p, a),
        (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()),
        eps=1e-6,
        atol=1e-5,
    )


def test_double_backward_says_it_is_unsupported():
    value, ss, lsi, loc, attn = make_inputs(8, [(4, 3)], n=1, heads=1, channels=2, queries=2, points=2)
    value.requires_grad_()
    (grad_value,) = torch.autograd.grad(ms_deform_attn(value, ss, lsi, loc, attn).sum(), [value], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward of ms_deform_attn is not supported"):
        grad_value.sum().backward()


def test_points_outside_read_zero_and_get_no_gradient():
    value, ss, lsi, loc, attn = make_inputs(3, [(4, 4), (2, 3)], n=1, heads=2, channels=3, queries=4, points=2)
    # all locations at least one pixel outside every level's map
    loc = torch.where(torch.rand_like(loc) > 0.5, -0.6 - torch.rand_like(loc), 1.6 + torch.rand_like(loc))
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(value, ss, lsi, loc, attn)
    assert torch.count_nonzero(out) == 0
    torch.testing.assert_close(out, ms_deform_attn_reference(value, ss, loc, attn))
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_pixel_centres_read_exact_values():
    # a location at the centre of pixel (h, w) reads value[h, w] exactly (align_corners=False convention)
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)
    ss = torch.tensor([[3, 4]])
    lsi = torch.tensor([0])
    h, w = 2, 1
    loc = torch.tensor([(w + 0.5) / 4, (h + 0.5) / 3], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    attn = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    assert ms_deform_attn(value, ss, lsi, loc, attn).item() == 4 * h + w


def test_backward_is_deterministic():
    value, ss, lsi, loc, attn = make_inputs(
        5, [(8, 8), (4, 4)], n=2, heads=4, channels=8, queries=64, points=4, dtype=torch.float32, spread=0.0
    )
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    first = torch.autograd.grad(ms_deform_attn(value, ss, lsi, loc, attn).sum(), inputs)
    second = torch.autograd.grad(ms_deform_attn(value, ss, lsi, loc, attn).sum(), inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _grads_against_reference(value, ss, lsi, loc, attn, seed=0):
    """Output and gradients (value, locations, weights) of the op and of the float64 reference, for one random
    output gradient."""
    inputs = [t.detach().requires_grad_() for t in (value, loc, attn)]
    inputs64 = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(inputs[0], ss, lsi, inputs[1], inputs[2])
    ref = ms_deform_attn_reference(inputs64[0], ss, inputs64[1], inputs64[2])
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    grads_ref = torch.autograd.grad(ref, inputs64, grad)
    return (out, *grads), (ref, *grads_ref)


def _assert_close_to_reference(results, references, tol):
    names = ("output", "grad of value", "grad of sampling_locations", "grad of attention_weights")
    for name, a, b in zip(names, results, references):
        # location gradients scale with the map size: compare relative to their magnitude
        atol = tol * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("channels", [1, 3, 8, 16, 17, 32, 41, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_channel_counts_match_reference(channels, dtype, tol):
    """Channel counts below one SIMD vector, whole vectors, and vectors plus a remainder (the kernels' channel loops
    are vectorized), on levels of different sizes with samples inside, across the border and outside."""
    value, ss, lsi, loc, attn = make_inputs(
        40 + channels, [(9, 7), (4, 5), (1, 3)], n=2, heads=3, channels=channels, queries=13, points=3, dtype=dtype
    )
    _assert_close_to_reference(*_grads_against_reference(value, ss, lsi, loc, attn, seed=channels), tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_samples_on_pixel_centres_edges_and_map_borders_match_reference(dtype, tol):
    """Locations exactly on pixel centres and edges, on the outermost centres and half a pixel beyond (two corners
    outside the map), and fully outside; power-of-two sizes keep these coordinates exact in every formula. The
    coordinate one pixel before the first centre is left out: there the op treats the sample as outside (zero
    gradient) while grid_sample keeps a derivative towards the first pixel."""
    shapes = [(4, 8), (2, 4), (1, 2)]
    value, ss, lsi, loc, attn = make_inputs(50, shapes, n=2, heads=2, channels=19, queries=40, points=4, dtype=dtype)
    g = torch.Generator().manual_seed(51)
    for level, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            # half-pixel steps k / (2 * size): centres at odd k, edges at even k; k = -2 and 2 * size + 2 are outside
            steps = torch.tensor([-2, *range(0, 2 * size + 1), 2 * size + 1, 2 * size + 2], dtype=torch.float64)
            pick = torch.randint(len(steps), loc[..., level, :, axis].shape, generator=g)
            loc[..., level, :, axis] = (steps[pick] / (2 * size)).to(dtype)
    _assert_close_to_reference(*_grads_against_reference(value, ss, lsi, loc, attn, seed=52), tol)


def test_same_bits_for_one_and_two_threads():
    """Forward and backward are deterministic whatever the thread count (no atomics, each output element written by
    one task in a fixed order); the sizes are large enough for both kernels to split the work across threads."""
    value, ss, lsi, loc, attn = make_inputs(
        60, [(16, 12), (8, 6), (4, 3)], n=2, heads=4, channels=32, queries=300, points=4, dtype=torch.float32
    )
    grad = torch.randn(2, 300, 4 * 32, generator=torch.Generator().manual_seed(61))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            inputs = [t.detach().requires_grad_() for t in (value, loc, attn)]
            out = ms_deform_attn(inputs[0], ss, lsi, inputs[1], inputs[2])
            results.append((out, *torch.autograd.grad(out, inputs, grad)))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("output", "grad of value", "grad of locations", "grad of weights"), *results):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


def test_non_contiguous_inputs():
    value, ss, lsi, loc, attn = make_inputs(9, [(5, 4), (3, 2)])
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = loc.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    torch.testing.assert_close(
        ms_deform_attn(value_nc, ss, lsi, loc_nc, attn), ms_deform_attn(value, ss, lsi, loc, attn)
    )


def test_opcheck_schema_fake_and_autograd_registration():
    value, ss, lsi, loc, attn = make_inputs(11, [(3, 4), (2, 2)], n=1, heads=2, channels=2, queries=3, points=2)
    args = (value.requires_grad_(), ss, lsi, loc.requires_grad_(), attn.requires_grad_())
    torch.library.opcheck(torch.ops.dinat_m2f.ms_deform_attn_forward.default, args)


def test_torch_compile_fullgraph():
    value, ss, lsi, loc, attn = make_inputs(12, [(3, 4), (2, 2)], dtype=torch.float32)

    def f(v, p, a):
        return ms_deform_attn(v, ss, lsi, p.clamp(-0.5, 1.5), a.softmax(-1)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(value, loc, attn), f(value, loc, attn))


# ------------------------------------------------------------------------------------------------ bad inputs


def _good():
    return list(make_inputs(0, [(3, 4), (2, 2)], dtype=torch.float32))


# Metadata the fake kernels can check too (the level sizes inside spatial_shapes are data: real kernels only).
FAKE_CHECKED = [
    (lambda a: a.__setitem__(0, a[0][0]), r"value must be \[N, S, heads, channels\]"),
    (lambda a: a.__setitem__(1, a[1].int()), "spatial_shapes must be int64, got Int"),
    (lambda a: a.__setitem__(1, a[1].flatten()), r"spatial_shapes must be \[levels, 2\]"),
    (lambda a: a.__setitem__(2, torch.tensor([0])), r"level_start_index must be \[levels\]"),
    (lambda a: a.__setitem__(3, a[3][..., :1]), "sampling_locations must be"),
    (lambda a: a.__setitem__(3, a[3][:, :, :1]), "sampling_locations has shape"),
    (lambda a: a.__setitem__(4, a[4][..., :1]), "attention_weights has shape"),
    (lambda a: a.__setitem__(3, a[3].double()), "sampling_locations has dtype Double but value has dtype Float"),
    (lambda a: a.__setitem__(0, a[0].long()), "value must be a floating tensor, got Long"),
    (lambda a: [a.__setitem__(i, a[i].half()) for i in (0, 3, 4)], "CPU kernel supports float32 and float64, got Half"),
    (lambda a: a.__setitem__(4, a[4].to("meta")), "attention_weights is on meta but value is on cpu"),
    (lambda a: a.__setitem__(1, a[1].to("meta")), "spatial_shapes is on meta but value is on cpu"),
]


# Refused by the real kernels only.
REAL_CHECKED = [
    (lambda a: a.__setitem__(1, torch.tensor([[3, 4], [2, 3]])), r"add up to sum\(H \* W\) = 18"),
    (lambda a: a.__setitem__(1, torch.tensor([[3, 4], [0, 4]])), "must be positive"),
    (lambda a: a.__setitem__(2, torch.tensor([0, 11])), r"level_start_index\[1\] = 11"),
    (lambda a: a.__setitem__(4, a[4].double()), "attention_weights has dtype"),
]


@pytest.mark.parametrize("mutate,match", FAKE_CHECKED + REAL_CHECKED)
def test_bad_inputs_raise_clear_errors(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ms_deform_attn(*args)


@pytest.mark.parametrize("mutate,match", FAKE_CHECKED)
def test_fake_kernel_refuses_what_the_real_kernel_refuses(mutate, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _good()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):  # real kernel (a meta input: the fake one)
        ms_deform_attn(*args)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match=match):
        ms_deform_attn(*args)


def test_fake_backward_checks_grad_output():
    from torch._subclasses.fake_tensor import FakeTensorMode

    value, ss, lsi, loc, attn = _good()
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.dinat_m2f.ms_deform_attn_backward(value, ss, lsi, loc, attn, torch.zeros(1, 2, 3))


@pytest.mark.parametrize(
    "shapes,starts,positions,match",
    [
        # H * W = 2**64 wraps to 0 in int64: it must not pass for a value with S = 0 (the kernel would read far
        # outside value).
        (
            [(2**32, 2**32)],
            [0],
            0,
            r"value has S = 0 positions but spatial_shapes add up to sum\(H \* W\) = "
            "18446744073709551616",
        ),
        (
            [(2**62, 4), (3, 4)],
            [0, 0],
            12,
            r"spatial_shapes\[:1\] already add up to sum\(H \* W\) = "
            "18446744073709551616",
        ),
        ([(3, 4), (2**31, 2**31)], [0, 12], 12, r"add up to sum\(H \* W\) = 4611686018427387916"),
    ],
)
def test_level_sizes_are_summed_without_overflow(shapes, starts, positions, match):
    value = torch.zeros(1, positions, 1, 2)
    ss = torch.tensor(shapes, dtype=torch.int64)
    lsi = torch.tensor(starts, dtype=torch.int64)
    loc = torch.full((1, 1, 1, len(shapes), 1, 2), 0.5)
    attn = torch.ones(1, 1, 1, len(shapes), 1)
    with pytest.raises(RuntimeError, match=match):
        ms_deform_attn(value, ss, lsi, loc, attn)


def test_bad_grad_output_raises():
    value, ss, lsi, loc, attn = _good()
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.dinat_m2f.ms_deform_attn_backward(value, ss, lsi, loc, attn, torch.zeros(1, 2, 3))


def test_device_mismatch_raises():
    value, ss, lsi, loc, attn = _good()
    with pytest.raises(RuntimeError, match="on one device|meta"):
        ms_deform_attn(value, ss, lsi, loc.to("meta"), attn)


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)]
)
def test_cuda_matches_reference(dtype, tol):
    value, ss, lsi, loc, attn = make_inputs(
        21, [(16, 12), (8, 6), (4, 3)], n=2, heads=8, channels=32, queries=50, points=4, device="cuda"
    )
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_reference(value, ss, loc, attn)
    grad = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, inputs, grad)

    cast = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = ms_deform_attn(cast[0], ss, lsi, cast[1], cast[2])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grads = torch.autograd.grad(out, cast, grad.to(dtype))
    for a, b in zip(grads, grads_ref):
        assert a.dtype == dtype
        # location gradients scale with the map size: compare relative to their magnitude
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")
def test_cuda_with_level_sizes_on_the_cpu():
    """spatial_shapes / level_start_index may stay on the host (no device sync to check them): same results."""
    value, ss, lsi, loc, attn = make_inputs(23, [(9, 7), (5, 4)], dtype=torch.float32, device="cuda")
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    on_device = ms_deform_attn(value, ss, lsi, loc, attn)
    on_host = ms_deform_attn(value, ss.cpu(), lsi.cpu(), loc, attn)
    torch.testing.assert_close(on_host, on_device, rtol=0, atol=0)
    grads_device = torch.autograd.grad(on_device.sum(), inputs)
    grads_host = torch.autograd.grad(on_host.sum(), inputs)
    for a, b in zip(grads_host, grads_device):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")
def test_cuda_matches_cpu_kernel():
    value, ss, lsi, loc, attn = make_inputs(22, [(9, 7), (5, 4)], dtype=torch.float32)
    cpu = ms_deform_attn(value, ss, lsi, loc, attn)
    gpu = ms_deform_attn(*(t.cuda() for t in (value, ss, lsi, loc, attn)))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
