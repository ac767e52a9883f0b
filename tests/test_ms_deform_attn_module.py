"""The pixel decoder's MSDeformAttn module against the official formulation (Deformable DETR's module, written out
here): the sampling locations bit for bit, the attention weights and outputs to float32 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinat_m2f.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn
from dinat_m2f.ops.ms_deform_attn_reference import ms_deform_attn_reference

# level sizes that are not powers of two (their reciprocals are inexact) and a 1x1 level
SHAPES = [(7, 5), (4, 3), (2, 2), (1, 1)]


def make_module(dtype=torch.float32, seed=0) -> MSDeformAttn:
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=32, n_levels=len(SHAPES), n_heads=4, n_points=3, impl="pytorch")
    with torch.no_grad():  # the official init zeroes the attention projection: random weights test more
        for p in module.parameters():
            p.normal_(0.0, 0.5)
    return module.to(dtype)


def make_inputs(dtype=torch.float32, n=2, queries=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(SHAPES, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    query = torch.randn(n, queries, 32, generator=g, dtype=dtype)
    reference = torch.rand(n, queries, len(SHAPES), 2, generator=g, dtype=dtype)
    flatten = torch.randn(n, int(areas.sum()), 32, generator=g, dtype=dtype)
    return query, reference, flatten, spatial_shapes, starts


def official_offsets_and_weights(module: MSDeformAttn, query: torch.Tensor):
    N, Lq, _ = query.shape
    M, L, P = module.n_heads, module.n_levels, module.n_points
    offsets = module.sampling_offsets(query).view(N, Lq, M, L, P, 2)
    weights = module.attention_weights(query).view(N, Lq, M, L * P)
    return offsets, F.softmax(weights, -1).view(N, Lq, M, L, P)


def official_locations(reference: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
    normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
    return reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]


def official_forward(module, query, reference, flatten, spatial_shapes):
    N, Lq, _ = query.shape
    value = module.value_proj(flatten).view(N, flatten.shape[1], module.n_heads, -1)
    offsets, weights = official_offsets_and_weights(module, query)
    locations = official_locations(reference, offsets, spatial_shapes)
    return module.output_proj(ms_deform_attn_reference(value, spatial_shapes, locations, weights))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_locations_are_the_official_bits(grad, dtype):
    module = make_module(dtype)
    query, reference, _, spatial_shapes, _ = make_inputs(dtype)
    offsets = (module.sampling_offsets(query) * 7.3).detach()  # large offsets: many roundings
    offsets = offsets.view(2, 9, module.n_heads, module.n_levels, module.n_points, 2).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        ours = MSDeformAttn._locations_from_points(reference, offsets, spatial_shapes)
        theirs = official_locations(reference, offsets, spatial_shapes)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    if grad:
        upstream = torch.randn_like(ours)
        (g_ours,) = torch.autograd.grad(ours, offsets, upstream)
        (g_theirs,) = torch.autograd.grad(theirs, offsets, upstream)
        assert torch.equal(g_ours, g_theirs)  # the division's backward, as the official formula's


def test_sampling_locations_promote_like_the_official_formula():
    module = make_module()
    query, reference, _, spatial_shapes, _ = make_inputs()
    offsets = module.sampling_offsets(query).detach().view(2, 9, module.n_heads, module.n_levels, module.n_points, 2)
    ours = MSDeformAttn._locations_from_points(reference.double(), offsets, spatial_shapes)
    theirs = official_locations(reference.double(), offsets, spatial_shapes)
    assert ours.dtype == torch.float64 and torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_attention_weights_are_the_official_softmax(dtype, tol):
    module = make_module(dtype)
    query, *_ = make_inputs(dtype)
    _, theirs = official_offsets_and_weights(module, query)
    ours = module._attention_weights(query)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.sum((-1, -2)), torch.ones_like(ours[..., 0, 0]), rtol=tol, atol=tol)


def official_sample(module, query, reference, value, spatial_shapes):
    offsets, weights = official_offsets_and_weights(module, query)
    locations = official_locations(reference, offsets, spatial_shapes)
    return ms_deform_attn_reference(value, spatial_shapes, locations, weights)


@pytest.mark.parametrize("impl", ["pytorch", "native"])
def test_sampling_and_its_gradients_match_the_official_module_in_float64(impl):
    # _sample is the module's float32 part (the projections around it follow autocast); float64 tests the formula
    module = make_module(torch.float64)
    module.impl = impl
    query, reference, flatten, spatial_shapes, starts = make_inputs(torch.float64)
    value = module.value_proj(flatten).detach().requires_grad_()
    query.requires_grad_()
    ours = module._sample(query, reference, value, spatial_shapes, starts, None)
    theirs = official_sample(module, query, reference, value.view(2, -1, module.n_heads, 8), spatial_shapes)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ours)
    leaves = [query, value, *module.sampling_offsets.parameters(), *module.attention_weights.parameters()]
    grads = zip(torch.autograd.grad(ours, leaves, upstream), torch.autograd.grad(theirs, leaves, upstream))
    for a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_module_training_forward_and_gradients_match_the_official_module():
    module = make_module()
    module.impl = "native"
    query, reference, flatten, spatial_shapes, starts = make_inputs()
    query.requires_grad_()
    ours = module(query, reference, flatten, spatial_shapes, starts)
    theirs = official_forward(module, query, reference, flatten, spatial_shapes)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ours)
    params = [query, *module.parameters()]
    for a, b in zip(torch.autograd.grad(ours, params, upstream), torch.autograd.grad(theirs, params, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_module_inference_matches_the_official_module_in_float32():
    module = make_module().eval()
    module.impl = "native"
    inputs = make_inputs()
    with torch.inference_mode():
        ours = module(*inputs)
        theirs = official_forward(module, *inputs[:4])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_state_dict_keeps_the_official_layout():
    module = make_module()
    assert module.attention_weights.weight.shape == (module.n_heads * module.n_levels * module.n_points, 32)
    assert set(module.state_dict()) == {
        f"{name}.{p}"
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for p in ("weight", "bias")
    }
